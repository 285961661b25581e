"""The run summary's images/s counts the images an epoch trains (Plan.images_per_step), not
train_batch_size × GA × processes, which is wrong when [[datasets]] set their own batch sizes."""

from __future__ import annotations

import json

from loracli.plan import Plan
from tests.pure.cli_helpers import run_cli

TWO_BATCH_SIZES = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[training]
max_train_epochs = 2
train_batch_size = 1
gradient_accumulation_steps = 2
[[datasets]]
resolution = 64
batch_size = 2
num_repeats = 2
[[datasets.subsets]]
image_dir = "a"
[[datasets]]
resolution = 64
batch_size = 3
[[datasets.subsets]]
image_dir = "a"
"""


def planned(tmp_path, text: str) -> Plan:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    result = run_cli("plan", "--config", cfg, "--json")
    assert result.exit_code == 0, result.stderr
    return Plan.from_dict(json.loads(result.stdout))


def test_images_per_step_follows_each_datasets_own_batch_size(tmp_path, make_image):
    for i in range(5):
        make_image(tmp_path / "a" / f"{i}.png", 64, 64)
    plan = planned(tmp_path, TWO_BATCH_SIZES)
    # an epoch: 5 images × 2 repeats in batches of 2 (5 batches) and 5 × 1 in batches of 3 (2 batches);
    # 7 batches at gradient accumulation 2 are 4 steps, which train 15 images
    assert (plan.batches_per_epoch, plan.steps_per_epoch) == (7, 4)
    assert plan.images_per_step() == 15 / 4  # not train_batch_size × GA = 2


def test_images_per_step_in_the_folder_form_is_the_batch_times_accumulation(tmp_path, make_image):
    for i in range(8):
        make_image(tmp_path / "data" / "1_a" / f"{i}.png", 64, 64)
    plan = planned(tmp_path, '[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\n'
                   'train_data_dir = "data"\nresolution = 64\n[training]\nmax_train_epochs = 1\n'
                   'train_batch_size = 2\ngradient_accumulation_steps = 2\n')
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.images_per_step()) == (4, 2, 4.0)
