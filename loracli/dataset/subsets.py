"""sd-scripts' dataset config resolved: every [[datasets.subsets]] folder with the options it trains with.

Each value comes from the subset, else its [[datasets]] table, else [dataset] (sd-scripts' [general]), else
loracli's default; a dataset's batch size falls back to training.train_batch_size, num_repeats to 1. The
result is a plain DatasetSection per subset, so the run applies a subset's options exactly as it applies
[dataset]'s in the folder form. Torch-free (plan side).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from loracli.config.schema import DATASET_LEVEL_KEYS, DatasetSection, LoracliConfig, subset_level_keys

if TYPE_CHECKING:
    from loracli.plan import PlannedImage


@dataclass(frozen=True)
class SubsetSpec:
    key: str  # "datasets[0].subsets[1]", how messages name it
    dataset: int
    index: int
    image_dir: Path
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    options: DatasetSection  # the effective options of this subset's images


@dataclass(frozen=True)
class DatasetSpec:
    key: str  # "datasets[0]"
    index: int
    own_batch_size: int | None  # the dataset's batch_size; None: training.train_batch_size
    options: DatasetSection  # dataset-level view: resolution and bucket options
    subsets: tuple[SubsetSpec, ...]

    def batch_size(self, config: LoracliConfig) -> Union[int, str]:
        """"auto" until the plan resolves training.train_batch_size."""
        return self.own_batch_size if self.own_batch_size is not None else config.training.train_batch_size


def _set(table: Any, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(table, k) for k in keys if getattr(table, k) is not None}


def dataset_specs(config: LoracliConfig) -> list[DatasetSpec]:
    """The [[datasets]] of the config, resolved ([] in the folder form)."""
    general = config.dataset
    specs = []
    for d_index, entry in enumerate(config.datasets):
        dataset_opts = general.model_copy(update=_set(entry, DATASET_LEVEL_KEYS + subset_level_keys()))
        subsets = []
        for s_index, sub in enumerate(entry.subsets):
            repeats = sub.num_repeats if sub.num_repeats is not None else entry.num_repeats
            tokens = sub.class_tokens if sub.class_tokens is not None else entry.class_tokens
            subsets.append(SubsetSpec(
                key=f"datasets[{d_index}].subsets[{s_index}]", dataset=d_index, index=s_index,
                image_dir=Path(sub.image_dir), num_repeats=1 if repeats is None else repeats, is_reg=sub.is_reg,
                class_tokens=tokens, options=dataset_opts.model_copy(update=_set(sub, subset_level_keys())),
            ))
        specs.append(DatasetSpec(f"datasets[{d_index}]", d_index, entry.batch_size, dataset_opts, tuple(subsets)))
    return specs


def all_subsets(config: LoracliConfig) -> list[SubsetSpec]:
    return [s for d in dataset_specs(config) for s in d.subsets]


def image_options(config: LoracliConfig, images: Sequence[PlannedImage]) -> list[DatasetSection]:
    """The options each planned image trains with: its subset's, or [dataset]'s in the folder form."""
    specs = dataset_specs(config)
    out = []
    for image in images:
        index = getattr(image, "subset_index", None)
        out.append(config.dataset if index is None else specs[image.dataset].subsets[index].options)
    return out


def differing_options(options: DatasetSection, base: DatasetSection) -> dict[str, Any]:
    """Subset options that differ from `base` (what `loracli plan` shows next to a subset)."""
    values = options.model_dump(mode="json")  # JSON-safe: the plan is written as JSON (paths become strings)
    return {k: values[k] for k in subset_level_keys() if getattr(options, k) != getattr(base, k)}


def subset_level_values(config: LoracliConfig, key: str) -> list[tuple[str, Any]]:
    """(where, value) of a subset option for every subset, or of [dataset] in the folder form: lint rules
    that read a dataset option see every value the run will use."""
    if not config.datasets:
        return [(f"dataset.{key}", getattr(config.dataset, key))]
    return [(f"{s.key}.{key}", getattr(s.options, key)) for s in all_subsets(config)]


def dataset_level_values(config: LoracliConfig) -> list[tuple[str, DatasetSection, Union[int, str]]]:
    """(prefix, options, batch size) per dataset: ("dataset", [dataset], train_batch_size) in the folder form."""
    if not config.datasets:
        return [("dataset", config.dataset, config.training.train_batch_size)]
    return [(d.key, d.options, d.batch_size(config)) for d in dataset_specs(config)]
