"""Steps, epochs, warmup, save and sample points, and file names, as sd-scripts
computes them (`train_network.py`, `train_util`). Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


@dataclass(frozen=True)
class Schedule:
    batches_per_epoch: int  # all bucket-batches (len(dl) before accelerate.prepare)
    batches_per_process: int  # ceil(batches / num_processes), what each process iterates
    steps_per_epoch: int  # optimizer updates per epoch: ceil(batches_per_process / GA)
    total_steps: int  # sd-scripts' max_train_steps ("total optimization steps")
    epochs: int  # num_train_epochs
    formula: str  # the arithmetic above, for humans


def compute_schedule(batches_per_epoch: int, num_processes: int, gradient_accumulation_steps: int,
                     max_train_epochs: int | None, max_train_steps: int | None) -> Schedule:
    """max_train_epochs always wins (it replaces max_train_steps, as in sd-scripts);
    otherwise the run is max_train_steps long and may stop inside its last epoch."""
    for name, value in (("batches per epoch", batches_per_epoch), ("num_processes", num_processes),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    per_process = _ceil_div(batches_per_epoch, num_processes)
    # accelerate syncs every GA micro-batches and on the last batch, hence ceil.
    steps_per_epoch = _ceil_div(per_process, gradient_accumulation_steps)
    per_epoch_text = (f"ceil(ceil({_plural(batches_per_epoch, 'batch', 'batches')} / "
                      f"{_plural(num_processes, 'process', 'processes')}) / {gradient_accumulation_steps} GA)")
    if max_train_epochs is not None:
        if max_train_epochs < 1:
            raise ValueError(f"max_train_epochs must be at least 1, got {max_train_epochs}")
        # sd-scripts: epochs * ceil(N / P / GA), which equals ceil(ceil(N / P) / GA) for integers.
        total = max_train_epochs * steps_per_epoch
        formula = f"{_plural(max_train_epochs, 'epoch')} × {per_epoch_text} = {_plural(total, 'step')}"
    elif max_train_steps is not None:
        if max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {max_train_steps}")
        total = max_train_steps
        formula = (f"{_plural(total, 'step')} at {per_epoch_text} = {steps_per_epoch} per epoch "
                   f"→ ceil({total} / {steps_per_epoch}) = {_plural(_ceil_div(total, steps_per_epoch), 'epoch')}")
    else:
        raise ValueError("neither max_train_epochs nor max_train_steps is set "
                         "(sd-scripts would silently train 1600 steps); set one of them")
    return Schedule(batches_per_epoch, per_process, steps_per_epoch, total,
                    _ceil_div(total, steps_per_epoch), formula)


def epoch_of_step(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch in which global step `step` (1-based) is taken.
    (sd-scripts' `ss_epoch` on a mid-epoch step save is this minus 1.)"""
    if step < 1 or steps_per_epoch < 1:
        raise ValueError(f"step and steps_per_epoch must be at least 1, got {step}, {steps_per_epoch}")
    return (step - 1) // steps_per_epoch + 1


def resolve_warmup_steps(lr_warmup_steps: int | float, total_steps: int, num_processes: int) -> int:
    """An int is used unchanged; a float in [0, 1) is a ratio of the scheduler length,
    which sd-scripts makes total_steps * num_processes (truncated, not rounded)."""
    if isinstance(lr_warmup_steps, bool):
        raise ValueError("lr_warmup_steps must be a number, not a boolean")
    if isinstance(lr_warmup_steps, int):
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must not be negative, got {lr_warmup_steps}")
        return lr_warmup_steps
    if not 0 <= lr_warmup_steps < 1:
        raise ValueError(f"lr_warmup_steps {lr_warmup_steps} as a float is a ratio and must be in [0, 1); "
                         "write a whole number of steps as an integer")
    # Same float operations as sd-scripts: ratio * (steps * processes), then int().
    return int(lr_warmup_steps * (total_steps * num_processes))


def epoch_save_points(save_every_n_epochs: int | None, num_epochs: int) -> list[int]:
    """Epochs after which an epoch file is written; the last epoch gets the final file instead."""
    if not save_every_n_epochs:
        return []
    return [e for e in range(save_every_n_epochs, num_epochs, save_every_n_epochs)]


def step_save_points(save_every_n_steps: int | None, total_steps: int) -> list[int]:
    """Global steps at which a step file is written (the last step too, if it divides)."""
    if not save_every_n_steps:
        return []
    return list(range(save_every_n_steps, total_steps + 1, save_every_n_steps))


def _removed_by(point: int, every_n: int, keep_last_n: int, kind: Literal["epoch", "step"]) -> int | None:
    """The file sd-scripts deletes right after saving at `point` (None: nothing)."""
    if kind == "epoch":
        removed = point - every_n * keep_last_n
    else:  # keep files from the last k steps: the newest multiple of n at or before step-k-1
        removed = point - keep_last_n - 1
        removed -= removed % every_n
    return removed if removed >= 0 else None


def kept_after_pruning(points: list[int], every_n: int, keep_last_n: int | None,
                       kind: Literal["epoch", "step"]) -> list[int]:
    """Files left after sd-scripts' save_last_n_epochs / save_last_n_steps deletions,
    replayed in save order (each save may delete one older file, if it exists)."""
    if kind not in ("epoch", "step"):
        raise ValueError(f"kind must be 'epoch' or 'step', got {kind!r}")
    if keep_last_n is None:
        return list(points)
    kept: list[int] = []
    for point in points:
        kept.append(point)
        removed = _removed_by(point, every_n, keep_last_n, kind)
        if removed is not None and removed in kept:
            kept.remove(removed)
    return kept


def _ext(ext: str) -> str:
    return ext.lstrip(".")


def epoch_file_name(output_name: str | None, epoch: int, ext: str = "safetensors") -> str:
    return f"{'epoch' if output_name is None else output_name}-{epoch:06d}.{_ext(ext)}"


def step_file_name(output_name: str | None, step: int, ext: str = "safetensors") -> str:
    return f"{'at' if output_name is None else output_name}-step{step:08d}.{_ext(ext)}"


def final_file_name(output_name: str | None, ext: str = "safetensors") -> str:
    return f"{'last' if output_name is None else output_name}.{_ext(ext)}"


def sample_points(every_n_steps: int | None, every_n_epochs: int | None, total_steps: int,
                  steps_per_epoch: int, num_epochs: int, sample_at_first: bool = False) -> dict:
    """When sample images are generated (sd-scripts' `sample_images` gate).

    - "at_first": before the first step (global step 0), only with sample_at_first.
    - every_n_epochs set: after epoch e when e % n == 0, the last epoch included;
      every_n_steps is then IGNORED (sd-scripts' rule, not a loracli choice).
    - otherwise every_n_steps: after each global step s with s % n == 0.
    Returns {"at_first": bool, "steps": [...], "epochs": [...],
    "epoch_end_steps": [global step at the end of each listed epoch]}.
    """
    steps: list[int] = []
    epochs: list[int] = []
    if every_n_epochs:
        epochs = list(range(every_n_epochs, num_epochs + 1, every_n_epochs))
    elif every_n_steps:
        steps = list(range(every_n_steps, total_steps + 1, every_n_steps))
    return {
        "at_first": bool(sample_at_first),
        "steps": steps,
        "epochs": epochs,
        # The run stops at total_steps, possibly inside the last epoch.
        "epoch_end_steps": [min(e * steps_per_epoch, total_steps) for e in epochs],
    }
