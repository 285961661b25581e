"""alpha_mask through `loracli train` on tiny:sd15: fully transparent images leave nothing to learn, so every
step's loss is exactly 0 (from pixels: unbucketed random crops, colour and flip augmentation; and from the
disk latent cache, which carries the masks, with a masked validation loss)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.pure.cli_helpers import run_cli

CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
alpha_mask = true
flip_aug = true
{dataset}
[network]
network_dim = 4
[training]
max_train_steps = 2
seed = 1
[output]
output_name = "masked"
output_dir = "runs"
"""


@pytest.mark.parametrize("dataset", [
    "random_crop = true\ncolor_aug = true",  # pixels each step: crops of the 80x72 files, no resize
    "cache_latents_to_disk = true\nvalidation_split = 0.34",  # cover-resized once; masks from the cache
], ids=["pixels", "cached"])
def test_transparent_images_give_zero_loss(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    for i in range(3):
        path = tmp_path / "data" / "1_cut" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (80, 72), (200, 40 * i, 30, 0)).save(path)  # colour everywhere, alpha 0 everywhere
    validation = "validate_every_n_steps = 1" if "validation" in dataset else ""
    (tmp_path / "c.toml").write_text(CONFIG.format(dataset=dataset).replace("seed = 1", "seed = 1\n" + validation))
    result = run_cli("train", "--config", tmp_path / "c.toml")
    assert result.exit_code == 0, result.stderr
    run = next((tmp_path / "runs").iterdir())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines if "loss" in m] == [0.0, 0.0]
    if validation:  # the held-out image's loss is masked the same way
        val = [m["val_loss"] for m in lines if "val_loss" in m]
        assert len(val) >= 2 and set(val) == {0.0}
