"""The plan: what a run will do, computed before any model loads.

`build_plan` goes config → lint → dataset scan → buckets → schedule → lint,
and returns a frozen, JSON-serialisable `Plan`. The run side consumes this
object (as `plan.json` in the run folder) and never recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loracli import __version__
from loracli.buckets import (
    BucketAssignment,
    BucketSelector,
    adjust_bucket_limits,
    assign_fixed,
    assign_no_upscale,
    count_batches,
    make_bucket_resolutions,
    mean_ar_error,
)
from loracli.config.loader import ResolvedConfig
from loracli.config.schema import LoracliConfig
from loracli.dataset.scan import DatasetScan, scan_dataset
from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import ModelFamily
from loracli.lint import Finding, lint_config, lint_data, lint_network_weights, pickle_checkpoint_finding
from loracli import preflight
from loracli.model_probe import probe_model, resolve_family
from loracli.sample_prompts import round_label
from loracli.vram import plan_memory
from loracli.validation_split import Holdout, split_seed, validation_findings, validation_timesteps
from loracli.scheduler_check import schedule_findings
from loracli.schedule import (
    Schedule,
    compute_schedule,
    epoch_file_name,
    epoch_save_points,
    final_file_name,
    kept_after_pruning,
    resolve_warmup_steps,
    sample_points,
    step_file_name,
    step_save_points,
)

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlannedImage:
    path: str
    size: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_offset: tuple[int, int]
    repeats: int
    is_reg: bool
    caption: str
    caption_source: str
    subset: str  # the <repeats>_<name> folder


@dataclass(frozen=True)
class Plan:
    plan_version: int
    loracli_version: str
    config_hash: str
    model_family: str
    total_steps: int
    epochs: int
    steps_per_epoch: int
    batches_per_epoch: int
    batches_per_process: int
    num_processes: int
    gradient_accumulation_steps: int
    train_batch_size: int
    formula: str
    num_train_images: int
    num_reg_images: int
    warmup_steps: int
    buckets: list[dict[str, Any]]
    mean_ar_error: float | None
    images: list[PlannedImage]
    skipped: list[dict[str, str]]
    dataset_dirs: dict[str, dict[str, int]]
    reg_dataset_dirs: dict[str, dict[str, int]]
    tag_frequency: dict[str, dict[str, int]]
    save_epochs: list[int]
    save_steps: list[int]
    expected_files: list[str]
    warnings: list[dict[str, str]]
    errors: list[dict[str, str]]
    notes: list[str]
    # When sample images are made: {"step", "epoch" (None for a step round), "label"} in order.
    sample_rounds: list[dict[str, Any]] = field(default_factory=list)
    # The base model the run loads (a local folder or file, or tiny:NAME): a model id is resolved
    # from the Hugging Face cache here, so the run never looks it up again.
    model_path: str = ""
    model_kind: str = ""  # tiny | diffusers | single-file | pickle
    model_detection: str = ""  # how model_family was chosen, e.g. "detected from model_index.json (...)"
    model_source: str = ""  # where a model id was found (the Hugging Face cache), else ""
    vram: dict[str, Any] = field(default_factory=dict)  # loracli.vram's estimate (empty when none)
    # dataset.validation_split: the held-out images (bucketed like the others, never trained on), the
    # split's seed and the fixed timesteps each is evaluated at
    validation_images: list[PlannedImage] = field(default_factory=list)
    validation_seed: int | None = None
    validation_timesteps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        fields = dict(data)
        for key in ("images", "validation_images"):
            fields[key] = [
                PlannedImage(**{**i, **{k: tuple(i[k]) for k in ("size", "bucket", "resized", "crop_offset")}})
                for i in data.get(key, [])
            ]
        return cls(**fields)


def config_hash(config: LoracliConfig) -> str:
    """Stable hash of the resolved config (recorded in the run folder and metadata)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _raise_errors(findings: list[Finding]) -> None:
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ConfigError([Problem(f.key, f"[{f.code}] {f.message}", f.hint) for f in errors])


def _assigner(config: LoracliConfig, notes: list[str]):
    """The function that puts one image size into its bucket, per the dataset options."""
    ds = config.dataset
    resolution = ds.resolution_wh
    if not ds.enable_bucket:
        return lambda size: assign_fixed(size, resolution)
    if ds.bucket_no_upscale:
        notes.append("bucket_no_upscale: min/max_bucket_reso are not used (as in sd-scripts)")
        return lambda size: assign_no_upscale(size, resolution, ds.bucket_reso_steps)
    lo, hi, adjust_notes = adjust_bucket_limits(ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
    notes.extend(adjust_notes)
    selector = BucketSelector(make_bucket_resolutions(resolution, lo, hi, ds.bucket_reso_steps))
    return selector.assign


def _assign_all(scan: DatasetScan, assign) -> tuple[list[PlannedImage], list[float]]:
    planned: list[PlannedImage] = []
    ar_errors: list[float] = []
    problems: list[Problem] = []
    cache: dict[tuple[int, int], BucketAssignment] = {}  # many images share a size
    for subset in scan.subsets:
        for image in subset.images:
            try:
                a = cache.get(image.size) or cache.setdefault(image.size, assign(image.size))
            except ValueError as exc:
                problems.append(Problem(str(image.path), str(exc), "remove or enlarge the image"))
                continue
            ar_errors.append(a.ar_error)  # sd-scripts averages over reg images too
            planned.append(PlannedImage(
                path=str(image.path), size=image.size, bucket=a.bucket, resized=a.resized,
                crop_offset=a.crop_offset, repeats=image.repeats, is_reg=subset.is_reg,
                caption=image.caption, caption_source=image.caption_source, subset=subset.path.name,
            ))
    if problems:
        raise DatasetError(problems)
    return planned, ar_errors


def _expected_files(config: LoracliConfig, schedule: Schedule) -> tuple[list[int], list[int], list[str]]:
    out = config.output
    epochs = epoch_save_points(out.save_every_n_epochs, schedule.epochs)
    steps = step_save_points(out.save_every_n_steps, schedule.total_steps)
    if out.save_every_n_epochs:
        epochs = kept_after_pruning(epochs, out.save_every_n_epochs, out.save_last_n_epochs, "epoch")
    if out.save_every_n_steps:
        steps = kept_after_pruning(steps, out.save_every_n_steps, out.save_last_n_steps, "step")
    files = [epoch_file_name(out.output_name, e) for e in epochs]
    files += [step_file_name(out.output_name, s) for s in steps]
    files.append(final_file_name(out.output_name))
    return epochs, steps, files


def _dirs(scan: DatasetScan, reg: bool) -> dict[str, dict[str, int]]:
    return {
        s.path.name: {"n_repeats": s.repeats, "img_count": len(s.images)}
        for s in scan.subsets if s.is_reg == reg
    }


def build_plan(resolved: ResolvedConfig) -> Plan:
    config = resolved.config
    _raise_errors([f for f in [pickle_checkpoint_finding(config)] if f])
    probe = probe_model(config.model.pretrained_model_name_or_path)
    choice = resolve_family(config.model, probe)
    family: ModelFamily = choice.family
    findings = lint_config(config, family, resolved.origins)
    _raise_errors(findings)
    preflight.check_config(config, probe.path, probe.kind)  # optimizer, clip_skip, output folder

    ds, tr = config.dataset, config.training
    prompts = config.sample.sample_prompts
    if prompts is not None and not prompts.is_file():
        raise DatasetError(Problem(f"sample.sample_prompts: {prompts}", "prompt file not found", "check the path"))
    weights = config.network.network_weights
    if weights is not None and not weights.is_file():
        raise DatasetError(Problem(f"network.network_weights: {weights}", "LoRA file not found", "check the path"))
    if weights is not None:
        _raise_errors(lint_network_weights(config, family))
    holdout = Holdout(ds.validation_split, split_seed(config))
    scan = scan_dataset(ds.train_data_dir, ds.reg_data_dir, ds.caption_extension, holdout=holdout)

    notes: list[str] = []
    assign = _assigner(config, notes)
    planned, ar_errors = _assign_all(scan, assign)
    held_out, _ = _assign_all(replace(scan, subsets=tuple(holdout.held_out_subsets())), assign)
    counts: Counter[tuple[int, int]] = Counter()
    for image in planned:
        counts[image.bucket] += image.repeats
    # the VRAM estimate; train_batch_size = "auto" becomes a number here (resolved.config is updated)
    config, memory = plan_memory(resolved, probe.path, probe.kind, family, list(counts),
                                 max(counts.values(), default=1))
    ds, tr = config.dataset, config.training
    batches = count_batches(dict(counts), tr.train_batch_size)
    buckets = [
        {"resolution": list(b), "count": counts[b], "batches": batches[b]} for b in sorted(counts)
    ]
    try:
        schedule = compute_schedule(sum(batches.values()), tr.num_processes, tr.gradient_accumulation_steps,
                                    tr.max_train_epochs, tr.max_train_steps)
    except ValueError as exc:
        raise ConfigError(Problem("training.max_train_epochs", str(exc))) from None
    findings += lint_data(config, scan, schedule, buckets)
    findings += validation_findings(config, holdout)
    findings += memory.findings
    findings += schedule_findings(config, probe.path, probe.kind)
    _raise_errors(findings)

    warmup = resolve_warmup_steps(config.optimizer.lr_warmup_steps, schedule.total_steps, tr.num_processes)
    preflight.check_plan_size(config, schedule.total_steps, schedule.epochs)  # before anything is listed
    save_epochs, save_steps, files = _expected_files(config, schedule)
    preflight.check_free_space(config, family, probe.path, len(files))
    return Plan(
        plan_version=PLAN_VERSION,
        loracli_version=__version__,
        config_hash=config_hash(config),
        model_family=family.name,
        total_steps=schedule.total_steps,
        epochs=schedule.epochs,
        steps_per_epoch=schedule.steps_per_epoch,
        batches_per_epoch=schedule.batches_per_epoch,
        batches_per_process=schedule.batches_per_process,
        num_processes=tr.num_processes,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        train_batch_size=tr.train_batch_size,
        formula=schedule.formula,
        num_train_images=scan.num_train_images,
        num_reg_images=scan.num_reg_images,
        warmup_steps=warmup,
        buckets=buckets,
        mean_ar_error=mean_ar_error(ar_errors),
        images=planned,
        skipped=[{"path": str(s.path), "reason": s.reason} for s in scan.skipped],
        dataset_dirs=_dirs(scan, reg=False),
        reg_dataset_dirs=_dirs(scan, reg=True),
        tag_frequency=scan.tag_frequency,
        save_epochs=save_epochs,
        save_steps=save_steps,
        expected_files=files,
        warnings=[f.to_dict() for f in findings if f.level == "warning"],
        errors=[],
        notes=notes,
        sample_rounds=_sample_rounds(config, schedule),
        model_path=probe.path,
        model_kind=probe.kind,
        model_detection=choice.how,
        model_source=probe.source,
        vram=memory.summary,
        validation_images=held_out,
        validation_seed=holdout.seed if held_out else None,
        validation_timesteps=validation_timesteps(tr.min_timestep, tr.max_timestep) if held_out else [],
    )


def _sample_rounds(config: LoracliConfig, schedule: Schedule) -> list[dict[str, Any]]:
    smp = config.sample
    if smp.sample_prompts is None:
        return []
    points = sample_points(smp.sample_every_n_steps, smp.sample_every_n_epochs, schedule.total_steps,
                           schedule.steps_per_epoch, schedule.epochs, smp.sample_at_first)
    rounds: list[dict[str, Any]] = []
    if points["at_first"]:
        rounds.append({"step": 0, "epoch": 0, "label": round_label(0, 0)})
    rounds += [{"step": s, "epoch": None, "label": round_label(s, None)} for s in points["steps"]]
    rounds += [{"step": s, "epoch": e, "label": round_label(s, e)}
               for e, s in zip(points["epochs"], points["epoch_end_steps"])]
    return sorted(rounds, key=lambda r: r["step"])


def load_plan(path: Path) -> Plan:
    return Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
