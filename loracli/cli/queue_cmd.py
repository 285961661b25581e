"""`loracli queue run|status`: the summary table and the exit code scripts read."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loracli.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRAINING, ConfigError, Problem
from loracli.queue import Job, QueueFile, run_queue


def exit_code(jobs: list[Job]) -> int:
    states = {j.status for j in jobs}
    if "interrupted" in states:
        return EXIT_INTERRUPTED
    if "failed" in states:
        return EXIT_TRAINING
    if "invalid" in states:
        return EXIT_CONFIG
    return EXIT_OK


def print_summary(jobs: list[Job], console: Console) -> None:
    table = Table(title="queue", title_justify="left")
    for col in ("job", "status", "steps", "time", "output / error"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        detail = job.output if job.status == "finished" else (job.error or "")
        table.add_row(Path(job.config).name, job.status, f"{job.steps}/{job.total_steps}",
                      f"{job.seconds:.0f}s", detail or "")
    console.print(table)
    counts = {s: sum(1 for j in jobs if j.status == s) for s in ("finished", "failed", "invalid", "interrupted",
                                                                   "pending")}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n), markup=False)


def queue_run(configs: list[Path], presets: list[str], queue_file: Path, retries: int,
              notify_command: str | None, webhook: str | None, as_json: bool, backend: str | None = None,
              sd_scripts_dir: Path | None = None, force: bool = False) -> int:
    """backend/sd_scripts_dir default to LORACLI_BACKEND / LORACLI_SD_SCRIPTS_DIR (as `loracli train`)."""
    backend = backend or os.environ.get("LORACLI_BACKEND") or "loracli"
    if sd_scripts_dir is None and os.environ.get("LORACLI_SD_SCRIPTS_DIR"):
        sd_scripts_dir = Path(os.environ["LORACLI_SD_SCRIPTS_DIR"])
    if backend not in ("loracli", "sd-scripts"):
        raise ConfigError(Problem(f"--backend {backend}", "unknown backend", "use loracli or sd-scripts"))
    console = Console(stderr=as_json, highlight=False, width=max(Console().width, 120))
    log = lambda line: console.print(line, markup=False)  # noqa: E731
    jobs = run_queue(configs, presets, queue_file, retries, notify_command, webhook, log, backend, sd_scripts_dir,
                     force=force)
    if as_json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
    else:
        print_summary(jobs, console)
    return exit_code(jobs)


def queue_status(queue_file: Path, as_json: bool) -> None:
    state = QueueFile.load(queue_file)
    jobs = [_job_from_record(queue_file, data) for data in state.jobs.values()]
    if as_json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
    else:
        print_summary(jobs, Console(highlight=False, width=120))
    sys.stdout.flush()


def _job_from_record(queue_file: Path, data: dict) -> Job:
    """A job as the queue file recorded it; a record that is not one is a clear error, not a TypeError."""
    known = {f.name for f in fields(Job)}
    try:
        return Job(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        raise ConfigError(Problem(f"--queue-file {queue_file}", "holds a job record without config/presets",
                                  "delete it or pass another --queue-file")) from None
