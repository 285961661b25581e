"""Read a kohya-style dataset exactly as sd-scripts counts it.

`train_data_dir` holds `<repeats>_<class tokens>` folders (direct children
only); images in them (not in sub-folders) are used `repeats` times per epoch;
captions come from `<stem><caption_extension>` (first line), else the class
tokens. Regularisation folders are balanced to the training sample count.
Where loracli deliberately differs (see README) it says so in notes.

Everything is collected first and reported at once; nothing decodes pixels.
Folders and files are read in sorted order (sd-scripts uses the file-system
order, which is not reproducible across machines).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loracli.dataset.images import (
    extension,
    is_image_name,
    not_a_regular_file,
    read_image_size,
    sd_scripts_linux_accepts,
)
from loracli.errors import DatasetError, Problem

if TYPE_CHECKING:
    from loracli.dataset.subsets import SubsetSpec

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")
# Side files a dataset folder commonly holds; not worth a warning each.
QUIET_FILES = {".npz", ".json", ".ds_store", ".db", ".ini"}
SKIP_PREFIX = "no <repeats>_ prefix (sd-scripts skips it)"
SKIP_REPEATS = "repeats < 1 (sd-scripts skips it)"


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    size: tuple[int, int]
    caption: str
    caption_source: str  # "file" | "class_tokens"
    caption_path: Path | None
    repeats: int
    # Every non-blank line of a caption file with more than one (sd-scripts' enable_wildcard reads them
    # as alternatives); () otherwise. `caption` is the first line, what sd-scripts reads without it.
    caption_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subset:
    path: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: tuple[ImageEntry, ...]
    dataset: int = 0  # index into [[datasets]] (0 in the folder form)
    index: int | None = None  # index into that dataset's subsets; None for a <repeats>_<name> folder


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetScan:
    subsets: tuple[Subset, ...]
    skipped: tuple[Skipped, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    num_train_images: int  # Σ repeats × images over training folders
    num_reg_images: int  # raw Σ repeats × images over reg folders (what sd-scripts prints)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    # [[datasets.subsets]]: images found per subset index (after the split, before reg balancing), as
    # sd-scripts' img_count
    img_counts: dict[int, int] = field(default_factory=dict)


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """`10_sks dog` → (10, "sks dog"); `3` → (3, ""); None when the prefix is not an int."""
    head, _, tokens = name.partition("_")
    try:
        return int(head), tokens  # int() strips whitespace, as in sd-scripts
    except ValueError:
        return None


def _caption_candidates(stem: str, caption_extension: str) -> list[str]:
    names = [stem + caption_extension]
    parts = stem.split("_")
    if len(parts) >= 5:  # face-crop naming name_cx_cy_w_h: the caption may lack the suffix
        names.append("_".join(parts[:-4]) + caption_extension)
    return names


@dataclass
class _Collector:
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    mixed_case: list[Path] = field(default_factory=list)
    other_caption_ext: Counter = field(default_factory=Counter)


def _entries(folder: Path, out: _Collector) -> list[os.DirEntry]:
    """A folder's entries in name order; an unreadable folder is a problem naming it."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        out.problems.append(Problem(str(folder), f"cannot list the folder ({exc.strerror or exc})",
                                    "check its permissions"))
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop or a vanished entry: not a folder to search
        return False


def _scan_folder(folder: Path, repeats: int, tokens: str, is_reg: bool, caption_extension: str,
                 out: _Collector) -> Subset:
    entries = _entries(folder, out)
    names = {e.name for e in entries}
    images: list[ImageEntry] = []
    caption_names: set[str] = set()
    for entry in entries:
        if _is_dir(entry):
            out.skipped.append(Skipped(Path(entry.path), "sub-folders of image folders are not searched"))
            continue
        if not is_image_name(entry.name):
            continue
        path = Path(entry.path)
        if not sd_scripts_linux_accepts(entry.name):
            out.mixed_case.append(path)
        try:
            size = read_image_size(path)
        except ValueError as exc:
            out.problems.append(Problem(str(path), str(exc), "remove or re-save the file"))
            continue
        stem = entry.name[: len(entry.name) - len(extension(entry.name))]
        caption, source, caption_path, lines = tokens, "class_tokens", None, ()
        for candidate in _caption_candidates(stem, caption_extension):
            if candidate in names:
                caption_path = folder / candidate
                caption_names.add(candidate)
                (caption, lines), source = _read_caption(caption_path, out), "file"
                break
        else:
            for other in CAPTION_EXTENSIONS:
                if other != caption_extension and stem + other in names:
                    out.other_caption_ext[other] += 1
                    caption_names.add(stem + other)
        images.append(ImageEntry(path, size, caption, source, caption_path, repeats, lines))
    for entry in entries:
        if _is_dir(entry) or is_image_name(entry.name) or entry.name in caption_names:
            continue
        if extension(entry.name).lower() in QUIET_FILES or entry.name.startswith("."):
            continue
        out.skipped.append(Skipped(Path(entry.path), "unsupported extension" if extension(entry.name)
                                   else "not an image"))
    if not images:
        out.warnings.append(f"no images found in {folder}")
    return Subset(folder, repeats, tokens, is_reg, tuple(images))


MAX_CAPTION_BYTES = 1 << 20  # sd-scripts uses the first line; a caption is never this long


def _read_caption(path: Path, out: _Collector) -> tuple[str, tuple[str, ...]]:
    """The first line, and every non-blank line when there are several (both stripped)."""
    reason = not_a_regular_file(path)
    if reason:
        out.problems.append(Problem(str(path), f"caption file is {reason}", "make it a text file or remove it"))
        return "", ()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES)
    except OSError as exc:
        out.problems.append(Problem(str(path), f"cannot read the caption file ({exc.strerror or exc})",
                                    "check its permissions"))
        return "", ()
    if b"\x00" in raw:
        out.problems.append(Problem(str(path), "caption file holds NUL bytes (a binary file, or UTF-16 text?)",
                                    "re-save it as UTF-8 text"))
        return "", ()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not part of the caption
    except UnicodeDecodeError as exc:
        if len(raw) == MAX_CAPTION_BYTES and exc.start >= MAX_CAPTION_BYTES - 4:  # cut inside a character
            text = raw[:exc.start].decode("utf-8-sig")
        else:
            out.problems.append(Problem(str(path), "caption file is not UTF-8", "re-save it as UTF-8"))
            return "", ()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # the line ends Python's text mode knows
    first = lines[0].strip()
    if not first:
        out.problems.append(Problem(str(path), "caption file is empty (its first line is blank)",
                                    "write a caption or delete the file to use the folder's class tokens"))
    others = tuple(line.strip() for line in lines if line.strip())
    return first, others if len(others) > 1 else ()


def _scan_parent(parent: Path, is_reg: bool, caption_extension: str, out: _Collector) -> list[Subset]:
    subsets = []
    for entry in _entries(parent, out):
        path = Path(entry.path)
        if not _is_dir(entry):
            if is_image_name(entry.name):
                out.skipped.append(Skipped(path, "images must be in <repeats>_<name> sub-folders"))
            continue
        parsed = parse_folder_name(entry.name)
        if parsed is None:
            out.skipped.append(Skipped(path, SKIP_PREFIX))
            continue
        repeats, tokens = parsed
        if repeats < 1:
            out.skipped.append(Skipped(path, SKIP_REPEATS))
            continue
        subset = _scan_folder(path, repeats, tokens, is_reg, caption_extension, out)
        if subset.images:
            subsets.append(subset)
    return subsets


def balance_reg(reg: list[Subset], num_train_images: int, out: _Collector) -> list[Subset]:
    """sd-scripts' balancing: reg samples per epoch reach the training sample count.

    First pass: each reg image (subset order, then path order) adds its own
    repeats; later passes add +1 to each image in turn; stop as soon as the
    running total reaches num_train_images. Images never reached are unused.
    """
    flat = [(si, ii, s.repeats) for si, s in enumerate(reg) for ii in range(len(s.images))]
    if not flat or num_train_images == 0:
        return []
    counts: dict[tuple[int, int], int] = {}
    total, first_pass = 0, True
    while total < num_train_images:
        for si, ii, repeats in flat:
            if total >= num_train_images:
                break
            add = repeats if first_pass else 1
            counts[(si, ii)] = counts.get((si, ii), 0) + add
            total += add
        first_pass = False
    if len(counts) < len(flat):
        out.warnings.append(f"some of reg images are not used: {len(flat) - len(counts)} of {len(flat)} "
                            f"(reg images are capped at the {num_train_images} training samples)")
    balanced = []
    for si, subset in enumerate(reg):
        images = tuple(
            replace(im, repeats=counts[(si, ii)])
            for ii, im in enumerate(subset.images) if (si, ii) in counts
        )
        if images:
            balanced.append(replace(subset, is_reg=True, images=images))
    return balanced


def _tag_frequency(subsets: list[Subset]) -> dict[str, dict[str, int]]:
    """ss_tag_frequency: tags per folder, once per image (repeats not counted)."""
    freq: dict[str, dict[str, int]] = {}
    for subset in subsets:
        counter: Counter = Counter()
        for image in subset.images:
            counter.update(t.strip().lower() for t in image.caption.split(",") if t.strip())
        freq[subset.path.name] = dict(counter)
    return freq


def scan_dataset(train_data_dir: Path, reg_data_dir: Path | None, caption_extension: str = ".txt",
                 source: str = "dataset.train_data_dir",
                 holdout: Callable[[list[Subset]], list[Subset]] | None = None) -> DatasetScan:
    """holdout: takes the training folders and returns what is left after the validation split (the
    counts, the reg balance and the tag frequencies are then those of the training part, as in sd-scripts)."""
    caption_extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    out = _Collector()
    missing = []
    for key, folder in ((source, train_data_dir), ("dataset.reg_data_dir", reg_data_dir)):
        if folder is not None and not Path(folder).is_dir():
            missing.append(Problem(f"{key}: {folder}", "folder not found" if not Path(folder).exists()
                                   else "not a folder", "check the path (a path in a config file is relative to "
                                   "that file; one given with --set, to the current folder)"))
    if missing:
        raise DatasetError(missing)
    train = _scan_parent(Path(train_data_dir), False, caption_extension, out)
    reg = _scan_parent(Path(reg_data_dir), True, caption_extension, out) if reg_data_dir else []
    if out.problems:
        raise DatasetError(out.problems)
    if not train:
        skipped = ", ".join(s.path.name for s in out.skipped[:3])
        raise DatasetError(Problem(
            f"{source}: {train_data_dir}", "no usable images found",
            "train_data_dir must be the parent of <repeats>_<name> folders holding the images, e.g. "
            f"{Path(train_data_dir) / '10_mychar'}" + (f"; skipped: {skipped}" if skipped else "")))
    if holdout is not None:
        train = holdout(train)
    num_train = sum(s.repeats * len(s.images) for s in train)
    num_reg = sum(s.repeats * len(s.images) for s in reg)
    reg = balance_reg(reg, num_train, out)

    _report_extensions(out, lambda ext, count: f"{count} image(s) have no {caption_extension} caption but a "
                       f"{ext} file; set dataset.caption_extension = \"{ext}\" to use them")
    return DatasetScan(
        subsets=tuple(train + reg), skipped=tuple(out.skipped), notes=tuple(out.notes),
        warnings=tuple(out.warnings), num_train_images=num_train, num_reg_images=num_reg,
        tag_frequency=_tag_frequency(train + reg),
    )


def _report_extensions(out: _Collector, other_caption_warning: Callable[[str, int], str]) -> None:
    """Notes on mixed-case image extensions and warnings on captions found under another extension."""
    if out.mixed_case:
        examples = ", ".join(p.name for p in out.mixed_case[:3])
        out.notes.append(f"{len(out.mixed_case)} image(s) with a mixed-case extension ({examples}) are used; "
                         "sd-scripts on Linux would skip them")
    for ext, count in out.other_caption_ext.items():
        out.warnings.append(other_caption_warning(ext, count))


def scan_dataset_config(datasets: Sequence[Sequence[SubsetSpec]],
                        holdout: Callable[[list[Subset]], list[Subset]] | None = None) -> list[DatasetScan]:
    """sd-scripts' DreamBooth datasets of a dataset config, one DatasetScan each.

    A subset's images are the files directly in its image_dir; a caption is `<stem><caption_extension>` of
    that subset, else its class_tokens, else "" (sd-scripts warns and trains with an empty caption). Reg
    subsets are balanced to their own dataset's training images. holdout is applied to the training
    subsets of all datasets together (it splits each folder on its own).
    """
    missing = []
    for source in (s for subsets in datasets for s in subsets):
        folder = Path(source.image_dir)
        if not folder.is_dir():
            missing.append(Problem(f"{source.key}.image_dir: {folder}", "folder not found" if not folder.exists()
                                   else "not a folder", "check the path (relative to the config file)"))
    if missing:
        raise DatasetError(missing)
    collectors = [_Collector() for _ in datasets]
    scanned: list[list[Subset]] = []
    for subsets, out in zip(datasets, collectors):
        found = []
        for src in subsets:
            ext = src.options.caption_extension  # dotted by the schema
            subset = _scan_folder(Path(src.image_dir), src.num_repeats, src.class_tokens or "", src.is_reg, ext, out)
            if subset.images:  # sd-scripts ignores a subset without images (with a warning)
                found.append(replace(subset, dataset=src.dataset, index=src.index))
            if src.class_tokens is None and any(i.caption_source == "class_tokens" for i in subset.images):
                out.warnings.append(f"{src.key}: some images have no {ext} caption and the subset has no "
                                    "class_tokens: they train with an empty caption (as in sd-scripts)")
        scanned.append(found)
    problems = [p for out in collectors for p in out.problems]
    if problems:
        raise DatasetError(problems)
    if not any(not s.is_reg for found in scanned for s in found):
        raise DatasetError(Problem("datasets", "no usable training images in any subset",
                                   "each [[datasets.subsets]] image_dir must hold the images directly "
                                   "(not in sub-folders); is_reg subsets alone train nothing"))
    train_all = [s for found in scanned for s in found if not s.is_reg]
    if holdout is not None:
        train_all = holdout(train_all)
    results = []
    for d_index, (found, out) in enumerate(zip(scanned, collectors)):
        train = [s for s in train_all if s.dataset == d_index]
        reg = [s for s in found if s.is_reg]
        num_train = sum(s.repeats * len(s.images) for s in train)
        num_reg = sum(s.repeats * len(s.images) for s in reg)
        if not train:
            out.warnings.append(f"datasets[{d_index}] has no training images: it adds no batches")
        reg = balance_reg(reg, num_train, out)
        _report_extensions(out, lambda ext, count: f"{count} image(s) have no caption file of their subset's "
                           f"caption_extension but a {ext} file; set caption_extension = \"{ext}\" in that subset "
                           "to use them")
        # subsets keep the config's order (training and reg interleaved as written)
        ordered = sorted(train + reg, key=lambda s: s.index if s.index is not None else -1)
        results.append(DatasetScan(
            subsets=tuple(ordered), skipped=tuple(out.skipped), notes=tuple(out.notes),
            warnings=tuple(out.warnings), num_train_images=num_train, num_reg_images=num_reg,
            tag_frequency=_tag_frequency(sorted(train + [s for s in found if s.is_reg], key=lambda s: s.index or 0)),
            img_counts={s.index: len(s.images) for s in train + [s for s in found if s.is_reg] if s.index is not None},
        ))
    return results
