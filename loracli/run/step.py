"""The pieces of one diffusion training step, as sd-scripts computes them.

noise (offset, multires) → timesteps → target → loss (prior weight, min-SNR) and
the SD1/2 text encoding with max_token_length windows (reference §6.1-§6.4).
Every function takes plain arguments so the training loop wires config to it visibly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loracli.errors import ConfigError, Problem, TrainingError

CLIP_CONTEXT = 77  # tokens one CLIP forward sees: BOS + 75 + EOS
CLIP_BODY = CLIP_CONTEXT - 2
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


# --- noise -----------------------------------------------------------------------------------------

def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot feed a CUDA draw), then move.
    device = generator.device if generator is not None else like.device
    out = torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def _uniform(generator: torch.Generator | None) -> float:
    # Without a generator use python's random, which accelerate's set_seed seeds (as sd-scripts does).
    if generator is None:
        return random.random()
    return float(torch.rand(1, generator=generator, device=generator.device).item())


def _apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float,
    random_strength: bool,
    adaptive_noise_scale: float | None,
) -> torch.Tensor:
    offset: float | torch.Tensor = noise_offset
    if random_strength:
        # one U(0,1) scalar for the whole batch, from torch's stream as in sd-scripts
        device = generator.device if generator is not None else latents.device
        offset = torch.rand(1, generator=generator, device=device).to(latents.device) * noise_offset
    if adaptive_noise_scale is not None:
        # per sample and channel: grows with how far the latent mean is from zero
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    return noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)


def _pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float
) -> torch.Tensor:
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = _uniform(generator) * 2 + 2  # a random factor in [2, 4) rather than always 2x
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        low = _randn((b, c, hn, wn), noise, generator)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()  # global std: back to roughly unit variance


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_offset: float | None,
    noise_offset_random_strength: bool,
    adaptive_noise_scale: float | None,
    multires_noise_iterations: int | None,
    multires_noise_discount: float,
) -> torch.Tensor:
    """Gaussian noise like `latents`, then the noise offset, then multires noise (both may run)."""
    noise = _randn(latents.shape, latents, generator)
    if noise_offset:
        noise = _apply_noise_offset(latents, noise, generator, noise_offset, noise_offset_random_strength,
                                    adaptive_noise_scale)
    if multires_noise_iterations:
        noise = _pyramid_noise(noise, generator, multires_noise_iterations, multires_noise_discount)
    return noise


def sample_timesteps(
    batch: int,
    min_timestep: int | None,
    max_timestep: int | None,
    num_train_timesteps: int,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One uniform integer timestep per sample in [min, max); all = max when min >= max."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if lo < hi:
        draw_on = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(lo, hi, (batch,), generator=generator, device=draw_on)
    else:
        t = torch.full((batch,), hi)
    return t.long().to(device)


# --- target and loss -------------------------------------------------------------------------------

def compute_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, v_parameterization: bool
) -> torch.Tensor:
    """epsilon: the noise; v-prediction: sqrt(ᾱ)·noise − sqrt(1−ᾱ)·x0 (diffusers' get_velocity)."""
    if v_parameterization:
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t) for each timestep (float32, on the timesteps' device).

    After zero_terminal_snr the table of the original schedule is used, as sd-scripts computes
    its SNR table before rescaling the betas (the last SNR would otherwise be 0)."""
    all_snr = getattr(noise_scheduler, "snr_before_zero_terminal", None)
    if all_snr is None:
        alphas_cumprod = noise_scheduler.alphas_cumprod.float().cpu()
        all_snr = (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2
    return all_snr[timesteps.long().cpu()].to(timesteps.device)


def enforce_zero_terminal_snr(noise_scheduler) -> None:
    """zero_terminal_snr (arXiv 2305.08891): rescale the betas so the last timestep is pure noise,
    keeping the first timestep's ᾱ; the SNR table for the loss weights stays the original one."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    noise_scheduler.snr_before_zero_terminal = alphas_cumprod / (1.0 - alphas_cumprod)
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    new_cumprod = root**2
    alphas = torch.cat([new_cumprod[:1], new_cumprod[1:] / new_cumprod[:-1]])
    noise_scheduler.betas = 1.0 - alphas
    noise_scheduler.alphas = alphas
    noise_scheduler.alphas_cumprod = new_cumprod


def min_snr_weight(snr: torch.Tensor, gamma: float, v_parameterization: bool) -> torch.Tensor:
    """min(SNR, γ)/SNR for epsilon prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_parameterization else clipped / snr


@dataclass(frozen=True)
class LossOptions:
    """sd-scripts' loss options beyond min-SNR (training.loss_type and friends)."""

    loss_type: str = "l2"  # l2 | l1 | huber | smooth_l1
    huber_schedule: str = "snr"  # constant | exponential | snr
    huber_c: float = 0.1
    huber_scale: float = 1.0
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False


def huber_c_per_sample(options: LossOptions, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor | None:
    """The Huber threshold of each sample: constant c·scale, exponential decay from 1 at t=0 to c at the
    last step (× scale), or the SNR schedule (1 − c)/(1 + σ_t)² + c with σ_t = sqrt((1 − ᾱ)/ᾱ)."""
    if options.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.long()
    if options.huber_schedule == "constant":
        return torch.full(t.shape, options.huber_c * options.huber_scale, device=t.device)
    if options.huber_schedule == "exponential":
        rate = -math.log(options.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-rate * t.float()) * options.huber_scale
    alphas_cumprod = noise_scheduler.alphas_cumprod.float().cpu()[t.cpu()]
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return ((1 - options.huber_c) / (1 + sigmas) ** 2 + options.huber_c).to(t.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None
                     ) -> torch.Tensor:
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    soft = torch.sqrt((pred - target) ** 2 + c**2) - c  # pseudo-Huber
    return 2 * c * soft if loss_type == "huber" else 2 * soft


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sd-scripts' apply_masked_loss: the (B, H, W) pixel-size mask in [0, 1], area-averaged down to the
    loss's spatial size, multiplies the per-element loss (every channel) before any mean."""
    if mask is None:
        return loss
    mask = F.interpolate(mask.to(loss.device, loss.dtype).unsqueeze(1), size=loss.shape[2:], mode="area")
    return loss * mask


def _snr_capped(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    return torch.clamp(compute_snr(noise_scheduler, timesteps), max=1000)  # t=0 has an infinite SNR


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    loss_weights: torch.Tensor | Sequence[float],
    min_snr_gamma: float | None,
    v_parameterization: bool,
    options: LossOptions = LossOptions(),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element loss (l2, l1, pseudo-Huber) → × loss mask (masked_loss, alpha_mask) → mean per sample → × loss weight → min-SNR weight →
    v-prediction-like scaling / added loss → debiased estimation → batch mean (sd-scripts' order)."""
    huber_c = huber_c_per_sample(options, timesteps, noise_scheduler)
    loss = elementwise_loss(model_pred.float(), target.float(), options.loss_type,
                            None if huber_c is None else huber_c.to(model_pred.device))
    loss = apply_loss_mask(loss, mask)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    weights = torch.as_tensor(loss_weights, dtype=torch.float32, device=loss.device)
    loss = loss * weights
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps).to(loss.device)
        loss = loss * min_snr_weight(snr, min_snr_gamma, v_parameterization)
    if options.scale_v_pred_loss_like_noise_pred or options.v_pred_like_loss or options.debiased_estimation_loss:
        snr = _snr_capped(noise_scheduler, timesteps).to(loss.device)
        if options.scale_v_pred_loss_like_noise_pred:
            loss = loss * snr / (snr + 1)
        if options.v_pred_like_loss:
            loss = loss + loss / (snr / (snr + 1)) * options.v_pred_like_loss
        if options.debiased_estimation_loss:
            loss = loss * (1 / (snr + 1) if v_parameterization else 1 / torch.sqrt(snr))
    return loss.mean()


def input_perturbation(latents: torch.Tensor, noise: torch.Tensor, gamma: float | None, random_strength: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """ip_noise_gamma: the noise added to the latents gets an extra γ·N(0, 1) (the target stays the plain
    noise); with random strength γ is scaled by one U(0, 1) draw per batch."""
    if not gamma:
        return noise
    strength: float | torch.Tensor = gamma
    if random_strength:
        device = generator.device if generator is not None else latents.device
        strength = torch.rand(1, generator=generator, device=device).to(latents.device) * gamma
    return noise + strength * _randn(latents.shape, latents, generator)


# --- text encoding ---------------------------------------------------------------------------------

def tokenize_windows(tokenizer, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids shaped (batch, windows, 77): one window, or 2/3 for max_token_length 150/225."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ConfigError(Problem("training.max_token_length", f"must be 75, 150 or 225, got {max_token_length}",
                                  "sd-scripts accepts only these values"))
    length = CLIP_CONTEXT if max_token_length is None else max_token_length + 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt").input_ids
    return split_windows(ids, tokenizer)


def split_windows(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(batch, 2 + 75·n) padded token ids → (batch, n, 77): BOS, 75 tokens and the last id per window."""
    length = ids.shape[1]
    if length == CLIP_CONTEXT:
        return ids.unsqueeze(1)

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, length - CLIP_CONTEXT + 2, CLIP_BODY):  # 1, 76, 151
        chunk = torch.cat([ids[:, :1], ids[:, start:start + CLIP_BODY], ids[:, -1:]], dim=1)
        if pad != eos:
            # SD2-style tokenizers pad with "!": a window that ends inside real text gets an EOS,
            # and a window that is only padding starts BOS EOS.
            ends_in_text = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[:, -1] = torch.where(ends_in_text, torch.full_like(chunk[:, -1], eos), chunk[:, -1])
            starts_empty = chunk[:, 1] == pad
            chunk[:, 1] = torch.where(starts_empty, torch.full_like(chunk[:, 1], eos), chunk[:, 1])
        windows.append(chunk)
    return torch.stack(windows, dim=1)


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers < 5 nests it under .text_model; 5 may not; a wrapper may add .module.
    for candidate in (text_encoder, getattr(text_encoder, "module", None)):
        if candidate is None:
            continue
        inner = getattr(candidate, "text_model", candidate)
        norm = getattr(inner, "final_layer_norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
    for name, module in text_encoder.named_modules():
        if name.endswith("final_layer_norm"):
            return module
    raise TrainingError(Problem("text encoder", "has no final_layer_norm, so clip_skip cannot be applied",
                                "use a CLIP text encoder or leave clip_skip unset"))


def encode_prompts(
    tokenizer,
    text_encoder,
    captions: list[str],
    max_token_length: int | None,
    clip_skip: int | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Encoder hidden states (batch, 2 + 75·windows, hidden): 77, 152 or 227 positions."""
    return encode_windows(text_encoder, tokenize_windows(tokenizer, captions, max_token_length), clip_skip, device)


def encode_windows(text_encoder, windows: torch.Tensor, clip_skip: int | None, device: torch.device | str
                   ) -> torch.Tensor:
    """(batch, n, 77) token ids → hidden states (batch, 2 + 75·n, hidden), windows joined."""
    batch, count, _ = windows.shape
    tokens = windows.reshape(-1, CLIP_CONTEXT).to(device)
    if clip_skip is None:
        hidden = text_encoder(tokens).last_hidden_state
    else:
        out = text_encoder(tokens, output_hidden_states=True)
        hidden = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return join_windows(hidden, batch, count)


def join_windows(hidden: torch.Tensor, batch: int, count: int) -> torch.Tensor:
    """(batch·windows, 77, C) → (batch, 2 + 75·windows, C): the first BOS, the 75 body states of
    every window, and the very last state."""
    hidden = hidden.reshape(batch, count * CLIP_CONTEXT, hidden.shape[-1])
    if count == 1:
        return hidden
    parts = [hidden[:, :1]]
    parts += [hidden[:, i:i + CLIP_BODY] for i in range(1, count * CLIP_CONTEXT, CLIP_CONTEXT)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)
