"""Sample images during training, sd-scripts style, and the grid that shows them side by side.

The plan says when (plan.sample_rounds); this module makes the pictures: a
diffusers StableDiffusion(XL)Pipeline over the training models (the network's
hooks are live, so the images show the LoRA as trained so far), with
sd-scripts' sampler names mapped to diffusers schedulers. Prompts are encoded
through the family's conditioner as sd-scripts' samplers encode them, "(word:1.2)"
weights included (Conditioner.encode_sample; SDXL's two encoders and pooled vector).
Sampling draws from its own generators: the training random stream, and so a
resumed run, is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from loracli.imagegrid import labelled_grid, save_png_atomic
from loracli.run.conditioning import Conditioner
from loracli.run.fp8 import compute_dtype
from loracli.prompt_weights import weighted_token_ids
from loracli.run.step import CLIP_BODY
from loracli.run.weighted_text import SAMPLE_MAX_WINDOWS
from loracli.sample_prompts import SamplePrompt, image_stem, round_title

# sd-scripts' --sample_sampler names → diffusers scheduler class and options (k_* are aliases).
SAMPLERS: dict[str, tuple[str, dict[str, object]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD1.x ships it
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses its default final_sigmas_type "zero" with the first-generation solver
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLERS.update({f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})


def make_scheduler(sampler: str, base_scheduler_config, v_parameterization: bool):
    """The inference scheduler for a sampler name, on the base model's noise schedule."""
    import diffusers

    class_name, options = SAMPLERS[sampler]
    prediction = "v_prediction" if v_parameterization else "epsilon"
    return getattr(diffusers, class_name).from_config(base_scheduler_config, prediction_type=prediction, **options)


def prompt_seed(prompt: SamplePrompt, base_seed: int) -> int:
    """--d when given; otherwise a fixed seed per prompt, so rounds are comparable picture to picture
    (sd-scripts draws a fresh random seed for each image instead)."""
    return prompt.seed if prompt.seed is not None else base_seed + prompt.index


@contextmanager
def inference_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """eval() for the round (no dropout, no checkpointing), then each module's own mode back."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def warn_long_prompts(tokenizer, prompts: list[SamplePrompt], max_token_length: int | None, family: str,
                      log: Callable[[str], None]) -> None:
    # sd-scripts' SD1/SD2 sampler takes up to 3 windows whatever max_token_length; its SDXL one, max_token_length.
    most = CLIP_BODY * SAMPLE_MAX_WINDOWS
    limit = most if family != "sdxl" else max_token_length or CLIP_BODY
    hint = "shorten it" if limit == most else "set dataset.max_token_length to 150 or 225 for longer prompts"
    piece_ids = lambda piece: tokenizer(piece, truncation=False).input_ids[1:-1]  # noqa: E731
    for p in prompts:
        for kind, text in (("prompt", p.prompt), ("negative prompt", p.negative_prompt)):
            count = len(weighted_token_ids(piece_ids, text, 10**6)[0])
            if count > limit:
                log(f"warning: sample {kind} {p.index} (line {p.line}) has {count} tokens; the text encoder "
                    f"sees the first {limit} ({hint})")


def latents_to_images(vae, latents: torch.Tensor, scaling_factor: float) -> list[Image.Image]:
    """Decode on the VAE's own device and dtype (it may sit on the CPU after latent caching)."""
    param = next(vae.parameters())
    decoded = vae.decode(latents.to(param.device, param.dtype) / scaling_factor).sample
    pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def build_pipeline(sd, sampler: str, v_parameterization: bool):
    """The family's diffusers pipeline over the loaded models (no copies; no safety checker)."""
    scheduler = make_scheduler(sampler, sd.noise_scheduler.config, v_parameterization)
    if sd.family.name == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=sd.vae, text_encoder=sd.text_encoders[0], text_encoder_2=sd.text_encoders[1],
            tokenizer=sd.tokenizers[0], tokenizer_2=sd.tokenizers[1], unet=sd.unet, scheduler=scheduler,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, conditioner: Conditioner, prompt: SamplePrompt, seed: int, device: torch.device) -> Image.Image:
    """One image; call inside no_grad (inference_mode) and the training autocast."""
    sd = conditioner.sd
    guided = prompt.scale > 1  # diffusers, like sd-scripts, runs no negative pass at a scale of 1 or less
    positive, negative = conditioner.encode_sample(prompt.prompt, prompt.negative_prompt if guided else None, device)
    embeds = conditioner.pipeline_inputs(positive, negative, compute_dtype(sd.unet))  # fp8_base: not fp8
    generator = torch.Generator("cpu").manual_seed(seed)  # the same picture on any device
    latents = pipe(
        **embeds, width=prompt.width, height=prompt.height, num_inference_steps=prompt.steps,
        guidance_scale=prompt.scale, generator=generator, output_type="latent",
    ).images
    return latents_to_images(sd.vae, latents, sd.family.latent_scaling_factor)[0]


class SampleMaker:
    """Makes one round of sample images (one per prompt) and refreshes samples/grid.png."""

    def __init__(self, sd, conditioner: Conditioner, prompts: list[SamplePrompt], sampler: str,
                 v_parameterization: bool, base_seed: int, output_name: str | None, folder: Path,
                 log: Callable[[str], None]):
        self.sd, self.conditioner, self.prompts, self.sampler = sd, conditioner, prompts, sampler
        self.base_seed = base_seed
        self.output_name, self.folder = output_name, folder
        self.pipe = build_pipeline(sd, sampler, v_parameterization)
        warn_long_prompts(sd.tokenizer, prompts, conditioner.max_token_length, sd.family.name, log)

    def image_path(self, label: str, prompt: SamplePrompt) -> Path:
        return self.folder / f"{image_stem(self.output_name, label, prompt)}.png"

    def make_round(self, label: str, device: torch.device, autocast, modules: list[torch.nn.Module]
                   ) -> list[tuple[SamplePrompt, Path, Image.Image]]:
        made = []
        vae = self.sd.vae
        parked = next(vae.parameters()).device  # latent caching parks the VAE on the CPU
        vae.to(device)  # decoding on the GPU takes a fraction of a second; on a CPU, seconds per image
        try:
            with inference_mode(*modules), autocast():
                for p in self.prompts:
                    image = generate(self.pipe, self.conditioner, p, prompt_seed(p, self.base_seed), device)
                    path = self.image_path(label, p)
                    save_png_atomic(image, path)
                    made.append((p, path, image))
        finally:
            vae.to(parked)
        return made

    def update_grid(self, labels: list[str], title: str) -> Path:
        """samples/grid.png: one row per round made so far, one column per prompt."""
        rows, row_labels = [], []
        for label in labels:
            paths = [self.image_path(label, p) for p in self.prompts]
            if not any(path.is_file() for path in paths):
                continue
            rows.append([Image.open(path).convert("RGB") if path.is_file() else None for path in paths])
            row_labels.append(round_title(label))
        columns = [f"{p.index:02d}: {p.prompt}" for p in self.prompts]
        grid = labelled_grid(rows, row_labels, columns, title=title)
        path = self.folder / "grid.png"
        save_png_atomic(grid, path)
        return path
