"""`loracli report RUN`: how a run went, from the files in its folder.

status.json (state, steps, times), plan.json (epochs), metrics.jsonl (losses) and the
saved LoRA files (sizes, and the step/epoch their own metadata records). Works on a
finished, failed, interrupted or still-running run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.final_loss import describe, final_loss, final_loss_steps
from loracli.report.curves import read_metrics, read_validation, write_curves

RUN_MARKERS = ("status.json", "plan.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DatasetError(Problem(str(path), "is damaged (not valid JSON)",
                                   "was the run folder edited by hand, or the disk full?")) from None
    except OSError as exc:
        raise DatasetError(Problem(str(path), f"cannot be read ({exc.strerror or exc})", "check the path")) from None
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | int | None:
    """A field that should be a number, or None (a hand-edited status.json must not crash the report)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if number and math.isfinite(value) and abs(value) < 1e15 else None


def check_run_dir(run_dir: Path) -> Path:
    """The folder, if it is a run folder; ConfigError (exit 2) naming what is wrong otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(Problem(str(run_dir), "no such folder", "give a run folder made by `loracli train`"))
    if not run_dir.is_dir():
        hint = ("use `loracli inspect` for a LoRA file" if run_dir.suffix == ".safetensors"
                else "give a run folder made by `loracli train`")
        raise ConfigError(Problem(str(run_dir), "is a file, not a run folder", hint))
    if not any((run_dir / name).is_file() for name in RUN_MARKERS):
        raise ConfigError(Problem(str(run_dir), "is not a run folder (no status.json or plan.json)",
                                  "give a folder under output_dir named <output_name>-<date>-<time>"))
    return run_dir


def _saved_files(run_dir: Path) -> list[dict[str, Any]]:
    """The LoRA files (temp files of an unfinished save are hidden dot-files and left out)."""
    from loracli.safetensors_header import read_header

    files = []
    for path in sorted(run_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
        entry: dict[str, Any] = {"name": path.name, "size": path.stat().st_size, "steps": None, "epoch": None}
        try:
            meta = read_header(path).metadata
            entry["steps"] = int(meta["ss_steps"]) if meta.get("ss_steps", "").isdigit() else None
            entry["epoch"] = int(meta["ss_epoch"]) if meta.get("ss_epoch", "").isdigit() else None
        except DatasetError:
            entry["error"] = "not a readable safetensors file"
        files.append(entry)
    return files


def _loss_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"final_loss": None, "final_loss_mean": None, "min_loss": None, "min_loss_step": None}
    losses = [r["loss"] for r in records]
    best = min(records, key=lambda r: r["loss"])
    final = final_loss(losses)  # the one definition: the bar, the run's summary and loss.png show it too
    return {"final_loss": final, "final_loss_mean": final, "final_loss_mean_of": final_loss_steps(len(losses)),
            "last_step_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
            "min_loss": best["loss"], "min_loss_step": best["step"]}


def _validation_stats(rounds: list[tuple[int, float]]) -> dict[str, Any]:
    """The last validation loss and the lowest (with its step): where the held-out images did best."""
    if not rounds:
        return {"val_loss": None, "val_loss_step": None, "min_val_loss": None, "min_val_loss_step": None}
    best = min(rounds, key=lambda r: r[1])
    return {"val_loss": rounds[-1][1], "val_loss_step": rounds[-1][0], "min_val_loss": best[1],
            "min_val_loss_step": best[0]}


def summarize_run(run_dir: Path, curves: bool = True) -> dict[str, Any]:
    """Everything `loracli report` shows (JSON-ready); with curves, loss.png/lr.png are redrawn first."""
    run_dir = check_run_dir(run_dir)
    status = _read_json(run_dir / "status.json")
    plan = _read_json(run_dir / "plan.json")
    records = read_metrics(run_dir)
    written = write_curves(run_dir) if curves else []
    started = _number(status.get("started_at"))
    updated = _number(status.get("finished_at")) or _number(status.get("updated_at"))
    step = _number(status.get("step")) or (records[-1]["step"] if records else 0)
    wall = updated - started if isinstance(started, (int, float)) and isinstance(updated, (int, float)) else None
    return {
        "run": str(run_dir),
        "state": str(status.get("state", "unknown")),
        "error": None if status.get("error") is None else str(status.get("error")),
        "steps": step,
        "total_steps": status.get("total_steps") or plan.get("total_steps"),
        "epoch": status.get("epoch") or (records[-1].get("epoch") if records else None),
        "epochs": plan.get("epochs"),
        "started_at": started,
        "wall_seconds": wall,
        # a resumed run's status covers its last process only: count the steps that process made
        "it_per_s": (step - (_number(status.get("start_step")) or 0)) / wall if wall and step else None,
        **_loss_stats(records),
        **_validation_stats(read_validation(run_dir)),
        "logged_steps": len(records),
        "files": _saved_files(run_dir),
        "curves": [str(p) for p in written],
    }


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _size(size: int) -> str:
    return f"{size / 1024 ** 2:.1f} MiB" if size >= 1024 ** 2 else f"{size / 1024:.1f} KiB"


def render_summary(s: dict[str, Any]) -> str:
    lines = [f"{'run':<12}{s['run']}"]
    state = s["state"] + (f": {s['error']}" if s.get("error") else "")
    lines.append(f"{'state':<12}{state}")
    total = f"/{s['total_steps']}" if s["total_steps"] else ""
    epochs = f", epoch {s['epoch']}" + (f"/{s['epochs']}" if s["epochs"] else "") if s["epoch"] else ""
    lines.append(f"{'steps':<12}{s['steps']}{total}{epochs}")
    if s["wall_seconds"] is not None:
        try:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["started_at"]))
        except (OverflowError, OSError, ValueError):  # a start time no clock can show
            started = "?"
        speed = f", {s['it_per_s']:.2f} it/s" if s["it_per_s"] else ""
        lines.append(f"{'time':<12}{_duration(s['wall_seconds'])} from {started}{speed}")
    if s["final_loss"] is not None:
        lines.append(f"{'final loss':<12}{s['final_loss']:.4f} ({describe(s['final_loss_mean_of'])}; last step "
                     f"{s['last_step_loss']:.4f}, mean of the run {s['mean_loss']:.4f})")
        lines.append(f"{'min loss':<12}{s['min_loss']:.4f} at step {s['min_loss_step']}")
    else:
        lines.append(f"{'loss':<12}no step logged yet (metrics.jsonl is empty)")
    if s.get("val_loss") is not None:
        lines.append(f"{'val loss':<12}{s['val_loss']:.4f} at step {s['val_loss_step']} (lowest "
                     f"{s['min_val_loss']:.4f} at step {s['min_val_loss_step']}; held-out images)")
    if not s["files"]:
        lines.append(f"{'files':<12}no LoRA file saved yet")
    for f in s["files"]:
        at = f" (step {f['steps']}, epoch {f['epoch']})" if f.get("steps") is not None else ""
        at = f" ({f['error']})" if f.get("error") else at
        lines.append(f"{'file':<12}{f['name']}  {_size(f['size'])}{at}")
    for path in s["curves"]:
        lines.append(f"{'curve':<12}{path}")
    return "\n".join(lines)
