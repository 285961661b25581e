"""Config resolution: layers, precedence, origins, --set parsing, error reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracli.config.loader import parse_set, resolve_config
from loracli.errors import ConfigError

BASE = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
[training]
max_train_epochs = 3
"""


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_presets_file_set(tmp_path):
    cfg = write(tmp_path, BASE + "[optimizer]\nlearning_rate = 0.5\n")
    r = resolve_config(cfg, ["adamw8bit", "dadapt-v3"], ["optimizer.unet_lr=0.7"])
    opt = r.config.optimizer
    assert opt.optimizer_type == "DAdaptAdam"  # later preset wins over earlier
    assert opt.learning_rate == 0.5  # file wins over presets
    assert opt.unet_lr == 0.7  # --set wins over everything
    assert r.config.network.network_dim == 32  # dadapt-v3 over adamw8bit's 64
    assert r.config.training.seed == 420  # from adamw8bit, untouched by dadapt-v3
    assert r.origin("optimizer.optimizer_type") == "preset dadapt-v3"
    assert r.origin("optimizer.learning_rate") == f"file {cfg}"
    assert r.origin("optimizer.unet_lr") == "--set"
    assert r.origin("training.train_batch_size") == "preset dadapt-v3"
    assert r.origin("training.gradient_accumulation_steps") == "default"


def test_optimizer_args_merge_per_key(tmp_path):
    cfg = write(tmp_path, BASE + "[optimizer.optimizer_args]\nweight_decay = 0.8\n")
    r = resolve_config(cfg, ["dadapt-v3"], [])
    args = r.config.optimizer.optimizer_args
    assert args == {"decouple": True, "weight_decay": 0.8, "betas": [0.9, 0.99]}
    assert r.origin("optimizer.optimizer_args.weight_decay") == f"file {cfg}"
    assert r.origin("optimizer.optimizer_args.decouple") == "preset dadapt-v3"


def test_paths_relative_to_config_file(tmp_path):
    sub = tmp_path / "proj"
    sub.mkdir()
    cfg = write(sub, BASE)
    r = resolve_config(cfg, [], [])
    assert r.config.dataset.train_data_dir == sub / "data"


@pytest.mark.parametrize(
    "item,key,value",
    [
        ("training.max_train_epochs=10", "training.max_train_epochs", 10),
        ("optimizer.learning_rate=1e-4", "optimizer.learning_rate", 1e-4),
        ("dataset.enable_bucket=true", "dataset.enable_bucket", True),
        ("dataset.resolution=[512, 768]", "dataset.resolution", [512, 768]),
        ("output.output_name=my lora", "output.output_name", "my lora"),
        ('output.output_name="42"', "output.output_name", "42"),
    ],
)
def test_parse_set(item, key, value):
    assert parse_set(item) == (key, value)


def test_all_problems_reported_at_once_with_file_key_and_hint(tmp_path):
    cfg = write(tmp_path, BASE + "[network]\nnetwork_dimm = 8\n[optimizer]\nlearning_rate = 'fast'\n"
                "[trainig]\nseed = 1\n")
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, [], [])
    lines = [p.render() for p in exc.value.problems]
    assert len(lines) == 3, lines
    text = "\n".join(lines)
    assert f"{cfg}: network.network_dimm: unknown key" in text
    assert "did you mean network.network_dim?" in text
    assert f"{cfg}: optimizer.learning_rate" in text
    assert "did you mean [training]?" in text


def test_key_in_wrong_section_gets_a_hint(tmp_path):
    cfg = write(tmp_path, BASE + "[network]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, [], [])
    assert "belongs in the [optimizer] section" in str(exc.value)


def test_error_names_the_origin_of_a_bad_set_value(tmp_path):
    cfg = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, [], ["training.train_batch_size=0"])
    text = str(exc.value)
    assert "training.train_batch_size" in text and "--set" in text


def test_missing_required_keys(tmp_path):
    cfg = write(tmp_path, "[training]\nmax_train_epochs = 1\n")
    with pytest.raises(ConfigError) as exc:
        resolve_config(cfg, [], [])
    text = str(exc.value)
    assert "model" in text and "dataset" in text and "required" in text


def test_warmup_float_ge_one_rejected(tmp_path):
    cfg = write(tmp_path, BASE + "[optimizer]\nlr_warmup_steps = 1.0\n")
    with pytest.raises(ConfigError, match="optimizer.lr_warmup_steps"):
        resolve_config(cfg, [], [])


def test_caption_extension_gets_a_dot(tmp_path):
    cfg = write(tmp_path, BASE)
    r = resolve_config(cfg, [], ["dataset.caption_extension=caption"])
    assert r.config.dataset.caption_extension == ".caption"
