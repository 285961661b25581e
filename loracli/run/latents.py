"""VAE latents: encoded on the fly, or once and cached in memory and on disk.

Disk caches are keyed by everything that changes a latent (file identity,
bucket, resize, crop, flip, VAE identity, dtype), so a changed resolution or
bucket setting never reuses a stale latent (sd-scripts' npz caches can).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loracli.errors import DatasetError, Problem
from loracli.plan import Plan, PlannedImage
from loracli.run.data import ALPHA, load_example, stack_masks, to_tensor


def encode(vae, pixels: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    # sd-scripts replaces NaNs by 0 (fp16 VAEs overflow on some images).
    return torch.nan_to_num(latents.float() * scaling_factor, nan=0.0)


def vae_identity(name_or_path: str, vae) -> str:
    text = json.dumps({"model": name_or_path, "config": dict(vae.config)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(image: PlannedImage, flip: bool, vae_id: str, dtype: str, mask_from: str | None = None) -> str:
    stat = os.stat(image.path)
    ident = {
        "path": str(Path(image.path).resolve()), "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size,
        "size": list(image.size), "bucket": list(image.bucket), "resized": list(image.resized),
        "crop": list(image.crop_offset), "flip": flip, "vae": vae_id, "dtype": dtype,
    }
    if mask_from is not None:  # the file then also holds the mask (sd-scripts' npz holds alpha_mask)
        ident["mask"] = mask_from if mask_from == ALPHA else _file_identity(mask_from)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _file_identity(path: str) -> dict[str, object]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise DatasetError(Problem(path, f"cannot read the mask image ({exc.strerror})",
                                   "put it back, or re-run `loracli plan`")) from None
    return {"path": str(Path(path).resolve()), "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size}


class LatentCache:
    """Latents of every planned image (and its mirror when flip_aug), by plan index."""

    def __init__(self, plan: Plan, flip_aug: bool | Sequence[bool], disk_dir: Path | None,
                 mask_sources: Sequence[str | None] | None = None):
        """flip_aug: one value, or one per planned image (its subset's flip_aug with [[datasets]]).
        mask_sources: each planned image's loss-mask source (data.mask_source); the mask is cached beside
        the latents (pixel size, unflipped; mirrored when a flipped latent is used), as sd-scripts' npz."""
        self.mask_sources = list(mask_sources) if mask_sources is not None else [None] * len(plan.images)
        self.masks: dict[int, np.ndarray] = {}  # H,W uint8 per masked image
        self.plan = plan
        self.flips = [flip_aug] * len(plan.images) if isinstance(flip_aug, bool) else [bool(f) for f in flip_aug]
        self.flip_aug = any(self.flips)
        self.disk_dir = disk_dir
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.encoded = 0  # how many were computed (not read from disk) this run

    def fill(self, vae, scaling_factor: float, name_or_path: str, batch_size: int, seed: int, on_progress=None) -> None:
        vae_id = vae_identity(name_or_path, vae)
        dtype = str(vae.dtype).removeprefix("torch.")
        generator = torch.Generator(device=vae.device).manual_seed(seed)
        todo: dict[tuple[int, int], list[tuple[int, bool, Path | None]]] = {}
        for i, image in enumerate(self.plan.images):
            for flip in (False, True) if self.flips[i] else (False,):  # a mirrored copy only where flip_aug
                path = None
                if self.disk_dir is not None:
                    mask_from = self.mask_sources[i]
                    path = self.disk_dir / f"{cache_key(image, flip, vae_id, dtype, mask_from)}.safetensors"
                    saved = load_file(path) if path.is_file() else {}
                    if "latents" in saved and (mask_from is None or "mask" in saved):
                        self.latents[(i, flip)] = saved["latents"]
                        if mask_from is not None:
                            self.masks[i] = saved["mask"].numpy()
                        continue
                todo.setdefault(tuple(image.bucket), []).append((i, flip, path))
        rng = random.Random(seed)  # unused: cached latents never random-crop (lint E5)
        for bucket_items in todo.values():
            for start in range(0, len(bucket_items), batch_size):
                chunk = bucket_items[start:start + batch_size]
                pixels = []
                for i, flip, _ in chunk:
                    px, mask = load_example(self.plan.images[i], False, rng, self.mask_sources[i])
                    pixels.append(to_tensor(px[:, ::-1] if flip else px))
                    if mask is not None:
                        self.masks[i] = mask
                latents = encode(vae, torch.stack(pixels), scaling_factor, generator).cpu()
                for (i, flip, path), latent in zip(chunk, latents):
                    self.latents[(i, flip)] = latent
                    self.encoded += 1
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                        tensors = {"latents": latent.contiguous()}
                        if i in self.masks:
                            tensors["mask"] = torch.from_numpy(np.array(self.masks[i]))  # a writable copy
                        save_file(tensors, tmp)
                        tmp.replace(path)
                if on_progress:
                    on_progress(len(chunk))

    def count_needed(self) -> int:
        return sum(2 if flip else 1 for flip in self.flips)

    def batch(self, indices: list[int], flipped: list[bool]) -> torch.Tensor:
        return torch.stack([self.latents[(i, f)] for i, f in zip(indices, flipped)])

    def mask_batch(self, indices: list[int], flipped: list[bool]) -> torch.Tensor | None:
        """The batch's loss masks (B, H, W) in [0, 1], mirrored with flipped latents; None when none is masked."""
        masks = [self.masks.get(i) for i in indices]
        masks = [m if m is None or not f else m[:, ::-1] for m, f in zip(masks, flipped)]
        width, height = self.plan.images[indices[0]].bucket  # a batch never mixes buckets
        return stack_masks(masks, (height, width))
