"""full_fp16, fp8_base / fp8_base_unet, torch_compile / dynamo_backend at plan time (no torch): schema,
sd-scripts' assertions as lint errors, the VRAM estimate's bytes, metadata, export and import."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracli import lint, vram
from loracli.config.loader import resolve_config
from loracli.errors import ConfigError
from loracli.family import SD1
from loracli.lint import lint_config
from loracli.plan import build_plan
from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, build_export, write_export
from loracli.sdscripts.import_args import REASONS
from loracli.sdscripts.importer import import_file, render_toml
from tests.pure.test_vram import counts, est

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"


def findings(sets: list[str]) -> dict[str, list[str]]:
    resolved = resolve_config(EXAMPLE, [], sets)
    out: dict[str, list[str]] = {}
    for f in lint_config(resolved.config, SD1, resolved.origins):
        out.setdefault(f.code, []).append(f"{f.key}: {f.message}")
    return out


def test_the_schema_takes_the_options_and_refuses_unknown_backends():
    resolved = resolve_config(EXAMPLE, [], ["training.full_fp16=true", 'training.mixed_precision="fp16"',
                                            "training.torch_compile=true", 'training.dynamo_backend="aot_eager"'])
    tr = resolved.config.training
    assert tr.full_fp16 and tr.torch_compile and tr.dynamo_backend == "aot_eager"
    assert not tr.fp8_base and not tr.fp8_base_unet and tr.dynamo_backend != "nvprims_nvfuser"
    with pytest.raises(ConfigError, match="dynamo_backend"):
        resolve_config(EXAMPLE, [], ['training.dynamo_backend="nvprims_nvfuser"'])  # gone from torch 2
    with pytest.raises(ConfigError, match="fp8_base"):
        resolve_config(EXAMPLE, [], ['training.fp8_base="yes"'])


def test_e80_full_fp16_needs_fp16_mixed_precision():
    for mp in ("no", "bf16"):
        found = findings(["training.full_fp16=true", f'training.mixed_precision="{mp}"'])
        assert "E80" in found and "training.mixed_precision" in found["E80"][0]
    assert "E80" not in findings(["training.full_fp16=true", 'training.mixed_precision="fp16"'])


def test_w80_full_fp16_with_adam_moments_in_fp16():
    fp16 = ["training.full_fp16=true", 'training.mixed_precision="fp16"']
    assert "W80" in findings(fp16 + ['optimizer.optimizer_type="AdamW"'])
    assert "W80" in findings(fp16 + ['optimizer.optimizer_type="Prodigy"', "optimizer.learning_rate=1.0"])
    assert "W80" not in findings(fp16 + ['optimizer.optimizer_type="AdamW8bit"'])
    assert "W80" not in findings(['optimizer.optimizer_type="AdamW"'])


@pytest.mark.parametrize("key", ["fp8_base", "fp8_base_unet"])
def test_e81_fp8_needs_mixed_precision_and_e82_torch_2_1(key, monkeypatch):
    found = findings([f"training.{key}=true", 'training.mixed_precision="no"'])
    assert found.get("E81") and found["E81"][0].startswith(f"training.{key}:")
    assert "training.mixed_precision" in found["E81"][0]
    for mp in ("bf16", "fp16"):
        assert "E81" not in findings([f"training.{key}=true", f'training.mixed_precision="{mp}"'])
    monkeypatch.setattr(lint, "_torch_version", lambda: (2, 0))
    assert "E82" in findings([f"training.{key}=true", 'training.mixed_precision="bf16"'])
    monkeypatch.setattr(lint, "_torch_version", lambda: (2, 1))
    assert "E82" not in findings([f"training.{key}=true", 'training.mixed_precision="bf16"'])


def test_the_estimate_counts_fp8_weights_at_one_byte_and_the_half_network():
    c = counts()
    unet, te = c.params["unet"], c.params["text_encoder"]
    base = est()  # bf16, text encoder trains
    assert base.parts["UNet weights"] == unet * 2
    unet_only = est(fp8_base=True)
    assert unet_only.parts["UNet weights"] == unet * 1
    assert unet_only.parts["text encoder weights"] == te * 2
    both = est(fp8_base=True, fp8_text_encoder=True)
    embeddings = 49_408 * 768  # CLIP's token embeddings cannot be fp8
    assert both.parts["text encoder weights"] == (te - embeddings) * 1 + embeddings * 2
    half = est(network_half=True)
    for part in ("network", "gradients", "optimizer state"):
        assert half.parts[part] == base.parts[part] // 2


def test_the_config_reaches_the_estimate():
    def parts(sets):
        resolved = resolve_config(EXAMPLE, [], ['training.mixed_precision="bf16"', *sets])
        return vram.estimate_for_config(resolved.config, counts(), (512, 512), 1, 1).parts

    plain = parts([])
    assert parts(["training.fp8_base_unet=true"])["UNet weights"] == plain["UNet weights"] // 2
    assert parts(["training.fp8_base_unet=true"])["text encoder weights"] == plain["text encoder weights"]
    assert parts(["training.fp8_base=true"])["text encoder weights"] < plain["text encoder weights"]
    fp16 = parts(['training.mixed_precision="fp16"', "training.full_fp16=true"])
    assert fp16["network"] == plain["network"] // 2


def test_metadata_records_them_as_sd_scripts_does():
    from loracli.family import FAMILIES
    from loracli.run.metadata import build_metadata

    resolved = resolve_config(EXAMPLE, [], ['training.mixed_precision="fp16"', "training.full_fp16=true",
                                            "training.fp8_base=true"])
    plan = build_plan(resolved)
    meta = build_metadata(resolved.config, plan, FAMILIES[plan.model_family], session_id=1,
                          training_started_at=0.0, optimizer_name="torch.optim.adamw.AdamW",
                          lr_scheduler_name="constant", learning_rate_recorded=1e-4, network_args=None,
                          config_hash="x")
    assert (meta["ss_full_fp16"], meta["ss_fp8_base"], meta["ss_fp8_base_unet"]) == ("True", "True", "False")
    # fp16 asked on a CPU runs as fp32, and full_fp16 with it: the file says what ran
    fallback = build_metadata(resolved.config, plan, FAMILIES[plan.model_family], session_id=1,
                              training_started_at=0.0, optimizer_name="x", lr_scheduler_name="constant",
                              learning_rate_recorded=1e-4, network_args=None, config_hash="x",
                              mixed_precision="no")
    assert fallback["ss_full_fp16"] == "False"


@pytest.mark.parametrize("sets", [
    ['training.mixed_precision="fp16"', "training.full_fp16=true", "training.torch_compile=true",
     'training.dynamo_backend="aot_eager"'],
    ['training.mixed_precision="bf16"', "training.fp8_base=true", "training.fp8_base_unet=true"],
], ids=["full_fp16+compile", "fp8"])
def test_export_writes_sd_scripts_flags_and_import_reads_them_back(tmp_path, sets):
    original = resolve_config(EXAMPLE, [], sets)
    exported = build_export(original.config, build_plan(original))
    assert not exported.unsupported
    flat = {k: v for section in exported.args.values() for k, v in section.items()} \
        if all(isinstance(v, dict) for v in exported.args.values()) else exported.args
    for item in sets:
        key, value = item.split("=", 1)
        name = key.split(".")[1]
        assert str(flat[name]).lower() == value.strip('"').lower(), name
    write_export(tmp_path, exported)
    result = import_file(tmp_path / CONFIG_FILE, tmp_path / DATASET_FILE)
    assert result.unsupported == {}
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(result), encoding="utf-8")
    assert resolve_config(imported).config.training == original.config.training


def test_import_no_longer_refuses_them():
    assert not {"full_fp16", "fp8_base", "torch_compile", "dynamo_backend"} & set(REASONS)


def test_the_kohya_ss_gui_dynamo_backend_turns_torch_compile_on(tmp_path):
    """The GUI passes dynamo_backend to accelerate launch, which compiles the UNet sd-scripts prepares:
    the same as --torch_compile --dynamo_backend; "no" (the GUI's default) leaves it off."""
    import json

    data = json.loads((ROOT / "tests" / "data" / "sdscripts" / "import" / "kohya_ss_lora.json").read_text())
    for backend, expected in (("inductor", {"torch_compile": True, "dynamo_backend": "inductor"}), ("no", {})):
        (tmp_path / "gui.json").write_text(json.dumps({**data, "dynamo_backend": backend, "dynamo_mode": "default"}))
        result = import_file(tmp_path / "gui.json")
        training = result.values["training"]
        assert {k: training[k] for k in ("torch_compile", "dynamo_backend") if k in training} == expected
        assert "dynamo_mode" in result.unsupported  # accelerate-only tuning
