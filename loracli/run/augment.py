"""sd-scripts' color_aug, bit for bit, without OpenCV.

sd-scripts (AugHelper.color_aug) touches a third of the images: half of those get a hue
shift of U(-8, 8) in OpenCV's 8-bit HSV (hue 0..179), the other half `pixels ** U(0.95, 1.05)`
on the raw 0..255 values (so a "gamma" of 0.95 darkens white to 193, and above 1 brightens
and clips). It hands RGB pixels to cv2's BGR conversions, so red and blue trade places in
the hue maths; the shift is symmetric, but the exact output is not, so we do the same.

OpenCV is not a dependency: the two 8-bit conversions are transcribed here as integer and
float32 arithmetic that gives cv2's bytes (tests compare every colour when cv2 is installed).
"""

from __future__ import annotations

import random

import numpy as np

HUE_SHIFT_LIMIT = 8  # sd-scripts' hue_shift_limit (albumentations' HueSaturationValue(8, 0, 0))
_HSV_SHIFT = 12  # OpenCV's fixed-point precision for RGB2HSV_b


def _div_table(numerator: float) -> np.ndarray:
    # saturate_cast<int>(double) rounds half to even, as numpy's rint does
    table = np.zeros(256, dtype=np.int64)
    table[1:] = np.rint(numerator / np.arange(1, 256, dtype=np.float64))
    return table


_SDIV = _div_table(float(255 << _HSV_SHIFT))
_HDIV180 = _div_table(float(180 << _HSV_SHIFT) / 6.0)
_HALF = 1 << (_HSV_SHIFT - 1)


def bgr_to_hsv(image: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(image, cv2.COLOR_BGR2HSV) for uint8 (H, W, 3): hue 0..179."""
    b, g, r = (image[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + _HALF) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + _HALF) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


# Which of OpenCV's (v, p, q, t) table entries b, g and r take in each sixth of the hue circle.
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def _one_minus_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 1 - a*b rounded once, as the fused multiply-add OpenCV's compiled vector code uses
    (the float32 product is exact in float64)."""
    return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) for uint8 (H, W, 3) with hue 0..179.

    This is OpenCV's vector path (float32 maths, the sector from truncation, the result
    truncated to 0..255), which converts every pixel of a row whose width is a multiple of
    its vector block: bucket widths are multiples of 64, so that is every pixel sd-scripts
    converts. (OpenCV's scalar tail rounds instead; it only sees the last few pixels of
    rows of other widths.)
    """
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    pre_sector = np.trunc(h)
    h = h - pre_sector
    one = f32(1.0)
    tab = np.stack([v, v * (one - s), v * _one_minus_product(s, h), v * _one_minus_product(s, one - h)], axis=-1)
    sector = (pre_sector - np.trunc(pre_sector * f32(1.0 / 6.0)) * f32(6.0)).astype(np.int64)
    bgr = np.take_along_axis(tab, _SECTORS[sector], axis=-1) * f32(255.0)
    return np.clip(np.trunc(bgr), 0, 255).astype(np.uint8)


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug on uint8 RGB pixels (H, W, 3), drawing from `rng` in its order."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            hsv = bgr_to_hsv(pixels)  # sd-scripts passes RGB to a BGR conversion
            hue_shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
            if hue_shift < 0:
                hue_shift = 180 + hue_shift
            hsv[:, :, 0] = (hsv[:, :, 0] + hue_shift) % 180  # float, truncated back into uint8
            return hsv_to_bgr(hsv)
        gamma = rng.uniform(0.95, 1.05)
        return np.clip(pixels**gamma, 0, 255).astype(np.uint8)
    return pixels
