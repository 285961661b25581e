"""Whole training runs on tiny:sd15 and a generated dataset, on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
caption_extension = ".txt"
[network]
network_dim = 4
network_alpha = 4
[optimizer]
optimizer_type = "AdamW"
learning_rate = 1e-3
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 0
[training]
max_train_epochs = 3
train_batch_size = 2
seed = 1
[output]
output_name = "smoke"
output_dir = "runs"
"""


def make_smoke_dataset(root: Path, make_image) -> Path:
    """Two concept folders, 6 images in two aspect ratios, captioned."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for i, color in enumerate(colors):
        folder = "2_char" if i < 4 else "1_style"
        size = (64, 64) if i % 2 == 0 else (128, 64)
        make_image(root / "data" / folder / f"{i:03d}.png", *size, color=color)
        (root / "data" / folder / f"{i:03d}.txt").write_text(f"thing{i}, color {i}\n")
    return root / "data"


@pytest.fixture
def smoke_project(tmp_path, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORACLI_CACHE", os.environ.get("LORACLI_CACHE", str(Path.home() / ".cache" / "loracli")))
    make_smoke_dataset(tmp_path, make_image)
    cfg = tmp_path / "loracli.toml"
    cfg.write_text(CONFIG)
    return cfg
