"""Run the CLI in-process (Typer's CliRunner) with stdout and stderr kept apart."""

from __future__ import annotations

from typer.testing import CliRunner

from loracli.cli.app import app

EXAMPLE_DATASET_TOML = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 128
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
[training]
max_train_epochs = 4
"""


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def make_dataset(root, make_image, folders=None):
    """data/<folder>/NNN.png + .txt with the given sizes."""
    folders = folders or {"2_char": [(128, 128), (192, 128), (128, 192)]}
    for folder, sizes in folders.items():
        for i, (w, h) in enumerate(sizes):
            make_image(root / "data" / folder / f"{i:03d}.png", w, h)
            (root / "data" / folder / f"{i:03d}.txt").write_text(f"char, pose {i}\n")
    return root / "data"
