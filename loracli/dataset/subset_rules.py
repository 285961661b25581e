"""Plan-time rules for [[datasets]] / [[datasets.subsets]] (codes E40-E49, W40-W49).

Called from loracli.lint with the config rules. The [dataset] rules (E5, E8, ...) check [dataset]'s own
values; these check what a dataset or a subset sets for itself, naming that dataset or subset.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loracli.config.schema import LoracliConfig
from loracli.dataset.subsets import DatasetSpec, SubsetSpec, dataset_specs

if TYPE_CHECKING:
    from loracli.family import ModelFamily
    from loracli.lint import Finding

SD_CONFIG = "sd-scripts library/config_util.py"
SD_TRAIN = "sd-scripts train_network.py"
SD_BUCKETS = "sd-scripts library/train_util.py (buckets)"
# the caption options that change a caption from one step to the next (cached text outputs cannot follow them)
CHANGING_CAPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                     "caption_tag_dropout_rate", "token_warmup_step")


def origin(config: LoracliConfig, spec: SubsetSpec | DatasetSpec, key: str) -> str:
    """The table a subset's or dataset's value comes from: the subset, its dataset, or [dataset]."""
    if isinstance(spec, SubsetSpec):
        entry = config.datasets[spec.dataset]
        if getattr(entry.subsets[spec.index], key, None) is not None:
            return f"{spec.key}.{key}"
        spec_key, index = f"datasets[{spec.dataset}]", spec.dataset
    else:
        spec_key, index = spec.key, spec.index
    return f"{spec_key}.{key}" if getattr(config.datasets[index], key, None) is not None else f"dataset.{key}"


def subset_config_findings(config: LoracliConfig, family: ModelFamily) -> list[Finding]:
    from loracli.lint import Finding

    out: list[Finding] = []
    if not config.datasets:
        return out
    ds, tr = config.dataset, config.training
    # E40: the two ways of naming the data exclude each other (sd-scripts ignores train_data_dir then).
    for key in ("train_data_dir", "reg_data_dir"):
        if getattr(ds, key) is not None:
            out.append(Finding("error", "E40", f"dataset.{key}",
                               f"cannot be combined with [[datasets]] (sd-scripts ignores it when a dataset "
                               "config is given)", f"remove dataset.{key}, or the [[datasets]] tables", SD_TRAIN))
    specs = dataset_specs(config)
    for spec in specs:
        seen: dict[str, str] = {}
        for sub in spec.subsets:
            # E42: one folder twice in a dataset (sd-scripts silently keeps the first).
            folder = os.path.normcase(os.path.normpath(str(sub.image_dir)))
            if folder in seen:
                out.append(Finding("error", "E42", f"{sub.key}.image_dir",
                                   f"{sub.image_dir} is already {seen[folder]}.image_dir (sd-scripts ignores the "
                                   "second one)", "list each folder once per dataset; use num_repeats for weight, "
                                   "or a second [[datasets]] for another resolution", SD_TRAIN))
            seen.setdefault(folder, sub.key)
            opts = sub.options
            # E41: cached latents are encoded once: no per-step pixel augmentation (sd-scripts asserts it).
            if ds.cache_latents or ds.cache_latents_to_disk:
                clashes = [k for k in ("color_aug", "random_crop") if getattr(opts, k)]
                if clashes:
                    out.append(Finding("error", "E41", origin(config, sub, clashes[0]),
                                       f"{' and '.join(clashes)} cannot be combined with dataset.cache_latents: "
                                       "cached latents are encoded once",
                                       "turn latent caching off, or the augmentation off (flip_aug is allowed)",
                                       SD_TRAIN))
            # E43: cached text-encoder outputs need captions that never change.
            if tr.cache_text_encoder_outputs or tr.cache_text_encoder_outputs_to_disk:
                changing = [k for k in CHANGING_CAPTIONS if getattr(opts, k)]
                if changing:
                    out.append(Finding("error", "E43", origin(config, sub, changing[0]),
                                       f"{', '.join(changing)} cannot be combined with "
                                       "training.cache_text_encoder_outputs: cached captions are encoded once",
                                       "turn those off in the subset, or the cache off", SD_TRAIN))
        out += _bucket_findings(config, spec, family)
    return list({(f.code, f.key): f for f in out}.values())  # a value [dataset] gives every subset: said once


def _bucket_findings(config: LoracliConfig, spec: DatasetSpec, family: ModelFamily) -> list[Finding]:
    """E44: a dataset's own bucket options, checked as [dataset]'s are (E8); W40: SDXL below 768."""
    from loracli.lint import Finding

    out: list[Finding] = []
    key, opts = spec.key, spec.options  # the dataset's values, its own or [dataset]'s
    if opts.bucket_reso_steps % family.bucket_step_multiple:
        out.append(Finding("error", "E44", origin(config, spec, "bucket_reso_steps"),
                           f"{opts.bucket_reso_steps} is not a multiple of {family.bucket_step_multiple}, which "
                           f"{family.title} training needs", f"use {family.bucket_step_multiple}", SD_BUCKETS))
    if opts.enable_bucket and not opts.bucket_no_upscale:
        w, h = opts.resolution_wh
        if opts.min_bucket_reso > opts.max_bucket_reso:
            out.append(Finding("error", "E44", origin(config, spec, "min_bucket_reso"),
                               f"min_bucket_reso {opts.min_bucket_reso} > max_bucket_reso {opts.max_bucket_reso}",
                               "swap them", SD_BUCKETS))
        elif min(w, h) < opts.min_bucket_reso or max(w, h) > opts.max_bucket_reso:
            out.append(Finding("error", "E44", origin(config, spec, "resolution"),
                               f"{w}x{h} lies outside the bucket limits {opts.min_bucket_reso}-"
                               f"{opts.max_bucket_reso}", f"set min_bucket_reso/max_bucket_reso in {key} to "
                               "include it, or change its resolution", SD_BUCKETS))
        step = opts.bucket_reso_steps
        if opts.min_bucket_reso % step or opts.max_bucket_reso % step:  # W41: W12 for each dataset
            lo, hi = opts.min_bucket_reso // step * step, -(-opts.max_bucket_reso // step) * step
            out.append(Finding("warning", "W41", origin(config, spec, "min_bucket_reso"),
                               f"bucket limits {opts.min_bucket_reso}-{opts.max_bucket_reso} of {key} are not "
                               f"multiples of {step}; used as {lo}-{hi} (min rounded down, max up), as sd-scripts "
                               "does", f"set them to {lo} and {hi}", SD_BUCKETS))
    if family.name == "sdxl" and min(opts.resolution_wh) < 768:
        w, h = opts.resolution_wh
        out.append(Finding("warning", "W40", origin(config, spec, "resolution"),
                           f"{w}x{h} on SDXL, which is trained at 1024x1024: lower resolutions lose detail",
                           "use 1024 for the main dataset (a lower-resolution second dataset is a choice)",
                           "LoRA Training Guide"))
    return out
