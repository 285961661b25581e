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


def _table(enable_conv: bool, unet_modules: list[str], unet_names: list[str], text_modules: list[str]
           ) -> dict[str, Any]:
    return {**LORA_TARGETS, "enable_conv": enable_conv, "unet_target_module": unet_modules,
            "unet_target_name": unet_names, "text_encoder_target_module": text_modules}


# Root layers by both names: diffusers' (loracli's run) and sd-scripts' SDXL UNet's (sdxl_original_unet.py; its
# SD1 UNet uses diffusers' names). LyCORIS matches a target name as a regex at the start of a module path.
# diffusers' SDXL add_embedding is a TimestepEmbedding too, so LyCORIS' full-lin picks it; sd-scripts: label_emb.0.
TIME_EMBEDDING_NAMES = ["time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1",
                        "add_embedding.linear_2", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2"]
CONV_IN_OUT_NAMES = ["conv_in", "conv_out", "input_blocks.0.0", "out.2"]
# kohya's (SAI) names of those root layers, for SDXL files (keymap.diffusers_to_sai leaves them as they are).
SAI_ROOT_NAMES = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# LyCORIS' presets of the same names (lycoris/config.py), as they select on SD UNets and CLIP, without its traps:
# - full-lin lists the class TimestepEmbedding and the names time_embedding.linear_1/2, which select the same
#   layers twice ("duplicated lora name"): here the names only (with SDXL's add_embedding, the class's other match);
# - attn-only names sd-scripts' attention classes (CrossAttention), which diffusers calls Attention: both here,
#   so loracli (diffusers) and sd-scripts wrap the same q/k/v/out layers.
# - full-lin, attn-mlp and unet-transformer-only list TimestepEmbedding (for Anima), which on SD UNets is the time
#   embedding (SDXL: also add_embedding): kept, by name, so that sd-scripts' SDXL UNet (an nn.Sequential there,
#   never matched by class) trains the same layers.
# enable_conv = False: no 3x3 convs (1x1 convs still take network_dim, as in LyCORIS).
PRESET_TABLES: dict[str, dict[str, Any]] = {
    "full-lin": _table(False, ["Transformer2DModel", "ResnetBlock2D"], TIME_EMBEDDING_NAMES, TEXT_TARGETS),
    "attn-mlp": _table(False, ["Transformer2DModel"], TIME_EMBEDDING_NAMES, TEXT_TARGETS),
    "attn-only": _table(False, ["Attention", "CrossAttention"], [],
                        ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"]),
    "unet-transformer-only": _table(False, ["Transformer2DModel"], TIME_EMBEDDING_NAMES, []),
    "unet-convblock-only": _table(True, ["ResnetBlock2D", "Downsample2D", "Upsample2D"], CONV_IN_OUT_NAMES, []),
}
PRESETS = ("full", *PRESET_TABLES)


def targets_for(algo: str, preset: str = "full") -> dict[str, Any]:
    """The target table of a loracli `lycoris_preset` for an algorithm ('full': kohya's targets)."""
    if preset != "full":
        return PRESET_TABLES[preset]
    return LORA_TARGETS if algo == "lora" else CONV_TARGETS


def preset_named(preset: dict[str, Any], algo: str) -> str | None:
    """The loracli lycoris_preset whose table a preset file (as parsed) is, or None."""
    for name in PRESETS:
        if same_targets(preset, algo, name):
            return name
    return None


def same_targets(preset: dict[str, Any], algo: str, name: str = "full") -> bool:
    """Whether a preset file (as parsed) selects exactly loracli's targets of preset `name` for `algo` (keys it
    leaves out keep LyCORIS' empty defaults)."""
    table = targets_for(algo, name)
    empty: dict[str, Any] = {"module_algo_map": {}, "name_algo_map": {}, "exclude_name": [], "use_fnmatch": False,
                             "unet_target_name": [], "text_encoder_target_name": []}
    if set(preset) - set(table):
        return False
    return all(preset.get(key, empty.get(key)) == value for key, value in table.items())
