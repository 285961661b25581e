"""The validation loss: the diffusion loss on the plan's held-out images, comparable round to round.

Everything random is fixed once: each held-out image's latent (one VAE sample, seeded), its noise
(seeded by the split seed and the batch) and the timesteps (sd-scripts' four, evenly spaced inside
[min_timestep, max_timestep]); captions get no shuffle, dropout or token warm-up. So two rounds differ
only by what the network learnt, and the number falls or rises with it. Rounds: every
`validate_every_n_steps` steps and at the end of every `validate_every_n_epochs`-th epoch (every
epoch when unset), as sd-scripts; `max_validation_steps` caps the batches per round.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

import torch

from loracli.captions import caption_as_read, process_caption
from loracli.config.schema import LoracliConfig
from loracli.plan import Plan, PlannedImage
from loracli.dataset.subsets import image_options
from loracli.run.data import caption_options, load_example, mask_source, stack_masks, to_tensor
from loracli.run.latents import encode
from loracli.run.step import compute_target, diffusion_loss


@dataclass
class ValidationBatch:
    images: list[PlannedImage]
    latents: torch.Tensor  # CPU, fp32, already scaled
    noise: torch.Tensor  # CPU, fp32, same shape
    captions: list[str]
    cond: object | None = None  # the text conditioning, kept when the text encoders are frozen and cached
    masks: torch.Tensor | None = None  # loss masks (alpha_mask, masked_loss), as in training


def validation_batches(images: list[PlannedImage], batch_size: int, max_batches: int | None
                       ) -> list[list[PlannedImage]]:
    """Held-out images grouped by bucket (a batch shares one size), in plan order, at most max_batches."""
    by_bucket: dict[tuple[int, int], list[PlannedImage]] = {}
    for image in images:
        by_bucket.setdefault(tuple(image.bucket), []).append(image)
    batches = [group[i:i + batch_size] for group in by_bucket.values() for i in range(0, len(group), batch_size)]
    return batches[:max_batches] if max_batches else batches


def due_after_step(config: LoracliConfig, step: int) -> bool:
    every = config.training.validate_every_n_steps
    return bool(every) and step % every == 0


def due_after_epoch(config: LoracliConfig, epoch: int) -> bool:
    every = config.training.validate_every_n_epochs
    return every is None or epoch % every == 0


class Validator:
    """Built once before training (while the VAE is still on the device); called at each round."""

    def __init__(self, plan: Plan, config: LoracliConfig, sd, conditioner, scaling_factor: float, device,
                 text_frozen: bool):
        self.plan, self.config, self.sd, self.conditioner = plan, config, sd, conditioner
        self.device = device
        self.timesteps = list(plan.validation_timesteps)
        seed = plan.validation_seed or 0
        # each held-out image's subset's caption options ([[datasets]]), with nothing random left
        options = {id(im): replace(caption_options(o), shuffle_caption=False, caption_dropout_rate=0.0,
                                   caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0, token_warmup_step=0)
                   for im, o in zip(plan.validation_images, image_options(config, plan.validation_images))}
        no_rng = random.Random(0)  # nothing random is left in these options; process_caption still wants one
        self.batches: list[ValidationBatch] = []
        groups = validation_batches(plan.validation_images, plan.train_batch_size,  # the plan's: "auto" resolved
                                    config.training.max_validation_steps)
        held_out_options = {id(im): o for im, o in zip(plan.validation_images,
                                                       image_options(config, plan.validation_images))}
        for index, images in enumerate(groups):
            examples = [load_example(im, False, no_rng, mask_source(im, held_out_options[id(im)])) for im in images]
            pixels = torch.stack([to_tensor(px) for px, _ in examples])
            masks = stack_masks([m for _, m in examples], pixels.shape[2:])
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            latents = encode(sd.vae, pixels, scaling_factor, _device_generator(sd.vae.device, seed + index))
            latents = latents.cpu()
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
            # enable_wildcard: one fixed draw per held-out image (no_rng is seeded once for all of them)
            captions = [process_caption(caption_as_read(im.caption, im.caption_lines, options[id(im)].enable_wildcard),
                                        options[id(im)], 1, 0, plan.total_steps, no_rng) for im in images]
            batch = ValidationBatch(images, latents, noise, captions, masks=masks)
            if text_frozen:  # the text encoders leave the device later: encode the captions now
                with torch.no_grad():
                    batch.cond = conditioner.encode(captions, device)
            self.batches.append(batch)

    @property
    def size(self) -> int:
        return sum(len(b.images) for b in self.batches)

    @torch.no_grad()
    def __call__(self, network, autocast, weight_dtype: torch.dtype) -> float:
        """The mean loss over every held-out image and fixed timestep."""
        cfg, sd = self.config, self.sd
        was_training = network.training
        network.eval()  # dropout off: the number must depend on the weights only
        losses: list[float] = []
        try:
            with autocast():
                for batch in self.batches:
                    latents, noise = batch.latents.to(self.device), batch.noise.to(self.device)
                    cond = batch.cond if batch.cond is not None else self.conditioner.encode(batch.captions,
                                                                                             self.device)
                    flipped = [False] * len(batch.images)
                    kwargs = self.conditioner.unet_kwargs(cond, [im.size for im in batch.images],
                                                          [im.bucket for im in batch.images], flipped, weight_dtype)
                    for t in self.timesteps:
                        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=self.device)
                        noisy = sd.noise_scheduler.add_noise(latents, noise, timesteps)
                        pred = sd.unet(noisy.to(weight_dtype), timesteps, **kwargs).sample
                        target = compute_target(sd.noise_scheduler, latents, noise, timesteps,
                                                cfg.model.v_parameterization)
                        loss = diffusion_loss(pred.float(), target.float(), timesteps, sd.noise_scheduler,
                                              [1.0] * latents.shape[0], cfg.training.min_snr_gamma,
                                              cfg.model.v_parameterization, mask=batch.masks)
                        losses.append(loss.item())
        finally:
            network.train(was_training)
        return sum(losses) / len(losses)


def _device_generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def run_validation(validator: Validator | None, config: LoracliConfig, step: int, epoch: int, at_epoch_end: bool,
                   network, autocast, weight_dtype, metrics, accelerator, trackers: list[str], log) -> None:
    """One round when due: its loss goes to metrics.jsonl (a {"step", "epoch", "val_loss"} line),
    to the trackers ("loss/validation") and to the terminal. Only the main process builds a validator."""
    if validator is None:
        return
    due = due_after_epoch(config, epoch) if at_epoch_end else due_after_step(config, step)
    if not due:
        return
    if accelerator.is_main_process:  # (always true where there is a validator)
        value = validator(network, autocast, weight_dtype)
        if metrics is not None and not metrics.closed:
            metrics.write(json.dumps({"step": step, "epoch": epoch, "val_loss": value}) + "\n")
            metrics.flush()
        if trackers:
            accelerator.log({"loss/validation": value}, step=step)
        log(f"validation loss {value:.4f} at step {step} ({validator.size} held-out images, "
            f"{len(validator.timesteps)} timesteps)")
    # no wait_for_everyone: only the main process has a validator; the others wait in the next step's reduce
