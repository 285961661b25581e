"""Labelled image grids (rows × columns of pictures, a label on each row and column).

Used for `samples/grid.png` (sample rounds × prompts) and `loracli grid`
(LoRA files × strengths). Pillow only: no torch, so it is cheap to call often.
The layout is fixed-size (labels wrap inside their box), so a grid's pixel size
follows from its shape alone: `grid_size`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 160  # row labels
HEADER_LINES = 3  # column labels wrap to at most this many lines
TITLE_HEIGHT = 36
FONT_SIZE = 15
LINE_HEIGHT = 19
PAD = 6
MIN_CELL = 192  # small samples (tiny test models) are enlarged so labels stay in proportion
MAX_CELL = 512
BACKGROUND = (255, 255, 255)
MISSING = (230, 230, 230)


@dataclass(frozen=True)
class Layout:
    cell: tuple[int, int]
    header_height: int = PAD * 2 + LINE_HEIGHT * HEADER_LINES
    label_width: int = LABEL_WIDTH
    title_height: int = TITLE_HEIGHT


def cell_size(images: list[Image.Image]) -> tuple[int, int]:
    """One box for every cell: the largest image, scaled so its long side is MIN_CELL..MAX_CELL."""
    if not images:
        return (MIN_CELL, MIN_CELL)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    long_side = max(w, h)
    scale = min(max(long_side, MIN_CELL), MAX_CELL) / long_side
    return (round(w * scale), round(h * scale))


def grid_size(rows: int, cols: int, layout: Layout) -> tuple[int, int]:
    cw, ch = layout.cell
    return (layout.label_width + cols * cw, layout.title_height + layout.header_height + rows * ch)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, lines: int) -> list[str]:
    chars = max(8, width_px // (FONT_SIZE // 2 + 1))
    wrapped = textwrap.wrap(text, chars) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(0, chars - 1)] + "…"
    return wrapped


def _fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    scale = min(box[0] / image.width, box[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS  # keep small pixels crisp
    return image.convert("RGB").resize(size, resample)


def labelled_grid(cells: list[list[Image.Image | None]], row_labels: list[str], col_labels: list[str],
                  title: str = "", layout: Layout | None = None) -> Image.Image:
    """A grid image; None cells are drawn as grey boxes (a sample not made yet)."""
    present = [c for row in cells for c in row if c is not None]
    layout = layout or Layout(cell_size(present))
    cw, ch = layout.cell
    width, height = grid_size(len(row_labels), len(col_labels), layout)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(), _font(FONT_SIZE + 4)
    if title:
        draw.text((PAD, PAD), _wrap(title, width - 2 * PAD, 1)[0], fill=(0, 0, 0), font=title_font)
    top = layout.title_height + layout.header_height
    for c, label in enumerate(col_labels):
        x = layout.label_width + c * cw
        for i, line in enumerate(_wrap(label, cw - 2 * PAD, HEADER_LINES)):
            draw.text((x + PAD, layout.title_height + PAD + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels):
        y = top + r * ch
        lines = _wrap(label, layout.label_width - 2 * PAD, max(1, ch // LINE_HEIGHT))
        for i, line in enumerate(lines):
            draw.text((PAD, y + PAD + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
        for c in range(len(col_labels)):
            image = cells[r][c] if c < len(cells[r]) else None
            x = layout.label_width + c * cw
            if image is None:
                draw.rectangle((x + 1, y + 1, x + cw - 2, y + ch - 2), fill=MISSING)
                continue
            fitted = _fit(image, (cw, ch))
            canvas.paste(fitted, (x + (cw - fitted.width) // 2, y + (ch - fitted.height) // 2))
    # Thin separators make rows and columns easy to follow in big grids.
    for c in range(len(col_labels) + 1):
        x = layout.label_width + c * cw
        draw.line((x, layout.title_height, x, height), fill=(180, 180, 180))
    for r in range(len(row_labels) + 1):
        y = top + r * ch
        draw.line((0, y, width, y), fill=(180, 180, 180))
    return canvas


def save_png_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
