"""The pixel side of the plan: which images are refused unbucketed, and which loss mask each image gets.

sd-scripts masks the loss by an image's alpha channel (`alpha_mask`) or by a mask image from a
subset's `conditioning_data_dir` (its masked datasets, with `--masked_loss`). Here the masks are
found and checked before any model loads: a training image without its mask, a mask without
its image (sd-scripts refuses both), a mask of another size, an unreadable one. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loracli.buckets import fixed_size_problem
from loracli.dataset.images import _open, is_image_name, read_image_size
from loracli.dataset.subsets import image_options
from loracli.errors import DatasetError, Problem

if TYPE_CHECKING:
    from loracli.config.schema import DatasetSection, LoracliConfig
    from loracli.lint import Finding
    from loracli.plan import PlannedImage

SD_MASKS = "sd-scripts library/train_util.py (alpha_mask, ControlNetDataset)"
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def has_alpha(path: str | Path) -> bool:
    """Whether the file carries transparency (an alpha band, or a palette's transparent colour). Header only."""
    try:
        im = _open(Path(path))
    except ValueError:
        return False  # the scan already refused unreadable files; the loader names any that break later
    try:
        return im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)
    finally:
        im.close()


def unbucketed_problems(images: Sequence[PlannedImage], options: Sequence[DatasetSection]) -> list[Problem]:
    """enable_bucket = false without cached latents: the images sd-scripts' pixel path stops on."""
    problems = []
    for image, opts in zip(images, options):
        if opts.enable_bucket or opts.cache_latents or opts.cache_latents_to_disk:
            continue
        found = fixed_size_problem(tuple(image.size), opts.resolution_wh, opts.random_crop)
        if found:
            problems.append(Problem(image.path, found[0], found[1]))
    return problems


class _MaskFolder:
    """A conditioning_data_dir's image files by name stem (sd-scripts globs `<stem>.<ext>` there)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_stem: dict[str, list[str]] = {}
        for name in sorted(os.listdir(folder)):
            # glob's "*" skips hidden files (macOS "._name.png" copies), so sd-scripts never sees them
            if is_image_name(name) and not name.startswith(".") and (folder / name).is_file():
                self.by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        self.used: set[str] = set()

    def mask_of(self, image_path: str) -> Path | None:
        names = self.by_stem.get(os.path.splitext(os.path.basename(image_path))[0])
        if not names:
            return None
        self.used.add(names[0])  # the first in sorted order, as sd-scripts takes glob's sorted list
        return self.folder / names[0]

    def extras(self) -> list[Path]:
        return [self.folder / n for names in self.by_stem.values() for n in names if n not in self.used]


def _folder(cache: dict[Path, _MaskFolder], folder: Path, key: str) -> _MaskFolder:
    if folder not in cache:
        if not folder.is_dir():
            found = "is not a folder" if folder.exists() else "folder not found"
            raise DatasetError(Problem(f"{key}: {folder}", found, "point it at the folder of mask images"))
        try:
            cache[folder] = _MaskFolder(folder)
        except OSError as exc:
            raise DatasetError(Problem(f"{key}: {folder}", f"cannot be read ({exc.strerror})",
                                       "check its permissions")) from None
    return cache[folder]


def plan_masks(config: LoracliConfig, groups: Sequence[list[PlannedImage]]
               ) -> tuple[list[list[PlannedImage]], list[Finding]]:
    """Each group of planned images (training, held out) with its mask image filled in, plus the warnings.

    Raises DatasetError (exit 3) for every image without a mask, mask without an image, and mask
    whose size differs from its image's (the mask follows the image's resize, crop and flip).
    """
    from loracli.lint import Finding

    folders: dict[Path, _MaskFolder] = {}
    problems: list[Problem] = []
    no_alpha: list[str] = []
    alpha_keys: set[str] = set()
    out_groups = []
    for images in groups:
        out: list[PlannedImage] = []
        for image, opts in zip(images, image_options(config, images)):
            if opts.alpha_mask and not has_alpha(image.path):
                no_alpha.append(image.path)
                alpha_keys.add(_key(config, image, "alpha_mask"))
            if opts.conditioning_data_dir is None or image.is_reg:
                out.append(image)
                continue
            key = _key(config, image, "conditioning_data_dir")
            if Path(opts.conditioning_data_dir).resolve() == Path(image.path).parent.resolve():
                raise DatasetError(Problem(f"{key}: {opts.conditioning_data_dir}", "is the folder of the training "
                                           "images: each image would be its own mask",
                                           "keep the masks in a folder of their own"))
            folder = _folder(folders, Path(opts.conditioning_data_dir), key)
            mask = folder.mask_of(image.path)
            if mask is None:
                stem = os.path.splitext(os.path.basename(image.path))[0]
                problems.append(Problem(image.path, f"has no mask image in {folder.folder} (looked for {stem}.png, "
                                        f".jpg, .jpeg, .webp or .bmp)",
                                        "add its mask with the same name stem, or move the image out"))
                out.append(image)
                continue
            try:
                mask_size = read_image_size(mask)
            except ValueError as exc:
                problems.append(Problem(str(mask), f"cannot be read as a mask image ({exc})", "re-save or replace it"))
                mask_size = tuple(image.size)
            if tuple(mask_size) != tuple(image.size):
                problems.append(Problem(str(mask), f"is {mask_size[0]}x{mask_size[1]}, but its image {image.path} is "
                                        f"{image.size[0]}x{image.size[1]}: a mask must match its image pixel for pixel",
                                        "save the mask at the image's size"))
            out.append(replace(image, mask=str(mask)))
        out_groups.append(out)
    for folder in folders.values():
        problems += [Problem(str(p), "is a mask without a training image of the same name stem (sd-scripts stops "
                             "on such extra conditioning images)", "remove it, or add its image")
                     for p in folder.extras()]
    if problems:
        raise DatasetError(problems)
    findings: list[Finding] = []
    if no_alpha:
        shown = ", ".join(os.path.basename(p) for p in no_alpha[:3]) + (", ..." if len(no_alpha) > 3 else "")
        findings.append(Finding(
            "warning", "W60", sorted(alpha_keys)[0],
            f"{len(no_alpha)} image(s) have no alpha channel ({shown}): their whole picture is trained on "
            "(a full mask, as sd-scripts)", "save them as PNG/WebP with transparency, or ignore this", SD_MASKS))
    return out_groups, findings


def _key(config: LoracliConfig, image: PlannedImage, name: str) -> str:
    index = getattr(image, "subset_index", None)
    if index is None or not config.datasets:
        return f"dataset.{name}"
    return f"datasets[{image.dataset}].subsets[{index}].{name}"


def plan_pixels(config: LoracliConfig, planned: list[PlannedImage], held_out: list[PlannedImage]
                ) -> tuple[list[PlannedImage], list[PlannedImage], list[Finding]]:
    """The plan's pixel checks: unbucketed images sd-scripts refuses (exit 3), then the loss masks."""
    problems = unbucketed_problems(planned + held_out, image_options(config, planned + held_out))
    if problems:
        raise DatasetError(problems)
    (planned, held_out), findings = plan_masks(config, [planned, held_out])
    return planned, held_out, findings


def mask_rules(config: LoracliConfig) -> list[Finding]:
    """Plan-time rules for masked loss (E60-E65): the combinations sd-scripts refuses, each naming both keys."""
    from loracli.dataset.subsets import all_subsets
    from loracli.lint import Finding

    if config.datasets:
        units = [(f"{s.key}.", s.options, s.is_reg) for s in all_subsets(config)]
    else:
        units = [("dataset.", config.dataset, False)]
    out: list[Finding] = []
    masked = config.training.masked_loss
    if masked and not any(o.alpha_mask or o.conditioning_data_dir is not None for _, o, _ in units):
        out.append(Finding("error", "E60", "training.masked_loss",
                           "is on, but no image has a mask: neither dataset.conditioning_data_dir nor "
                           "dataset.alpha_mask is set",
                           "set dataset.conditioning_data_dir to a folder of mask images (or dataset.alpha_mask "
                           "= true for transparent images), or remove masked_loss", SD_MASKS))
    for prefix, opts, is_reg in units:
        if opts.conditioning_data_dir is None:
            continue
        key = f"{prefix}conditioning_data_dir"
        if not masked:
            out.append(Finding("error", "E61", key, "needs training.masked_loss = true (sd-scripts accepts "
                               "conditioning_data_dir only with --masked_loss)",
                               "set training.masked_loss = true, or remove conditioning_data_dir", SD_MASKS))
        if opts.alpha_mask:
            out.append(Finding("error", "E62", key, f"cannot be combined with {prefix}alpha_mask: a masked "
                               "subset takes its mask from the mask images only (sd-scripts refuses alpha_mask there)",
                               "use one of the two", SD_MASKS))
        if opts.random_crop:
            out.append(Finding("error", "E63", key, f"cannot be combined with {prefix}random_crop (sd-scripts: "
                               "'random_crop is not supported in ControlNetDataset')",
                               "turn random_crop off for this data", SD_MASKS))
        if is_reg:
            out.append(Finding("error", "E64", key, f"cannot be set on a regularisation subset ({prefix}is_reg): "
                               "sd-scripts' masked datasets have no regularisation images",
                               "move the regularisation images to a subset without masks", SD_MASKS))
    ds = config.dataset
    if not config.datasets and ds.conditioning_data_dir is not None and ds.reg_data_dir is not None:
        out.append(Finding("error", "E64", "dataset.conditioning_data_dir",
                           "cannot be combined with dataset.reg_data_dir: sd-scripts' masked datasets have no "
                           "regularisation images", "train without reg_data_dir, or describe the data as "
                           "[[datasets]] with the regularisation folder in a dataset of its own", SD_MASKS))
    for d_index, entry in enumerate(config.datasets):
        subsets = [s for s in all_subsets(config) if s.dataset == d_index]
        with_masks = [s for s in subsets if s.options.conditioning_data_dir is not None]
        if with_masks and len(with_masks) != len(subsets):
            plain = next(s for s in subsets if s.options.conditioning_data_dir is None)
            out.append(Finding("error", "E65", f"{plain.key}.conditioning_data_dir",
                               f"is not set, but {with_masks[0].key}.conditioning_data_dir is: sd-scripts reads a "
                               "dataset as a masked one only when every subset has mask images",
                               "give every subset of this dataset a conditioning_data_dir, or move the masked "
                               "subsets to their own [[datasets]]", SD_MASKS))
    return out


def masks_line(config: LoracliConfig, images: Sequence[PlannedImage]) -> str | None:
    """What `loracli plan` says about loss masks (None when no image is masked)."""
    by_alpha = sum(1 for o in image_options(config, images) if o.alpha_mask)
    by_file = sum(1 for image in images if getattr(image, "mask", ""))
    parts = ([f"{by_alpha} image(s) by their alpha channel"] if by_alpha else []) + \
        ([f"{by_file} image(s) by mask images (red channel)"] if by_file else [])
    return f"loss masks: {', '.join(parts)}" if parts else None
