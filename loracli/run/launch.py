"""`python -m loracli.run.launch RUN_DIR`: what each process runs under `accelerate launch`."""

from __future__ import annotations

import sys
from pathlib import Path

from loracli.errors import EXIT_INTERRUPTED


def main() -> None:
    from loracli.run.train import train

    try:
        train(Path(sys.argv[1]), resume="--resume" in sys.argv[2:])
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # every process reports like the CLI: one line, never a traceback
        from loracli.cli.app import report_failure

        raise SystemExit(report_failure(exc)) from None


if __name__ == "__main__":
    main()
