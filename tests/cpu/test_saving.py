"""Saving layer: atomic writes, save_precision casts, sshs hashes, ss_* / modelspec metadata."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracli.config.schema import LoracliConfig
from loracli.family import SD1, SD2
from loracli.plan import PLAN_VERSION, Plan
from loracli.run import saving
from loracli.run.metadata import (
    assemble_file_metadata,
    build_metadata,
    modelspec_metadata,
    no_metadata_subset,
    per_save_metadata,
)
from loracli.run.saving import (
    atomic_save_safetensors,
    cast_for_save,
    cleanup_temp_files,
    model_file_hashes,
    sshs_hashes,
)

EMPTY_SHA_PREFIX = hashlib.sha256(b"").hexdigest()[:8]  # "e3b0c442"

# §8.3 "Always written", key by key.
ALWAYS_WRITTEN = [
    # run / session
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_training_comment", "ss_sd_scripts_commit_hash",
    # learning rates and optimizer
    "ss_learning_rate", "ss_text_encoder_lr", "ss_unet_lr", "ss_optimizer", "ss_max_grad_norm",
    "ss_lr_warmup_steps", "ss_lr_scheduler",
    # dataset and step counts
    "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    # network
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout",
    # precision and base model
    "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip", "ss_max_token_length",
    "ss_cache_latents", "ss_seed", "ss_lowram",
    # noise and loss
    "ss_noise_offset", "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale",
    "ss_zero_terminal_snr", "ss_min_snr_gamma", "ss_ip_noise_gamma", "ss_debiased_estimation",
    "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type", "ss_huber_schedule",
    "ss_huber_scale", "ss_huber_c",
    # captions and dataset options
    "ss_caption_dropout_rate", "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range", "ss_prior_loss_weight", "ss_scale_weight_norms", "ss_resize_interpolation",
    # fp8 and validation
    "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps",
    "ss_validate_every_n_epochs", "ss_validate_every_n_steps",
]
# §8.3 "Without --dataset_config" (folder mode).
FOLDER_MODE = [
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution",
    "ss_color_aug", "ss_flip_aug", "ss_random_crop", "ss_shuffle_caption", "ss_keep_tokens",
    "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso", "ss_max_bucket_reso",
    "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info",
]
JSON_KEYS = ["ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info"]
MINIMUM = {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"}


# ---------------------------------------------------------------- helpers

def make_config(**sections) -> LoracliConfig:
    data = {
        "model": {"pretrained_model_name_or_path": "tiny:sd15"},
        "dataset": {"train_data_dir": "/tmp/x"},
        "training": {"max_train_epochs": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return LoracliConfig.model_validate(data)


def make_plan(**overrides) -> Plan:
    fields = dict(
        plan_version=PLAN_VERSION, loracli_version="0.1.0", config_hash="abc123", model_family="sd1",
        total_steps=30, epochs=3, steps_per_epoch=10, batches_per_epoch=20, batches_per_process=10,
        num_processes=2, gradient_accumulation_steps=1, train_batch_size=2, formula="3 x ceil(20/2/1)",
        num_train_images=40, num_reg_images=5, warmup_steps=0,
        buckets=[{"resolution": [448, 576], "count": 10, "batches": 5},
                 {"resolution": [512, 512], "count": 30, "batches": 15}],
        mean_ar_error=0.0125, images=[], skipped=[],
        dataset_dirs={"10_cat": {"n_repeats": 10, "img_count": 4}},
        reg_dataset_dirs={"1_animal": {"n_repeats": 1, "img_count": 5}},
        tag_frequency={"10_cat": {"cat": 4, "sitting": 2}},
        save_epochs=[], save_steps=[], expected_files=["last.safetensors"], warnings=[], errors=[], notes=[],
    )
    fields.update(overrides)
    return Plan(**fields)


def meta_for(config: LoracliConfig, plan: Plan | None = None, **kw) -> dict[str, str]:
    args = dict(session_id=1234, training_started_at=1700000000.5, optimizer_name="torch.optim.adamw.AdamW",
                lr_scheduler_name=config.optimizer.lr_scheduler,
                learning_rate_recorded=config.optimizer.learning_rate, network_args=None, config_hash="abc123")
    args.update(kw)
    family = SD2 if config.model.v2 else SD1
    return build_metadata(config, plan or make_plan(), family, **args)


def lora_tensors(dim: int = 4, width: int = 32, alpha=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {
        f"{name}.alpha": torch.tensor(alpha),
        f"{name}.lora_down.weight": torch.randn(dim, width, generator=g),
        f"{name}.lora_up.weight": torch.zeros(width, dim),
    }


def independent_hashes(serialised: bytes) -> tuple[str, str]:
    """addnet hashes from raw bytes, written out here rather than taken from the module."""
    header_len = int.from_bytes(serialised[:8], "little")
    model = hashlib.sha256(serialised[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(serialised[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


def header_dtypes(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


# ---------------------------------------------------------------- atomic save

def test_atomic_save_writes_complete_file_and_no_temp(tmp_path):
    target = tmp_path / "out" / "mylora.safetensors"
    tensors = lora_tensors()
    atomic_save_safetensors(tensors, {"ss_v2": "False"}, target)
    loaded = load_file(target)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded[next(k for k in tensors if "down" in k)], tensors[next(k for k in tensors if "down" in k)])
    with safe_open(target, "pt") as f:
        assert f.metadata() == {"ss_v2": "False"}
    assert [p.name for p in target.parent.iterdir()] == ["mylora.safetensors"]


def test_write_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "mylora.safetensors"

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"trunc")  # a truncated header
        raise OSError("No space left on device")

    monkeypatch.setattr(saving, "save_file", half_write)
    with pytest.raises(OSError, match="No space"):
        atomic_save_safetensors(lora_tensors(), {}, target)
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "mylora.safetensors"
    atomic_save_safetensors(lora_tensors(alpha=1), {"ss_steps": "10"}, target)
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(saving.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_save_safetensors(lora_tensors(alpha=8), {"ss_steps": "20"}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mylora.safetensors"]


def test_killed_save_leaves_only_a_temp_that_cleanup_removes(tmp_path, monkeypatch):
    target = tmp_path / "mylora.safetensors"

    class Killed(BaseException):
        pass

    def die(src, dst):
        raise Killed

    # a killed process runs no cleanup: disable it and die right before the rename
    monkeypatch.setattr(saving, "_discard", lambda path: None)
    monkeypatch.setattr(saving.os, "replace", die)
    with pytest.raises(Killed):
        atomic_save_safetensors(lora_tensors(), {}, target)
    monkeypatch.undo()
    leftovers = list(tmp_path.iterdir())
    assert not target.exists()
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".mylora.safetensors.")
    assert leftovers[0].name.endswith(".tmp")

    unrelated = [tmp_path / ".status.json.tmp-123", tmp_path / "notes.tmp", tmp_path / "keep.safetensors"]
    for p in unrelated:
        p.write_text("x")
    removed = cleanup_temp_files(tmp_path)
    assert removed == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in unrelated)
    assert cleanup_temp_files(tmp_path / "missing") == []


def test_non_string_metadata_is_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError, match="ss_steps"):
        atomic_save_safetensors(lora_tensors(), {"ss_steps": 10}, tmp_path / "a.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- casts

def test_no_save_precision_keeps_int_alpha_as_i64(tmp_path):
    tensors = cast_for_save(lora_tensors(alpha=1), None)
    alpha_key = next(k for k in tensors if k.endswith(".alpha"))
    assert tensors[alpha_key].dtype == torch.int64
    assert tensors[alpha_key].dim() == 0
    path = tmp_path / "a.safetensors"
    atomic_save_safetensors(tensors, {}, path)
    dtypes = header_dtypes(path)
    assert dtypes[alpha_key] == "I64"
    assert {dtypes[k] for k in dtypes if k != alpha_key} == {"F32"}


@pytest.mark.parametrize("precision, dtype, tag", [
    ("fp16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16"), ("float", torch.float32, "F32"),
])
def test_save_precision_casts_every_tensor_alpha_included(tmp_path, precision, dtype, tag):
    source = lora_tensors(alpha=1)
    source = {k: (v.half() if v.is_floating_point() else v) for k, v in source.items()}
    tensors = cast_for_save(source, precision)
    assert {t.dtype for t in tensors.values()} == {dtype}
    alpha_key = next(k for k in tensors if k.endswith(".alpha"))
    assert tensors[alpha_key].item() == 1
    path = tmp_path / "a.safetensors"
    atomic_save_safetensors(tensors, {}, path)
    assert set(header_dtypes(path).values()) == {tag}


def test_cast_gives_contiguous_cpu_copies():
    weight = torch.randn(8, 4).t()  # non-contiguous view
    assert not weight.is_contiguous()
    out = cast_for_save({"w": weight}, None)
    assert out["w"].is_contiguous() and out["w"].device.type == "cpu"
    assert torch.equal(out["w"], weight)
    weight.add_(1.0)  # training goes on: the saved copy must not change
    assert not torch.equal(out["w"], weight)


def test_unknown_save_precision_is_an_error():
    with pytest.raises(ValueError, match="fp8"):
        cast_for_save(lora_tensors(), "fp8")


# ---------------------------------------------------------------- sshs hashes

def test_sshs_hashes_match_independent_computation_small_file(tmp_path):
    tensors = lora_tensors()
    ss = {"ss_network_dim": "4", "ss_v2": "False"}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=ss)
    expected = independent_hashes(path.read_bytes())
    assert sshs_hashes(tensors, ss) == expected
    assert expected[1] == EMPTY_SHA_PREFIX == "e3b0c442"  # smaller than 1 MiB
    # non-ss keys take no part
    assert sshs_hashes(tensors, {**ss, "modelspec.title": "x", "loracli_version": "9"}) == expected


def test_sshs_legacy_hash_of_a_file_over_1mib(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(512, 640, generator=g),  # 1.25 MiB of F32
               "lora_unet_x.alpha": torch.tensor(4.0)}
    ss = {"ss_network_dim": "512", "ss_tag_frequency": json.dumps({"10_cat": {"cat": 3}})}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=ss)
    assert path.stat().st_size > 0x110000
    model_hash, legacy_hash = independent_hashes(path.read_bytes())
    assert legacy_hash != EMPTY_SHA_PREFIX
    assert sshs_hashes(tensors, ss) == (model_hash, legacy_hash)
    # only ss_* keys are serialised: modelspec or other keys would shift the legacy window
    assert sshs_hashes(tensors, {**ss, "modelspec.description": "d" * 500, "loracli_version": "0"}) == (
        model_hash, legacy_hash)
    # the legacy window includes the header, so ss metadata changes it; the model hash does not
    changed = sshs_hashes(tensors, {**ss, "ss_training_comment": "a much longer comment " * 20})
    assert changed[0] == model_hash and changed[1] != legacy_hash


def test_saved_file_carries_hashes_recomputable_from_its_own_bytes(tmp_path):
    config = make_config(output={"output_name": "mylora"})
    ss = per_save_metadata(meta_for(config), steps=30, epoch=3, finished_at=1700000100.0)
    spec = modelspec_metadata(config, SD1, title="mylora", resolution=(512, 512), timestamp=1700000000.5)
    tensors = cast_for_save(lora_tensors(), None)
    path = tmp_path / "mylora.safetensors"
    atomic_save_safetensors(tensors, assemble_file_metadata(ss, spec, tensors), path)

    with safe_open(path, "pt") as f:
        file_meta = f.metadata()
    on_disk = load_file(path)
    ss_only = {k: v for k, v in file_meta.items() if k.startswith("ss_")}
    ref = tmp_path / "ref.safetensors"
    save_file(on_disk, str(ref), metadata=ss_only)
    assert (file_meta["sshs_model_hash"], file_meta["sshs_legacy_hash"]) == independent_hashes(ref.read_bytes())
    assert file_meta["modelspec.title"] == "mylora"
    assert file_meta["loracli_version"] and file_meta["loracli_config_hash"] == "abc123"
    assert file_meta["ss_steps"] == "30" and file_meta["ss_epoch"] == "3"


def test_model_file_hashes(tmp_path):
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"abc" * 100)
    assert model_file_hashes(small) == (EMPTY_SHA_PREFIX, hashlib.sha256(small.read_bytes()).hexdigest())
    big = tmp_path / "big.safetensors"
    data = os.urandom(0x100000 + 0x20000)
    big.write_bytes(data)
    assert model_file_hashes(big) == (hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                                      hashlib.sha256(data).hexdigest())
    with pytest.raises(IsADirectoryError):
        model_file_hashes(tmp_path)


# ---------------------------------------------------------------- ss_* metadata

def test_build_metadata_has_every_reference_key_as_strings():
    meta = meta_for(make_config())
    missing = [k for k in ALWAYS_WRITTEN + FOLDER_MODE if k not in meta]
    assert missing == []
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in JSON_KEYS:
        json.loads(meta[key])
    assert "ss_network_args" not in meta
    assert meta["loracli_config_hash"] == "abc123" and meta["loracli_version"]


def test_build_metadata_values_as_sd_scripts_records_them():
    config = make_config(training={"train_batch_size": 2, "num_processes": 2, "gradient_accumulation_steps": 3,
                                   "max_train_epochs": 3},
                         optimizer={"lr_warmup_steps": 0.1, "learning_rate": 1e-4, "text_encoder_lr": 5e-5})
    meta = meta_for(config)
    assert meta["ss_network_dim"] == "None"
    assert meta["ss_network_alpha"] == "1.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dropout"] == "None"
    assert meta["ss_resolution"] == "(512, 512)"
    assert meta["ss_output_name"] == "None"
    assert meta["ss_training_comment"] == "None"
    assert meta["ss_lr_warmup_steps"] == "0.1"
    assert meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_unet_lr"] == "None"
    assert meta["ss_total_batch_size"] == "12"
    assert meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_num_batches_per_epoch"] == "10"  # per process, not the 20 of the whole epoch
    assert meta["ss_num_epochs"] == "3"
    assert meta["ss_max_train_steps"] == "30"
    assert meta["ss_num_train_images"] == "40" and meta["ss_num_reg_images"] == "5"
    assert meta["ss_num_validation_images"] == "0"
    assert meta["ss_session_id"] == "1234" and meta["ss_training_started_at"] == "1700000000.5"
    assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == "tiny:sd15"
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta
    assert meta["ss_loss_type"] == "l2"
    assert (meta["ss_huber_schedule"], meta["ss_huber_scale"], meta["ss_huber_c"]) == ("snr", "1.0", "0.1")
    assert meta["ss_validation_split"] == "0.0"
    assert meta["ss_lowram"] == "False" and meta["ss_full_fp16"] == "False"
    assert meta["ss_multires_noise_discount"] == "0.3"
    assert meta["ss_sd_scripts_commit_hash"] == "(unknown)"
    # folder mode without bucketing
    assert meta["ss_bucket_info"] == "null"
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("None", "None")
    assert meta["ss_enable_bucket"] == "False" and meta["ss_bucket_no_upscale"] == "False"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_cat": {"n_repeats": 10, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_animal": {"n_repeats": 1, "img_count": 5}}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 4, "sitting": 2}}


def test_bucket_info_and_limits_with_bucketing():
    config = make_config(dataset={"enable_bucket": True, "min_bucket_reso": 250, "max_bucket_reso": 1000,
                                  "resolution": [768, 512], "bucket_no_upscale": True})
    meta = meta_for(config)
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [448, 576], "count": 10}, "1": {"resolution": [512, 512], "count": 30}},
        "mean_img_ar_error": 0.0125,
    }
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("192", "1024")  # rounded to the step
    assert meta["ss_enable_bucket"] == "True" and meta["ss_bucket_no_upscale"] == "True"
    assert meta["ss_resolution"] == "(768, 512)"


def test_network_args_recorded_with_injected_dropout():
    config = make_config(network={"algo": "locon", "network_dim": 16, "network_alpha": 8, "conv_dim": 4})
    meta = meta_for(config, network_args={"algo": "locon", "conv_dim": "4", "conv_alpha": "1"})
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": "4", "conv_alpha": "1",
                                                   "dropout": None}


def test_adafactor_relative_step_clears_recorded_lrs():
    config = make_config(optimizer={"optimizer_type": "Adafactor", "learning_rate": 1e-3, "unet_lr": 2e-3,
                                    "text_encoder_lr": 5e-4})
    meta = meta_for(config, learning_rate_recorded=None, lr_scheduler_name="adafactor:0.001",
                    optimizer_name="transformers.optimization.Adafactor(relative_step=True)")
    assert meta["ss_learning_rate"] == "None"
    assert meta["ss_unet_lr"] == "None"
    assert meta["ss_text_encoder_lr"] == "0.0005"
    assert meta["ss_lr_scheduler"] == "adafactor:0.001"
    assert meta["ss_optimizer"] == "transformers.optimization.Adafactor(relative_step=True)"


def test_v_parameterization_and_clip_skip_and_local_model_name(tmp_path):
    model_dir = tmp_path / "my-sd2-768"
    model_dir.mkdir()
    config = make_config(model={"pretrained_model_name_or_path": str(model_dir) + "/", "v2": True,
                                "v_parameterization": True, "clip_skip": 2})
    meta = meta_for(config)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_clip_skip"] == "2"
    assert meta["ss_sd_model_name"] == "my-sd2-768"
    assert "ss_sd_model_hash" not in meta  # a diffusers folder has no file hash


def test_single_file_model_gets_both_model_hashes(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"0123456789" * 10)
    meta = meta_for(make_config(model={"pretrained_model_name_or_path": str(ckpt)}))
    assert meta["ss_sd_model_name"] == "model.safetensors"
    assert meta["ss_sd_model_hash"] == EMPTY_SHA_PREFIX
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_per_save_metadata_adds_three_keys_without_touching_base():
    base = meta_for(make_config())
    saved = per_save_metadata(base, steps=120, epoch=0, finished_at=1700000999.25)
    assert set(saved) - set(base) == {"ss_training_finished_at", "ss_steps", "ss_epoch"}
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("120", "0", "1700000999.25")
    assert "ss_steps" not in base


def test_no_metadata_subset():
    base = per_save_metadata(meta_for(make_config()), steps=1, epoch=1, finished_at=1.0)
    assert set(no_metadata_subset(base)) == MINIMUM
    with_args = meta_for(make_config(network={"algo": "loha"}), network_args={"algo": "loha"})
    subset = no_metadata_subset(with_args)
    assert set(subset) == MINIMUM | {"ss_network_args"}
    assert subset["ss_network_args"] == with_args["ss_network_args"]


# ---------------------------------------------------------------- modelspec

def test_modelspec_keys_sd1():
    config = make_config(output={"output_name": "mylora"})
    spec = modelspec_metadata(config, SD1, title="mylora", resolution=(512, 768), timestamp=1700000000.75)
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "mylora",
        "modelspec.resolution": "512x768",
        "modelspec.date": datetime.datetime.fromtimestamp(1700000000).isoformat(),
        "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": spec["modelspec.implementation_version"],
    }
    assert spec["modelspec.implementation_version"].startswith("loracli/")
    assert "." not in spec["modelspec.date"]  # whole seconds


def test_modelspec_v_parameterization_clip_skip_timesteps_and_title_fallback():
    config = make_config(model={"v2": True, "v_parameterization": True, "clip_skip": 2},
                         training={"min_timestep": 100})
    spec = modelspec_metadata(config, SD2, title=None, resolution=(768, 768), timestamp=1700000000.5)
    assert spec["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert spec["modelspec.prediction_type"] == "v"
    assert spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.timestep_range"] == "100,1000"
    assert spec["modelspec.title"] == "LoRA@1700000000.5"
    plain = modelspec_metadata(make_config(), SD1, title="t", resolution=(512, 512), timestamp=0.0)
    assert "modelspec.encoder_layer" not in plain and "modelspec.timestep_range" not in plain


def test_assembled_metadata_with_no_metadata_keeps_modelspec_and_hashes():
    config = make_config()
    ss = no_metadata_subset(per_save_metadata(meta_for(config), steps=1, epoch=1, finished_at=1.0))
    spec = modelspec_metadata(config, SD1, title="t", resolution=(512, 512), timestamp=1700000000.0)
    tensors = lora_tensors()
    meta = assemble_file_metadata(ss, spec, tensors)
    assert set(meta) == MINIMUM | set(spec) | {"sshs_model_hash", "sshs_legacy_hash"}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, ss)
