"""Regenerate opencv_colour_sample.npz: OpenCV's 8-bit BGR<->HSV conversions on a fixed sample.

Needs `pip install opencv-python-headless==4.10.0.84` (the version sd-scripts pins); the test
suite itself does not (tests/pure/test_color_aug.py reads the stored answers). Run from the
repository root: `python tests/data/make_opencv_colour_sample.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED, ROWS, WIDTH = 20261201, 64, 256  # widths are multiples of 64, as bucket widths are


def sample_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    bgr = rng.integers(0, 256, size=(ROWS, WIDTH, 3), dtype=np.uint8)
    hsv = np.stack([rng.integers(0, 180, size=(ROWS, WIDTH)), rng.integers(0, 256, size=(ROWS, WIDTH)),
                    rng.integers(0, 256, size=(ROWS, WIDTH))], -1).astype(np.uint8)
    return bgr, hsv


if __name__ == "__main__":
    import cv2  # only here: the suite reads the stored answers without it

    bgr, hsv = sample_inputs()
    np.savez_compressed(Path(__file__).with_name("opencv_colour_sample.npz"),
                        bgr_to_hsv=cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV), hsv_to_bgr=cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR),
                        opencv_version=np.array(cv2.__version__))
