"""The LoRA modules a network will have, per part and UNet block, from the models' configs (torch-free).

The plan shows these counts before any model loads. The layers are laid out as diffusers builds a
UNet2DConditionModel from its config (resnets, transformer blocks, samplers) and transformers a CLIP text
encoder from its depth; the selection is the run's: sd-scripts' networks.lora rules for plain LoRA (with
block-wise ranks), loracli's LyCORIS target tables for the other algorithms. tests/cpu checks that the counts
equal the modules the run creates on tiny:sd15 and tiny:sdxl.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracli.family import ModelFamily
from loracli.keymap import diffusers_to_sai, kohya_module_name
from loracli.network_blocks import BlockOptions, block_index, block_label
from loracli.sdscripts.lycoris_targets import SAI_ROOT_NAMES, targets_for

ATTENTION_CLASSES = {"Attention", "CrossAttention"}  # diffusers' and sd-scripts' attention classes
CLIP_ATTENTION = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}
STANDARD_TEXT_LAYERS = {"sd1": (12,), "sd2": (23,), "sdxl": (12, 32)}  # CLIP-L; OpenCLIP-H (23 used); L + bigG


@dataclass(frozen=True)
class Layer:
    path: str  # the model's module path (diffusers / transformers)
    kind: str  # linear | conv1x1 | conv3x3
    block: str  # the class of the enclosing target block ("" for root layers)
    inner: str = ""  # Attention for q/k/v/out of an attention


def _per_level(value: Any, levels: int, default: int) -> list[int]:
    if value is None:
        return [default] * levels
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def _resnet(prefix: str, cin: int, cout: int) -> Iterator[Layer]:
    yield Layer(f"{prefix}.conv1", "conv3x3", "ResnetBlock2D")
    yield Layer(f"{prefix}.time_emb_proj", "linear", "ResnetBlock2D")
    yield Layer(f"{prefix}.conv2", "conv3x3", "ResnetBlock2D")
    if cin != cout:
        yield Layer(f"{prefix}.conv_shortcut", "conv1x1", "ResnetBlock2D")


def _transformer(prefix: str, depth: int, linear_projection: bool) -> Iterator[Layer]:
    proj = "linear" if linear_projection else "conv1x1"
    block = "Transformer2DModel"
    yield Layer(f"{prefix}.proj_in", proj, block)
    for k in range(depth):
        tb = f"{prefix}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            for part in ("to_q", "to_k", "to_v", "to_out.0"):
                yield Layer(f"{tb}.{attn}.{part}", "linear", block, "Attention")
        yield Layer(f"{tb}.ff.net.0.proj", "linear", block)
        yield Layer(f"{tb}.ff.net.2", "linear", block)
    yield Layer(f"{prefix}.proj_out", proj, block)


def unet_layers(config: dict[str, Any]) -> list[Layer]:
    """Every Linear/Conv2d of a diffusers UNet2DConditionModel with this config that LoRA could wrap."""
    kinds = {*config["down_block_types"], *config["up_block_types"]}
    if not kinds <= {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}:
        raise ValueError(f"blocks {sorted(kinds)} are not laid out here")  # the plan shows no table then
    channels = list(config["block_out_channels"])
    levels = len(channels)
    per_block = _per_level(config.get("layers_per_block", 2), levels, 2)
    depth = _per_level(config.get("transformer_layers_per_block"), levels, 1)
    linear = bool(config.get("use_linear_projection", False))
    out = [Layer("conv_in", "conv3x3", ""), Layer("time_embedding.linear_1", "linear", ""),
           Layer("time_embedding.linear_2", "linear", "")]
    if config.get("addition_embed_type") == "text_time":
        out += [Layer("add_embedding.linear_1", "linear", ""), Layer("add_embedding.linear_2", "linear", "")]
    cout = channels[0]
    for i, kind in enumerate(config["down_block_types"]):
        cin, cout = cout, channels[i]
        for j in range(per_block[i]):
            out += _resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
            if "CrossAttn" in kind:
                out += _transformer(f"down_blocks.{i}.attentions.{j}", depth[i], linear)
        if i < levels - 1:
            out.append(Layer(f"down_blocks.{i}.downsamplers.0.conv", "conv3x3", "Downsample2D"))
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise ValueError(f"mid block {mid} is not laid out here")
    out += _resnet("mid_block.resnets.0", channels[-1], channels[-1])
    if mid == "UNetMidBlock2DCrossAttn":
        out += _transformer("mid_block.attentions.0", depth[-1], linear)
    out += _resnet("mid_block.resnets.1", channels[-1], channels[-1])
    reversed_channels, reversed_layers = channels[::-1], per_block[::-1]
    reversed_depth = depth[::-1]
    cout = reversed_channels[0]
    for i, kind in enumerate(config["up_block_types"]):
        prev, cout = cout, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, levels - 1)]
        layers = reversed_layers[i] + 1
        for j in range(layers):
            skip = skip_in if j == layers - 1 else cout
            out += _resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else cout) + skip, cout)
            if "CrossAttn" in kind:
                out += _transformer(f"up_blocks.{i}.attentions.{j}", reversed_depth[i], linear)
        if i < levels - 1:
            out.append(Layer(f"up_blocks.{i}.upsamplers.0.conv", "conv3x3", "Upsample2D"))
    out.append(Layer("conv_out", "conv3x3", ""))
    return out


def text_layers(depth: int) -> list[Layer]:
    out = []
    for k in range(depth):
        base = f"text_model.encoder.layers.{k}"
        out += [Layer(f"{base}.self_attn.{p}", "linear", "CLIPAttention") for p in ("q_proj", "k_proj", "v_proj",
                                                                                   "out_proj")]
        out += [Layer(f"{base}.mlp.{p}", "linear", "CLIPMLP") for p in ("fc1", "fc2")]
    return out


def unet_kohya_name(path: str, family: ModelFamily, config: dict[str, Any]) -> str:
    if not family.sai_unet_names:
        return kohya_module_name(family.unet_prefix, path)
    per_block = _per_level(config.get("layers_per_block", 2), len(config["block_out_channels"]), 2)[0]
    up_attention = frozenset(i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t)
    sai = SAI_ROOT_NAMES.get(path) or diffusers_to_sai(path, per_block, up_attention)
    return kohya_module_name(family.unet_prefix, sai)


@dataclass(frozen=True)
class PlannedModule:
    name: str  # kohya name, as saved
    part: str  # the text encoder's prefix or "unet"
    rank: int


def planned_modules(network: Any, family: ModelFamily, unet_config: dict[str, Any],
                    text_depths: tuple[int, ...]) -> list[PlannedModule]:
    """The modules the run will create for this [network] section on a model with these configs."""
    out: list[PlannedModule] = []
    lora = network.algo == "lora"
    table = targets_for(network.algo, network.lycoris_preset, family)
    if not network.network_train_unet_only:
        for prefix, depth in zip(family.text_encoder_prefixes, text_depths):
            for layer in text_layers(depth):
                if lora or _text_chosen(layer, set(table["text_encoder_target_module"])):
                    out.append(PlannedModule(kohya_module_name(prefix, layer.path), prefix, network.dim))
    if network.network_train_text_encoder_only:
        return out
    blocks = BlockOptions.of(network) if lora else None
    ranks = blocks.ranks(family.sai_unet_names, network.dim, network.network_alpha, network.conv_dim,
                         network.conv_alpha) if blocks is not None else None
    for layer in unet_layers(unet_config):
        name = unet_kohya_name(layer.path, family, unet_config)
        rank = _kohya_rank(layer, name, network, ranks, family) if lora else _lycoris_rank(layer, network, table)
        if rank:
            out.append(PlannedModule(name, "unet", rank))
    return out


def _text_chosen(layer: Layer, modules: set[str]) -> bool:
    if layer.block == "CLIPAttention":
        return bool(CLIP_ATTENTION & modules)
    return layer.block in modules


def _kohya_rank(layer: Layer, name: str, network: Any, ranks: Any, family: ModelFamily) -> int:
    """networks.lora: transformer blocks always; ResNet/sampler blocks with conv_dim or conv_block_dims."""
    convs = network.conv_dim is not None or (ranks is not None and ranks.conv_dims is not None)
    if layer.block != "Transformer2DModel" and not (convs and layer.block in ("ResnetBlock2D", "Downsample2D",
                                                                           "Upsample2D")):
        return 0
    if ranks is not None:
        index = block_index(name, family.sai_unet_names)
        if layer.kind != "conv3x3":
            return ranks.dims[index]
        return ranks.conv_dims[index] if ranks.conv_dims is not None else 0
    if layer.kind != "conv3x3":
        return network.dim
    return network.conv_dim or 0


def _lycoris_rank(layer: Layer, network: Any, table: dict[str, Any]) -> int:
    """LyCORIS: a layer inside a target class, or named by a target name; 3x3 convs only with enable_conv."""
    modules = set(table["unet_target_module"])
    chosen = (layer.block in modules or (layer.inner and ATTENTION_CLASSES & modules and layer.inner == "Attention")
              or any(re.match(pattern, layer.path) for pattern in table["unet_target_name"]))
    if not chosen:
        return 0
    if layer.kind != "conv3x3":
        return network.dim
    return (network.conv_dim or network.dim) if table["enable_conv"] else 0


def module_counts(modules: list[PlannedModule], family: ModelFamily) -> list[dict[str, Any]]:
    """Rows for the plan: each text encoder, then each UNet block (sd-scripts' numbering), with ranks."""
    rows: dict[str, dict[str, Any]] = {}
    for module in modules:
        if module.part == "unet":
            index = block_index(module.name, family.sai_unet_names)
            label = "unet " + (block_label(index, family.sai_unet_names) if index >= 0 else "other")
        else:
            label = {"lora_te": "text encoder", "lora_te1": "text encoder 1",
                     "lora_te2": "text encoder 2"}.get(module.part, module.part)
        row = rows.setdefault(label, {"part": label, "modules": 0, "ranks": []})
        row["modules"] += 1
        if module.rank not in row["ranks"]:
            row["ranks"].append(module.rank)
    return list(rows.values())


def model_configs(path: str, kind: str, family: ModelFamily) -> tuple[dict[str, Any], tuple[int, ...]] | None:
    """(UNet config, text-encoder depths) of the plan's model, or None when they cannot be read."""
    if kind == "tiny" or path.startswith("tiny:"):
        from loracli.run.tiny_model import TINY_SD15_UNET, TINY_SDXL_UNET, TINY_TEXT_LAYERS  # stdlib only

        unet = {"tiny:sd15": TINY_SD15_UNET, "tiny:sdxl": TINY_SDXL_UNET}.get(path)
        return (dict(unet), TINY_TEXT_LAYERS[path]) if unet is not None else None
    folder = Path(path)
    if folder.is_dir():
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            depths = tuple(int(json.loads((folder / te / "config.json").read_text(encoding="utf-8"))
                               ["num_hidden_layers"])
                           for te in ("text_encoder", "text_encoder_2")[:len(family.text_encoder_prefixes)])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (unet, depths) if isinstance(unet, dict) and "block_out_channels" in unet else None
    if folder.is_file():
        if family.name == "sdxl":
            from loracli.vram import SDXL_UNET

            # SDXL's text-time conditioning (add_embedding) and linear projections, which the estimate's copy omits
            config = {**SDXL_UNET, "addition_embed_type": "text_time", "use_linear_projection": True}
            return config, STANDARD_TEXT_LAYERS["sdxl"]
        asset = Path(__file__).parent / "run" / "assets" / f"{family.name}_unet.json"
        try:
            return json.loads(asset.read_text(encoding="utf-8")), STANDARD_TEXT_LAYERS.get(family.name, (12,))
        except (OSError, ValueError):
            return None
    return None


def network_module_counts(network: Any, family: ModelFamily, path: str, kind: str) -> list[dict[str, Any]]:
    """The plan's rows (empty when the model's configs cannot be read, e.g. a .bin folder without configs)."""
    configs = model_configs(path, kind, family)
    if configs is None:
        return []
    try:
        return module_counts(planned_modules(network, family, *configs), family)
    except (KeyError, TypeError, ValueError, IndexError):
        return []  # an unusual UNet config: no table rather than a wrong one
