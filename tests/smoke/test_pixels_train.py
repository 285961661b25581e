"""alpha_mask through `loracli train` on tiny:sd15: fully transparent images leave nothing to learn, so every
step's loss is exactly 0 (from pixels: unbucketed random crops, colour and flip augmentation; and from the
disk latent cache, which carries the masks)."""

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
    "cache_latents_to_disk = true",  # cover-resized once; the masks come back from the cache
], ids=["pixels", "cached"])
def test_transparent_images_give_zero_loss(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    for i in range(2):
        path = tmp_path / "data" / "1_cut" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (80, 72), (200, 40 * i, 30, 0)).save(path)  # colour everywhere, alpha 0 everywhere
    (tmp_path / "c.toml").write_text(CONFIG.format(dataset=dataset))
    result = run_cli("train", "--config", tmp_path / "c.toml")
    assert result.exit_code == 0, result.stderr
    run = next((tmp_path / "runs").iterdir())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses == [0.0, 0.0]
