"""loracli's explicit LyCORIS target tables, torch-free, and the preset file export writes for sd-scripts.

LyCORIS' built-in `preset=full` also wraps conv_in, conv_out and the time
embedding; lycoris_lora 4.1.3 then fails on SD UNets ("duplicated lora name:
lora_unet_time_embedding_linear_1"). loracli names kohya's targets instead, and
an export writes the same table as a LyCORIS preset file (`preset=<file>`), so
sd-scripts trains the modules loracli's plan counts. The class names match both
diffusers' UNet and sd-scripts' own UNets (library/original_unet.py,
sdxl_original_unet.py), and transformers' CLIP text encoders.

The run side (loracli/run/network.py) applies these same tables to lycoris_lora.
"""

from __future__ import annotations

from typing import Any

PRESET_FILE = "lycoris_preset.toml"
# CLIP attention comes in three classes depending on the attention implementation transformers picks.
TEXT_TARGETS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"]
# kohya's LoRA targets: Linear and 1x1 convs inside the transformer blocks.
LORA_TARGETS: dict[str, Any] = {
    "enable_conv": True,  # proj_in/proj_out are 1x1 convs in SD1.5; they take network_dim
    "unet_target_module": ["Transformer2DModel"],
    "unet_target_name": [],
    "text_encoder_target_module": TEXT_TARGETS,
    "text_encoder_target_name": [],
    "module_algo_map": {},
    "name_algo_map": {},
    "exclude_name": [],
    "use_fnmatch": False,
}
# LoCon/LoHa/LoKr: also the ResNet blocks and the down/up-samplers (3x3 convs take conv_dim).
CONV_TARGETS: dict[str, Any] = {
    **LORA_TARGETS,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
}


def targets_for(algo: str) -> dict[str, Any]:
    """The target table of loracli's `lycoris_preset = "full"` for an algorithm."""
    return LORA_TARGETS if algo == "lora" else CONV_TARGETS


def same_targets(preset: dict[str, Any], algo: str) -> bool:
    """Whether a preset file (as parsed) selects exactly loracli's targets for `algo` (keys it leaves out keep
    LyCORIS' empty defaults)."""
    table = targets_for(algo)
    empty: dict[str, Any] = {"module_algo_map": {}, "name_algo_map": {}, "exclude_name": [], "use_fnmatch": False,
                             "unet_target_name": [], "text_encoder_target_name": []}
    if set(preset) - set(table):
        return False
    return all(preset.get(key, empty.get(key)) == value for key, value in table.items())
