"""`loracli train` end to end on tiny:sd15: files, learning, loading, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.pure.cli_helpers import run_cli
from tests.smoke.evaluation import fixed_batch_loss


def train(cfg: Path, *args: str) -> Path:
    result = run_cli("train", "--config", cfg, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    runs = sorted((cfg.parent / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def test_run_folder_has_exactly_the_planned_files(smoke_project):
    run = train(smoke_project, "--set", "output.save_every_n_epochs=1")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["expected_files"] == ["smoke-000001.safetensors", "smoke-000002.safetensors", "smoke.safetensors"]
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted([".lock", "config.resolved.toml", "plan.json", "run.json", "status.json",  # .lock: the
                            "metrics.jsonl", "loss.png", "lr.png", *plan["expected_files"]])  # run lock (rundir)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == plan["total_steps"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, plan["total_steps"] + 1))
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["seed"] == 1 and run_info["environment"]["packages"]["torch"]
    with safe_open(run / "smoke.safetensors", "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_steps"] == str(plan["total_steps"]) and meta["ss_num_epochs"] == str(plan["epochs"])
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


@pytest.mark.parametrize("algo", ["lora", "locon", "loha", "lokr"])
def test_each_algo_learns(smoke_project, algo):
    run = train(smoke_project, "--set", f"network.algo={json.dumps(algo)}", "--set", "training.max_train_epochs=6")
    before = fixed_batch_loss(run, None)
    after = fixed_batch_loss(run, run / "smoke.safetensors")
    assert after < before, (algo, before, after)
    if algo in ("lora", "locon"):  # what users load in diffusers
        assert_diffusers_loads(run / "smoke.safetensors")


def assert_diffusers_loads(path: Path, pipe=None) -> None:
    """diffusers' load_lora_weights takes the file and it changes what the UNet computes
    (on tiny:sd15, or on the given pipeline)."""
    from diffusers import StableDiffusionPipeline

    from loracli.run.tiny_model import ensure_tiny_model

    if pipe is None:
        pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny:sd15"), local_files_only=True)
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(latents, torch.tensor([500]), hidden).sample
        pipe.load_lora_weights(str(path))
        loaded = pipe.unet(latents, torch.tensor([500]), hidden).sample
    assert not torch.allclose(base, loaded, atol=1e-6)


OPTIMIZERS = {
    "AdamW": [],
    "AdamW8bit": ["optimizer.optimizer_args.min_8bit_size=16"],
    "SGDNesterov": ["optimizer.learning_rate=0.05"],
    "Lion8bit": ["optimizer.learning_rate=1e-4", "optimizer.optimizer_args.min_8bit_size=16"],
    "DAdaptAdam": ["optimizer.learning_rate=1.0", "optimizer.optimizer_args.d0=1e-3",
                   "optimizer.optimizer_args.decouple=true"],
    "DAdaptLion": ["optimizer.learning_rate=1.0", "optimizer.optimizer_args.d0=1e-3"],
    "Prodigy": ["optimizer.learning_rate=1.0", "optimizer.optimizer_args.d0=1e-3"],
    "AdaFactor": ["optimizer.optimizer_args.relative_step=false", "optimizer.optimizer_args.scale_parameter=false"],
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_each_optimizer_family_learns(smoke_project, optimizer):
    sets = [f"optimizer.optimizer_type={json.dumps(optimizer)}", "training.max_train_epochs=6",
            *OPTIMIZERS[optimizer]]
    args = [a for s in sets for a in ("--set", s)]
    run = train(smoke_project, *args)
    before = fixed_batch_loss(run, None)
    after = fixed_batch_loss(run, run / "smoke.safetensors")
    assert after < before, (optimizer, before, after)


def test_resume_from_network_weights_continues_learning(smoke_project):
    first = train(smoke_project, "--set", "training.max_train_epochs=3")
    start = first / "smoke.safetensors"
    second = train(smoke_project, "--set", "training.max_train_epochs=3", "--set",
                   f"network.network_weights={json.dumps(str(start))}")
    base = fixed_batch_loss(second, None)
    after_first = fixed_batch_loss(second, start)
    after_second = fixed_batch_loss(second, second / "smoke.safetensors")
    assert after_second < after_first < base


def test_saved_file_metadata_and_hashes(smoke_project):
    import hashlib

    from safetensors.torch import load_file, save

    run = train(smoke_project, "--set", "output.save_precision='fp16'")
    path = run / "smoke.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    assert all(v.dtype == torch.float16 for v in tensors.values())  # alpha cast too
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_style": {"n_repeats": 1, "img_count": 2},
                                                   "2_char": {"n_repeats": 2, "img_count": 4}}
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    data = save(tensors, metadata=ss_only)
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["loracli_config_hash"] == json.loads((run / "plan.json").read_text())["config_hash"]


def test_nan_loss_stops_with_the_step(smoke_project):
    result = run_cli("train", "--config", smoke_project, "--set", "optimizer.learning_rate=1e30",
                     "--set", "training.max_train_epochs=6")
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert "at step" in result.stderr and "Traceback" not in result.output
    run = next((smoke_project.parent / "runs").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "at step" in status["error"]


def test_every_step_option_together_runs(smoke_project):
    """bf16, gradient checkpointing, cached latents with flips, noise and loss options, long prompts."""
    sets = ["training.mixed_precision='bf16'", "training.gradient_checkpointing=true",
            "dataset.cache_latents=true", "dataset.flip_aug=true", "training.min_snr_gamma=5",
            "training.noise_offset=0.05", "training.multires_noise_iterations=3", "model.clip_skip=2",
            "dataset.max_token_length=150", "model.v_parameterization=true", "dataset.shuffle_caption=true",
            "dataset.keep_tokens=1", "dataset.caption_dropout_rate=0.2", "network.algo='locon'",
            "network.network_dropout=0.1", "network.scale_weight_norms=1.0", "optimizer.lr_scheduler='cosine'",
            "optimizer.lr_warmup_steps=0.2", "training.gradient_accumulation_steps=2",
            "training.zero_terminal_snr=true", "training.ip_noise_gamma=0.1",
            "training.ip_noise_gamma_random_strength=true", "training.loss_type='smooth_l1'",
            "training.huber_schedule='exponential'", "training.debiased_estimation_loss=true",
            "training.scale_v_pred_loss_like_noise_pred=true", "training.v_pred_like_loss=0.1"]
    run = train(smoke_project, *[a for s in sets for a in ("--set", s)])
    plan = json.loads((run / "plan.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == plan["total_steps"] == plan["epochs"] * plan["steps_per_epoch"]
    assert plan["steps_per_epoch"] == -(-plan["batches_per_epoch"] // 2)  # GA 2
    assert all(loss == loss and loss < 1e3 for loss in losses)
    with safe_open(run / "smoke.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["modelspec.prediction_type"] == "v"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_clip_skip"] == "2"
    assert (meta["ss_zero_terminal_snr"], meta["ss_ip_noise_gamma"], meta["ss_ip_noise_gamma_random_strength"],
            meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_debiased_estimation"]) == \
        ("True", "0.1", "True", "smooth_l1", "exponential", "True")


def test_loss_and_noise_options_change_what_is_learned(smoke_project):
    """Same seed, same data: l2 against pseudo-Huber with input perturbation give other weights."""
    one = ["--set", "training.max_train_epochs=1"]
    plain = train(smoke_project, *one)
    other = train(smoke_project, *one, "--set", "training.loss_type='huber'", "--set", "training.ip_noise_gamma=0.2")
    assert plain != other
    with safe_open(plain / "smoke.safetensors", "pt") as a, safe_open(other / "smoke.safetensors", "pt") as b:
        key = next(k for k in a.keys() if k.endswith("lora_up.weight"))
        assert not torch.allclose(a.get_tensor(key), b.get_tensor(key))


def test_disk_latent_cache_is_reused_and_keyed(smoke_project):
    sets = ["--set", "dataset.cache_latents_to_disk=true"]
    first = run_cli("train", "--config", smoke_project, *sets)
    assert first.exit_code == 0, first.stderr
    assert "latents cached: 6 encoded" in first.stderr
    second = run_cli("train", "--config", smoke_project, *sets)
    assert "latents cached: 0 encoded, 6 read from disk" in second.stderr
    changed = run_cli("train", "--config", smoke_project, *sets, "--set", "dataset.resolution=128",
                      "--set", "dataset.min_bucket_reso=128", "--set", "dataset.max_bucket_reso=256")
    assert changed.exit_code == 0, changed.stderr
    assert "latents cached: 6 encoded" in changed.stderr  # new buckets: nothing stale reused


def test_tensorboard_logs_when_asked(smoke_project):
    train(smoke_project, "--set", "logging.logging_dir='tb'")
    events = list((smoke_project.parent / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_two_processes_split_the_epoch(smoke_project):
    """num_processes = 2 goes through accelerate launch (gloo processes on a CPU)."""
    run = train(smoke_project, "--set", "training.num_processes=2")
    plan = json.loads((run / "plan.json").read_text())
    assert plan["batches_per_process"] == -(-plan["batches_per_epoch"] // 2)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == plan["total_steps"]
    assert (run / "smoke.safetensors").is_file()


def test_saves_and_pruning_match_the_plan(smoke_project):
    """Epoch and step files with save_last_n_*: the run keeps exactly what the plan predicts."""
    sets = ["training.max_train_epochs=5", "output.save_every_n_epochs=1", "output.save_last_n_epochs=2",
            "output.save_every_n_steps=4", "output.save_last_n_steps=8"]
    run = train(smoke_project, *[a for s in sets for a in ("--set", s)])
    plan = json.loads((run / "plan.json").read_text())
    saved = sorted(p.name for p in run.glob("*.safetensors"))
    assert saved == sorted(plan["expected_files"])
    assert "smoke-000004.safetensors" in saved and "smoke-000001.safetensors" not in saved
    assert not list(run.glob(".*.tmp"))  # no temporary files left behind
    with safe_open(run / "smoke-000004.safetensors", "pt") as f:
        assert f.metadata()["ss_epoch"] == "4"


def test_out_of_memory_gives_suggestions_not_a_traceback(smoke_project, monkeypatch):
    from diffusers import UNet2DConditionModel

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", out_of_memory)
    result = run_cli("train", "--config", smoke_project)
    assert result.exit_code == 4 and "Traceback" not in result.output
    assert "out of GPU memory" in result.stderr and "gradient_checkpointing" in result.stderr
    run = next((smoke_project.parent / "runs").iterdir())
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_a_failed_final_save_keeps_a_training_state_to_resume_from(smoke_project, monkeypatch):
    """The disk fills up as the LoRA file is written: the run saves its training state first and says how
    to resume, in one line, exit 4."""
    import errno

    import loracli.run.outputs as outputs_module

    def disk_full(tensors, metadata, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs_module, "atomic_save_safetensors", disk_full)
    result = run_cli("train", "--config", smoke_project, "--set", "training.max_train_epochs=1")
    assert result.exit_code == 4, result.stderr
    (run,) = (smoke_project.parent / "runs").iterdir()
    states = sorted((run / "state").glob("step-*"))
    assert states and (states[-1] / "COMPLETE").exists()
    line = result.stderr.strip().splitlines()[-1]
    assert "disk full" in line and f"loracli train --resume {run}" in line and "Traceback" not in result.stderr
