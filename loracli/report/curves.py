"""loss.png and lr.png from a run folder's metrics.jsonl.

The training loop calls `write_curves(run_dir)` at the end of every epoch, so it
must be cheap and must never break a run: it reads the file as it is (a partly
written last line is skipped), draws with matplotlib's Agg backend on a private
Figure (no pyplot global state, safe in any thread) and writes each PNG to a
temp file before renaming it. matplotlib is imported inside the functions so the
plan side stays light.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracli.final_loss import describe, final_loss, final_loss_steps

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
LR_PNG = "lr.png"
DLR_PREFIX = "d*lr/"
# an lr series spanning more than this ratio (max/min of its positive values) is drawn on a log axis
LOG_SCALE_RATIO = 100.0
MAX_EPOCH_MARKS = 25


@dataclass
class Series:
    label: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records, by step (the last one wins if a step appears twice). A line that is
    not whole JSON (the loop may be writing it right now) or has no finite loss is skipped."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # damaged bytes only spoil their own line
    except (FileNotFoundError, IsADirectoryError):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            continue
        if math.isfinite(loss):
            by_step[step] = {**record, "step": step, "loss": loss}
    return [by_step[s] for s in sorted(by_step)]


def ema_span(n_steps: int) -> int:
    """About a twentieth of the run, between 5 and 100 steps: smooth enough to see the trend
    of a noisy diffusion loss, short enough to follow it."""
    return max(5, min(100, round(n_steps / 20)))


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to 0."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def epoch_starts(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(first step, epoch) for every epoch after the first one seen: where boundaries are drawn."""
    starts, previous = [], None
    for r in records:
        epoch = r.get("epoch")
        if previous is not None and epoch != previous and epoch is not None:
            starts.append((r["step"], int(epoch)))
        previous = epoch
    return starts


def lr_series(records: list[dict[str, Any]]) -> tuple[list[Series], list[Series]]:
    """(scheduled lr per param group, d·lr per group) in first-seen order; the second list is
    empty unless the optimizer is DAdaptation/Prodigy (metrics keys "d*lr/<group>")."""
    lrs: dict[str, Series] = {}
    dlrs: dict[str, Series] = {}
    for r in records:
        lr = r.get("lr")
        if isinstance(lr, (int, float)):
            lr = {"lr": lr}
        if not isinstance(lr, dict):
            continue
        for key, value in lr.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key.startswith(DLR_PREFIX):
                group = key[len(DLR_PREFIX):]
                target = dlrs.setdefault(group, Series(f"d·lr {group}"))
            else:
                target = lrs.setdefault(key, Series(f"lr {key}"))
            target.steps.append(r["step"])
            target.values.append(float(value))
    return list(lrs.values()), list(dlrs.values())


def wants_log_scale(series: list[Series]) -> bool:
    """Log when the values span orders of magnitude (groups far apart, Prodigy's d growing);
    the lowest tenth is ignored so a schedule decaying to 0 at the very end stays linear."""
    positive = sorted(v for s in series for v in s.values if v > 0)
    if not positive:
        return False
    low = positive[len(positive) // 10]
    return positive[-1] / low >= LOG_SCALE_RATIO


def _new_figure(rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    height = 4.2 if rows == 1 else 6.6
    fig = Figure(figsize=(10, height), dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins (in inches, so both heights look alike) instead of constrained layout: it
    # costs a third of the drawing time, and the training loop calls this every epoch
    fig.subplots_adjust(left=0.09, right=0.78, bottom=0.5 / height, top=1 - 0.85 / height, hspace=0.08)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, list(axes)


def _mark_epochs(ax, records: list[dict[str, Any]], label: bool) -> None:
    """A dashed line before an epoch's first step; with label, the epoch numbers on a top axis,
    centred on their spans (outside the plot, so they never cover a curve). With many epochs
    only every k-th is marked, so the lines do not hide the curves."""
    starts = epoch_starts(records)
    if not records or records[0].get("epoch") is None:
        return
    epochs = [int(records[0]["epoch"])] + [epoch for _, epoch in starts]
    every = max(1, math.ceil(len(epochs) / MAX_EPOCH_MARKS))
    edges = [records[0]["step"] - 0.5] + [step - 0.5 for step, _ in starts] + [records[-1]["step"] + 0.5]
    for i in range(every, len(epochs), every):
        ax.axvline(edges[i], color="0.55", linestyle="--", linewidth=0.8, zorder=0)
    if not label:
        return
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(0, len(epochs), every)]
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels=[str(e) for e in epochs[::every]])
    top.tick_params(length=0, labelsize=9, labelcolor="0.3")
    top.set_xlabel("epoch" if every == 1 else f"epoch (1 in {every} marked)", fontsize=10, color="0.3")


def _save_atomic(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_validation(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of each validation round in metrics.jsonl (the last one where a step has two)."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return []
    by_step: dict[int, float] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step, value = int(record["step"]), float(record["val_loss"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            continue
        if math.isfinite(value):
            by_step[step] = value
    return sorted(by_step.items())


def _plot_loss(records: list[dict[str, Any]], title: str, path: Path,
               validation: list[tuple[int, float]] | None = None) -> None:
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    span = ema_span(len(losses))
    fig, (ax,) = _new_figure()
    few = len(steps) <= 50  # markers help when there are few points (one step would be invisible)
    ax.plot(steps, losses, color="tab:blue", alpha=0.6 if few else 0.35 if len(steps) < 2000 else 0.2, linewidth=0.8,
            marker="o" if few else None, markersize=4, label="loss per step")
    ax.plot(steps, ema(losses, span), color="tab:blue", linewidth=2.0, label=f"EMA (span {span} steps)")
    tail = steps[-final_loss_steps(len(steps)):]
    final = final_loss(losses)
    ax.plot([tail[0], tail[-1]] if len(tail) > 1 else tail, [final] * min(2, len(tail)), color="tab:red",
            linewidth=2.5, marker="o" if len(tail) == 1 else None,
            label=f"final loss {final:.4f}\n({describe(len(losses))})")
    if validation:  # held-out images, fixed noise and timesteps: rounds compare like for like
        ax.plot([s for s, _ in validation], [v for _, v in validation], color="tab:orange", linewidth=2.0,
                marker="o", markersize=4, label="validation loss\n(held-out images)")
    ax.set_xlabel("step", fontsize=11)
    ax.set_ylabel("loss", fontsize=11)
    ax.set_title(f"{title}: loss", fontsize=12)
    ax.margins(x=0.01, y=0.05)
    _fit_steps(ax, records)
    _mark_epochs(ax, records, label=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    _save_atomic(fig, path)


def _plot_lines(ax, series: list[Series], ylabel: str) -> None:
    from matplotlib.ticker import FuncFormatter

    colors = ["tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive"]
    # groups often share one lr: later lines are dashed and thinner so the earlier stay visible
    styles = [("-", 2.4), ("--", 1.6), (":", 1.6), ("-.", 1.6)]
    log = wants_log_scale(series)
    for i, s in enumerate(series):
        style, width = styles[i % len(styles)]
        # a log axis cannot show 0 (a schedule's last step): leave those points out, not off the plot
        values = [v if v > 0 else math.nan for v in s.values] if log else s.values
        ax.plot(s.steps, values, color=colors[i % len(colors)], linestyle=style, linewidth=width,
                marker="o" if len(s.steps) <= 50 else None, markersize=3, label=s.label)
    if log:
        ax.set_yscale("log")
        ylabel += " (log scale)"
    else:
        # from 0, so a constant lr is a flat line mid-plot rather than a zoom into rounding noise
        top = max((v for s in series for v in s.values), default=0.0)
        ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
        # each tick carries its own exponent: matplotlib's shared "1e-4" offset text would sit
        # where the epoch numbers are
        ax.yaxis.set_major_formatter(FuncFormatter(_lr_tick))
    ax.set_ylabel(ylabel, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)


def _lr_tick(value: float, _pos: int) -> str:
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fit_steps(ax, records: list[dict[str, Any]]) -> None:
    """A run of one or two steps still gets a sensible, whole-numbered step axis."""
    first, last = records[0]["step"], records[-1]["step"]
    if last - first < 2:
        ax.set_xlim(first - 1, last + 1)


def _plot_lr(records: list[dict[str, Any]], title: str, path: Path) -> bool:
    lrs, dlrs = lr_series(records)
    if not lrs and not dlrs:
        return False
    fig, axes = _new_figure(rows=2 if dlrs and lrs else 1)
    if dlrs:
        # DAdaptation/Prodigy: the step really taken is d·lr; the scheduled lr is only its multiplier
        _plot_lines(axes[0], dlrs, "effective lr (d·lr)")
        axes[0].set_title(f"{title}: learning rate (d·lr = adapted d × scheduled lr)", fontsize=12)
        if lrs:
            _plot_lines(axes[1], lrs, "scheduled lr")
    else:
        _plot_lines(axes[0], lrs, "learning rate")
        axes[0].set_title(f"{title}: learning rate per parameter group", fontsize=12)
    for i, ax in enumerate(axes):
        ax.margins(x=0.01)
        _fit_steps(ax, records)
        _mark_epochs(ax, records, label=i == 0)
    axes[-1].set_xlabel("step", fontsize=11)
    _save_atomic(fig, path)
    return True


def write_curves(run_dir: Path) -> list[Path]:
    """Write RUN/loss.png and RUN/lr.png from RUN/metrics.jsonl; returns the files written
    (none when there is no metric yet)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        return []
    written = []
    _plot_loss(records, run_dir.name, run_dir / LOSS_PNG, read_validation(run_dir))
    written.append(run_dir / LOSS_PNG)
    if _plot_lr(records, run_dir.name, run_dir / LR_PNG):
        written.append(run_dir / LR_PNG)
    return written
