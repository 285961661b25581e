"""Plan-time rules of the network options from the guides: block-wise LoRA, LoRA+, DoRA, LyCORIS presets.

E50-E57 refuse what sd-scripts refuses (or would silently ignore: an accepted option must do something);
W50 warns where sd-scripts warns. The block counts depend on the family (network_blocks).
"""

from __future__ import annotations

from loracli.config.schema import LoracliConfig
from loracli.family import ModelFamily
from loracli.lint import TRAINING_GUIDE, Finding
from loracli.network_blocks import down_up_len, mid_len, num_blocks
from loracli.sdscripts.lycoris_targets import targets_for

SD_LORA = "sd-scripts networks/lora.py"
LYCORIS = "LyCORIS lycoris/kohya.py"
BLOCK_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def network_findings(config: LoracliConfig, family: ModelFamily) -> list[Finding]:
    net = config.network
    out: list[Finding] = []
    block_keys = [k for k in (*LR_WEIGHTS, *BLOCK_LISTS) if getattr(net, k) is not None]
    if net.block_lr_zero_threshold and not any(getattr(net, k) is not None for k in LR_WEIGHTS):
        block_keys.append("block_lr_zero_threshold")
    # E50: block-wise ranks and lr weights exist only in networks.lora.
    if net.algo != "lora" and block_keys:
        out.append(Finding("error", "E50", f"network.{block_keys[0]}",
                           f"is an option of sd-scripts' networks.lora (plain LoRA), but network.algo is "
                           f"{net.algo!r} (LyCORIS has no block-wise ranks or lr weights)",
                           'use network.algo = "lora", or remove the block options', SD_LORA))
    # E51: sd-scripts runs DoRA through LyCORIS only.
    if net.dora_wd and net.algo == "lora":
        out.append(Finding("error", "E51", "network.dora_wd",
                           'DoRA is a LyCORIS option; network.algo = "lora" (sd-scripts\' networks.lora) has no '
                           "weight decomposition", 'set network.algo = "locon" (the LoRA Training Guide\'s DoRA '
                           "runs LyCORIS' LoCon with dora_wd)", f"{TRAINING_GUIDE}; {LYCORIS}"))
    # E57: LyCORIS' DoRA LoCon drops network_dropout (it warns; the guide says so too).
    if net.dora_wd and net.algo == "locon" and net.network_dropout:
        out.append(Finding("error", "E57", "network.network_dropout",
                           "LyCORIS ignores network_dropout with network.dora_wd = true (only rank_dropout and "
                           "module_dropout apply)", "remove network_dropout, or use rank_dropout/module_dropout",
                           f"{TRAINING_GUIDE}; LyCORIS lycoris/modules/locon.py"))
    # E52: LoRA+ scales the parameters named lora_up; LoHa and LoKr have none, so it would change nothing.
    plus = [k for k in LORAPLUS if getattr(net, k) is not None]
    if plus and net.algo in ("loha", "lokr"):
        out.append(Finding("error", "E52", f"network.{plus[0]}",
                           f"LoRA+ multiplies the lr of the up (lora_up) matrices; network.algo {net.algo!r} has "
                           "none, so LyCORIS would train exactly as without it",
                           'use network.algo = "lora" or "locon", or remove the LoRA+ ratio', LYCORIS))
    if net.algo == "lora":
        out += _block_findings(config, family)
    # E55: presets choose LyCORIS targets; networks.lora has its own fixed ones.
    if net.lycoris_preset != "full" and net.algo == "lora":
        out.append(Finding("error", "E55", "network.lycoris_preset",
                           f"{net.lycoris_preset!r} selects LyCORIS targets, but network.algo = \"lora\" is "
                           "sd-scripts' networks.lora, which has no presets",
                           'use network.algo = "locon" (LoRA on the same layers, via LyCORIS), or '
                           'lycoris_preset = "full"', LYCORIS))
    # E56: a preset without 3x3 convs ignores conv_dim/conv_alpha (LyCORIS sets conv_dim to 0).
    if net.algo != "lora" and not targets_for(net.algo, net.lycoris_preset, family)["enable_conv"]:
        for key in ("conv_dim", "conv_alpha"):
            if getattr(net, key) is not None:
                out.append(Finding("error", "E56", f"network.{key}",
                                   f"lycoris_preset {net.lycoris_preset!r} wraps no 3x3 convs, so {key} would "
                                   "change nothing", f"remove network.{key}, or use a preset with convs "
                                   "(full, unet-convblock-only)", LYCORIS))
    return out


def _block_findings(config: LoracliConfig, family: ModelFamily) -> list[Finding]:
    net = config.network
    is_sdxl = family.sai_unet_names
    out: list[Finding] = []
    # E53: sd-scripts asserts these lengths.
    blocks = num_blocks(is_sdxl)
    for key in BLOCK_LISTS:
        value = getattr(net, key)
        if value is not None and len(value) != blocks:
            out.append(Finding("error", "E53", f"network.{key}",
                               f"has {len(value)} values; {family.title} has {blocks} UNet blocks",
                               f"give exactly {blocks} values (README, 'Block-wise LoRA')", SD_LORA))
    # E54: without block_dims or an lr weight, sd-scripts never reads these (and conv_block_alphas needs its dims).
    per_block = net.block_dims is not None or any(getattr(net, k) is not None for k in LR_WEIGHTS)
    for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
        if getattr(net, key) is not None and not per_block:
            out.append(Finding("error", "E54", f"network.{key}",
                               "is only read with network.block_dims or a *_lr_weight (sd-scripts ignores it "
                               "otherwise)", "also set network.block_dims, or remove it", SD_LORA))
    if net.conv_block_alphas is not None and net.conv_block_dims is None and per_block:
        out.append(Finding("error", "E54", "network.conv_block_alphas",
                           "is only read with network.conv_block_dims (sd-scripts ignores it otherwise)",
                           "also set network.conv_block_dims, or remove it", SD_LORA))
    if net.block_lr_zero_threshold and not any(getattr(net, k) is not None for k in LR_WEIGHTS):
        out.append(Finding("error", "E54", "network.block_lr_zero_threshold",
                           "is only read with down_lr_weight, mid_lr_weight or up_lr_weight",
                           "set an lr weight, or remove it", SD_LORA))
    # W50: sd-scripts cuts longer lr-weight lists (and warns).
    for key, limit in (("down_lr_weight", down_up_len(is_sdxl)), ("mid_lr_weight", mid_len(is_sdxl)),
                       ("up_lr_weight", down_up_len(is_sdxl))):
        value = getattr(net, key)
        if isinstance(value, list) and len(value) > limit:
            out.append(Finding("warning", "W50", f"network.{key}",
                               f"has {len(value)} values; {family.title} has {limit}: the rest are ignored",
                               f"give at most {limit} values (missing ones are 1)", SD_LORA))
    return out
