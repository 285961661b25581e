"""Sample prompt files, the sample rounds in the plan, and labelled grids (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from loracli.errors import DatasetError
from loracli.imagegrid import Layout, grid_size, labelled_grid
from loracli.sample_prompts import image_stem, parse_prompt_line, read_prompt_file, round_label, round_title
from tests.pure.cli_helpers import run_cli


def test_options_and_defaults_follow_sd_scripts():
    p = parse_prompt_line("masterpiece, 1girl --n lowres, bad hands --w 700 --h 1000 --d 42 --l 6.5 --s 28", 3)
    assert (p.prompt, p.negative_prompt) == ("masterpiece, 1girl", "lowres, bad hands")
    assert (p.width, p.height, p.seed, p.scale, p.steps, p.index) == (696, 1000, 42, 6.5, 28, 3)
    d = parse_prompt_line("just a prompt", 0)
    assert (d.width, d.height, d.seed, d.scale, d.steps, d.negative_prompt) == (512, 512, None, 7.5, 30, "")
    assert parse_prompt_line("x --s 5000 --w 10", 0).steps == 1000  # clamped like sd-scripts
    assert parse_prompt_line("x --w 10", 0).width == 64
    assert parse_prompt_line("x --cn img.png", 0).unknown_options == ("--cn",)


def test_prompt_file_skips_comments_and_blank_lines(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\nfirst --d 1\n   \n  # indented comment\nsecond --n ugly\n", encoding="utf-8")
    prompts = read_prompt_file(f)
    assert [(p.index, p.prompt, p.line) for p in prompts] == [(0, "first", 3), (1, "second", 6)]


def test_bad_values_name_the_line(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("ok\nbad --d seven\n")
    with pytest.raises(DatasetError) as exc:
        read_prompt_file(f)
    assert "line 2" in str(exc.value) and "--d" in str(exc.value)
    toml = tmp_path / "p.toml"
    toml.write_text("[prompt]\n")
    with pytest.raises(DatasetError, match="not supported"):
        read_prompt_file(toml)


def test_image_names_and_round_titles():
    p = parse_prompt_line("x --d 9", 2)
    assert image_stem("mylora", round_label(0, 0), p) == "mylora_e000000_02_9"
    assert image_stem(None, round_label(120, None), parse_prompt_line("y", 0)) == "000120_00"
    assert [round_title(x) for x in ("e000000", "e000003", "000120")] == ["before training", "epoch 3", "step 120"]


def test_grid_pixel_size_follows_its_shape():
    cells = [[Image.new("RGB", (64, 96), (i * 40, 0, 0)) for i in range(3)] for _ in range(2)]
    grid = labelled_grid(cells, ["row a", "row b"], ["c1", "c2", "c3"], title="t")
    layout = Layout((128, 192))  # 64x96 enlarged so the long side is the minimum cell
    assert grid.size == grid_size(2, 3, layout) == (layout.label_width + 3 * 128,
                                                     layout.title_height + layout.header_height + 2 * 192)
    # the cell at row 1, column 2 holds that image's colour, enlarged
    x = layout.label_width + 2 * 128 + 64
    y = layout.title_height + layout.header_height + 192 + 96
    assert grid.getpixel((x, y)) == (80, 0, 0)


def test_plan_lists_sample_rounds(tmp_path: Path, make_image):
    for i in range(4):
        make_image(tmp_path / "data" / "2_x" / f"{i}.png", 64, 64)
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "c.toml").write_text(
        "[model]\npretrained_model_name_or_path = 'tiny:sd15'\n[dataset]\ntrain_data_dir = 'data'\nresolution = 64\n"
        "[training]\nmax_train_epochs = 3\ntrain_batch_size = 2\n"
        "[sample]\nsample_prompts = 'p.txt'\nsample_at_first = true\nsample_every_n_epochs = 2\n")
    result = run_cli("plan", "--config", tmp_path / "c.toml", "--json")
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout)["sample_rounds"]
    # 8 samples, batch 2: 4 steps per epoch; epochs 2 (step 8); sample_at_first at step 0
    assert rounds == [{"step": 0, "epoch": 0, "label": "e000000"}, {"step": 8, "epoch": 2, "label": "e000002"}]
    steps = run_cli("plan", "--config", tmp_path / "c.toml", "--json", "--set", "sample.sample_every_n_epochs=0")
    assert steps.exit_code == 2  # ge=1
    by_steps = run_cli("plan", "--config", tmp_path / "c.toml", "--json",
                       "--set", "sample.sample_at_first=false", "--set", "sample.sample_every_n_epochs=1",
                       "--set", "sample.sample_every_n_steps=5")
    labels = [r["label"] for r in json.loads(by_steps.stdout)["sample_rounds"]]
    assert labels == ["e000001", "e000002", "e000003"]  # every_n_epochs wins over every_n_steps, as in sd-scripts
