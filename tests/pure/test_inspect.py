"""`loracli inspect` on safetensors files written here byte by byte (no torch): sd-scripts-style
LoRA with varying dims, LoCon, LoHa, SDXL, no metadata, f16/bf16 alphas, broken files."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from loracli.lorafile import inspect_file, render_inspect, split_key
from loracli.safetensors_header import decode_scalar, read_header
from tests.pure.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
_PACK = {"F32": "<f", "F16": "<e"}


def scalar_bytes(dtype: str, value: float) -> bytes:
    if dtype == "BF16":
        return struct.pack("<f", value)[2:]  # the upper half of the float32
    return struct.pack(_PACK[dtype], value)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], float]],
                      metadata: dict[str, str] | None = None) -> Path:
    """tensors: name -> (dtype, shape, fill value). Every element holds the fill value."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    data = b""
    for name, (dtype, shape, value) in tensors.items():
        blob = scalar_bytes(dtype, value) * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def lora_module(name: str, dim: int, alpha: float, in_dim: int, out_dim: int, kernel: int | None = None,
                dtype: str = "F16", alpha_dtype: str = "F32") -> dict:
    down = [dim, in_dim] if kernel is None else [dim, in_dim, kernel, kernel]
    up = [out_dim, dim] if kernel is None else [out_dim, dim, 1, 1]
    return {f"{name}.lora_down.weight": (dtype, down, 0.01), f"{name}.lora_up.weight": (dtype, up, 0.0),
            f"{name}.alpha": (alpha_dtype, [], alpha)}


UNET_ATTN = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_attn1_to_{p}"
             for b in range(2) for a in range(2) for p in ("q", "k", "v")]
TE = [f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(3) for p in ("q", "k")]

SD_SCRIPTS_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "8",
    "ss_network_alpha": "4.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}),
    "ss_v2": "False",
    "ss_base_model_version": "sd_v1",
    "ss_sd_model_name": "animefull-final-pruned.safetensors",
    "ss_steps": "1500",
    "ss_max_train_steps": "1500",
    "ss_epoch": "10",
    "ss_num_epochs": "10",
    "ss_optimizer": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint(decouple=True,"
                    "weight_decay=0.01)",
    "ss_learning_rate": "1.0",
    "ss_unet_lr": "1.0",
    "ss_text_encoder_lr": "0.5",
    "ss_lr_scheduler": "cosine",
    "ss_lr_warmup_steps": "0",
    "ss_resolution": "(512, 512)",
    "ss_batch_size_per_device": "2",
    "ss_total_batch_size": "2",
    "ss_mixed_precision": "fp16",
    "ss_seed": "42",
    "ss_clip_skip": "2",
    "ss_dataset_dirs": json.dumps({"10_mychar": {"n_repeats": 10, "img_count": 30},
                                   "5_outfit": {"n_repeats": 5, "img_count": 12}}),
    "ss_tag_frequency": json.dumps({"10_mychar": {"1girl": 30, "solo": 28, "smile": 10},
                                    "5_outfit": {"1girl": 12, "jacket": 12, "smile": 3}}),
    "ss_training_comment": "None",
    "sshs_model_hash": "ab" * 32,
    "sshs_legacy_hash": "1234abcd",
    "modelspec.architecture": "stable-diffusion-v1/lora",
}


def sd_scripts_lora(tmp_path: Path) -> Path:
    """Like sd-scripts' networks.lora output: dim 8 mostly, dim 4 on the last UNet block, 3x3 conv LoRA
    (C3Lier) with conv_dim 4 / alpha 1, text encoder width 768, f16 weights, f32 alphas."""
    tensors: dict = {}
    for i, name in enumerate(UNET_ATTN):
        tensors |= lora_module(name, 4 if i >= 9 else 8, 4.0, 320, 320)
    for name in TE:
        tensors |= lora_module(name, 8, 4.0, 768, 768)
    for r in range(2):
        tensors |= lora_module(f"lora_unet_down_blocks_0_resnets_{r}_conv1", 4, 1.0, 320, 320, kernel=3)
    return write_safetensors(tmp_path / "mychar.safetensors", tensors, SD_SCRIPTS_META)


def test_sd_scripts_lora_with_varying_dims(tmp_path):
    report = inspect_file(sd_scripts_lora(tmp_path), top=3)
    assert report["algorithm"] == "LoCon (LoRA on 3x3 convs)" and report["network_module"] == "networks.lora"
    assert report["modules"] == {"total": 20, "unet": 14, "text_encoder": 6}
    assert report["dim"] is None and report["alpha"] == 4.0  # dims vary, alpha does not
    assert (report["conv_dim"], report["conv_alpha"]) == (4, 1.0)
    assert [(g["kind"], g["dim"], g["alpha"], g["modules"]) for g in report["dim_groups"]] == [
        ("linear", 8, 4.0, 15), ("linear", 4, 4.0, 3), ("conv", 4, 1.0, 2)]
    per_module = {m["name"]: m["dim"] for m in report["per_module"]}
    assert per_module[UNET_ATTN[9]] == 4 and per_module[UNET_ATTN[0]] == 8
    assert report["base_model"]["guess_from_weights"].startswith("SD1.x")
    assert report["base_model"]["base_model_version"] == "sd_v1" and report["base_model"]["v2"] is False
    t = report["training"]
    assert (t["steps"], t["epoch"], t["num_epochs"], t["text_encoder_lr"]) == (1500, 10, 10, 0.5)
    assert t["optimizer"].startswith("dadaptation.") and t["training_comment"] is None
    assert report["network_args"] == {"conv_dim": "4", "conv_alpha": "1"}
    assert report["dataset_dirs"] == [{"dir": "10_mychar", "repeats": 10, "images": 30},
                                      {"dir": "5_outfit", "repeats": 5, "images": 12}]
    assert report["tags"] == {"unique": 4, "top": [["1girl", 42], ["solo", 28], ["smile", 13]]}
    assert report["hashes"] == {"sshs_model_hash": "ab" * 32, "sshs_legacy_hash": "1234abcd"}
    # 15 modules at dim 8 and 3 at dim 4, (320+320) or (768+768) per rank; convs 4*(320*9+320)
    expected = sum(8 * 640 for _ in range(9)) + 3 * 4 * 640 + 6 * 8 * 1536 + 2 * 4 * (320 * 9 + 320)
    assert report["parameters"] == expected and report["dtypes"] == {"F16": 40}

    text = render_inspect(report)
    assert "varies by module" in text and "dim 8 alpha 4: 15 modules, dim 4 alpha 4: 3 modules" in text
    assert "conv dim/alpha  dim 4, alpha 1 (2 3x3 convs)" in text
    assert "10_mychar: 30 images × 10 repeats" in text and "1girl (42)" in text
    assert "steps 1500 of 1500, epoch 10 of 10" in text


def test_locon_loha_and_sdxl_parts(tmp_path):
    locon = {**lora_module("lora_unet_mid_block_attentions_0_proj_in", 4, 2.0, 64, 64, kernel=1),
             **lora_module("lora_unet_mid_block_resnets_0_conv1", 2, 1.0, 64, 64, kernel=3)}
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon", "conv_dim": "2"})}
    report = inspect_file(write_safetensors(tmp_path / "locon.safetensors", locon, meta))
    assert report["algorithm"].startswith("LoCon") and (report["dim"], report["alpha"]) == (4, 2.0)
    assert (report["conv_dim"], report["conv_alpha"]) == (2, 1.0)  # proj_in is 1x1: linear dim
    assert "algo=locon" in render_inspect(report)

    loha = {}
    for name, rank, width in (("lora_unet_up_blocks_1_attentions_0_proj_out", 8, 64),
                              ("lora_unet_up_blocks_1_resnets_0_conv2", 4, 64 * 9),
                              ("lora_te_text_model_encoder_layers_0_mlp_fc1", 8, 32)):
        loha |= {f"{name}.hada_w1_a": ("F32", [64, rank], 0.1), f"{name}.hada_w1_b": ("F32", [rank, width], 0.1),
                 f"{name}.hada_w2_a": ("F32", [64, rank], 0.1), f"{name}.hada_w2_b": ("F32", [rank, width], 0.0),
                 f"{name}.alpha": ("F32", [], float(rank))}
    report = inspect_file(write_safetensors(tmp_path / "loha.safetensors", loha))
    assert report["algorithm"] == "LoHa" and report["modules"] == {"total": 3, "unet": 2, "text_encoder": 1}
    assert (report["dim"], report["conv_dim"], report["conv_alpha"]) == (8, 4, 4.0)

    sdxl = {**lora_module("lora_unet_output_blocks_0_1_proj_in", 4, 4.0, 64, 64),
            **lora_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 4.0, 768, 768),
            **lora_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 4, 4.0, 1280, 1280)}
    report = inspect_file(write_safetensors(tmp_path / "sdxl.safetensors", sdxl))
    assert report["modules"] == {"total": 3, "unet": 1, "text_encoder_1": 1, "text_encoder_2": 1}
    assert report["base_model"]["guess_from_weights"].startswith("SDXL")


def test_lokr_ranks_and_full_factors(tmp_path):
    lokr = {"lora_unet_a_to_q.lokr_w1": ("F32", [4, 4], 0.1), "lora_unet_a_to_q.lokr_w2_a": ("F32", [80, 8], 0.1),
            "lora_unet_a_to_q.lokr_w2_b": ("F32", [8, 80], 0.0), "lora_unet_a_to_q.alpha": ("F32", [], 8.0),
            "lora_te_b_fc1.lokr_w1": ("F32", [4, 2], 0.1), "lora_te_b_fc1.lokr_w2": ("F32", [8, 8], 0.0),
            "lora_te_b_fc1.alpha": ("F32", [], 8.0)}
    report = inspect_file(write_safetensors(tmp_path / "lokr.safetensors", lokr))
    assert report["algorithm"] == "LoKr" and report["modules"] == {"total": 2, "unet": 1, "text_encoder": 1}
    assert {m["name"]: m["dim"] for m in report["per_module"]} == {"lora_unet_a_to_q": 8, "lora_te_b_fc1": None}
    assert "dim full alpha 8: 1 modules" in render_inspect(report)
    assert report["parameters"] == 16 + 640 + 640 + 8 + 64


def test_peft_key_names(tmp_path):
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": ("F32", [4, 32], 0.1),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": ("F32", [32, 4], 0.0),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [4, 32], 0.1),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [32, 4], 0.0)}
    report = inspect_file(write_safetensors(tmp_path / "peft.safetensors", peft))
    assert report["algorithm"] == "LoRA" and report["modules"] == {"total": 2, "unet": 1, "text_encoder": 1}
    assert (report["dim"], report["alpha"]) == (4, None)


@pytest.mark.parametrize("alpha_dtype,alpha", [("BF16", 8.0), ("BF16", 0.5), ("F16", 1.5), ("F32", 3.25)])
def test_alpha_dtypes_decode(tmp_path, alpha_dtype, alpha):
    tensors = lora_module("lora_unet_a_proj_in", 16, alpha, 8, 8, dtype="BF16", alpha_dtype=alpha_dtype)
    report = inspect_file(write_safetensors(tmp_path / "a.safetensors", tensors))
    assert report["alpha"] == alpha and report["dim"] == 16
    assert report["dtypes"] == {"BF16": 2} and report["alpha_dtypes"] == {alpha_dtype: 1}
    assert decode_scalar("BF16", struct.pack("<f", -2.0)[2:]) == -2.0


def test_file_without_metadata(tmp_path):
    path = write_safetensors(tmp_path / "bare.safetensors", lora_module("lora_te_text_model_x", 4, 1.0, 8, 8))
    report = inspect_file(path)
    assert report["metadata_keys"] == 0 and report["training"] == {} and report["hashes"] == {}
    assert report["algorithm"] == "LoRA" and report["network_module"] is None and report["tags"]["top"] == []
    text = render_inspect(report)
    assert "metadata        none" in text and "dim 4, alpha 1" in text


def test_key_splitting():
    assert split_key("lora_unet_a_b.lora_down.weight") == ("lora_unet_a_b", "lora_down.weight")
    assert split_key("lora_te_x.hada_w1_a") == ("lora_te_x", "hada_w1_a")
    assert split_key("unet.down_blocks.0.attn.to_q.lora_A.weight") == ("unet.down_blocks.0.attn.to_q", "lora_A.weight")


def broken_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "nope.safetensors"}
    (files := {**files, "empty": tmp_path / "empty.safetensors"})["empty"].write_bytes(b"")
    files["text"] = tmp_path / "notes.safetensors"
    files["text"].write_text("this is not a safetensors file at all, just some text\n")
    files["truncated"] = tmp_path / "cut.safetensors"
    files["truncated"].write_bytes(struct.pack("<Q", 1000) + b'{"__metadata__": {')
    files["not_json"] = tmp_path / "garbage.safetensors"
    files["not_json"].write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{")
    good = write_safetensors(tmp_path / "good.safetensors", lora_module("lora_unet_a", 4, 4.0, 64, 64))
    files["cut_data"] = tmp_path / "cut-data.safetensors"
    files["cut_data"].write_bytes(good.read_bytes()[:-100])
    return files


def test_broken_files_are_one_line_exit_3(tmp_path):
    for kind, path in broken_files(tmp_path).items():
        result = run_cli("inspect", path)
        assert result.exit_code == 3, (kind, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), (kind, lines)
        assert "Traceback" not in result.output
    assert "truncated header" in run_cli("inspect", tmp_path / "cut.safetensors").stderr


def test_cli_json_and_top(tmp_path):
    path = sd_scripts_lora(tmp_path)
    result = run_cli("inspect", path, "--json", "--top", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tags"]["top"] == [["1girl", 42]] and data["modules"]["total"] == 20
    text = run_cli("inspect", path).stdout
    assert text.splitlines()[1].startswith("algorithm       LoCon") and "hash            sshs_legacy_hash 1234abcd" in text
    assert read_header(path).metadata["ss_steps"] == "1500"


def test_inspect_runs_with_torch_unimportable(tmp_path):
    """The whole command goes through the header: it must work where torch cannot be imported."""
    path = sd_scripts_lora(tmp_path)
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'safetensors', 'diffusers', 'transformers', 'numpy'):\n"
        "            raise ImportError('blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "loracli", "inspect", str(path), "--json"], check=False,
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["modules"]["unet"] == 14
