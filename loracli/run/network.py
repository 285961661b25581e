"""LoRA and LyCORIS networks through lycoris_lora's kohya entry point.

Four traps of lycoris_lora 4.1.3 with diffusers models are handled here (see
stack-notes): (1) its `full` presets crash on SD UNets, so explicit presets name
kohya's targets; (2) lora and locon share one module class, so only the preset
decides whether 3x3 convs are wrapped; (3) transformers 5 dropped CLIPTextModel's
`text_model` level, so text-encoder keys are renamed to the standard
`lora_te_text_model_...` on save and back on load; (4) `merge_to` double-scales
LoHa/LoKr, so it is never used.

LyCORIS names modules after the model's own paths. kohya's names differ in two
places, both handled by one name table built from the models (`kohya_names`):
the text encoders' `text_model_` level (trap 3) and, for SDXL, the UNet, which
kohya names in the SAI/ldm layout (`lora_unet_input_blocks_4_1_...`, keymap.py).

`lycoris_preset` picks one of loracli's target tables (sdscripts/lycoris_targets.py); `dora_wd` passes
through to LyCORIS. The optimizer groups are sd-scripts' (`prepare_param_groups`): per text encoder and
UNet, per UNet block with block lr weights (plain LoRA), and LoRA+'s `lora_up` groups at lr × ratio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracli.errors import ConfigError, Problem
from loracli.family import SD1, ModelFamily
from loracli.keymap import diffusers_to_sai, kohya_module_name
from loracli.network_blocks import BlockOptions, block_index
from loracli.sdscripts.lycoris_targets import LORA_TARGETS, SAI_ROOT_NAMES, targets_for

# kohya's targets as explicit LyCORIS presets (one table, shared with the sd-scripts export)
LORA_PRESET = LORA_TARGETS


@dataclass(frozen=True)
class NetworkSpec:
    algo: str  # lora | locon | loha | lokr
    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_tucker: bool = False
    use_scalar: bool = False
    train_unet: bool = True
    train_text_encoder: bool = True
    extra_args: dict[str, object] = field(default_factory=dict)
    preset: str = "full"  # loracli's LyCORIS target table (lycoris_targets.PRESETS)
    blocks: BlockOptions | None = None  # plain LoRA: block-wise ranks and lr weights (network_blocks)
    network_alpha: float | None = None  # as given (0 = each module's dim): the default of block_alphas
    loraplus: LoraPlus | None = None


@dataclass(frozen=True)
class LoraPlus:
    """LoRA+ ratios as sd-scripts reads them: a part's own ratio, else the common one (None: off there)."""

    ratio: float | None = None
    unet_ratio: float | None = None
    text_encoder_ratio: float | None = None

    @property
    def unet(self) -> float | None:
        return self.unet_ratio or self.ratio

    @property
    def text_encoder(self) -> float | None:
        return self.text_encoder_ratio or self.ratio


def kohya_names(text_encoders: list, unet, family: ModelFamily) -> dict[str, str]:
    """LyCORIS' module name → kohya's, for every module of the models (identity where they agree)."""
    names: dict[str, str] = {}
    lpb = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    up_attention = frozenset(i for i, t in enumerate(getattr(getattr(unet, "config", None), "up_block_types", ()))
                             if "CrossAttn" in t)
    for path, _ in unet.named_modules():
        if path:
            kohya = (SAI_ROOT_NAMES.get(path) or diffusers_to_sai(path, lpb, up_attention)
                     if family.sai_unet_names else path)
            names[kohya_module_name("lora_unet", path)] = kohya_module_name("lora_unet", kohya)
    for prefix, te in zip(family.text_encoder_prefixes, text_encoders):
        if te is None:
            continue
        for path, _ in te.named_modules():
            if path:
                standard = path if path.startswith("text_model.") else f"text_model.{path}"
                names[kohya_module_name(prefix, path)] = kohya_module_name(prefix, standard)
    return names


def create_network(spec: NetworkSpec, text_encoders, unet, family: ModelFamily = SD1):
    """Build the network, wrap the base model's layers (UNet and each text encoder) with it, and return it.

    Plain LoRA is sd-scripts' networks.lora (loracli.run.kohya_lora: a separate branch, exact under
    fp16/bf16); the LyCORIS algorithms go through lycoris_lora, as sd-scripts runs them."""
    if spec.algo == "lora":
        from loracli.run.kohya_lora import create_kohya_lora

        encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        kohya = create_kohya_lora(spec, encoders, unet, family)
        remember_training_options(kohya, spec, family)
        return kohya
    if spec.blocks is not None:
        raise ConfigError(Problem("network.block_dims", f"block-wise ranks and lr weights are sd-scripts' "
                                  f"networks.lora options; algo {spec.algo!r} (LyCORIS) has none",
                                  'use algo = "lora", or remove the block options'))
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya, create_network as lycoris_create
    from lycoris.logging import logger as lycoris_logger

    lycoris_logger.setLevel(logging.WARNING)  # its per-module INFO lines drown the progress bar

    alpha = spec.alpha or float(spec.dim)
    conv_dim = spec.conv_dim or spec.dim
    conv_alpha = spec.conv_alpha if spec.conv_alpha is not None else alpha
    # class-level state in lycoris: set before every create; the table is the family's (lycoris_targets)
    PRESET["loracli"] = targets_for(spec.algo, spec.preset, family)
    kwargs = dict(
        algo=spec.algo, preset="loracli", conv_dim=conv_dim, conv_alpha=conv_alpha,
        dropout=spec.dropout or 0.0, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout,
        use_tucker=spec.use_tucker, use_scalar=spec.use_scalar, **spec.extra_args,
    )
    text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    # lycoris names a single encoder lora_te_, several lora_te1_, lora_te2_ (kohya's prefixes)
    text_encoder = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    network = lycoris_create(1.0, spec.dim, alpha, None, text_encoder, unet, warn_on_unmatched=False, **kwargs)
    network.apply_to(text_encoder, unet, apply_text_encoder=spec.train_text_encoder, apply_unet=spec.train_unet)
    if not network.unet_loras and not network.text_encoder_loras:
        raise ConfigError(Problem("network.algo", f"{spec.algo} found no layers to train in this model"))
    network.requires_grad_(True)
    assert isinstance(network, LycorisNetworkKohya)
    remember_names(network, kohya_names(text_encoders, unet, family))
    remember_training_options(network, spec, family)
    return network


def count_modules(network) -> tuple[int, int]:
    return len(network.unet_loras), len(network.text_encoder_loras)


def prepare_param_groups(network, text_encoder_lr: float | list[float] | None, unet_lr: float | None,
                         learning_rate: float) -> list[dict]:
    """sd-scripts' groups: text encoder first, then UNet; a group whose lr is 0 is dropped.

    `text_encoder_lr` with two different values (SDXL) gives each encoder its own group, in order.
    With block lr weights (plain LoRA) the UNet has one group per block, its lr the UNet lr times the block's
    weight, in the order the blocks' first modules come. With LoRA+ each part splits into its other weights and
    a " plus" group of its up (B) matrices at lr × ratio (sd-scripts' prepare_optimizer_params).
    """
    plus: LoraPlus = getattr(network, "_loracli_loraplus", None) or LoraPlus()
    te_lrs = text_encoder_lr if isinstance(text_encoder_lr, list) else [text_encoder_lr]
    te_lrs = [learning_rate if lr is None else lr for lr in te_lrs]
    if len(set(te_lrs)) > 1:
        te_parts = [(f"textencoder{i + 1}", [lo for lo in network.text_encoder_loras
                                             if lo.lora_name.startswith(f"lora_te{i + 1}_")], lr)
                    for i, lr in enumerate(te_lrs)]
    else:
        te_parts = [("textencoder", network.text_encoder_loras, te_lrs[0])]
    groups = []
    for name, loras, lr in te_parts:
        groups += _assemble(name, loras, lr, plus.text_encoder)
    unet_base = learning_rate if unet_lr is None else unet_lr
    block_lr: tuple[list[float], bool] | None = getattr(network, "_loracli_block_lr", None)
    if block_lr is not None:
        weights, is_sdxl = block_lr
        by_block: dict[int, list] = {}
        for lora in network.unet_loras:
            by_block.setdefault(block_index(lora.lora_name, is_sdxl), []).append(lora)
        for index, loras in by_block.items():
            groups += _assemble(f"unet_block{index}", loras, unet_base * weights[index], plus.unet)
    else:
        groups += _assemble("unet", network.unet_loras, unet_base, plus.unet)
    if not groups:
        raise ConfigError(Problem("optimizer.learning_rate", "every parameter group has lr 0: nothing to train",
                                  "set unet_lr or text_encoder_lr above 0"))
    return groups


def _assemble(name: str, loras: list, lr: float, plus_ratio: float | None) -> list[dict]:
    """One part's groups: its weights at lr; with LoRA+ its `lora_up` weights apart, at lr × ratio."""
    base, up = [], []
    for lora in loras:
        for param_name, param in lora.named_parameters():
            if param.requires_grad:
                (up if plus_ratio is not None and "lora_up" in param_name else base).append(param)
    out = []
    for suffix, params, group_lr in (("", base, lr), (" plus", up, lr * (plus_ratio or 1.0))):
        if params and group_lr != 0:
            out.append({"params": params, "lr": group_lr, "name": name + suffix})
    return out


def remember_training_options(network, spec: NetworkSpec, family: ModelFamily) -> None:
    """What prepare_param_groups needs besides the modules (sd-scripts keeps them on the network too)."""
    object.__setattr__(network, "_loracli_loraplus", spec.loraplus)
    weights = spec.blocks.weights(family.sai_unet_names) if spec.blocks is not None else None
    block_lr = (weights, family.sai_unet_names) if weights is not None else None
    object.__setattr__(network, "_loracli_block_lr", block_lr)


def to_kohya_state_dict(network) -> dict[str, torch.Tensor]:
    """The network's tensors under the key names every client loads."""
    names = getattr(network, "_loracli_names", {})
    return {_rename(k, names): v.detach() for k, v in network.state_dict().items()}


def from_kohya_state_dict(sd: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A kohya-named file's tensors under LyCORIS' names for these models (`kohya_names`)."""
    back = {kohya: own for own, kohya in names.items()}
    return {_rename(k, back): v for k, v in sd.items()}


def _rename(key: str, names: dict[str, str]) -> str:
    module, _, rest = key.partition(".")
    return f"{names.get(module, module)}.{rest}" if rest else names.get(module, module)


def load_network_weights(network, path: Path) -> tuple[int, int]:
    """Continue from a LoRA file (network_weights): returns matched (unet, text encoder) modules.

    Fails when the file has modules of a part but none of them match this network
    (trap 3: a silent zero-match would train from scratch while claiming to resume).
    """
    from safetensors.torch import load_file

    from loracli.run.kohya_lora import KohyaLoRANetwork

    if isinstance(network, KohyaLoRANetwork):  # sd-scripts' LoRA module: already kohya-named
        try:
            weights = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ConfigError(Problem(f"network.network_weights: {path}", f"not a readable LoRA file ({exc})")) \
                from None
        return network.load_weights(weights, f"network.network_weights: {path}")
    try:
        weights = from_kohya_state_dict(load_file(str(path)), getattr(network, "_loracli_names", {}))
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(Problem(f"network.network_weights: {path}", f"not a readable LoRA file ({exc})")) from None
    own = network.state_dict()
    matched = {k: v for k, v in weights.items() if k in own}
    mismatched = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ConfigError(Problem(f"network.network_weights: {path}",
                                  f"{len(mismatched)} tensor(s) have other shapes, e.g. {mismatched[0]}",
                                  "use the same algo, network_dim and conv_dim as the file"))
    network.load_state_dict(matched, strict=False)
    modules = {k.split(".")[0] for k in matched}
    unet = sum(1 for m in modules if m.startswith("lora_unet"))
    text = sum(1 for m in modules if m.startswith("lora_te"))
    in_file = {k.split(".")[0] for k in weights}
    for part, prefix, count, trained in (("UNet", "lora_unet", unet, network.unet_loras),
                                         ("text encoder", "lora_te", text, network.text_encoder_loras)):
        if trained and count == 0 and any(m.startswith(prefix) for m in in_file):
            raise ConfigError(Problem(f"network.network_weights: {path}",
                                      f"none of the file's {part} modules match this network",
                                      "check network.algo and the base model"))
    return unet, text


def remember_names(network, names: dict[str, str]) -> None:
    """Key renaming depends on the models' module layout; keep the table with the network."""
    object.__setattr__(network, "_loracli_names", names)
