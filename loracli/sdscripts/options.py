"""What loracli knows about sd-scripts' `train_network.py` and `sdxl_train_network.py` command lines.

Two tables, both usable in either direction (export: loracli -> sd-scripts;
import: sd-scripts -> loracli):

1. The option tables: every option of each script, loaded from
   `train_network_options.json` and `sdxl_train_network_options.json` (shipped
   in this package; copies are committed as test data). The SDXL script's
   parser is train_network.py's plus three options, so its file "extends" the
   other. `SCRIPTS` names the script of each model family (`script_for`). API:

   - `load_option_table(script=TRAIN_NETWORK) -> dict[str, OptionSpec]`: name -> spec.
     `OptionSpec` has `name`, `kind` ("flag" = store_true, "value", "list" =
     nargs='*'), `type` ("str" | "int" | "float" | "int_or_float"), `choices`
     (argparse choices), `values` (names the script checks itself, e.g.
     lr_scheduler), `default`.
   - `build_parser(script) -> argparse.ArgumentParser`: a parser with those options
     (for tests, and for reading a shell script's command line on import).
   - `cli_tokens(name, value, script) -> list[str]`: a config.toml value as command-line
     tokens (`--flag`, `--name VALUE`, `--name V1 V2`).

2. The key mapping: one `KeyMapping` per loracli config key (every leaf of
   `loracli.config.schema`, see `MAPPINGS`). Each row says where the value goes:

   - `arg`: a `train_network.py` option, written to config.toml (`--config_file`).
   - `dataset`: a key of the dataset TOML (`--dataset_config`). Export writes the
     caption/augmentation keys in `[general]` and resolution, batch_size and the
     bucket keys on the `[[datasets]]` table; sd-scripts reads subset > dataset >
     general, so an importer should accept a key at any of those levels.
   - `subsets`: "train" / "reg": the folder becomes `[[datasets.subsets]]`, one per
     `<repeats>_<class tokens>` folder (image_dir, num_repeats, class_tokens, is_reg).
   - `network_arg`: one `key=value` item of `--network_args`.
   - `optimizer_args`: the whole dict becomes `--optimizer_args` items.
   - `accelerate`: an `accelerate launch` option (training.num_processes).
   - `unsupported`: no sd-scripts equivalent; the reason (reported when the value
     is not the default).
   - `only_script`: the arg exists in that script only (the SDXL-only options);
     with any other script the row's `unsupported` reason applies.
   - `selects_script`: the key picks the script instead of passing an arg
     (`model.sdxl`: sdxl_train_network.py).
   A row may set both `arg` and `dataset` (resolution; train_batch_size is also
   the dataset's `batch_size`). Lookups: `mapping_for(key)`,
   `key_for_arg(name)`, `key_for_dataset_key(name)`, `key_for_network_arg(name)`.

Value forms (what export writes and import must read back):

   - `resolution`: arg as the string "W,H"; dataset TOML as int or [W, H].
   - `network_module`: "networks.lora" for algo=lora, else "lycoris.kohya" with
     network_args `algo=<algo>` and `preset=<lycoris_preset>`.
   - network_args values are plain text (`conv_dim=8`, `conv_alpha=1`,
     `use_tucker=True`); boolean LyCORIS switches are written only when true
     (their default is false, and some modules read any text as true).
   - optimizer_args values are Python literals, as sd-scripts reads them with
     `ast.literal_eval`: `decouple=True`, `weight_decay=0.4`,
     `betas=(0.9,0.99)`, `mode='x'`. `python_literal()` / `parse_optimizer_arg()`
     convert; a TOML list becomes a tuple and back.
   - `text_encoder_lr` (nargs='*' in train_network.py): a list, `[5e-05]`; for SDXL one
     value (both encoders) or two (one per encoder), as loracli's config holds it.
   - `clip_skip`: not written for SDXL (sdxl_train_network.py ignores it, with a warning).
   - `lr_warmup_steps`: an int counts steps; a float below 1 is a ratio (the
     pinned sd-scripts reads both).
   - `max_token_length`: 150 or 225 (argparse choices); loracli's 75 is sd-scripts'
     unset value, so export leaves it out.
   - algo=lora is always `networks.lora`: LyCORIS' algo=lora takes conv_dim =
     network_dim and wraps the 3x3 convs under preset=full (that is loracli's locon,
     which is how import reads it).
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

TRAIN_NETWORK = "train_network.py"
SDXL_TRAIN_NETWORK = "sdxl_train_network.py"
# The script that trains a LoRA for each model family (loracli.family names).
SCRIPTS = {"sd1": TRAIN_NETWORK, "sd2": TRAIN_NETWORK, "sdxl": SDXL_TRAIN_NETWORK}
TABLE_FILES = {TRAIN_NETWORK: "train_network_options.json", SDXL_TRAIN_NETWORK: "sdxl_train_network_options.json"}
TABLE_FILE = TABLE_FILES[TRAIN_NETWORK]


def script_for(family_name: str) -> str:
    return SCRIPTS[family_name]


@dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: str  # flag | value | list
    type: str  # str | int | float | int_or_float
    choices: tuple[Any, ...] | None = None
    values: tuple[str, ...] | None = None
    default: Any = None


def _read_table_file(file_name: str) -> dict[str, Any]:
    return json.loads(resources.files("loracli.sdscripts").joinpath(file_name).read_text(encoding="utf-8"))


def raw_options(script: str = TRAIN_NETWORK) -> dict[str, dict[str, Any]]:
    """A script's options as the JSON holds them, the extended table's first."""
    raw = _read_table_file(TABLE_FILES[script])
    base = raw.get("extends")
    options: dict[str, dict[str, Any]] = {}
    if base:
        (base_script,) = [s for s, f in TABLE_FILES.items() if f == base]
        options.update(raw_options(base_script))
    options.update(raw["options"])
    return options


@lru_cache(maxsize=None)
def load_option_table(script: str = TRAIN_NETWORK) -> dict[str, OptionSpec]:
    table: dict[str, OptionSpec] = {}
    for name, spec in raw_options(script).items():
        table[name] = OptionSpec(
            name=name, kind=spec["kind"], type=spec.get("type", "str"),
            choices=tuple(spec["choices"]) if spec.get("choices") else None,
            values=tuple(spec["values"]) if spec.get("values") else None,
            default=spec.get("default"),
        )
    return table


def int_or_float(text: str) -> int | float:
    """An int counts steps, a float (or 'N%') is a ratio: the pinned sd-scripts' warmup form."""
    if text.endswith("%"):
        return float(text[:-1]) / 100
    try:
        return int(text)
    except ValueError:
        return float(text)


_CONVERTERS = {"str": str, "int": int, "float": float, "int_or_float": int_or_float}


def build_parser(script: str = TRAIN_NETWORK) -> argparse.ArgumentParser:
    """An argparse parser that accepts what the script accepts (per its option table)."""
    parser = argparse.ArgumentParser(prog=script, allow_abbrev=False, add_help=False)
    for spec in load_option_table(script).values():
        flag = f"--{spec.name}"
        if spec.kind == "flag":
            parser.add_argument(flag, action="store_true")
            continue
        kwargs: dict[str, Any] = {"type": _CONVERTERS[spec.type], "default": None}
        if spec.choices:
            kwargs["choices"] = list(spec.choices)
        if spec.kind == "list":
            kwargs["nargs"] = "*"
        parser.add_argument(flag, **kwargs)
    return parser


def cli_tokens(name: str, value: Any, script: str = TRAIN_NETWORK) -> list[str]:
    """One config.toml entry as the tokens the same option takes on a command line."""
    spec = load_option_table(script).get(name)
    if spec is None:
        raise KeyError(f"{script} has no option --{name}")
    if spec.kind == "flag":
        return [f"--{name}"] if value else []
    if spec.kind == "list":
        items = value if isinstance(value, list) else [value]
        return [f"--{name}", *(_scalar_text(v) for v in items)]
    return [f"--{name}", _scalar_text(value)]


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- optimizer_args: Python literals -----------------------------------------------------------------------------


def python_literal(value: Any) -> str:
    """A typed TOML value as the Python literal sd-scripts' `ast.literal_eval` reads."""
    if isinstance(value, (list, tuple)):
        inner = ",".join(python_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    return repr(str(value))


def optimizer_arg_items(args: dict[str, Any]) -> list[str]:
    return [f"{key}={python_literal(value)}" for key, value in args.items()]


def parse_optimizer_arg(item: str) -> tuple[str, Any]:
    """`key=literal` -> (key, TOML-able value); tuples come back as lists, bare words as strings."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"optimizer argument {item!r} is not key=value")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # sd-scripts would fail here; keep the text so the importer can report it
    if isinstance(value, tuple):
        value = list(value)
    return key.strip(), value


def parse_network_arg(item: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"network argument {item!r} is not key=value")
    return key.strip(), text.strip()


# --- the key mapping ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMapping:
    key: str  # loracli dotted key
    arg: str | None = None
    dataset: str | None = None
    subsets: str | None = None  # "train" | "reg"
    network_arg: str | None = None
    optimizer_args: bool = False
    accelerate: str | None = None
    unsupported: str | None = None
    only_script: str | None = None
    selects_script: str | None = None
    note: str = ""

    def unsupported_for(self, script: str) -> str | None:
        """Why this key cannot be passed to `script` (None when it can)."""
        if self.only_script and script != self.only_script:
            return self.unsupported or f"only {self.only_script} has --{self.arg}"
        return None if self.only_script else self.unsupported


def _args(section: str, *names: str) -> list[KeyMapping]:
    return [KeyMapping(f"{section}.{n}", arg=n) for n in names]


def _dataset(*names: str) -> list[KeyMapping]:
    return [KeyMapping(f"dataset.{n}", dataset=n) for n in names]


def _net_args(*names: str) -> list[KeyMapping]:
    return [KeyMapping(f"network.{n}", network_arg=n) for n in names]


MAPPINGS: tuple[KeyMapping, ...] = tuple(
    _args("model", "pretrained_model_name_or_path", "v2", "v_parameterization", "clip_skip", "no_half_vae")
    + [
        KeyMapping("model.allow_pickle_checkpoint",
                   unsupported="a loracli safety switch; sd-scripts loads .ckpt/.pt files without asking"),
        KeyMapping("model.sdxl", selects_script=SDXL_TRAIN_NETWORK,
                   note="an SDXL model is trained by sdxl_train_network.py instead of train_network.py"),
    ]
    + [
        KeyMapping("dataset.train_data_dir", subsets="train",
                   note="each <repeats>_<class tokens> folder becomes a [[datasets.subsets]] entry"),
        KeyMapping("dataset.reg_data_dir", subsets="reg", note="reg folders become subsets with is_reg = true"),
        KeyMapping("dataset.resolution", arg="resolution", dataset="resolution",
                   note="the arg is the string 'W,H' (used for metadata); the dataset TOML has the value"),
    ]
    + _dataset("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
               "caption_extension", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
               "secondary_separator", "caption_prefix", "caption_suffix", "caption_dropout_rate",
               "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
               "token_warmup_step", "flip_aug", "color_aug", "random_crop", "enable_wildcard")
    + _args("dataset", "cache_latents", "cache_latents_to_disk", "vae_batch_size", "max_token_length")
    + [
        KeyMapping("dataset.alpha_mask", arg="alpha_mask", dataset="alpha_mask",
                   note="a subset key in sd-scripts' dataset TOML (--alpha_mask is every subset's default)"),
        KeyMapping("dataset.conditioning_data_dir", dataset="conditioning_data_dir",
                   note="a subset key in sd-scripts' dataset TOML (train_network.py ignores --conditioning_data_dir)"),
        KeyMapping("training.masked_loss", arg="masked_loss"),
    ]
    + [
        KeyMapping("network.network_module", arg="network_module",
                   note="networks.lora for algo=lora; LyCORIS algos always use lycoris.kohya"),
        KeyMapping("network.algo", network_arg="algo", note="only with lycoris.kohya"),
        KeyMapping("network.lycoris_preset", network_arg="preset", note="only with lycoris.kohya"),
    ]
    + _args("network", "network_dim", "network_alpha", "network_dropout", "network_weights",
            "network_train_unet_only", "network_train_text_encoder_only", "scale_weight_norms")
    + _net_args("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "use_tucker", "use_scalar",
                "train_norm", "rank_dropout_scale")
    + [KeyMapping("network.factor", network_arg="factor", note="LoKr only")]
    + _net_args("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                "block_alphas", "conv_block_dims", "conv_block_alphas")  # networks.lora only (E50)
    + _net_args("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    + [KeyMapping("network.dora_wd", network_arg="dora_wd", note="LyCORIS only (E51)")]
    + _args("optimizer", "optimizer_type", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
            "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "max_grad_norm")
    + [KeyMapping("optimizer.optimizer_args", arg="optimizer_args", optimizer_args=True,
                  note="each entry becomes key=<Python literal>")]
    + [KeyMapping("training.train_batch_size", arg="train_batch_size", dataset="batch_size")]
    + _args("training", "gradient_accumulation_steps", "max_train_epochs", "max_train_steps", "mixed_precision",
            "seed", "gradient_checkpointing", "xformers", "noise_offset", "noise_offset_random_strength",
            "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount", "min_snr_gamma",
            "min_timestep", "max_timestep", "prior_loss_weight", "ip_noise_gamma", "ip_noise_gamma_random_strength",
            "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "zero_terminal_snr",
            "loss_type", "huber_schedule", "huber_c", "huber_scale", "weighted_captions")
    + [
        KeyMapping("training.num_processes", accelerate="num_processes",
                   note="accelerate launch --num_processes N (with --multi_gpu when N > 1)"),
        KeyMapping("training.vram_gb", unsupported="loracli's VRAM estimate; sd-scripts has no such option"),
        KeyMapping("training.full_bf16", arg="full_bf16"),
        KeyMapping("training.full_fp16", arg="full_fp16"),
        KeyMapping("training.fp8_base", arg="fp8_base"),
        KeyMapping("training.fp8_base_unet", arg="fp8_base_unet"),
        KeyMapping("training.torch_compile", arg="torch_compile"),
        KeyMapping("training.dynamo_backend", arg="dynamo_backend",
                   note="loracli accepts the backends current torch runs: inductor, aot_eager, eager, cudagraphs"),
        KeyMapping("training.cache_text_encoder_outputs", arg="cache_text_encoder_outputs",
                   only_script=SDXL_TRAIN_NETWORK,
                   unsupported="train_network.py (SD1.x/2.x) has no --cache_text_encoder_outputs; only the SDXL "
                               "script does"),
        KeyMapping("training.cache_text_encoder_outputs_to_disk", arg="cache_text_encoder_outputs_to_disk",
                   only_script=SDXL_TRAIN_NETWORK,
                   unsupported="train_network.py (SD1.x/2.x) has no --cache_text_encoder_outputs_to_disk; only the "
                               "SDXL script does"),
        KeyMapping("output.output_dir", arg="output_dir",
                   note="loracli makes a run folder inside it; sd-scripts writes into it directly"),
    ]
    + _args("output", "output_name", "save_model_as", "save_precision", "save_every_n_epochs",
            "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps", "training_comment", "no_metadata")
    + [
        KeyMapping("output.save_state_every_n_steps",
                   unsupported="sd-scripts saves state only together with a model file (--save_state) and has no "
                               "separate state interval; use output.save_every_n_steps with --save_state by hand"),
        KeyMapping("output.save_last_n_states",
                   unsupported="only meaningful with output.save_state_every_n_steps (sd-scripts: "
                               "--save_last_n_steps_state counts steps, not states)"),
    ]
    + _args("sample", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
            "sample_sampler")
    + _args("logging", "logging_dir", "log_prefix", "log_with", "log_tracker_name", "wandb_run_name")
    + [
        KeyMapping("dataset.validation_split", dataset="validation_split",
                   note="a [[datasets]] option; loracli holds out exactly the images it does not train on"),
        KeyMapping("dataset.validation_seed", dataset="validation_seed",
                   note="unset: loracli splits with training.seed (sd-scripts: with its random state)"),
    ]
    + _args("training", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")
)

_BY_KEY = {m.key: m for m in MAPPINGS}
_BY_ARG = {m.arg: m.key for m in MAPPINGS if m.arg}
_BY_DATASET = {m.dataset: m.key for m in MAPPINGS if m.dataset}
_BY_NETWORK_ARG = {m.network_arg: m.key for m in MAPPINGS if m.network_arg}

# sd-scripts args export writes that have no loracli key of their own (import may ignore them).
DERIVED_ARGS = {
    "sdpa": "loracli always uses SDPA attention unless training.xformers is set",
    "dataset_config": "the dataset TOML written next to config.toml",
}
# Options only sdxl_train_network.py has: given with a truthy value, they show an input is for SDXL.
SDXL_ONLY_ARGS = tuple(sorted(set(raw_options(SDXL_TRAIN_NETWORK)) - set(raw_options(TRAIN_NETWORK))))


def mapping_for(key: str) -> KeyMapping:
    return _BY_KEY[key]


def key_for_arg(name: str) -> str | None:
    return _BY_ARG.get(name)


def key_for_dataset_key(name: str) -> str | None:
    return _BY_DATASET.get(name)


def key_for_network_arg(name: str) -> str | None:
    return _BY_NETWORK_ARG.get(name)
