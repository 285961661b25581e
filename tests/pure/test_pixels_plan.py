"""The plan side of enable_bucket = false, alpha_mask, conditioning_data_dir and masked_loss (no torch):
sizes sd-scripts refuses, mask discovery, rules E60-E65 / W60, export and import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from loracli.config.loader import resolve_config
from loracli.plan import build_plan
from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, build_export, write_export
from loracli.sdscripts.importer import import_file, render_toml
from tests.pure.cli_helpers import run_cli

CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
{dataset}
[training]
max_train_epochs = 2
{training}
"""


def _project(tmp_path: Path, sizes: dict[str, tuple[int, int]], dataset: str = "", training: str = "") -> Path:
    for name, (w, h) in sizes.items():
        path = tmp_path / "data" / "2_x" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 20, 200)).save(path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(dataset=dataset, training=training))
    return cfg


def _plan(cfg: Path, *sets: str):
    return run_cli("plan", "--config", cfg, "--json", *[a for s in sets for a in ("--set", s)])


def test_unbucketed_smaller_image_is_refused_with_exit_3(tmp_path):
    cfg = _project(tmp_path, {"ok.png": (64, 64), "small.png": (64, 48)})
    result = _plan(cfg)
    assert result.exit_code == 3
    assert "small.png" in result.stderr and "smaller than the resolution 64x64" in result.stderr
    assert "enable_bucket = true" in result.stderr and "Traceback" not in result.stderr
    assert "ok.png" not in result.stderr
    assert _plan(cfg, "dataset.random_crop=true").exit_code == 3  # random_crop does not help a small side


def test_unbucketed_larger_image_needs_random_crop(tmp_path):
    cfg = _project(tmp_path, {"big.png": (96, 80), "ok.png": (64, 64)})
    refused = _plan(cfg)
    assert refused.exit_code == 3 and "big.png" in refused.stderr and "random_crop = true" in refused.stderr
    plan = json.loads(_plan(cfg, "dataset.random_crop=true").stdout)
    # the plan's numbers are unchanged: one bucket at the resolution; the image is not resized
    assert plan["buckets"] == [{"resolution": [64, 64], "count": 4, "batches": 4}]
    big = next(i for i in plan["images"] if i["path"].endswith("big.png"))
    assert big["bucket"] == [64, 64] and big["resized"] == [96, 80]


def test_cached_latents_resize_as_sd_scripts_caching_does(tmp_path):
    cfg = _project(tmp_path, {"big.png": (96, 80), "small.png": (48, 32)})
    plan = json.loads(_plan(cfg, "dataset.cache_latents=true").stdout)
    by_name = {Path(i["path"]).name: i for i in plan["images"]}
    # sd-scripts' bucket manager with the one bucket: scale to cover, round half up, centre crop
    assert by_name["big.png"]["resized"] == [int(96 * 64 / 80 + 0.5), 64]
    assert by_name["small.png"]["resized"] == [int(48 * 64 / 32 + 0.5), 64]
    assert by_name["small.png"]["crop_offset"] == [(96 - 64) // 2, 0]


def _masks(tmp_path: Path, sizes: dict[str, tuple[int, int]]) -> None:
    (tmp_path / "masks").mkdir(exist_ok=True)
    for name, (w, h) in sizes.items():
        Image.new("L", (w, h), 255).save(tmp_path / "masks" / name)


MASKED = 'conditioning_data_dir = "masks"'


def test_mask_images_are_found_by_stem(tmp_path):
    cfg = _project(tmp_path, {"a.png": (64, 64), "b.jpg": (64, 64)}, MASKED, "masked_loss = true")
    _masks(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)})
    plan = json.loads(_plan(cfg).stdout)
    masks = {Path(i["path"]).name: Path(i["mask"]).name for i in plan["images"]}
    assert masks == {"a.png": "a.png", "b.jpg": "b.png"}
    shown = run_cli("plan", "--config", cfg)
    assert "loss masks: 2 image(s) by mask images (red channel)" in shown.stdout


@pytest.mark.parametrize("masks, named, says", [
    ({"a.png": (64, 64)}, "b.png", "has no mask image"),
    ({"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 64)}, "c.png", "a mask without a training image"),
    ({"a.png": (64, 64), "b.png": (32, 64)}, "b.png", "is 32x64, but its image"),
])
def test_mask_problems_exit_3_naming_the_file(tmp_path, masks, named, says):
    cfg = _project(tmp_path, {"a.png": (64, 64), "b.png": (64, 64)}, MASKED, "masked_loss = true")
    _masks(tmp_path, masks)
    result = _plan(cfg)
    assert result.exit_code == 3, result.stderr
    assert named in result.stderr and says in result.stderr


@pytest.mark.parametrize("dataset, training, code, keys", [
    ("", "masked_loss = true", "E60", ("training.masked_loss", "dataset.conditioning_data_dir")),
    (MASKED, "", "E61", ("dataset.conditioning_data_dir", "training.masked_loss")),
    (MASKED + "\nalpha_mask = true", "masked_loss = true", "E62", ("dataset.conditioning_data_dir",
                                                                     "dataset.alpha_mask")),
    (MASKED + "\nrandom_crop = true", "masked_loss = true", "E63", ("dataset.conditioning_data_dir",
                                                                      "dataset.random_crop")),
    (MASKED + '\nreg_data_dir = "data"', "masked_loss = true", "E64", ("dataset.conditioning_data_dir",
                                                                         "dataset.reg_data_dir")),
])
def test_mask_rules_name_both_keys(tmp_path, dataset, training, code, keys):
    cfg = _project(tmp_path, {"a.png": (64, 64)}, dataset, training)
    _masks(tmp_path, {"a.png": (64, 64)})
    result = _plan(cfg)
    assert result.exit_code == 2, result.stderr
    line = next(line for line in result.stderr.splitlines() if f"[{code}]" in line)
    assert all(k in line for k in keys), line


def test_rgba_images_need_no_warning_and_rgb_ones_get_w60(tmp_path):
    cfg = _project(tmp_path, {"rgb.png": (64, 64)}, "alpha_mask = true")
    Image.new("RGBA", (64, 64), (1, 2, 3, 0)).save(tmp_path / "data" / "2_x" / "cut.png")
    Image.new("P", (64, 64)).save(tmp_path / "data" / "2_x" / "pal.png", transparency=0)
    plan = json.loads(_plan(cfg).stdout)
    w60 = [w for w in plan["warnings"] if w["code"] == "W60"]
    assert len(w60) == 1 and w60[0]["message"].startswith("1 image(s)") and "rgb.png" in w60[0]["message"]
    assert w60[0]["key"] == "dataset.alpha_mask"


def test_subset_masks_rules_per_dataset(tmp_path):
    """[[datasets]]: masks per subset (their own folders); a dataset mixing masked and plain subsets is E65."""
    for sub in ("s1", "s2"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / sub / f"{sub}.png")
    _masks(tmp_path, {"s1.png": (64, 64)})
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[training]
max_train_epochs = 1
masked_loss = true
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "s1"
conditioning_data_dir = "masks"
[[datasets.subsets]]
image_dir = "s2"
""")
    result = _plan(cfg)
    assert result.exit_code == 2 and "[E65]" in result.stderr
    assert "datasets[0].subsets[1].conditioning_data_dir" in result.stderr
    text = cfg.read_text().replace('image_dir = "s2"', 'image_dir = "s2"\nalpha_mask = true')
    cfg.write_text(text.replace("[[datasets.subsets]]\nimage_dir = \"s2\"",
                                "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"s2\""))
    result = _plan(cfg)
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    masks = {Path(i["path"]).name: i["mask"] for i in plan["images"]}
    assert Path(masks["s1.png"]).name == "s1.png" and masks["s2.png"] == ""


def test_export_writes_subset_keys_and_import_reads_them_back(tmp_path):
    cfg = _project(tmp_path, {"a.png": (64, 64)}, MASKED, "masked_loss = true")
    _masks(tmp_path, {"a.png": (64, 64)})
    original = resolve_config(cfg)
    exported = build_export(original.config, build_plan(original))
    general, (dataset,) = exported.dataset["general"], exported.dataset["datasets"]
    # sd-scripts' schema has both keys in subsets only; --masked_loss is a training argument
    assert "conditioning_data_dir" not in general and "alpha_mask" not in general
    assert "conditioning_data_dir" not in dataset and "alpha_mask" not in dataset
    assert [s["conditioning_data_dir"] for s in dataset["subsets"]] == [str(tmp_path / "masks")]
    assert exported.args["training"]["masked_loss"] is True
    out = tmp_path / "export"
    write_export(out, exported)
    result = import_file(out / CONFIG_FILE, out / DATASET_FILE)
    assert result.unsupported == {}
    (tmp_path / "back.toml").write_text(render_toml(result), encoding="utf-8")
    back = resolve_config(tmp_path / "back.toml").config
    assert back.training.masked_loss is True
    assert back.dataset.conditioning_data_dir == tmp_path / "masks"


def test_alpha_mask_flag_imports_from_a_command(tmp_path):
    cfg = _project(tmp_path, {"a.png": (64, 64)}, "alpha_mask = true")
    original = resolve_config(cfg)
    exported = build_export(original.config, build_plan(original))
    assert all(s.get("alpha_mask") is True for s in exported.dataset["datasets"][0]["subsets"])
    assert "alpha_mask" not in exported.dataset["general"] and "alpha_mask" not in exported.dataset["datasets"][0]
    out = tmp_path / "export"
    write_export(out, exported)
    result = import_file(out / CONFIG_FILE, out / DATASET_FILE)
    assert result.unsupported == {}
    (tmp_path / "back.toml").write_text(render_toml(result), encoding="utf-8")
    assert resolve_config(tmp_path / "back.toml").config.dataset.alpha_mask is True


def test_import_reads_subset_mask_keys(tmp_path):
    (tmp_path / "config.toml").write_text('pretrained_model_name_or_path = "tiny:sd15"\nmasked_loss = true\n')
    (tmp_path / "dataset.toml").write_text("""
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "s1"
conditioning_data_dir = "m"
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "s2"
alpha_mask = true
""")
    result = import_file(tmp_path / "config.toml", tmp_path / "dataset.toml")
    assert result.unsupported == {}
    (tmp_path / "back.toml").write_text(render_toml(result), encoding="utf-8")
    config = resolve_config(tmp_path / "back.toml").config
    assert config.training.masked_loss is True
    first, second = config.datasets[0].subsets[0], config.datasets[1].subsets[0]
    assert first.conditioning_data_dir == tmp_path / "m" and second.alpha_mask is True


def test_the_image_folder_is_not_a_mask_folder(tmp_path):
    cfg = _project(tmp_path, {"a.png": (64, 64)}, 'conditioning_data_dir = "data/2_x"', "masked_loss = true")
    result = _plan(cfg)
    assert result.exit_code == 3 and "is the folder of the training images" in result.stderr
