"""A fixed evaluation batch: the reliable 'it learns' signal (per-step loss is noise).

The same latents (the training images), the same seeded noise and timesteps,
and the same captions, scored with and without a trained LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loracli.config.loader import read_toml
from loracli.config.schema import LoracliConfig
from loracli.plan import load_plan
from loracli.run.data import load_pixels, to_tensor
from loracli.run.latents import encode
from loracli.run.models import load_sd_components
from loracli.run.network import create_network, load_network_weights
from loracli.run.step import encode_prompts
from loracli.run.train import network_spec


def fixed_batch_loss(run_dir: Path, lora_file: Path | None, seed: int = 1234) -> float:
    config = LoracliConfig.model_validate(read_toml(run_dir / "config.resolved.toml"))
    plan = load_plan(run_dir / "plan.json")
    sd = load_sd_components(config.model.pretrained_model_name_or_path)
    network = create_network(network_spec(config), sd.text_encoder, sd.unet)
    if lora_file is not None:
        load_network_weights(network, lora_file)
    network.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    import random

    with torch.no_grad():
        by_bucket: dict[tuple[int, int], list] = {}
        for image in plan.images:
            by_bucket.setdefault(tuple(image.bucket), []).append(image)
        for images in by_bucket.values():
            pixels = torch.stack([to_tensor(load_pixels(im, False, random.Random(0))) for im in images])
            latents = encode(sd.vae, pixels, 0.18215, torch.Generator().manual_seed(seed))
            hidden = encode_prompts(sd.tokenizer, sd.text_encoder, [im.caption for im in images],
                                    config.dataset.max_token_length, config.model.clip_skip, "cpu")
            for _ in range(4):  # several noise draws per image make the estimate stable
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
                noisy = sd.noise_scheduler.add_noise(latents, noise, timesteps)
                pred = sd.unet(noisy, timesteps, hidden).sample
                total += torch.nn.functional.mse_loss(pred, noise, reduction="sum").item()
                count += noise.numel()
    return total / count
