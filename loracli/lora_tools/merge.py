"""`loracli merge`: LoRAs baked into a base checkpoint, or several LoRAs into one.

Into a checkpoint: the output has the base file's tensors, in its layout and
dtypes (an SD1/SDXL diffusers folder comes out in the single-file layout), each
weight plus Σ ratio·ΔW of the LoRA modules that target it; it is written tensor
by tensor (one tensor in memory at a time).

Into one LoRA: with `--dim N` the summed deltas are decomposed by SVD to rank N
(sd-scripts' svd_merge_lora.py; LoHa/LoKr inputs too); without it the ranks are
concatenated, each part scaled so that the merged file reproduces Σ ratio·ΔW
exactly (sd-scripts' `merge_lora.py --concat` scales by ratio² and by the merged
alpha instead, which changes the strength when ratios or alphas differ).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracli.errors import ConfigError, Problem
from loracli.lora_tools.basemodel import BaseModel, Target, check_family, open_base_model
from loracli.lora_tools.loras import LoraFile, LoraModule, lora_scale, module_delta, open_lora
from loracli.lora_tools.lowrank import factorise
from loracli.lora_tools.output import check_output, progress, resolve_device, save_dtype, stream_safetensors

DEFAULT_CLAMP_QUANTILE = 0.99  # sd-scripts' svd_merge_lora.py and extract_lora_from_models.py


@dataclass
class MergeReport:
    output: str
    loras: list[dict] = field(default_factory=list)  # file, ratio, modules
    tensors_changed: int = 0
    mode: str = ""


def _delta_shape(lora: LoraFile, module: LoraModule) -> tuple[int, int] | None:
    """(out, in) of the module's weight from its tensor shapes; None when only computing tells."""
    shapes = {part: lora.shapes[key] for part, key in module.keys.items()}
    if module.algo == "lora":
        return shapes["lora_up.weight"][0], shapes["lora_down.weight"][1]
    if module.algo == "loha" and "hada_t1" not in shapes:
        return shapes["hada_w1_a"][0], math.prod(shapes["hada_w1_b"][1:])
    return None


def matched_targets(lora: LoraFile, base: BaseModel) -> dict[str, Target]:
    """Each LoRA module's target in the base model; every module must have one of the right size."""
    check_family(lora.is_sdxl, lora.where, base)
    missing = [name for name in lora.modules if name not in base.targets]
    if missing:
        raise ConfigError(Problem(lora.where, f"{len(missing)} of its {len(lora.modules)} modules have no "
                                  f"counterpart in the base model {base.path} (e.g. {missing[0]})",
                                  f"is the base model the {base.title} model family the LoRA was made for?"))
    matched = {}
    for name, module in lora.modules.items():
        target = base.targets[name]
        shape = _delta_shape(lora, module)
        flat_in = math.prod(target.shape[1:])
        if shape is not None and (shape[0] != target.shape[0] or shape[1] not in (target.shape[1], flat_in)):
            raise ConfigError(Problem(lora.where, f"module {name} is {shape[0]}×{shape[1]} but the base model's "
                                      f"weight is {'×'.join(map(str, target.shape))}",
                                      "the LoRA was made for another model (SD1.x vs SD2.x?)"))
        matched[name] = target
    return matched


def _shaped(delta: torch.Tensor, target: Target, where: str) -> torch.Tensor:
    if delta.numel() != math.prod(target.shape):
        raise ConfigError(Problem(where, f"module {target.kohya} gives a {'×'.join(map(str, delta.shape))} update "
                                  f"for a {'×'.join(map(str, target.shape))} weight",
                                  "the LoRA was made for another model"))
    return delta.reshape(target.shape)


def parse_ratios(ratios: list[float] | None, count: int) -> list[float]:
    if not ratios:
        return [1.0] * count
    if len(ratios) != count:
        raise ConfigError(Problem("--ratio", f"{len(ratios)} ratios for {count} LoRA files",
                                  "give one --ratio per LoRA, in the same order (or none for 1.0 each)"))
    return list(ratios)


# --- into a checkpoint -------------------------------------------------------------------------------

def merge_into_checkpoint(base_path: Path, lora_paths: list[Path], ratios: list[float] | None, target_path: Path,
                          save_precision: str | None = None, device: str | None = None,
                          force: bool = False) -> MergeReport:
    """The base model with ratio·ΔW of each LoRA added, as one single-file checkpoint: a single file
    keeps its layout; an SD1/SDXL diffusers folder is written in the single-file layout."""
    from loracli.lora_tools.ldm_layout import Output, single_file_layout

    ratios = parse_ratios(ratios, len(lora_paths))
    target_path = check_output(target_path, force, [base_path, *lora_paths])
    dtype = save_dtype(save_precision)
    chosen = resolve_device(device)
    base = open_base_model(base_path, "--model")
    loras = [open_lora(p, "lora") for p in lora_paths]
    updates: dict[tuple[str, str], list[tuple[LoraFile, LoraModule, Target, float]]] = {}
    report = MergeReport(str(target_path), mode="checkpoint")
    for lora, ratio in zip(loras, ratios):
        for name, target in matched_targets(lora, base).items():
            updates.setdefault((target.file, target.key), []).append((lora, lora.modules[name], target, ratio))
        report.loras.append({"file": str(lora.path), "ratio": ratio, "modules": len(lora.modules)})
    if base.layout == "single-file":
        outputs = [Output(key, (("checkpoint", key),)) for key in base.handle("checkpoint").keys()]
        metadata = dict(base.handle("checkpoint").metadata() or {})
    else:
        outputs = single_file_layout(base, base.unet_config)
        metadata = {}
    entries = []
    for output in outputs:
        pieces = [base.handle(file).get_slice(key) for file, key in output.sources]
        stored = _torch_dtype(pieces[0].get_dtype())
        shape = _output_shape(output, [tuple(p.get_shape()) for p in pieces])
        entries.append((output.name, dtype if dtype is not None and stored.is_floating_point else stored, shape))
    by_name = {output.name: output for output in outputs}
    wanted = {name: out_dtype for name, out_dtype, _ in entries}

    def source(file: str, key: str) -> torch.Tensor:
        tensor = base.handle(file).get_tensor(key)
        changes = updates.get((file, key))
        if not changes:
            return tensor
        weight = tensor.to(device=chosen, dtype=torch.float32)
        for lora, module, target, ratio in changes:
            delta = _shaped(module_delta(lora, module, chosen), target, lora.where) * ratio
            if target.rows is None:
                weight += delta
            else:
                weight[target.rows[0]:target.rows[1]] += delta
        return weight.cpu()

    def produce(name: str) -> torch.Tensor:
        output = by_name[name]
        tensors = [source(file, key) for file, key in output.sources]
        if output.transform == "cat":
            if len({t.dtype for t in tensors}) > 1:  # some parts carry a LoRA update (float32)
                tensors = [t.float() for t in tensors]
            tensor = torch.cat(tensors)
        elif output.transform == "conv1x1":
            tensor = tensors[0][..., None, None]
        elif output.transform == "transpose":
            tensor = tensors[0].T.contiguous()
        else:
            tensor = tensors[0]
        return tensor.to(wanted[name])

    metadata["loracli_merged_loras"] = json.dumps([{"file": Path(r["file"]).name, "ratio": r["ratio"]}
                                                   for r in report.loras])
    with progress("merge", len(entries)) as advance:
        stream_safetensors(target_path, entries, produce, metadata, on_tensor=advance)
    report.tensors_changed = len(updates)
    return report


def _output_shape(output, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if output.transform == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if output.transform == "conv1x1":
        return (*shapes[0], 1, 1)
    if output.transform == "transpose":
        return tuple(reversed(shapes[0]))
    return shapes[0]


def _torch_dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if hasattr(torch, "float8_e4m3fn"):
        table.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
    return table[name]


# --- several LoRAs into one ---------------------------------------------------------------------------

def _check_same_family(loras: list[LoraFile]) -> None:
    kinds = {lora.is_sdxl for lora in loras}
    if len(kinds) > 1:
        sdxl = next(lora for lora in loras if lora.is_sdxl)
        other = next(lora for lora in loras if not lora.is_sdxl)
        raise ConfigError(Problem(other.where, f"is an SD1.x/SD2.x LoRA but {sdxl.path} is an SDXL one",
                                  "merge LoRAs made for the same model family"))


def merge_loras(lora_paths: list[Path], ratios: list[float] | None, target_path: Path, dim: int | None = None,
                conv_dim: int | None = None, save_precision: str | None = None, device: str | None = None,
                force: bool = False, clamp_quantile: float = DEFAULT_CLAMP_QUANTILE) -> MergeReport:
    from loracli.run.saving import atomic_save_safetensors, sshs_hashes

    ratios = parse_ratios(ratios, len(lora_paths))
    if len(lora_paths) < 2 and dim is None:
        raise ConfigError(Problem("merge", "one LoRA and no --dim: nothing to merge",
                                  "give several LoRAs, or --dim N to re-decompose one (use `loracli resize` to "
                                  "lower a LoRA's rank)"))
    for option, value in (("--dim", dim), ("--conv-dim", conv_dim)):
        if value is not None and value < 1:
            raise ConfigError(Problem(option, f"must be at least 1, got {value}"))
    if conv_dim is not None and dim is None:
        raise ConfigError(Problem("--conv-dim", "--conv-dim needs --dim (an SVD merge)", "add --dim N"))
    target_path = check_output(target_path, force, lora_paths)
    dtype = save_dtype(save_precision) or torch.float32
    chosen = resolve_device(device)
    loras = [open_lora(p, "lora") for p in lora_paths]
    _check_same_family(loras)
    names: dict[str, list[tuple[LoraFile, float]]] = {}
    for lora, ratio in zip(loras, ratios):
        for name in lora.modules:
            names.setdefault(name, []).append((lora, ratio))
    report = MergeReport(str(target_path), [{"file": str(l.path), "ratio": r, "modules": len(l.modules)}
                                            for l, r in zip(loras, ratios)], mode="svd" if dim else "concat")
    if dim is None:
        lycoris = sorted({a for lora in loras for a in lora.algos} - {"lora"})
        if lycoris or any("lora_mid.weight" in m.keys for lora in loras for m in lora.modules.values()):
            raise ConfigError(Problem("merge", "concatenating ranks needs plain LoRA/LoCon inputs (found "
                                      f"{', '.join(lycoris) or 'Tucker'} modules)",
                                      "add --dim N: an SVD merge turns any of them into a LoRA of rank N"))
    tensors: dict[str, torch.Tensor] = {}
    conv_ranks, linear_ranks = set(), set()
    with progress("merge", len(names)) as advance:
        for name, sources in names.items():
            if dim is None:
                up, down = _concat(name, sources, chosen)
                rank = down.shape[0]
            else:
                total = None
                for lora, ratio in sources:
                    delta = module_delta(lora, lora.modules[name], chosen) * ratio
                    if total is not None and delta.shape != total.shape:
                        raise ConfigError(Problem(lora.where, f"module {name} is {tuple(delta.shape)} here but "
                                                  f"{tuple(total.shape)} in another input",
                                                  "merge LoRAs made for the same model"))
                    total = delta if total is None else total + delta
                conv3 = total.dim() == 4 and tuple(total.shape[2:]) != (1, 1)
                wanted = conv_dim if conv3 and conv_dim is not None else dim
                rank = min(wanted, total.shape[0], math.prod(total.shape[1:]))
                factors = factorise(total, rank, chosen, clamp_quantile)
                up, down = factors.up, factors.down
            (conv_ranks if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else linear_ranks).add(rank)
            tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank)).to(dtype)  # scale 1: the parts carry it
            advance()
    metadata = _merged_lora_metadata(loras, ratios, target_path, linear_ranks, conv_ranks, report.mode)
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    atomic_save_safetensors(tensors, metadata, target_path)
    return report


def _concat(name: str, sources: list[tuple[LoraFile, float]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks side by side: each part's up and down take √|ratio·scale| (up also the sign), so
    up·down = Σ ratio·scale·up_i·down_i with alpha = the total rank (scale 1)."""
    ups, downs = [], []
    for lora, ratio in sources:
        module = lora.modules[name]
        down = lora.tensor(module.keys["lora_down.weight"]).to(device=device, dtype=torch.float32)
        up = lora.tensor(module.keys["lora_up.weight"]).to(device=device, dtype=torch.float32)
        factor = ratio * lora_scale(lora.alpha(module), down.shape[0])
        root = math.sqrt(abs(factor))
        if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]):
            raise ConfigError(Problem(lora.where, f"module {name} has other shapes than in the other inputs",
                                      "merge LoRAs made for the same model"))
        ups.append(up * root * (1 if factor >= 0 else -1))
        downs.append(down * root)
    return torch.cat(ups, dim=1).cpu(), torch.cat(downs, dim=0).cpu()


def _first(loras: list[LoraFile], key: str) -> str | None:
    return next((lora.metadata[key] for lora in loras if key in lora.metadata), None)


def _merged_lora_metadata(loras: list[LoraFile], ratios: list[float], target: Path, linear: set[int],
                          conv: set[int], mode: str) -> dict[str, str]:
    meta: dict[str, str] = {"ss_network_module": "networks.lora"}
    for key in ("ss_v2", "ss_base_model_version", "ss_sd_model_name", "modelspec.architecture",
                "modelspec.implementation", "modelspec.prediction_type", "modelspec.resolution"):
        value = _first(loras, key)
        if value is not None:
            meta[key] = value
    dims = linear or conv
    meta["ss_network_dim"] = str(next(iter(dims))) if len(dims) == 1 else "Dynamic"
    meta["ss_network_alpha"] = f"{float(next(iter(dims)))}" if len(dims) == 1 else "Dynamic"
    if conv and linear:
        single = len(conv) == 1
        meta["ss_network_args"] = json.dumps({"conv_dim": str(next(iter(conv))) if single else "Dynamic",
                                              "conv_alpha": str(float(next(iter(conv)))) if single else "Dynamic"})
    sources = ", ".join(f"{lora.path.name} ({ratio:g})" for lora, ratio in zip(loras, ratios))
    how = "SVD-merged" if mode == "svd" else "rank-concatenated"
    meta["ss_training_comment"] = f"{how} by loracli from {sources}"
    meta["modelspec.sai_model_spec"] = "1.0.1"
    meta["modelspec.title"] = target.stem
    meta["modelspec.merged_from"] = ", ".join(lora.path.stem for lora in loras)
    return meta

