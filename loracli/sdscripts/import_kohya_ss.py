"""A kohya_ss GUI LoRA config or preset (JSON) -> sd-scripts arguments.

The GUI saves every widget, with its own names and forms: text for numbers
("0.0001", "" for unset), 0 for "off", `max_resolution` "512,512", `epoch`
for the epoch count, `lr_warmup` as a percent of the steps, `optimizer_args`
as one space-separated string, `LoRA_type` for the network. This module turns
them into the `train_network.py` arguments the GUI would have passed (the same
rules: a value of 0 drops most options), and accounts for every GUI key; the
arguments then go through the common sd-scripts import. `"sdxl": true` is an
SDXL run (sdxl_train_network.py, `model.sdxl = true`); only then does the GUI
pass its `sdxl_cache_text_encoder_outputs` and `sdxl_no_half_vae` switches.
"""

from __future__ import annotations

import shlex
from typing import Any

from loracli.sdscripts.import_result import ImportResult

# What kohya_gui/lora_gui.py (train_model, bmaltais/kohya_ss) passes per LoRA_type as network_args.
# Standard and Kohya LoCon (networks.lora): the block-wise keys and rank/module dropout, each only when set
# (truthy); Kohya LoCon adds conv_dim/conv_alpha. The LyCORIS types (lycoris.kohya) always pass their whole
# list, dora_wd and bypass_mode among them (LoCon, LoHa, LoKr). LoRA+ ratios go to every type, when set.
KOHYA_BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                    "block_alphas", "conv_block_dims", "conv_block_alphas")
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
LYCORIS_KEYS = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "use_tucker", "use_scalar",
                "rank_dropout_scale", "train_norm", "bypass_mode", "dora_wd", *LORAPLUS_KEYS)
# LoRA_type -> (network_module, LyCORIS algo or None, GUI keys that become network_args)
LORA_TYPES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "Standard": ("networks.lora", None, ("rank_dropout", "module_dropout", *KOHYA_BLOCK_KEYS, *LORAPLUS_KEYS)),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
                                            *KOHYA_BLOCK_KEYS, *LORAPLUS_KEYS)),
    "LoCon": ("lycoris.kohya", "locon", LYCORIS_KEYS),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon", LYCORIS_KEYS),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha", LYCORIS_KEYS),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr", (*LYCORIS_KEYS, "factor", "use_cp", "decompose_both")),
}
# Switches kohya_ss passes to LyCORIS that loracli's networks do not implement (reported when on).
LYCORIS_UNSUPPORTED = {
    "bypass_mode": "LyCORIS' bypass mode (the adapter runs beside the frozen layer) is not implemented by loracli",
    "decompose_both": "LoKr decompose_both (both Kronecker factors low-rank) is not implemented by loracli",
}
# Keys kohya_ss passes only when set (a value of 0, "" or false passes nothing): LoRA+ for every type.
PASSED_IF_SET = set(LORAPLUS_KEYS)
# Every network-shaping GUI key: used by some LoRA types, ignored by the others.
NETWORK_KEYS = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "use_tucker", "use_scalar",
                "rank_dropout_scale", "train_norm", "factor", "use_cp", "decompose_both", "train_on_input", "unit",
                "constrain", "rescaled", "LyCORIS_preset", *KOHYA_BLOCK_KEYS, "conv_dims", "conv_alphas",
                "bypass_mode", "dora_wd", *LORAPLUS_KEYS}
# Early GUI names (kohya_ss, April-July 2023): passed as network_args that sd-scripts' networks.lora never read;
# the GUI now has conv_block_dims/conv_block_alphas and only old presets still hold these (empty).
OLD_GUI_KEYS = {"conv_dims": "conv_block_dims", "conv_alphas": "conv_block_alphas"}

# GUI keys passed through under the same sd-scripts name when "set" (non-empty; numbers > 0 where the GUI
# drops 0).
SAME_NAME = ("pretrained_model_name_or_path", "v2", "v_parameterization", "train_data_dir", "reg_data_dir",
             "output_dir", "output_name", "logging_dir", "log_prefix", "training_comment", "caption_extension",
             "shuffle_caption", "flip_aug", "color_aug", "random_crop", "cache_latents", "cache_latents_to_disk",
             "bucket_no_upscale", "gradient_checkpointing", "mixed_precision", "save_precision", "network_alpha",
             "network_dim", "learning_rate", "lr_scheduler", "train_batch_size", "save_model_as",
             "prior_loss_weight", "max_grad_norm", "keep_tokens_separator", "secondary_separator",
             "caption_separator", "caption_prefix", "caption_suffix", "noise_offset_random_strength",
             "weighted_captions", "mem_eff_attn", "full_fp16", "full_bf16", "fp8_base", "no_half_vae",
             "persistent_data_loader_workers", "save_state", "save_state_on_train_end", "resume",
             "scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss", "masked_loss", "vae",
             "dataset_config", "max_data_loader_n_workers", "loss_type", "huber_schedule", "huber_c",
             "lr_scheduler_type", "lr_scheduler_args", "log_with", "log_tracker_name", "wandb_run_name",
             "dim_from_weights", "no_metadata", "sample_sampler")
# Numbers the GUI passes only when > 0 (0 means off).
POSITIVE = ("seed", "clip_skip", "keep_tokens", "gradient_accumulation_steps", "save_every_n_epochs",
            "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps", "save_last_n_steps_state",
            "save_last_n_epochs_state", "min_snr_gamma", "scale_weight_norms", "network_dropout",
            "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
            "vae_batch_size", "ip_noise_gamma", "v_pred_like_loss", "lr_scheduler_power", "max_train_steps",
            "max_train_epochs", "token_warmup_step", "sample_every_n_steps", "sample_every_n_epochs",
            "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "stop_text_encoder_training",
            "lr_scheduler_num_cycles")
COMPILE_REASON = "accelerate's launch-time compile tuning; loracli takes training.torch_compile / dynamo_backend"
# GUI-only keys: the launcher, the GUI itself, SDXL-script switches.
GUI_ONLY: dict[str, str] = {
    "num_cpu_threads_per_process": "accelerate's CPU threads per process; loracli runs accelerate itself",
    "num_machines": "multi-machine training is not supported",
    "multi_gpu": "set training.num_processes for several GPUs",
    "gpu_ids": "choose GPUs with CUDA_VISIBLE_DEVICES",
    "main_process_port": "loracli runs accelerate itself",
    "extra_accelerate_launch_args": "loracli runs accelerate itself",
    "dynamo_mode": COMPILE_REASON,
    "dynamo_use_fullgraph": COMPILE_REASON,
    "dynamo_use_dynamic": COMPILE_REASON,
    "model_list": "a GUI menu (the model is pretrained_model_name_or_path)",
    "save_as": "a GUI setting",
    "print_only": "a GUI setting",
    "headless": "a GUI setting",
    "use_wandb": "set logging.log_with = \"wandb\" (pip install \"loracli[wandb]\")",
    "wandb_api_key": "not copied into a config: log in with `wandb login` or set WANDB_API_KEY",
    "stop_text_encoder_training": "stopping text-encoder training part-way is not supported",
    "stop_text_encoder_training_pct": "stopping text-encoder training part-way is not supported",
    "no_token_padding": "a DreamBooth-script option train_network.py does not take",
    "noise_offset_type": "read: it picks which noise options apply",
}


class _Args(dict):
    """sd-scripts arguments, each remembering the GUI key it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[str, str] = {}

    def put(self, arg: str, value: Any, gui_key: str) -> None:
        self[arg] = value
        self.labels[arg] = gui_key

    def remove(self, arg: str) -> None:
        self.pop(arg, None)
        self.labels.pop(arg, None)


def _empty(value: Any) -> bool:
    return value is None or value == "" or value is False


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def kohya_ss_args(data: dict[str, Any], result: ImportResult) -> tuple[dict[str, Any], dict[str, str]]:
    """The sd-scripts arguments the GUI would pass, and the GUI key each came from (for reports).

    GUI keys without an argument are reported in `result`."""
    args = _Args()
    done: set[str] = set()

    def take(key: str) -> Any:
        done.add(key)
        return data.get(key)

    def passed(key: str, arg: str, value: Any) -> None:
        args.put(arg, value, key)

    for key in SAME_NAME:
        if key in data:
            value = take(key)
            if _empty(value):
                result.unset(key)
            else:
                passed(key, key, value)
    for key in POSITIVE:
        if key in data:
            value = take(key)
            number = _number(value)
            if number is None or number <= 0:
                result.unset(key)
            else:
                passed(key, key, value)

    _epochs(data, take, result, args)
    _learning_rates(data, take, result, args)
    _resolution_and_buckets(data, take, result, args)
    _noise(data, take, result, args)
    _misc(data, take, result, args)
    _network(data, take, result, args)
    _sampling(data, take, result, args)
    _sdxl(data, take, result, args)

    for key, reason in GUI_ONLY.items():
        if key in data and key not in done:
            value = take(key)
            if key == "noise_offset_type":
                result.mapped[key] = ["(chooses which noise options apply)"]
            elif (_empty(value) or value == 0 or key in ("model_list", "save_as", "print_only", "headless")
                  or (key.startswith("sdxl_") and not data.get("sdxl"))):
                result.unset(key)
            else:
                result.skip(key, reason)
    extra = take("additional_parameters")
    if isinstance(extra, str) and extra.strip():
        _additional(extra, result, args, sdxl=_truthy(data.get("sdxl")))
    elif "additional_parameters" in data:
        result.unset("additional_parameters")
    for key in data:
        if key not in done:
            result.skip(key, "not a kohya_ss LoRA setting loracli knows")
    return dict(args), args.labels


def _epochs(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    epoch = take("epoch")
    if "epoch" not in data:
        return
    if "max_train_epochs" in args or "max_train_steps" in args:
        result.skip("epoch", "max_train_epochs/max_train_steps is also set, and wins")
    elif (_number(epoch) or 0) > 0:
        args.put("max_train_epochs", epoch, "epoch")
        result.note("epoch: kohya_ss turns it into max_train_steps with its own formula (no buckets, x2 with reg "
                    "images); loracli trains that many epochs and counts the steps exactly (see `loracli plan`)")
    else:
        result.unset("epoch")


def _learning_rates(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    te, unet = take("text_encoder_lr"), take("unet_lr")
    te_n, unet_n = _number(te) or 0.0, _number(unet) or 0.0
    for key, value, number in (("text_encoder_lr", te, te_n), ("unet_lr", unet, unet_n)):
        if key not in data:
            continue
        if number > 0:
            args.put(key, value, key)
        else:
            result.unset(key)
    # The GUI trains only the part whose learning rate is set when the other is 0.
    if te_n > 0 and unet_n == 0 and "unet_lr" in data:
        args.put("network_train_text_encoder_only", True, "unet_lr")
        result.note("unet_lr 0 with text_encoder_lr set: kohya_ss trains the text encoder only")
    elif unet_n > 0 and te_n == 0 and "text_encoder_lr" in data:
        args.put("network_train_unet_only", True, "text_encoder_lr")
        result.note("text_encoder_lr 0 with unet_lr set: kohya_ss trains the UNet only")
    _pass_if_set(data, take, result, args, "optimizer", "optimizer_type")
    if "optimizer_args" in data:
        value = take("optimizer_args")
        if isinstance(value, str) and value.strip():
            args.put("optimizer_args", shlex.split(value), "optimizer_args")
        else:
            result.unset("optimizer_args")
    warmup = take("lr_warmup")
    # The GUI passes a set lr_warmup_steps (> 0) as a step count and then ignores the lr_warmup percent.
    steps_win = (_number(data.get("lr_warmup_steps")) or 0) > 0
    if "lr_warmup" in data:
        percent = _number(warmup) or 0.0
        scheduler = data.get("lr_scheduler")
        if percent <= 0:
            result.unset("lr_warmup")
        elif steps_win:
            result.skip("lr_warmup", f"{warmup}% is ignored: kohya_ss passes lr_warmup_steps when both are set")
        elif scheduler == "constant":
            result.skip("lr_warmup", f"{warmup}% with the constant scheduler: sd-scripts refuses a warmup there "
                                     "(use constant_with_warmup to keep a warmup)")
        elif percent >= 100:
            result.skip("lr_warmup", f"{warmup}% warms up for the whole run; set optimizer.lr_warmup_steps by hand")
        else:
            args.put("lr_warmup_steps", percent / 100, "lr_warmup")
            result.note(f"lr_warmup: {warmup}% of the steps -> optimizer.lr_warmup_steps = {percent / 100:g} (a ratio)")
    if "lr_warmup_steps" in data and "lr_warmup_steps" not in args:
        value = take("lr_warmup_steps")
        if (_number(value) or 0) > 0:
            args.put("lr_warmup_steps", value, "lr_warmup_steps")
        else:
            result.unset("lr_warmup_steps")
    take("lr_warmup_steps")
    # With no cycle count the GUI passes the epoch count (it matters to cosine_with_restarts only).
    if (data.get("lr_scheduler") == "cosine_with_restarts" and "lr_scheduler_num_cycles" not in args
            and (_number(data.get("epoch")) or 0) > 0):
        args.put("lr_scheduler_num_cycles", data["epoch"], "epoch")
        result.note(f"lr_scheduler_num_cycles: unset, so kohya_ss uses the epoch count ({data['epoch']})")


def _pass_if_set(data: dict[str, Any], take: Any, result: ImportResult, args: _Args, key: str, arg: str) -> None:
    """A GUI key passed as the sd-scripts argument `arg` when it holds a value; empty ones are unset."""
    if key in data:
        value = take(key)
        if _empty(value):
            result.unset(key)
        else:
            args.put(arg, value, key)


def _resolution_and_buckets(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    _pass_if_set(data, take, result, args, "max_resolution", "resolution")
    if "enable_bucket" in data:
        on = bool(take("enable_bucket"))
        args.put("enable_bucket", on, "enable_bucket")
        if not on:  # the GUI passes the bucket limits only with bucketing on
            for key in ("min_bucket_reso", "max_bucket_reso"):
                if key in args:
                    args.remove(key)
                    result.unset(key)
    token_length = take("max_token_length")
    if "max_token_length" in data:
        number = _number(token_length) or 0
        if number > 75:
            args.put("max_token_length", int(number), "max_token_length")
        else:
            result.unset("max_token_length")


def _noise(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    kind = data.get("noise_offset_type", "Original")
    original = ("noise_offset", "adaptive_noise_scale")
    multires = ("multires_noise_iterations", "multires_noise_discount")
    for key in original + multires:
        if key not in data:
            continue
        value = take(key)
        active = (kind == "Original") == (key in original)
        number = _number(value)
        if not active:
            if number:
                result.skip(key, f"not used with noise_offset_type {kind!r}")
            else:
                result.unset(key)
        elif number is None or number == 0 or (key == "adaptive_noise_scale" and not _number(data.get("noise_offset"))):
            result.unset(key)
        else:
            args.put(key, value, key)


def _misc(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    if "xformers" in data:
        value = take("xformers")
        if value is True or value == "xformers":
            args.put("xformers", True, "xformers")
        elif value == "sdpa":
            args.put("sdpa", True, "xformers")
        elif value in (False, "none", "", None):
            args.put("sdpa", True, "xformers")
            result.note("xformers off: loracli uses PyTorch SDPA attention (the same maths, less memory)")
        else:
            result.skip("xformers", f"unknown attention setting {value!r}")
    for key in ("min_timestep", "max_timestep"):
        if key in data:
            value = _number(take(key))
            if value is None or (key == "max_timestep" and value >= 1000) or (key == "min_timestep" and value <= 0):
                result.unset(key)
            else:
                args.put(key, int(value), key)
    _pass_if_set(data, take, result, args, "lora_network_weights", "network_weights")
    if "dynamo_backend" in data:
        backend = str(take("dynamo_backend") or "no").lower()
        if backend == "no":
            result.unset("dynamo_backend")
        else:  # the GUI hands it to accelerate launch, which compiles the UNet: sd-scripts' --torch_compile
            args.put("torch_compile", True, "dynamo_backend")
            args.put("dynamo_backend", backend, "dynamo_backend")


def _network(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    lora_type = take("LoRA_type")
    preset = take("LyCORIS_preset")
    if lora_type is None:
        lora_type = "Standard"
        result.note("no LoRA_type: read as Standard (kohya's LoRA)")
    spec = LORA_TYPES.get(str(lora_type))
    if spec is None:
        result.skip("LoRA_type", f"{lora_type!r} is not supported: loracli trains Standard, Kohya LoCon, "
                                 "LyCORIS/LoCon, LyCORIS/LoHa and LyCORIS/LoKr")
        for key in NETWORK_KEYS:
            if key in data:
                value = take(key)
                result.unset(key) if _empty(value) or value == 0 else result.skip(key, f"belongs to {lora_type}")
        return
    module, algo, used = spec
    args.put("network_module", module, "LoRA_type")
    items: list[str] = []
    if algo is not None:
        items.append(f"algo={algo}")
        chosen = preset if preset not in (None, "") else "full"
        items.append(f"preset={chosen}")
    elif "LyCORIS_preset" in data:
        result.unset("LyCORIS_preset") if _empty(preset) else result.skip(
            "LyCORIS_preset", f"not used by LoRA_type {lora_type}")
    for key in sorted(NETWORK_KEYS - {"LyCORIS_preset"}):
        if key not in data:
            continue
        value = take(key)
        off = _empty(value) or value == 0 or (isinstance(value, str) and not value.strip())
        if key not in used:
            if off:
                result.unset(key)
            elif key in OLD_GUI_KEYS:
                result.skip(key, f"an early kohya_ss GUI name that sd-scripts' networks.lora never read (it reads "
                                 f"{OLD_GUI_KEYS[key]}); the GUI no longer passes it")
            else:
                result.skip(key, f"not used by LoRA_type {lora_type} (kohya_ss does not pass it)")
            continue
        if (algo is None or key in PASSED_IF_SET) and off:  # passed only when set
            result.unset(key)
            continue
        if isinstance(value, bool):
            if not value:
                result.unset(key)
                continue
            text = "True"
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        if key in LYCORIS_UNSUPPORTED:
            result.skip(key, f"kohya_ss passes {key}={text} to LyCORIS; {LYCORIS_UNSUPPORTED[key]}")
            continue
        # The GUI drops double quotes and splits its network_args at whitespace; sd-scripts reads each piece
        # as key=value, so a value with spaces inside does not reach it whole.
        pieces = f"{key}={text.replace(chr(34), '')}".split()
        if len(pieces) != 1 or not pieces[0].startswith(f"{key}="):
            result.skip(key, f"kohya_ss splits network_args at spaces, so {text!r} reaches sd-scripts as "
                             f"{' '.join(repr(p) for p in pieces)}, which it cannot read as key=value: "
                             "write the value without spaces")
            continue
        items.append(pieces[0])
        args.labels[f"network_args.{key}"] = key
    if algo is not None:
        args.labels["network_args.algo"] = "LoRA_type"
        args.labels["network_args.preset"] = "LyCORIS_preset" if "LyCORIS_preset" in data else "LoRA_type"
    if items:
        args.put("network_args", items, "LoRA_type")


# The GUI's SDXL switches and the sdxl_train_network.py option each becomes (passed only with "sdxl" on).
SDXL_SWITCHES = {"sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs", "sdxl_no_half_vae": "no_half_vae"}


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true") or value == 1


def _sdxl(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    """`sdxl` picks sdxl_train_network.py; the GUI passes its SDXL switches only then."""
    sdxl = _truthy(take("sdxl"))
    if sdxl:
        result.set("model.sdxl", True, "sdxl")
    elif "sdxl" in data:
        result.unset("sdxl")
    for key, arg in SDXL_SWITCHES.items():
        if key not in data:
            continue
        value = take(key)
        if sdxl and _truthy(value):
            args.put(arg, True, key)
        else:
            result.unset(key)  # off, or ignored by the GUI without "sdxl"


def _sampling(data: dict[str, Any], take: Any, result: ImportResult, args: _Args) -> None:
    if "sample_prompts" not in data:
        return
    prompts = take("sample_prompts")
    sampling = any(k in args for k in ("sample_every_n_steps", "sample_every_n_epochs"))
    if _empty(prompts):
        result.unset("sample_prompts")
    elif sampling:
        result.skip("sample_prompts", "kohya_ss keeps the prompt text in its config; loracli reads a prompt file: "
                                      "save the prompts to a .txt file and set sample.sample_prompts")
        for key in ("sample_every_n_steps", "sample_every_n_epochs", "sample_sampler"):
            if key in args:  # a schedule without a prompt file is an error in loracli
                args.remove(key)
                result.skip(key, "needs the prompts (see sample_prompts); set it again with sample.sample_prompts")
        return
    else:
        result.skip("sample_prompts", "sampling is off (no sample_every_n_steps/epochs)")
    if not sampling and "sample_sampler" in args:
        args.remove("sample_sampler")
        result.unset("sample_sampler")


def _additional(text: str, result: ImportResult, args: _Args, sdxl: bool = False) -> None:
    """`additional_parameters`: extra command-line options the GUI appends verbatim (to the SDXL script's
    command line when "sdxl" is on)."""
    from loracli.sdscripts.import_shell import find_command

    script = "sdxl_train_network.py" if sdxl else "train_network.py"
    cmd = find_command(f"{script} {text}")
    if cmd is None or cmd.stray:
        result.skip("additional_parameters", f"could not read {text!r} as sd-scripts options")
        return
    for name, value in cmd.args.items():
        args.put(name, value, f"additional_parameters --{name}")
    result.mapped.setdefault("additional_parameters", ["(read as command-line options)"])
    result.note(f"additional_parameters: read as command-line options ({', '.join('--' + n for n in cmd.args)})")
