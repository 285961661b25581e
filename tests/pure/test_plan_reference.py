"""sd-scripts-behaviour.md §2.5 and §3 through `loracli plan --json`, exactly."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- SDXL: the same bucket/step code path with 32-px steps (sdxl_train_network.py) ---------------------

# image → (normal bucket, normal resized), (no_upscale bucket, no_upscale resized) at 1024² / 256 / 2048.
# Steps 64: sd-scripts-behaviour §2.5's SDXL table. Steps 32 (ran): sd-scripts' own BucketManager at
# the pinned commit (its 64-step output is the table above, line for line).
SDXL_TABLE = {
    64: {
        (512, 512): ((1024, 1024), (1024, 1024), (512, 512), (512, 512)),
        (768, 512): ((1216, 832), (1248, 832), (768, 512), (768, 512)),
        (512, 768): ((832, 1216), (832, 1248), (512, 768), (512, 768)),
        (1024, 1024): ((1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024)),
        (1920, 1080): ((1344, 768), (1365, 768), (1344, 768), (1365, 768)),
        (300, 900): ((576, 1728), (576, 1728), (256, 896), (300, 900)),
        (2000, 500): ((2048, 512), (2048, 512), (1984, 448), (2000, 500)),
        (640, 480): ((1152, 896), (1195, 896), (640, 448), (640, 480)),
        (333, 777): ((640, 1536), (658, 1536), (320, 768), (333, 777)),
    },
    32: {
        (512, 512): ((1024, 1024), (1024, 1024), (512, 512), (512, 512)),
        (768, 512): ((1248, 832), (1248, 832), (768, 512), (768, 512)),
        (512, 768): ((832, 1248), (832, 1248), (512, 768), (512, 768)),
        (1024, 1024): ((1024, 1024), (1024, 1024), (1024, 1024), (1024, 1024)),
        (1920, 1080): ((1344, 768), (1365, 768), (1344, 768), (1365, 768)),
        (300, 900): ((576, 1728), (576, 1728), (288, 896), (300, 900)),
        (2000, 500): ((2048, 512), (2048, 512), (1984, 480), (2000, 500)),
        (640, 480): ((1184, 864), (1184, 888), (640, 480), (640, 480)),
        (333, 777): ((672, 1536), (672, 1568), (320, 768), (333, 777)),
    },
}
SDXL_CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sdxl"
[dataset]
train_data_dir = "data"
resolution = 1024
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 2048
[network]
network_train_unet_only = true
[training]
"""


def sdxl_plan_json(tmp_path, extra: str, *sets: str) -> dict:
    cfg = tmp_path / "c.toml"
    cfg.write_text(SDXL_CONFIG + extra)
    result = run_cli("plan", "--config", cfg, "--json", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("steps", [64, 32])
@pytest.mark.parametrize("no_upscale", [False, True])
def test_sdxl_bucket_table(tmp_path, make_image, steps, no_upscale):
    table = SDXL_TABLE[steps]
    for w, h in table:
        make_image(tmp_path / "data" / "1_x" / f"{w}x{h}.png", w, h)
    plan = sdxl_plan_json(tmp_path, "max_train_epochs = 1\n", f"dataset.bucket_reso_steps={steps}",
                          f"dataset.bucket_no_upscale={str(no_upscale).lower()}")
    assert plan["model_family"] == "sdxl"
    for image in plan["images"]:
        normal_bucket, normal_resized, nu_bucket, nu_resized = table[tuple(image["size"])]
        expected = (nu_bucket, nu_resized) if no_upscale else (normal_bucket, normal_resized)
        assert (tuple(image["bucket"]), tuple(image["resized"])) == expected, image["size"]


def test_sdxl_bucket_list_sizes():
    from loracli.buckets import make_bucket_resolutions

    # sd-scripts-behaviour §2.5: 41 buckets at steps 64, 81 at steps 32, 25 with the default max of 1024.
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 32)) == 81
    assert len(make_bucket_resolutions((1024, 1024), 256, 1024, 64)) == 25


def test_32_px_steps_are_sdxl_only(tmp_path, make_image):
    make_image(tmp_path / "data" / "1_x" / "a.png", 1024, 1024)
    cfg = tmp_path / "c.toml"
    cfg.write_text(SDXL_CONFIG.replace("tiny:sdxl", "tiny:sd15") + "max_train_epochs = 1\n")
    result = run_cli("plan", "--config", cfg, "--set", "dataset.bucket_reso_steps=32")
    assert result.exit_code == 2 and "dataset.bucket_reso_steps" in result.stderr and "SD1.x" in result.stderr


def test_sdxl_no_upscale_with_regularisation_steps_32(tmp_path, make_image):
    """No-upscale buckets at 32-px steps with a reg folder balanced to the training samples (§1.4, §2.2)."""
    train = [(1920, 1080), (640, 480), (300, 900)]  # 2 repeats each: 6 training samples
    for i, size in enumerate(train):
        make_image(tmp_path / "data" / "2_char" / f"t{i}.png", *size)
    # 8 reg images; balancing takes the first 6 (sorted path order), one repeat each.
    reg = [(700, 500), (700, 500), (1000, 600), (1000, 600), (1000, 600), (800, 800), (2000, 500), (2000, 500)]
    for i, size in enumerate(reg):
        make_image(tmp_path / "reg" / "1_person" / f"r{i}.png", *size)
    plan = sdxl_plan_json(tmp_path, "max_train_epochs = 10\ntrain_batch_size = 2\n",
                          "dataset.bucket_reso_steps=32", "dataset.bucket_no_upscale=true",
                          f"dataset.reg_data_dir='{tmp_path / 'reg'}'")

    def floor32(size):  # no_upscale: an image inside the max area keeps its size; the bucket floors to the step
        return (size[0] // 32 * 32, size[1] // 32 * 32)

    used_reg = reg[:6]
    expected: dict[tuple[int, int], int] = {}
    for size in train:
        bucket = SDXL_TABLE[32][size][2]
        expected[bucket] = expected.get(bucket, 0) + 2
    for size in used_reg:
        expected[floor32(size)] = expected.get(floor32(size), 0) + 1
    assert {tuple(b["resolution"]): b["count"] for b in plan["buckets"]} == expected
    batches = sum(-(-n // 2) for n in expected.values())
    assert (plan["num_train_images"], plan["num_reg_images"]) == (6, 8)  # sd-scripts prints the raw reg count
    assert plan["batches_per_epoch"] == batches and plan["total_steps"] == 10 * batches
    assert sorted(Path(i["path"]).name for i in plan["images"] if i["is_reg"]) == [f"r{i}.png" for i in range(6)]
    assert any(w["code"] == "W18" and "reg images are not used" in w["message"] for w in plan["warnings"])
