"""sd-scripts-behaviour.md §2.5 and §3 through `loracli plan --json`, exactly."""

from __future__ import annotations

import json

import pytest

from tests.pure.cli_helpers import run_cli

# image → (normal bucket, normal resized), (no_upscale bucket, no_upscale resized); §2.5 at 512/256/1024/64
TABLE = {
    (512, 512): ((512, 512), (512, 512), (512, 512), (512, 512)),
    (768, 512): ((640, 384), (640, 427), (576, 384), (576, 384)),
    (512, 768): ((384, 640), (427, 640), (384, 576), (384, 576)),
    (1024, 1024): ((512, 512), (512, 512), (512, 512), (512, 512)),
    (1920, 1080): ((640, 384), (683, 384), (640, 384), (683, 384)),
    (300, 900): ((256, 832), (277, 832), (256, 768), (256, 768)),
    (2000, 500): ((1024, 256), (1024, 256), (1024, 256), (1024, 256)),
    (640, 480): ((576, 448), (597, 448), (512, 384), (512, 384)),
    (333, 777): ((320, 768), (329, 768), (320, 768), (333, 777)),
}
CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 512
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
[training]
"""


def plan_json(tmp_path, extra: str, *sets: str) -> dict:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG + extra)
    result = run_cli("plan", "--config", cfg, "--json", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("no_upscale", [False, True])
def test_bucket_table(tmp_path, make_image, no_upscale):
    for w, h in TABLE:
        make_image(tmp_path / "data" / "1_x" / f"{w}x{h}.png", w, h)
    plan = plan_json(tmp_path, "max_train_epochs = 1\n", f"dataset.bucket_no_upscale={str(no_upscale).lower()}")
    for image in plan["images"]:
        size = tuple(image["size"])
        normal_bucket, normal_resized, nu_bucket, nu_resized = TABLE[size]
        expected = (nu_bucket, nu_resized) if no_upscale else (normal_bucket, normal_resized)
        assert (tuple(image["bucket"]), tuple(image["resized"])) == expected, size
    if not no_upscale:
        assert round(plan["mean_ar_error"], 4) == round(
            sum(abs(e) for e in (0, 0.1667, -0.0667, 0, -0.1111, -0.0256, 0, -0.0476, -0.0119)) / 9, 4)


def test_worked_example_one_bucket(tmp_path, make_image):
    for i in range(36):
        make_image(tmp_path / "data" / "1_subj" / f"{i:02d}.png", 512, 512)
    plan = plan_json(tmp_path, "max_train_epochs = 230\ntrain_batch_size = 6\n")
    assert (plan["num_train_images"], plan["batches_per_epoch"], plan["total_steps"], plan["epochs"]) == (36, 6, 1380, 230)
    plan = plan_json(tmp_path, "max_train_steps = 1600\ntrain_batch_size = 6\n")
    assert (plan["total_steps"], plan["epochs"], plan["steps_per_epoch"]) == (1600, 267, 6)
    # max_train_epochs wins over an explicit max_train_steps
    plan = plan_json(tmp_path, "max_train_epochs = 230\nmax_train_steps = 1600\ntrain_batch_size = 6\n")
    assert plan["total_steps"] == 1380


def test_worked_example_buckets_split_batches(tmp_path, make_image):
    """20 / 10 / 6 images in three buckets at batch 6 → 4 + 2 + 1 = 7 batches → 1610 steps."""
    for size, count in (((512, 512), 20), ((768, 512), 10), ((512, 768), 6)):
        for i in range(count):
            make_image(tmp_path / "data" / "1_subj" / f"{size[0]}x{size[1]}_{i:02d}.png", *size)
    plan = plan_json(tmp_path, "max_train_epochs = 230\ntrain_batch_size = 6\n")
    assert sorted((b["count"], b["batches"]) for b in plan["buckets"]) == [(6, 1), (10, 2), (20, 4)]
    assert (plan["batches_per_epoch"], plan["total_steps"]) == (7, 1610)


def test_processes_and_accumulation(tmp_path, make_image):
    for i in range(36):
        make_image(tmp_path / "data" / "1_subj" / f"{i:02d}.png", 512, 512)
    plan = plan_json(tmp_path, "max_train_epochs = 10\ntrain_batch_size = 2\nnum_processes = 2\n"
                     "gradient_accumulation_steps = 4\n", "optimizer.lr_scheduler='cosine'",
                     "optimizer.lr_warmup_steps=0.1")
    # 18 batches; ceil(18 / 2) = 9 per process; ceil(9 / 4) = 3 updates per epoch
    assert (plan["batches_per_epoch"], plan["batches_per_process"], plan["steps_per_epoch"]) == (18, 9, 3)
    assert plan["total_steps"] == 30 and plan["warmup_steps"] == int(0.1 * 30 * 2)
