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
)

FAMILIES = {f.name: f for f in (SD1, SD2)}


def family_for(v2: bool) -> ModelFamily:
    """The family the model options select (SDXL will add its own switch)."""
    return SD2 if v2 else SD1
