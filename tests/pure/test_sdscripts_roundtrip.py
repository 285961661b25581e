"""Round trip: loracli config -> `export sd-scripts` -> `import` -> the same resolved config.

For the example config alone and combined with every shipped preset (and one
composition), the resolved config is exported with the exporter's code,
config.toml + dataset.toml are imported back, and the re-resolved config must
be equal, value for value. Nothing is exempt today; a value sd-scripts cannot
carry would be listed in NOT_REPRESENTABLE with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.config.presets import builtin_dir
from loracli.plan import build_plan
from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, build_export, write_export
from loracli.sdscripts.importer import import_file, render_toml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"
PRESETS = sorted(p.stem for p in builtin_dir().glob("*.toml"))

# Dotted keys whose value legitimately does not survive sd-scripts' files, with the reason.
# None for the shipped presets and example: training.num_processes (an accelerate option,
# in train.sh only) and the loracli-only state-saving keys keep their defaults there.
NOT_REPRESENTABLE: dict[str, str] = {}

CASES = [pytest.param([], id="example")] + [pytest.param([p], id=p) for p in PRESETS] + [
    pytest.param(["prodigy", "locon"], id="prodigy+locon")]


def test_every_shipped_preset_is_covered():
    assert {"adamw8bit", "dadapt-v3", "locon", "prodigy"} <= set(PRESETS)


@pytest.mark.parametrize("presets", CASES)
def test_export_then_import_gives_the_same_config(tmp_path, presets):
    sdxl = any(p.startswith("sdxl") for p in presets)  # SDXL presets need an SDXL model
    original = resolve_config(EXAMPLE, presets, ['model.pretrained_model_name_or_path="tiny:sdxl"',
                                                 "dataset.shuffle_caption=false"] if sdxl else [])
    exported = build_export(original.config, build_plan(original))
    out_dir = tmp_path / "export"
    write_export(out_dir, exported)

    result = import_file(out_dir / CONFIG_FILE, out_dir / DATASET_FILE)
    # export only writes what sd-scripts accepts, and import must take all of it back
    assert result.unsupported == {}
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(result), encoding="utf-8")
    back = resolve_config(imported)

    before, after = original.config.model_dump(), back.config.model_dump()
    for dotted in NOT_REPRESENTABLE:
        section, key = dotted.split(".")
        before[section].pop(key), after[section].pop(key)
    for section in before:
        assert after[section] == before[section], section
    # the folder tree came back from the dataset TOML's subsets, not from a path in config.toml
    assert back.config.dataset.train_data_dir == (ROOT / "examples" / "tiny" / "dataset")
    assert any("subsets" in key for key in result.mapped)


def test_a_value_sd_scripts_cannot_carry_is_caught(tmp_path):
    """The comparison above is not vacuous: a loracli-only value is lost on the way and shows up."""
    original = resolve_config(EXAMPLE, [], ["output.save_state_every_n_steps=10"])
    exported = build_export(original.config, build_plan(original))
    assert [key for key, _ in exported.unsupported] == ["output.save_state_every_n_steps"]
    write_export(tmp_path, exported)
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(import_file(tmp_path / CONFIG_FILE, tmp_path / DATASET_FILE)), encoding="utf-8")
    back = resolve_config(imported)
    assert back.config.output.save_state_every_n_steps is None
    assert back.config.model_dump()["dataset"] == original.config.model_dump()["dataset"]


SDXL_CASES = {
    "sdxl-lora": ["model.sdxl=true", "dataset.bucket_reso_steps=32", "model.no_half_vae=true",
                  'training.mixed_precision="fp16"'],
    "sdxl-locon-te-lrs": ["model.sdxl=true", 'network.network_module="lycoris.kohya"', 'network.algo="locon"', "network.conv_dim=4", "network.conv_alpha=1",
                          "optimizer.text_encoder_lr=[1e-4, 5e-5]", "optimizer.unet_lr=2e-4"],
    "sdxl-loha-cached-te": ["model.sdxl=true", 'network.network_module="lycoris.kohya"', 'network.algo="loha"', "network.conv_dim=4",
                            "network.network_train_unet_only=true", "training.cache_text_encoder_outputs=true",
                            "training.cache_text_encoder_outputs_to_disk=true", "dataset.shuffle_caption=false"],
    "sdxl-lokr": ["model.sdxl=true", 'network.network_module="lycoris.kohya"', 'network.algo="lokr"', "network.factor=4"],
}


@pytest.mark.parametrize("via", ["config.toml", "train.sh"])
@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_export_then_import_gives_the_same_config(tmp_path, case, via):
    """SDXL: sdxl_train_network.py's files come back as the same SDXL config, read from config.toml (its
    first-line comment names the script) or from train.sh (the script name on the command line)."""
    sets = ['model.pretrained_model_name_or_path="tiny:sdxl"', *SDXL_CASES[case]]
    original = resolve_config(EXAMPLE, [], sets)
    exported = build_export(original.config, build_plan(original))
    assert exported.script == "sdxl_train_network.py"
    out_dir = tmp_path / "export"
    write_export(out_dir, exported)
    if via == "config.toml":
        result = import_file(out_dir / CONFIG_FILE, out_dir / DATASET_FILE)
    else:
        result = import_file(out_dir / "train.sh")
        # train.sh's own accelerate setting has no loracli key (loracli runs accelerate itself)
        assert set(result.unsupported) == {"accelerate --num_cpu_threads_per_process"}
        result.unsupported.clear()
    assert result.unsupported == {}
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(result), encoding="utf-8")
    back = resolve_config(imported)
    assert back.config.model.sdxl is True
    assert back.config.model_dump() == original.config.model_dump()
