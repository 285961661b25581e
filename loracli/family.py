"""What is specific to a model family, in one place (the SDXL seam).

Pure data: the plan side reads bucket rules from here, the run side reads key
prefixes, latent scaling and metadata names. Adding SDXL means adding one
entry here plus its loader on the run side, not `if`s across the code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # bucket_reso_steps must be a multiple of this (the UNet's latent divisibility)
    bucket_step_multiple: int
    # kohya key prefix of each text encoder, in order
    text_encoder_prefixes: tuple[str, ...]
    unet_prefix: str
    latent_scaling_factor: float
    # ss_base_model_version without / with v-parameterization
    base_model_version: str
    base_model_version_v: str
    # modelspec.architecture without / with v-parameterization
    modelspec_architecture: str
    modelspec_architecture_v: str
    modelspec_implementation: str
    supports_clip_skip: bool = True
    # kohya names UNet modules by the SAI/ldm layout (input_blocks_4_1_...) instead of diffusers'
    sai_unet_names: bool = False
    # how `loracli plan` and messages name the family
    title: str = ""


SD1 = ModelFamily(
    name="sd1",
    bucket_step_multiple=64,
    text_encoder_prefixes=("lora_te",),
    unet_prefix="lora_unet",
    latent_scaling_factor=0.18215,
    base_model_version="sd_v1",
    base_model_version_v="sd_v1_v",
    modelspec_architecture="stable-diffusion-v1/lora",
    modelspec_architecture_v="stable-diffusion-v1/lora",
    modelspec_implementation="diffusers",
    title="SD1.x",
)

SD2 = ModelFamily(
    name="sd2",
    bucket_step_multiple=64,
    text_encoder_prefixes=("lora_te",),
    unet_prefix="lora_unet",
    latent_scaling_factor=0.18215,
    base_model_version="sd_v2",
    base_model_version_v="sd_v2_v",
    modelspec_architecture="stable-diffusion-v2-512/lora",
    modelspec_architecture_v="stable-diffusion-v2-768-v/lora",
    modelspec_implementation="diffusers",
    title="SD2.x",
)

# sdxl_train_network.py: two text encoders (CLIP-L, OpenCLIP bigG), 32-pixel buckets, SAI key names.
SDXL = ModelFamily(
    name="sdxl",
    bucket_step_multiple=32,
    text_encoder_prefixes=("lora_te1", "lora_te2"),
    unet_prefix="lora_unet",
    latent_scaling_factor=0.13025,
    base_model_version="sdxl_base_v1-0",
    base_model_version_v="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    modelspec_architecture_v="stable-diffusion-xl-v1-base/lora",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    supports_clip_skip=False,  # sd-scripts ignores clip_skip for SDXL
    sai_unet_names=True,
    title="SDXL",
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def family_for(v2: bool, sdxl: bool | None = False) -> ModelFamily:
    """The family the model options select (`model.sdxl`, `model.v2`)."""
    if sdxl:
        return SDXL
    return SD2 if v2 else SD1
