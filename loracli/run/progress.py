"""The training progress bar: step/total, epoch, smoothed loss, lr, it/s, ETA, finish time."""

from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import datetime, timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class FinishTimeColumn(ProgressColumn):
    """Wall-clock time at which the run should end, from the measured speed."""

    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        if remaining is None:
            return Text("ends --:--")
        return Text("ends " + (datetime.now() + timedelta(seconds=remaining)).strftime("%H:%M"))


class SpeedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} it/s" if speed else "-- it/s")


class TrainingProgress:
    """A rich bar on a terminal; plain lines (one per epoch) in logs and queues."""

    def __init__(self, total_steps: int, enabled: bool = True, initial_step: int = 0):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.smoothed: float | None = None
        self.interactive = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"), SpeedColumn(), TimeRemainingColumn(), FinishTimeColumn(),
            console=self.console, disable=not (enabled and self.interactive),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=initial_step,
                                           epoch="-", loss="-", lr="-")
        self.started = time.perf_counter()

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def step(self, loss: float, lr: float, epoch: int) -> None:
        # An exponential moving average: per-step diffusion loss is mostly noise.
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.progress.update(self.task, advance=1, epoch=epoch, loss=f"{self.smoothed:.4f}", lr=f"{lr:.3g}")

    def log(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, markup=False, highlight=False)

    def epoch_done(self, epoch: int, epochs: int, step: int, total: int) -> None:
        if self.enabled and not self.interactive:
            elapsed = time.perf_counter() - self.started
            self.log(f"epoch {epoch}/{epochs} step {step}/{total} loss {self.smoothed or 0:.4f} "
                     f"({elapsed:.1f}s)")


def quiet_third_party() -> None:
    """Keep the terminal for the run's own lines: the libraries' FutureWarnings/DeprecationWarnings
    (diffusers' deprecations, with site-packages paths) and transformers' advisory notices (torchvision
    missing, ...) say nothing a user can act on. A user's own -W/PYTHONWARNINGS still wins."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
