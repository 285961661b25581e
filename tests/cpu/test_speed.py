"""The fast step keeps the numbers: prefetched batches, deferred loss reads, bucketed gradient sync,
and the plan's VRAM estimate held against the live bytes of real CPU steps."""

from __future__ import annotations

import random

import pytest
import torch

from loracli.config.loader import resolve_config
from loracli.errors import TrainingError
from loracli.plan import build_plan
from loracli.run.data import BucketBatches, ExampleLoader
from loracli.run.prefetch import BatchPrefetcher, planned_jobs
from loracli.run.step_sync import LossWatch, _buckets, average_gradients


@pytest.fixture
def plan_and_config(tmp_path, make_image):
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 128), (100, 60), (64, 64), (128, 64), (64, 64)]):
        folder = "3_a" if i < 4 else "1_b"
        make_image(tmp_path / "data" / folder / f"{i}.png", w, h, color=(i * 30, 100, 200))
        (tmp_path / "data" / folder / f"{i}.txt").write_text(f"tag{i}, red, blue, green\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text("""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
shuffle_caption = true
flip_aug = true
random_crop = true
caption_dropout_rate = 0.2
[training]
max_train_epochs = 3
train_batch_size = 2
gradient_accumulation_steps = 2
""")
    resolved = resolve_config(cfg)
    return build_plan(resolved), resolved.config


def _inline_walk(plan, config, loader, skip=0, start_epoch=1, global_step=0):
    """What the training loop did before prefetching: call the loader in the loop, note the state after each."""
    batches = BucketBatches(plan, 2, 7)
    ga, out = 2, []
    for epoch in range(start_epoch, plan.epochs + 1):
        epoch_batches = batches.epoch_batches(epoch)
        for i, indices in enumerate(epoch_batches):
            if epoch == start_epoch and i < skip:
                continue
            batch = loader(indices, epoch, global_step)
            out.append((epoch, i, global_step, batch, loader.rng.getstate()))
            if (i + 1) % ga == 0 or i == len(epoch_batches) - 1:
                global_step += 1
                if global_step >= plan.total_steps:
                    return out
    return out


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetched_batches_and_random_state_match_the_inline_loop(plan_and_config, depth):
    plan, config = plan_and_config
    expected = _inline_walk(plan, config, ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=5))
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=5)
    prefetch = BatchPrefetcher(loader, planned_jobs(BucketBatches(plan, 2, 7), 1, plan.epochs, 0, 2, 0,
                                                    plan.total_steps), depth=depth)
    try:
        for epoch, _, step, want, state in expected:
            got = prefetch(want.indices, epoch, step)
            assert got.captions == want.captions and got.flipped == want.flipped
            assert torch.equal(got.pixels, want.pixels)
            assert prefetch.rng_state == state  # what a saved training state records
    finally:
        prefetch.close()
    assert len(expected) > 6  # several epochs, GA and the epoch-end update were walked


def test_prefetch_resumes_mid_epoch_from_a_saved_state(plan_and_config):
    plan, config = plan_and_config
    full = _inline_walk(plan, config, ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=5))
    # resume after an update in the middle of an epoch (a state is saved right after an optimizer step)
    k = next(k for k in range(3, len(full) - 1) if full[k + 1][2] != full[k][2] and full[k + 1][0] == full[k][0])
    epoch, i, step, _, state = full[k]
    resumed = ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=5)
    resumed.rng.setstate(state)
    # the loop resumes after a whole step: the state was saved with i + 1 batches done
    prefetch = BatchPrefetcher(resumed, planned_jobs(BucketBatches(plan, 2, 7), epoch, plan.epochs, i + 1, 2,
                                                     step + 1, plan.total_steps))
    try:
        for e, _, s, want, _ in full[k + 1:]:
            got = prefetch(want.indices, e, s)
            assert got.captions == want.captions and torch.equal(got.pixels, want.pixels)
    finally:
        prefetch.close()


def test_prefetch_hands_a_loader_error_to_the_training_thread(plan_and_config):
    plan, config = plan_and_config

    class Broken:
        rng = random.Random(0)

        def __call__(self, *args):
            raise OSError("disk gone")

    prefetch = BatchPrefetcher(Broken(), iter([([0], 1, 0)]))
    with pytest.raises(OSError, match="disk gone"):
        prefetch([0], 1, 0)
    prefetch.close()


def test_loss_watch_reads_in_batches_and_names_the_first_bad_step():
    watch = LossWatch(every=3)
    for step, value in enumerate([0.5, 0.25], start=1):
        watch.add(step, 1, torch.tensor(value), {"unet": 1e-4})
        assert not watch.due()
    watch.add(3, 1, torch.tensor(0.125), {"unet": 1e-4})
    assert watch.due()
    assert [(r.step, r.loss) for r in watch.flush()] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert watch.flush() == []
    watch.add(4, 2, torch.tensor(1.0), {})
    watch.add(5, 2, torch.tensor(float("nan")), {})
    watch.add(6, 2, torch.tensor(float("inf")), {})
    with pytest.raises(TrainingError, match="at step 5 "):
        watch.flush()


def test_bucketed_gradient_average_equals_the_per_tensor_one():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (7,), (2, 2, 3, 3), (5, 1)]]
    params.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: left alone
    others = [torch.randn(p.shape) for p in params[:4]]  # "the other process"
    for p in params[:4]:
        p.grad = torch.randn(p.shape)
    expected = [(p.grad + o) / 2 for p, o in zip(params, others)]
    calls = []

    def reduce(flat, how):  # accelerator.reduce over two processes, the other one's grads laid out alike
        assert how == "mean"
        calls.append(flat.numel())
        start = sum(calls[:-1])
        other = torch.cat([o.reshape(-1) for o in others])[start:start + flat.numel()]
        return (flat + other) / 2

    issued = average_gradients(reduce, params, bucket_bytes=100)  # small buckets: several collectives
    assert issued == len(calls) > 1 and sum(calls) == sum(o.numel() for o in others)
    for p, want in zip(params, expected):
        assert torch.equal(p.grad, want)
    assert params[4].grad is None
    assert len(_buckets([p.grad for p in params[:4]], 2**20)) == 1  # the default: one flat tensor


# --- the VRAM estimate against the live bytes of real steps ---------------------------------------------

def _tracked_vs_estimated(model: str, batch: int, latent: int, train_te: bool, dtype, checkpointing: bool,
                          algo: str = "lora", conv_dim: int | None = None, fp8: bool = False):
    from loracli import vram
    from loracli.run.models import load_sd_components, resolve_model_dir
    from loracli.run.network import NetworkSpec, create_network, prepare_param_groups
    from loracli.run.optim import build_optimizer
    from loracli.run.vram_track import measure_training_step

    torch.manual_seed(0)
    sd = load_sd_components(model)
    spec = NetworkSpec(algo=algo, dim=8, alpha=4, conv_dim=conv_dim, conv_alpha=2 if conv_dim else None, dropout=None,
                       rank_dropout=0.0, module_dropout=0.0, use_tucker=False, use_scalar=False, train_unet=True,
                       train_text_encoder=train_te, extra_args={"train_norm": False, "rank_dropout_scale": False})
    network = create_network(spec, sd.text_encoders, sd.unet, sd.family)
    optimizer, _ = build_optimizer("AdamW", prepare_param_groups(network, 1e-4, 1e-4, 1e-4), 1e-4, {})
    peak = measure_training_step(sd, network, optimizer, batch, (latent, latent), ["a photo of a cat"], train_te,
                                 dtype, checkpointing, fp8_unet=fp8)
    counts = vram.counts_from_folder(resolve_model_dir(model))
    est = vram.estimate(counts, batch_size=batch, bucket=(latent * 8, latent * 8),
                        mixed_precision="no" if dtype == torch.float32 else "bf16",
                        gradient_checkpointing=checkpointing, cache_latents=True, cache_text_encoder_outputs=False,
                        train_unet=True, train_text_encoder=train_te, algo=algo, dim=8, conv_dim=conv_dim,
                        optimizer_type="AdamW", fp8_base=fp8)
    assert est.parts["network"] == pytest.approx(4 * sum(p.numel() for p in network.parameters()), rel=0.1)
    return sum(est.parts.values()), peak


@pytest.fixture(scope="module")
def sd15_topology(tmp_path_factory):
    from loracli.run.vram_track import build_sd15_topology

    folder = tmp_path_factory.mktemp("sd15-topology") / "model"
    build_sd15_topology(folder)
    return str(folder)


@pytest.mark.parametrize("case", [
    pytest.param(("tiny:sd15", 2, 16, True, torch.float32, False), id="tiny-fp32"),
    pytest.param(("topology", 1, 16, False, torch.float32, False, "locon", 4), id="sd15-topology-locon"),
    pytest.param(("topology", 1, 16, False, torch.float32, False), id="sd15-topology-fp32"),
    pytest.param(("topology", 2, 24, True, torch.float32, True), id="sd15-topology-checkpointing",
                 marks=pytest.mark.slow),
    pytest.param(("topology", 2, 24, True, torch.bfloat16, False), id="sd15-topology-bf16", marks=pytest.mark.slow),
    pytest.param(("topology", 2, 32, True, torch.float32, False), id="sd15-topology-32", marks=pytest.mark.slow),
    pytest.param(("tiny:sd15", 2, 16, True, torch.bfloat16, False, "lora", None, True), id="tiny-bf16-fp8"),
])
def test_vram_estimate_is_within_15_percent_of_the_tracked_peak(case, sd15_topology):
    model, batch, latent, train_te, dtype, checkpointing, *network = case
    estimated, tracked = _tracked_vs_estimated(sd15_topology if model == "topology" else model, batch, latent,
                                               train_te, dtype, checkpointing, *network)
    assert estimated == pytest.approx(tracked, rel=0.15), f"estimate {estimated} vs tracked {tracked}"


def test_plan_estimates_and_auto_batch_fills_the_limit(tmp_path, make_image):
    from loracli.run.tiny_model import ensure_tiny_model
    from loracli.vram import GIB

    ensure_tiny_model("tiny:sd15")  # the plan reads its headers; it never builds it
    for i in range(6):
        make_image(tmp_path / "data" / "5_a" / f"{i}.png", 64, 64, color=(i * 40, 90, 10))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                   'resolution = 64\ncache_latents = true\n[training]\nmax_train_steps = 4\n')
    plan = build_plan(resolve_config(cfg))
    one = plan.vram["total"]
    assert plan.vram["batch_size"] == 1 and one > 0
    two = build_plan(resolve_config(cfg, overrides=["training.train_batch_size=2"])).vram["total"]
    assert two > one

    limit = (one + (two - one) * 3.5) / GIB  # room for batch 4, not 5
    resolved = resolve_config(cfg, overrides=['training.train_batch_size="auto"', f"training.vram_gb={limit}"])
    auto = build_plan(resolved)
    assert auto.train_batch_size == 4 and resolved.config.training.train_batch_size == 4
    assert any('"auto" → 4' in n and "batch 5 would need" in n for n in auto.vram["notes"])

    # gradient accumulation 8: the effective batch stays 8 (4 × 2)
    resolved = resolve_config(cfg, overrides=['training.train_batch_size="auto"', f"training.vram_gb={limit}",
                                              "training.gradient_accumulation_steps=8"])
    kept = build_plan(resolved)
    assert (kept.train_batch_size, kept.gradient_accumulation_steps) == (4, 2)

    over = build_plan(resolve_config(cfg, overrides=[f"training.vram_gb={one / GIB / 2}"]))
    assert any(w["code"] == "W30" for w in over.warnings)


def test_adamw_is_fused_on_cuda_and_steps_as_the_plain_one(monkeypatch):
    from loracli.run import optim

    torch.manual_seed(0)
    start, grad = torch.randn(64), torch.randn(64)
    plain_p = torch.nn.Parameter(start.clone())
    plain, name = optim.build_optimizer("AdamW", [{"params": [plain_p], "lr": 1e-2}], 1e-2, {})
    assert not plain.defaults.get("fused")  # CPU tensors: the default implementation
    monkeypatch.setattr(optim, "_all_on_cuda", lambda groups: True)  # as if the network were on a GPU
    fused_p = torch.nn.Parameter(start.clone())
    fused, fused_name = optim.build_optimizer("AdamW", [{"params": [fused_p], "lr": 1e-2}], 1e-2, {})
    assert fused.defaults["fused"] is True and fused_name == name  # ss_optimizer does not change
    for _ in range(3):
        for p, o in ((plain_p, plain), (fused_p, fused)):
            p.grad = grad.clone()
            o.step()
    torch.testing.assert_close(fused_p.data, plain_p.data)
    user, _ = optim.build_optimizer("AdamW", [{"params": [torch.nn.Parameter(start.clone())], "lr": 1e-2}], 1e-2,
                                    {"foreach": False})
    assert not user.defaults.get("fused")  # the user's own choice wins
