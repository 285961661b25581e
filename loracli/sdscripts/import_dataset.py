"""An sd-scripts `--dataset_config` TOML -> loracli's dataset keys.

loracli's dataset is a kohya folder tree: `dataset.train_data_dir` holds
`<repeats>_<class tokens>` folders (and `dataset.reg_data_dir` the same for
regularisation images), with one set of caption and bucket options for all of
them. A dataset TOML maps back onto that when its subsets' folders share one
parent per kind and are named after their num_repeats and class_tokens, and
when the per-subset options agree. Everything else is reported with what to do.
"""

from __future__ import annotations

from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from loracli.dataset.scan import parse_folder_name
from loracli.sdscripts.import_result import ImportResult
from loracli.sdscripts.options import key_for_dataset_key

# Keys sd-scripts allows in [general] / [[datasets]] only (one value per dataset).
DATASET_LEVEL = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale", "network_multiplier", "validation_split",
                 "validation_seed"}
SUBSET_ONLY = {"image_dir", "is_reg", "num_repeats", "class_tokens", "metadata_file", "alpha_mask",
               "conditioning_data_dir"}
# Keys loracli has no equivalent for, with the reason.
NOT_SUPPORTED = {
    "network_multiplier": "per-dataset network multipliers are not supported",
    "resize_interpolation": "loracli resizes with its own interpolation (area down, lanczos up)",
    "face_crop_aug_range": "face-crop augmentation is not implemented in loracli",
    "custom_attributes": "custom subset attributes are not supported",
    "cache_info": "loracli scans the folders itself (no metadata_cache.json)",
    "alpha_mask": "alpha-mask training is not supported",
    "metadata_file": "fine-tuning (metadata) datasets are not supported: loracli reads <repeats>_<name> folders",
    "conditioning_data_dir": "ControlNet/masked datasets are not supported",
}
# Values that mean "off", so an unsupported key set to one of them loses nothing.
OFF_VALUES = (None, False, 0, 0.0, "", {}, [])


def import_dataset_toml(data: dict[str, Any], result: ImportResult, *, where: str,
                        fallbacks: dict[str, Any]) -> None:
    """Map a parsed dataset TOML into `result`.

    fallbacks: the training arguments' values by dataset-key name (caption_extension,
    batch_size from train_batch_size, num_repeats from dataset_repeats), the last
    step of sd-scripts' subset -> dataset -> general -> command line order.
    """
    for key in data:
        if key not in ("general", "datasets"):
            result.skip(f"{where}: {key}", "not a dataset-config key (sd-scripts allows [general] and [[datasets]])")
    general = data.get("general") or {}
    datasets = data.get("datasets") or []
    if not isinstance(general, dict) or not isinstance(datasets, list):
        result.skip(f"{where}", "[general] must be a table and [[datasets]] an array of tables")
        return
    subsets: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (label, subset, its dataset)
    for d_index, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            continue
        for s_index, subset in enumerate(dataset.get("subsets") or []):
            if isinstance(subset, dict):
                subsets.append((f"datasets[{d_index}].subsets[{s_index}]", subset, dataset))
    if not subsets:
        result.skip(f"{where}: datasets", "no [[datasets.subsets]]: there is no data to import")
        return

    def effective(key: str, subset: dict[str, Any], dataset: dict[str, Any]) -> Any:
        for level in (subset, dataset, general):
            if level.get(key) is not None:
                return level[key]
        return fallbacks.get(key)

    # Every option key used anywhere, with the labels that set it.
    used: dict[str, list[str]] = {}
    for label, table in [("general", general)] + [(f"datasets[{i}]", d) for i, d in enumerate(datasets)
                                                  if isinstance(d, dict)]:
        for key in table:
            if key != "subsets":
                used.setdefault(key, []).append(f"{where}: {label}.{key}")
    for label, subset, _ in subsets:
        for key in subset:
            if key not in SUBSET_ONLY:
                used.setdefault(key, []).append(f"{where}: {label}.{key}")

    for key, labels in used.items():
        values = {label: effective(key, s, d) for label, s, d in subsets}
        distinct = _distinct(values.values())
        dotted = key_for_dataset_key(key)
        if dotted is None:
            reason = NOT_SUPPORTED.get(key, "not a dataset-config key sd-scripts knows")
            for label in labels:
                if all(v in OFF_VALUES for v in distinct):
                    result.unset(label)
                else:
                    result.skip(label, reason)
            continue
        if len(distinct) > 1:
            detail = ", ".join(f"{lab}: {val!r}" for lab, val in values.items())
            for label in labels:
                result.skip(label, f"differs between subsets ({detail}); loracli has one {dotted} for the whole "
                                   "dataset: make them equal, or split the data into separate loracli configs")
            continue
        for label in labels:
            result.set(dotted, distinct[0], label)

    _import_folders(subsets, result, where, fallbacks, effective)


def _pure_path(text: str) -> PurePath:
    """Windows paths (D:\\data\\10_x) split on backslashes even when importing on Linux."""
    if "\\" in text and "/" not in text:
        return PureWindowsPath(text)
    return PurePosixPath(text) if "/" in text else PurePath(text)


def _distinct(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _import_folders(subsets: list[tuple[str, dict[str, Any], dict[str, Any]]], result: ImportResult, where: str,
                    fallbacks: dict[str, Any], effective: Any) -> None:
    groups: dict[bool, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {False: [], True: []}
    for item in subsets:
        label, subset, _ = item
        if "metadata_file" in subset or "image_dir" not in subset:
            result.skip(f"{where}: {label}", NOT_SUPPORTED["metadata_file"] if "metadata_file" in subset
                        else "a subset without image_dir (sd-scripts requires it)")
            continue
        groups[bool(subset.get("is_reg", False))].append(item)
    if not groups[False]:
        result.skip(f"{where}: datasets", "no training (non-reg) subset with an image_dir")
    for is_reg, items in groups.items():
        if items:
            _import_group(items, is_reg, result, where, effective)


def _import_group(items: list[tuple[str, dict[str, Any], dict[str, Any]]], is_reg: bool, result: ImportResult,
                  where: str, effective: Any) -> None:
    dotted = "dataset.reg_data_dir" if is_reg else "dataset.train_data_dir"
    parents: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []
    listed: set[str] = set()
    for label, subset, dataset in items:
        image_dir = str(subset["image_dir"])
        path = _pure_path(image_dir)
        parents.setdefault(str(path.parent), []).append(label)
        listed.add(path.name)
        repeats = effective("num_repeats", subset, dataset)
        repeats = 1 if repeats is None else repeats
        tokens = subset.get("class_tokens", dataset.get("class_tokens"))
        parsed = parse_folder_name(path.name)
        wanted = f"{repeats}_{tokens}" if tokens else f"{repeats}_{path.name.partition('_')[2] or path.name}"
        if parsed is None or parsed[0] != repeats or (tokens is not None and parsed[1] != tokens):
            problems.append((f"{where}: {label}.image_dir",
                             f"{image_dir}: loracli reads repeats and class tokens from the folder name, and this "
                             f"name does not say num_repeats={repeats}"
                             + (f", class_tokens={tokens!r}" if tokens is not None else "")
                             + f"; rename the folder to {str(path.parent / wanted)!r}"))
        elif tokens is None and parsed[1]:
            result.note(f"{label}: no class_tokens in the TOML (captionless images get an empty caption in "
                        f"sd-scripts); loracli uses the folder name's {parsed[1]!r} for them")
        for key in ("num_repeats", "class_tokens", "is_reg"):
            if key in subset:
                result.mapped.setdefault(f"{where}: {label}.{key}", []).append(f"{dotted} (folder name)")
    if len(parents) > 1:
        listing = "; ".join(f"{p} ({', '.join(labels)})" for p, labels in parents.items())
        kind = "reg" if is_reg else "training"
        problems.append((f"{where}: {dotted}", (f"the {kind} subsets live in different folders ({listing}); loracli "
                                                "reads one parent folder: move the subset folders under one parent")))
    parent = next(iter(parents))
    parent_path = Path(parent)
    if parent_path.is_dir():  # loracli trains every <n>_ folder of the parent, so extra ones would join in
        extra = sorted(p.name for p in parent_path.iterdir()
                       if p.is_dir() and p.name not in listed and (parsed := parse_folder_name(p.name)) and parsed[0] > 0)
        if extra:
            problems.append((f"{where}: {dotted}", (f"{parent} also holds {', '.join(extra)}, which the dataset "
                                                    "TOML does not list but loracli would train on: move them out")))
    else:
        result.note(f"{parent} was not found from here, so it was not checked for folders the TOML leaves out")
    first_label = items[0][0]
    result.set(dotted, parent, f"{where}: {first_label}.image_dir")
    for label, _, _ in items:
        result.mapped.setdefault(f"{where}: {label}.image_dir", [dotted])
    for label, reason in problems:
        earlier = result.unsupported.get(label)
        result.unsupported[label] = f"{earlier}; and {reason}" if earlier else reason
        result.mapped.pop(label, None)
