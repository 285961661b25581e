"""Shared fixtures: tiny generated images and datasets (no network, no hub)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_image(path: Path, width: int, height: int, color=(120, 80, 200)) -> Path:
    """A real image file with the given size (solid colour, so it stays small)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[
        path.suffix.lower()
    ]
    Image.new("RGB", (width, height), color).save(path, format=fmt)
    return path


@pytest.fixture
def make_image():
    return write_image
