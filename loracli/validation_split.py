"""The validation split, as sd-scripts makes it (library/train_util.py split_train_val), torch-free.

Each training folder's images are shuffled with a Random seeded by the split seed; the first
ceil(n × (1 - validation_split)) train, the rest are held out for the validation loss. Reg folders are
never split. sd-scripts takes its held-out part as the last round(n × split) of the same shuffle, which
can share an image with the training part (n = 3, split 0.5: 2 train, 2 held out); loracli holds out
exactly the images not trained on, so the step counts match sd-scripts' and no image is in both.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from loracli.config.schema import LoracliConfig
from loracli.dataset.scan import ImageEntry, Subset
from loracli.lint import Finding

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts: evenly spaced inside [min_timestep, max_timestep]
SD_VALIDATION = "sd-scripts train_network.py (validation)"


def split_seed(config: LoracliConfig) -> int:
    """dataset.validation_seed, else training.seed, else 0 (a fixed split even before a seed is drawn)."""
    ds, tr = config.dataset, config.training
    return ds.validation_seed if ds.validation_seed is not None else tr.seed if tr.seed is not None else 0


@dataclass
class Holdout:
    """The callable scan_dataset applies to the training folders; remembers what it held out."""

    split: float
    seed: int
    held_out: list[tuple[Subset, list[ImageEntry]]] = field(default_factory=list)

    def __call__(self, train: list[Subset]) -> list[Subset]:
        self.held_out = []
        if self.split <= 0:
            return train
        kept_subsets = []
        for subset in train:
            order = list(range(len(subset.images)))
            random.Random(self.seed).shuffle(order)  # a fresh Random per folder, as sd-scripts reseeds
            keep = math.ceil(len(order) * (1 - self.split))
            kept = sorted(order[:keep])  # loracli reads folders in sorted order: keep that order
            out = sorted(order[keep:])
            kept_subsets.append(replace(subset, images=tuple(subset.images[i] for i in kept)))
            self.held_out.append((subset, [subset.images[i] for i in out]))
        return kept_subsets

    @property
    def count(self) -> int:
        return sum(len(images) for _, images in self.held_out)

    def held_out_subsets(self) -> list[Subset]:
        """The held-out images as folders (their repeats kept for ss_num_validation_images, as sd-scripts
        counts them; a round validates each image once)."""
        return [replace(subset, images=tuple(images)) for subset, images in self.held_out if images]


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, num_train_timesteps: int = 1000
                         ) -> list[int]:
    """sd-scripts' fixed timesteps: NUM_VALIDATION_TIMESTEPS evenly spaced, the two ends left out."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    n = NUM_VALIDATION_TIMESTEPS + 2
    return [int(lo + (hi - lo) * i / (n - 1)) for i in range(1, n - 1)]


def validation_findings(config: LoracliConfig, holdout: Holdout) -> list[Finding]:
    ds, tr = config.dataset, config.training
    out = []
    asked = tr.validate_every_n_steps or tr.validate_every_n_epochs or tr.max_validation_steps
    if ds.validation_split > 0 and holdout.count == 0:
        out.append(Finding("warning", "W24", "dataset.validation_split",
                           f"{ds.validation_split:g} of each folder holds out no image: every folder is too small "
                           "(each keeps at least ceil(n × (1 - split)) images for training); no validation loss",
                           "raise validation_split, or add images", SD_VALIDATION))
    elif ds.validation_split > 0:
        small = [s.path.name for s, images in holdout.held_out if not images]
        if small:
            out.append(Finding("warning", "W24", "dataset.validation_split",
                               f"{len(small)} folder(s) too small to hold an image out ({', '.join(small[:3])}): "
                               "the validation loss does not cover them", "raise validation_split, or add images",
                               SD_VALIDATION))
    elif asked:
        out.append(Finding("warning", "W24", "training.validate_every_n_steps" if tr.validate_every_n_steps else
                           "training.validate_every_n_epochs" if tr.validate_every_n_epochs else
                           "training.max_validation_steps",
                           "validation is scheduled but dataset.validation_split is 0: nothing is held out",
                           "set dataset.validation_split (e.g. 0.1)", SD_VALIDATION))
    return out
