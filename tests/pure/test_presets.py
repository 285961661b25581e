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
    assert names == {"dadapt-v3", "prodigy", "adamw8bit", "locon"}
    assert names <= set(available())
    assert builtin_dir().resolve() in {(ROOT / "presets").resolve(), *[p.parent.resolve() for p in available().values()]}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "presets").glob("*.toml")))
def test_every_preset_loads_and_validates(name, tmp_path):
    preset = load_preset(name)
    assert preset.description and preset.source and preset.purpose
    assert set(preset.values) <= set(SECTIONS)
    cfg = tmp_path / "c.toml"
    cfg.write_text(REQUIRED)
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
    for preset in ("dadapt-v3", "prodigy", "adamw8bit", "locon"):
        assert f"loracli/presets/{preset}.toml" in names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "loracli").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
