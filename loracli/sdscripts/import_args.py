"""sd-scripts `train_network.py` arguments -> loracli values.

The input is a dict of argument name -> value, from a `--config_file` TOML
(typed values) or a command line (text; True for flags; lists for nargs
options), for one script: train_network.py or sdxl_train_network.py (the
caller tells which; SDXL-only options, clip_skip and text_encoder_lr lists
depend on it). Names map through the exporter's table (`options.key_for_arg`),
so export and import read the same mapping. The network and optimizer
arguments, which pack several loracli keys into `key=value` items, are
unpacked here.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from loracli.config.schema import OptimizerArg
from loracli.network_blocks import BLOCK_KEYS, LORAPLUS_KEYS, parse_network_item
from loracli.sdscripts.import_result import ImportResult
from loracli.sdscripts.lycoris_targets import PRESETS, preset_named
from loracli.sdscripts.options import (
    SDXL_TRAIN_NETWORK,
    TRAIN_NETWORK,
    int_or_float,
    key_for_arg,
    key_for_dataset_key,
    key_for_network_arg,
    load_option_table,
    mapping_for,
    parse_network_arg,
    parse_optimizer_arg,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LORACLI_ALGOS = ("lora", "locon", "loha", "lokr")

# Why common train_network.py options have no loracli key (the rest get a generic reason).
REASONS: dict[str, str] = {
    "lowram": "memory tuning of sd-scripts; loracli manages memory itself",
    "highvram": "memory tuning of sd-scripts; loracli manages memory itself",
    "max_data_loader_n_workers": "data-loader tuning of sd-scripts; loracli picks its own workers",
    "persistent_data_loader_workers": "data-loader tuning of sd-scripts; loracli picks its own workers",
    "mem_eff_attn": "loracli uses SDPA attention (or xformers with training.xformers)",
    "disable_mmap_load_safetensors": "a model-loading speed switch of sd-scripts; loracli loads models its own way",
    "save_state": "loracli saves training states on a step interval: set output.save_state_every_n_steps",
    "save_state_on_train_end": "loracli saves training states on a step interval: set output.save_state_every_n_steps",
    "save_last_n_epochs_state": "loracli keeps output.save_last_n_states states",
    "save_last_n_steps_state": "loracli keeps output.save_last_n_states states",
    "resume": "resume a loracli run with `loracli train --resume RUN_DIR`",
    "log_tracker_config": "set logging.log_tracker_name / logging.wandb_run_name instead of a tracker TOML",
    "wandb_api_key": "not copied into a config: log in with `wandb login` or set WANDB_API_KEY",
    "huggingface_token": "loracli does not upload to the Hugging Face Hub (the token is not copied)",
    "vae": "a separate VAE is not supported: put it in the diffusers model folder",
    "in_json": "fine-tuning metadata datasets are not supported: loracli reads <repeats>_<name> folders",
    "dataset_repeats": "only a fallback for dataset-TOML subsets without num_repeats; folders carry their own repeats",
    "output_config": "sd-scripts would write its config and exit; there is nothing to train",
    "lr_scheduler_type": "custom scheduler classes are not supported: use one of loracli's lr_scheduler names",
    "lr_scheduler_args": "custom scheduler classes are not supported: use one of loracli's lr_scheduler names",
    "dim_from_weights": "set network.network_dim to the file's rank with network.network_weights",
    "face_crop_aug_range": "face-crop augmentation is not implemented in loracli",
    "caption_extention": "misspelt alias of caption_extension",
    "mixed_precision_accelerate": "accelerate's own precision flag; loracli uses training.mixed_precision",
}
# Options whose only job is the command line itself.
CLI_ONLY = {"config_file": "read: its values are imported under the command line's",
            "dataset_config": "read: the dataset TOML is imported with the config"}
# Never echo these values into reports.
SECRET = {"wandb_api_key", "huggingface_token"}

NET_ARG_ALIASES = {"use_cp": "use_tucker", "dropout": "network_dropout"}


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value is False


def import_args(args: dict[str, Any], result: ImportResult, *, prefix: str = "",
                labels: dict[str, str] | None = None, script: str = TRAIN_NETWORK,
                base_dir: Path | None = None) -> None:
    """Map every argument into `result`.

    Reports name an argument `prefix + name` ("--" for command lines) unless `labels`
    names it (kohya_ss GUI keys); `labels["network_args.KEY"]` names a network_args item.
    """
    table = load_option_table(script)
    sdxl = script == SDXL_TRAIN_NETWORK
    labels = labels or {}
    name_of = {name: labels.get(name, f"{prefix}{name}") for name in args}
    name_of.update({k: v for k, v in labels.items() if k.startswith("network_args.")})
    rest = dict(args)

    _import_network(rest, result, name_of, base_dir, sdxl)
    _import_optimizer(rest, result, name_of)

    for name, value in rest.items():
        label = name_of[name]
        if name in CLI_ONLY:
            if _is_empty(value):
                result.unset(label)
            continue  # the caller reads these files and accounts for the key
        if name == "caption_extention" and value:
            if "caption_extension" not in args:
                result.set("dataset.caption_extension", value, label)
            else:
                result.skip(label, "misspelt alias; caption_extension is also given")
            continue
        if name == "sdpa":
            if value:
                result.set("training.xformers", False, label)
                result.note(f"{label}: loracli uses SDPA attention unless training.xformers is true")
            else:
                result.unset(label)
            continue
        if name == "lr_warmup_steps":
            _set_warmup(value, result, label)
            continue
        spec = table.get(name)
        dotted = _loracli_key(name) if spec is not None or key_for_arg(name) else None
        if dotted is not None and spec is None and mapping_for(dotted).only_script not in (None, script):
            if _is_empty(value):
                result.unset(label)
            else:
                result.skip(label, f"{script} has no --{name} (an {mapping_for(dotted).only_script} option; "
                                   f"sd-scripts would reject it) (value {value!r})")
            continue
        if dotted == "model.clip_skip" and sdxl and not _is_empty(value):
            result.skip(label, f"{script} ignores clip_skip (it only warns); SDXL uses the penultimate layer of "
                               f"both text encoders, as loracli does (value {value!r})")
            continue
        if dotted is not None:
            if isinstance(value, list) and len(value) == 1 and dotted != "optimizer.optimizer_args":
                value = value[0]  # nargs options (text_encoder_lr) given one value
            elif name == "text_encoder_lr" and isinstance(value, list) and value:
                value = _text_encoder_lrs(value, sdxl, result, label)
            if value is None or value == "" or value == []:
                result.unset(label)
                continue
            if spec is not None and spec.kind == "flag" and isinstance(value, str):
                value = value.strip().lower() not in ("false", "0", "no")
            result.set(dotted, value, label)
            continue
        if _is_empty(value) or (spec is not None and spec.default is not None and _typed(value, spec) == spec.default):
            result.unset(label)
            continue
        if spec is None:
            result.skip(label, "not a train_network.py option (sd-scripts would reject it)")
            continue
        reason = REASONS.get(name, f"loracli has no equivalent of train_network.py --{name}")
        if name not in SECRET:
            reason = f"{reason} (value {value!r})"
        result.skip(label, reason)


def _text_encoder_lrs(values: list[Any], sdxl: bool, result: ImportResult, label: str) -> Any:
    """SD1/2 have one text encoder: train_network.py uses the first value (kohya_ss writes two). SDXL has two:
    loracli keeps one value per encoder, as the input gives them."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return values  # the schema reports it
    if not sdxl:
        if len(set(numbers)) > 1:
            result.note(f"{label}: {values} given; an SD1.x/2.x network uses only the first, {values[0]!r}")
        return values[0]
    if len(numbers) > 2:
        result.note(f"{label}: {values} given; SDXL has two text encoders, the values after the second are ignored")
    first_two = values[:2]
    if len(set(numbers[:2])) == 1:
        return first_two[0]
    result.note(f"{label}: {first_two} kept as one lr per text encoder; note that sd-scripts' networks.lora and "
                f"lycoris.kohya train both SDXL encoders at the first value ({first_two[0]!r})")
    return first_two


def _typed(value: Any, spec: Any) -> Any:
    """Command-line text as the option's type, to compare with its default."""
    if not isinstance(value, str):
        return value
    try:
        return {"int": int, "float": float, "int_or_float": int_or_float}.get(spec.type, str)(value)
    except ValueError:
        return value


def _loracli_key(name: str) -> str | None:
    """The loracli key of a train_network.py option: its own arg row, else the dataset key of the same name
    (caption and bucket options are both), else the folder parents."""
    dotted = key_for_arg(name) or key_for_dataset_key(name)
    if dotted is None and name in ("train_data_dir", "reg_data_dir"):
        dotted = f"dataset.{name}"
    return dotted


def _set_warmup(value: Any, result: ImportResult, label: str) -> None:
    if value is None or value == "":
        result.unset(label)
        return
    try:
        number = int_or_float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        result.skip(label, f"{value!r} is not a step count or a ratio")
        return
    if isinstance(number, float) and number >= 1 and number.is_integer():
        number = int(number)  # sd-scripts reads 100.0 as 100 steps
    result.set("optimizer.lr_warmup_steps", number, label)


# --- network_module + network_args -----------------------------------------------------------------------------


def _network_items(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _import_network(args: dict[str, Any], result: ImportResult, name_of: dict[str, str],
                    base_dir: Path | None = None, sdxl: bool = False) -> None:
    module = args.pop("network_module", None)
    raw_items = args.pop("network_args", None)
    mod_label = name_of.get("network_module", "network_module")
    args_label = name_of.get("network_args", "network_args")
    items: dict[str, str] = {}
    for item in _network_items(raw_items):
        try:
            key, text = parse_network_arg(item)
        except ValueError:
            result.skip(f"{args_label} {item}", "not key=value")
            continue
        items[key] = text

    def item_label(key: str) -> str:
        return name_of.get(f"network_args.{key}", f"{args_label} {key}")

    if raw_items is not None and not items:
        result.unset(args_label)

    if module is None or module == "":
        if module is not None or "network_module" in name_of:
            result.unset(mod_label)
        if items:
            result.note(f"{args_label} given without network_module; read as networks.lora arguments")
        module = "networks.lora" if items or "network_module" not in name_of else None
        if module is None:
            return
        if "network_module" not in name_of:
            result.note("no network_module in the input: sd-scripts requires one; imported as networks.lora (LoRA)")

    if module == "networks.lora":
        result.set("network.network_module", "networks.lora", mod_label)
        kohya_keys = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", *BLOCK_KEYS, *LORAPLUS_KEYS}
        result.set("network.algo", "lora", mod_label)
        if "conv_dim" in items and "conv_alpha" not in items:
            # networks.lora's own default; LyCORIS would take alpha instead
            result.set("network.conv_alpha", 1.0, item_label("conv_dim"))
            result.note(f"{item_label('conv_dim')} without conv_alpha: sd-scripts' networks.lora uses conv_alpha 1")
        for key, text in items.items():
            label = item_label(key)
            if key in kohya_keys:
                _set_network_item(result, key, text, label)
            elif key == "dora_wd":
                result.skip(label, "sd-scripts' networks.lora has no DoRA and ignores dora_wd; DoRA is LyCORIS' "
                                   "(network_module=lycoris.kohya, algo=locon)")
            else:
                result.skip(label, f"networks.lora option {key}={text} is not supported by loracli")
        return

    if module != "lycoris.kohya":
        result.skip(mod_label, f"network module {module!r} is not supported: loracli trains networks.lora "
                               "and lycoris.kohya (LoCon, LoHa, LoKr)")
        for key, text in items.items():
            result.skip(item_label(key), f"belongs to the unsupported network module {module}")
        return

    result.set("network.network_module", "lycoris.kohya", mod_label)
    algo = items.pop("algo", "lora").strip().lower()
    algo_label = item_label("algo")
    if algo == "lora":
        # LyCORIS' "lora" is LoCon: without conv_dim it takes network_dim, and preset=full wraps the 3x3 convs
        algo = "locon"
        result.note(f"{algo_label}: LyCORIS algo=lora also trains the 3x3 convs (conv_dim defaults to "
                    "network_dim), which is loracli's network.algo = \"locon\"")
    if algo in LORACLI_ALGOS:
        result.set("network.algo", algo, algo_label if "algo" in _keys(raw_items) else mod_label)
    else:
        result.skip(algo_label, f"LyCORIS algo {algo!r} is not supported: loracli trains lora, locon, loha, lokr")
    preset = items.pop("preset", None)
    if preset is not None:
        label = item_label("preset")
        if preset in PRESETS:
            result.set("network.lycoris_preset", preset, label)
        elif preset.lower().endswith(".toml"):
            _import_preset_file(preset, algo, base_dir, result, label, sdxl)
        else:
            result.skip(label, f"LyCORIS preset {preset!r} is not supported: loracli has {', '.join(PRESETS)}")
    for key, text in items.items():
        label = item_label(key)
        target = NET_ARG_ALIASES.get(key, key)
        dotted = "network.network_dropout" if target == "network_dropout" else key_for_network_arg(target)
        if key in BLOCK_KEYS:
            result.skip(label, f"{key} is a block-wise option of networks.lora; LyCORIS ignores it")
        elif dotted is None:
            result.skip(label, f"LyCORIS option {key}={text} is not supported by loracli")
        elif key in LORAPLUS_KEYS:
            _set_network_item(result, key, text, label)
        elif dotted == "network.network_dropout" and "network_dropout" in name_of:
            result.skip(label, "network_dropout is also given")
        else:
            result.set(dotted, text, label)


def _set_network_item(result: ImportResult, key: str, text: str, label: str) -> None:
    """A block/LoRA+ network arg: its text as sd-scripts parses it (lists split at commas, shapes by name)."""
    try:
        value = parse_network_item(key, text)
    except ValueError as exc:
        result.skip(label, f"{text!r} is not a valid {key}: {exc}")
        return
    result.set(f"network.{key}", value, label)


def _import_preset_file(preset: str, algo: str, base_dir: Path | None, result: ImportResult, label: str,
                        sdxl: bool = False) -> None:
    """A LyCORIS preset file (what `loracli export` writes): the loracli lycoris_preset whose targets it names, on
    the UNet of the script (SD1/SD2 and SDXL tables differ: lycoris_targets)."""
    candidates = [Path(preset)] + ([base_dir / preset] if base_dir and not Path(preset).is_absolute() else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        result.skip(label, f"the LyCORIS preset file {preset} was not found from here: its targets are unknown")
        return
    try:
        data = tomllib.loads(found.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        result.skip(label, f"the LyCORIS preset file {found} cannot be read ({exc})")
        return
    name = preset_named(data, algo, "sdxl" if sdxl else "sd1")
    if name is not None:
        result.set("network.lycoris_preset", name, label)
        result.note(f"{label}: {found.name} names loracli's targets for {algo} (lycoris_preset = \"{name}\")")
    else:
        result.skip(label, f"the LyCORIS preset file {found} selects other layers than loracli's 'full' targets "
                           "(transformer, ResNet and up/down-sampler blocks; CLIP attention and MLP) and its "
                           f"other lycoris_preset tables for {'SDXL' if sdxl else 'SD1/SD2'}")


def _keys(raw_items: Any) -> set[str]:
    return {item.partition("=")[0].strip() for item in _network_items(raw_items)}


# --- optimizer -------------------------------------------------------------------------------------------------

_OPT_ARG = TypeAdapter(OptimizerArg)


def _import_optimizer(args: dict[str, Any], result: ImportResult, name_of: dict[str, str]) -> None:
    for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if flag not in args:
            continue
        value = args.pop(flag)
        label = name_of[flag]
        if value in (True, "True", "true"):
            if args.get("optimizer_type"):
                result.skip(label, "optimizer_type is also given (sd-scripts refuses both)")
            else:
                result.set("optimizer.optimizer_type", name, label)
        else:
            result.unset(label)
    if "optimizer_args" not in args:
        return
    raw = args.pop("optimizer_args")
    label = name_of["optimizer_args"]
    items = shlex.split(raw) if isinstance(raw, str) else [str(v) for v in (raw or [])]
    if not items:
        result.unset(label)
        return
    parsed: dict[str, Any] = {}
    for item in items:
        try:
            key, value = parse_optimizer_arg(item)
        except ValueError:
            result.skip(f"{label} {item}", "not key=value")
            continue
        try:
            parsed[key] = _OPT_ARG.dump_python(_OPT_ARG.validate_python(value, strict=True), mode="json")
        except ValidationError:
            result.skip(f"{label} {key}", f"{value!r} cannot be written as a TOML optimizer argument")
    if parsed:
        result.set("optimizer.optimizer_args", parsed, label)
