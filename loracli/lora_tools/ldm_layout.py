"""A diffusers folder's tensors under single-file (original LDM/SAI) names, for `loracli merge`.

Each output tensor is built from one source tensor (renamed; VAE attention
Linears become 1×1 convs; OpenCLIP's projection is stored transposed) or from
three (OpenCLIP's fused q/k/v `in_proj`), so a folder is written tensor by
tensor, as a checkpoint is. SD1 and SDXL folders; SD2 folders are refused (their
text encoder lacks the last OpenCLIP layer a single file carries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.keymap import diffusers_to_sai
from loracli.lora_tools.basemodel import FIXED_UNET, UNET, BaseModel, _component_file

UNET_EXTRA = {**FIXED_UNET, "conv_norm_out": "out.0"}
VAE = "first_stage_model."
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


@dataclass(frozen=True)
class Output:
    name: str
    sources: tuple[tuple[str, str], ...]  # (file label, key) in the folder
    transform: str = "copy"  # copy | conv1x1 | transpose | cat


def _register(model: BaseModel, component: str, where: str) -> dict[str, str]:
    """key → file label of one component, its files added to the model."""
    keys = {}
    for key, file in _component_file(model.path, component, where).items():
        label = str(file.relative_to(model.path))
        model.files.setdefault(label, file)
        keys[key] = label
    return keys


def _unet(model: BaseModel, config: dict, where: str) -> list[Output]:
    from loracli.lora_tools.basemodel import _unet_layout

    layers, up_attention = _unet_layout(config)
    out = []
    for key, label in _register(model, "unet", where).items():
        path, _, leaf = key.rpartition(".")
        sai = UNET_EXTRA.get(path) or diffusers_to_sai(path, layers, up_attention)
        if sai == path and path not in UNET_EXTRA:
            raise DatasetError(Problem(where, f"the UNet tensor {key} has no single-file counterpart",
                                       "merge into the single-file version of the model"))
        out.append(Output(f"{UNET}{sai}.{leaf}", ((label, key),)))
    return out


def _vae_name(key: str, levels: int) -> tuple[str, str]:
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key, "copy"  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.', 1)[1]}", "copy"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)", rest):
        word, index = m[1], int(m[2])
        level = index if word == "down" else levels - 1 - index
        if m[4] is not None:
            return f"{side}.{word}.{level}.block.{m[4]}.{m[5].replace('conv_shortcut', 'nin_shortcut')}", "copy"
        return f"{side}.{word}.{level}.{word}sample.{m[5]}", "copy"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}", "copy"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}", "conv1x1" if m[1] != "group_norm" else "copy"
    return key, "copy"  # conv_in, conv_out


def _vae(model: BaseModel, where: str) -> list[Output]:
    keys = _register(model, "vae", where)
    levels = len({k.split(".")[2] for k in keys if k.startswith("decoder.up_blocks.")})
    out = []
    for key, label in keys.items():
        name, transform = _vae_name(key, levels)
        if transform == "conv1x1" and not key.endswith(".weight"):
            transform = "copy"
        out.append(Output(VAE + name, ((label, key),), transform))
    return out


def _clip(model: BaseModel, component: str, prefix: str, where: str) -> list[Output]:
    out = []
    for key, label in _register(model, component, where).items():
        if key.endswith("position_ids") or key == "text_projection.weight":
            continue
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out.append(Output(prefix + inner, ((label, key),)))
    return out


def _open_clip(model: BaseModel, component: str, prefix: str, where: str) -> list[Output]:
    keys = {k.removeprefix("text_model."): (label, k) for k, label in _register(model, component, where).items()}
    out = []
    for short, (label, key) in keys.items():
        if short in _OPEN_CLIP_FIXED:
            out.append(Output(prefix + _OPEN_CLIP_FIXED[short], ((label, key),)))
        elif short == "text_projection.weight":
            out.append(Output(prefix + "text_projection", ((label, key),), "transpose"))
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", short):
            layer, part, leaf = m[1], m[2], m[3]
            dst = f"{prefix}transformer.resblocks.{layer}."
            if part == "self_attn.q_proj":
                parts = tuple(keys[f"encoder.layers.{layer}.self_attn.{p}_proj.{leaf}"] for p in "qkv")
                out.append(Output(f"{dst}attn.in_proj_{leaf}", parts, "cat"))
            elif part in _OPEN_CLIP_LAYER:
                out.append(Output(f"{dst}{_OPEN_CLIP_LAYER[part]}.{leaf}", ((label, key),)))
    return out


def single_file_layout(model: BaseModel, unet_config: dict) -> list[Output]:
    """Every tensor of the folder's model as a single-file checkpoint holds it."""
    where = f"--model {model.path}"
    if model.family == "sd2":
        raise ConfigError(Problem(where, "merging into an SD2 diffusers folder is not supported (its text encoder "
                                  "lacks the last layer an SD2 single file holds)",
                                  "give the model as a single-file .safetensors checkpoint"))
    outputs = _unet(model, unet_config, where) + _vae(model, where)
    if model.family == "sdxl":
        outputs += _clip(model, "text_encoder", "conditioner.embedders.0.transformer.", where)
        outputs += _open_clip(model, "text_encoder_2", "conditioner.embedders.1.model.", where)
    else:
        outputs += _clip(model, "text_encoder", "cond_stage_model.transformer.", where)
    return outputs
