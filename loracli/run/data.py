"""Training data exactly as the plan says: bucket-batches, resize, crop, captions.

Each planned image goes into its bucket `repeats` times; a bucket of n entries
gives ceil(n / batch) batches (partial batches kept, never mixing buckets).
Every epoch re-shuffles the bucket contents and the batch order with a seeded
RNG (sd-scripts: random.seed(dataset_seed + epoch)). With several processes,
process r takes batches r, r+N, ... so each sees ceil(batches / N) of them.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loracli.captions import CaptionOptions, caption_as_read, process_caption
from loracli.dataset.images import load_mask, load_rgb_and_alpha
from loracli.config.schema import DatasetSection
from loracli.errors import DatasetError, Problem
from loracli.plan import Plan, PlannedImage
from loracli.run.augment import color_augment


@dataclass(frozen=True)
class Example:
    index: int  # into plan.images
    image: PlannedImage


def caption_options(ds: DatasetSection) -> CaptionOptions:
    return CaptionOptions(
        caption_prefix=ds.caption_prefix,
        caption_suffix=ds.caption_suffix,
        caption_dropout_rate=ds.caption_dropout_rate,
        caption_dropout_every_n_epochs=ds.caption_dropout_every_n_epochs,
        shuffle_caption=ds.shuffle_caption,
        caption_separator=ds.caption_separator,
        keep_tokens=ds.keep_tokens,
        keep_tokens_separator=ds.keep_tokens_separator,
        secondary_separator=ds.secondary_separator,
        caption_tag_dropout_rate=ds.caption_tag_dropout_rate,
        token_warmup_min=ds.token_warmup_min,
        token_warmup_step=ds.token_warmup_step,
        enable_wildcard=ds.enable_wildcard,
    )


ALPHA = "alpha"  # mask source: the image's own alpha channel (dataset.alpha_mask)


def mask_source(image: PlannedImage, options: DatasetSection) -> str | None:
    """Where an image's loss mask comes from: its alpha channel, its conditioning_data_dir mask image, or none."""
    if options.alpha_mask:
        return ALPHA
    return getattr(image, "mask", "") or None


def original_size(image: PlannedImage, options: DatasetSection, latents_cached: bool) -> tuple[int, int]:
    """SDXL's "original size" conditioning as sd-scripts gives it: the file's size, except on its unbucketed
    pixel path (no resize, a crop), where it reports the crop, i.e. the resolution (and a crop offset of 0)."""
    if not options.enable_bucket and not latents_cached:
        return tuple(image.bucket)
    return tuple(image.size)


def load_pixels(image: PlannedImage, random_crop: bool, rng: random.Random) -> np.ndarray:
    """Resize to the planned size, then crop the overflow (centre, or random with random_crop)."""
    return load_example(image, random_crop, rng, None)[0]


def load_example(image: PlannedImage, random_crop: bool, rng: random.Random, mask_from: str | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels (H, W, 3 uint8) and, with a mask source, the mask (H, W uint8, 255 = trained on) resized and
    cropped with them, pixel for pixel; an image without alpha under alpha_mask gets a full mask (sd-scripts)."""
    try:
        return _load_example(image, random_crop, rng, mask_from)
    except (OSError, ValueError) as exc:  # the plan reads headers only: a broken body shows up here
        raise DatasetError(Problem(image.path, f"cannot read the image ({exc})", "re-save or remove it")) from None


def _load_example(image: PlannedImage, random_crop: bool, rng: random.Random, mask_from: str | None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    # load_rgb is what the plan's header reader mirrors: same EXIF orientation, same refusals.
    im, mask = load_rgb_and_alpha(Path(image.path), alpha=mask_from == ALPHA)
    if im.size != tuple(image.size):
        raise ValueError(f"its size changed since it was planned: {im.size} != {tuple(image.size)}")
    if mask_from == ALPHA and mask is None:
        mask = Image.new("L", im.size, 255)
    elif mask_from not in (None, ALPHA):
        mask = _mask_image(Path(mask_from), im.size)
    if tuple(image.resized) != im.size:
        grows = image.resized[0] > im.size[0] or image.resized[1] > im.size[1]
        # sd-scripts: area averaging when shrinking, Lanczos when enlarging; the mask goes with the pixels.
        resample = Image.LANCZOS if grows else Image.BOX
        im = im.resize(tuple(image.resized), resample)
        mask = None if mask is None else mask.resize(tuple(image.resized), resample)
    bw, bh = image.bucket
    rw, rh = image.resized
    if random_crop:
        x, y = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        x, y = image.crop_offset
    box = (x, y, x + bw, y + bh)
    pixels = np.asarray(im.crop(box), dtype=np.uint8)
    return pixels, None if mask is None else np.asarray(mask.crop(box), dtype=np.uint8)


def _mask_image(path: Path, size: tuple[int, int]):
    try:
        mask = load_mask(path)
    except (OSError, ValueError) as exc:
        raise DatasetError(Problem(str(path), f"cannot read the mask image ({exc})", "re-save or replace it")) from None
    if mask.size != size:
        raise DatasetError(Problem(str(path), f"is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]} "
                                   "(changed since it was planned?)", "save the mask at the image's size"))
    return mask


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 → CHW float in [-1, 1], what the VAE expects."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class BucketBatches:
    """The epoch's list of bucket-batches, seeded and re-shuffled per epoch."""

    def __init__(self, plan: Plan, batch_size: int, dataset_seed: int, rank: int = 0, world: int = 1):
        self.plan = plan
        self.batch_size = batch_size
        self.dataset_seed = dataset_seed
        self.rank, self.world = rank, world
        # [[datasets]] batch with their own sizes and never share a batch (sd-scripts' DatasetGroup)
        self.dataset_batch = {i: d["batch_size"] for i, d in enumerate(plan.datasets)}
        self.buckets: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for i, image in enumerate(plan.images):
            self.buckets[(image.dataset, tuple(image.bucket))].extend([i] * image.repeats)

    def _size(self, key: tuple[int, tuple[int, int]]) -> int:
        return self.dataset_batch.get(key[0], self.batch_size)

    def total_batches(self) -> int:
        return sum(math.ceil(len(v) / self._size(k)) for k, v in self.buckets.items())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches for a 1-based epoch."""
        rng = random.Random(self.dataset_seed + epoch)
        batches: list[list[int]] = []
        for key in sorted(self.buckets):
            entries, size = list(self.buckets[key]), self._size(key)
            rng.shuffle(entries)
            batches += [entries[i:i + size] for i in range(0, len(entries), size)]
        rng.shuffle(batches)
        mine = batches[self.rank::self.world]
        per_process = math.ceil(len(batches) / self.world)
        # Pad short shards by wrapping around, as a distributed sampler does, so all
        # processes take the same number of steps.
        while len(mine) < per_process:
            mine.append(batches[len(mine) % len(batches)])
        return mine


@dataclass
class Batch:
    indices: list[int]
    pixels: torch.Tensor | None  # B,3,H,W in [-1,1] (None when latents are cached)
    flipped: list[bool]
    captions: list[str]
    is_reg: torch.Tensor  # B bool
    masks: torch.Tensor | None = None  # B,H,W loss masks in [0, 1] at pixel size (None: no image masked)


class ExampleLoader:
    """Turns a list of image indices into a Batch: pixels (unless cached) and processed captions."""

    def __init__(self, plan: Plan, ds: DatasetSection, total_steps: int, load_pixels_: bool, seed: int,
                 image_options: Sequence[DatasetSection] | None = None):
        """image_options: the options of each planned image's subset ([[datasets]]); None: `ds` for all."""
        self.plan = plan
        self.ds = ds
        self.total_steps = total_steps
        self.opts = caption_options(ds)
        self.image_ds = list(image_options) if image_options is not None else [ds] * len(plan.images)
        by_id = {id(o): caption_options(o) for o in self.image_ds}  # one CaptionOptions per subset
        self.image_opts = [by_id[id(o)] for o in self.image_ds]
        self.load_pixels = load_pixels_
        self.rng = random.Random(seed)

    def __call__(self, indices: list[int], epoch: int, step: int) -> Batch:
        images = [self.plan.images[i] for i in indices]
        dss = [self.image_ds[i] for i in indices]
        opts = [self.image_opts[i] for i in indices]
        flipped = [d.flip_aug and self.rng.random() < 0.5 for d in dss]
        captions = [process_caption(caption_as_read(im.caption, im.caption_lines, o.enable_wildcard),
                                    o, epoch, step, self.total_steps, self.rng) for im, o in zip(images, opts)]
        pixels = masks = None
        if self.load_pixels:
            arrays, mask_arrays = [], []
            for im, flip, d in zip(images, flipped, dss):
                px, mask = load_example(im, d.random_crop, self.rng, mask_source(im, d))
                if d.color_aug:
                    px = color_augment(px, self.rng)  # the colour channels only, as sd-scripts
                if flip:
                    px = px[:, ::-1]
                    mask = None if mask is None else mask[:, ::-1]
                arrays.append(to_tensor(px))
                mask_arrays.append(mask)
            pixels = torch.stack(arrays)
            masks = stack_masks(mask_arrays, pixels.shape[2:])
        is_reg = torch.tensor([im.is_reg for im in images], dtype=torch.bool)
        return Batch(indices, pixels, flipped, captions, is_reg, masks)


def stack_masks(masks: Sequence[np.ndarray | None], size: Sequence[int]) -> torch.Tensor | None:
    """(B, H, W) float masks in [0, 1]; an image without a mask in a masked batch gets ones (sd-scripts);
    None when no image of the batch is masked."""
    if all(m is None for m in masks):
        return None
    ones = torch.ones(tuple(size), dtype=torch.float32)
    return torch.stack([ones if m is None else torch.from_numpy(m.copy()).float().div(255.0) for m in masks])
