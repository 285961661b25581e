"""A kohya-format LoRA/LyCORIS file, module by module, and each module's weight delta.

The delta (what a module adds to its base weight at strength 1) comes from
lycoris_lora's own functional weight builders, called once with the module's
scale: lycoris' `merge_to`/`get_diff_weight` multiply LoHa/LoKr by alpha/dim a
second time (stack notes), so they are never used here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loracli.errors import DatasetError, Problem
from loracli.lorafile import split_key
from loracli.safetensors_header import read_header

LORA_PARTS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
SHARED = {"alpha"}
# SD UNet 3x3 convs by kohya name (diffusers and SAI layouts): LoHa/LoKr store them flattened
CONV3_NAME = re.compile(r"_(conv1|conv2|conv|conv_in|conv_out|op|in_layers_2|out_layers_3)$")
# lycoris' plain torch bodies: its fused/compiled tiers cost a warm-up per shape for one product each
BACKEND = "torch"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
UNSUPPORTED = {"dora_scale": "DoRA (weight decomposition)", "oft_blocks": "OFT", "oft_R": "BOFT",
               "on_input": "IA3", "a1.weight": "GLoRA", "b1.weight": "GLoRA", "diff": "LyCORIS full",
               "scalar": "LyCORIS use_scalar", "lora_A.weight": "PEFT/diffusers-format LoRA",
               "lora_B.weight": "PEFT/diffusers-format LoRA"}


@dataclass
class LoraModule:
    name: str  # kohya module name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    algo: str  # lora | loha | lokr
    keys: dict[str, str]  # part (lora_down.weight, hada_w1_a, alpha, ...) -> tensor key in the file

    @property
    def is_sdxl_name(self) -> bool:
        return self.name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                                     "lora_unet_output_blocks_"))


class LoraFile:
    """A kohya-format LoRA file opened lazily (safe_open): tensors are read when a module needs them."""

    def __init__(self, path: Path, where: str | None = None):
        self.path = Path(path)
        self.where = where or str(path)
        header = read_header(self.path)  # one-line DatasetError for missing/broken files
        self.metadata: dict[str, str] = dict(header.metadata)
        self.shapes = {k: e.shape for k, e in header.tensors.items()}
        self.modules = self._group(list(header.tensors))
        from safetensors import safe_open

        self._file = safe_open(str(self.path), framework="pt", device="cpu")

    def _group(self, keys: list[str]) -> dict[str, LoraModule]:
        grouped: dict[str, dict[str, str]] = {}
        for key in keys:
            module, part = split_key(key)
            if part in UNSUPPORTED:
                raise DatasetError(Problem(self.where, f"{UNSUPPORTED[part]} modules ({key}) are not supported",
                                           "resize/merge/extract read kohya-format LoRA, LoCon, LoHa and LoKr"))
            grouped.setdefault(module, {})[part] = key
        if not grouped or not any(m.startswith(KOHYA_PREFIXES) for m in grouped):
            first = keys[0] if keys else "no tensors"
            raise DatasetError(Problem(self.where, f"not a kohya-format LoRA file (first key: {first})",
                                       "give a LoRA/LyCORIS .safetensors with lora_unet_/lora_te_ keys"))
        modules = {}
        for name, parts in grouped.items():
            names = set(parts) - SHARED
            if names and names <= LORA_PARTS and {"lora_down.weight", "lora_up.weight"} <= names:
                algo = "lora"
            elif names and names <= LOHA_PARTS and {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names:
                algo = "loha"
            elif names and names <= LOKR_PARTS and ({"lokr_w1"} & names or {"lokr_w1_a", "lokr_w1_b"} <= names) \
                    and ({"lokr_w2"} & names or {"lokr_w2_a", "lokr_w2_b"} <= names):
                algo = "lokr"
            else:
                raise DatasetError(Problem(self.where, f"module {name} has an unknown or incomplete set of tensors "
                                           f"({', '.join(sorted(parts))})", "the file is damaged or of an "
                                           "unsupported algorithm"))
            if not name.startswith(KOHYA_PREFIXES):
                raise DatasetError(Problem(self.where, f"module {name} has no kohya prefix (lora_unet_, lora_te_, "
                                           "lora_te1_, lora_te2_)", "only kohya-format files are supported"))
            modules[name] = LoraModule(name, algo, parts)
        return modules

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def alpha(self, module: LoraModule) -> float | None:
        key = module.keys.get("alpha")
        return float(self.tensor(key).float().item()) if key else None

    def rank(self, module: LoraModule) -> int:
        shapes = {part: self.shapes[key] for part, key in module.keys.items()}
        if module.algo == "lora":
            return shapes["lora_down.weight"][0]
        if module.algo == "loha":
            return shapes["hada_w1_b"][0]
        for part in ("lokr_w1_a", "lokr_w2_a"):
            if part in shapes:
                return shapes[part][1]
        return 0  # both Kronecker factors full: no rank

    @property
    def algos(self) -> set[str]:
        return {m.algo for m in self.modules.values()}

    @property
    def is_sdxl(self) -> bool:
        return any(m.is_sdxl_name for m in self.modules.values())

    def close(self) -> None:
        self._file = None  # safe_open has no close(); dropping it releases the mapping


def lora_scale(alpha: float | None, rank: int) -> float:
    """kohya's scale: alpha/rank, 1 when the file stores no alpha (or alpha 0, as lycoris reads it)."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


def module_delta(lora: LoraFile, module: LoraModule, device: str | torch.device = "cpu") -> torch.Tensor:
    """ΔW of one module at strength 1, in float32, shaped like the module's own weight
    (2-D for Linear, 4-D for convs; 1×1 convs come back 4-D as stored)."""
    def get(part: str) -> torch.Tensor | None:
        key = module.keys.get(part)
        return None if key is None else lora.tensor(key).to(device=device, dtype=torch.float32)

    alpha = lora.alpha(module)
    with torch.no_grad():
        if module.algo == "lora" and "lora_mid.weight" not in module.keys:
            # plain LoRA/LoCon: up·down needs no library (and lycoris takes seconds to import)
            down, up = get("lora_down.weight"), get("lora_up.weight")
            product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            return product.reshape(up.shape[0], *down.shape[1:]) * lora_scale(alpha, down.shape[0])
        from lycoris.functional import locon, loha, lokr

        if module.algo == "lora":
            down, up, mid = get("lora_down.weight"), get("lora_up.weight"), get("lora_mid.weight")
            return locon.diff_weight(down, up, mid, gamma=lora_scale(alpha, down.shape[0]), backend=BACKEND)
        if module.algo == "loha":
            w1d, w1u, w2d, w2u = get("hada_w1_b"), get("hada_w1_a"), get("hada_w2_b"), get("hada_w2_a")
            gamma = lora_scale(alpha, w1d.shape[0])
            return _unflatten(module.name, loha.diff_weight(w1d, w1u, w2d, w2u, get("hada_t1"), get("hada_t2"),
                                                            gamma=gamma, backend=BACKEND))
        # LoKr: lycoris divides gamma by the rank itself (1 when both factors are full matrices)
        w1, w1a, w1b = get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b")
        w2, w2a, w2b, t2 = get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2")
        rank = lora.rank(module)
        if rank == 0 or alpha is None or alpha == 0:
            gamma = float(rank or 1)  # scale 1
        else:
            gamma = alpha
        return _unflatten(module.name, lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, t2, gamma=gamma,
                                                        backend=BACKEND))


def _unflatten(name: str, delta: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv's delta that LyCORIS built flattened (out, in·9) as (out, in, 3, 3)."""
    if delta.dim() == 2 and CONV3_NAME.search(name) and delta.shape[1] % 9 == 0:
        return delta.reshape(delta.shape[0], delta.shape[1] // 9, 3, 3)
    return delta


def open_lora(path: Path, option: str = "") -> LoraFile:
    """A LoRA file, or a one-line error (exit 3) naming it."""
    where = f"{option} {path}".strip()
    path = Path(path)
    if path.is_dir():
        raise DatasetError(Problem(where, "is a folder, not a LoRA file", "give a .safetensors LoRA file"))
    if path.exists() and path.suffix.lower() != ".safetensors":
        raise DatasetError(Problem(where, f"a {path.suffix or 'suffix-less'} file; only .safetensors LoRAs are read",
                                   "convert pickled .pt/.ckpt LoRAs to .safetensors first"))
    return LoraFile(path, where)
