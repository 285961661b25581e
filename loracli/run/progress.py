"""What a run shows on the terminal: the progress bar (step/total, epoch, loss, lr or d·lr, it/s, ETA,
finish time), a line while the model loads, and the summary at the end."""

from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

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

from loracli.final_loss import RollingLoss, describe, final_loss
from loracli.lint import is_adaptive


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

    def __init__(self, total_steps: int, enabled: bool = True, initial_step: int = 0, optimizer_type: str = ""):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.smoothed: float | None = None
        self.rolling = RollingLoss()
        self.interactive = self.console.is_terminal
        # DAdapt*/Prodigy: the first value current_lrs gives is d·lr, the step size they really use
        self.lr_label = lr_label(optimizer_type)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn(self.lr_label + " {task.fields[lr]}"), SpeedColumn(), TimeRemainingColumn(),
            FinishTimeColumn(),
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
        # The mean of the last steps (per-step diffusion loss is mostly noise): the final loss's definition.
        self.smoothed = self.rolling.add(loss)
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


def lr_label(optimizer_type: str) -> str:
    return "d·lr" if optimizer_type and is_adaptive(optimizer_type) else "lr"


def loading_model_line(name_or_path: str, family_title: str, model_path: str | None) -> str:
    """Said before the model loads (seconds to minutes of silence otherwise)."""
    where = f" from {model_path}" if model_path and model_path != name_or_path else ""
    return f"loading model {name_or_path} ({family_title}){where} ..."


def run_summary(run_dir: Path, started: float, start_step: int, images_per_step: float) -> list[str]:
    """The lines that end a run: time and speed, loss, the files written, what to run next.
    Read back from the run folder (metrics.jsonl, the saved files), so it says what is on disk."""
    from loracli.report.curves import read_metrics

    wall = max(time.time() - started, 1e-9)
    records = read_metrics(run_dir)
    done = [r for r in records if r["step"] > start_step]  # this process's steps (a resumed run)
    steps = len(done)
    lines = [f"done: {steps} steps in {_duration(wall)}, {steps / wall:.2f} steps/s, "
             f"{steps * images_per_step / wall:.2f} images/s"]
    losses = [r["loss"] for r in records]
    if losses:
        lines.append(f"loss: final {final_loss(losses):.4f} ({describe(len(losses))}), "
                     f"mean {sum(losses) / len(losses):.4f} over {len(losses)} steps")
    written = sorted(run_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    written += [p for p in (run_dir / "loss.png", run_dir / "lr.png", run_dir / "samples" / "grid.png")
                if p.is_file()]
    for path in written:
        lines.append(f"wrote {_shown(path)}")
    folder = _shown(run_dir)
    lines.append(f"next: loracli grid {folder}    (each saved file x strengths, as image grids)")
    lines.append(f"      loracli report {folder}  (the run's summary and curves again)")
    return lines


def _shown(path: Path) -> str:
    """Relative to the current folder when inside it (shorter to copy), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
