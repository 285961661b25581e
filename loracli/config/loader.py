"""Resolve a config from its layers and report every problem at once.

Layers, lowest first: built-in defaults < presets (left to right) < config
file < --set. Each leaf remembers which layer set it, so errors and
`config show --explain` can say where a value came from.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loracli.config.presets import Preset, load_preset
from loracli.config.schema import SECTIONS, LoracliConfig, all_keys
from loracli.errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Paths in a config file are relative to that file, so a config and its
# dataset can move together; paths given with --set are relative to the cwd.
PATH_KEYS = {
    "dataset.train_data_dir",
    "dataset.reg_data_dir",
    "dataset.conditioning_data_dir",
    "network.network_weights",
    "output.output_dir",
    "sample.sample_prompts",
    "logging.logging_dir",
}
DEFAULT = "default"


@dataclass(frozen=True)
class Layer:
    label: str  # "preset NAME", "file PATH", "--set"
    values: dict[str, Any]  # nested by section
    path: Path | None = None


@dataclass
class ResolvedConfig:
    config: LoracliConfig
    origins: dict[str, str]  # dotted key -> layer label (absent = default)
    layers: list[Layer] = field(default_factory=list)
    presets: list[Preset] = field(default_factory=list)
    config_path: Path | None = None

    def origin(self, dotted: str) -> str:
        return self.origins.get(dotted, DEFAULT)


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a one-line config error."""
    if not path.is_file():
        found = "is not a regular file" if path.exists() else "not found"
        raise ConfigError(Problem(str(path), f"{what} {found}", hint="check the path"))
    try:
        # utf-8-sig: Windows editors often start a file with a byte-order mark, which TOML does not allow
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(Problem(str(path), f"{what} is not UTF-8 text", hint="re-save it as UTF-8")) from None
    except OSError as exc:
        raise ConfigError(Problem(str(path), f"cannot read the {what} ({exc.strerror})", "check its permissions")) \
            from None
    except RecursionError:
        raise ConfigError(Problem(str(path), f"{what} is nested too deeply")) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            Problem(str(path), f"malformed TOML: {exc}", hint="see https://toml.io for the syntax")
        ) from None


def parse_set(item: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as a TOML value, else as a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(
            Problem(f"--set {item}", "expected section.key=value", hint="e.g. --set training.max_train_epochs=10")
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: nest(rest, value) if rest else value}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key; tables inside a section (optimizer_args) flatten too."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_paths(values: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        table = out.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            p = Path(table[key]).expanduser()
            table[key] = os.path.normpath(p if p.is_absolute() else (base_dir / p))  # no jobs/../runs
    datasets = out.get("datasets")
    if isinstance(datasets, list):  # [[datasets.subsets]] image_dir, relative to the file like the keys above
        out["datasets"] = [_resolve_subset_dirs(d, base_dir) if isinstance(d, dict) else d for d in datasets]
    return out


def _resolve_subset_dirs(dataset: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    dataset = _resolve_folder_keys(dataset, ("conditioning_data_dir",), base_dir)
    subsets = dataset.get("subsets")
    if not isinstance(subsets, list):
        return dataset
    resolved = [_resolve_folder_keys(subset, ("image_dir", "conditioning_data_dir"), base_dir)
                if isinstance(subset, dict) else subset for subset in subsets]
    return {**dataset, "subsets": resolved}


def _resolve_folder_keys(table: dict[str, Any], keys: tuple[str, ...], base_dir: Path) -> dict[str, Any]:
    for key in keys:
        if isinstance(table.get(key), str):
            p = Path(table[key]).expanduser()
            table = {**table, key: os.path.normpath(p if p.is_absolute() else (base_dir / p))}
    return table


def _did_you_mean(section: str | None, key: str) -> str:
    keys = all_keys()
    if section is None:  # an unknown top-level name
        close = difflib.get_close_matches(key, list(keys), n=1)
        if close:
            return f"did you mean [{close[0]}]?"
        home = [s for s, names in keys.items() if key in names]
        if home:
            return f"{key} belongs in the [{home[0]}] section"
        return f"valid sections: {', '.join(keys)}"
    names = keys.get(section, [])
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {section}.{close[0]}?"
    home = [s for s, n in keys.items() if key in n]
    if home:
        return f"{key} belongs in the [{home[0]}] section ({home[0]}.{key})"
    return f"see `loracli config show --explain` for the keys of [{section}]"


# pydantic names the union member it tried in `loc` (`optimizer_args.d0.float`,
# `train_batch_size.constrained-int`, `resolution.tuple[int, int]`); those are not keys.
_TYPE_NAMES = {"bool", "int", "float", "str", "none"}
_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _key_loc(loc: tuple) -> list[str]:
    """The config key an error is about: section and key, then table keys up to the first union tag or index."""
    if loc and loc[0] == "datasets":  # datasets[0].subsets[1].image_dir: one part, indices in brackets
        return [_datasets_key(loc)]
    out: list[str] = []
    for i, part in enumerate(loc):
        if i >= 2 and (isinstance(part, int) or not _KEY_PART.match(str(part)) or str(part) in _TYPE_NAMES):
            break
        out.append(str(part))
    return out


def _datasets_key(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY_PART.match(str(part)) and str(part) not in _TYPE_NAMES:
            out += f".{part}" if out else str(part)
        else:
            break
    return out


def _problems_from_errors(errors: list[dict[str, Any]], origins: dict[str, str], layers: list[Layer]) -> list[Problem]:
    """One problem per key: a value that fails every member of a union gives one line, not one per member."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        by_key.setdefault(".".join(_key_loc(err["loc"])), []).append(err)
    problems = []
    for group in by_key.values():
        # A value of the right type but a bad value says the most ("finite number", "greater than"...).
        telling = [e for e in group if not e["type"].endswith(("_type", "_parsing"))]
        err = dict((telling or group)[0])
        if len(group) > 1 and not telling:
            err["msg"] = "has the wrong type"
        err["loc"] = tuple(_key_loc(err["loc"])) or err["loc"]
        problems.append(_problem_from_error(err, origins, layers))
    return problems


def _problem_from_error(err: dict[str, Any], origins: dict[str, str], layers: list[Layer]) -> Problem:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    inner = [label for key, label in origins.items() if key.startswith(dotted + ".")]  # a table value
    origin = origins.get(dotted) or (inner[-1] if inner else None) or origins.get(".".join(loc[:2])) or DEFAULT
    where = dotted
    for layer in layers:  # name the file that holds the bad value
        if layer.label == origin and layer.path is not None:
            where = f"{layer.path}: {dotted}"
    kind = err["type"]
    if kind == "extra_forbidden" and dotted.startswith("datasets"):
        return Problem(where, "unknown key", hint=_datasets_hint(dotted), origin=origin)
    if kind == "extra_forbidden":
        section = loc[0] if len(loc) > 1 else None
        return Problem(where, "unknown key", hint=_did_you_mean(section, loc[-1]), origin=origin)
    if kind == "missing" and dotted.startswith("datasets"):
        table = "[[datasets.subsets]]" if ".subsets[" in dotted else "[[datasets]]"
        return Problem(where, "required but not set", hint=f"add `{dotted.rsplit('.', 1)[-1]} = ...` to that "
                       f"{table} table", origin=origin)
    if kind == "missing":
        if len(loc) == 1 and loc[0] in SECTIONS:  # a whole section is absent: name the key it needs
            required = [k for k, f in SECTIONS[loc[0]].model_fields.items() if f.is_required()]
            if required:
                return Problem(f"{where}.{required[0]}", "required but not set",
                               hint=f"add `{required[0]} = ...` under [{loc[0]}]")
        return Problem(where, "required but not set", hint=f"add `{loc[-1]} = ...` under [{loc[0]}]")
    message = err["msg"].removeprefix("Value error, ")
    return Problem(where, f"{message} (got {err.get('input')!r})", origin=origin)


def _datasets_hint(dotted: str) -> str:
    from loracli.config.schema import DatasetEntry, SubsetSection

    key = dotted.rsplit(".", 1)[-1]
    in_subset = ".subsets[" in dotted
    names = list((SubsetSection if in_subset else DatasetEntry).model_fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    if key in SECTIONS["dataset"].model_fields:
        return f"{key} is run-wide: set it under [dataset]" if in_subset or key not in DatasetEntry.model_fields \
            else f"{key} is a dataset option: set it in the [[datasets]] table, not in a subset"
    if in_subset and key in DatasetEntry.model_fields:
        return f"{key} is a dataset option: set it in the [[datasets]] table, not in a subset"
    return f"valid keys: {', '.join(names)}"


def resolve_config(
    config_path: Path | None = None,
    presets: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
) -> ResolvedConfig:
    """Build the validated config from presets, a config file and --set items."""
    layers: list[Layer] = []
    loaded: list[Preset] = []
    problems: list[Problem] = []
    _check_preset_folders(presets)
    for name in presets:
        preset = load_preset(name)
        loaded.append(preset)
        layers.append(Layer(f"preset {preset.name}", preset.values, preset.path))
    if config_path is not None:
        values = read_toml(config_path)
        values = _resolve_paths(values, config_path.resolve().parent)
        layers.append(Layer(f"file {config_path}", values, config_path))
    set_values: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_set(item)
        if key in PATH_KEYS and isinstance(value, str):
            value = os.path.normpath(Path(value).expanduser().absolute())
        set_values = _merge(set_values, nest(key, value))
    if set_values:
        layers.append(Layer("--set", set_values))

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        for section, table in layer.values.items():
            if section in SECTIONS and not isinstance(table, dict):
                problems.append(Problem(f"{layer.path or layer.label}: {section}", "must be a [section] table"))
        merged = _merge(merged, layer.values)
        origins.update({k: layer.label for k in _flatten(layer.values)})
    if problems:
        raise ConfigError(problems)
    # the data is named by dataset.train_data_dir or by [[datasets]]: one of them is required
    dataset_table = merged.get("dataset")
    no_data = [] if merged.get("datasets") or (isinstance(dataset_table, dict) and "train_data_dir" in dataset_table) \
        else [Problem("dataset.train_data_dir", "required but not set",
                      hint="add `train_data_dir = ...` under [dataset] (the parent of <repeats>_<name> folders), "
                      "or list the folders as [[datasets]] with [[datasets.subsets]]")]
    try:
        config = LoracliConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_problems_from_errors(exc.errors(), origins, layers) + no_data) from None
    if no_data:
        raise ConfigError(no_data)
    return ResolvedConfig(_absolute_paths(config), origins, layers, loaded, config_path)


def _check_preset_folders(presets: list[str] | tuple[str, ...]) -> None:
    """LORACLI_PRESETS naming a folder that is not there is an error, not a silently shorter search path."""
    if not presets:
        return
    for entry in os.environ.get("LORACLI_PRESETS", "").split(os.pathsep):
        if entry and not Path(entry).expanduser().is_dir():
            found = "is not a folder" if Path(entry).expanduser().exists() else "folder not found"
            raise ConfigError(Problem(f"LORACLI_PRESETS: {entry}", found,
                                      "point it at folders of preset .toml files (separated by "
                                      f"{os.pathsep!r}), or unset it"))


def _absolute_paths(config: LoracliConfig) -> LoracliConfig:
    """Defaults like output_dir = "output" are relative to the cwd: pin them, so the
    resolved config (written to the run folder) means the same from anywhere."""
    updates: dict[str, Any] = {}
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value is not None and not value.is_absolute():
            updates.setdefault(section, {})[key] = Path(os.path.normpath(value.absolute()))
    for section, values in updates.items():
        config = config.model_copy(update={section: getattr(config, section).model_copy(update=values)})
    if any(not s.image_dir.is_absolute() for d in config.datasets for s in d.subsets):
        datasets = [d.model_copy(update={"subsets": [
            s.model_copy(update={"image_dir": Path(os.path.normpath(s.image_dir.absolute()))}) for s in d.subsets]})
            for d in config.datasets]
        config = config.model_copy(update={"datasets": datasets})
    return config
