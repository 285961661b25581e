"""`loracli config validate|show` and `loracli init`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import tomli_w

from loracli.config.loader import DEFAULT, ResolvedConfig, _flatten, resolve_config
from loracli.errors import ConfigError, Problem
from loracli.lint import Finding, lint_config, lint_network_weights, pickle_checkpoint_finding
from loracli.model_probe import ModelNotFound, ModelProbe, probe_model, resolve_family


DEFAULT_CONFIG = Path("loracli.toml")


def default_config(config: Path | None) -> Path | None:
    """No --config: use ./loracli.toml when there is one (what `loracli init` writes), and say so on
    stderr (stdout may be JSON or TOML that a script reads)."""
    if config is None and DEFAULT_CONFIG.is_file():
        sys.stderr.write(f"using ./{DEFAULT_CONFIG} (no --config given)\n")
        return DEFAULT_CONFIG
    return config


def _raise(findings: list[Finding]) -> None:
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ConfigError([Problem(f.key, f"[{f.code}] {f.message}", f.hint) for f in errors])


def validate(resolved: ResolvedConfig) -> None:
    """The config checks of `loracli plan` (model family included), without the dataset.

    A model that is not on this machine is not an error here (a config may be checked before it
    moves to the machine that trains); `loracli plan` requires it."""
    config = resolved.config
    _raise([f for f in [pickle_checkpoint_finding(config)] if f])
    try:
        probe: ModelProbe | None = probe_model(config.model.pretrained_model_name_or_path)
    except ModelNotFound as exc:
        probe = None
        print(f"note: {exc.problems[0].render()}")
    choice = resolve_family(config.model, probe)
    findings = lint_config(config, choice.family, resolved.origins)
    _raise(findings)
    if config.network.network_weights is not None and config.network.network_weights.is_file():
        findings += lint_network_weights(config, choice.family)
        _raise(findings)
    for f in findings:
        print(f.render())
    print(f"model: {choice.family.title} ({choice.how})")
    print(f"{resolved.config_path}: ok ({len(findings)} warning(s); the dataset is checked by `loracli plan`)")


def resolved_toml(resolved: ResolvedConfig) -> str:
    """The resolved config as TOML (unset optional values are left out: TOML has no null)."""
    return tomli_w.dumps(resolved.config.model_dump(mode="json", exclude_none=True))


def show(config: Path | None, presets: list[str], overrides: list[str], explain: bool) -> None:
    resolved = resolve_config(default_config(config), presets, overrides)
    if not explain:
        print(resolved_toml(resolved), end="")
        return
    print(explained_toml(resolved), end="")


def explained_toml(resolved: ResolvedConfig) -> str:
    """Every option of every section, in schema order, with its value and where it came from; an
    option with no value is a commented line marked unset, so the list is complete and still TOML."""
    from loracli.config.schema import SECTIONS

    data = resolved.config.model_dump(mode="json")
    out: list[str] = []
    for section, model in SECTIONS.items():
        out.append(f"[{section}]")
        for key, field in model.model_fields.items():
            value = data[section][key]
            dotted = f"{section}.{key}"
            if isinstance(value, dict) and value:  # optimizer_args: one line per argument
                for sub, sub_value in _flatten(value, f"{key}.").items():
                    out.append(f"{toml_line(sub, sub_value):<60} # {resolved.origin(f'{section}.{sub}')}")
                continue
            origin = resolved.origin(dotted)
            if value is None:
                meaning = f"unset ({field.description})" if field.description else "unset"
                out.append(f"{'# ' + key + ' =':<60} # {meaning}")
            else:
                out.append(f"{toml_line(key, value):<60} # {origin}")
        out.append("")
    out += _explained_datasets(resolved)
    return "\n".join(out) + "\n"


def _explained_datasets(resolved: ResolvedConfig) -> list[str]:
    """[[datasets]] as set (unset keys fall back to the dataset, then [dataset]), with where they came from."""
    out: list[str] = []
    origin = resolved.origin("datasets")
    for entry in resolved.config.datasets:
        out.append("[[datasets]]" + " " * 48 + f"# {origin}")
        out += [toml_line(k, v) for k, v in entry.model_dump(mode="json", exclude_none=True).items() if k != "subsets"]
        for subset in entry.subsets:
            out.append("[[datasets.subsets]]")
            out += [toml_line(k, v) for k, v in subset.model_dump(mode="json", exclude_none=True).items()]
        out.append("")
    return out


def toml_line(key: str, value: Any) -> str:
    # Dotted keys (optimizer_args.decouple) are valid TOML, so each leaf is one line.
    return f"{key} = {toml_value(value)}"


def toml_value(value: Any) -> str:
    """A value as one line of TOML (tomli_w spreads arrays over several lines)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"x": value}).strip().removeprefix("x = ")


STARTER = '''# loracli config. Values use sd-scripts' option names; see `loracli config show --explain`.
# Paths are relative to this file. Presets (loracli presets list) fill in the rest:
#   loracli plan  --preset dadapt-v3 --config loracli.toml
#   loracli train --preset dadapt-v3 --config loracli.toml

[model]
# A diffusers model folder, an SD1.x/2.x/SDXL .safetensors file, a model id already in the
# Hugging Face cache, or "tiny:sd15" / "tiny:sdxl" (tiny random models for smoke tests on a CPU).
# SDXL is detected from the model (or set sdxl = true); SD2.x: v2 = true (and v_parameterization = true
# for 768-v models).
pretrained_model_name_or_path = "tiny:sd15"
# clip_skip = 2                 # 2 for NAI-derived anime models

[dataset]
# The PARENT of folders named <repeats>_<name>, e.g. dataset/1_mychar/001.png + 001.txt
# (folders with their own options or resolutions: replace train_data_dir by sd-scripts' dataset config,
#  [[datasets]] with [[datasets.subsets]] image_dir = "...", num_repeats = 10, ...; see the README)
train_data_dir = "dataset"
# reg_data_dir = "reg"
resolution = 512
enable_bucket = true
caption_extension = ".txt"
# shuffle_caption = true
# keep_tokens = 1

[network]
# algo = "lora"                 # lora, locon, loha, lokr
# network_dim = 32
# network_alpha = 16

[training]
max_train_epochs = 10
# train_batch_size = 2
# seed = 42

[output]
output_name = "my-lora"
output_dir = "runs"
# save_every_n_epochs = 2

# [sample]                      # sample images in RUN/samples/ and samples/grid.png
# sample_prompts = "prompts.txt" # one prompt per line: text --n negative --w 512 --h 768 --d 42 --s 28
# sample_every_n_epochs = 1
# sample_sampler = "euler_a"
'''


def write_starter(directory: Path, force: bool) -> None:
    target = directory / "loracli.toml"
    if target.exists() and not force:
        raise ConfigError(Problem(str(target), "already exists", "pass --force to overwrite"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dataset").mkdir(exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(STARTER, encoding="utf-8")
    tmp.replace(target)
    print(f"wrote {target}; put images in {directory / 'dataset'}/<repeats>_<name>/ and run "
          f"`loracli plan --config {target}`")
