"""[[datasets]] on the run side: batches per dataset with its own size, each image with its subset's options."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest

from loracli.config.loader import resolve_config
from loracli.dataset.subsets import image_options
from loracli.plan import build_plan
from loracli.run.data import BucketBatches, ExampleLoader


@pytest.fixture
def two_datasets(tmp_path, make_image):
    for i in range(5):
        make_image(tmp_path / "a" / f"{i}.png", 64, 64, color=(i * 40, 10, 10))
        (tmp_path / "a" / f"{i}.txt").write_text(f"first{i}, red, blue, green\n")
    for i in range(3):
        make_image(tmp_path / "b" / f"{i}.png", 128, 64, color=(10, i * 40, 10))
        (tmp_path / "b" / f"{i}.txt").write_text(f"second{i}, red, blue, green\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
[training]
max_train_epochs = 2
train_batch_size = 2
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "a"
num_repeats = 3
[[datasets.subsets]]
image_dir = "b"
caption_prefix = "pfx"
caption_suffix = "sfx"
flip_aug = true
keep_tokens = 1
shuffle_caption = true
[[datasets]]
resolution = 128
batch_size = 3
[[datasets.subsets]]
image_dir = "a"
""")
    resolved = resolve_config(cfg)
    return build_plan(resolved), resolved.config


def test_batches_per_dataset_with_its_own_size(two_datasets):
    plan, _ = two_datasets
    batches = BucketBatches(plan, 2, dataset_seed=3)
    assert batches.total_batches() == plan.batches_per_epoch
    samples: dict[tuple[int, tuple[int, int]], int] = Counter()
    for image in plan.images:
        samples[(image.dataset, tuple(image.bucket))] += image.repeats
    sizes = {0: 2, 1: 3}
    # sd-scripts' DatasetGroup: each dataset's buckets cut by that dataset's batch size
    assert plan.batches_per_epoch == sum(math.ceil(n / sizes[d]) for (d, _), n in samples.items())
    for epoch in (1, 2):
        per_key: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for batch in batches.epoch_batches(epoch):
            keys = {(plan.images[i].dataset, tuple(plan.images[i].bucket)) for i in batch}
            assert len(keys) == 1  # never mixing datasets or buckets
            (key,) = keys
            assert len(batch) <= sizes[key[0]]
            per_key[key].append(len(batch))
        for key, lengths in per_key.items():
            n, size = samples[key], sizes[key[0]]
            assert sorted(lengths) == sorted([size] * (n // size) + ([n % size] if n % size else []))
    assert batches.epoch_batches(1) != batches.epoch_batches(2)


def test_each_image_gets_its_subsets_options(two_datasets):
    plan, config = two_datasets
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, load_pixels_=False, seed=5,
                           image_options=image_options(config, plan.images))
    flipped_b, flipped_a = 0, 0
    for step in range(12):
        batch = loader(list(range(len(plan.images))), 1, step)
        for index, caption, flip in zip(batch.indices, batch.captions, batch.flipped):
            image = plan.images[index]
            if image.subset_index == 1:  # b: "pfx " + caption + " sfx" (sd-scripts), first tag kept in place
                assert caption.startswith("pfx second") and "sfx" in caption
                flipped_b += flip
            else:
                assert caption == image.caption  # a: as written, never flipped
                flipped_a += flip
    assert flipped_a == 0 and flipped_b > 0
    # the same folder in the second dataset is bucketed at that dataset's resolution
    assert {tuple(i.bucket) for i in plan.images if i.dataset == 1} == {(128, 128)}


def test_shuffle_stays_within_the_subset_that_asks(two_datasets):
    plan, config = two_datasets
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, load_pixels_=False, seed=1,
                           image_options=image_options(config, plan.images))
    b = [i for i, im in enumerate(plan.images) if im.subset_index == 1]
    orders = {tuple(loader(b, 1, s).captions[0].split(", ")[1:]) for s in range(20)}
    assert len(orders) > 1  # shuffled after the kept first tag
    a = [i for i, im in enumerate(plan.images) if im.subset_index == 0]
    assert {loader(a, 1, s).captions[0] for s in range(20)} == {plan.images[a[0]].caption}  # never shuffled
