"""`loracli export sd-scripts`: the same run, as the files sd-scripts' train_network.py reads.

SDXL runs (the plan's model family) go to sdxl_train_network.py instead, with its
option table (`options.load_option_table(script)`): the SDXL-only caching options,
32-pixel bucket steps, and no clip_skip (that script ignores it).

`build_export(config, plan)` is pure (no files): it returns the training-args
TOML (for `--config_file`), the dataset TOML (for `--dataset_config`), the
`accelerate launch` options, and every warning and unsupported option.
`write_export` writes config.toml, dataset.toml, train.sh and README-export.txt
atomically, and for LyCORIS networks lycoris_preset.toml (loracli's target
table; network_args' `preset=` names it by absolute path). The sd-scripts
backend (`backend.py`) uses the same two calls.
"""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from loracli.config.schema import SECTIONS, LoracliConfig
from loracli.dataset.images import extension
from loracli.dataset.scan import parse_folder_name
from loracli.errors import ConfigError, Problem
from loracli.family import FAMILIES, SD1, SDXL, ModelFamily
from loracli.network_blocks import extra_network_args
from loracli.plan import Plan
from loracli.rundir import atomic_write_text
from loracli.sdscripts.lycoris_targets import PRESET_FILE, targets_for
from loracli.sdscripts.options import (
    MAPPINGS,
    TRAIN_NETWORK,
    load_option_table,
    optimizer_arg_items,
    script_for,
)
from loracli.sdscripts.unet_layout import layout_differences

CONFIG_FILE = "config.toml"
DATASET_FILE = "dataset.toml"
SCRIPT_FILE = "train.sh"
README_FILE = "README-export.txt"
TRAIN_SCRIPT = TRAIN_NETWORK  # SD1.x/2.x; Export.script names the one a run uses
# Each process's CPU threads; accelerate warns and picks 1 when unset, sd-scripts' docs pass 1.
ACCELERATE_BASE = ["--num_cpu_threads_per_process", "1"]
# Caption and augmentation options go to [general] (they apply to every subset).
SUBSET_LEVEL = {
    "caption_extension", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
    "secondary_separator", "caption_prefix", "caption_suffix", "caption_dropout_rate",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step",
    "flip_aug", "color_aug", "random_crop", "enable_wildcard",
}
# Loss-mask keys sd-scripts' dataset schema has in subsets only (not in [general] or [[datasets]]).
SUBSET_ONLY_KEYS = ("alpha_mask", "conditioning_data_dir")
# One CLIP window: sd-scripts spells this as "no --max_token_length".
TOKEN_WINDOW = 75
LYCORIS_SWITCHES = ("use_tucker", "use_scalar", "train_norm", "rank_dropout_scale")
LORA_ONLY_REASON = 'not used by algo=lora (loracli trains no 3x3 convs with plain LoRA); set network.algo = "locon"'


@dataclass
class Export:
    args: dict[str, dict[str, Any]]  # config.toml: section -> sd-scripts arg -> value
    dataset: dict[str, Any]  # dataset.toml
    num_processes: int
    warnings: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (loracli key, reason)
    notes: list[str] = field(default_factory=list)
    script: str = TRAIN_SCRIPT  # train_network.py or sdxl_train_network.py
    lycoris_preset: dict[str, Any] | None = None  # the LyCORIS target table, written beside the export

    def point_preset_at(self, path: Path) -> None:
        """network_args' `preset=` names the preset file by its absolute path (sd-scripts runs elsewhere)."""
        items = self.args.get("network", {}).get("network_args", [])
        self.args["network"]["network_args"] = [f"preset={path.absolute()}" if i.startswith("preset=") else i
                                                for i in items]

    def flat_args(self) -> dict[str, Any]:
        """What sd-scripts sees: it flattens the sections of a --config_file."""
        return {k: v for section in self.args.values() for k, v in section.items()}


def _value(config: LoracliConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def _default(dotted: str) -> Any:
    section, key = dotted.split(".")
    info = SECTIONS[section].model_fields[key]
    return info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]


def _plain(value: Any) -> Any:
    """TOML-able form: paths absolute, tuples as lists."""
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, tuple):
        return list(value)
    return value


def _scheduler_and_warmup(config: LoracliConfig, exp: Export) -> tuple[str, int | float]:
    opt = config.optimizer
    scheduler, warmup = opt.lr_scheduler, opt.lr_warmup_steps
    if isinstance(warmup, float) and warmup >= 1:
        # sd-scripts reads a float as a ratio of total steps; a whole number of steps must be an int.
        warmup = int(warmup)
        exp.warnings.append(f"optimizer.lr_warmup_steps: written as the integer {warmup} (a float is a ratio)")
    if scheduler == "constant" and warmup:
        # sd-scripts refuses warmup with `constant`; constant_with_warmup is what such a config means.
        exp.warnings.append("optimizer.lr_scheduler: 'constant' with a warmup is refused by sd-scripts; "
                            "exported as 'constant_with_warmup'")
        scheduler = "constant_with_warmup"
    return scheduler, warmup


def _number(value: float) -> str:
    """Network-arg text: whole numbers without '.0', others exactly (no rounding)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _report_changed(net: Any, keys: tuple[str, ...], exp: Export) -> None:
    for key in keys:
        if getattr(net, key) != _default(f"network.{key}"):
            exp.unsupported.append((f"network.{key}", LORA_ONLY_REASON))


def _network(config: LoracliConfig, exp: Export, args: dict[str, Any]) -> None:
    net = config.network
    module = net.module_name
    if net.algo == "lora" and module == "lycoris.kohya":
        # LyCORIS defaults conv_dim to network_dim and its preset=full wraps the ResNet 3x3 convs, which
        # loracli's plain LoRA never trains; kohya's networks.lora wraps the same layers loracli does.
        module = "networks.lora"
        exp.warnings.append("network.network_module: algo=lora is exported as networks.lora; lycoris.kohya "
                            "would also train the 3x3 convs (conv_dim defaults to network_dim there), which "
                            "loracli does not")
    args["network_module"] = module
    items: list[str] = []
    if module == "lycoris.kohya":
        # LyCORIS' own preset=full also wraps conv_in/conv_out/time_embedding and fails on SD UNets
        # ("duplicated lora name"); the file names loracli's targets (write_export makes the path absolute), those
        # of the UNet the script builds (sdxl_train_network.py: sdxl_original_unet.py; else original_unet.py).
        family = SDXL if exp.script == script_for(SDXL.name) else SD1
        exp.lycoris_preset = targets_for(net.algo, net.lycoris_preset, family)
        items += [f"algo={net.algo}", f"preset={PRESET_FILE}"]
        if net.algo == "lora":  # loracli wraps no 3x3 convs for lora, whatever the module
            _report_changed(net, ("conv_dim", "conv_alpha"), exp)
        else:
            if net.conv_dim is not None:
                items.append(f"conv_dim={net.conv_dim}")
            if net.conv_alpha is not None:
                items.append(f"conv_alpha={_number(net.conv_alpha)}")
        items += [f"{name}=True" for name in LYCORIS_SWITCHES if getattr(net, name)]
        if net.algo == "lokr":
            items.append(f"factor={net.factor}")
        elif net.factor != _default("network.factor"):
            exp.unsupported.append(("network.factor", f"only used by algo=lokr, not {net.algo}"))
        if net.lycoris_preset == "full":
            exp.notes.append(f"network.lycoris_preset: {net.lycoris_preset!r} is written as {PRESET_FILE} (loracli's "
                             "target table: the transformer, ResNet and up/down-sampler blocks and the CLIP "
                             "attention/MLP layers), not LyCORIS' preset=full, which lycoris_lora 4.1.3 refuses on "
                             "SD UNets")
        else:
            exp.notes.append(f"network.lycoris_preset: {net.lycoris_preset!r} is written as {PRESET_FILE} (LyCORIS' "
                             "preset of that name as sd-scripts' " + ("SDXL " if family is SDXL else "")
                             + "UNet takes it, naming the layers of both diffusers' and sd-scripts' UNets)")
        exp.notes.append("LyCORIS networks need `pip install lycoris_lora` in the sd-scripts environment")
    elif net.conv_dim is not None:  # networks.lora with conv_dim: kohya's LoRA-C3Lier, as loracli trains it
        items += [f"conv_dim={net.conv_dim}", f"conv_alpha={_number(net.conv_alpha if net.conv_alpha is not None else 1)}"]
        _report_changed(net, ("factor", *LYCORIS_SWITCHES), exp)
    else:
        _report_changed(net, ("conv_dim", "conv_alpha", "factor", *LYCORIS_SWITCHES), exp)
    for key in ("rank_dropout", "module_dropout"):
        value = getattr(net, key)
        if value:
            items.append(f"{key}={_number(value)}")
    # block-wise LoRA, LoRA+ and DoRA as sd-scripts reads them (plan-time rules keep each with its module)
    items += [f"{key}={text}" for key, text in extra_network_args(net).items()]
    if items:
        args["network_args"] = items


def _optimizer_items(args: dict[str, Any], exp: Export) -> list[str]:
    """key=<Python literal> items; sd-scripts splits each on '=', so a value containing one cannot be passed."""
    items = []
    for key, value in args.items():
        (item,) = optimizer_arg_items({key: value})
        if item.count("=") > 1:
            exp.unsupported.append((f"optimizer.optimizer_args.{key}",
                                    "the value contains '=', which sd-scripts' key=value split cannot take"))
            continue
        items.append(item)
    return items


def training_args(config: LoracliConfig, exp: Export, output_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """config.toml for `--config_file`, grouped in loracli's sections (sd-scripts flattens them)."""
    out: dict[str, dict[str, Any]] = {}
    table = load_option_table(exp.script)
    sdxl = exp.script == script_for(SDXL.name)
    for m in MAPPINGS:
        section = m.key.split(".")[0]
        value = _value(config, m.key)
        reason = m.unsupported_for(exp.script)
        if reason:
            if value != _default(m.key):
                exp.unsupported.append((m.key, reason))
            continue
        if not m.arg or m.arg == "network_module":  # written by _network; model.sdxl picks the script
            continue
        if value is None:
            continue
        if m.key == "model.clip_skip" and sdxl:
            exp.warnings.append(f"model.clip_skip: {value} is not written; {exp.script} ignores clip_skip "
                                "(SDXL uses the penultimate layer of both text encoders, as loracli does)")
            continue
        if m.key == "dataset.max_token_length" and value == TOKEN_WINDOW:
            continue  # sd-scripts' unset value means 75; its argparse choices are only 150 and 225
        if m.optimizer_args:
            items = _optimizer_items(value, exp)
            if items:
                out.setdefault(section, {})[m.arg] = items
            continue
        if m.key == "dataset.resolution":
            w, h = config.dataset.resolution_wh
            value = f"{w},{h}"  # sd-scripts splits this string itself; TOML values skip its argparse
        if table[m.arg].kind == "list" and not isinstance(value, (list, tuple)):
            value = [value]  # nargs='*' options (text_encoder_lr): the list argparse itself would produce
        out.setdefault(section, {})[m.arg] = _plain(value)
    _network(config, exp, out.setdefault("network", {}))
    scheduler, warmup = _scheduler_and_warmup(config, exp)
    out["optimizer"]["lr_scheduler"] = scheduler
    out["optimizer"]["lr_warmup_steps"] = warmup
    if not config.training.xformers:
        out["training"]["sdpa"] = True  # loracli's attention; sd-scripts' default is neither
    if output_dir is not None:
        out["output"]["output_dir"] = str(output_dir.absolute())
    if not config.output.output_name:
        exp.notes.append("output.output_name is unset: sd-scripts names the final file last.safetensors, as loracli")
    return {section: out[section] for section in SECTIONS if out.get(section)}


def _subsets(config: LoracliConfig, plan: Plan) -> list[dict[str, Any]]:
    subsets: list[dict[str, Any]] = []
    ds = config.dataset
    for parent, dirs, is_reg in ((ds.train_data_dir, plan.dataset_dirs, False),
                                 (ds.reg_data_dir, plan.reg_dataset_dirs, True)):
        for name, info in dirs.items():
            parsed = parse_folder_name(name)
            if parent is None or parsed is None or not info.get("img_count"):
                continue
            repeats, tokens = parsed
            subsets.append({"image_dir": str((parent / name).absolute()), "num_repeats": repeats,
                            "class_tokens": tokens, "is_reg": is_reg})
    return subsets


def _datasets_toml(config: LoracliConfig) -> dict[str, Any]:
    """[[datasets]]: one to one. [dataset] is [general] (every dataset key it has, batch_size from
    train_batch_size); each dataset and subset writes the keys it sets itself."""
    names = {m.key.split(".", 1)[1]: m.dataset for m in MAPPINGS if m.dataset and m.key.startswith("dataset.")}
    own = {"batch_size": "batch_size", "num_repeats": "num_repeats", "class_tokens": "class_tokens",
           "image_dir": "image_dir", "is_reg": "is_reg"}
    general: dict[str, Any] = {}
    for m in MAPPINGS:
        value = _value(config, m.key) if m.dataset else None
        if value is not None:
            general[m.dataset] = _plain(value)
    datasets = []
    for entry in config.datasets:
        table = {(own | names)[k]: _plain(v) for k, v in entry if k in own | names and v is not None}
        table["subsets"] = [{(own | names)[k]: _plain(v) for k, v in sub if k in own | names and v is not None}
                            for sub in entry.subsets]
        datasets.append(table)
    return {"general": general, "datasets": datasets}


def _subset_only_keys(toml: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts reads alpha_mask and conditioning_data_dir only in subset tables: move them down, written
    where they are on (a masked subset has no alpha_mask key; rules E62/E64 keep the rest consistent)."""
    general = toml["general"]
    defaults = {k: general.pop(k) for k in SUBSET_ONLY_KEYS if k in general}
    for dataset in toml["datasets"]:
        inherited = defaults | {k: dataset.pop(k) for k in SUBSET_ONLY_KEYS if k in dataset}
        for subset in dataset["subsets"]:
            values = inherited | {k: subset.pop(k) for k in SUBSET_ONLY_KEYS if k in subset}
            if values.get("conditioning_data_dir") is not None and not subset.get("is_reg"):
                subset["conditioning_data_dir"] = values["conditioning_data_dir"]
            elif values.get("alpha_mask"):
                subset["alpha_mask"] = True
    return toml


def dataset_toml(config: LoracliConfig, plan: Plan) -> dict[str, Any]:
    """The dataset TOML: caption options in [general], buckets per dataset, one subset per folder."""
    return _subset_only_keys(_dataset_toml(config, plan))


def _dataset_toml(config: LoracliConfig, plan: Plan) -> dict[str, Any]:
    if config.datasets:
        return _datasets_toml(config)
    ds = config.dataset
    general: dict[str, Any] = {}
    dataset: dict[str, Any] = {"resolution": _plain(ds.resolution), "batch_size": config.training.train_batch_size}
    for m in MAPPINGS:
        if not m.dataset or m.key in ("dataset.resolution", "training.train_batch_size"):
            continue
        value = _value(config, m.key)
        if value is None:
            continue
        (general if m.dataset in SUBSET_LEVEL else dataset)[m.dataset] = _plain(value)
    dataset["subsets"] = _subsets(config, plan)
    return {"general": general, "datasets": [dataset]}


def export_family(config: LoracliConfig, plan: Plan) -> ModelFamily:
    """The family the plan found (it detects SDXL from the model); `model.sdxl = true` always means SDXL."""
    return SDXL if config.model.sdxl else FAMILIES[plan.model_family]


def _check_rules(config: LoracliConfig, family: ModelFamily, exp: Export) -> None:
    """Rules sd-scripts enforces at start-up; `loracli plan` checks them too, this guards the export itself."""
    ds = config.dataset
    step = family.bucket_step_multiple
    if ds.bucket_reso_steps % step:
        raise ConfigError(Problem("dataset.bucket_reso_steps",
                                  f"{ds.bucket_reso_steps} is not a multiple of {step}; {exp.script} refuses it "
                                  f"for {family.title or family.name} models", f"use {step}"))
    if family is SDXL and config.model.v2:
        raise ConfigError(Problem("model.v2", f"{exp.script} refuses v2 for SDXL models",
                                  "remove model.v2 (SDXL is not SD 2.x)"))


def _difference_warnings(config: LoracliConfig, plan: Plan, exp: Export) -> None:
    """Where sd-scripts would count or treat the same data differently (reference: 'deliberately differs')."""
    mixed = [Path(i.path) for i in plan.images if (e := extension(Path(i.path).name)) not in (e.lower(), e.upper())]
    if mixed:
        examples = ", ".join(str(p) for p in mixed[:3])
        exp.warnings.append(f"{len(mixed)} image(s) with a mixed-case extension ({examples}) are counted by loracli "
                            "but skipped by sd-scripts on Linux: its steps per epoch will be lower; rename them "
                            "to .png/.jpg")
    family = export_family(config, plan)
    odd = layout_differences(config.model.pretrained_model_name_or_path, family.name)
    if odd:
        exp.warnings.append(f"model.pretrained_model_name_or_path: this diffusers UNet is not laid out like the "
                            f"{family.title} base model ({'; '.join(odd)}); {exp.script} rebuilds that layout and "
                            "cannot load these weights: export with a standard model, or train with loracli")
    if config.model.pretrained_model_name_or_path.startswith("tiny:"):
        exp.warnings.append(f"model.pretrained_model_name_or_path: {config.model.pretrained_model_name_or_path!r} is "
                            "loracli's built-in test model; sd-scripts cannot load it (give a model file or folder)")
    if config.dataset.cache_latents_to_disk:
        exp.warnings.append("dataset.cache_latents_to_disk: sd-scripts' disk caches are not keyed by bucket size "
                            "or VAE; delete the *.npz files next to the images after changing resolution")
    if plan.skipped:
        first = plan.skipped[0]
        exp.warnings.append(f"{len(plan.skipped)} path(s) loracli's scan skipped (e.g. {first['path']}: "
                            f"{first['reason']}) are left out of dataset.toml too; sd-scripts given the parent "
                            "folder as --train_data_dir would treat them its own way")
    te_lrs = config.optimizer.text_encoder_lr
    if isinstance(te_lrs, list) and len(set(te_lrs)) > 1:
        # train_network.py passes a list only to networks with per-encoder lrs; networks.lora and lycoris.kohya
        # have none, so it takes text_encoder_lr[0] for every text encoder.
        exp.warnings.append(f"optimizer.text_encoder_lr: {te_lrs} is written, but sd-scripts' networks.lora and "
                            f"lycoris.kohya train every text encoder at the first value ({te_lrs[0]!r}); loracli "
                            "gives each encoder its own")
    opt = config.optimizer.optimizer_type.lower()
    if opt.startswith("dadapt"):
        exp.notes.append("DAdapt* optimizers need `pip install dadaptation` in the sd-scripts environment "
                         "(not in its requirements.txt)")
    if opt == "prodigy":
        exp.notes.append("Prodigy needs prodigyopt (in sd-scripts' requirements.txt)")


def build_export(config: LoracliConfig, plan: Plan, output_dir: Path | None = None) -> Export:
    family = export_family(config, plan)
    exp = Export(args={}, dataset={}, num_processes=config.training.num_processes, script=script_for(family.name))
    _check_rules(config, family, exp)
    exp.args = training_args(config, exp, output_dir)
    exp.dataset = dataset_toml(config, plan)
    _difference_warnings(config, plan, exp)
    table = load_option_table(exp.script)
    unknown = [k for k in exp.flat_args() if k not in table]
    if unknown:  # a loracli bug, never the user's: every written key must be one sd-scripts accepts
        raise AssertionError(f"export wrote options {exp.script} does not have: {unknown}")
    return exp


def accelerate_options(num_processes: int) -> list[str]:
    opts = list(ACCELERATE_BASE)
    if num_processes > 1:
        opts.append("--multi_gpu")
    return opts + ["--num_processes", str(num_processes)]


def script_args(out_dir: Path, script: str = TRAIN_SCRIPT) -> list[str]:
    return [script, "--config_file", str((out_dir / CONFIG_FILE).absolute()),
            "--dataset_config", str((out_dir / DATASET_FILE).absolute())]


def shell_command(out_dir: Path, num_processes: int, script: str = TRAIN_SCRIPT) -> str:
    return shlex.join(["accelerate", "launch", *accelerate_options(num_processes), *script_args(out_dir, script)])


def _script(out_dir: Path, exp: Export, sd_scripts_dir: Path | None) -> str:
    default = (f'if [ -z "${{SD_SCRIPTS_DIR:-}}" ]; then SD_SCRIPTS_DIR={shlex.quote(str(sd_scripts_dir.absolute()))}; '
               "fi\n" if sd_scripts_dir else "")
    return ("#!/usr/bin/env bash\n"
            f"# Written by `loracli export sd-scripts`. Runs {exp.script} from an sd-scripts checkout\n"
            "# (activate its virtual environment first; SD_SCRIPTS_DIR overrides the checkout).\n"
            "set -euo pipefail\n"
            f"{default}"
            'cd "${SD_SCRIPTS_DIR:?set SD_SCRIPTS_DIR to your sd-scripts checkout}"\n'
            f"{shell_command(out_dir, exp.num_processes, exp.script)}\n")


def config_header(script: str) -> str:
    """config.toml's first line: which script the arguments are for (import reads it back)."""
    return f"# Training arguments for sd-scripts' {script} (--config_file), written by `loracli export sd-scripts`.\n"


def _readme(exp: Export, command: str) -> str:
    lines = [f"Exported by `loracli export sd-scripts` for {exp.script}.", "",
             f"  {CONFIG_FILE}   training arguments (--config_file)",
             f"  {DATASET_FILE}  dataset (--dataset_config)",
             f"  {SCRIPT_FILE}      the command line (set SD_SCRIPTS_DIR or edit its cd line)",
             *([f"  {PRESET_FILE}  LyCORIS targets (network_args preset=...)"] if exp.lycoris_preset else []), "",
             "Command:", f"  {command}", ""]
    lines.append("Not exported (sd-scripts has no equivalent):")
    lines += [f"  - {key}: {reason}" for key, reason in exp.unsupported] or ["  (none)"]
    lines += ["", "Warnings:"]
    lines += [f"  - {w}" for w in exp.warnings] or ["  (none)"]
    lines += ["", "Notes:"]
    lines += [f"  - {n}" for n in exp.notes] or ["  (none)"]
    return "\n".join(lines) + "\n"


def write_export(out_dir: Path, exp: Export, sd_scripts_dir: Path | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if exp.lycoris_preset is not None:
        exp.point_preset_at(out_dir / PRESET_FILE)
        files[PRESET_FILE] = ("# loracli's LyCORIS targets (network_args preset=<this file>), written by "
                              "`loracli export sd-scripts`.\n" + tomli_w.dumps(exp.lycoris_preset))
    files |= {
        CONFIG_FILE: config_header(exp.script) + tomli_w.dumps(exp.args),
        DATASET_FILE: tomli_w.dumps(exp.dataset),
        SCRIPT_FILE: _script(out_dir, exp, sd_scripts_dir),
        README_FILE: _readme(exp, shell_command(out_dir, exp.num_processes, exp.script)),
    }
    written = []
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)
    script = out_dir / SCRIPT_FILE
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return written


def report_lines(exp: Export) -> list[str]:
    """Warnings and unsupported options, one line each, for the terminal."""
    lines = [f"warning: {key}: not exported: {reason}" for key, reason in exp.unsupported]
    lines += [f"warning: {w}" for w in exp.warnings]
    lines += [f"note: {n}" for n in exp.notes]
    return lines
