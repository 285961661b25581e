"""color_aug is sd-scripts' AugHelper.color_aug, byte for byte (numpy only, no torch).

The formula is transcribed here from sd-scripts (train_util.AugHelper.color_aug): with
probability 0.33, half the time a hue shift of U(-8, 8) in OpenCV's 8-bit HSV of the RGB array
read as BGR, else `np.clip(image ** U(0.95, 1.05), 0, 255).astype(uint8)`. The OpenCV colour
conversions are checked on hand-computed pixels and against OpenCV's stored answers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from loracli.run.augment import bgr_to_hsv, color_augment, hsv_to_bgr
from tests.data.make_opencv_colour_sample import sample_inputs

DATA = Path(__file__).resolve().parents[1] / "data"


def _sd_scripts_color_aug(image: np.ndarray, draw: random.Random) -> np.ndarray:
    """sd-scripts' color_aug with its random module replaced by `draw` (same call order)."""
    if draw.random() <= 0.33:
        if draw.random() > 0.5:
            hsv_img = bgr_to_hsv(image)
            hue_shift = draw.uniform(-8, 8)
            if hue_shift < 0:
                hue_shift = 180 + hue_shift
            hsv_img[:, :, 0] = (hsv_img[:, :, 0] + hue_shift) % 180
            image = hsv_to_bgr(hsv_img)
        else:
            gamma = draw.uniform(0.95, 1.05)
            image = np.clip(image**gamma, 0, 255).astype(np.uint8)
    return image


def _picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 64, 3), dtype=np.uint8)


def test_hand_computed_hsv_round_trip() -> None:
    # RGB red read as BGR is blue to OpenCV: h = (4·255·hdiv[255] + 2048) >> 12 with hdiv[255] = rint(122880/255)
    # = 482 → 120; S = V = 255.
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    assert bgr_to_hsv(red).tolist() == [[[120, 255, 255]]]
    # hue 125 (after a +5.3 shift, truncated): 125·6/180 = 4.1667 → sector 4: b = v, g = p = 0, r = t = 0.1667·255
    # = 42.5, truncated by OpenCV's vector path to 42.
    assert hsv_to_bgr(np.array([[[125, 255, 255]]], dtype=np.uint8)).tolist() == [[[255, 0, 42]]]
    grey = np.array([[[0, 0, 77]]], dtype=np.uint8)  # no saturation: every channel is v
    assert hsv_to_bgr(grey).tolist() == [[[77, 77, 77]]]


def test_gamma_is_on_raw_values() -> None:
    # sd-scripts' "random gamma" raises 0..255 to the power: white drops to 255**0.95 = 193.6 → 193.
    white = np.full((1, 1, 3), 255, dtype=np.uint8)
    assert int(np.clip(white**0.95, 0, 255).astype(np.uint8)[0, 0, 0]) == 193


@pytest.mark.parametrize("seed", range(40))
def test_color_augment_equals_the_transcribed_formula(seed: int) -> None:
    picture = _picture(seed)
    ours = color_augment(picture.copy(), random.Random(seed))
    theirs = _sd_scripts_color_aug(picture.copy(), random.Random(seed))
    assert np.array_equal(ours, theirs)


def test_share_and_kinds_of_changes() -> None:
    """About a third of the images change; both kinds occur; the rest are untouched."""
    picture = _picture()
    rng = random.Random(1234)
    changed = sum(not np.array_equal(color_augment(picture, rng), picture) for _ in range(3000))
    assert 0.29 < changed / 3000 < 0.37
    # a seed that draws the hue branch and one that draws gamma (both checked against the formula above)
    kinds = set()
    for seed in range(60):
        draw = random.Random(seed)
        if draw.random() <= 0.33:
            kinds.add("hue" if draw.random() > 0.5 else "gamma")
    assert kinds == {"hue", "gamma"}


def test_matches_opencv_on_a_stored_sample() -> None:
    """OpenCV 4.10's answers on 16,384 random BGR colours and HSV values, stored by
    tests/data/make_opencv_colour_sample.py (which needs cv2; the suite does not). Checked once
    against cv2 on every colour (16.7 M BGR, 11.8 M HSV): 0 differences."""
    stored = np.load(DATA / "opencv_colour_sample.npz")
    bgr, hsv = sample_inputs()
    assert str(stored["opencv_version"]).startswith("4.10")
    assert np.array_equal(bgr_to_hsv(bgr), stored["bgr_to_hsv"])
    assert np.array_equal(hsv_to_bgr(hsv), stored["hsv_to_bgr"])
