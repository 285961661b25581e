"""Sample images during training, samples/grid.png, and `loracli grid`, on tiny:sd15."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageChops

from loracli.imagegrid import MIN_CELL, Layout, grid_size
from tests.pure.cli_helpers import run_cli
from tests.smoke.test_train import train

PROMPTS = ("# two prompts, small and quick\n"
           "thing0, color 0 --w 64 --h 64 --s 3 --d 5\nthing3 --n blurry --w 64 --h 64 --s 3\n")


def test_samples_at_the_planned_steps_with_grid_and_tensorboard(smoke_project):
    (smoke_project.parent / "prompts.txt").write_text(PROMPTS)
    run = train(smoke_project, "--set", "sample.sample_prompts='prompts.txt'", "--set", "sample.sample_every_n_steps=4",
                "--set", "sample.sample_at_first=true", "--set", "sample.sample_sampler='euler_a'",
                "--set", "logging.logging_dir='logs'")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["total_steps"] == 15  # 5 batches per epoch (two buckets), 3 epochs
    steps = [0, 4, 8, 12]
    assert [r["step"] for r in plan["sample_rounds"]] == steps
    labels = ["e000000"] + [f"{s:06d}" for s in steps[1:]]
    expected = {f"smoke_{label}_00_5.png" for label in labels} | {f"smoke_{label}_01.png" for label in labels}
    samples = run / "samples"
    assert {p.name for p in samples.iterdir()} == expected | {"grid.png"}
    for name in expected:
        with Image.open(samples / name) as image:
            assert image.size == (64, 64)
    with Image.open(samples / "grid.png") as grid:
        assert grid.size == grid_size(len(steps), 2, Layout((MIN_CELL, MIN_CELL)))
    # The LoRA learns between rounds: the same prompt and seed give another picture later.
    first, last = (Image.open(samples / f"smoke_{label}_00_5.png") for label in (labels[0], labels[-1]))
    assert ImageChops.difference(first, last).getbbox() is not None
    status = json.loads((run / "status.json").read_text())
    assert status["last_sample"] == labels[-1]
    for curve in ("loss.png", "lr.png"):  # drawn by the training loop itself
        with Image.open(run / curve) as image:
            assert image.format == "PNG" and image.width > 400

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_file = next((smoke_project.parent / "logs").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_file), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"samples/00", "samples/01"}
    assert [e.step for e in events.Images("samples/00")] == steps


def cell(grid: Image.Image, row: int, col: int, layout: Layout) -> Image.Image:
    cw, ch = layout.cell
    x, y = layout.label_width + col * cw, layout.title_height + layout.header_height + row * ch
    return grid.crop((x + 2, y + 2, x + cw - 2, y + ch - 2))


def test_grid_command_files_by_prompts_by_strengths(smoke_project, tmp_path):
    run = train(smoke_project, "--set", "output.save_every_n_epochs=1", "--set", "training.max_train_epochs=2")
    files = [run / "smoke-000001.safetensors", run / "smoke.safetensors"]
    out = tmp_path / "grids"
    result = run_cli("grid", *files, "--model", "tiny:sd15", "--prompt", "thing0, color 0", "--prompt", "thing1 --d 4",
                     "--strengths", "0,0.5,1", "--seeds", "7", "--width", "64", "--height", "64", "--steps", "3",
                     "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid-p00-s7.png", "grid-p01-s7.png"]
    layout = Layout((MIN_CELL, MIN_CELL))
    for name in names:
        with Image.open(out / name) as grid:
            assert grid.size == grid_size(2, 3, layout)  # 2 files × 3 strengths
            grid = grid.convert("RGB")
            # strength 0 is the base model for both files; strength 1 shows each file's training
            assert ImageChops.difference(cell(grid, 0, 0, layout), cell(grid, 1, 0, layout)).getbbox() is None
            assert ImageChops.difference(cell(grid, 1, 0, layout), cell(grid, 1, 2, layout)).getbbox() is not None
            assert ImageChops.difference(cell(grid, 0, 2, layout), cell(grid, 1, 2, layout)).getbbox() is not None


def test_grid_command_errors_are_one_line(smoke_project, tmp_path: Path):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"not safetensors")
    no_model = run_cli("grid", lora, "--prompt", "a")
    assert no_model.exit_code == 2 and "--model" in no_model.stderr
    bad = run_cli("grid", lora, "--model", "tiny:sd15", "--prompt", "a", "--strengths", "1,x")
    assert bad.exit_code == 2 and "--strengths" in bad.stderr
    missing = run_cli("grid", tmp_path / "nope", "--model", "tiny:sd15", "--prompt", "a")
    assert missing.exit_code == 3 and "no such file" in missing.stderr
