"""Image files: which names count as images, and their size from the header only."""

from __future__ import annotations

from pathlib import Path

import imagesize

# sd-scripts' IMAGE_EXTENSIONS (lower-case; it also lists the all-upper forms).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


def is_image_name(name: str) -> bool:
    """Case-insensitive, as sd-scripts behaves on Windows (our deliberate choice everywhere)."""
    return extension(name).lower() in IMAGE_EXTENSIONS


def sd_scripts_linux_accepts(name: str) -> bool:
    """sd-scripts globs `*.png` and `*.PNG` only: mixed-case extensions are skipped on Linux."""
    ext = extension(name)
    return ext.lower() in IMAGE_EXTENSIONS and (ext == ext.lower() or ext == ext.upper())


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; never decodes pixels.

    imagesize reads PNG/JPEG/WebP headers in microseconds; PIL (lazy open) covers
    the rest. A file neither can read raises ValueError with the reason.
    """
    try:
        w, h = imagesize.get(str(path))
    except Exception:  # imagesize raises assorted errors on garbage
        w, h = -1, -1
    if w > 0 and h > 0:
        return int(w), int(h)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None
    if w <= 0 or h <= 0:
        raise ValueError("image header gives no size")
    return int(w), int(h)
