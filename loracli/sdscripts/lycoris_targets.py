"""loracli's explicit LyCORIS target tables, torch-free, and the preset file export writes for sd-scripts.

LyCORIS' built-in `preset=full` also wraps conv_in, conv_out and the time
embedding; lycoris_lora 4.1.3 then fails on SD UNets ("duplicated lora name:
lora_unet_time_embedding_linear_1"). loracli names kohya's targets instead, and
an export writes the same table as a LyCORIS preset file (`preset=<file>`), so
sd-scripts trains the modules loracli's plan counts. The class names match both
diffusers' UNet and sd-scripts' own UNets (library/original_unet.py,
sdxl_original_unet.py), and transformers' CLIP text encoders. The other presets'
tables depend on the family: sd-scripts' SDXL UNet has no layer that LyCORIS'
presets select by the time embedding's class or the root layers' names.

The run side (loracli/run/network.py) applies these same tables to lycoris_lora.
"""

from __future__ import annotations

from typing import Any

from loracli.family import ModelFamily

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


# kohya's (SAI) names of the root layers, for SDXL files (keymap.diffusers_to_sai leaves them as they are).
SAI_ROOT_NAMES = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# The families sd-scripts trains on library/sdxl_original_unet.py. SD1/SD2 run on library/original_unet.py, which
# has diffusers' root layers: conv_in, conv_out and a TimestepEmbedding class `time_embedding` (linear_1/2). The
# SDXL UNet has none of them by class or name: its time embedding (`time_embed`) and label (add) embedding
# (`label_emb.0`) are nn.Sequential, and conv_in/conv_out are input_blocks.0.0 / out.2.
SDXL_ORIGINAL_UNET = frozenset({"sdxl"})
TIME_EMBEDDING_NAMES = ["time_embedding.linear_1", "time_embedding.linear_2"]
CONV_IN_OUT_NAMES = ["conv_in", "conv_out"]

# LyCORIS' presets of the same names (lycoris/config.py), as they select on sd-scripts' UNets and CLIP, without its
# traps:
# - attn-only names sd-scripts' attention classes (CrossAttention), which diffusers calls Attention: both here,
#   so loracli (diffusers) and sd-scripts wrap the same q/k/v/out layers;
# - full-lin, attn-mlp and unet-transformer-only list the class TimestepEmbedding (for Anima). On SD1/SD2
#   (original_unet.py) that is the time embedding: kept, by name. full-lin also names time_embedding.linear_1/2,
#   which select the same layers a second time ("duplicated lora name"): here the names only, once.
# - On SDXL no preset selects the time embedding, the add embedding, conv_in or conv_out: LyCORIS' class
#   TimestepEmbedding and names time_embedding.linear_1/2, conv_in, conv_out match nothing on
#   sdxl_original_unet.py, so sd-scripts does not train them (diffusers' SDXL UNet, which loracli runs, would
#   match them: not named here).
# enable_conv = False: no 3x3 convs (1x1 convs still take network_dim, as in LyCORIS).


def _tables(sdxl: bool) -> dict[str, dict[str, Any]]:
    time = [] if sdxl else TIME_EMBEDDING_NAMES
    return {
        "full-lin": _table(False, ["Transformer2DModel", "ResnetBlock2D"], time, TEXT_TARGETS),
        "attn-mlp": _table(False, ["Transformer2DModel"], time, TEXT_TARGETS),
        "attn-only": _table(False, ["Attention", "CrossAttention"], [],
                            ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"]),
        "unet-transformer-only": _table(False, ["Transformer2DModel"], time, []),
        "unet-convblock-only": _table(True, ["ResnetBlock2D", "Downsample2D", "Upsample2D"],
                                      [] if sdxl else CONV_IN_OUT_NAMES, []),
    }


PRESET_TABLES: dict[str, dict[str, Any]] = _tables(sdxl=False)  # SD1/SD2
SDXL_PRESET_TABLES: dict[str, dict[str, Any]] = _tables(sdxl=True)
PRESETS = ("full", *PRESET_TABLES)


def targets_for(algo: str, preset: str = "full", family: ModelFamily | str = "sd1") -> dict[str, Any]:
    """The target table of a loracli `lycoris_preset` for an algorithm on a model family (a ModelFamily or its
    name; 'full': kohya's targets, the same for every family)."""
    if preset != "full":
        sdxl = getattr(family, "name", family) in SDXL_ORIGINAL_UNET
        return (SDXL_PRESET_TABLES if sdxl else PRESET_TABLES)[preset]
    return LORA_TARGETS if algo == "lora" else CONV_TARGETS


def preset_named(preset: dict[str, Any], algo: str, family: ModelFamily | str = "sd1") -> str | None:
    """The loracli lycoris_preset whose table for this family a preset file (as parsed) is, or None."""
    for name in PRESETS:
        if same_targets(preset, algo, name, family):
            return name
    return None


def same_targets(preset: dict[str, Any], algo: str, name: str = "full", family: ModelFamily | str = "sd1") -> bool:
    """Whether a preset file (as parsed) selects exactly loracli's targets of preset `name` for `algo` on this
    family (keys it leaves out keep LyCORIS' empty defaults)."""
    table = targets_for(algo, name, family)
    empty: dict[str, Any] = {"module_algo_map": {}, "name_algo_map": {}, "exclude_name": [], "use_fnmatch": False,
                             "unet_target_name": [], "text_encoder_target_name": []}
    if set(preset) - set(table):
        return False
    return all(preset.get(key, empty.get(key)) == value for key, value in table.items())
