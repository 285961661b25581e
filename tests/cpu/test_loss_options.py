"""sd-scripts' loss and noise options, each against its formula (library/train_util.py and
custom_train_functions.py at the pinned commit, transcribed here)."""

from __future__ import annotations

import math

import pytest
import torch

from loracli.run.models import training_noise_scheduler
from loracli.run.step import (
    LossOptions,
    compute_snr,
    diffusion_loss,
    enforce_zero_terminal_snr,
    huber_c_per_sample,
    input_perturbation,
)

T = torch.tensor([0, 10, 250, 500, 999])


@pytest.fixture
def scheduler():
    return training_noise_scheduler(False)


def _snr(scheduler, t):
    ac = scheduler.alphas_cumprod[t]
    return ac / (1 - ac)


def test_huber_thresholds_follow_each_schedule(scheduler):
    c, scale = 0.2, 1.5
    constant = huber_c_per_sample(LossOptions("huber", "constant", c, scale), T, scheduler)
    assert torch.allclose(constant, torch.full((5,), c * scale))
    exponential = huber_c_per_sample(LossOptions("smooth_l1", "exponential", c, scale), T, scheduler)
    alpha = -math.log(c) / 1000
    assert torch.allclose(exponential, torch.exp(-alpha * T.float()) * scale)
    snr = huber_c_per_sample(LossOptions("huber", "snr", c, scale), T, scheduler)
    sigma = ((1 - scheduler.alphas_cumprod[T]) / scheduler.alphas_cumprod[T]) ** 0.5
    assert torch.allclose(snr, (1 - c) / (1 + sigma) ** 2 + c)
    assert huber_c_per_sample(LossOptions("l2"), T, scheduler) is None


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_loss_types_are_the_pseudo_huber_family(scheduler, loss_type):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    options = LossOptions(loss_type, "constant", 0.3)
    got = diffusion_loss(pred, target, T, scheduler, torch.ones(5), None, False, options)
    d = pred - target
    elementwise = {"l2": d**2, "l1": d.abs(), "huber": 2 * 0.3 * (torch.sqrt(d**2 + 0.09) - 0.3),
                   "smooth_l1": 2 * (torch.sqrt(d**2 + 0.09) - 0.3)}[loss_type]
    assert got.item() == pytest.approx(elementwise.mean(dim=(1, 2, 3)).mean().item(), rel=1e-5)


def test_snr_weightings_in_sd_scripts_order(scheduler):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    base = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * torch.tensor([1, 1, 1, 0.5, 1])
    snr = torch.clamp(_snr(scheduler, T), max=1000)
    scale = snr / (snr + 1)
    options = LossOptions(scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.2, debiased_estimation_loss=True)
    for v_param in (False, True):
        got = diffusion_loss(pred, target, T, scheduler, torch.tensor([1, 1, 1, 0.5, 1]), 5.0, v_param, options)
        raw = _snr(scheduler, T)
        loss = base * torch.clamp(raw, max=5.0) / (raw + 1 if v_param else raw)  # min-SNR first
        loss = loss * scale  # scale_v_pred_loss_like_noise_pred
        loss = loss + loss / scale * 0.2  # v_pred_like_loss
        loss = loss * (1 / (snr + 1) if v_param else 1 / torch.sqrt(snr))  # debiased estimation
        assert got.item() == pytest.approx(loss.mean().item(), rel=1e-5)


def test_zero_terminal_snr_rescales_the_schedule_but_not_the_loss_weights(scheduler):
    before = scheduler.alphas_cumprod.clone()
    snr_before = compute_snr(scheduler, T)
    enforce_zero_terminal_snr(scheduler)
    after = scheduler.alphas_cumprod
    assert after[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    # sqrt(alpha_bar) is shifted and scaled linearly: the same affine map at every step
    root_b, root_a = before.sqrt(), after.sqrt()
    k = root_b[0] / (root_b[0] - root_b[-1])
    assert torch.allclose(root_a, (root_b - root_b[-1]) * k, atol=1e-6)
    assert torch.allclose(scheduler.betas, 1 - torch.cat([after[:1], after[1:] / after[:-1]]), atol=1e-6)
    assert torch.allclose(compute_snr(scheduler, T), snr_before)  # sd-scripts' all_snr predates the fix
    noisy = scheduler.add_noise(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([999]))
    assert noisy.abs().max().item() < 1e-6  # the last step is pure noise


def test_input_perturbation_adds_gamma_times_fresh_noise_to_what_is_noised():
    latents, noise = torch.zeros(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert input_perturbation(latents, noise, None, False) is noise
    got = input_perturbation(latents, noise, 0.1, False, torch.Generator().manual_seed(3))
    extra = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, noise + 0.1 * extra)
    g = torch.Generator().manual_seed(4)
    got = input_perturbation(latents, noise, 0.1, True, g)
    g = torch.Generator().manual_seed(4)
    strength = torch.rand(1, generator=g) * 0.1
    assert torch.allclose(got, noise + strength * torch.randn(2, 4, 3, 3, generator=g))
