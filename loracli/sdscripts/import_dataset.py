"""An sd-scripts `--dataset_config` TOML -> loracli's [dataset] and [[datasets]] / [[datasets.subsets]].

The mapping is one to one: sd-scripts' [general] becomes [dataset] (its batch_size is
training.train_batch_size), every [[datasets]] and [[datasets.subsets]] table becomes the
same table in loracli, with the same keys. What loracli does not do (fine-tuning metadata
datasets, per-dataset network multipliers, ...) is reported with the reason.
"""

from __future__ import annotations

from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from loracli.config.schema import GENERAL_ONLY_KEYS, DatasetEntry, SubsetSection
from loracli.dataset.scan import parse_folder_name
from loracli.sdscripts.import_result import ImportResult, parse_resolution
from loracli.sdscripts.options import key_for_dataset_key

# Keys loracli has no equivalent for, with the reason.
NOT_SUPPORTED = {
    "network_multiplier": "per-dataset network multipliers are not supported",
    "resize_interpolation": "loracli resizes with its own interpolation (area down, lanczos up)",
    "face_crop_aug_range": "face-crop augmentation is not implemented in loracli",
    "custom_attributes": "custom subset attributes are not supported",
    "cache_info": "loracli scans the folders itself (no metadata_cache.json)",
    "metadata_file": "fine-tuning (metadata) datasets are not supported: loracli reads image folders",
}
# Values that mean "off", so an unsupported key set to one of them loses nothing.
OFF_VALUES = (None, False, 0, 0.0, "", {}, [])
# [general] keys loracli's [dataset] has no key for: they become every dataset's default.
PUSHED_DOWN = ("num_repeats", "class_tokens")


def _typed(model: Any, key: str, value: Any) -> Any:
    """A TOML value as the [[datasets]] schema takes it; ValueError names what is wrong."""
    if key == "resolution":
        return parse_resolution(value)
    if key in ("image_dir", "conditioning_data_dir"):
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a folder path")
        return value
    info = model.model_fields[key]  # its ranges too (keep_tokens >= 0, ...)
    adapter = TypeAdapter(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation)
    try:
        return adapter.dump_python(adapter.validate_python(value), mode="json")
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


def _copy_keys(table: dict[str, Any], model: Any, out: dict[str, Any], label: str, result: ImportResult,
               skip: tuple[str, ...] = ()) -> None:
    """The keys of one [[datasets]] or subset table that the loracli table has, checked; the rest reported."""
    for key, value in table.items():
        if key in skip:
            continue
        where = f"{label}.{key}"
        if key in model.model_fields:
            if value is None:
                result.unset(where)
                continue
            try:
                out[key] = _typed(model, key, value)
            except ValueError as exc:
                result.skip(where, f"{value!r} is not valid here: {exc}")
                continue
            result.mapped.setdefault(where, []).append(where.split(": ", 1)[-1])
        elif value in OFF_VALUES:
            result.unset(where)
        elif key in GENERAL_ONLY_KEYS:
            result.skip(where, f"loracli has one {key} for the run: set it in [general] (dataset.{key})")
        elif key in NOT_SUPPORTED:
            result.skip(where, NOT_SUPPORTED[key])
        elif model is SubsetSection and key in DatasetEntry.model_fields:
            result.skip(where, f"a dataset option (sd-scripts refuses it in a subset): set it in the [[datasets]] "
                               "table")
        else:
            result.skip(where, "not a dataset-config key loracli knows")


def import_dataset_toml(data: dict[str, Any], result: ImportResult, *, where: str,
                        fallbacks: dict[str, Any]) -> None:
    """Map a parsed dataset TOML into `result` (values["datasets"] holds the [[datasets]] list).

    fallbacks: the training arguments' values by dataset-key name (caption_extension,
    num_repeats from dataset_repeats), the last step of sd-scripts' subset -> dataset ->
    general -> command line order; the other command-line values are [dataset]'s already.
    """
    for key in data:
        if key not in ("general", "datasets"):
            result.skip(f"{where}: {key}", "not a dataset-config key (sd-scripts allows [general] and [[datasets]])")
    general = data.get("general") or {}
    datasets = data.get("datasets") or []
    if not isinstance(general, dict) or not isinstance(datasets, list):
        result.skip(f"{where}", "[general] must be a table and [[datasets]] an array of tables")
        return
    pushed: dict[str, Any] = {}
    for key, value in general.items():
        label = f"{where}: general.{key}"
        if key in PUSHED_DOWN:
            if value is not None:
                pushed[key] = value
            continue
        dotted = key_for_dataset_key(key)
        if dotted is None:
            if value in OFF_VALUES:
                result.unset(label)
            else:
                result.skip(label, NOT_SUPPORTED.get(key, "a subset key: set it in [[datasets.subsets]]"
                                                     if key in SubsetSection.model_fields else
                                                     "not a dataset-config key sd-scripts knows"))
            continue
        result.set(dotted, value, label)
    if fallbacks.get("num_repeats") is not None:
        pushed.setdefault("num_repeats", fallbacks["num_repeats"])
    if not result.has("dataset.caption_extension"):  # sd-scripts' default, not loracli's .txt
        result.values.setdefault("dataset", {})["caption_extension"] = fallbacks.get("caption_extension", ".caption")

    entries: list[dict[str, Any]] = []
    for d_index, dataset in enumerate(datasets):
        d_label = f"{where}: datasets[{d_index}]"
        if not isinstance(dataset, dict):
            result.skip(d_label, "must be a table")
            continue
        entry: dict[str, Any] = {}
        _copy_keys(dataset, DatasetEntry, entry, d_label, result, skip=("subsets",))
        for key, value in pushed.items():
            if key not in entry:
                entry[key] = _typed(DatasetEntry, key, value)
                result.mapped.setdefault(f"{where}: general.{key}", []).append(f"datasets[{len(entries)}].{key}")
        subsets = []
        for s_index, subset in enumerate(dataset.get("subsets") or []):
            s_label = f"{d_label}.subsets[{s_index}]"
            if not isinstance(subset, dict):
                result.skip(s_label, "must be a table")
            elif "metadata_file" in subset:
                result.skip(s_label, NOT_SUPPORTED["metadata_file"])
            elif "image_dir" not in subset:
                result.skip(s_label, "a subset without image_dir (sd-scripts requires it)")
            else:
                out: dict[str, Any] = {}
                _copy_keys(subset, SubsetSection, out, s_label, result)
                if "image_dir" in out:
                    subsets.append(out)
        if not subsets:
            result.skip(d_label, "no usable [[datasets.subsets]] (each needs an image_dir)")
            continue
        entry["subsets"] = subsets
        entries.append(entry)
    if not entries:
        result.skip(f"{where}: datasets", "no [[datasets.subsets]] with an image_dir: there is no data to import")
        return
    if not _as_folder_form(entries, result, where):
        result.values["datasets"] = entries


ROLE_KEYS = ("image_dir", "num_repeats", "class_tokens", "is_reg")


def _pure_path(text: str) -> PurePath:
    """Windows paths (D:\\data\\10_x) split on backslashes even when importing on Linux."""
    if "\\" in text and "/" not in text:
        return PureWindowsPath(text)
    return PurePosixPath(text) if "/" in text else PurePath(text)


def _as_folder_form(entries: list[dict[str, Any]], result: ImportResult, where: str) -> bool:
    """The short way when it says exactly the same: one dataset whose subsets are `<num_repeats>_<class_tokens>`
    folders under one parent per kind (and nothing else there), with the same options for all of them.
    Then [dataset] gets train_data_dir / reg_data_dir and the options; else [[datasets]] stay as they are."""
    if len(entries) != 1:
        return False
    entry = entries[0]
    subsets = entry["subsets"]
    options: dict[str, Any] = {}
    keys = {k for table in [entry, *subsets] for k in table if k not in ROLE_KEYS + ("subsets",)}
    for key in keys:
        values = {repr(sub.get(key, entry.get(key))) for sub in subsets}
        if len(values) > 1:
            return False
        value = subsets[0].get(key, entry.get(key))
        if value is None:  # a subset leaves it to [general] while another sets it
            return False
        options[key] = value
    parents: dict[bool, set[str]] = {False: set(), True: set()}
    listed: dict[bool, set[str]] = {False: set(), True: set()}
    for sub in subsets:
        path = _pure_path(str(sub["image_dir"]))
        repeats = sub.get("num_repeats", entry.get("num_repeats", 1))
        tokens = sub.get("class_tokens", entry.get("class_tokens"))
        parsed = parse_folder_name(path.name)
        if parsed is None or parsed[0] != repeats or parsed[0] < 1 or (tokens is not None and parsed[1] != tokens):
            return False
        if tokens is None and parsed[1]:  # sd-scripts: empty caption; the folder form: the folder's tokens
            return False
        is_reg = bool(sub.get("is_reg", False))
        parents[is_reg].add(str(path.parent))
        listed[is_reg].add(path.name)
    if len(parents[False]) != 1 or len(parents[True]) > 1:
        return False
    for is_reg, found in parents.items():
        for parent in found:  # the folder form trains every <n>_ folder of the parent: no others may be there
            folder = Path(parent)
            if folder.is_dir() and any(p.is_dir() and p.name not in listed[is_reg] and
                                       (parsed := parse_folder_name(p.name)) and parsed[0] > 0
                                       for p in folder.iterdir()):
                return False
    batch = options.pop("batch_size", None)
    if batch is not None:
        result.set("training.train_batch_size", batch, f"{where}: datasets[0].batch_size")
    for key, value in options.items():
        result.set(f"dataset.{key}", value, f"{where}: datasets[0].{key}")
    result.set("dataset.train_data_dir", next(iter(parents[False])), f"{where}: datasets[0].subsets[0].image_dir")
    if parents[True]:
        result.set("dataset.reg_data_dir", next(iter(parents[True])), f"{where}: datasets[0].subsets")
    for label, targets in result.mapped.items():  # the subsets' keys now live in the folder names and [dataset]
        if label.startswith(f"{where}: datasets[") or label.startswith(f"{where}: general."):
            head = label.rsplit(".", 1)[-1]
            result.mapped[label] = [f"dataset.{head}" if head not in ROLE_KEYS + ("batch_size",) else
                                    "training.train_batch_size" if head == "batch_size" else
                                    "dataset.reg_data_dir" if ".subsets[" in label and head == "is_reg" else
                                    "dataset.train_data_dir (folder name)"]
    result.note("the dataset config's subsets are <repeats>_<class tokens> folders under one parent: imported in "
                "the folder form (dataset.train_data_dir)")
    return True
