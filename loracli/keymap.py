"""Module names between diffusers' UNet layout and the SAI/ldm layout that kohya uses for SDXL.

sd-scripts trains SDXL on its own UNet, whose modules carry the names of the
original (Stability AI) checkpoint: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
where diffusers says `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
LoRA files name their modules after it (`lora_unet_input_blocks_4_1_...`), so a
loracli SDXL file must too. SD1/SD2 files keep diffusers' names (sd-scripts' SD1
UNet uses them). Pure string work: no torch, usable from the plan side and tools.

The layout, for `layers_per_block` = n (SDXL: 2):
  down_blocks.i.resnets.j / .attentions.j  →  input_blocks.{i(n+1)+j+1}.0 / .1
  down_blocks.i.downsamplers.0.conv        →  input_blocks.{(i+1)(n+1)}.0.op
  mid_block.resnets.j / .attentions.0      →  middle_block.{2j} / middle_block.1
  up_blocks.i.resnets.j / .attentions.j    →  output_blocks.{i(n+1)+j}.0 / .1
  up_blocks.i.upsamplers.0                 →  output_blocks.{i(n+1)+n}.{2 with attentions, else 1}
and inside a ResNet block: conv1 → in_layers.2, conv2 → out_layers.3,
time_emb_proj → emb_layers.1, conv_shortcut → skip_connection (norms likewise).
"""

from __future__ import annotations

import re

RESNET_PARTS = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
RESNET_PARTS_BACK = {v: k for k, v in RESNET_PARTS.items()}


def _resnet_tail(tail: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if tail == old or tail.startswith(old + "."):
            return new + tail[len(old):]
    return tail


def diffusers_to_sai(path: str, layers_per_block: int = 2, up_attention_blocks: frozenset[int] = frozenset({0, 1})
                     ) -> str:
    """A diffusers UNet module path in the SAI/ldm layout (unchanged when it has no counterpart)."""
    n = layers_per_block
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", path):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        if kind == "resnets":
            tail = _resnet_tail(tail, RESNET_PARTS)
        return _join(f"input_blocks.{i * (n + 1) + j + 1}.{0 if kind == 'resnets' else 1}", tail)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", path):
        return _join(f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op", (m[2] or "")[1:])
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)?", path):
        kind, j, tail = m[1], int(m[2]), (m[3] or "")[1:]
        if kind == "resnets":
            return _join(f"middle_block.{2 * j}", _resnet_tail(tail, RESNET_PARTS))
        return _join("middle_block.1", tail)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", path):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        if kind == "resnets":
            tail = _resnet_tail(tail, RESNET_PARTS)
        return _join(f"output_blocks.{i * (n + 1) + j}.{0 if kind == 'resnets' else 1}", tail)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0(\..+)?", path):
        i = int(m[1])
        inner = 2 if i in up_attention_blocks else 1
        return _join(f"output_blocks.{i * (n + 1) + n}.{inner}", (m[2] or "")[1:])
    return path


def _join(head: str, tail: str) -> str:
    return f"{head}.{tail}" if tail else head


def kohya_module_name(prefix: str, path: str) -> str:
    """kohya's module name: prefix + the dotted path with dots as underscores."""
    return f"{prefix}_{path}".replace(".", "_")
