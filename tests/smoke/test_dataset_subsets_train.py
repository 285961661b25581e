"""`loracli train` with [[datasets.subsets]] on tiny:sd15: each subset's options reach its batches."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from loracli.run import data
from tests.pure.cli_helpers import run_cli

CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
enable_bucket = true
cache_latents = true
min_bucket_reso = 64
max_bucket_reso = 128
[network]
network_dim = 4
network_alpha = 4
[optimizer]
learning_rate = 1e-3
[training]
max_train_epochs = 1
train_batch_size = 2
seed = 1
[output]
output_name = "subsets"
output_dir = "runs"
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "char"
num_repeats = 2
class_tokens = "sks char"
[[datasets.subsets]]
image_dir = "style"
caption_extension = ".cap"
caption_prefix = "zzstyle"
flip_aug = true
[[datasets.subsets]]
image_dir = "reg"
is_reg = true
class_tokens = "person"
"""


def test_three_subsets_with_reg_train_with_their_own_options(tmp_path, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        make_image(tmp_path / "char" / f"{i}.png", 64, 64, color=(200, 30 * i, 30))
    for i in range(2):
        make_image(tmp_path / "style" / f"{i}.png", 128, 64, color=(30, 200, 30 * i))
        (tmp_path / "style" / f"{i}.cap").write_text(f"painted{i}, green\n")
    for i in range(2):
        make_image(tmp_path / "reg" / f"{i}.png", 64, 64, color=(30, 30, 200))
    (tmp_path / "loracli.toml").write_text(CONFIG)
    seen: list[tuple[list[int], list[str], list[bool]]] = []
    original = data.ExampleLoader.__call__

    def spy(self, indices, epoch, step):
        batch = original(self, indices, epoch, step)
        seen.append((list(indices), list(batch.captions), list(batch.flipped)))
        return batch

    monkeypatch.setattr(data.ExampleLoader, "__call__", spy)
    result = run_cli("train", "--config", tmp_path / "loracli.toml")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    run = next((tmp_path / "runs").iterdir())
    # the latent cache holds a mirrored copy only of the flip_aug subset's images: 3 + 2 + 2 images, + 2 mirrors
    assert "latents cached: 9 encoded" in result.stdout + result.stderr
    plan = json.loads((run / "plan.json").read_text())
    # 3 × 2 + 2 × 1 = 8 training samples; 2 reg images balanced up to 8 samples; one 64x64 bucket at 64 px
    assert (plan["num_train_images"], plan["num_reg_images"], plan["batches_per_epoch"]) == (8, 2, (8 + 8) // 2)
    assert len(seen) == plan["total_steps"] == 8
    images = plan["images"]
    by_subset: dict[int, list[tuple[str, bool]]] = {0: [], 1: [], 2: []}
    for indices, captions, flipped in seen:
        assert len({tuple(images[i]["bucket"]) for i in indices}) == 1
        for i, caption, flip in zip(indices, captions, flipped):
            by_subset[images[i]["subset_index"]].append((caption, flip))
    assert {c for c, _ in by_subset[0]} == {"sks char"} and not any(f for _, f in by_subset[0])
    assert all(c.startswith("zzstyle painted") for c, _ in by_subset[1])  # the .cap files, with the prefix
    assert {c for c, _ in by_subset[2]} == {"person"} and len(by_subset[2]) == 8  # reg, balanced
    with safe_open(run / "subsets.safetensors", "pt") as f:
        meta = f.metadata()
    (dataset,) = json.loads(meta["ss_datasets"])
    assert [(s["image_dir"], s["flip_aug"], s["is_reg"]) for s in dataset["subsets"]] == [
        ("char", False, False), ("style", True, False), ("reg", False, True)]
    assert "ss_resolution" not in meta and Path(plan["datasets"][0]["subsets"][1]["image_dir"]).name == "style"
