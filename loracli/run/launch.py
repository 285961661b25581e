"""`python -m loracli.run.launch RUN_DIR`: what each process runs under `accelerate launch`."""

from __future__ import annotations

import sys
from pathlib import Path

from loracli.errors import EXIT_INTERRUPTED, LoracliError


def main() -> None:
    from loracli.run.train import train

    try:
        train(Path(sys.argv[1]), resume="--resume" in sys.argv[2:])
    except LoracliError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"error: {problem.render()}\n")
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
