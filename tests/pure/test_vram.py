"""The VRAM estimate's arithmetic and train_batch_size = "auto", without torch."""

from __future__ import annotations

import json
import struct

import pytest

from loracli import vram
from loracli.config.loader import resolve_config
from loracli.config.schema import TrainingSection
from loracli.errors import ConfigError
from loracli.plan import build_plan

SD15 = json.loads((vram.RUN_ASSETS / "sd1_unet.json").read_text())


def counts() -> vram.ModelCounts:
    return vram.ModelCounts(SD15, {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
                            unet_targets=[(320, 320, 1)] * 100, unet_conv_targets=[(320, 320, 3)] * 50,
                            text_targets=[(768, 768, 1)] * 72, text_layers=[(12, 768)])


def est(**changes) -> vram.VramEstimate:
    args = dict(batch_size=1, bucket=(512, 512), mixed_precision="bf16", gradient_checkpointing=False,
                cache_latents=True, cache_text_encoder_outputs=False, train_unet=True, train_text_encoder=True,
                algo="lora", dim=16, conv_dim=None, optimizer_type="AdamW")
    args.update(changes)
    return vram.estimate(counts(), **args)


def test_parts_follow_the_options():
    base = est()
    assert base.total == sum(base.parts.values())
    assert base.parts["UNet weights"] == 859_520_964 * 2  # bf16
    assert est(mixed_precision="no").parts["UNet weights"] == 859_520_964 * 4
    assert "VAE weights" not in base.parts and "VAE weights" in est(cache_latents=False).parts
    assert est(gradient_checkpointing=True).parts["UNet activations"] < base.parts["UNet activations"] / 2
    assert est(batch_size=4).parts["UNet activations"] == pytest.approx(4 * base.parts["UNet activations"], rel=1e-6)
    assert est(bucket=(768, 768)).parts["UNet activations"] > 2 * base.parts["UNet activations"]
    assert est(math_attention=True).parts["UNet activations"] > base.parts["UNet activations"]
    no_te = est(train_text_encoder=False, cache_text_encoder_outputs=True)
    assert "text encoder weights" not in no_te.parts and "text encoder activations" not in no_te.parts
    assert est(conv_dim=8, algo="locon").parts["network"] > base.parts["network"]


def test_optimizer_state_per_optimizer():
    trained = est().parts["network"] // 4
    per_param = {name: est(optimizer_type=name).parts["optimizer state"] / trained
                 for name in ("AdamW", "AdamW8bit", "Prodigy", "DAdaptAdam", "Lion", "AdaFactor")}
    assert per_param == pytest.approx({"AdamW": 8, "AdamW8bit": 2, "Prodigy": 16, "DAdaptAdam": 12, "Lion": 4,
                                       "AdaFactor": 4}, rel=1e-3)
    unknown = est(optimizer_type="my.Optimizer")
    assert unknown.parts["optimizer state"] == est().parts["optimizer state"] and unknown.notes


def test_auto_batch_picks_the_largest_that_fits_and_keeps_the_effective_batch():
    def at(batch):  # 1 GiB fixed + 0.75 GiB per image
        return vram.VramEstimate({}, int((1 + 0.75 * batch) * vram.GIB), 0, batch, (512, 512))

    batch, accum, why = vram.choose_batch_size(at, int(5 * vram.GIB), 1, cap=100)
    assert (batch, accum) == (5, 1) and "batch 6 would need" in why[0]
    assert vram.choose_batch_size(at, int(5 * vram.GIB), 1, cap=3)[:2] == (3, 1)  # no batch beyond the bucket
    assert vram.choose_batch_size(at, int(5 * vram.GIB), 8, cap=100)[:2] == (4, 2)  # divisors of 8 only
    assert vram.choose_batch_size(at, int(5 * vram.GIB), 6, cap=100)[:2] == (3, 2)
    batch, accum, why = vram.choose_batch_size(at, int(1.2 * vram.GIB), 1, cap=100)
    assert (batch, accum) == (1, 1) and "even batch 1" in why[0]


def test_schema_takes_auto_and_vram_gb():
    assert TrainingSection(train_batch_size="auto").train_batch_size == "auto"
    assert TrainingSection(vram_gb=7.5).vram_gb == 7.5
    for bad in ("4", "max", True, 0):
        with pytest.raises(ValueError):
            TrainingSection(train_batch_size=bad)
    with pytest.raises(ValueError):
        TrainingSection(vram_gb=0)


def _write_safetensors(path, tensors: dict[str, tuple[int, ...]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_counts_come_from_the_headers(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(SD15))
    _write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight": (320,),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
        "down_blocks.0.resnets.0.time_emb_proj.weight": (320, 1280),
    })
    _write_safetensors(folder / "text_encoder" / "model.safetensors", {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
        "text_model.final_layer_norm.weight": (768,),
    })
    got = vram.counts_from_folder(folder)
    assert got.params == {"unet": 320 * 320 * 2 + 320 + 320 * 320 * 9 + 320 * 1280,
                          "text_encoder": 768 * 768 + 3072 * 768 + 768}
    assert sorted(got.unet_targets) == [(320, 320, 1), (320, 320, 1)]
    assert sorted(got.unet_conv_targets) == [(320, 320, 3), (1280, 320, 1)]
    assert sorted(got.text_targets) == [(768, 768, 1), (768, 3072, 1)]
    assert got.text_layers == [(1, 768)]


def test_auto_needs_a_readable_model(tmp_path, make_image, monkeypatch):
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "empty-cache"))  # tiny model not built here
    make_image(tmp_path / "data" / "2_a" / "0.png", 64, 64)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                   'resolution = 64\n[training]\nmax_train_steps = 2\ntrain_batch_size = "auto"\nvram_gb = 8\n')
    with pytest.raises(ConfigError, match="built on its first run"):
        build_plan(resolve_config(cfg))
    plan = build_plan(resolve_config(cfg, overrides=["training.train_batch_size=1"]))
    assert plan.vram == {}  # no estimate, and no error, for a model that cannot be read yet
