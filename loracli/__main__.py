"""`python -m loracli` is the `loracli` command."""

from loracli.cli.app import main

main()
