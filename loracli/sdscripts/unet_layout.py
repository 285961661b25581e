"""Whether sd-scripts can load a diffusers model folder's UNet (torch-free: reads unet/config.json).

sd-scripts does not run diffusers' UNet: it rebuilds its own (library/original_unet.py for SD1.x/2.x,
sdxl_original_unet.py for SDXL) with the block layout of the released base models written into the code,
and loads the folder's weights into it. A folder with another layout (a pruned, distilled or tiny UNet)
trains with loracli but fails in sd-scripts' loader, so export warns about it beforehand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The UNet config values sd-scripts' rebuilt UNets take as given, per family (diffusers' config names).
FIXED_LAYOUT: dict[str, dict[str, Any]] = {
    "sd1": {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "sdxl": {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
             "projection_class_embeddings_input_dim": 2816},
}
FIXED_LAYOUT["sd2"] = FIXED_LAYOUT["sd1"]  # the same rebuilt UNet; head dims and context size come from the config


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def layout_differences(model: str, family_name: str) -> list[str]:
    """`key: value (sd-scripts builds X)` for each fixed layout value a diffusers folder's UNet does not share;
    empty for single files, names, and folders whose config cannot be read (the plan reports those)."""
    config_path = Path(model).expanduser() / "unet" / "config.json"
    expected = FIXED_LAYOUT.get(family_name)
    if expected is None or not config_path.is_file():
        return []
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(config, dict):
        return []
    out = []
    for key, value in expected.items():
        got = _normal(config.get(key))
        if key == "transformer_layers_per_block" and isinstance(got, int):
            got = [got] * len(value)
        if got is not None and got != value:
            out.append(f"{key} {got} (sd-scripts builds {value})")
    return out
