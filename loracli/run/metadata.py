"""What a saved LoRA file says about itself: sd-scripts' `ss_*` keys, modelspec
keys and the sshs hashes, so A1111, ComfyUI, civitai and the additional-networks
metadata viewer read loracli files like sd-scripts ones.

Values are the `str()` of the Python value sd-scripts would hold (`"None"`,
`"False"`, `"(512, 512)"`) or `json.dumps` with its defaults for the JSON keys.
A folder-form config records sd-scripts' folder mode; [[datasets]] its --dataset_config mode. Options
loracli does not have are recorded with sd-scripts' defaults so every key exists.
Only `assemble_file_metadata` needs torch (lazily, through `saving`).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracli import __version__
from loracli.buckets import adjust_bucket_limits

if TYPE_CHECKING:
    from loracli.config.schema import LoracliConfig
    from loracli.family import ModelFamily
    from loracli.plan import Plan

# sd-scripts' SS_METADATA_MINIMUM_KEYS: all that --no_metadata keeps.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
MODELSPEC_VERSION = "1.0.1"
# get_git_revision_hash's answer when it cannot ask git; loracli is not sd-scripts.
UNKNOWN_COMMIT = "(unknown)"

# sd-scripts options loracli has no setting for, with sd-scripts' defaults.
_FIXED_DEFAULTS: dict[str, Any] = {
    "ss_num_validation_images": 0,
    "ss_lowram": False,
    "ss_face_crop_aug_range": None,
    "ss_validation_seed": None,
    "ss_validation_split": 0.0,
    "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None,
    "ss_validate_every_n_steps": None,
    "ss_resize_interpolation": None,
}


def _bucket_info(config: LoracliConfig, plan: Plan) -> dict[str, Any] | None:
    """sd-scripts' dataset.bucket_info: None without bucketing. Its bucket ids index the
    sorted list of resolutions that received images, which is the plan's bucket order."""
    if not config.dataset.enable_bucket:
        return None
    buckets = {
        i: {"resolution": list(b["resolution"]), "count": b["count"]} for i, b in enumerate(plan.buckets)
    }
    mean = plan.mean_ar_error if plan.mean_ar_error is not None else 0  # sd-scripts: 0 when no images
    return {"buckets": buckets, "mean_img_ar_error": mean}


def _bucket_limits(config: LoracliConfig) -> tuple[int | None, int | None]:
    """min/max_bucket_reso as the dataset holds them: rounded to the step, None without bucketing."""
    ds = config.dataset
    if not ds.enable_bucket:
        return None, None
    lo, hi, _ = adjust_bucket_limits(ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps)
    return lo, hi


def _model_name_and_hashes(name_or_path: str) -> dict[str, str]:
    """ss_sd_model_name (basename when the path exists locally) and, for a single local
    file, sd-scripts' two model hashes. Diffusers folders and hub ids get no hashes."""
    out: dict[str, str] = {}
    local = Path(name_or_path)
    if local.exists():
        if local.is_file():
            from loracli.run.saving import model_file_hashes  # torch-side module, only when needed

            out["ss_sd_model_hash"], out["ss_new_sd_model_hash"] = model_file_hashes(local)
        # normpath: a trailing "/" would give sd-scripts an empty name
        out["ss_sd_model_name"] = os.path.basename(os.path.normpath(name_or_path))
    else:
        out["ss_sd_model_name"] = name_or_path
    return out


def build_metadata(
    config: LoracliConfig,
    plan: Plan,
    family: ModelFamily,
    *,
    session_id: int,
    training_started_at: float,
    optimizer_name: str,
    lr_scheduler_name: str,
    learning_rate_recorded: float | None,
    network_args: Mapping[str, Any] | None,
    config_hash: str,
    mixed_precision: str | None = None,
) -> dict[str, str]:
    """The ss_* keys every saved file of this run shares (plus loracli provenance).

    optimizer_name: the full ss_optimizer string (name plus "(args)" when any).
    lr_scheduler_name: what sd-scripts ended with, e.g. "adafactor:0.001" when forced.
    learning_rate_recorded: None when Adafactor's relative_step cleared the lrs; sd-scripts
    then records ss_learning_rate and ss_unet_lr as None (ss_text_encoder_lr was read
    before and keeps its value).
    network_args: the --network_args strings, None when there were none. As in sd-scripts,
    `dropout` (network_dropout) is added when absent.
    mixed_precision: the precision the run really uses, when it differs from the config's (fp16 asked
    on a CPU trains in fp32: "no"); what a file records must be what made it.
    """
    ds, net, opt, tr, out = config.dataset, config.network, config.optimizer, config.training, config.output
    lrs_cleared = learning_rate_recorded is None
    min_reso, max_reso = _bucket_limits(config)
    values: dict[str, Any] = {
        # run / session
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": out.output_name,
        "ss_training_comment": out.training_comment,
        "ss_sd_scripts_commit_hash": UNKNOWN_COMMIT,
        # learning rates and optimizer
        "ss_learning_rate": learning_rate_recorded,
        "ss_text_encoder_lr": opt.text_encoder_lr,
        "ss_unet_lr": None if lrs_cleared else opt.unet_lr,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": opt.max_grad_norm,
        "ss_lr_warmup_steps": opt.lr_warmup_steps,  # raw value, as given (0.1 stays 0.1)
        "ss_lr_scheduler": lr_scheduler_name,
        # dataset and step counts
        "ss_num_train_images": plan.num_train_images,
        "ss_num_reg_images": plan.num_reg_images,
        "ss_num_batches_per_epoch": plan.batches_per_process,  # len(dataloader) after prepare, per process
        "ss_num_epochs": plan.epochs,
        "ss_gradient_checkpointing": tr.gradient_checkpointing,
        "ss_gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "ss_max_train_steps": plan.total_steps,
        # network
        "ss_network_module": net.module_name,
        "ss_network_dim": net.network_dim,  # "None" when unset, as sd-scripts
        "ss_network_alpha": net.network_alpha,
        "ss_network_dropout": net.network_dropout,
        # precision and base model
        "ss_mixed_precision": mixed_precision or tr.mixed_precision,
        "ss_v2": bool(config.model.v2),
        "ss_base_model_version": (
            family.base_model_version_v if config.model.v_parameterization else family.base_model_version
        ),
        "ss_clip_skip": config.model.clip_skip,
        "ss_max_token_length": ds.max_token_length,
        # sd-scripts turns cache_latents on when cache_latents_to_disk is set
        "ss_cache_latents": bool(ds.cache_latents or ds.cache_latents_to_disk),
        "ss_seed": tr.seed,
        # noise and loss
        "ss_noise_offset": tr.noise_offset,
        "ss_multires_noise_iterations": tr.multires_noise_iterations,
        "ss_multires_noise_discount": tr.multires_noise_discount,
        "ss_adaptive_noise_scale": tr.adaptive_noise_scale,
        "ss_min_snr_gamma": tr.min_snr_gamma,
        "ss_noise_offset_random_strength": tr.noise_offset_random_strength,
        "ss_zero_terminal_snr": tr.zero_terminal_snr,
        "ss_ip_noise_gamma": tr.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": tr.ip_noise_gamma_random_strength,
        "ss_debiased_estimation": tr.debiased_estimation_loss,
        "ss_loss_type": tr.loss_type,
        "ss_huber_schedule": tr.huber_schedule,
        "ss_huber_scale": tr.huber_scale,
        "ss_huber_c": tr.huber_c,
        # captions and dataset options
        "ss_caption_dropout_rate": ds.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": ds.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": ds.caption_tag_dropout_rate,
        "ss_prior_loss_weight": tr.prior_loss_weight,
        "ss_scale_weight_norms": net.scale_weight_norms,
        **_FIXED_DEFAULTS,
        # full_fp16 as the run does it: a CPU runs fp16 as fp32, and full_fp16 with it
        "ss_full_fp16": bool(tr.full_fp16 and (mixed_precision or tr.mixed_precision) == "fp16"),
        "ss_fp8_base": bool(tr.fp8_base),
        "ss_fp8_base_unet": bool(tr.fp8_base_unet),
        # validation: the options as given (sd-scripts records its args), images × repeats held out
        "ss_num_validation_images": sum(im.repeats for im in getattr(plan, "validation_images", []) or []),
        "ss_validation_seed": ds.validation_seed,
        "ss_validation_split": ds.validation_split,
        "ss_max_validation_steps": tr.max_validation_steps,
        "ss_validate_every_n_epochs": tr.validate_every_n_epochs,
        "ss_validate_every_n_steps": tr.validate_every_n_steps,
        # folder mode (no --dataset_config)
        "ss_batch_size_per_device": tr.train_batch_size,
        "ss_total_batch_size": tr.train_batch_size * tr.num_processes * tr.gradient_accumulation_steps,
        "ss_resolution": tuple(ds.resolution_wh),  # sd-scripts parses "W,H" into a tuple
        "ss_color_aug": bool(ds.color_aug),
        "ss_flip_aug": bool(ds.flip_aug),
        "ss_random_crop": bool(ds.random_crop),
        "ss_shuffle_caption": bool(ds.shuffle_caption),
        "ss_keep_tokens": ds.keep_tokens,
        "ss_enable_bucket": bool(ds.enable_bucket),
        # the dataset forces False / None for these without bucketing
        "ss_bucket_no_upscale": bool(ds.enable_bucket and ds.bucket_no_upscale),
        "ss_min_bucket_reso": min_reso,
        "ss_max_bucket_reso": max_reso,
        "ss_dataset_dirs": json.dumps(plan.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(plan.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(plan.tag_frequency),
        "ss_bucket_info": json.dumps(_bucket_info(config, plan)),
    }
    if getattr(plan, "datasets", None):  # [[datasets]]: what sd-scripts writes with --dataset_config
        for key in FOLDER_MODE_KEYS:
            values.pop(key, None)
        values.update(dataset_config_metadata(config, plan))
    if network_args is not None:
        args = dict(network_args)
        args.setdefault("dropout", net.network_dropout)
        values["ss_network_args"] = json.dumps(args)
    meta = {k: str(v) for k, v in values.items()}
    meta.update(_model_name_and_hashes(config.model.pretrained_model_name_or_path))
    meta["loracli_version"] = __version__
    meta["loracli_config_hash"] = config_hash
    return meta


# Keys sd-scripts writes only without --dataset_config (their values live in ss_datasets then).
FOLDER_MODE_KEYS = ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale",
                    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens", "ss_reg_dataset_dirs",
                    "ss_bucket_info")


def dataset_config_metadata(config: LoracliConfig, plan: Plan) -> dict[str, str]:
    """ss_datasets (one entry per dataset, with its subsets), ss_tag_frequency and ss_dataset_dirs as
    sd-scripts' train_network.py writes them for a --dataset_config run (JSON strings)."""
    from loracli.dataset.subsets import dataset_specs

    specs = dataset_specs(config)
    datasets, tag_frequency, dirs = [], {}, {}
    for spec, planned in zip(specs, plan.datasets):
        bucket_info = None
        if planned["enable_bucket"]:
            mean = planned["mean_ar_error"] if planned["mean_ar_error"] is not None else 0
            bucket_info = {"buckets": {i: {"resolution": list(b["resolution"]), "count": b["count"]}
                                       for i, b in enumerate(planned["buckets"])}, "mean_img_ar_error": mean}
        subsets = []
        for sub, info in zip(spec.subsets, planned["subsets"]):
            if not info["img_count"]:  # sd-scripts drops a subset without images
                continue
            o = sub.options
            name = os.path.basename(os.path.normpath(str(sub.image_dir)))
            subsets.append({
                "img_count": info["img_count"], "num_repeats": sub.num_repeats, "color_aug": bool(o.color_aug),
                "flip_aug": bool(o.flip_aug), "random_crop": bool(o.random_crop),
                "shuffle_caption": bool(o.shuffle_caption), "keep_tokens": o.keep_tokens,
                "keep_tokens_separator": o.keep_tokens_separator, "secondary_separator": o.secondary_separator,
                "enable_wildcard": bool(getattr(o, "enable_wildcard", False)), "caption_prefix": o.caption_prefix,
                "caption_suffix": o.caption_suffix, "resize_interpolation": None, "image_dir": name,
                "class_tokens": sub.class_tokens, "is_reg": sub.is_reg,
            })
            if not sub.is_reg:  # ss_dataset_dirs merges the training folders of every dataset
                unique, n = name, 2
                while unique in dirs:
                    unique, n = f"{name} ({n})", n + 1
                dirs[unique] = {"n_repeats": sub.num_repeats, "img_count": info["img_count"]}
        datasets.append({
            "is_dreambooth": True, "batch_size_per_device": planned["batch_size"],
            "num_train_images": planned["num_train_images"], "num_reg_images": planned["num_reg_images"],
            "resolution": list(planned["resolution"]), "enable_bucket": bool(planned["enable_bucket"]),
            "min_bucket_reso": planned["min_bucket_reso"], "max_bucket_reso": planned["max_bucket_reso"],
            "tag_frequency": planned["tag_frequency"], "bucket_info": bucket_info, "resize_interpolation": None,
            "subsets": subsets,
        })
        for folder, freq in planned["tag_frequency"].items():  # a folder several datasets use counts once
            tag_frequency.setdefault(folder, freq)
    return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dirs)}


def per_save_metadata(base: Mapping[str, str], *, steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """The keys sd-scripts adds at each save (a copy; `base` is left as it is)."""
    meta = dict(base)
    meta["ss_training_finished_at"] = str(finished_at)
    meta["ss_steps"] = str(steps)
    meta["ss_epoch"] = str(epoch)
    return meta


def no_metadata_subset(meta: Mapping[str, str]) -> dict[str, str]:
    """What output.no_metadata keeps (modelspec and sshs keys are added afterwards)."""
    return {k: meta[k] for k in MINIMUM_KEYS if k in meta}


def modelspec_metadata(
    config: LoracliConfig,
    family: ModelFamily,
    *,
    title: str | None,
    resolution: tuple[int, int],
    timestamp: float,
) -> dict[str, str]:
    """modelspec 1.0.1 keys as sd-scripts writes them for an SD1/SD2 LoRA.

    title None falls back to output_name, then "LoRA@<timestamp>". The date is local
    time, ISO-8601, whole seconds.
    """
    v_param = config.model.v_parameterization
    if title is None:
        title = config.output.output_name or f"LoRA@{timestamp}"
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture_v if v_param else family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
        "modelspec.implementation_version": f"loracli/{__version__}",
    }
    tr = config.training
    if tr.min_timestep is not None or tr.max_timestep is not None:
        lo = tr.min_timestep if tr.min_timestep is not None else 0
        hi = tr.max_timestep if tr.max_timestep is not None else 1000
        spec["modelspec.timestep_range"] = f"{lo},{hi}"
    if config.model.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(config.model.clip_skip)
    return spec


def assemble_file_metadata(
    ss: Mapping[str, str], modelspec: Mapping[str, str], tensors: Mapping[str, Any]
) -> dict[str, str]:
    """The full metadata of one file: ss (+ provenance), modelspec and the sshs hashes.

    The hashes cover only the ss_* keys, so pass the tensors exactly as saved.
    """
    from loracli.run.saving import sshs_hashes  # needs torch; the rest of this module does not

    model_hash, legacy_hash = sshs_hashes(tensors, {k: v for k, v in ss.items() if k.startswith("ss_")})
    meta = {**ss, **modelspec}
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    return meta
