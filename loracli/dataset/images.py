"""Image files: which names count as images, their size from the header, and their pixels.

One module opens images, for the plan (size only, no pixels) and for the loader
(pixels): both apply the EXIF orientation the same way, so a phone photo is
planned and trained upright, and both refuse the same files (not a regular file,
a decompression bomb, unreadable). Pillow is torch-free; numpy is imported only
when pixels are decoded.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# sd-scripts' IMAGE_EXTENSIONS (lower-case; it also lists the all-upper forms).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Pillow's own decompression-bomb limit (2 × MAX_IMAGE_PIXELS): ~179 megapixels, far above any
# training image; a header claiming more is a crafted file or a mistake.
MAX_PIXELS = 2 * 89_478_485

# EXIF Orientation tag (0x0112) → the Pillow transpose that makes the picture upright.
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}


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


def not_a_regular_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file without blocking or failing (None: a regular file).

    Uses stat only, never open(): opening a FIFO would wait for a writer forever.
    """
    try:
        st = os.stat(path)  # follows symbolic links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"a dangling symbolic link (to {target})"
        if exc.errno == errno.ENOENT:
            return "not found (removed while being read?)"
        return exc.strerror or "cannot be read"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "not a regular file"


def _orientation(im: PILImage) -> int:
    """The EXIF orientation from the header (1 = upright); garbage EXIF counts as upright."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 -- Pillow raises many types on crafted EXIF; the pixels are still fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open(path: Path) -> PILImage:
    """Image.open after the checks that keep it from blocking or exploding; ValueError says why not."""
    from PIL import Image, UnidentifiedImageError

    reason = not_a_regular_file(path)
    if reason:
        raise ValueError(f"it is {reason}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"its header claims more than {MAX_PIXELS / 1e6:.0f} megapixels "
                         "(a decompression bomb, or an image far too large to train on)") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown format or damaged header)") from None
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    except (ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ValueError("image header gives no size")
    if w * h > MAX_PIXELS:
        im.close()
        raise ValueError(f"its header claims {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                         f"{MAX_PIXELS / 1e6:.0f} MP limit (a decompression bomb, or far too large to train on)")
    return im


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the picture is seen: after its EXIF orientation. Reads the header only.

    A file that cannot be opened (not a regular file, a bomb, damaged) raises ValueError with the reason.
    """
    im = _open(path)
    try:
        w, h = im.size
        return (int(h), int(w)) if _orientation(im) in _SWAPS_SIDES else (int(w), int(h))
    finally:
        im.close()


def load_rgb(path: Path) -> PILImage:
    """The decoded picture, upright (EXIF orientation applied, as in `read_image_size`) and in RGB.

    Modes are converted so that a picture looks as it should: 16-bit and 32-bit grayscale are
    scaled into 8 bits (a plain convert clips them to white), float images from [0, 1]; modes with
    alpha (RGBA, LA, PA, P with a transparent colour) keep their colour channels and drop alpha,
    as sd-scripts does for RGBA. ValueError says why a file cannot be used.
    """
    return load_rgb_and_alpha(path, alpha=False)[0]


def load_rgb_and_alpha(path: Path, alpha: bool = True) -> tuple[PILImage, PILImage | None]:
    """`load_rgb`, plus the alpha channel as an upright "L" image when the file has one (alpha bands,
    a palette's transparent colour) and `alpha` is asked for; None for a file without transparency,
    which sd-scripts' alpha_mask treats as fully opaque."""
    from PIL import Image

    im = _open(path)
    try:
        orientation = _orientation(im)
        try:
            im.load()
            rgb = _to_rgb(im)
            band = _alpha_band(im) if alpha else None
        except (OSError, SyntaxError, EOFError, struct.error) as exc:
            raise ValueError(f"cannot decode the image ({exc})") from None
    finally:
        im.close()
    transpose = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}.get(orientation)
    if transpose is None:
        return rgb, band
    return rgb.transpose(transpose), None if band is None else band.transpose(transpose)


def load_mask(path: Path) -> PILImage:
    """A conditioning_data_dir mask: the red channel of the picture in RGB (what sd-scripts reads), upright."""
    return load_rgb(path).getchannel("R")


def _alpha_band(im: PILImage) -> PILImage | None:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    if mode in ("La", "RGBa"):  # premultiplied: the alpha band is the same
        return im.getchannel("A")
    return None


def _to_rgb(im: PILImage) -> PILImage:
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        import numpy as np

        values = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = values / 257.0  # 0..65535 → 0..255
        elif mode == "F":
            scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
        else:  # 32-bit "I": Pillow's mode for 16-bit PNGs in some versions
            top = values.max() if values.size else 0
            scaled = values / 257.0 if 255 < top <= 65535 else values * (255.0 / top) if top > 65535 else values
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert its colour mode {mode} to RGB ({exc})") from None
