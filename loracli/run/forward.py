"""The loss of one micro-batch: latents → text conditioning → noise and timesteps → UNet → diffusion loss.

The loop calls it between taking a prefetched batch and the backward pass, under accelerate's autocast.
The draws (noise, timesteps, input perturbation) are made in this order for the whole step's batch on
every process (GlobalDraws): a resumed run and N processes draw what an unbroken single process does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loracli.config.schema import LoracliConfig
from loracli.plan import Plan
from loracli.run.conditioning import Conditioner, TextCache
from loracli.run.data import Batch
from loracli.run.global_draws import GlobalDraws
from loracli.run.latents import LatentCache, encode
from loracli.run.models import SDComponents
from loracli.run.prefetch import to_device
from loracli.run.step import (
    LossOptions,
    compute_target,
    diffusion_loss,
    input_perturbation,
    sample_noise,
    sample_timesteps,
)


def loss_options(config: LoracliConfig) -> LossOptions:
    tr = config.training
    return LossOptions(tr.loss_type, tr.huber_schedule, tr.huber_c, tr.huber_scale,
                       tr.scale_v_pred_loss_like_noise_pred, tr.v_pred_like_loss, tr.debiased_estimation_loss)


@dataclass
class NoisedLatents:
    noise: torch.Tensor  # what the UNet learns to predict (before the target's parameterization)
    timesteps: torch.Tensor
    noisy: torch.Tensor  # the UNet's input: latents noised with the (perturbed) noise


@dataclass
class DiffusionLoss:
    """`compute(batch)` is the batch's loss; everything it needs is fixed before the loop starts."""

    config: LoracliConfig
    plan: Plan
    sd: SDComponents
    conditioner: Conditioner
    draws: GlobalDraws
    device: torch.device
    weight_dtype: torch.dtype
    latent_scaling_factor: float
    train_text_encoder: bool
    latent_cache: LatentCache | None
    text_cache: TextCache | None
    original_sizes: list[tuple[int, int]]  # SDXL's size conditioning, per planned image

    def __post_init__(self) -> None:
        self.options = loss_options(self.config)
        self.num_timesteps = self.sd.noise_scheduler.config.num_train_timesteps

    def compute(self, batch: Batch) -> torch.Tensor:
        tr, v_pred, scheduler = self.config.training, self.config.model.v_parameterization, self.sd.noise_scheduler
        latents, masks = self._latents(batch)
        with torch.set_grad_enabled(self.train_text_encoder):
            cond = self.text_cache(batch.captions, self.device) if self.text_cache is not None else \
                self.conditioner.encode(batch.captions, self.device)
        noised = self._noise(latents)
        images = [self.plan.images[i] for i in batch.indices]
        unet_inputs = self.conditioner.unet_kwargs(cond, [self.original_sizes[i] for i in batch.indices],
                                                   [im.bucket for im in images], batch.flipped, self.weight_dtype)
        pred = self.sd.unet(noised.noisy.to(self.weight_dtype), noised.timesteps, **unet_inputs).sample
        target = compute_target(scheduler, latents, noised.noise, noised.timesteps, v_pred)
        weights = torch.where(batch.is_reg.to(self.device), tr.prior_loss_weight, 1.0)
        return diffusion_loss(pred.float(), target.float(), noised.timesteps, scheduler, weights,
                              tr.min_snr_gamma, v_pred, self.options, masks)

    def _latents(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's latents and loss masks: from the cache, or the VAE on the batch's pixels."""
        if self.latent_cache is not None:
            return (self.latent_cache.batch(batch.indices, batch.flipped).to(self.device),
                    self.latent_cache.mask_batch(batch.indices, batch.flipped))
        latents = encode(self.sd.vae, to_device(batch.pixels, self.device), self.latent_scaling_factor)
        return latents, batch.masks

    def _noise(self, latents: torch.Tensor) -> NoisedLatents:
        """Noise, timesteps and input perturbation, drawn for the step's batch across all processes
        (each keeps its own rows), in that order."""
        tr, draws = self.config.training, self.draws
        rows, wide = latents.shape[0], draws.widen(latents)
        wide_noise = sample_noise(wide, None, tr.noise_offset, tr.noise_offset_random_strength,
                                  tr.adaptive_noise_scale, tr.multires_noise_iterations, tr.multires_noise_discount)
        noise = draws.own(wide_noise, rows)
        timesteps = draws.own(sample_timesteps(wide.shape[0], tr.min_timestep, tr.max_timestep, self.num_timesteps,
                                               self.device, None), rows)
        perturbed = draws.own(input_perturbation(wide, wide_noise, tr.ip_noise_gamma,
                                                 tr.ip_noise_gamma_random_strength), rows)
        return NoisedLatents(noise, timesteps, self.sd.noise_scheduler.add_noise(latents, perturbed, timesteps))
