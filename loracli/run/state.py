"""Full training state for resuming: accelerate's checkpoint plus our position.

A state lives in `<run>/state/step-XXXXXXXX/`: accelerate's files (network,
optimizer, scheduler, RNG states, scaler) and `train_state.json` (step, epoch,
batches consumed in the epoch, the caption/augmentation RNG). It is written
into a temporary folder and renamed into place after a `COMPLETE` marker is
written last, so a state that exists is always whole; a half-written one is
never picked up.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from loracli.errors import Problem, TrainingError

STATE_DIR = "state"
MARKER = "COMPLETE"


@dataclass(frozen=True)
class TrainState:
    global_step: int
    epoch: int  # 1-based epoch the state was taken in
    batches_done: int  # bucket-batches of that epoch already consumed
    loader_rng: list  # random.Random.getstate() of the caption/augmentation RNG, as JSON lists


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def loader_rng_state(state: TrainState):
    return _to_tuple(state.loader_rng)


def complete_states(run_dir: Path) -> list[Path]:
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER).is_file())


def check_free_space(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise TrainingError(f"not enough disk space to save the training state in {folder}: "
                            f"{free / 2**20:.0f} MiB free, about {needed_bytes / 2**20:.0f} MiB needed; "
                            "free some space or lower output.save_last_n_states")


def save_state(accelerator, run_dir: Path, state: TrainState, keep_last: int, estimate_bytes: int) -> Path:
    """Every process calls this (accelerate saves per-process RNG); the main process finalises."""
    root = run_dir / STATE_DIR
    target = root / f"step-{state.global_step:08d}"
    tmp = root / f".{target.name}.tmp"
    main = accelerator.is_main_process
    if main:
        root.mkdir(exist_ok=True)
        check_free_space(root, 2 * estimate_bytes)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        (tmp / "train_state.json").write_text(json.dumps(asdict(state)))
        (tmp / MARKER).write_text("ok\n")  # written last: its presence means the state is whole
        _modes_as_umask(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        for old in complete_states(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _modes_as_umask(folder: Path) -> None:
    """accelerate writes the network as safetensors (0600); every state file gets the usual mode."""
    from loracli.run.saving import current_umask

    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def load_latest_state(accelerator, run_dir: Path) -> TrainState | None:
    """Restore the newest complete state (weights, optimizer, schedule, RNG); None if there is none."""
    root = run_dir / STATE_DIR
    if root.is_dir():
        for stale in root.glob(".step-*.tmp"):  # a save that was killed midway
            shutil.rmtree(stale, ignore_errors=True)
    states = complete_states(run_dir)
    if not states:
        return None
    damaged = []
    for latest in reversed(states):  # a state damaged on disk after it was completed: fall back to the one before
        position = read_train_state(latest)
        if position is not None:
            accelerator.load_state(str(latest))
            return position
        damaged.append(latest / "train_state.json")
    raise TrainingError(Problem(str(damaged[0]), "is damaged, and so is every older state's"
                                if len(damaged) > 1 else "is damaged",
                                "the run cannot be resumed; start it again"))


def read_train_state(folder: Path) -> TrainState | None:
    """The position saved in a state folder; None when its train_state.json is missing or damaged."""
    try:
        data = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        state = TrainState(**data)
    except (OSError, ValueError, TypeError, RecursionError):
        return None
    numbers = (state.global_step, state.epoch, state.batches_done)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return None
    return state if isinstance(state.loader_rng, list) else None
