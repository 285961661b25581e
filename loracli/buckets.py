"""Aspect-ratio bucketing, computed exactly as kohya sd-scripts does it.

Pure Python (no numpy): the plan side must not need torch or numpy, and the
numbers here decide which bucket, resized size and crop every image gets, so
they must match sd-scripts bit for bit (same float operations, same ties).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: its bucket, the size it is resized to, and the
    centre-crop offset (x, y) that trims the resized image to the bucket."""

    bucket: Size
    resized: Size
    crop_offset: Size
    ar_error: float  # bucket_ar - image_ar, as sd-scripts logs it


def adjust_bucket_limits(min_reso: int, max_reso: int, step: int) -> tuple[int, int, list[str]]:
    """Round min down and max up to multiples of `step` (sd-scripts warns and does the same)."""
    if step <= 0:
        raise ValueError(f"bucket_reso_steps must be positive, got {step}")
    notes: list[str] = []
    if min_reso % step:
        new_min = min_reso - min_reso % step
        notes.append(f"min_bucket_reso {min_reso} is not a multiple of bucket_reso_steps {step}; "
                     f"rounded down to {new_min} (as sd-scripts does)")
        min_reso = new_min
    if max_reso % step:
        new_max = max_reso + step - max_reso % step
        notes.append(f"max_bucket_reso {max_reso} is not a multiple of bucket_reso_steps {step}; "
                     f"rounded up to {new_max} (as sd-scripts does)")
        max_reso = new_max
    return min_reso, max_reso, notes


def make_bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """The predefined buckets: the square of the same area, plus every (w, h) and
    (h, w) whose h is the largest step multiple keeping w*h within the area."""
    if step <= 0:
        raise ValueError(f"bucket_reso_steps must be positive, got {step}")
    area = resolution[0] * resolution[1]
    # isqrt == floor(math.sqrt(area)) for any realistic area, and never rounds up.
    side = math.isqrt(area) // step * step
    resos: set[Size] = {(side, side)}
    width = min_reso
    while width <= max_reso:
        if width > 0:  # a zero min would divide by zero; sd-scripts asserts min >= resolution first
            height = min(max_reso, (area // width) // step * step)
            if height >= min_reso:
                resos.add((width, height))
                resos.add((height, width))
            elif (area // width) // step * step < min_reso:
                break  # heights only shrink as width grows: no later width fits (bounded even for max 1e12)
        width += step
    return sorted(resos)


def _cover(size: Size, bucket: Size, image_ar: float) -> BucketAssignment:
    """Scale the image so it covers the bucket, round half up, centre-crop the overflow."""
    w, h = size
    bw, bh = bucket
    bucket_ar = bw / bh
    # The longer side (relative to the bucket) overflows, so match the other one.
    scale = bh / h if image_ar > bucket_ar else bw / w
    resized = (int(w * scale + 0.5), int(h * scale + 0.5))
    return BucketAssignment(bucket, resized, _centre_crop(resized, bucket), bucket_ar - image_ar)


def _centre_crop(resized: Size, bucket: Size) -> Size:
    return (max(resized[0] - bucket[0], 0) // 2, max(resized[1] - bucket[1], 0) // 2)


def _check_size(size: Size) -> None:
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"image size {size[0]}x{size[1]} is empty")


class BucketSelector:
    """Picks a predefined bucket for an image size (sd-scripts' normal mode).

    sd-scripts takes argmin |bucket_ar - image_ar| over all buckets (ties: the
    first bucket in (w, h) order). Float subtraction is monotonic, so the
    minimum sits next to the image's position among the sorted aspect ratios;
    we bisect there and widen over exact ties, which gives the same answer in
    O(log n) instead of O(n) per image.
    """

    def __init__(self, buckets: Iterable[Size]):
        self.buckets: list[Size] = sorted(set(buckets))
        if not self.buckets:
            raise ValueError("no buckets to choose from")
        self._bucket_set = set(self.buckets)
        # One entry per distinct aspect ratio, keeping the first bucket index
        # (argmin returns the first of equal errors, so later duplicates never win).
        first: dict[float, int] = {}
        for index, (w, h) in enumerate(self.buckets):
            first.setdefault(w / h, index)
        self._ars: list[float] = sorted(first)
        self._first_index: list[int] = [first[ar] for ar in self._ars]

    def nearest(self, image_ar: float) -> Size:
        """The bucket numpy's argmin(|ar - image_ar|) would pick."""
        ars = self._ars
        pos = bisect_right(ars, image_ar)  # ars[:pos] <= image_ar < ars[pos:]
        # Errors fall towards pos from both sides, so the best is at pos-1 or pos.
        start = min((i for i in (pos - 1, pos) if 0 <= i < len(ars)),
                    key=lambda i: abs(ars[i] - image_ar))
        best = abs(ars[start] - image_ar)
        # Equal errors form one run around `start`; argmin takes the first bucket of it.
        lo = hi = start
        while lo > 0 and abs(ars[lo - 1] - image_ar) == best:
            lo -= 1
        while hi + 1 < len(ars) and abs(ars[hi + 1] - image_ar) == best:
            hi += 1
        return self.buckets[min(self._first_index[lo:hi + 1])]

    def assign(self, size: Size) -> BucketAssignment:
        _check_size(size)
        w, h = size
        image_ar = w / h
        # An image already at a bucket size keeps it, even if another bucket has the same ratio.
        bucket = (w, h) if (w, h) in self._bucket_set else self.nearest(image_ar)
        return _cover((w, h), bucket, image_ar)


def _round_to_step(x: float, step: int) -> int:
    rounded = int(x + 0.5)
    return rounded - rounded % step


def assign_no_upscale(size: Size, resolution: Size, step: int) -> BucketAssignment:
    """bucket_no_upscale: shrink only images over the max area, then floor to `step`.

    sd-scripts crashes (ZeroDivisionError) where a side rounds to 0; we raise a
    ValueError that says why, and the caller names the file.
    """
    _check_size(size)
    w, h = size
    image_ar = w / h
    max_area = resolution[0] * resolution[1]
    too_small = (f"image {w}x{h} is too small or too narrow for bucket_no_upscale with "
                 f"bucket_reso_steps {step}: a side would round to 0 pixels")
    if w * h > max_area:
        # Keep the aspect ratio at the max area, then try rounding width first and
        # height first; the one closer to the original ratio wins (tie: height first).
        rw = math.sqrt(max_area * image_ar)
        rh = max_area / rw
        bw = _round_to_step(rw, step)
        bh_from_w = _round_to_step(bw / image_ar, step)
        bh = _round_to_step(rh, step)
        bw_from_h = _round_to_step(bh * image_ar, step)
        if bh_from_w == 0 or bh == 0:
            raise ValueError(too_small)
        err_w = abs(bw / bh_from_w - image_ar)
        err_h = abs(bw_from_h / bh - image_ar)
        if err_w < err_h:
            resized = (bw, int(bw / image_ar + 0.5))
        else:
            resized = (int(bh * image_ar + 0.5), bh)
    else:
        resized = (w, h)  # never scaled up
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        raise ValueError(too_small)
    return BucketAssignment(bucket, resized, _centre_crop(resized, bucket), bucket[0] / bucket[1] - image_ar)


def assign_fixed(size: Size, resolution: Size, resize: bool = True) -> BucketAssignment:
    """enable_bucket = false: one bucket, the resolution.

    sd-scripts treats the two paths differently. Caching latents goes through its bucket
    manager with the one bucket: cover-resize and centre-crop (`resize`). Training from
    pixels never resizes: the image is used as it is and cropped to the resolution, at a
    random place (random_crop); `fixed_size_problem` says which images it refuses.
    """
    _check_size(size)
    w, h = size
    if resize:
        return _cover((w, h), (resolution[0], resolution[1]), w / h)
    return BucketAssignment(tuple(resolution), (w, h), _centre_crop((w, h), resolution),
                            resolution[0] / resolution[1] - w / h)


def fixed_size_problem(size: Size, resolution: Size, random_crop: bool) -> tuple[str, str] | None:
    """(message, fix) when sd-scripts' unbucketed, uncached path refuses an image of `size`, else None.

    It stops with "image size is small" when a side is under the resolution (after its crop),
    and with "image too large, but cropping and bucketing are disabled" when a side is over
    it without random_crop (the first check it makes; a small side is reported first here,
    because random_crop would not help it).
    """
    (w, h), (rw, rh) = size, resolution
    if w < rw or h < rh:
        return (f"is {w}x{h}, smaller than the resolution {rw}x{rh}: with enable_bucket = false and latents "
                f"not cached, sd-scripts never resizes (it stops with 'image size is small')",
                f"set enable_bucket = true, or enlarge the image to at least {rw}x{rh}")
    if (w > rw or h > rh) and not random_crop:
        return (f"is {w}x{h}, larger than the resolution {rw}x{rh}: with enable_bucket = false and latents "
                f"not cached, sd-scripts only crops, and only at random (it stops with 'image too large, but "
                f"cropping and bucketing are disabled')",
                f"set random_crop = true or enable_bucket = true, or crop the image to {rw}x{rh}")
    return None


def count_batches(bucket_counts: dict[Size, int], batch_size: int) -> dict[Size, int]:
    """Batches per bucket: ceil(n / batch_size); partial batches are kept, buckets never mix."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return {bucket: -(-n // batch_size) for bucket, n in bucket_counts.items()}


def mean_ar_error(errors: Iterable[float | BucketAssignment]) -> float | None:
    """Mean |ar_error| over images, one entry per image (repeats not counted),
    as sd-scripts logs `mean_img_ar_error`. None when there are no images."""
    values = [abs(e.ar_error if isinstance(e, BucketAssignment) else e) for e in errors]
    return sum(values) / len(values) if values else None
