"""full_fp16, fp8_base / fp8_base_unet and torch_compile, on a CPU: the parts that do not need CUDA
(parameter and optimizer-state dtypes, the gradient scaler patch, fp8 storage and its arithmetic,
the memory it saves) and one tiny run each that would fail if the option were ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loracli.config.loader import resolve_config
from loracli.errors import ConfigError
from loracli.plan import build_plan
from loracli.run.fp8 import FP8, compute_dtype, store_in_fp8
from loracli.run.precision import allow_fp16_unscale, network_dtype

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_run(tmp_path: Path, make_image, training: str, *, images: int = 4, extra: str = "",
             optimizer: str = "") -> Path:
    """A run folder for 3 steps of tiny:sd15 at 64 px with cached latents and the given [training] lines."""
    from loracli.rundir import create_run_dir, write_run_files

    for i in range(images):
        make_image(tmp_path / "data" / "2_a" / f"{i}.png", 64, 64, color=(i * 50, 30, 90))
        (tmp_path / "data" / "2_a" / f"{i}.txt").write_text("a red square")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                   'resolution = 64\ncache_latents = true\n[training]\nmax_train_steps = 3\nseed = 1\n'
                   f'{training}\n'
                   f'[optimizer]\nlearning_rate = 1e-3\n{optimizer}\n'
                   f'[output]\noutput_dir = "{tmp_path / "runs"}"\n{extra}')
    resolved = resolve_config(cfg)
    plan = build_plan(resolved)
    run_dir = create_run_dir(resolved.config)
    write_run_files(run_dir, resolved, plan, ["test"])
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --- full_fp16 -------------------------------------------------------------------------------

def test_the_scaler_unscales_fp16_gradients_once_patched():
    """torch's GradScaler refuses fp16 gradients; sd-scripts' patch (and ours) lets it unscale them:
    the gradient becomes grad·scale / scale and the step is SGD's p - lr·grad."""
    def scaled_backward(scaler):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16))
        x = torch.tensor([3.0, 0.25, -4.0], dtype=torch.float16)
        scaler.scale((p * x).sum()).backward()  # d/dp = x, scaled by 1024
        return p, x, torch.optim.SGD([p], lr=0.1)

    refusing = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, _, optimizer = scaled_backward(refusing)
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        refusing.unscale_(optimizer)

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    allow_fp16_unscale(scaler)
    p, x, optimizer = scaled_backward(scaler)
    start = p.detach().clone()
    assert p.grad.dtype == torch.float16 and torch.equal(p.grad, x * 1024)
    scaler.unscale_(optimizer)
    assert torch.equal(p.grad, x)
    scaler.step(optimizer)
    assert p.dtype == torch.float16 and torch.equal(p.detach(), start - (0.1 * x.float()).half())
    allow_fp16_unscale(None)  # no scaler (bf16, a CPU): nothing to patch


def test_the_network_dtype_follows_full_fp16_and_full_bf16_and_falls_back_on_a_cpu():
    said: list[str] = []
    assert network_dtype(True, False, "fp16", said.append) == torch.float16 and not said
    assert network_dtype(False, True, "bf16", said.append) == torch.bfloat16
    assert network_dtype(False, False, "fp16", said.append) is None
    # fp16 asked on a CPU runs as "no" (resolve_mixed_precision): full_fp16 goes with it, with a warning
    assert network_dtype(True, False, "no", said.append) is None
    assert len(said) == 1 and "full_fp16" in said[0] and "fp32" in said[0]


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_full_precision_trains_with_the_network_and_adam_state_in_half(tmp_path, make_image, monkeypatch,
                                                                       precision, dtype):
    """full_fp16 / full_bf16: parameters, Adam moments and the saved file in the half dtype.
    fp16 mixed precision needs CUDA in loracli (a CPU falls back to fp32); torch's CPU autocast does
    run fp16, so the run is forced to fp16 here to see full_fp16's parameters, moments and file.
    AdamW's default eps (1e-8) is 0 in fp16 and its squared gradients underflow (W80): eps 1e-3 here."""
    from loracli.run import train as train_module

    run_dir = make_run(tmp_path, make_image, f'mixed_precision = "{precision}"\nfull_{precision} = true',
                       optimizer="optimizer_args = { eps = 1e-3 }")
    monkeypatch.setattr(train_module, "resolve_mixed_precision", lambda requested, log: requested)
    built = []
    real_build = train_module.build_optimizer

    def spy(*args, **kwargs):
        optimizer, name = real_build(*args, **kwargs)
        built.append(optimizer)
        return optimizer, name

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    final = train_module.train(run_dir)
    params = [p for g in built[0].param_groups for p in g["params"]]
    assert params and all(p.dtype == dtype for p in params)
    moments = [t for s in built[0].state.values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == dtype for t in moments)
    with safe_open(str(final), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith("weight")} == {dtype}
    meta = metadata(final)
    # sd-scripts records full_fp16 only (ss_full_fp16), not full_bf16
    assert meta["ss_full_fp16"] == str(precision == "fp16") and meta["ss_mixed_precision"] == precision
    assert len(losses(run_dir)) == 3 and all(0 < v < 10 for v in losses(run_dir))

    # without the matching mixed precision the plan refuses it, as sd-scripts asserts
    cfg = tmp_path / "c.toml"
    cfg.write_text(cfg.read_text().replace(f'mixed_precision = "{precision}"', 'mixed_precision = "no"'))
    with pytest.raises(ConfigError, match={"fp16": "E80", "bf16": "E30"}[precision]):
        build_plan(resolve_config(cfg))


# --- fp8_base ----------------------------------------------------------------------------------

def _tiny_unet_with_lora(algo: str = "lora"):
    from loracli.run.models import load_sd_components
    from loracli.run.network import NetworkSpec, create_network

    torch.manual_seed(0)
    sd = load_sd_components("tiny:sd15")
    spec = NetworkSpec(algo=algo, dim=4, alpha=4, conv_dim=None, conv_alpha=None, dropout=None, rank_dropout=None,
                       module_dropout=None, use_tucker=False, use_scalar=False, train_unet=True,
                       train_text_encoder=False, extra_args={})
    network = create_network(spec, sd.text_encoders, sd.unet, sd.family)
    torch.manual_seed(1)
    for p in network.parameters():  # a trained-looking network (lora_up starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    sd.unet.to(dtype=torch.bfloat16)
    return sd, network


def _forward_backward(sd, network):
    from loracli.run.vram_track import LiveBytes, module_tensors

    torch.manual_seed(2)
    x, t, hidden = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with LiveBytes(module_tensors(sd.unet, network)) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sd.unet(x.bfloat16(), t, hidden.bfloat16()).sample.float()
        out.pow(2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
    return out.detach(), grads, live.peak


@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_fp8_weights_compute_as_their_bf16_values_and_keep_only_fp8_for_backward(algo):
    """The reference is the same model in bf16 computing with the fp8-representable weights (each
    Linear/Conv weight rounded to float8_e4m3fn and back): storing them in fp8 must give the same
    output and LoRA gradients bit for bit, and the unrounded model's output within fp8's rounding.
    The peak of live bytes must drop by at least half the bytes the weights lose: without keeping
    fp8 tensors for backward the upcast copies would make it higher than bf16's."""
    sd, network = _tiny_unet_with_lora(algo)
    torch.manual_seed(2)
    x, t, hidden = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        exact = sd.unet(x.bfloat16(), t, hidden.bfloat16()).sample.float()
    layers = [m for m in sd.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for m in layers:
        m.weight.data = m.weight.data.to(FP8).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in sd.unet.parameters())
    reference, reference_grads, reference_peak = _forward_backward(sd, network)
    network.zero_grad(set_to_none=True)

    stored = store_in_fp8(sd.unet, torch.bfloat16)
    assert stored == len(layers)
    assert all(m.parametrizations.weight.original.dtype == FP8 for m in layers)
    assert all(p.dtype == torch.float32 for p in network.parameters())  # the network is untouched
    assert compute_dtype(sd.unet) == torch.bfloat16 and sd.unet.dtype in (FP8, torch.bfloat16)
    fp8_bytes = sum(p.numel() * p.element_size() for p in sd.unet.parameters())
    out, grads, peak = _forward_backward(sd, network)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(grads, reference_grads, rtol=0, atol=0)
    assert (out - exact).norm() / exact.norm() < 0.25  # e4m3 keeps 3 mantissa bits
    assert peak <= reference_peak - 0.5 * (bf16_bytes - fp8_bytes)


def test_fp8_base_trains_with_fp8_unet_weights_and_saves_no_fp8(tmp_path, make_image, monkeypatch):
    from loracli.run import train as train_module

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2\n")
    run_dir = make_run(tmp_path, make_image, 'mixed_precision = "bf16"\nfp8_base_unet = true',
                       extra=f'[sample]\nsample_prompts = "{prompts}"\nsample_every_n_steps = 3\n')
    seen = []
    real_store = train_module.store_in_fp8

    def spy(module, dtype):
        count = real_store(module, dtype)
        seen.append((module, dtype, count))
        return count

    monkeypatch.setattr(train_module, "store_in_fp8", spy)
    final = train_module.train(run_dir)
    assert len(seen) == 1  # fp8_base_unet: the UNet only, the text encoder stays bf16
    unet, dtype, count = seen[0]
    assert dtype == torch.bfloat16 and count > 0
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(m.parametrizations.weight.original.dtype == FP8 for m in layers)
    with safe_open(str(final), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float32, torch.float16, torch.bfloat16}
    meta = metadata(final)
    assert meta["ss_fp8_base"] == "False" and meta["ss_fp8_base_unet"] == "True"
    assert len(losses(run_dir)) == 3 and all(0 < v < 10 for v in losses(run_dir))
    assert (run_dir / "samples" / "grid.png").is_file()  # sampling computes in bf16, not fp8


def test_fp8_base_stores_the_text_encoders_too():
    from loracli.run.models import load_sd_components
    from loracli.run.train import _place_models
    from loracli.config.schema import LoracliConfig

    sd = load_sd_components("tiny:sdxl")
    config = LoracliConfig.model_validate({"model": {"pretrained_model_name_or_path": "tiny:sdxl"},
                                           "training": {"mixed_precision": "bf16", "fp8_base": True}})
    _place_models(sd, torch.nn.Linear(2, 2), torch.device("cpu"), torch.bfloat16, "bf16", config)
    for module in (sd.unet, *sd.text_encoders):
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.parametrizations.weight.original.dtype == FP8 for m in linears)
    embeddings = [m for te in sd.text_encoders for m in te.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.weight.dtype == torch.bfloat16 for m in embeddings)  # fp8 has no embedding


# --- memory order and torch_compile (one eager run shared by both) ------------------------------

@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    """A plain 3-step run that records, in order, where the UNet and the VAE are moved and when the
    latent cache is filled."""
    from tests.conftest import write_image
    from loracli.run import train as train_module

    events: list[tuple[str, object]] = []
    real_load, real_fill = train_module.load_sd_components, train_module.LatentCache.fill

    def spying_to(name, module):
        real_to = module.to

        def to(*args, **kwargs):
            device = args[0] if args else kwargs.get("device")
            events.append((name, None if device is None else torch.device(device).type))
            return real_to(*args, **kwargs)
        return to

    def load(*args, **kwargs):
        sd = real_load(*args, **kwargs)
        sd.unet.to, sd.vae.to = spying_to("unet", sd.unet), spying_to("vae", sd.vae)
        return sd

    def fill(self, *args, **kwargs):
        events.append(("cache", None))
        return real_fill(self, *args, **kwargs)

    train_module.load_sd_components, train_module.LatentCache.fill = load, fill
    try:
        run_dir = make_run(tmp_path_factory.mktemp("eager"), write_image, "")
        train_module.train(run_dir)
    finally:
        train_module.load_sd_components, train_module.LatentCache.fill = real_load, real_fill
    return run_dir, events


def test_latents_are_cached_before_the_unet_reaches_the_device(eager_run):
    """sd-scripts: VAE on the device, cache, VAE off, then the UNet; the UNet is only cast before
    (`.to(None, dtype=...)`), so the caching pass never holds it on the device."""
    _, events = eager_run
    cache = events.index(("cache", None))
    before, after = events[:cache], events[cache + 1:]
    assert ("vae", "cpu") in before  # the device (a CPU here)
    assert [e for e in before if e[0] == "unet"] == [("unet", None)]  # cast in place, not moved
    assert after[:2] == [("vae", "cpu"), ("unet", "cpu")]  # VAE off the device, then the UNet on it


def test_torch_compile_trains_as_eager_and_reports_the_first_step_apart(tmp_path, make_image, eager_run):
    """aot_eager runs the compiled graphs with eager kernels (no C compiler needed, unlike inductor's
    ~1 min compile of even the tiny UNet on this CPU): the losses equal the eager run's; dynamo
    must really have compiled frames, and status.json holds the first step apart from the rest."""
    from torch._dynamo.utils import counters

    from loracli.run.train import train

    eager_dir, _ = eager_run
    counters.clear()
    run_dir = make_run(tmp_path, make_image, 'torch_compile = true\ndynamo_backend = "aot_eager"')
    final = train(run_dir)
    assert counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(losses(run_dir), losses(eager_dir), rtol=1e-4, atol=1e-5)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["first_step_s"] > 0 and 0 < status["steady_step_s"] < status["first_step_s"]
    assert final.is_file()


def test_a_failing_compile_is_one_line_naming_the_option():
    from torch._dynamo.exc import BackendCompilerFailed

    from loracli.run.compiled import compile_failure

    failure = compile_failure(BackendCompilerFailed(lambda *a: None, RuntimeError("no C compiler\nmore"), None),
                              "inductor")
    assert failure is not None and "training.torch_compile" in str(failure) and "\n" not in str(failure)
    assert 'dynamo_backend = "aot_eager"' in str(failure)
    assert compile_failure(RuntimeError("other"), "inductor") is None
