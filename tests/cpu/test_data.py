"""The run side's data against the plan: batch counts, bucket purity, pixels, captions."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from loracli.config.loader import resolve_config
from loracli.plan import build_plan
from loracli.run.data import BucketBatches, ExampleLoader, load_pixels


@pytest.fixture
def plan_and_config(tmp_path, make_image):
    sizes = [(64, 64), (128, 64), (64, 128), (100, 60), (64, 64), (128, 64), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        folder = "3_a" if i < 4 else "1_b"
        make_image(tmp_path / "data" / folder / f"{i}.png", w, h, color=(i * 30, 100, 200))
        (tmp_path / "data" / folder / f"{i}.txt").write_text(f"tag{i}, red, blue\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
shuffle_caption = true
[training]
max_train_epochs = 2
train_batch_size = 2
""")
    resolved = resolve_config(cfg)
    return build_plan(resolved), resolved.config


def test_batches_match_the_plan_and_never_mix_buckets(plan_and_config):
    plan, _ = plan_and_config
    batches = BucketBatches(plan, 2, dataset_seed=5)
    assert batches.total_batches() == plan.batches_per_epoch
    for epoch in (1, 2):
        epoch_batches = batches.epoch_batches(epoch)
        assert len(epoch_batches) == plan.batches_per_epoch
        seen = Counter(i for b in epoch_batches for i in b)
        assert seen == {i: im.repeats for i, im in enumerate(plan.images)}  # every repeat, once
        for b in epoch_batches:
            assert len({tuple(plan.images[i].bucket) for i in b}) == 1
    assert batches.epoch_batches(1) != batches.epoch_batches(2)  # re-shuffled per epoch
    assert batches.epoch_batches(1) == BucketBatches(plan, 2, dataset_seed=5).epoch_batches(1)  # seeded


def test_processes_split_batches_evenly(plan_and_config):
    plan, _ = plan_and_config
    shards = [BucketBatches(plan, 2, 5, rank=r, world=2).epoch_batches(1) for r in range(2)]
    per_process = math.ceil(plan.batches_per_epoch / 2)
    assert [len(s) for s in shards] == [per_process, per_process]
    whole = BucketBatches(plan, 2, 5).epoch_batches(1)
    assert shards[0][: len(whole[0::2])] == whole[0::2]


def test_pixels_are_resized_and_cropped_as_planned(plan_and_config):
    plan, _ = plan_and_config
    odd = next(im for im in plan.images if tuple(im.size) == (100, 60))
    pixels = load_pixels(odd, False, random.Random(0))
    assert pixels.shape == (odd.bucket[1], odd.bucket[0], 3)
    assert pixels.dtype == np.uint8


def test_loader_processes_captions_and_marks_reg(plan_and_config):
    plan, config = plan_and_config
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, load_pixels_=True, seed=3)
    batch = loader([0, 1], epoch=1, step=0)
    assert batch.pixels.shape[0] == 2 and float(batch.pixels.min()) >= -1 and float(batch.pixels.max()) <= 1
    for caption, i in zip(batch.captions, [0, 1]):
        assert sorted(caption.split(", ")) == sorted(plan.images[i].caption.split(", "))
    assert not batch.is_reg.any()


def test_truncated_image_is_a_dataset_error_naming_it(plan_and_config):
    from loracli.errors import DatasetError

    plan, _ = plan_and_config
    image = plan.images[0]
    data = open(image.path, "rb").read()
    open(image.path, "wb").write(data[: len(data) // 2])  # header intact, pixels cut off
    with pytest.raises(DatasetError, match=image.path.rsplit("/", 1)[-1]):
        load_pixels(image, False, random.Random(0))
