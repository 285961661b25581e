"""[[datasets]] / [[datasets.subsets]]: planned numbers equal sd-scripts' (computed here from its formulas),
bad input names the table, export/import round-trips, and ss_datasets is written as sd-scripts writes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.pure.cli_helpers import run_cli

HEAD = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
"""

THREE_SUBSETS = HEAD + """keep_tokens = 1
[training]
max_train_epochs = 3
train_batch_size = 4
[[datasets]]
resolution = 512
[[datasets.subsets]]
image_dir = "a"
num_repeats = 3
class_tokens = "sks"
[[datasets.subsets]]
image_dir = "b"
num_repeats = 2
caption_extension = ".cap"
flip_aug = true
shuffle_caption = true
[[datasets.subsets]]
image_dir = "reg"
is_reg = true
"""

TWO_DATASETS = HEAD + """[training]
max_train_epochs = 4
train_batch_size = 1
gradient_accumulation_steps = 2
[[datasets]]
resolution = 512
enable_bucket = false
batch_size = 2
num_repeats = 2
[[datasets.subsets]]
image_dir = "a"
[[datasets]]
resolution = 256
batch_size = 3
[[datasets.subsets]]
image_dir = "a"
num_repeats = 1
"""


def sd_scripts_reg_samples(reg_repeats: list[int], num_train_images: int) -> int:
    """DreamBoothDataset's reg balancing loop, transcribed: samples the reg images contribute per epoch."""
    n, first_loop = 0, True
    while n < num_train_images:
        for repeats in reg_repeats:
            n += repeats if first_loop else 1
            if n >= num_train_images:
                break
        first_loop = False
    return n


@pytest.fixture
def folders(tmp_path, make_image):
    for i in range(5):
        make_image(tmp_path / "a" / f"{i}.png", 512, 512)
    for i in range(4):
        make_image(tmp_path / "b" / f"{i}.png", 768, 512)
        (tmp_path / "b" / f"{i}.cap").write_text(f"b{i}, red\n")
        (tmp_path / "b" / f"{i}.txt").write_text("never read: the subset's extension is .cap\n")
    for i in range(6):
        make_image(tmp_path / "reg" / f"{i}.png", 512, 512)
    return tmp_path


def plan_of(root: Path, text: str, *sets: str) -> dict:
    cfg = root / "c.toml"
    cfg.write_text(text)
    result = run_cli("plan", "--config", cfg, "--json", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_three_subsets_one_reg_match_sd_scripts(folders):
    plan = plan_of(folders, THREE_SUBSETS)
    # sd-scripts: num_train_images = Σ repeats × images of the training subsets
    num_train = 5 * 3 + 4 * 2
    num_reg = 6 * 1  # raw, before balancing (what it prints and records)
    reg_samples = sd_scripts_reg_samples([1] * 6, num_train)
    # §2.5: 512x512 stays 512x512, 768x512 goes to the 640x384 bucket; a bucket of n gives ceil(n / batch)
    batches = math.ceil((5 * 3 + reg_samples) / 4) + math.ceil(4 * 2 / 4)
    steps = 3 * math.ceil(batches / 1 / 1)
    assert (plan["num_train_images"], plan["num_reg_images"]) == (num_train, num_reg) == (23, 6)
    assert sorted((tuple(b["resolution"]), b["count"], b["batches"]) for b in plan["buckets"]) == [
        ((512, 512), 15 + reg_samples, math.ceil((15 + reg_samples) / 4)), ((640, 384), 8, 2)]
    assert (plan["batches_per_epoch"], plan["total_steps"], plan["epochs"]) == (batches, steps, 3) == (12, 36, 3)
    (d,) = plan["datasets"]
    assert [(s["img_count"], s["num_repeats"], s["is_reg"]) for s in d["subsets"]] == [(5, 3, False), (4, 2, False),
                                                                                         (6, 1, True)]
    assert d["subsets"][1]["options"] == {"caption_extension": ".cap", "flip_aug": True, "shuffle_caption": True}
    # each image carries its subset; the subset's own caption file and class tokens are used
    by_subset = {(i["dataset"], i["subset_index"]) for i in plan["images"]}
    assert by_subset == {(0, 0), (0, 1), (0, 2)}
    captions = {Path(i["path"]).parent.name: i["caption"] for i in plan["images"]}
    assert captions["a"] == "sks" and captions["b"].startswith("b") and captions["reg"] == ""


def test_two_datasets_own_resolution_and_batch_size(folders):
    plan = plan_of(folders, TWO_DATASETS)
    # DatasetGroup: batches per epoch = Σ over datasets of Σ over its buckets ceil(n / its batch_size)
    d0 = math.ceil(5 * 2 / 2)  # 512x512, num_repeats 2 from the dataset, batch 2
    d1 = math.ceil(5 * 1 / 3)  # 256x256 (the images shrink to the dataset's resolution), batch 3
    per_epoch = math.ceil((d0 + d1) / 1 / 2)  # one process, gradient accumulation 2
    assert plan["batches_per_epoch"] == d0 + d1 == 7
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["epochs"]) == (per_epoch, 4 * per_epoch, 4) == (4, 16, 4)
    assert plan["num_train_images"] == 5 * 2 + 5 * 1
    assert [(d["resolution"], d["batch_size"], d["batches"]) for d in plan["datasets"]] == [([512, 512], 2, d0),
                                                                                             ([256, 256], 3, d1)]
    assert {tuple(i["bucket"]) for i in plan["images"] if i["dataset"] == 1} == {(256, 256)}
    # max_train_steps: epochs = ceil(steps / updates per epoch)
    plan = plan_of(folders, TWO_DATASETS.replace("max_train_epochs = 4", "max_train_steps = 10"))
    assert (plan["total_steps"], plan["epochs"]) == (10, math.ceil(10 / per_epoch))


def test_folder_form_plans_as_before(folders, make_image):
    for i in range(3):
        make_image(folders / "data" / "2_x" / f"{i}.png", 512, 512)
    plan = plan_of(folders, HEAD + 'train_data_dir = "data"\n[training]\nmax_train_epochs = 1\n')
    assert plan["datasets"] == [] and plan["batches_per_epoch"] == 6
    assert {(i["dataset"], i["subset_index"]) for i in plan["images"]} == {(0, None)}


BAD = [
    ("missing image_dir", THREE_SUBSETS.replace('image_dir = "b"\n', ""), 2, "datasets[0].subsets[1].image_dir"),
    ("unknown key", THREE_SUBSETS.replace("flip_aug = true", "flip_augs = true"), 2,
     "datasets[0].subsets[1].flip_augs"),
    ("repeats < 1", THREE_SUBSETS.replace("num_repeats = 3", "num_repeats = 0"), 2,
     "datasets[0].subsets[0].num_repeats"),
    ("dataset key in a subset", THREE_SUBSETS.replace("flip_aug = true", "resolution = 256"), 2,
     "datasets[0].subsets[1].resolution"),
    ("not a folder", THREE_SUBSETS.replace('image_dir = "b"', 'image_dir = "nope"'), 3,
     "datasets[0].subsets[1].image_dir"),
    ("same folder twice", THREE_SUBSETS.replace('image_dir = "b"', 'image_dir = "a"'), 2,
     "datasets[0].subsets[1].image_dir"),
    ("both forms", THREE_SUBSETS.replace("keep_tokens = 1", 'keep_tokens = 1\ntrain_data_dir = "a"'), 2,
     "dataset.train_data_dir"),
    ("cached latents, random_crop", THREE_SUBSETS.replace("keep_tokens = 1", "keep_tokens = 1\ncache_latents = true")
     .replace("flip_aug = true", "random_crop = true"), 2, "datasets[0].subsets[1].random_crop"),
    ("neither form", HEAD + "[training]\nmax_train_epochs = 1\n", 2, "dataset.train_data_dir"),
    ("resolution outside the dataset's buckets", THREE_SUBSETS.replace("resolution = 512",
                                                                       "resolution = 512\nmax_bucket_reso = 384"),
     2, "datasets[0].resolution"),
]


@pytest.mark.parametrize("text,code,key", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_naming_the_table(folders, text, code, key):
    cfg = folders / "c.toml"
    cfg.write_text(text)
    result = run_cli("plan", "--config", cfg)
    assert result.exit_code == code, result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 3


def test_export_import_round_trip(folders):
    cfg = folders / "c.toml"
    cfg.write_text(THREE_SUBSETS)
    out = folders / "ex"
    assert run_cli("export", "sd-scripts", "--config", cfg, out).exit_code == 0
    import tomllib

    dataset = tomllib.loads((out / "dataset.toml").read_text())
    subsets = dataset["datasets"][0]["subsets"]
    assert [Path(s["image_dir"]).name for s in subsets] == ["a", "b", "reg"]
    assert subsets[1] == {"image_dir": str(folders / "b"), "is_reg": False, "num_repeats": 2,
                          "caption_extension": ".cap", "shuffle_caption": True, "flip_aug": True}
    assert dataset["general"]["keep_tokens"] == 1 and dataset["general"]["batch_size"] == 4
    back = folders / "back.toml"
    result = run_cli("import", out / "config.toml", "--dataset-config", out / "dataset.toml", "-o", back)
    assert result.exit_code == 0, result.stderr
    assert "not imported: dataset.toml" not in result.stdout + result.stderr
    assert "no resolution" not in result.stdout + result.stderr  # the dataset sets its own
    imported = tomllib.loads(back.read_text())
    original = tomllib.loads(THREE_SUBSETS)
    for sub in original["datasets"][0]["subsets"]:
        sub["image_dir"] = str(folders / sub["image_dir"])
        sub.setdefault("is_reg", False)
    assert imported["datasets"] == original["datasets"]
    assert imported["dataset"]["keep_tokens"] == 1 and imported["training"]["train_batch_size"] == 4
    first, again = plan_of(folders, THREE_SUBSETS), plan_of(folders, back.read_text())
    for key in ("num_train_images", "num_reg_images", "batches_per_epoch", "total_steps", "epochs", "buckets",
                "datasets"):
        assert first[key] == again[key], key


def test_import_refuses_what_loracli_does_not_do(tmp_path):
    args = tmp_path / "args.toml"
    args.write_text('pretrained_model_name_or_path = "m.safetensors"\nmax_train_epochs = 1\n')
    data = tmp_path / "ds.toml"
    data.write_text("""[general]
num_repeats = 4
[[datasets]]
network_multiplier = 0.5
[[datasets.subsets]]
image_dir = "x"
[[datasets.subsets]]
metadata_file = "m.json"
""")
    back = tmp_path / "back.toml"
    result = run_cli("import", args, "--dataset-config", data, "-o", back)
    assert result.exit_code == 0, result.stderr
    text = result.stdout + result.stderr
    assert "datasets[0].network_multiplier: per-dataset network multipliers" in text
    assert "datasets[0].subsets[1]: fine-tuning" in text
    assert "no resolution: sd-scripts requires one" in text  # neither [general] nor the dataset has one
    import tomllib

    imported = tomllib.loads(back.read_text())
    assert imported["datasets"] == [{"num_repeats": 4, "subsets": [{"image_dir": "x"}]}]
    assert imported["dataset"]["caption_extension"] == ".caption"  # sd-scripts' default, not loracli's


def test_ss_datasets_as_sd_scripts_writes_it(folders):
    from loracli.config.loader import resolve_config
    from loracli.family import SD1
    from loracli.plan import build_plan
    from loracli.run.metadata import FOLDER_MODE_KEYS, build_metadata

    cfg = folders / "c.toml"
    cfg.write_text(TWO_DATASETS.replace('image_dir = "a"\nnum_repeats = 1', 'image_dir = "a"\nnum_repeats = 1\n'
                                        '[[datasets.subsets]]\nimage_dir = "reg"\nis_reg = true\n'
                                        'keep_tokens = 2\nclass_tokens = "person"'))
    resolved = resolve_config(cfg)
    plan = build_plan(resolved)
    meta = build_metadata(resolved.config, plan, SD1, session_id=1, training_started_at=0.0,
                          optimizer_name="AdamW", lr_scheduler_name="constant", learning_rate_recorded=1e-4,
                          network_args=None, config_hash="x")
    assert not set(FOLDER_MODE_KEYS) & set(meta)  # sd-scripts writes these only without --dataset_config
    datasets = json.loads(meta["ss_datasets"])
    assert [(d["batch_size_per_device"], d["resolution"], d["enable_bucket"], d["num_train_images"],
             d["num_reg_images"]) for d in datasets] == [(2, [512, 512], False, 10, 0), (3, [256, 256], True, 5, 6)]
    assert datasets[0]["bucket_info"] is None and datasets[0]["min_bucket_reso"] is None
    count = 5 + sd_scripts_reg_samples([1] * 6, 5)  # reg balanced to the dataset's own 5 training samples
    assert datasets[1]["bucket_info"]["buckets"] == {"0": {"resolution": [256, 256], "count": count}}
    assert datasets[1]["max_bucket_reso"] == 1024 and datasets[1]["is_dreambooth"] is True
    reg = datasets[1]["subsets"][1]
    assert (reg["image_dir"], reg["img_count"], reg["num_repeats"], reg["is_reg"], reg["class_tokens"],
            reg["keep_tokens"]) == ("reg", 6, 1, True, "person", 2)
    assert set(reg) == {"img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption",
                        "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                        "caption_prefix", "caption_suffix", "resize_interpolation", "image_dir", "class_tokens",
                        "is_reg"}
    # training folders of every dataset, a folder used twice gets " (2)"; reg folders are left out
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 5},
                                                   "a (2)": {"n_repeats": 1, "img_count": 5}}
    assert set(json.loads(meta["ss_tag_frequency"])) == {"a", "reg"}
    assert meta["ss_num_train_images"] == "15" and meta["ss_num_reg_images"] == "6"


def test_vram_estimate_takes_the_largest_bucket_and_the_largest_dataset_batch(folders, monkeypatch):
    from loracli import vram
    from loracli.config.loader import resolve_config
    from loracli.plan import build_plan
    from tests.pure.test_vram import counts

    monkeypatch.setattr(vram, "model_counts", lambda *args: counts())
    cfg = folders / "c.toml"
    cfg.write_text(TWO_DATASETS.replace("batch_size = 3", "batch_size = 5"))
    plan = build_plan(resolve_config(cfg, overrides=["training.vram_gb=80"]))
    # datasets[0] steps 512x512 batches of 2, datasets[1] 256x256 batches of 5: the peak is the larger of the two
    peaks = {(512, 2): vram.estimate_for_config(plan_config := resolve_config(cfg).config, counts(), (512, 512), 2, 1),
             (256, 5): vram.estimate_for_config(plan_config, counts(), (256, 256), 5, 1)}
    side, batch = max(peaks, key=lambda k: peaks[k].total)
    assert (plan.vram["bucket"], plan.vram["batch_size"]) == ([side, side], batch)
    assert plan.vram["total"] == peaks[(side, batch)].total
    plan = build_plan(resolve_config(cfg, overrides=["training.vram_gb=80", "training.train_batch_size=4"]))
    assert plan.vram["batch_size"] in (2, 5)  # train_batch_size is not used: every dataset sets its own


def test_inspect_shows_each_datasets_resolution_and_batch(tmp_path):
    from loracli.lorafile import inspect_file, render_inspect
    from tests.pure.test_inspect import write_safetensors

    datasets = [{"resolution": [1024, 1024], "batch_size_per_device": 2, "subsets": [
                    {"image_dir": "char", "num_repeats": 10, "img_count": 12, "is_reg": False}]},
                {"resolution": [512, 768], "batch_size_per_device": 8, "subsets": []}]
    path = write_safetensors(tmp_path / "x.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F32", [4, 320], 0.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": ("F32", [320, 4], 0.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ("F32", [], 4.0)},
        {"ss_datasets": json.dumps(datasets), "ss_network_module": "networks.lora"})
    report = inspect_file(path)
    assert report["training"]["resolution"] == "1024x1024 / 512x768"
    assert report["training"]["batch_size_per_device"] == "2 / 8"
    assert "1024x1024 / 512x768, batch 2 / 8" in render_inspect(report)
    assert report["dataset_dirs"] == [{"dir": "char", "repeats": 10, "images": 12}]
