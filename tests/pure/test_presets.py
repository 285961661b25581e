"""Every shipped preset loads through the real loader and carries what it promises."""

from __future__ import annotations

import zipfile
import subprocess
import sys
from pathlib import Path

import pytest

from loracli.config.loader import _flatten, resolve_config
from loracli.config.presets import available, builtin_dir, load_preset
from loracli.config.schema import SECTIONS
from loracli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "d"
[training]
max_train_epochs = 1
"""


def test_builtin_presets_are_the_files_in_presets_folder():
    names = {p.stem for p in (ROOT / "presets").glob("*.toml")}
    assert names == {"dadapt-v3", "prodigy", "adamw8bit", "locon", "sdxl-lowvram"}
    assert names <= set(available())
    assert builtin_dir().resolve() in {(ROOT / "presets").resolve(), *[p.parent.resolve() for p in available().values()]}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "presets").glob("*.toml")))
def test_every_preset_loads_and_validates(name, tmp_path):
    preset = load_preset(name)
    assert preset.description and preset.source and preset.purpose
    # Users can follow a source: guides by title, never by file number or a path they do not have.
    for text in (preset.source, preset.purpose, *preset.notes.values()):
        assert "seed" not in text.lower() and "../shared" not in text, text
    assert set(preset.values) <= set(SECTIONS)
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED.replace("tiny:sd15", "tiny:sdxl" if name.startswith("sdxl") else "tiny:sd15"))
    resolved = resolve_config(cfg, [name], [])
    dumped = resolved.config.model_dump()
    for key, value in _flatten(preset.values).items():
        node = dumped
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    for key in preset.notes:  # notes must talk about keys the preset sets
        assert any(k == key or k.startswith(key + ".") for k in _flatten(preset.values)), key


def test_reference_values(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED)
    d = resolve_config(cfg, ["dadapt-v3"], []).config
    assert (d.optimizer.optimizer_type, d.optimizer.lr_scheduler, d.optimizer.lr_warmup_steps) == ("DAdaptAdam", "cosine", 0.1)
    assert d.optimizer.optimizer_args == {"decouple": True, "weight_decay": 0.4, "betas": [0.9, 0.99]}
    assert (d.network.network_dim, d.network.network_alpha, d.training.train_batch_size, d.model.clip_skip) == (32, 16, 6, 2)
    p = resolve_config(cfg, ["prodigy"], []).config
    assert p.optimizer.optimizer_args["d_coef"] == 2 and p.training.min_snr_gamma == 5
    assert (p.dataset.min_bucket_reso, p.dataset.max_bucket_reso, p.dataset.max_token_length) == (320, 768, 225)
    a = resolve_config(cfg, ["adamw8bit"], []).config
    assert (a.optimizer.unet_lr, a.optimizer.text_encoder_lr, a.training.seed) == (1e-4, 5e-5, 420)
    assert (a.training.mixed_precision, a.output.save_precision, a.dataset.cache_latents) == ("fp16", "fp16", True)


def test_locon_only_touches_network_and_composes(tmp_path):
    assert set(load_preset("locon").values) == {"network"}
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED)
    c = resolve_config(cfg, ["prodigy", "locon"], []).config
    assert c.optimizer.optimizer_type == "Prodigy"
    assert (c.network.algo, c.network.network_dim, c.network.conv_dim, c.network.conv_alpha) == ("locon", 16, 8, 1)


def test_preset_by_path_and_user_folder(tmp_path, monkeypatch):
    mine = tmp_path / "mine.toml"
    mine.write_text('[preset]\nname = "mine"\ndescription = "d"\nsource = "me"\n[training]\nseed = 7\n')
    assert load_preset(str(mine)).values == {"training": {"seed": 7}}
    monkeypatch.setenv("LORACLI_PRESETS", str(tmp_path))
    assert available()["mine"] == mine


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean prodigy"):
        load_preset("prodigi")


def test_presets_ship_inside_the_wheel(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("loracli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("dadapt-v3", "prodigy", "adamw8bit", "locon", "sdxl-lowvram"):
        assert f"loracli/presets/{preset}.toml" in names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "loracli").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_sdxl_lowvram_values_and_what_they_come_from(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED.replace("tiny:sd15", "tiny:sdxl"))
    c = resolve_config(cfg, ["sdxl-lowvram"], []).config
    assert (c.model.sdxl, c.model.no_half_vae, c.training.mixed_precision) == (True, True, "bf16")
    assert (c.dataset.resolution, c.dataset.bucket_reso_steps, c.dataset.min_bucket_reso,
            c.dataset.max_bucket_reso) == (1024, 32, 256, 2048)
    assert c.network.network_train_unet_only and c.training.cache_text_encoder_outputs
    assert c.training.gradient_checkpointing and c.dataset.cache_latents and c.network.network_dim == 16
    preset = load_preset("sdxl-lowvram")
    assert "The Other LoRA Training Rentry" in preset.source and "LoRA Training Guide" in preset.source
    assert set(_flatten(preset.values)) == set(preset.notes)  # every value says why
    assert "optimizer" not in preset.values  # composes with any optimizer preset


def sdxl_dataset(root, make_image):
    for i, size in enumerate([(1024, 1024), (1216, 832), (832, 1216), (2000, 1000)]):
        make_image(root / "data" / "3_char" / f"{i}.png", *size)
        (root / "data" / "3_char" / f"{i}.txt").write_text("char, solo\n")


def test_sdxl_lowvram_composes_with_an_optimizer_preset_and_plans(tmp_path, make_image):
    import json

    from tests.pure.cli_helpers import run_cli

    sdxl_dataset(tmp_path, make_image)
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED.replace("tiny:sd15", "tiny:sdxl").replace('"d"', '"data"'))
    result = run_cli("plan", "--config", cfg, "--preset", "prodigy", "--preset", "sdxl-lowvram", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["model_family"] == "sdxl" and "tiny:sdxl" in plan["model_detection"]
    # The later preset wins where both set a value; prodigy keeps the optimizer.
    c = resolve_config(cfg, ["prodigy", "sdxl-lowvram"], []).config
    assert c.optimizer.optimizer_type == "Prodigy" and c.network.network_dim == 16
    assert (c.dataset.resolution, c.dataset.min_bucket_reso, c.dataset.max_bucket_reso) == (1024, 256, 2048)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in (b["resolution"] for b in plan["buckets"]))
    assert any(w % 64 for w, h in (b["resolution"] for b in plan["buckets"]))  # 32-px steps are used
    codes = {w["code"] for w in plan["warnings"]}
    assert not codes & {"W19", "W20", "W21", "W22"}  # the preset satisfies the SDXL rules
    # An SD1 model with this preset is refused at plan time, naming the key and what was found.
    cfg.write_text(REQUIRED.replace('"d"', '"data"'))
    refused = run_cli("plan", "--config", cfg, "--preset", "prodigy", "--preset", "sdxl-lowvram")
    assert refused.exit_code == 2 and "model.sdxl: is true but the model is SD1.x" in refused.stderr
