"""Bucketing numbers against the sd-scripts reference (sd-scripts-behaviour.md §2)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loracli.buckets import (
    BucketAssignment,
    BucketSelector,
    adjust_bucket_limits,
    assign_fixed,
    assign_no_upscale,
    count_batches,
    make_bucket_resolutions,
    mean_ar_error,
)

ROOT = Path(__file__).resolve().parents[2]


def _parse(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.strip().split("x")) for item in text.split(",")]


# §2.5, copied from the reference tables.
SD_17 = _parse("256x832, 256x896, 256x960, 256x1024, 320x704, 320x768, 384x640, 448x576, 512x512, "
               "576x448, 640x384, 704x320, 768x320, 832x256, 896x256, 960x256, 1024x256")
SDXL_41 = _parse(
    "256x2048, 320x2048, 384x2048, 448x2048, 512x1856, 512x1920, 512x1984, 512x2048, 576x1664, "
    "576x1728, 576x1792, 640x1536, 640x1600, 704x1408, 704x1472, 768x1280, 768x1344, 832x1216, "
    "896x1152, 960x1088, 1024x1024, 1088x960, 1152x896, 1216x832, 1280x768, 1344x768, 1408x704, "
    "1472x704, 1536x640, 1600x640, 1664x576, 1728x576, 1792x576, 1856x512, 1920x512, 1984x512, "
    "2048x256, 2048x320, 2048x384, 2048x448, 2048x512")


def test_sd_17_buckets():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD_17


def test_sdxl_41_buckets():
    assert make_bucket_resolutions((1024, 1024), 256, 2048, 64) == SDXL_41


@pytest.mark.parametrize("resolution, lo, hi, step, count", [
    ((512, 512), 256, 1024, 32, 33),
    ((1024, 1024), 256, 2048, 32, 81),
    ((768, 768), 256, 1024, 64, 19),
    ((512, 768), 256, 1024, 64, 19),
    ((1024, 1024), 256, 1024, 64, 25),  # SDXL with the default max: the warned-about 25
])
def test_other_bucket_counts(resolution, lo, hi, step, count):
    buckets = make_bucket_resolutions(resolution, lo, hi, step)
    assert len(buckets) == count
    assert buckets == sorted(set(buckets))


def test_512x768_has_square_576():
    assert (576, 576) in make_bucket_resolutions((512, 768), 256, 1024, 64)


def test_sdxl_default_max_is_every_w_by_1024():
    buckets = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    expected = {(w, 1024) for w in range(256, 1025, 64)} | {(1024, w) for w in range(256, 1025, 64)}
    assert set(buckets) == expected


@pytest.mark.parametrize("lo, hi, step, expected, n_notes", [
    (256, 1024, 64, (256, 1024), 0),
    (300, 1000, 64, (256, 1024), 2),
    (250, 1024, 64, (192, 1024), 1),
    (256, 1025, 64, (256, 1088), 1),
])
def test_adjust_bucket_limits(lo, hi, step, expected, n_notes):
    new_lo, new_hi, notes = adjust_bucket_limits(lo, hi, step)
    assert (new_lo, new_hi) == expected
    assert len(notes) == n_notes
    if notes:
        assert "rounded" in " ".join(notes)


# §2.5 assignment table at 512x512 / 256 / 1024 / 64:
# image, normal bucket, normal resized, normal crop, no_upscale bucket, resized, crop, normal ar error
SD_TABLE = [
    ((512, 512), (512, 512), (512, 512), (0, 0), (512, 512), (512, 512), (0, 0), 0.0),
    ((768, 512), (640, 384), (640, 427), (0, 21), (576, 384), (576, 384), (0, 0), 0.1667),
    ((512, 768), (384, 640), (427, 640), (21, 0), (384, 576), (384, 576), (0, 0), -0.0667),
    ((1024, 1024), (512, 512), (512, 512), (0, 0), (512, 512), (512, 512), (0, 0), 0.0),
    ((1920, 1080), (640, 384), (683, 384), (21, 0), (640, 384), (683, 384), (21, 0), -0.1111),
    ((300, 900), (256, 832), (277, 832), (10, 0), (256, 768), (256, 768), (0, 0), -0.0256),
    ((2000, 500), (1024, 256), (1024, 256), (0, 0), (1024, 256), (1024, 256), (0, 0), 0.0),
    ((640, 480), (576, 448), (597, 448), (10, 0), (512, 384), (512, 384), (0, 0), -0.0476),
    ((333, 777), (320, 768), (329, 768), (4, 0), (320, 768), (333, 777), (6, 4), -0.0119),
]


@pytest.mark.parametrize("row", SD_TABLE, ids=lambda r: f"{r[0][0]}x{r[0][1]}")
def test_sd_assignment_normal(row):
    size, bucket, resized, crop, *_, ar_error = row
    a = BucketSelector(SD_17).assign(size)
    assert (a.bucket, a.resized, a.crop_offset) == (bucket, resized, crop)
    assert round(a.ar_error, 4) == ar_error


@pytest.mark.parametrize("row", SD_TABLE, ids=lambda r: f"{r[0][0]}x{r[0][1]}")
def test_sd_assignment_no_upscale(row):
    size, *_, bucket, resized, crop, _ = row
    a = assign_no_upscale(size, (512, 512), 64)
    assert (a.bucket, a.resized, a.crop_offset) == (bucket, resized, crop)
    assert a.ar_error == bucket[0] / bucket[1] - size[0] / size[1]


# The second §2.5 table (its header row is missing in the reference; the values
# are SDXL 1024x1024 / 256 / 2048 / 64): image, normal bucket+resized, no_upscale bucket+resized.
SDXL_TABLE = [
    ((512, 512), (1024, 1024), (1024, 1024), (512, 512), (512, 512)),
    ((768, 512), (1216, 832), (1248, 832), (768, 512), (768, 512)),
    ((512, 768), (832, 1216), (832, 1248), (512, 768), (512, 768)),
    ((1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024)),
    ((1920, 1080), (1344, 768), (1365, 768), (1344, 768), (1365, 768)),
    ((300, 900), (576, 1728), (576, 1728), (256, 896), (300, 900)),
    ((2000, 500), (2048, 512), (2048, 512), (1984, 448), (2000, 500)),
    ((640, 480), (1152, 896), (1195, 896), (640, 448), (640, 480)),
    ((333, 777), (640, 1536), (658, 1536), (320, 768), (333, 777)),
]


@pytest.mark.parametrize("row", SDXL_TABLE, ids=lambda r: f"{r[0][0]}x{r[0][1]}")
def test_sdxl_assignment(row):
    size, bucket, resized, nu_bucket, nu_resized = row
    a = BucketSelector(SDXL_41).assign(size)
    assert (a.bucket, a.resized) == (bucket, resized)
    b = assign_no_upscale(size, (1024, 1024), 64)
    assert (b.bucket, b.resized) == (nu_bucket, nu_resized)


def test_mean_ar_error_of_the_table():
    selector = BucketSelector(SD_17)
    assignments = [selector.assign(row[0]) for row in SD_TABLE]
    expected = sum(abs(row[-1]) for row in SD_TABLE) / len(SD_TABLE)
    assert mean_ar_error(assignments) == pytest.approx(expected, abs=1e-4)
    assert mean_ar_error([a.ar_error for a in assignments]) == mean_ar_error(assignments)
    assert mean_ar_error([]) is None


def test_no_upscale_just_under_max_area_is_cropped_a_lot():
    a = assign_no_upscale((513, 511), (512, 512), 64)
    assert a.bucket == (512, 448)
    assert a.resized == (513, 511)  # 262143 px < 262144: not resized
    assert a.crop_offset == (0, 31)  # (513-512)//2, (511-448)//2


@pytest.mark.parametrize("size", [(50, 50), (50, 600), (600, 50), (63, 63)])
def test_no_upscale_side_below_step_is_a_clear_error(size):
    with pytest.raises(ValueError, match="too small"):
        assign_no_upscale(size, (512, 512), 64)


def test_no_upscale_huge_sliver_is_a_clear_error():
    # 20000x100 is over the max area; the height rounds to 0 where sd-scripts divides by it.
    with pytest.raises(ValueError, match="too small"):
        assign_no_upscale((20000, 100), (512, 512), 64)


def test_no_upscale_width_first_wins_when_closer():
    # 1000x3000 (ar 1/3) over 512x512: rw = 295.6, rh = 886.8.
    # width first: bw = 296 -> 256, bh = 768 -> 768; 256/768 = 1/3, error 0.
    # height first: bh = 887 -> 832, bw = 277.8 -> 277 -> 256; 256/832, error 0.0256.
    # Width wins: resized (256, int(768 + 0.5)) = (256, 768) (height first would give 277x832).
    a = assign_no_upscale((1000, 3000), (512, 512), 64)
    assert (a.bucket, a.resized, a.crop_offset) == ((256, 768), (256, 768), (0, 0))


def test_no_upscale_height_first_wins_when_closer():
    # 4000x3000 (ar 4/3): width first 591.2 -> 576, 576/ar = 432 -> 384: 1.5, error 0.1667;
    # height first 443.4 -> 384, 384*ar = 512 -> 512: error 0. Resized (512, 384).
    a = assign_no_upscale((4000, 3000), (512, 512), 64)
    assert (a.bucket, a.resized, a.crop_offset) == ((512, 384), (512, 384), (0, 0))


def test_no_upscale_tie_goes_to_height_first():
    # 520x2082, ar 0.24976: rw = 255.88, rh = 1024.49.
    # width first: bw = 256, 256/ar = 1024.98 -> 1024: ratio 0.25.
    # height first: bh = 1024, 1024*ar = 255.75 -> 256: ratio 0.25. Equal errors.
    # Height first wins: (int(255.75 + 0.5), 1024) = (256, 1024); width first would be (256, 1025).
    a = assign_no_upscale((520, 2082), (512, 512), 64)
    assert (a.bucket, a.resized) == ((256, 1024), (256, 1024))


def test_normal_mode_upscales_small_images():
    a = BucketSelector(SD_17).assign((100, 100))
    assert (a.bucket, a.resized, a.crop_offset) == ((512, 512), (512, 512), (0, 0))


def test_exact_size_match_wins_over_same_ratio():
    # (256, 512) and (512, 1024) share ar 0.5; the image's own size is used when listed.
    selector = BucketSelector([(512, 1024), (256, 512), (512, 512)])
    assert selector.assign((512, 1024)).bucket == (512, 1024)
    assert selector.assign((256, 512)).bucket == (256, 512)
    # Any other 0.5 image takes the first in (w, h) order, as argmin does.
    assert selector.assign((300, 600)).bucket == (256, 512)


@pytest.mark.parametrize("buckets, size, expected", [
    # image ar 1.5, bucket ars 1.0 and 2.0: an exact tie -> the first bucket in (w, h) order
    ([(512, 512), (1024, 512)], (768, 512), (512, 512)),
    # same tie where the first sorted bucket has the larger ratio
    ([(512, 256), (600, 600)], (768, 512), (512, 256)),
])
def test_ties_go_to_first_bucket_in_sorted_order(buckets, size, expected):
    assert BucketSelector(buckets).assign(size).bucket == expected


def _argmin_first(buckets: list[tuple[int, int]], size: tuple[int, int]) -> tuple[int, int]:
    """The plain O(n) reading of sd-scripts' select_bucket, to check the bisect one."""
    ordered = sorted(set(buckets))
    if size in ordered:
        return size
    ar = size[0] / size[1]
    errors = [abs(w / h - ar) for w, h in ordered]
    return ordered[errors.index(min(errors))]


@pytest.mark.parametrize("buckets", [
    SD_17, SDXL_41,
    make_bucket_resolutions((1024, 1024), 256, 2048, 32),
    make_bucket_resolutions((512, 768), 256, 1024, 64),
    [(256, 512), (512, 1024), (384, 768), (512, 512), (1024, 512), (768, 384), (640, 640)],
])
def test_bisect_selector_equals_argmin_first_wins(buckets):
    selector = BucketSelector(buckets)
    rng = random.Random(1234)
    sizes = [(rng.randint(8, 4096), rng.randint(8, 4096)) for _ in range(3000)]
    sizes += [(w, h) for w in range(64, 1600, 64) for h in range(64, 1600, 64)]  # many exact ties
    sizes += list(buckets)
    for size in sizes:
        assert selector.assign(size).bucket == _argmin_first(buckets, size), size


def test_selector_is_fast_for_10000_images():
    selector = BucketSelector(make_bucket_resolutions((1024, 1024), 256, 2048, 32))
    sizes = [(300 + i % 1700, 300 + (i * 7) % 1700) for i in range(10_000)]
    start = time.perf_counter()
    for size in sizes:
        selector.assign(size)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("size, resized, crop", [
    ((512, 512), (512, 512), (0, 0)),
    ((768, 512), (768, 512), (128, 0)),
    ((300, 900), (512, 1536), (0, 512)),
    ((1000, 700), (731, 512), (109, 0)),  # 1000*0.7314 = 731.4 -> 731
])
def test_assign_fixed_covers_one_bucket(size, resized, crop):
    a = assign_fixed(size, (512, 512))
    assert (a.bucket, a.resized, a.crop_offset) == ((512, 512), resized, crop)
    assert a.ar_error == 1 - size[0] / size[1]


def test_assign_fixed_non_square_resolution():
    a = assign_fixed((1920, 1080), (768, 512))
    # ar 1.778 > 1.5: match height, scale 512/1080 -> width 910.2 -> 910, crop (910-768)//2 = 71
    assert (a.bucket, a.resized, a.crop_offset) == ((768, 512), (910, 512), (71, 0))


def test_count_batches_keeps_partial_batches():
    counts = {(512, 512): 20, (640, 384): 10, (384, 640): 6, (256, 1024): 1}
    assert count_batches(counts, 6) == {(512, 512): 4, (640, 384): 2, (384, 640): 1, (256, 1024): 1}
    assert count_batches(counts, 1) == counts
    with pytest.raises(ValueError):
        count_batches(counts, 0)


def test_assignment_is_frozen():
    a = BucketSelector(SD_17).assign((512, 512))
    assert isinstance(a, BucketAssignment)
    with pytest.raises(AttributeError):
        a.bucket = (1, 1)  # type: ignore[misc]


def test_import_needs_no_torch_or_numpy():
    code = ("import sys, loracli.buckets, loracli.schedule; "
            "bad = sorted(m for m in ('torch', 'numpy') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
