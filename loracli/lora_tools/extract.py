"""`loracli extract`: a LoRA from the difference of two checkpoints
(sd-scripts' networks/extract_lora_from_models.py).

The modules are those kohya's LoRA trains: the UNet's attention blocks (and, with
`--conv-dim`, the ResNet blocks and samplers: 3×3 convs at the conv rank, their
Linear/1×1 layers at `--dim`) and the text encoders' attention and MLP layers.
Each module's difference tuned − base is cut by SVD to the rank, its factors
clamped at the 0.99 quantile, alpha = rank. The text encoders are left out when
no weight of theirs moved by more than `--min-diff` (sd-scripts' rule).
Module by module: two weights in memory at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracli.errors import ConfigError, Problem
from loracli.family import FAMILIES
from loracli.lora_tools.basemodel import BaseModel, Target, open_base_model
from loracli.lora_tools.lowrank import factorise
from loracli.lora_tools.output import check_output, progress, resolve_device, save_dtype

DEFAULT_CLAMP_QUANTILE = 0.99
DEFAULT_MIN_DIFF = 0.01


@dataclass
class ExtractReport:
    output: str
    family: str
    unet_modules: int = 0
    text_encoder_modules: int = 0
    text_encoder_max_diff: float = 0.0
    text_encoder_kept: bool = False
    fro_retained: list[float] = field(default_factory=list)

    @property
    def mean_fro(self) -> float:
        return sum(self.fro_retained) / len(self.fro_retained) if self.fro_retained else 1.0


def _selected(model: BaseModel, with_conv: bool) -> list[Target]:
    return [t for t in model.targets.values() if t.kind in ("attn", "text") or (with_conv and t.kind == "block")]


def _check_pair(base: BaseModel, tuned: BaseModel, targets: list[Target]) -> None:
    if base.family != tuned.family:
        raise ConfigError(Problem(f"TUNED {tuned.path}", f"is {tuned.title} but BASE {base.path} is {base.title}",
                                  "extract from two checkpoints of the same model family"))
    for target in targets:
        other = tuned.targets.get(target.kohya)
        if other is None or other.shape != target.shape:
            found = "missing" if other is None else "×".join(map(str, other.shape))
            raise ConfigError(Problem(f"TUNED {tuned.path}", f"module {target.kohya} is {found} there but "
                                      f"{'×'.join(map(str, target.shape))} in BASE",
                                      "the two models do not share an architecture"))


def _difference(base: BaseModel, tuned: BaseModel, target: Target, device) -> torch.Tensor:
    return tuned.read(tuned.targets[target.kohya]).to(device, torch.float32) - \
        base.read(target).to(device, torch.float32)


def extract(base_path: Path, tuned_path: Path, target_path: Path, dim: int, conv_dim: int | None = None,
            save_precision: str | None = None, device: str | None = None, force: bool = False,
            clamp_quantile: float = DEFAULT_CLAMP_QUANTILE, min_diff: float = DEFAULT_MIN_DIFF) -> ExtractReport:
    from loracli.run.saving import atomic_save_safetensors, sshs_hashes

    for option, value in (("--dim", dim), ("--conv-dim", conv_dim)):
        if value is not None and value < 1:
            raise ConfigError(Problem(option, f"must be at least 1, got {value}"))
    if not 0 < clamp_quantile <= 1:
        raise ConfigError(Problem("--clamp-quantile", f"must be in (0, 1], got {clamp_quantile:g}"))
    target_path = check_output(target_path, force, [base_path, tuned_path])
    dtype = save_dtype(save_precision)
    chosen = resolve_device(device)
    base = open_base_model(base_path, "BASE")
    tuned = open_base_model(tuned_path, "TUNED")
    targets = _selected(base, conv_dim is not None)
    _check_pair(base, tuned, targets)
    report = ExtractReport(str(target_path), base.family)

    text = [t for t in targets if t.kind == "text"]
    for target in text:  # sd-scripts keeps the text encoders only when one of their weights moved enough
        report.text_encoder_max_diff = max(report.text_encoder_max_diff,
                                           float(_difference(base, tuned, target, chosen).abs().max()))
        if report.text_encoder_max_diff > min_diff:
            report.text_encoder_kept = True
            break
    if not report.text_encoder_kept:
        targets = [t for t in targets if t.kind != "text"]

    tensors: dict[str, torch.Tensor] = {}
    largest = 0.0
    with progress("extract", len(targets)) as advance:
        for target in targets:
            difference = _difference(base, tuned, target, chosen)
            largest = max(largest, float(difference.abs().max()))
            wanted = conv_dim if target.conv3 and conv_dim is not None else dim
            rank = min(wanted, target.shape[0], math.prod(target.shape[1:]))
            factors = factorise(difference, rank, chosen, clamp_quantile)
            up, down = factors.up, factors.down
            keep = dtype or torch.float32
            tensors[f"{target.kohya}.lora_up.weight"] = up.to(keep)
            tensors[f"{target.kohya}.lora_down.weight"] = down.to(keep)
            tensors[f"{target.kohya}.alpha"] = torch.tensor(float(rank)).to(keep)
            report.fro_retained.append(factors.fro_retained)
            if target.kind == "text":
                report.text_encoder_modules += 1
            else:
                report.unet_modules += 1
            advance()
    if largest == 0:
        raise ConfigError(Problem(f"TUNED {tuned_path}", f"every weight a LoRA would change is the same as in BASE "
                                  f"{base_path}: nothing to extract", "give the fine-tuned model as TUNED"))
    metadata = extract_metadata(base, dim, conv_dim, target_path)
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    atomic_save_safetensors(tensors, metadata, target_path)
    return report


def extract_metadata(base: BaseModel, dim: int, conv_dim: int | None, target: Path) -> dict[str, str]:
    """sd-scripts' keys for an extracted LoRA (and its modelspec block)."""
    family = FAMILIES[base.family]
    v_param = base.v_parameterization
    network_args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim is not None else {}
    meta = {
        "ss_v2": str(base.family == "sd2"),
        "ss_base_model_version": family.base_model_version_v if v_param else family.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(network_args),
        "ss_training_comment": f"extracted by loracli from the difference of two {family.title} models",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.modelspec_architecture_v if v_param else family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": target.stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
    }
    return meta
