"""What a LoRA file is: `loracli inspect FILE.safetensors`, without torch.

Everything comes from the safetensors header (key names, shapes, dtypes and the
`ss_*`/modelspec/sshs metadata) plus the alpha scalars read by offset. Works on
loracli's files, sd-scripts' (SD1/2 `lora_te_`, SDXL `lora_te1_`/`lora_te2_`),
LyCORIS' and files with no metadata at all.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loracli.safetensors_header import SafetensorsHeader, read_header, read_scalars

# Parameter-name suffix → the algorithm it belongs to. Longest first, so "lora_down.weight"
# wins over "weight".
_SUFFIX_ALGO = {
    "lora_down.weight": "lora", "lora_up.weight": "lora", "lora_mid.weight": "lora",
    "lora_A.weight": "lora", "lora_B.weight": "lora",  # PEFT / diffusers key names
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "a1.weight": "glora", "a2.weight": "glora", "b1.weight": "glora", "b2.weight": "glora",
    "oft_blocks": "oft", "oft_diag": "oft", "oft_R": "oft",
    "diff": "full", "diff_b": "full",
    "on_input": "ia3",
    "alpha": "", "scalar": "", "dora_scale": "",  # shared by several algorithms
}
_SUFFIXES = sorted(_SUFFIX_ALGO, key=len, reverse=True)
ALGO_NAMES = {"lora": "LoRA", "locon": "LoCon (LoRA on 3x3 convs)", "loha": "LoHa", "lokr": "LoKr",
              "glora": "GLoRA", "oft": "OFT/BOFT", "full": "full fine-tune diff (LyCORIS full)", "ia3": "IA3",
              "other": "other"}
# Prefix → part of the model, most specific first.
_PARTS = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder_1"), ("lora_te2_", "text_encoder_2"),
          ("lora_te_", "text_encoder"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
          ("text_encoder.", "text_encoder"), ("lora_transformer_", "transformer"), ("transformer.", "transformer"))
PART_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_1": "text encoder 1 (SDXL)",
               "text_encoder_2": "text encoder 2 (SDXL)", "transformer": "transformer", "other": "other"}
# SD UNet 3x3 convs by name, for LoHa/LoKr whose flattened shapes hide the kernel size.
_CONV3_NAME = re.compile(r"(_conv1|_conv2|samplers_\d+_conv|conv_in|conv_out)$")
# ss_* values sd-scripts stores as JSON text.
_JSON_KEYS = ("ss_network_args", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info",
              "ss_datasets")
# ss_* key → name in the report's "training" section.
_TRAINING_KEYS = {
    "ss_steps": "steps", "ss_max_train_steps": "max_train_steps", "ss_epoch": "epoch", "ss_num_epochs": "num_epochs",
    "ss_optimizer": "optimizer", "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr",
    "ss_text_encoder_lr": "text_encoder_lr", "ss_lr_scheduler": "lr_scheduler", "ss_lr_warmup_steps": "lr_warmup_steps",
    "ss_resolution": "resolution", "ss_batch_size_per_device": "batch_size_per_device",
    "ss_total_batch_size": "total_batch_size", "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
    "ss_num_train_images": "num_train_images", "ss_num_reg_images": "num_reg_images",
    "ss_num_batches_per_epoch": "num_batches_per_epoch", "ss_mixed_precision": "mixed_precision",
    "ss_clip_skip": "clip_skip", "ss_seed": "seed", "ss_noise_offset": "noise_offset",
    "ss_min_snr_gamma": "min_snr_gamma", "ss_network_dropout": "network_dropout", "ss_max_grad_norm": "max_grad_norm",
    "ss_training_comment": "training_comment", "ss_output_name": "output_name",
    "ss_training_started_at": "training_started_at", "ss_training_finished_at": "training_finished_at",
}
_HASH_KEYS = {"sshs_model_hash": "sshs_model_hash", "sshs_legacy_hash": "sshs_legacy_hash",
              "ss_sd_model_hash": "base_model_hash", "ss_new_sd_model_hash": "base_model_new_hash"}


@dataclass
class ModuleInfo:
    name: str
    part: str  # unet | text_encoder | text_encoder_1 | text_encoder_2 | transformer | other
    algo: str  # lora | loha | lokr | ... (per module; "locon" is a file-level name)
    conv: bool  # a 3x3 (or larger) conv: takes conv_dim/conv_alpha
    dim: int | None  # rank; None for full matrices and algorithms without one
    alpha: float | None  # None when the file stores none (the scale is then 1)


def split_key(key: str) -> tuple[str, str]:
    """(module, parameter suffix). kohya names have no dots inside the module name."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, suffix = key.rpartition(".")
    return (module, suffix) if module else (key, "")


def _part(module: str) -> str:
    for prefix, part in _PARTS:
        if module.startswith(prefix):
            return part
    return "other"


def _rank(algo: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    if algo == "lora":
        down = shapes.get("lora_down.weight") or shapes.get("lora_A.weight")
        return down[0] if down else None
    if algo == "loha":
        return shapes["hada_w1_b"][0] if "hada_w1_b" in shapes else None
    if algo == "lokr":
        for key in ("lokr_w2_a", "lokr_w1_a"):
            if key in shapes:
                return shapes[key][1]
        return None  # both factors full matrices: no rank
    return None


def _is_conv3(module: str, algo: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    kernels = [s[2:] for s in shapes.values() if len(s) == 4]
    if kernels:
        return any(any(k > 1 for k in kernel) for kernel in kernels)
    return algo in ("loha", "lokr") and bool(_CONV3_NAME.search(module))


def parse_value(text: str) -> Any:
    """An ss_* string as the value sd-scripts held: None, bools, numbers, else the string."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):  # crafted metadata: shown as the text it is
        return parse_value(text)


def collect_modules(header: SafetensorsHeader) -> list[ModuleInfo]:
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    alpha_keys: dict[str, str] = {}
    for key, entry in header.tensors.items():
        module, suffix = split_key(key)
        grouped.setdefault(module, {})[suffix] = entry.shape
        if suffix == "alpha":
            alpha_keys[module] = key
    alphas = read_scalars(header, list(alpha_keys.values()))
    modules = []
    for module, shapes in grouped.items():
        algos = {_SUFFIX_ALGO.get(s, "other") for s in shapes} - {""}
        algo = algos.pop() if len(algos) == 1 else "other"
        alpha_key = alpha_keys.get(module)
        modules.append(ModuleInfo(module, _part(module), algo, _is_conv3(module, algo, shapes),
                                  _rank(algo, shapes), alphas.get(alpha_key) if alpha_key else None))
    return modules


def file_algorithm(modules: list[ModuleInfo], network_module: str | None) -> str:
    """From the weights first (they cannot lie), named as users know the algorithms."""
    algos = Counter(m.algo for m in modules)
    names = []
    for algo in algos:
        if algo == "lora":
            names.append("locon" if any(m.conv for m in modules if m.algo == "lora") else "lora")
        else:
            names.append(algo)
    if not names:
        return "none (no tensors)"
    if names == ["lora"] and network_module and "dylora" in network_module:
        return "DyLoRA"
    return " + ".join(ALGO_NAMES.get(n, n) for n in sorted(set(names)))


def _format_number(value: float | None, none: str = "none") -> str:
    return none if value is None else f"{value:g}"


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def dim_groups(modules: list[ModuleInfo]) -> list[dict[str, Any]]:
    """Modules grouped by (linear|conv, dim, alpha), biggest group first."""
    counts = Counter(("conv" if m.conv else "linear", m.dim, m.alpha) for m in modules if m.dim is not None
                     or m.algo in ("lora", "loha", "lokr"))
    groups = [{"kind": kind, "dim": dim, "alpha": alpha, "modules": n} for (kind, dim, alpha), n in counts.items()]
    return sorted(groups, key=lambda g: (g["kind"] != "linear", -g["modules"]))


def _uniform(groups: list[dict[str, Any]], kind: str, field: str) -> Any:
    values = {g[field] for g in groups if g["kind"] == kind}
    return values.pop() if len(values) == 1 else None


def base_model_guess(modules: list[ModuleInfo], header: SafetensorsHeader) -> str | None:
    """From the weights alone: SDXL by its two text encoders, SD1/SD2 by the text encoder's width."""
    parts = {m.part for m in modules}
    if "text_encoder_1" in parts or "text_encoder_2" in parts:
        return "SDXL (two text encoders)"
    for key, entry in header.tensors.items():
        if key.startswith("lora_te_") and "q_proj" in key and key.endswith("lora_down.weight") and entry.shape:
            width = entry.shape[-1]
            return {768: "SD1.x (text encoder width 768)", 1024: "SD2.x (text encoder width 1024)"}.get(width)
    return None


# kohya names SDXL UNet modules by the SAI/ldm layout, SD1/SD2 ones by diffusers' (down_blocks_...).
_SAI_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_DIFFUSERS_UNET = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")
# Cross-attention key/value input width (the text context) of the full-size models.
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}


def is_lora_file(modules: list[ModuleInfo]) -> bool:
    """A network file loracli can continue from: kohya-named LoRA/LyCORIS modules."""
    return any(m.algo not in ("other", "") and m.part in ("unet", "text_encoder", "text_encoder_1", "text_encoder_2")
               and m.name.startswith("lora_") for m in modules)


def lora_family(modules: list[ModuleInfo], header: SafetensorsHeader) -> tuple[str | None, str]:
    """(family, evidence): "sd1" | "sd2" | "sdxl" | "sd1/sd2" (not SDXL, width unknown) | None.

    The weights decide first (module names and widths cannot lie); the ss_*/modelspec metadata only
    when the weights leave it open.
    """
    names = [m.name for m in modules]
    if any(m.part in ("text_encoder_1", "text_encoder_2") for m in modules):
        return "sdxl", "two text encoders (lora_te1_/lora_te2_)"
    if any(n.startswith(_SAI_UNET) for n in names):
        return "sdxl", "SDXL UNet module names (lora_unet_input_blocks_...)"
    for key, entry in header.tensors.items():
        if key.startswith("lora_te_") and "q_proj" in key and key.endswith("lora_down.weight") and entry.shape:
            found = _TEXT_WIDTH_FAMILY.get(entry.shape[-1])
            if found:
                return found, f"text encoder width {entry.shape[-1]}"
        if key.startswith("lora_unet_") and "attn2_to_k" in key and key.endswith("lora_down.weight") and entry.shape:
            found = _CONTEXT_FAMILY.get(entry.shape[-1])
            if found:
                return found, f"cross-attention context width {entry.shape[-1]}"
    version = header.metadata.get("ss_base_model_version", "")
    architecture = header.metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl", f"metadata ({version or architecture})"
    if any(n.startswith(_DIFFUSERS_UNET) or n.startswith("lora_te_") for n in names):
        if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
            return "sd2", f"metadata ({version or architecture})"
        if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
            return "sd1", f"metadata ({version or architecture})"
        return "sd1/sd2", "SD1/SD2 module names (lora_unet_down_blocks_..., lora_te_)"
    return None, ""


def dataset_dirs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """[{dir, repeats, images}] from ss_dataset_dirs (folder mode) or ss_datasets (--dataset_config)."""
    out = []
    dirs = meta.get("ss_dataset_dirs")
    if isinstance(dirs, dict):
        for name, info in dirs.items():
            info = info if isinstance(info, dict) else {}
            out.append({"dir": name, "repeats": info.get("n_repeats"), "images": info.get("img_count")})
    elif isinstance(meta.get("ss_datasets"), list):
        for dataset in meta["ss_datasets"]:
            for subset in dataset.get("subsets", []) if isinstance(dataset, dict) else []:
                if isinstance(subset, dict) and not subset.get("is_reg"):
                    out.append({"dir": subset.get("image_dir") or subset.get("metadata_file"),
                                "repeats": subset.get("num_repeats"), "images": subset.get("img_count")})
    return out


def _per_dataset_training(meta: dict[str, Any]) -> dict[str, str]:
    """--dataset_config files keep resolution and batch size per dataset in ss_datasets: "512x512 / 1024x1024"."""
    datasets = meta.get("ss_datasets")
    if "ss_resolution" in meta or not isinstance(datasets, list):
        return {}
    datasets = [d for d in datasets if isinstance(d, dict)]
    res = [d.get("resolution") for d in datasets]
    return {"resolution": " / ".join(f"{r[0]}x{r[1]}" if isinstance(r, list) and len(r) == 2 else str(r) for r in res),
            "batch_size_per_device": " / ".join(str(d.get("batch_size_per_device")) for d in datasets)}


def tag_counts(meta: dict[str, Any]) -> Counter:
    """Tag → images captioned with it, over every folder (sd-scripts counts per folder)."""
    total: Counter = Counter()
    sources = []
    if isinstance(meta.get("ss_tag_frequency"), dict):
        sources.append(meta["ss_tag_frequency"])
    elif isinstance(meta.get("ss_datasets"), list):
        sources += [d.get("tag_frequency") for d in meta["ss_datasets"] if isinstance(d, dict)]
    for per_dir in sources:
        for tags in (per_dir or {}).values():
            if isinstance(tags, dict):
                total.update({str(t): int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return total


def inspect_file(path: Path, top: int = 10) -> dict[str, Any]:
    """The report `loracli inspect` prints (JSON-ready)."""
    header = read_header(path)
    meta: dict[str, Any] = {}
    for key, text in header.metadata.items():
        meta[key] = parse_json_value(text) if key in _JSON_KEYS else parse_value(text)
    modules = collect_modules(header)
    network_module = meta.get("ss_network_module")
    groups = dim_groups(modules)
    varying = len({(g["dim"], g["alpha"]) for g in groups if g["kind"] == "linear"}) > 1 or \
        len({(g["dim"], g["alpha"]) for g in groups if g["kind"] == "conv"}) > 1
    parts = Counter(m.part for m in modules)
    weights = [e for k, e in header.tensors.items() if split_key(k)[1] != "alpha"]
    tags = tag_counts(meta)
    report: dict[str, Any] = {
        "file": str(path),
        "file_size": header.file_size,
        "algorithm": file_algorithm(modules, network_module if isinstance(network_module, str) else None),
        "network_module": network_module,
        "network_args": meta.get("ss_network_args"),
        "modules": {"total": len(modules), **{part: parts[part] for part in PART_LABELS if parts[part]}},
        "dim": _uniform(groups, "linear", "dim"),
        "alpha": _uniform(groups, "linear", "alpha"),
        "conv_dim": _uniform(groups, "conv", "dim"),
        "conv_alpha": _uniform(groups, "conv", "alpha"),
        "dim_groups": groups,
        "parameters": sum(e.numel for e in weights),
        "dtypes": dict(Counter(e.dtype for e in weights)),
        "alpha_dtypes": dict(Counter(e.dtype for k, e in header.tensors.items() if split_key(k)[1] == "alpha")),
        "base_model": {
            "v2": meta.get("ss_v2"),
            "base_model_version": meta.get("ss_base_model_version"),
            "sd_model_name": meta.get("ss_sd_model_name"),
            "modelspec_architecture": meta.get("modelspec.architecture"),
            "guess_from_weights": base_model_guess(modules, header),
        },
        "training": {**{name: meta[key] for key, name in _TRAINING_KEYS.items() if key in meta},
                     **_per_dataset_training(meta)},
        "dataset_dirs": dataset_dirs(meta),
        "tags": {"unique": len(tags), "top": [[t, n] for t, n in tags.most_common(max(top, 0))]},
        "hashes": {name: meta[key] for key, name in _HASH_KEYS.items() if key in meta},
        "metadata_keys": len(header.metadata),
    }
    if varying:
        report["per_module"] = [asdict(m) for m in modules]
    return report


def _dim_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for kind, label in (("linear", "dim/alpha"), ("conv", "conv dim/alpha")):
        groups = [g for g in report["dim_groups"] if g["kind"] == kind]
        if not groups:
            continue
        what = "3x3 convs" if kind == "conv" else "linear and 1x1 conv layers"
        if len(groups) == 1:
            g = groups[0]
            lines.append(f"{label:<16}dim {_format_number(g['dim'], 'full')}, alpha {_format_number(g['alpha'])} "
                         f"({g['modules']} {what})")
        else:
            text = ", ".join(f"dim {_format_number(g['dim'], 'full')} alpha {_format_number(g['alpha'])}: "
                             f"{g['modules']} modules" for g in groups)
            lines.append(f"{label:<16}varies by module ({what}): {text}")
    return lines


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def render_inspect(report: dict[str, Any]) -> str:
    """The text `loracli inspect` prints: one labelled line per fact, absent facts left out."""
    lines = [f"{'file':<16}{report['file']} ({_human_size(report['file_size'])})"]
    declared = ""
    if report.get("network_module"):
        declared = f" [metadata: {report['network_module']}"
        args = report.get("network_args")
        if isinstance(args, dict) and args.get("algo"):
            declared += f", algo={args['algo']}"
        declared += "]"
    lines.append(f"{'algorithm':<16}{report['algorithm']}{declared}")
    mods = report["modules"]
    parts = ", ".join(f"{PART_LABELS[p]} {n}" for p, n in mods.items() if p != "total")
    lines.append(f"{'modules':<16}{mods['total']}" + (f": {parts}" if parts else ""))
    lines += _dim_lines(report)
    dtypes = ", ".join(f"{d} ×{n}" if len(report["dtypes"]) > 1 else d for d, n in report["dtypes"].items())
    alpha_dtypes = ", ".join(report["alpha_dtypes"])
    lines.append(f"{'parameters':<16}{report['parameters']:,} ({dtypes or 'no tensors'}"
                 + (f"; alpha {alpha_dtypes}" if alpha_dtypes else "") + ")")
    base = report["base_model"]
    facts = [f"{k} {base[k]}" for k in ("base_model_version", "modelspec_architecture", "v2") if base[k] is not None]
    if base["guess_from_weights"]:
        facts.append(f"weights look like {base['guess_from_weights']}")
    if facts:
        lines.append(f"{'base model':<16}" + "; ".join(facts))
    if base["sd_model_name"]:
        lines.append(f"{'trained on':<16}{base['sd_model_name']}")
    lines += _training_lines(report)
    if not report["metadata_keys"]:
        lines.append(f"{'metadata':<16}none (no ss_* training settings in this file)")
    for name, value in report["hashes"].items():
        lines.append(f"{'hash':<16}{name} {value}")
    return "\n".join(lines)


def _training_lines(report: dict[str, Any]) -> list[str]:
    t = report["training"]
    lines = []

    def has(*keys: str) -> bool:
        return any(t.get(k) is not None for k in keys)

    if has("steps", "epoch"):
        steps = f"steps {t.get('steps')}" + (f" of {t['max_train_steps']}" if has("max_train_steps") else "")
        epochs = f"epoch {t.get('epoch')}" + (f" of {t['num_epochs']}" if has("num_epochs") else "")
        lines.append(f"{'progress':<16}{steps}, {epochs}")
    if has("optimizer"):
        lines.append(f"{'optimizer':<16}{t['optimizer']}")
    if has("learning_rate", "unet_lr", "text_encoder_lr"):
        names = {"learning_rate": "lr", "unet_lr": "unet", "text_encoder_lr": "text encoder"}
        lrs = [f"{label} {_format_value(t[k])}" for k, label in names.items() if t.get(k) is not None]
        lines.append(f"{'learning rate':<16}" + ", ".join(lrs))
    if has("lr_scheduler"):
        warm = f" (warmup {t['lr_warmup_steps']})" if has("lr_warmup_steps") and t["lr_warmup_steps"] else ""
        lines.append(f"{'scheduler':<16}{t['lr_scheduler']}{warm}")
    if has("resolution", "batch_size_per_device"):
        res = t.get("resolution")
        if isinstance(res, str):
            res = res.strip("()").replace(", ", "x")
        batch = f"batch {t.get('batch_size_per_device')}"
        if has("total_batch_size") and t["total_batch_size"] != t.get("batch_size_per_device"):
            batch += f" (total {t['total_batch_size']})"
        lines.append(f"{'resolution':<16}{res}, {batch}")
    if has("mixed_precision", "seed"):
        lines.append(f"{'precision':<16}{t.get('mixed_precision')}, seed {t.get('seed')}")
    if report.get("network_args"):
        args = report["network_args"]
        text = ", ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else str(args)
        lines.append(f"{'network args':<16}{text}")
    if has("num_train_images"):
        reg = f", {t['num_reg_images']} regularisation" if t.get("num_reg_images") else ""
        lines.append(f"{'images':<16}{t['num_train_images']} (with repeats){reg}")
    for d in report["dataset_dirs"]:
        lines.append(f"{'dataset dir':<16}{d['dir']}: {d['images']} images × {d['repeats']} repeats")
    tags = report["tags"]
    if tags["top"]:
        top = ", ".join(f"{t} ({n})" for t, n in tags["top"])
        lines.append(f"{'tags':<16}top {len(tags['top'])} of {tags['unique']}: {top}")
    if has("training_comment"):
        lines.append(f"{'comment':<16}{t['training_comment']}")
    return lines
