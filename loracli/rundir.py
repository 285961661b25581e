"""Run folders: one per run, never reused, describing themselves.

A run folder holds the resolved config, the plan, the environment and the
command line, and later the saved LoRAs. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from loracli import __version__
from loracli.config.loader import ResolvedConfig
from loracli.config.schema import LoracliConfig
from loracli.errors import CONTEXT, ConfigError, Problem, TrainingError
from loracli.plan import Plan

TRACKED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "lycoris_lora", "safetensors",
                    "bitsandbytes", "dadaptation", "prodigyopt", "peft", "pydantic", "typer")


TEMP_MARK = ".tmp-"  # `.<name>.tmp-<pid>`: what atomic_write_text leaves if killed mid-write
LOCK_FILE = ".lock"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temp file behind
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def settle_seed(resolved: ResolvedConfig) -> None:
    """sd-scripts draws a random seed when none is given; draw it here so the run folder records it
    and the run can be repeated."""
    if resolved.config.training.seed is None:
        training = resolved.config.training.model_copy(update={"seed": random.randint(0, 2**32 - 1)})
        resolved.config = resolved.config.model_copy(update={"training": training})
        resolved.origins["training.seed"] = "drawn at random"


def create_run_dir(config: LoracliConfig) -> Path:
    """<output_dir>/<name>-<YYYYmmdd-HHMMSS>[-N]; mkdir without exist_ok, so two jobs never share one."""
    base = config.output.output_dir
    try:
        base.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(Problem(f"output.output_dir: {base}", "is a file, not a folder",
                                  "choose a folder for the run folders")) from None
    stem = f"{config.output.output_name or 'lora'}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        candidate = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        CONTEXT.run_dir = candidate  # a crash from here on is reported into the run folder
        return candidate
    raise ConfigError(Problem(f"output.output_dir: {base}", "999 run folders of this name were made this second",
                              "try again in a second"))


class RunLocked(TrainingError):
    """Another process trains in this run folder."""


class RunLock:
    """An exclusive lock on a run folder for as long as it trains: a second `train --resume` of the same
    run (two writers in one folder) is refused, naming the pid that holds it. The lock is an OS file
    lock, so it is released when the process dies, however it dies; the pid in the file is only for
    the message."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except OSError:
            os.close(fd)
            holder = self.holder()
            raise RunLocked(Problem(str(self.path.parent), f"is being trained by another process (pid {holder})"
                                    if holder else "is being trained by another process",
                                    "wait for it to finish, or stop it (Ctrl-C saves its state) and resume "
                                    "then")) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def holder(self) -> int | None:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    """A non-blocking exclusive lock; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def repair_metrics_log(run_dir: Path) -> int:
    """Drop lines of metrics.jsonl that are not whole records (a run killed mid-write tears the last
    line), so a resumed run reads and appends to a clean log. Returns how many lines were dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            whole = isinstance(record, dict) and isinstance(record.get("step"), int)
        except (ValueError, RecursionError):
            whole = False
        if whole:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove what writes killed midway left in a run folder and its samples (`.<name>.tmp-<pid>`, `.<name>….tmp`).
    Call it only under the run lock, when nothing else writes there."""
    removed = []
    for folder in (run_dir, run_dir / "samples"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name
            stale = name.startswith(".") and (TEMP_MARK in name or name.endswith(".tmp"))  # also grids, LoRAs
            if stale and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def environment() -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "loracli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def write_run_files(run_dir: Path, resolved: ResolvedConfig, plan: Plan, argv: list[str]) -> None:
    from loracli.cli.config_cmd import resolved_toml

    atomic_write_text(run_dir / "config.resolved.toml", resolved_toml(resolved))
    atomic_write_text(run_dir / "plan.json", plan.to_json() + "\n")
    atomic_write_json(run_dir / "run.json", {
        "command": argv,
        "cwd": str(Path.cwd()),
        "seed": resolved.config.training.seed,
        "config_file": str(resolved.config_path) if resolved.config_path else None,
        "presets": [p.name for p in resolved.presets],
        "origins": resolved.origins,
        "environment": environment(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    atomic_write_json(run_dir / "status.json", {
        "state": "planned", "step": 0, "epoch": 0, "total_steps": plan.total_steps, "last_save": None,
        "error": None, "started_at": None, "updated_at": time.time(),
    })
