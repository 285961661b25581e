"""Plan-time checks of what would otherwise fail after the model is loaded and a run folder written.

Torch-free on purpose (`loracli plan` never imports torch):
- the optimizer: its name resolved by name, its `optimizer_args` checked against the optimizer's
  parameters (a table of the known optimizers; a dotted `module.Class` is checked for its top-level
  package here and against its signature when the run builds it);
- `clip_skip` against the text encoder's depth, where the model's config can be read without loading it;
- the plan's own size: how many files and sample rounds it would list (a typo like
  save_every_n_steps = 1 over 10**8 steps must not fill memory);
- the output folder: not a file, writable, and with room for the planned LoRA files and states.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from loracli.config.schema import LoracliConfig
from loracli.errors import ConfigError, Problem
from loracli.family import ModelFamily

OPTIMIZER_KEY = "optimizer.optimizer_type"
ARGS_KEY = "optimizer.optimizer_args"
MAX_LISTED = 10_000  # files, sample rounds: more is a typo, and each one is a line in plan.json

_ADAM = ("betas", "eps", "weight_decay", "amsgrad")
_TORCH_COMMON = ("maximize", "foreach", "differentiable")
_BNB = ("optim_bits", "args", "min_8bit_size", "percentile_clipping", "block_wise", "is_paged")
_DADAPT = ("log_every", "d0", "growth_rate", "fsdp_in_use")
# Keyword parameters of each optimizer loracli builds by name (lr is optimizer.learning_rate, never an arg).
# Canonical name -> parameters; the same names as loracli/run/optim.py resolves, case-insensitive.
KNOWN_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "AdamW": (*_ADAM, *_TORCH_COMMON, "capturable", "fused"),
    "AdamW8bit": (*_ADAM, *_BNB),
    "PagedAdamW8bit": (*_ADAM, *_BNB),
    "PagedAdamW": (*_ADAM, *_BNB),
    "PagedAdamW32bit": (*_ADAM, *_BNB),
    "Lion8bit": ("betas", "weight_decay", *_BNB),
    "PagedLion8bit": ("betas", "weight_decay", *_BNB),
    "Lion": ("betas", "weight_decay", "use_triton", "decoupled_weight_decay"),
    "SGDNesterov": ("momentum", "dampening", "weight_decay", "nesterov", *_TORCH_COMMON, "fused"),
    "SGDNesterov8bit": ("momentum", "dampening", "weight_decay", "nesterov", *_BNB),
    "DAdaptation": ("betas", "eps", "weight_decay", "decouple", *_DADAPT),
    "DAdaptAdamPreprint": ("betas", "eps", "weight_decay", "decouple", *_DADAPT),
    "DAdaptAdam": ("betas", "eps", "weight_decay", "decouple", "use_bias_correction", *_DADAPT),
    "DAdaptAdaGrad": ("momentum", "weight_decay", "eps", *_DADAPT),
    "DAdaptAdan": ("betas", "eps", "weight_decay", "no_prox", *_DADAPT),
    "DAdaptAdanIP": ("betas", "eps", "weight_decay", "no_prox", *_DADAPT),
    "DAdaptLion": ("betas", "weight_decay", *_DADAPT),
    "DAdaptSGD": ("momentum", "weight_decay", *_DADAPT),
    "Prodigy": ("betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction", "safeguard_warmup",
                "d0", "d_coef", "growth_rate", "fsdp_in_use", "slice_p"),
    "AdaFactor": ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                  "relative_step", "warmup_init"),
}
# Other bare names are torch.optim classes (looked up with their own spelling, as the run does).
TORCH_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "ASGD": ("lambd", "alpha", "t0", "weight_decay", *_TORCH_COMMON, "capturable"),
    "Adadelta": ("rho", "eps", "weight_decay", *_TORCH_COMMON, "capturable"),
    "Adafactor": ("beta2_decay", "eps", "d", "weight_decay", "foreach", "maximize"),
    "Adagrad": ("lr_decay", "weight_decay", "initial_accumulator_value", "eps", *_TORCH_COMMON, "fused"),
    "Adam": (*_ADAM, *_TORCH_COMMON, "capturable", "fused", "decoupled_weight_decay"),
    "AdamW": (*_ADAM, *_TORCH_COMMON, "capturable", "fused"),
    "Adamax": ("betas", "eps", "weight_decay", *_TORCH_COMMON, "capturable"),
    "NAdam": ("betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", *_TORCH_COMMON,
              "capturable"),
    "RAdam": ("betas", "eps", "weight_decay", "decoupled_weight_decay", *_TORCH_COMMON, "capturable"),
    "RMSprop": ("alpha", "eps", "weight_decay", "momentum", "centered", "capturable", *_TORCH_COMMON),
    "Rprop": ("etas", "step_sizes", "capturable", *_TORCH_COMMON),
    "SGD": ("momentum", "dampening", "weight_decay", "nesterov", *_TORCH_COMMON, "fused"),
    "SparseAdam": ("betas", "eps", "maximize"),
}
_BY_LOWER = {name.lower(): name for name in KNOWN_OPTIMIZERS}


def optimizer_parameters(optimizer_type: str) -> tuple[str, tuple[str, ...] | None]:
    """(the name as resolved, its parameters); parameters None for a dotted module.Class (checked at train
    time). ConfigError for a name that resolves to nothing."""
    name = optimizer_type or "AdamW"
    canonical = _BY_LOWER.get(name.lower())
    if canonical is not None:
        return canonical, KNOWN_OPTIMIZERS[canonical]
    if name in TORCH_OPTIMIZERS:
        return name, TORCH_OPTIMIZERS[name]
    choices = list(KNOWN_OPTIMIZERS) + list(TORCH_OPTIMIZERS)
    if "." in name and all(part.isidentifier() for part in name.split(".")):
        top = name.split(".")[0]
        if importlib.util.find_spec(top) is None:  # finds the package without importing it
            raise ConfigError(Problem(OPTIMIZER_KEY, f"{name}: the module {top} is not installed",
                                      f"pip install the package that provides {top}, or use one of the built-in "
                                      "optimizers"))
        return name, None
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    hint = (f"did you mean {next(c for c in choices if c.lower() == close[0])}?" if close else
            "use one of " + ", ".join(KNOWN_OPTIMIZERS) + ", a torch.optim class name, or a dotted module.Class")
    raise ConfigError(Problem(OPTIMIZER_KEY, f"unknown optimizer {name!r}", hint))


def check_optimizer(config: LoracliConfig) -> None:
    """The optimizer exists and takes every argument in optimizer_args (all problems at once)."""
    opt = config.optimizer
    name, params = optimizer_parameters(opt.optimizer_type)
    problems = []
    for key in opt.optimizer_args:
        if key in ("lr", "params"):
            problems.append(Problem(f"{ARGS_KEY}.{key}", "is set by loracli, not an optimizer argument",
                                    "set optimizer.learning_rate (and unet_lr / text_encoder_lr) instead"))
        elif params is not None and key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"did you mean {close[0]}?" if close else f"{name} takes: {', '.join(params) or 'no arguments'}"
            problems.append(Problem(f"{ARGS_KEY}.{key}", f"{name} has no argument {key!r}", hint))
    if problems:
        raise ConfigError(problems)


def text_encoder_depth(model_path: str, kind: str) -> int | None:
    """Layers of the (first) text encoder, read from a config or a header; None when it cannot be told."""
    if kind == "tiny":
        return TINY_TEXT_ENCODER_LAYERS.get(model_path)
    path = Path(model_path)
    if kind == "diffusers":
        try:
            data = json.loads((path / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        layers = data.get("num_hidden_layers") if isinstance(data, dict) else None
        return layers if isinstance(layers, int) and layers > 0 else None
    if kind == "single-file":
        from loracli.safetensors_header import read_header

        try:
            header = read_header(path)
        except Exception:  # noqa: BLE001 -- the probe has already judged the file; depth is best-effort
            return None
        keys = header.tensors if hasattr(header, "tensors") else header
        return _layers_from_keys(list(keys))
    return None


# tiny_model.py builds these (2-layer CLIP text encoders); the run side cannot be imported at plan time.
TINY_TEXT_ENCODER_LAYERS = {"tiny:sd15": 2, "tiny:sdxl": 2}
_LAYER_PREFIXES = ("cond_stage_model.transformer.text_model.encoder.layers.",  # SD1 (CLIP ViT-L)
                   "cond_stage_model.model.transformer.resblocks.")  # SD2 (OpenCLIP)


def _layers_from_keys(keys: list[str]) -> int | None:
    for prefix in _LAYER_PREFIXES:
        indices = {int(k[len(prefix):].split(".")[0]) for k in keys
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        if indices:
            # SD2's OpenCLIP has 24 blocks of which the model uses 23 (penultimate layer), as diffusers does
            return max(indices) + 1 - (1 if prefix.endswith("resblocks.") else 0)
    return None


def check_clip_skip(config: LoracliConfig, model_path: str, kind: str) -> None:
    clip_skip = config.model.clip_skip
    if clip_skip is None or clip_skip <= 1:
        return
    depth = text_encoder_depth(model_path, kind)
    if depth is not None and clip_skip > depth:
        raise ConfigError(Problem("model.clip_skip", f"{clip_skip} is more than the text encoder's {depth} layers "
                                  f"({model_path})", f"use a value from 1 to {depth} (2 for NAI-derived anime models)"))


def check_config(config: LoracliConfig, model_path: str = "", model_kind: str = "") -> None:
    """What can be checked before the dataset is scanned."""
    check_optimizer(config)
    check_clip_skip(config, model_path, model_kind)
    check_output_dir(config.output.output_dir)
    if config.logging.logging_dir is not None:
        check_output_dir(config.logging.logging_dir, "logging.logging_dir")


def check_output_dir(output_dir: Path, key: str = "output.output_dir") -> None:
    """A folder loracli writes into is a folder (or can be made) and can be written to."""
    where = f"{key}: {output_dir}"
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(Problem(where, "is a file, not a folder", "choose a folder"))
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(Problem(where, f"cannot be made: {existing} is a file", "choose another folder"))
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(Problem(where, f"{existing} is not writable (read-only, or owned by another user)",
                                  "choose a folder you can write to"))


def _count_multiples(every: int | None, upto: int) -> int:
    return upto // every if every else 0


def check_plan_size(config: LoracliConfig, total_steps: int, epochs: int) -> None:
    """The plan lists each saved file and sample round; refuse a count no run would want, before listing."""
    out, smp = config.output, config.sample
    problems = []
    for key, every, upto in (("output.save_every_n_epochs", out.save_every_n_epochs, epochs),
                             ("output.save_every_n_steps", out.save_every_n_steps, total_steps)):
        n = _count_multiples(every, upto)
        if n > MAX_LISTED:
            problems.append(Problem(key, f"would save {n} files over {upto} {key.rsplit('_', 1)[-1]}",
                                    f"save at most {MAX_LISTED} files: raise {key.split('.')[-1]}"))
    if smp.sample_prompts is not None:
        rounds = (_count_multiples(smp.sample_every_n_epochs, epochs) if smp.sample_every_n_epochs
                  else _count_multiples(smp.sample_every_n_steps, total_steps))
        key = "sample.sample_every_n_epochs" if smp.sample_every_n_epochs else "sample.sample_every_n_steps"
        if rounds > MAX_LISTED:
            problems.append(Problem(key, f"would make {rounds} rounds of sample images",
                                    f"make at most {MAX_LISTED}: raise {key.split('.')[-1]}"))
    if problems:
        raise ConfigError(problems)


# Bytes of LoRA weights per unit of rank, fp32, plain LoRA on every kohya target (measured on
# loracli's own files: SD1.5 dim 32 ≈ 37.8 MB, SDXL dim 32 ≈ 456 MB in fp32). Tiny models are tiny.
_BYTES_PER_RANK = {"sd1": 1.18e6, "sd2": 1.0e6, "sdxl": 14.2e6}
_SAVE_BYTES = {None: 4, "float": 4, "fp16": 2, "bf16": 2}


def estimated_lora_bytes(config: LoracliConfig, family: ModelFamily, model_path: str) -> int:
    """A low estimate of one saved LoRA file (so a full disk is caught, not a tight one refused)."""
    if model_path.startswith("tiny:"):
        return 1 << 20
    net = config.network
    rank = net.dim + (net.conv_dim or 0)
    per_rank = _BYTES_PER_RANK.get(family.name, 1.0e6)
    return int(rank * per_rank * _SAVE_BYTES.get(config.output.save_precision, 4) / 4)


def check_free_space(config: LoracliConfig, family: ModelFamily, model_path: str, files: int) -> None:
    """Room for the planned LoRA files and the kept training states (weights + optimizer moments)."""
    lora = estimated_lora_bytes(config, family, model_path)
    states = config.output.save_last_n_states + 1 if config.output.save_state_every_n_steps else 0
    needed = files * lora + states * 4 * lora
    folder = config.output.output_dir
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise ConfigError(Problem(f"output.output_dir: {config.output.output_dir}",
                                  f"not enough disk space: {free / 2**20:.0f} MiB free on the disk holding {folder}, "
                                  f"about {needed / 2**20:.0f} MiB needed for {files} LoRA file(s)"
                                  + (f" and {states} training state(s)" if states else ""),
                                  "free some space, choose another output_dir, or save fewer files "
                                  "(save_last_n_epochs / save_last_n_steps)"))
