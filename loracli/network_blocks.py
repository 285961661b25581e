"""Block-wise LoRA as sd-scripts' networks.lora computes it (torch-free: the plan and the run share it).

sd-scripts numbers the UNet's blocks for per-block lr weights and ranks:
- SD1.x/2.x, 25 blocks = down_lr_weight's 12, mid's 1, up's 12: down_blocks.i.{resnets,attentions}.j is block
  1 + 3i + j, the downsampler of level i 1 + 3i + 2 (block 0, down_lr_weight[0], has no modules: conv_in),
  the middle block 12, up_blocks.i.* 13 + 3i + j (upsampler 13 + 3i + 2).
- SDXL, 23 blocks: 0 (time/label embeddings), 1-9 input_blocks.0-8, 10-12 middle_block.0-2,
  13-21 output_blocks.0-8, 22 (out).
`down_lr_weight`/`up_lr_weight` give 12 (SDXL: 9) weights, `mid_lr_weight` 1 (SDXL: 3); SDXL's first and last
blocks keep weight 1. Shorter lists are filled with 1, longer ones cut (sd-scripts warns; the plan does too).
A block whose weight is at or below `block_lr_zero_threshold` becomes 0 and gets no modules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SD_DOWN_UP = 12  # LoRANetwork.NUM_OF_BLOCKS
SD_MID = 1
SDXL_DOWN_UP = 9
SDXL_MID = 3
SHAPES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_SHAPE = re.compile(r"([a-z_]+)(?:\+(.+))?")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def down_up_len(is_sdxl: bool) -> int:
    return SDXL_DOWN_UP if is_sdxl else SD_DOWN_UP


def mid_len(is_sdxl: bool) -> int:
    return SDXL_MID if is_sdxl else SD_MID


def num_blocks(is_sdxl: bool) -> int:
    """Entries of block_dims/block_alphas: 25 (SD1/SD2) or 23 (SDXL: + the embeddings and the output)."""
    return 2 * SDXL_DOWN_UP + SDXL_MID + 2 if is_sdxl else 2 * SD_DOWN_UP + SD_MID


def parse_shape(text: str) -> tuple[str, float]:
    """'sine+0.5' → ('sine', 0.5); ValueError naming the shapes for anything else."""
    m = _SHAPE.fullmatch(text.strip())
    if not m or m[1] not in SHAPES:
        raise ValueError(f"{text!r} is not a list of numbers or one of {', '.join(SHAPES)} (optionally +number, "
                         "e.g. \"sine+0.5\")")
    try:
        base = float(m[2]) if m[2] is not None else 0.0
    except ValueError:
        raise ValueError(f"{text!r}: the part after + must be a number") from None
    if not math.isfinite(base):
        raise ValueError(f"{text!r}: the part after + must be a finite number")
    return m[1], base


def shape_weights(text: str, n: int) -> list[float]:
    """sd-scripts' named lr-weight shapes over n blocks, plus the optional base."""
    name, base = parse_shape(text)
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    return [0.0 + base] * n  # zeros


def _fit(values: list[float], n: int) -> list[float]:
    """Cut to n, or fill with 1.0 up to n (sd-scripts' warnings say the same)."""
    return list(values[:n]) + [1.0] * (n - len(values))


def lr_weights(is_sdxl: bool, down: list[float] | str | None, mid: list[float] | None,
               up: list[float] | str | None, zero_threshold: float = 0.0) -> list[float] | None:
    """The lr weight of every block (num_blocks entries), or None when no *_lr_weight is set."""
    if down is None and mid is None and up is None:
        return None
    n, m = down_up_len(is_sdxl), mid_len(is_sdxl)

    def given(values: list[float] | str | None, length: int) -> list[float]:
        if values is None:
            return [1.0] * length  # a part not given keeps weight 1 (the threshold does not apply to it)
        listed = shape_weights(values, length) if isinstance(values, str) else values
        return [w if w > zero_threshold else 0 for w in _fit(listed, length)]

    weights = given(down, n) + given(mid, m) + given(up, n)
    return [1.0, *weights, 1.0] if is_sdxl else weights


@dataclass(frozen=True)
class BlockRanks:
    """Per-block rank and alpha of the UNet's modules (conv_*: the 3x3 convs; None: they get no modules)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None


def block_ranks(is_sdxl: bool, dim: int, alpha: float, conv_dim: int | None, conv_alpha: float | None,
                block_dims: list[int] | None, block_alphas: list[float] | None,
                conv_block_dims: list[int] | None, conv_block_alphas: list[float] | None,
                weights: list[float] | None) -> BlockRanks | None:
    """sd-scripts' per-block ranks: used when block_dims or an lr weight is set (else None: one rank for all).

    Unset lists repeat network_dim/alpha (conv: conv_dim/conv_alpha when conv_dim is set, conv_alpha 1 when
    not given); a block whose lr weight is 0 gets rank 0 (no module), in both lists."""
    if block_dims is None and weights is None:
        return None
    n = num_blocks(is_sdxl)
    dims = list(block_dims) if block_dims is not None else [dim] * n
    alphas = list(block_alphas) if block_alphas is not None else [alpha] * n
    conv_alpha_default = 1.0 if conv_alpha is None else conv_alpha
    if conv_block_dims is not None:
        conv_dims: list[int] | None = list(conv_block_dims)
        conv_alphas: list[float] | None = (list(conv_block_alphas) if conv_block_alphas is not None
                                           else [conv_alpha_default] * n)
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha_default] * n
    else:
        conv_dims = conv_alphas = None
    for i, w in enumerate(weights or []):
        if w == 0:
            dims[i] = 0
            if conv_dims is not None:
                conv_dims[i] = 0
    return BlockRanks(dims, alphas, conv_dims, conv_alphas)


def block_index(lora_name: str, is_sdxl: bool) -> int:
    """sd-scripts' block number of a UNet LoRA module name (-1: none; sd-scripts then reads the last entry)."""
    if not is_sdxl:
        m = _UPDOWN.search(lora_name)
        if m:
            i, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else SD_DOWN_UP + 1 + idx
        return SD_DOWN_UP if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for start, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return base + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def block_label(index: int, is_sdxl: bool) -> str:
    """A block number as the lr-weight entry that scales it: down3 = down_lr_weight[3], mid, up0, ..."""
    if is_sdxl:
        if index == 0:
            return "embeddings"
        if index == 22:
            return "out"
        for base, count, part in ((1, SDXL_DOWN_UP, "down"), (10, SDXL_MID, "mid"), (13, SDXL_DOWN_UP, "up")):
            if base <= index < base + count:
                return f"{part}{index - base}"
        return f"block{index}"
    if 0 <= index < SD_DOWN_UP:
        return f"down{index}"
    if index == SD_DOWN_UP:
        return "mid"
    if SD_DOWN_UP < index <= 2 * SD_DOWN_UP:
        return f"up{index - SD_DOWN_UP - 1}"
    return f"block{index}"


def format_number(value: float) -> str:
    """A number as a network_args string: short, and read back to the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def format_list(values: list[float] | list[int]) -> str:
    return ",".join(str(v) if isinstance(v, int) else format_number(v) for v in values)


def lr_weight_arg(value: list[float] | str) -> str:
    """down/up_lr_weight as sd-scripts parses it: a list needs a comma (one value: filled with 1 anyway)."""
    if isinstance(value, str):
        return value
    text = format_list(value)
    return text if "," in text else f"{text},1"


def parse_lr_weight_arg(text: str) -> list[float] | str:
    """The inverse: 'a,b,...' → floats (an empty item is 0, as sd-scripts); no comma → a shape name."""
    if "," not in text:
        return text.strip()
    return [float(s) if s.strip() else 0.0 for s in text.split(",")]


BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas")


@dataclass(frozen=True)
class BlockOptions:
    """The [network] block options as given (the family decides how many blocks there are)."""

    down_lr_weight: list[float] | str | None = None
    mid_lr_weight: list[float] | None = None
    up_lr_weight: list[float] | str | None = None
    block_lr_zero_threshold: float = 0.0
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None

    @classmethod
    def of(cls, network: object) -> BlockOptions | None:
        """From a NetworkSection; None when no block option is set."""
        values = {key: getattr(network, key) for key in BLOCK_KEYS}
        options = cls(**values)
        return options if options.is_set() else None

    def is_set(self) -> bool:
        return any(getattr(self, key) is not None for key in BLOCK_KEYS if key != "block_lr_zero_threshold")

    def weights(self, is_sdxl: bool) -> list[float] | None:
        return lr_weights(is_sdxl, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight,
                          self.block_lr_zero_threshold)

    def ranks(self, is_sdxl: bool, dim: int, alpha: float, conv_dim: int | None,
              conv_alpha: float | None) -> BlockRanks | None:
        return block_ranks(is_sdxl, dim, alpha, conv_dim, conv_alpha, self.block_dims, self.block_alphas,
                           self.conv_block_dims, self.conv_block_alphas, self.weights(is_sdxl))


def extra_network_args(network: object) -> dict[str, str]:
    """The network_args strings of the block, LoRA+ and DoRA options, as a user of sd-scripts types them
    (ss_network_args records them so; the export writes them so)."""
    args: dict[str, str] = {}
    for key in ("down_lr_weight", "up_lr_weight"):
        value = getattr(network, key)
        if value is not None:
            args[key] = lr_weight_arg(value)
    if getattr(network, "mid_lr_weight") is not None:
        args["mid_lr_weight"] = format_list(getattr(network, "mid_lr_weight"))
    if getattr(network, "block_lr_zero_threshold"):
        args["block_lr_zero_threshold"] = format_number(getattr(network, "block_lr_zero_threshold"))
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(network, key)
        if value is not None:
            args[key] = format_list(value)
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(network, key)
        if value is not None:
            args[key] = format_number(value)
    if getattr(network, "dora_wd"):
        args["dora_wd"] = "True"
    return args


LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def parse_network_item(key: str, text: str) -> object:
    """A network_args value as sd-scripts' networks.lora reads it, typed for loracli's schema."""
    if key in ("down_lr_weight", "up_lr_weight"):
        return parse_lr_weight_arg(text)
    if key == "mid_lr_weight":  # always split at commas
        return [float(s) if s.strip() else 0.0 for s in text.split(",")]
    if key in ("block_dims", "conv_block_dims"):
        return [int(s) for s in text.split(",")]
    if key in ("block_alphas", "conv_block_alphas"):
        return [float(s) for s in text.split(",")]
    if key in ("block_lr_zero_threshold", *LORAPLUS_KEYS):
        return float(text)
    return text
