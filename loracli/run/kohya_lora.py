"""Plain LoRA as sd-scripts' `networks.lora` computes it: a separate low-rank branch.

Each targeted base layer keeps its own forward and gets `up(down(x)) * multiplier * scale`
added to its output (scale = alpha / dim). The LoRA weights live in the network's dtype
(fp32 unless the run says otherwise), so under fp16/bf16 training the update is never
rounded onto the base weight's grid, unlike a forward that rebuilds `W + ΔW` in the base
weight's dtype (LyCORIS' non-bypass mode).

What is targeted, and how it is named, is sd-scripts' choice:
- UNet: every Linear and 1x1 Conv2d inside a Transformer2DModel (LoRA-LierLa); with
  `conv_dim` also everything inside ResnetBlock2D/Downsample2D/Upsample2D, the 3x3 convs
  at conv_dim/conv_alpha (LoRA-C3Lier; sd-scripts' conv_alpha default is 1).
- text encoders: the Linears of each encoder layer's attention and MLP.
- names: `lora_unet_<module path>` (SDXL: the SAI path, `lora_unet_input_blocks_4_1_...`),
  `lora_te_text_model_<path>` (SDXL: `lora_te1_...`, `lora_te2_...`).

Dtype of the input: under autocast (how loracli trains and samples) the branch runs exactly
as in sd-scripts (autocast picks the matmul dtype). Without autocast, where sd-scripts would
fail on a dtype mismatch, the input is cast to the LoRA weights' dtype and the branch's
result back to the base output's dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from loracli.errors import ConfigError, Problem
from loracli.keymap import diffusers_to_sai, kohya_module_name
from loracli.network_blocks import BlockRanks, block_index

if TYPE_CHECKING:
    from loracli.family import ModelFamily
    from loracli.run.network import NetworkSpec

UNET_BLOCKS = frozenset({"Transformer2DModel"})
UNET_CONV_BLOCKS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})
# The attention and MLP of a CLIP encoder layer, whatever transformers calls their classes
# (CLIPAttention, CLIPSdpaAttention, ...): matched by their place in the layer.
TEXT_BLOCK_PATH = re.compile(r"(?:^|.*\.)encoder\.layers\.\d+\.(?:self_attn|mlp)")
SD_SCRIPTS_CONV_ALPHA = 1.0  # networks.lora's conv_alpha when conv_dim is given without it


class KohyaLoRAModule(nn.Module):
    """One LoRA branch beside a Linear or Conv2d, whose forward it takes over (`apply_to`)."""

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = dim
        if isinstance(org_module, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(org_module.in_channels, dim, org_module.kernel_size,
                                                  org_module.stride, org_module.padding, bias=False)
            self.lora_up: nn.Module = nn.Conv2d(dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA wraps Linear or Conv2d, not {type(org_module).__name__}")
        alpha = float(dim) if not alpha else float(alpha)  # 0/None: no scaling, as sd-scripts
        self.scale = alpha / dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        # LoRA's usual start: a random down projection and a zero up, so the branch starts at 0
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self._org = [org_module]  # a list, so the base layer is not a submodule (not saved, not moved)
        self._patched = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this module (the base layer stays where it is)."""
        if self._patched:
            return
        org = self.org_module
        self._had_own_forward = "forward" in org.__dict__
        self.org_forward = org.forward
        org.forward = self.forward
        self._patched = True

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        if not self._patched:
            return
        org = self.org_module
        if self._had_own_forward:
            org.forward = self.org_forward
        else:
            del org.forward
        del self.org_forward
        self._patched = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out  # module dropout: this step skips the whole branch
        return out + self.branch(x).to(out.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) * multiplier * scale, with sd-scripts' training-time dropouts."""
        weight_dtype = self.lora_down.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)
        lx = self.lora_down(x)
        if self.dropout is not None and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)  # network_dropout: neurons of the rank
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            # one keep/drop draw per sample and rank, broadcast over tokens or pixels
            keep = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                keep = keep.unsqueeze(1)
            elif lx.dim() == 4:
                keep = keep[:, :, None, None]
            lx = lx * keep
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # as if the rank were that much smaller
        lx = self.lora_up(lx)
        if self.multiplier != 1.0:  # × 1.0 is exact: skipping it saves a pass over the output, not a bit
            lx = lx * self.multiplier
        return lx * scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW = up·down·scale in the base weight's shape (for norms and merging), in the LoRA's dtype."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.dim() == 2:
            updown = up @ down
        else:  # conv: a 1x1 up after a kxk down is one kxk kernel
            updown = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return updown * self.scale


class KohyaLoRANetwork(nn.Module):
    """The LoRA modules of a model, registered under their kohya names (state_dict() is the file)."""

    def __init__(self, text_encoder_loras_by_index: list[list[KohyaLoRAModule]],
                 unet_loras: list[KohyaLoRAModule], multiplier: float = 1.0) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.text_encoder_loras_by_index = text_encoder_loras_by_index
        self.unet_loras = unet_loras
        seen: set[str] = set()
        for lora in self.text_encoder_loras + unet_loras:  # text encoders first, as sd-scripts saves
            if lora.lora_name in seen:
                raise ValueError(f"duplicated LoRA module name: {lora.lora_name}")
            seen.add(lora.lora_name)
            self.add_module(lora.lora_name, lora)

    @property
    def text_encoder_loras(self) -> list[KohyaLoRAModule]:
        return [lora for loras in self.text_encoder_loras_by_index for lora in loras]

    def all_loras(self) -> Iterator[KohyaLoRAModule]:
        yield from self.text_encoder_loras
        yield from self.unet_loras

    def apply_to(self) -> None:
        for lora in self.all_loras():
            lora.apply_to()

    def restore(self) -> None:
        """Remove the patches: the base model computes as if the network did not exist."""
        for lora in self.all_loras():
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "network.network_weights"
                     ) -> tuple[int, int]:
        """Load a kohya LoRA state dict; returns the matched (UNet, text encoder) module counts.

        Each loaded module's scale follows the file's alpha, so the network computes what the
        file computes. A file whose tensors have other shapes, or whose UNet/text-encoder
        modules all miss this network, is refused (a silent zero-match would train from scratch).
        """
        own = self.state_dict()
        matched = {k: v for k, v in state_dict.items() if k in own}
        mismatched = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
        if mismatched:
            k = mismatched[0]
            raise ConfigError(Problem(source, f"{len(mismatched)} tensor(s) have other shapes, e.g. {k} "
                                              f"{tuple(state_dict[k].shape)} (this network: {tuple(own[k].shape)})",
                                      "use the same network_dim, conv_dim and base model as the file"))
        self.load_state_dict(matched, strict=False)
        modules = {k.split(".", 1)[0] for k in matched}
        by_name = {lora.lora_name: lora for lora in self.all_loras()}
        for name in modules:
            lora = by_name[name]
            lora.scale = float(lora.alpha) / lora.lora_dim
        in_file = {k.split(".", 1)[0] for k in state_dict}
        unet = sum(1 for m in modules if m.startswith("lora_unet"))
        text = sum(1 for m in modules if m.startswith("lora_te"))
        for part, prefix, count, trained in (("UNet", "lora_unet", unet, self.unet_loras),
                                             ("text encoder", "lora_te", text, self.text_encoder_loras)):
            if trained and count == 0 and any(m.startswith(prefix) for m in in_file):
                raise ConfigError(Problem(source, f"none of the file's {part} modules match this network",
                                          "check network.algo and the base model"))
        return unet, text

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device: torch.device | str
                                      ) -> tuple[int, float, float]:
        """sd-scripts' scale_weight_norms: each module whose ‖ΔW‖ exceeds max_norm gets up and down
        multiplied by √(max_norm/‖ΔW‖). Returns (modules scaled, mean norm, max norm) after scaling.

        The same numbers as sd-scripts, with one host sync per call instead of one per module."""
        loras = list(self.all_loras())
        if not loras:
            return 0, 0.0, 0.0
        norms = torch.stack([lora.delta_weight().to(device).norm() for lora in loras])
        clamped = norms.clamp(min=max_norm / 2)  # small norms give ratio 1: left alone
        ratios = clamped.clamp(max=max_norm) / clamped
        factors = ratios.sqrt()
        for lora, factor in zip(loras, factors):  # × 1.0 where not scaled: exact, and no sync to decide
            lora.lora_up.weight.mul_(factor.to(lora.lora_up.weight.device))
            lora.lora_down.weight.mul_(factor.to(lora.lora_down.weight.device))
        scaled = norms * ratios
        summary = torch.stack([(ratios != 1).sum().to(scaled.dtype), scaled.mean(), scaled.max()]).tolist()
        return int(summary[0]), summary[1], summary[2]


def _text_encoder_path(path: str) -> str:
    """`text_model.<path>` whether or not this transformers keeps the text_model level (5 drops it)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _layers(root: nn.Module, block_match) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for each Linear/Conv2d inside the blocks block_match accepts, in module order."""
    for name, block in root.named_modules():
        if not block_match(name, block):
            continue
        for child_name, child in block.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                yield (f"{name}.{child_name}" if name else child_name), child


def _dim_alpha(layer: nn.Module, spec: NetworkSpec) -> tuple[int, float | None] | None:
    """networks.lora's rank for a layer: dim for Linear and 1x1 convs, conv_dim for larger kernels."""
    if isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1):
        return (spec.dim, spec.alpha) if spec.dim else None
    if spec.conv_dim:
        return spec.conv_dim, spec.conv_alpha if spec.conv_alpha is not None else SD_SCRIPTS_CONV_ALPHA
    return None


def _block_dim_alpha(lora_name: str, layer: nn.Module, ranks: BlockRanks, is_sdxl: bool
                     ) -> tuple[int, float | None] | None:
    """With block_dims or lr weights, a UNet layer's rank is its block's (sd-scripts indexes -1 as the last)."""
    index = block_index(lora_name, is_sdxl)
    if isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1):
        dim, alpha = ranks.dims[index], ranks.alphas[index]
    elif ranks.conv_dims is not None and ranks.conv_alphas is not None:
        dim, alpha = ranks.conv_dims[index], ranks.conv_alphas[index]
    else:
        return None
    return (dim, alpha) if dim else None


def _make(names_and_layers: Iterable[tuple[str, nn.Module]], spec: NetworkSpec,
          rank_of=None) -> list[KohyaLoRAModule]:
    loras = []
    for lora_name, layer in names_and_layers:
        dim_alpha = rank_of(lora_name, layer) if rank_of is not None else _dim_alpha(layer, spec)
        if dim_alpha is None:
            continue
        dim, alpha = dim_alpha
        loras.append(KohyaLoRAModule(lora_name, layer, dim, alpha, dropout=spec.dropout,
                                     rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout))
    return loras


def _unet_names(unet: nn.Module, family: ModelFamily, spec: NetworkSpec, with_convs: bool
                ) -> list[tuple[str, nn.Module]]:
    blocks = UNET_BLOCKS | UNET_CONV_BLOCKS if with_convs else UNET_BLOCKS
    layers = _layers(unet, lambda _name, block: type(block).__name__ in blocks)
    if not family.sai_unet_names:
        return [(kohya_module_name(family.unet_prefix, path), layer) for path, layer in layers]
    config = unet.config
    per_block = config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]  # diffusers allows one per level
    up_attention = frozenset(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
    return [(kohya_module_name(family.unet_prefix,
                               diffusers_to_sai(path, layers_per_block=per_block, up_attention_blocks=up_attention)),
             layer)
            for path, layer in layers]


def create_kohya_lora(spec: NetworkSpec, text_encoders: list, unet, family: ModelFamily) -> KohyaLoRANetwork:
    """sd-scripts' networks.lora on a diffusers UNet and transformers text encoders, applied.

    As sd-scripts, modules are created for every part (text encoders first, then the UNet),
    each drawing its initial weights, and the parts that do not train are dropped afterwards.
    """
    _refuse_lycoris_options(spec)
    if isinstance(text_encoders, nn.Module):
        text_encoders = [text_encoders]
    if len(text_encoders) != len(family.text_encoder_prefixes):
        raise ValueError(f"{family.name} has {len(family.text_encoder_prefixes)} text encoder(s), "
                         f"got {len(text_encoders)}")
    alpha = spec.alpha or float(spec.dim)  # 0/None: alpha = dim
    spec_alpha = _with_alpha(spec, alpha)
    te_loras: list[list[KohyaLoRAModule]] = []
    for prefix, text_encoder in zip(family.text_encoder_prefixes, text_encoders):
        if text_encoder is None:
            te_loras.append([])
            continue
        layers = _layers(text_encoder, lambda name, _block: TEXT_BLOCK_PATH.fullmatch(name) is not None)
        te_loras.append(_make(((kohya_module_name(prefix, _text_encoder_path(path)), layer)
                               for path, layer in layers), spec_alpha))
    ranks = None if spec.blocks is None else spec.blocks.ranks(
        family.sai_unet_names, spec.dim, spec.alpha if spec.network_alpha is None else spec.network_alpha,
        spec.conv_dim, spec.conv_alpha)
    rank_of = None if ranks is None else (
        lambda name, layer: _block_dim_alpha(name, layer, ranks, family.sai_unet_names))
    with_convs = spec.conv_dim is not None or (ranks is not None and ranks.conv_dims is not None)
    unet_loras = (_make(_unet_names(unet, family, spec, with_convs), spec_alpha, rank_of)
                  if unet is not None else [])
    if not spec.train_text_encoder:
        te_loras = [[] for _ in te_loras]
    if not spec.train_unet:
        unet_loras = []
    if not unet_loras and not any(te_loras):
        raise ConfigError(Problem("network.network_dim", "plain LoRA found no layers to train in this model",
                                  "check the base model and network_train_unet_only/network_train_text_encoder_only"))
    network = KohyaLoRANetwork(te_loras, unet_loras)
    network.apply_to()
    network.requires_grad_(True)
    return network


def _refuse_lycoris_options(spec: NetworkSpec) -> None:
    """networks.lora has none of LyCORIS' switches: a set one would be silently ignored, so refuse it."""
    if spec.algo != "lora":
        raise ValueError(f"plain LoRA builds algo 'lora', not {spec.algo!r} (LyCORIS algos use lycoris_lora)")
    options = {"use_tucker": spec.use_tucker, "use_scalar": spec.use_scalar, **spec.extra_args}
    set_options = [key for key, value in options.items() if value]
    if set_options:
        raise ConfigError(Problem(f"network.{set_options[0]}",
                                  "is a LyCORIS option; sd-scripts' networks.lora (algo = \"lora\") has no such "
                                  "setting", 'remove it, or use algo = "locon" (LyCORIS)'))


def _with_alpha(spec: NetworkSpec, alpha: float) -> NetworkSpec:
    from dataclasses import replace

    return replace(spec, alpha=alpha)
