"""`loracli import FILE`: sd-scripts and kohya_ss configs -> a loracli TOML config.

Inputs (detected from the name and the content):
- an sd-scripts `--config_file` TOML (flat or in sections, which sd-scripts
  flattens), with its `--dataset_config` TOML when given or named inside;
- a kohya_ss GUI LoRA config or preset (JSON);
- a shell script (bash, PowerShell, cmd) with an `accelerate launch ...
  train_network.py ...` (or `sdxl_train_network.py`) command line.

SDXL shows as the script name `sdxl_train_network.py`, `"sdxl": true` in kohya_ss
JSON, or, in an sd-scripts TOML, an option only the SDXL script has (set) or the
first-line comment `loracli export` writes; such imports set `model.sdxl = true`.

Each input becomes sd-scripts arguments, mapped through the exporter's table
(`loracli.sdscripts.options`), so `export` and `import` agree. Every input key
ends up mapped, not imported (with the reason), or listed as empty; the output
TOML starts with that account as comments.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path, PureWindowsPath
from typing import Any

import tomli_w
from pydantic import ValidationError

from loracli.config.loader import PATH_KEYS
from loracli.config.schema import SECTIONS, LoracliConfig
from loracli.errors import ConfigError, DatasetError, Problem
from loracli.sdscripts.import_args import import_args
from loracli.sdscripts.import_dataset import import_dataset_toml
from loracli.sdscripts.import_result import ImportResult
from loracli.sdscripts.options import SDXL_ONLY_ARGS, SDXL_TRAIN_NETWORK, TRAIN_NETWORK

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHELL_SUFFIXES = {".sh", ".bash", ".zsh", ".ps1", ".bat", ".cmd", ".txt"}
KOHYA_SS_MARKERS = {"LoRA_type", "epoch", "max_resolution", "optimizer", "lr_warmup", "model_list"}
SD_SCRIPTS_DEFAULT_STEPS = 1600
SD_SCRIPTS_CAPTION_EXTENSION = ".caption"
REQUIRED = {"model": "model.pretrained_model_name_or_path", "dataset": "dataset.train_data_dir"}
# A comment before the first table that names the SDXL script (what `loracli export` writes).
SDXL_COMMENT_RE = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\n)*?[ \t]*#[^\n]*\bsdxl_train_network\.py\b")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DatasetError(Problem(str(path), f"{what} not found", "check the path"))
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(Problem(str(path), f"{what} is not UTF-8 text",
                                  "import reads sd-scripts TOML, kohya_ss JSON or a shell script")) from None
    except OSError as exc:
        raise DatasetError(Problem(str(path), f"cannot read {what}: {exc.strerror}")) from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(Problem(str(path), f"malformed TOML: {exc}")) from None


def detect_format(path: Path, text: str) -> str:
    """"kohya_ss", "sd-scripts-toml" or "shell"; a one-line error for anything else."""
    from loracli.sdscripts.import_shell import SCRIPT_RE

    suffix = path.suffix.lower()
    stripped = text.lstrip()
    if suffix == ".json" or (suffix not in SHELL_SUFFIXES | {".toml"} and stripped.startswith("{")):
        return "kohya_ss"
    if suffix == ".toml":
        return "sd-scripts-toml"
    if suffix in SHELL_SUFFIXES or SCRIPT_RE.search(text):
        return "shell"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise ConfigError(Problem(str(path), "unknown format: not an sd-scripts TOML, kohya_ss JSON or a shell "
                                             "script with a train_network.py command line",
                                  "name it .toml, .json or .sh")) from None
    return "sd-scripts-toml"


def import_file(path: Path, dataset_config: Path | None = None) -> ImportResult:
    """Read any supported input; raises ConfigError (2) / DatasetError (3, missing files)."""
    text = _read_text(path, "input file")
    dataset_data = None
    if dataset_config is not None:
        dataset_data = _read_dataset(dataset_config)
    fmt = detect_format(path, text)
    if fmt == "kohya_ss":
        result = _from_kohya_ss(path, text, dataset_config, dataset_data)
    elif fmt == "shell":
        result = _from_shell(path, text, dataset_config, dataset_data)
    else:
        result = _from_sd_scripts_toml(path, text, dataset_config, dataset_data)
    _sd_scripts_defaults(result)
    _validate(result)
    return result


def _read_dataset(path: Path) -> dict[str, Any]:
    text = _read_text(path, "dataset config")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(Problem(str(path), f"malformed JSON: {exc}")) from None
    else:
        data = _parse_toml(path, text)
    if not isinstance(data, dict) or not ("datasets" in data or "general" in data):
        raise ConfigError(Problem(str(path), "not an sd-scripts dataset config (no [[datasets]])",
                                  "--dataset-config takes the file sd-scripts reads with --dataset_config"))
    return data


# --- sd-scripts --config_file TOML -----------------------------------------------------------------------------


def flatten_sections(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts flattens one level of sections: [any_name] key = v is just key = v."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _from_sd_scripts_toml(path: Path, text: str, dataset_config: Path | None,
                          dataset_data: dict[str, Any] | None) -> ImportResult:
    data = _parse_toml(path, text)
    if "datasets" in data or "general" in data:
        raise ConfigError(Problem(str(path), "this is an sd-scripts dataset config, not a training config",
                                  f"pass it as --dataset-config {path} with the training config (or script)"))
    if isinstance(data.get("preset"), dict):
        raise ConfigError(Problem(str(path), "this is a loracli preset already", "use it with --preset"))
    if _is_loracli_config(data):
        raise ConfigError(Problem(str(path), "this is a loracli config already",
                                  "check it with `loracli config validate`"))
    result = ImportResult(path, "sd-scripts config TOML")
    args = flatten_sections(data)
    script = _toml_script(text, args, result)
    _import_with_dataset(args, result, prefix="", base_dir=path.parent, dataset_config=dataset_config,
                         dataset_data=dataset_data, script=script)
    return result


def _toml_script(text: str, args: dict[str, Any], result: ImportResult, prefix: str = "") -> str:
    """Which script a --config_file TOML is for: SDXL when an SDXL-only option is set or its comment says so."""
    shown = [name for name in SDXL_ONLY_ARGS if args.get(name) not in (None, False, "", 0)]
    if shown:
        result.set("model.sdxl", True, f"{prefix}{shown[0]}")
        result.note(f"{prefix}{shown[0]} is an option of {SDXL_TRAIN_NETWORK} only: imported as an SDXL config "
                    "(model.sdxl = true)")
        return SDXL_TRAIN_NETWORK
    if SDXL_COMMENT_RE.match(text):
        result.set("model.sdxl", True, f"(comment naming {SDXL_TRAIN_NETWORK})")
        result.note(f"the file's comment names {SDXL_TRAIN_NETWORK}: imported as an SDXL config (model.sdxl = true)")
        return SDXL_TRAIN_NETWORK
    return TRAIN_NETWORK


def _is_loracli_config(data: dict[str, Any]) -> bool:
    if not data or not set(data) <= set(SECTIONS) | {"datasets"} or "model" not in data:
        return False
    try:
        LoracliConfig.model_validate(data)
    except ValidationError:
        return False
    return True


def _import_with_dataset(args: dict[str, Any], result: ImportResult, *, prefix: str, base_dir: Path,
                         dataset_config: Path | None, dataset_data: dict[str, Any] | None,
                         labels: dict[str, str] | None = None, script: str = TRAIN_NETWORK) -> None:
    named = args.get("dataset_config")
    label = (labels or {}).get("dataset_config", f"{prefix}dataset_config")
    if dataset_data is None and isinstance(named, str) and named:
        found = next((p for p in (Path(named), base_dir / named) if p.is_file()), None)
        if found is None:
            result.skip(label, f"{named} was not found from here: pass it with --dataset-config")
        else:
            dataset_config, dataset_data = found, _read_dataset(found)
            result.note(f"read the dataset config {found} named by {label}")
    if dataset_data is not None and named:
        result.mapped[label] = ["(the dataset config, imported)"]
    import_args(args, result, prefix=prefix, labels=labels, script=script, base_dir=base_dir)
    if dataset_data is not None:
        fallbacks = {"caption_extension": args.get("caption_extension") or args.get("caption_extention")
                     or SD_SCRIPTS_CAPTION_EXTENSION,
                     "batch_size": args.get("train_batch_size"),
                     "num_repeats": args.get("dataset_repeats")}
        for key in ("shuffle_caption", "keep_tokens", "flip_aug", "color_aug", "random_crop", "caption_separator",
                    "keep_tokens_separator", "secondary_separator", "caption_prefix", "caption_suffix",
                    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                    "token_warmup_min", "token_warmup_step", "resolution", "enable_bucket", "min_bucket_reso",
                    "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"):
            if args.get(key) is not None:
                fallbacks[key] = args[key]
        _apply_dataset(result, dataset_data, dataset_config, fallbacks, args, prefix, labels)


def _apply_dataset(result: ImportResult, data: dict[str, Any], path: Path | None, fallbacks: dict[str, Any],
                   args: dict[str, Any] | None = None, prefix: str = "", labels: dict[str, str] | None = None) -> None:
    # sd-scripts ignores these when --dataset_config is given.
    for name, dotted in (("train_data_dir", "dataset.train_data_dir"), ("reg_data_dir", "dataset.reg_data_dir"),
                         ("in_json", None)):
        label = (labels or {}).get(name, f"{prefix}{name}")
        if label in result.mapped or label in result.unsupported or (args and name in args):
            if dotted:
                result.drop(dotted)
            result.mapped.pop(label, None)
            result.empty = [k for k in result.empty if k != label]
            result.unsupported[label] = "ignored by sd-scripts when a dataset config is given (the dataset config wins)"
    if "caption_extension" not in fallbacks:
        fallbacks["caption_extension"] = result.get("dataset.caption_extension") or SD_SCRIPTS_CAPTION_EXTENSION
    import_dataset_toml(data, result, where=str(path.name if path else "dataset config"), fallbacks=fallbacks)


# --- kohya_ss GUI JSON ----------------------------------------------------------------------------------------


def _from_kohya_ss(path: Path, text: str, dataset_config: Path | None,
                   dataset_data: dict[str, Any] | None) -> ImportResult:
    from loracli.sdscripts.import_kohya_ss import kohya_ss_args

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(Problem(str(path), f"malformed JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise ConfigError(Problem(str(path), "expected a JSON object of kohya_ss settings"))
    if "datasets" in data or "general" in data:
        raise ConfigError(Problem(str(path), "this is an sd-scripts dataset config, not a training config",
                                  f"pass it as --dataset-config {path} with the training config"))
    if not KOHYA_SS_MARKERS & set(data):
        raise ConfigError(Problem(str(path), "not a kohya_ss LoRA config (no LoRA_type, epoch, optimizer, ...)",
                                  "import reads kohya_ss GUI JSON, sd-scripts TOML or a shell script"))
    result = ImportResult(path, "kohya_ss GUI JSON")
    args, labels = kohya_ss_args(data, result)
    script = SDXL_TRAIN_NETWORK if result.get("model.sdxl") else TRAIN_NETWORK
    _import_with_dataset(args, result, prefix="", base_dir=path.parent, dataset_config=dataset_config,
                         dataset_data=dataset_data, labels=labels, script=script)
    return result


# --- shell scripts --------------------------------------------------------------------------------------------


def _from_shell(path: Path, text: str, dataset_config: Path | None,
                dataset_data: dict[str, Any] | None) -> ImportResult:
    from loracli.sdscripts.import_shell import accelerate_options, find_command

    cmd = find_command(text)
    if cmd is None:
        raise ConfigError(Problem(str(path), "no train_network.py command line found",
                                  "import reads scripts that run `accelerate launch ... train_network.py --...`"))
    result = ImportResult(path, f"{cmd.style} script")
    if cmd.script == SDXL_TRAIN_NETWORK:
        result.set("model.sdxl", True, cmd.script)
    for option, value in accelerate_options(cmd.launcher).items():
        label = f"accelerate --{option}"
        if option == "num_processes":
            result.set("training.num_processes", value, label)
        elif option in ("num_cpu_threads_per_process", "num_machines", "gpu_ids", "main_process_port"):
            result.skip(label, "an accelerate launch setting; loracli runs accelerate itself")
        elif option == "multi_gpu":
            result.mapped[label] = ["training.num_processes"]
        else:
            result.skip(label, "an accelerate launch setting loracli does not pass on")
    for token in cmd.stray:
        result.skip(token, "not part of any --option")
    args = dict(cmd.args)
    for name, what in cmd.unresolved.items():
        args.pop(name, None)
        if what.startswith(("$", "%")) and what[1:].rstrip("%").replace("_", "").isalnum():
            reason = (f"uses {what}, which the script sets in a way import cannot evaluate (a command, an "
                      "expression, or outside the script): set it by hand")
        else:
            reason = f"uses {what}, a command import does not run (it never executes the script): set it by hand"
        result.skip(f"--{name}", reason)
    config_file = args.pop("config_file", None)
    if isinstance(config_file, str):
        found = next((p for p in (Path(config_file), path.parent / config_file) if p.is_file()), None)
        if found is None:
            result.skip("--config_file", f"{config_file} was not found from here; its values are missing")
        else:
            file_text = _read_text(found, "config file")
            file_args = flatten_sections(_parse_toml(found, file_text))
            if cmd.script != SDXL_TRAIN_NETWORK and _toml_script(file_text, file_args, ImportResult(found, "")) \
                    == SDXL_TRAIN_NETWORK:
                result.note(f"{found.name} is written for {SDXL_TRAIN_NETWORK}, but the script runs {cmd.script}")
            args = {**file_args, **args}  # the command line overrides the file, as in sd-scripts
            result.mapped["--config_file"] = ["(read: its values are imported, the command line wins)"]
    _import_with_dataset(args, result, prefix="--", base_dir=path.parent, dataset_config=dataset_config,
                         dataset_data=dataset_data, script=cmd.script)
    return result


# --- defaults, validation, output -----------------------------------------------------------------------------


def _sd_scripts_defaults(result: ImportResult) -> None:
    """Where sd-scripts' defaults differ from loracli's, an unset value must keep sd-scripts' meaning."""
    if not result.has("dataset.caption_extension"):
        result.values.setdefault("dataset", {})["caption_extension"] = SD_SCRIPTS_CAPTION_EXTENSION
        result.note("caption_extension unset: sd-scripts' default .caption is written out (loracli's is .txt)")
    if result.kind.startswith("kohya_ss") and not (result.has("training.max_train_epochs")
                                                   or result.has("training.max_train_steps")):
        pass  # a GUI preset without "epoch" keeps the GUI's value, not sd-scripts' default: rule E9 says so
    elif not result.has("training.max_train_epochs") and not result.has("training.max_train_steps"):
        result.values.setdefault("training", {})["max_train_steps"] = SD_SCRIPTS_DEFAULT_STEPS
        result.note(f"no max_train_epochs or max_train_steps: sd-scripts' default of {SD_SCRIPTS_DEFAULT_STEPS} "
                    "steps is written out")
    datasets = result.values.get("datasets") or []
    every_dataset_sized = bool(datasets) and all(isinstance(d, dict) and "resolution" in d for d in datasets)
    if not result.has("dataset.resolution") and not every_dataset_sized:
        result.note("no resolution: sd-scripts requires one; loracli's default 512 applies")
    relative = [d for d in PATH_KEYS if isinstance(result.get(d), str) and not _absolute(result.get(d))]
    if relative:
        result.note(f"relative paths ({', '.join(sorted(relative))}) are kept as written; loracli reads them "
                    "relative to the imported TOML's folder (sd-scripts: the folder it was started in)")


def _absolute(text: str) -> bool:
    return Path(text).is_absolute() or PureWindowsPath(text).is_absolute() or text.startswith("~")


def _validate(result: ImportResult) -> None:
    """Drop values the schema or the config rules refuse into 'not imported'; name missing required keys."""
    for err in _drop_schema_errors(result):
        if err["type"] == "missing":
            dotted = ".".join(str(p) for p in err["loc"])
            dotted = REQUIRED.get(dotted, dotted)  # a whole missing section: name its required key
            result.note(f"{dotted} is required and the input does not set it: add it before training")
    if not result.has("dataset.train_data_dir") and not result.values.get("datasets"):
        result.note("dataset.train_data_dir is required and the input does not set it (nor a dataset config): "
                    "add it before training")
    _apply_rules(result)


def _refuse(result: ImportResult, dotted: str, reason: str) -> None:
    """Take a value back out: the input keys that only fed it become 'not imported'."""
    result.drop(dotted)
    for label, targets in list(result.mapped.items()):
        if dotted in targets:
            targets.remove(dotted)
            if not targets:
                del result.mapped[label]
                result.unsupported[label] = reason


def _drop_schema_errors(result: ImportResult) -> list[dict[str, Any]]:
    """Ranges and choices the schema refuses; returns what is left (missing required keys)."""
    errors: list[dict[str, Any]] = []
    for _ in range(len(result.mapped) + 1):
        try:
            LoracliConfig.model_validate(result.values)
            return []
        except ValidationError as exc:
            errors = list(exc.errors())
        dropped = False
        for err in errors:
            loc = [str(p) for p in err["loc"]]
            dotted = ".".join(loc[:2])
            if err["type"] == "missing" or len(loc) < 2 or not result.has(dotted):
                continue
            message = err["msg"].removeprefix("Value error, ")
            _refuse(result, dotted, f"{result.get(dotted)!r} is refused by loracli's {dotted}: {message}")
            dropped = True
        if not dropped:
            break
    return errors


# Stand-ins for missing required keys, so the config rules can still be checked (never written out).
_PLACEHOLDERS = {"model": {"pretrained_model_name_or_path": "x"}, "dataset": {"train_data_dir": "x"}}


def _apply_rules(result: ImportResult) -> None:
    """loracli's config rules (`loracli config validate`): a value they refuse is not imported, with the reason."""
    from loracli.family import family_for
    from loracli.lint import lint_config

    for _ in range(8):
        values = {s: dict(t) if isinstance(t, dict) else t for s, t in result.values.items()}
        for section, table in _PLACEHOLDERS.items():
            for key, value in table.items():
                if not (section == "dataset" and values.get("datasets")):  # [[datasets]] name the data
                    values.setdefault(section, {}).setdefault(key, value)
        try:
            config = LoracliConfig.model_validate(values)
        except ValidationError:
            return
        family = family_for(config.model.v2, config.model.sdxl)
        errors = [f for f in lint_config(config, family, {}) if f.level == "error"]
        fixable = [f for f in errors if result.has(f.key)]
        for finding in errors:
            if finding not in fixable:
                result.note(f"{finding.key}: [{finding.code}] {finding.message}; {finding.hint}")
        if not fixable:
            return
        for finding in fixable:
            _refuse(result, finding.key, f"{result.get(finding.key)!r} breaks loracli's rule {finding.code}: "
                                         f"{finding.message} ({finding.hint})")


IMPORTED_HEADER = "# Imported by `loracli import` from "
NOT_IMPORTED_RE = re.compile(r"^# Not imported \((\d+)\):$")


def imported_account(config_path: Path | None) -> list[str]:
    """For a config `loracli import` wrote: one line per input option it did not import (read back from the
    comments on top), so `loracli plan` can name them. Empty for any other file."""
    if config_path is None:
        return []
    try:
        with open(config_path, encoding="utf-8-sig") as f:
            head = [line.rstrip("\n") for line in _comment_block(f)]
    except (OSError, UnicodeDecodeError):
        return []
    if not head or not head[0].startswith(IMPORTED_HEADER):
        return []
    source = head[0].removeprefix(IMPORTED_HEADER).rstrip(".")
    for i, line in enumerate(head):
        if m := NOT_IMPORTED_RE.match(line):
            items = [item.removeprefix("#").strip() for item in head[i + 1:i + 1 + int(m.group(1))]]
            return [f"not imported from {source}: {item}" for item in items if item]
    return []


def _comment_block(lines: Any) -> Any:
    for line in lines:
        if not line.startswith("#"):
            return
        yield line


def render_toml(result: ImportResult) -> str:
    lines = [f"{IMPORTED_HEADER}{result.source.name} ({result.kind}).",
             "# Paths are kept as written in the input. Check with: loracli config validate THIS_FILE"]
    if result.unsupported:
        lines += ["#", f"# Not imported ({len(result.unsupported)}):"]
        lines += [f"#   {key}: {reason}" for key, reason in result.unsupported.items()]
    if result.empty:
        lines += ["#", f"# Empty, off or at the default in the input, nothing to import ({len(result.empty)}):"]
        lines += _wrap(", ".join(result.empty), "#   ")
    if result.notes:
        lines += ["#", "# Notes:"]
        lines += [f"#   - {note}" for note in result.notes]
    body = tomli_w.dumps(result.ordered_values())
    return "\n".join(lines) + "\n\n" + body


def _wrap(text: str, prefix: str, width: int = 116) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width - len(prefix):
            out.append(prefix + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(prefix + line)
    return out


def report_lines(result: ImportResult) -> list[str]:
    """The account for the terminal: what was not imported and the notes."""
    lines = [f"{result.source}: {result.kind}, {len(result.mapped)} key(s) imported"]
    lines += [f"not imported: {key}: {reason}" for key, reason in result.unsupported.items()]
    if result.empty:
        lines.append(f"empty, off or default in the input: {', '.join(result.empty)}")
    lines += [f"note: {note}" for note in result.notes]
    return lines
