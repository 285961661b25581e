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
from loracli.config.schema import DatasetSection, LoracliConfig
from loracli.dataset.masks import plan_pixels
from loracli.dataset.scan import DatasetScan, scan_dataset, scan_dataset_config
from loracli.dataset.subsets import DatasetSpec, dataset_specs, differing_options
from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import ModelFamily
from loracli.lint import Finding, lint_config, lint_data, lint_network_weights, pickle_checkpoint_finding
from loracli import preflight
from loracli.model_probe import probe_model, resolve_family
from loracli.network_layout import network_module_counts
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
    subset: str  # the <repeats>_<name> folder (or the subset's image_dir name)
    caption_lines: tuple[str, ...] = ()  # a multi-line caption file's lines (enable_wildcard picks one per use)
    dataset: int = 0  # index into [[datasets]] (0 in the folder form)
    subset_index: int | None = None  # index into that dataset's subsets; None in the folder form
    mask: str = ""  # the loss-mask image from conditioning_data_dir ("" when none)


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
    # [[datasets]]: per dataset its batch size, resolution, bucket options, counts, buckets and subsets
    # (PlannedDatasets.summaries); empty in the folder form
    datasets: list[dict[str, Any]] = field(default_factory=list)
    # LoRA modules per part (each text encoder, each UNet block as sd-scripts numbers them): {"part", "modules",
    # "ranks"} rows from the model's configs (loracli.network_layout); empty when they cannot be read
    network_modules: list[dict[str, Any]] = field(default_factory=list)

    def images_per_step(self) -> float:
        """Images trained per optimizer step, all processes together, averaged over an epoch: an epoch trains
        every bucket entry (repeats and reg images included) once, whatever batch size each dataset has."""
        return sum(b["count"] for b in self.buckets) / self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        fields = dict(data)
        for key in ("images", "validation_images"):
            fields[key] = [
                PlannedImage(**{**i, **{k: tuple(i[k]) for k in ("size", "bucket", "resized", "crop_offset",
                                                                  "caption_lines") if k in i}})
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


def _assigner(ds: DatasetSection, notes: list[str]):
    """The function that puts one image size into its bucket, per the dataset options."""
    resolution = ds.resolution_wh
    if not ds.enable_bucket:  # sd-scripts resizes only when it caches latents (buckets.assign_fixed)
        resize = ds.cache_latents or ds.cache_latents_to_disk
        return lambda size: assign_fixed(size, resolution, resize)
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
                caption_lines=image.caption_lines, dataset=subset.dataset, subset_index=subset.index,
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
    notes: list[str] = []
    if config.datasets:
        sets = plan_datasets(resolved, holdout, notes)
        scan, planned, held_out, ar_errors = sets.scan, sets.images, sets.held_out, sets.ar_errors
        # the VRAM estimate; train_batch_size = "auto" becomes a number here (resolved.config is updated)
        config, memory = plan_memory(resolved, probe.path, probe.kind, family, sets.bucket_sizes,
                                     sets.largest_bucket, sets.peaks)
        dataset_summaries, buckets = sets.summaries(config)
    else:
        scan = scan_dataset(ds.train_data_dir, ds.reg_data_dir, ds.caption_extension, holdout=holdout)
        assign = _assigner(ds, notes)
        planned, ar_errors = _assign_all(scan, assign)
        held_out, _ = _assign_all(replace(scan, subsets=tuple(holdout.held_out_subsets())), assign)
        counts: Counter[tuple[int, int]] = Counter()
        for image in planned:
            counts[image.bucket] += image.repeats
        # the VRAM estimate; train_batch_size = "auto" becomes a number here (resolved.config is updated)
        config, memory = plan_memory(resolved, probe.path, probe.kind, family, list(counts),
                                     max(counts.values(), default=1))
        batches = count_batches(dict(counts), config.training.train_batch_size)
        buckets = [
            {"resolution": list(b), "count": counts[b], "batches": batches[b]} for b in sorted(counts)
        ]
        dataset_summaries = []
    ds, tr = config.dataset, config.training
    planned, held_out, pixel_findings = plan_pixels(config, planned, held_out)  # unbucketed sizes, loss masks
    try:
        schedule = compute_schedule(sum(b["batches"] for b in buckets), tr.num_processes,
                                    tr.gradient_accumulation_steps, tr.max_train_epochs, tr.max_train_steps)
    except ValueError as exc:
        raise ConfigError(Problem("training.max_train_epochs", str(exc))) from None
    findings += lint_data(config, scan, schedule, buckets, family)
    findings += pixel_findings
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
        datasets=dataset_summaries,
        network_modules=network_module_counts(config.network, family, probe.path, probe.kind),
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


@dataclass
class PlannedDatasets:
    """The [[datasets]] planned one by one (sd-scripts' DatasetGroup): each its own buckets and batch size."""

    specs: list[DatasetSpec]
    scans: list[DatasetScan]
    per_dataset: list[list[PlannedImage]]
    ar_per_dataset: list[list[float]]
    held_out: list[PlannedImage]

    @property
    def images(self) -> list[PlannedImage]:
        return [image for images in self.per_dataset for image in images]

    @property
    def ar_errors(self) -> list[float]:
        return [e for errors in self.ar_per_dataset for e in errors]

    @property
    def scan(self) -> DatasetScan:
        """All datasets as one scan (the lint rules and the plan's totals read it)."""
        scans = self.scans
        tags: dict[str, dict[str, int]] = {}
        for one in scans:  # sd-scripts counts a folder that several datasets use once
            for name, freq in one.tag_frequency.items():
                tags.setdefault(name, freq)
        return DatasetScan(
            subsets=tuple(s for one in scans for s in one.subsets),
            skipped=tuple(s for one in scans for s in one.skipped),
            notes=tuple(dict.fromkeys(n for one in scans for n in one.notes)),
            warnings=tuple(w for one in scans for w in one.warnings),
            num_train_images=sum(one.num_train_images for one in scans),
            num_reg_images=sum(one.num_reg_images for one in scans), tag_frequency=tags)

    def counts(self, d_index: int) -> Counter[tuple[int, int]]:
        counts: Counter[tuple[int, int]] = Counter()
        for image in self.per_dataset[d_index]:
            counts[image.bucket] += image.repeats
        return counts

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        return sorted({b for i in range(len(self.specs)) for b in self.counts(i)})

    @property
    def largest_bucket(self) -> int:
        return max((n for i in range(len(self.specs)) for n in self.counts(i).values()), default=1)

    @property
    def peaks(self) -> list[tuple[list[tuple[int, int]], int | None]]:
        """Each dataset's buckets and own batch_size (None: training.train_batch_size), for the VRAM estimate."""
        return [(list(self.counts(s.index)), s.own_batch_size) for s in self.specs]

    def summaries(self, config: LoracliConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """plan.datasets, and plan.buckets: every dataset's buckets in dataset order, each naming its dataset."""
        summaries, all_buckets = [], []
        for spec, scan, ar in zip(self.specs, self.scans, self.ar_per_dataset):
            batch = spec.own_batch_size or config.training.train_batch_size
            counts = self.counts(spec.index)
            batches = count_batches(dict(counts), batch)
            buckets = [{"resolution": list(b), "count": counts[b], "batches": batches[b]} for b in sorted(counts)]
            all_buckets += [{**b, "dataset": spec.index} for b in buckets]
            opts = spec.options
            lo = hi = None
            if opts.enable_bucket:
                lo, hi, _ = adjust_bucket_limits(opts.min_bucket_reso, opts.max_bucket_reso, opts.bucket_reso_steps)
            subsets = [{
                "key": sub.key, "image_dir": str(sub.image_dir), "num_repeats": sub.num_repeats,
                "is_reg": sub.is_reg, "class_tokens": sub.class_tokens,
                "img_count": scan.img_counts.get(sub.index, 0),  # 0: sd-scripts ignores the subset (no images)
                "options": differing_options(sub.options, config.dataset),
            } for sub in spec.subsets]
            summaries.append({
                "key": spec.key, "batch_size": batch, "resolution": list(opts.resolution_wh),
                "enable_bucket": opts.enable_bucket, "bucket_no_upscale": opts.enable_bucket and opts.bucket_no_upscale,
                "min_bucket_reso": lo, "max_bucket_reso": hi, "bucket_reso_steps": opts.bucket_reso_steps,
                "num_train_images": scan.num_train_images, "num_reg_images": scan.num_reg_images,
                "batches": sum(batches.values()), "buckets": buckets, "mean_ar_error": mean_ar_error(ar),
                "tag_frequency": scan.tag_frequency, "subsets": subsets,
            })
        return summaries, all_buckets


def plan_datasets(resolved: ResolvedConfig, holdout: Holdout, notes: list[str]) -> PlannedDatasets:
    """Scan and bucket each [[datasets]] entry with its own resolution and bucket options."""
    specs = dataset_specs(resolved.config)
    scans = scan_dataset_config([spec.subsets for spec in specs], holdout)
    held = holdout.held_out_subsets()
    per_dataset, ar_per_dataset, held_out = [], [], []
    for spec, scan in zip(specs, scans):
        dataset_notes: list[str] = []
        assign = _assigner(spec.options, dataset_notes)
        notes.extend(f"{spec.key}: {n}" for n in dataset_notes)
        images, ar = _assign_all(scan, assign)
        per_dataset.append(images)
        ar_per_dataset.append(ar)
        mine = tuple(s for s in held if s.dataset == spec.index)
        held_out += _assign_all(replace(scan, subsets=mine), assign)[0]
    return PlannedDatasets(specs, scans, per_dataset, ar_per_dataset, held_out)
