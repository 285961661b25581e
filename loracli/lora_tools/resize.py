"""`loracli resize`: lower the rank of a LoRA/LoCon file, sd-scripts' networks/resize_lora.py way.

Each module's up·down product is decomposed by SVD and cut to the new rank (a
fixed one, or one chosen per module by sv_ratio / sv_cumulative / sv_fro). The
new alpha is the old alpha/rank times the new rank, so every module keeps its
strength: only the discarded singular directions are lost.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loracli.errors import ConfigError, Problem
from loracli.lora_tools.loras import LoraFile, lora_scale, module_delta, open_lora
from loracli.lora_tools.lowrank import METHODS, choose_rank, factorise, product_svd, svd
from loracli.lora_tools.output import check_output, progress, resolve_device, save_dtype


@dataclass
class ModuleResize:
    name: str
    conv: bool  # a 3x3 conv (takes --conv-dim)
    old_rank: int
    new_rank: int
    new_alpha: float
    fro_retained: float  # ||kept||_F / ||ΔW||_F


@dataclass
class ResizeReport:
    input: str
    output: str
    method: str | None
    param: float | None
    old_dim: int
    modules: list[ModuleResize] = field(default_factory=list)

    @property
    def mean_fro(self) -> float:
        values = [m.fro_retained for m in self.modules]
        return sum(values) / len(values) if values else 1.0

    def to_json(self) -> str:
        data = asdict(self)
        data["mean_fro_retained"] = self.mean_fro
        return json.dumps(data, indent=2)


@dataclass(frozen=True)
class ResizeRequest:
    dim: int | None = None
    conv_dim: int | None = None
    method: str | None = None
    param: float | None = None
    save_precision: str | None = None
    device: str | None = None
    base: Path | None = None  # the checkpoint fro_ckpt measures against


# Checkpoint-aware: keep the singular values of scale·up·down above 10^P × ||W_base||_F (the
# "fro_ckpt" score of the resize_lora tool the "LoRA Training Guide" recipe uses; P = -3.55 there).
BASE_METHODS = ("fro_ckpt",)


def _is_conv3(lora: LoraFile, name: str) -> bool:
    shape = lora.shapes[lora.modules[name].keys["lora_down.weight"]]
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def validate_request(request: ResizeRequest) -> None:
    if request.base is not None and request.method not in BASE_METHODS:
        raise ConfigError(Problem("--base", "--base is read by --method fro_ckpt only",
                                  "add --method fro_ckpt --param -3.5 (a log10 threshold), or drop --base"))
    if request.method in BASE_METHODS:
        if request.base is None:
            raise ConfigError(Problem("--method", f"{request.method} measures each module against the base model",
                                      "add --base MODEL (the checkpoint the LoRA is used with)"))
        if request.param is None:
            raise ConfigError(Problem("--param", f"--method {request.method} needs --param (a log10 threshold)",
                                      "e.g. --param -3.55, the \"LoRA Training Guide\" recipe"))
    elif request.method is None:
        if request.param is not None:
            raise ConfigError(Problem("--param", "--param needs --method", f"add --method ({' | '.join(METHODS)})"))
        if request.dim is None:
            raise ConfigError(Problem("--dim", "give the new rank (--dim N) or a dynamic method (--method, --param)",
                                      "e.g. --dim 8, or --method sv_fro --param 0.9"))
    else:
        if request.method not in METHODS:
            raise ConfigError(Problem("--method", f"unknown method {request.method!r}",
                                      f"use {', '.join(METHODS + BASE_METHODS)}"))
        if request.param is None:
            raise ConfigError(Problem("--param", f"--method {request.method} needs --param",
                                      "e.g. --param 0.9 for sv_fro/sv_cumulative, --param 8 for sv_ratio"))
        if request.method == "sv_ratio" and request.param < 1:
            raise ConfigError(Problem("--param", f"sv_ratio keeps values above S[0]/P; P = {request.param:g} is < 1",
                                      "use a ratio of 1 or more, e.g. --param 8"))
        if request.method != "sv_ratio" and not 0 < request.param <= 1:
            raise ConfigError(Problem("--param", f"{request.method} takes a share in (0, 1], got {request.param:g}",
                                      "e.g. --param 0.9"))
    for option, value in (("--dim", request.dim), ("--conv-dim", request.conv_dim)):
        if value is not None and value < 1:
            raise ConfigError(Problem(option, f"must be at least 1, got {value}"))


def _check_ranks(lora: LoraFile, request: ResizeRequest) -> None:
    linear = [lora.rank(m) for n, m in lora.modules.items() if not _is_conv3(lora, n)]
    conv = [lora.rank(m) for n, m in lora.modules.items() if _is_conv3(lora, n)]
    if request.dim is not None and linear and request.dim > max(linear):
        raise ConfigError(Problem("--dim", f"{request.dim} is above the file's largest rank ({max(linear)}); "
                                  "resize only lowers ranks", f"use --dim {max(linear)} or less"))
    if request.conv_dim is not None and request.conv_dim > max(conv, default=0):
        held = f"its 3x3 conv modules have rank {max(conv)} at most" if conv else "it has no 3x3 conv modules"
        raise ConfigError(Problem("--conv-dim", f"{request.conv_dim} is above what the file holds ({held})",
                                  "lower --conv-dim or leave it out"))


def resize_file(source: Path, target: Path, request: ResizeRequest, force: bool = False) -> ResizeReport:
    """Resize `source` into `target` (atomically); the report lists each module's new rank."""
    from loracli.run.saving import atomic_save_safetensors, sshs_hashes

    validate_request(request)
    target = check_output(target, force, [source])
    lora = open_lora(source, "input")
    others = sorted(lora.algos - {"lora"})
    if others:
        raise ConfigError(Problem(f"input {source}", f"{'/'.join(a.upper() if a != 'loha' else 'LoHa' for a in others)}"
                                  " modules cannot be resized (their weights are not an up·down product)",
                                  "`loracli merge --dim N` turns a LyCORIS file into a LoRA of rank N by SVD"))
    _check_ranks(lora, request)
    base = _open_base(request.base, lora) if request.base is not None else None
    dtype = save_dtype(request.save_precision) or torch.float32  # sd-scripts saves float unless told
    device = resolve_device(request.device)
    max_rank = request.dim  # None with a dynamic method: each module's own rank is the cap
    conv_rank = request.conv_dim if request.conv_dim is not None else request.dim
    old_dim = max(lora.rank(m) for m in lora.modules.values())
    report = ResizeReport(str(source), str(target), request.method, request.param, old_dim)
    tensors: dict[str, torch.Tensor] = {}
    with progress("resize", len(lora.modules)) as advance:
        for name, module in lora.modules.items():
            old_rank = lora.rank(module)
            conv = _is_conv3(lora, name)
            scale = lora_scale(lora.alpha(module), old_rank)
            down_key, up_key = module.keys["lora_down.weight"], module.keys["lora_up.weight"]
            # up·down, as sd-scripts decomposes it (its shape: the module weight's)
            shape = (lora.shapes[up_key][0], *lora.shapes[down_key][1:])
            product = torch.empty(shape, device="meta")
            if "lora_mid.weight" in module.keys:  # Tucker LoCon: form the product, then a full SVD
                product = module_delta(lora, module, device) / scale
                u, s, vh = svd(product, device)
            else:
                u, s, vh = product_svd(lora.tensor(up_key), lora.tensor(down_key), device)
            cap = min(old_rank, (conv_rank if conv else max_rank) or old_rank)
            if base is not None:
                rank = min(cap, rank_against_base(s * scale, base.read(base.targets[name]), request.param))
                if rank == 0:  # nothing of the module is large enough next to its base weight: dropped
                    report.modules.append(ModuleResize(name, conv, old_rank, 0, 0.0, 0.0))
                    advance()
                    continue
            else:
                rank = choose_rank(s, cap, request.method, request.param)
            factors = factorise(product, rank, device, decomposition=(u, s, vh))
            new_alpha = float(scale * rank)
            tensors[module.keys["lora_down.weight"]] = factors.down.to(dtype)
            tensors[module.keys["lora_up.weight"]] = factors.up.to(dtype)
            tensors[module.keys.get("alpha", f"{name}.alpha")] = torch.tensor(new_alpha).to(dtype)
            report.modules.append(ModuleResize(name, conv, old_rank, rank, new_alpha, factors.fro_retained))
            advance()
    if not tensors:
        raise ConfigError(Problem("--param", f"no module of {source} has a singular value above 10^{request.param:g} "
                                  "of its base weight's norm", "lower --param (e.g. by 0.5) to keep more"))
    metadata = resized_metadata(lora.metadata, report, request)
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    atomic_save_safetensors(tensors, metadata, target)
    return report


def _open_base(path: Path, lora: LoraFile):
    from loracli.lora_tools.merge import matched_targets
    from loracli.lora_tools.basemodel import open_base_model

    base = open_base_model(path, "--base")
    matched_targets(lora, base)  # same family, every module present, same sizes
    return base


def rank_against_base(effective_s: torch.Tensor, base_weight: torch.Tensor, threshold: float) -> int:
    """How many singular values of the module's ΔW exceed 10^threshold × ||W_base||_F."""
    norm = float(torch.linalg.vector_norm(base_weight.float()))
    return int((effective_s > (10.0 ** threshold) * norm).sum())


def _uniform(values: list) -> object | None:
    return values[0] if values and len(set(values)) == 1 else None


def resized_metadata(source: dict[str, str], report: ResizeReport, request: ResizeRequest) -> dict[str, str]:
    """sd-scripts' updates: dim/alpha (or "Dynamic"), a training comment naming the resize, and
    (here) conv_dim/conv_alpha in ss_network_args when the file records them."""
    meta = {k: v for k, v in source.items() if not k.startswith("sshs_")}
    comment = meta.get("ss_training_comment", "")
    linear = [m for m in report.modules if not m.conv and m.new_rank]
    conv = [m for m in report.modules if m.conv and m.new_rank]
    if request.method:
        against = f" against {Path(request.base).name}" if request.base is not None else ""
        meta["ss_training_comment"] = (f"Dynamic resize with {request.method}: {request.param:g}{against} from "
                                       f"{report.old_dim}; {comment}")
    else:
        conv_rank = request.conv_dim if request.conv_dim is not None else request.dim
        conv_note = f" (conv: {conv_rank})" if conv and conv_rank != request.dim else ""
        meta["ss_training_comment"] = f"dimension is resized from {report.old_dim} to {request.dim}{conv_note}; " \
                                      f"{comment}"
    dim = _uniform([m.new_rank for m in linear or conv])
    alpha = _uniform([m.new_alpha for m in linear or conv])
    dynamic = request.method is not None or dim is None or alpha is None
    meta["ss_network_dim"] = "Dynamic" if dynamic else str(dim)
    meta["ss_network_alpha"] = "Dynamic" if dynamic else str(alpha)
    args_text = meta.get("ss_network_args")
    if conv and args_text:
        try:
            args = json.loads(args_text)
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            conv_dim, conv_alpha = _uniform([m.new_rank for m in conv]), _uniform([m.new_alpha for m in conv])
            args["conv_dim"] = "Dynamic" if dynamic or conv_dim is None else str(conv_dim)
            args["conv_alpha"] = "Dynamic" if dynamic or conv_alpha is None else str(conv_alpha)
            meta["ss_network_args"] = json.dumps(args)
    return meta


def rank_summary(report: ResizeReport) -> str:
    counts = Counter(m.new_rank for m in report.modules)
    return ", ".join(f"{n}×{rank}" if rank else f"{n} dropped" for rank, n in sorted(counts.items(), reverse=True))
