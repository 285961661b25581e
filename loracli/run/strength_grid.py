"""`loracli grid`: LoRA files × strengths × prompts × seeds, as labelled PNG grids.

The X/Y/Z plot the guides make by hand to pick the best epoch: one grid per
prompt and seed, a row per LoRA file (epoch), a column per strength. The base
model loads once; each file's network is hooked in, run at each strength
(its multiplier), and unhooked before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from loracli.errors import DatasetError, Problem
from loracli.imagegrid import labelled_grid, save_png_atomic
from loracli.run.models import load_sd_components
from loracli.run.conditioning import conditioner_for
from loracli.run.network import LORA_PRESET, from_kohya_state_dict, kohya_names
from loracli.run.sampling import build_pipeline, generate, inference_mode
from loracli.sample_prompts import SamplePrompt


@dataclass(frozen=True)
class GridJob:
    files: list[Path]
    prompts: list[SamplePrompt]
    strengths: list[float]
    seeds: list[int]
    model: str
    v2: bool = False
    v_parameterization: bool = False
    allow_pickle: bool = False  # model.allow_pickle_checkpoint: a .ckpt base model
    clip_skip: int | None = None
    max_token_length: int | None = None
    sampler: str = "ddim"
    out_dir: Path = Path("grids")
    row_labels: list[str] | None = None  # default: the file names

    @property
    def image_count(self) -> int:
        return len(self.files) * len(self.strengths) * len(self.prompts) * len(self.seeds)


def grid_file_name(prompt: SamplePrompt, seed: int) -> str:
    return f"grid-p{prompt.index:02d}-s{seed}.png"


def hook_lora_file(path: Path, sd):
    """A network built from a kohya-format LoRA/LyCORIS file (ours or sd-scripts'), hooked into the models."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.logging import logger as lycoris_logger
    from safetensors.torch import load_file

    try:
        weights = from_kohya_state_dict(load_file(str(path)), kohya_names(sd.text_encoders, sd.unet, sd.family))
    except Exception as exc:  # safetensors raises its own error types
        raise DatasetError(Problem(str(path), f"not a readable LoRA file ({exc})", "check the file")) from None
    # Its constructor builds (then drops) modules from class-level targets: kohya's, not `full` (which
    # crashes on SD UNets; see loracli.run.network).
    LycorisNetworkKohya.apply_preset(LORA_PRESET)
    lycoris_logger.setLevel(logging.WARNING)  # its per-module INFO lines drown the progress bar
    text_encoder = sd.text_encoders if len(sd.text_encoders) > 1 else sd.text_encoder  # lora_te1_/2_ or lora_te_
    unet = sd.unet
    network, _ = create_network_from_weights(1.0, None, None, text_encoder, unet, weights_sd=weights)
    if not network.unet_loras and not network.text_encoder_loras:
        raise DatasetError(Problem(str(path), "none of its modules match this base model",
                                   "give the model it was trained on (--model)"))
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    network.load_state_dict(weights, strict=False)
    network.to(device=unet.device, dtype=torch.float32)
    return network


def unhook(network) -> None:
    for lora in network.unet_loras + network.text_encoder_loras:
        lora.restore()


def render_grids(job: GridJob, device: str, on_image: Callable[[], None] = lambda: None) -> list[Path]:
    sd = load_sd_components(job.model, job.v2, v_parameterization=job.v_parameterization,
                            allow_pickle=job.allow_pickle)
    for module in sd.frozen_modules():
        module.to(device)
    pipe = build_pipeline(sd, job.sampler, job.v_parameterization)
    conditioner = conditioner_for(sd, job.max_token_length, job.clip_skip)
    images: dict[tuple[int, int, int, int], Image.Image] = {}  # (file, strength, prompt, seed)
    for f, path in enumerate(job.files):
        network = hook_lora_file(path, sd)
        try:
            for s, strength in enumerate(job.strengths):
                network.set_multiplier(strength)
                with inference_mode(sd.unet, *sd.text_encoders, network):
                    for p, prompt in enumerate(job.prompts):
                        for k, seed in enumerate(job.seeds):
                            images[f, s, p, k] = generate(pipe, conditioner, prompt, seed, torch.device(device))
                            on_image()
        finally:
            unhook(network)
    written = []
    rows = job.row_labels or [path.stem for path in job.files]
    cols = [f"strength {strength:g}" for strength in job.strengths]
    for p, prompt in enumerate(job.prompts):
        for k, seed in enumerate(job.seeds):
            cells = [[images[f, s, p, k] for s in range(len(job.strengths))] for f in range(len(job.files))]
            title = f"{prompt.prompt}  (seed {seed}, {prompt.steps} steps, cfg {prompt.scale:g}, {job.sampler})"
            grid = labelled_grid(cells, rows, cols, title=title)
            target = job.out_dir / grid_file_name(prompt, seed)
            save_png_atomic(grid, target)
            written.append(target)
    return written
