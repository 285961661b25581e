"""What a run leaves in its folder while it trains: loss lines, LoRA files, states, samples, validation, curves.

`RunOutputs` is the loop's one handle on them. Every save, sample round, validation round and state
first reads the pending losses (`report_losses`): the NaN check runs before anything is written, and the
trackers see the steps in order. Only the main process writes files; the others take part in what needs
every process (a training state) and wait where the main process samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

from loracli.config.schema import LoracliConfig
from loracli.errors import TrainingError
from loracli.family import ModelFamily
from loracli.plan import Plan
from loracli.report.curves import write_curves
from loracli.run.models import SDComponents
from loracli.run.metadata import assemble_file_metadata, modelspec_metadata, no_metadata_subset, per_save_metadata
from loracli.run.network import to_kohya_state_dict
from loracli.run.progress import TrainingProgress
from loracli.run.sampling import SampleMaker
from loracli.run.saving import atomic_save_safetensors, cast_for_save, save_failure
from loracli.run.state import TrainState, save_state
from loracli.run.step_sync import LossWatch, loss_check_interval
from loracli.run.validation import Validator, due_after_epoch, due_after_step, run_validation
from loracli.rundir import atomic_write_text
from loracli.sample_prompts import round_label
from loracli.schedule import epoch_file_name, final_file_name, kept_after_pruning, step_file_name
from loracli.trackers import log_sample_images

if TYPE_CHECKING:
    from accelerate import Accelerator

    from loracli.run.train import StatusFile


@dataclass
class RunOutputs:
    run_dir: Path
    config: LoracliConfig
    plan: Plan
    family: ModelFamily
    accelerator: Accelerator
    network: torch.nn.Module
    sd: SDComponents
    status: StatusFile
    progress: TrainingProgress
    trackers: list[str]
    base_metadata: dict[str, str]  # what every saved file carries (per_save_metadata adds the rest)
    weight_dtype: torch.dtype
    validator: Validator | None
    sampler: SampleMaker | None
    resumed_at: int  # the step this process began at (0, or a resumed state's)
    state_bytes: int  # the disk a training state needs, about
    current_state: Callable[[], TrainState] | None = None  # where the loop is: set by the loop
    losses: LossWatch = field(init=False)
    metrics: IO[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.progress.log
        self.saved = saved_so_far(self.run_dir, self.config.output.output_name)  # for pruning; non-empty on resume
        self.sample_rounds = {r["label"]: r for r in self.plan.sample_rounds}
        main = self.accelerator.is_main_process
        self.metrics = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main else None
        self.losses = LossWatch(loss_check_interval(self.accelerator.device))  # host reads every N steps

    def report_losses(self) -> None:
        """Read the pending losses (one host sync; stops on NaN/inf) and log them."""
        for r in self.losses.flush():
            self.progress.step(r.loss, next(iter(r.lrs.values()), 0.0), r.epoch)
            if self.metrics and not self.metrics.closed:
                self.metrics.write(json.dumps({"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lrs}) + "\n")
            if self.trackers:
                self.accelerator.log({"loss/current": r.loss, **{f"lr/{k}": v for k, v in r.lrs.items()}},
                                     step=r.step)

    def save(self, kind: str, number: int, step: int, epoch: int) -> None:
        """The LoRA file of an epoch, a step or the end (kind), then pruning as save_last_n_* says."""
        self.report_losses()  # the NaN check runs before every save
        if not self.accelerator.is_main_process:
            return
        out = self.config.output
        name = {"epoch": lambda: epoch_file_name(out.output_name, number),
                "step": lambda: step_file_name(out.output_name, number),
                "final": lambda: final_file_name(out.output_name)}[kind]()
        tensors = cast_for_save(to_kohya_state_dict(self.network), out.save_precision)
        meta = per_save_metadata(self.base_metadata, steps=step, epoch=epoch, finished_at=time.time())
        if out.no_metadata:
            meta = no_metadata_subset(meta)
        # modelspec.date is the time of this save, as sd-scripts stamps each file
        modelspec = modelspec_metadata(self.config, self.family, title=out.output_name,
                                       resolution=self.config.dataset.resolution_wh, timestamp=time.time())
        path = self.run_dir / name
        try:
            atomic_save_safetensors(tensors, assemble_file_metadata(meta, modelspec, tensors), path)
        except OSError as exc:  # a full disk: keep what can be resumed, then say how
            raise save_failure(exc, path, self.run_dir, self._state_after_failed_save()) from None
        self.status.write(last_save=name)
        if kind in self.saved:
            prune(self.run_dir, kind, number, self.saved[kind], self.config)

    def save_state(self, state: TrainState) -> Path:
        """A training state to resume from (every process takes part)."""
        self.report_losses()
        if self.metrics:
            self.metrics.flush()
        return save_state(self.accelerator, self.run_dir, state, self.config.output.save_last_n_states,
                          self.state_bytes)

    def _state_after_failed_save(self) -> Path | None:
        """The training state, saved when a LoRA file could not be (None when that fails too)."""
        # save_state waits for every process; the others are not here
        if self.current_state is None or self.accelerator.num_processes != 1:
            return None
        try:
            return save_state(self.accelerator, self.run_dir, self.current_state(),
                              self.config.output.save_last_n_states, self.state_bytes)
        except (OSError, TrainingError):
            return None

    def sample(self, step: int, epoch: int | None) -> None:
        """A round of sample images when the plan has one here (made by the main process; the others wait)."""
        label = round_label(step, epoch)
        # A resumed run redoes an epoch-end round at its own step (it may have been cut short).
        if label not in self.sample_rounds or step < self.resumed_at or (step == self.resumed_at and epoch is None):
            return
        self.report_losses()
        if self.sampler is not None:
            self._make_samples(label, step)
        self.accelerator.wait_for_everyone()

    def _make_samples(self, label: str, step: int) -> None:
        started, sd, cfg = time.time(), self.sd, self.config
        made = self.sampler.make_round(label, self.accelerator.device, self.accelerator.autocast,
                                       [sd.unet, *sd.text_encoders, self.network])
        title = f"{cfg.output.output_name or self.run_dir.name}: samples by round ({cfg.sample.sample_sampler})"
        grid = self.sampler.update_grid([lb for lb in self.sample_rounds if self.sample_rounds[lb]["step"] <= step],
                                        title)
        if self.trackers:
            log_sample_images(self.accelerator, made, step)
        self.status.write(last_sample=label)
        self.log(f"sample images ({label}): {len(made)} in {time.time() - started:.1f}s, grid {grid.name}")

    def validate(self, step: int, epoch: int, at_epoch_end: bool) -> None:
        """The validation loss when the plan holds images out and a round is due (run/validation.py)."""
        cfg = self.config
        if self.validator is not None and (due_after_epoch(cfg, epoch) if at_epoch_end else due_after_step(cfg, step)):
            self.report_losses()  # the trackers (wandb) must see the steps in order
        run_validation(self.validator, cfg, step, epoch, at_epoch_end, self.network, self.accelerator.autocast,
                       self.weight_dtype, self.metrics, self.accelerator, self.trackers, self.log)

    def draw_curves(self) -> None:
        """loss.png and lr.png from metrics.jsonl; a plotting failure never stops training."""
        if not self.accelerator.is_main_process:
            return
        if self.metrics and not self.metrics.closed:
            self.metrics.flush()
        try:
            write_curves(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a plot must never end a run
            self.log(f"warning: could not draw the curves: {exc}")

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()


def saved_so_far(run_dir: Path, output_name: str | None) -> dict[str, list[int]]:
    """Epoch and step files already in the run folder (a resumed run prunes them too)."""
    saved: dict[str, list[int]] = {"epoch": [], "step": []}
    stem = output_name or ""
    for path in run_dir.glob("*.safetensors"):
        name = path.stem
        for kind, marker in (("step", f"{stem or 'at'}-step"), ("epoch", f"{stem or 'epoch'}-")):
            rest = name[len(marker):] if name.startswith(marker) else ""
            if rest.isdigit():
                saved[kind].append(int(rest))
                break
    return {k: sorted(v) for k, v in saved.items()}


def forget_after(run_dir: Path, step: int) -> None:
    """A killed run may have logged steps after its last state: drop them, they will be redone."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines))


def prune(run_dir: Path, kind: str, number: int, history: list[int], config: LoracliConfig) -> None:
    """save_last_n_epochs / save_last_n_steps: delete what sd-scripts would have deleted by now."""
    out = config.output
    history.append(number)
    every = out.save_every_n_epochs if kind == "epoch" else out.save_every_n_steps
    keep_last = out.save_last_n_epochs if kind == "epoch" else out.save_last_n_steps
    if not every or not keep_last:
        return
    kept = set(kept_after_pruning(list(history), every, keep_last, kind))
    namer = epoch_file_name if kind == "epoch" else step_file_name
    for old in [n for n in history if n not in kept]:
        (run_dir / namer(out.output_name, old)).unlink(missing_ok=True)
        history.remove(old)
