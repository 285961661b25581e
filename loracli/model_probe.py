"""What the base model is, told at plan time without torch and without loading weights.

`model.pretrained_model_name_or_path` may be a built-in tiny model (`tiny:sd15`,
`tiny:sdxl`), a diffusers folder (read: `model_index.json` and the component
configs), a single `.safetensors` checkpoint (read: its header's key names and
shapes), a pickled `.ckpt` (not read: unpickling can run code, so the family
comes from `model.sdxl`/`model.v2`), or a Hugging Face model id found in the
local Hugging Face cache (never downloaded). The probe names the family
(sd1, sd2, sdxl) and refuses, in one line, what loracli cannot train on:
refiners, inpainting models, LoRA/VAE files, broken or missing files.
`resolve_family` then checks the family against `model.sdxl` and `model.v2`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracli.config.schema import ModelSection
from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import FAMILIES, ModelFamily, family_for
from loracli.safetensors_header import read_header

KEY = "model.pretrained_model_name_or_path"
TINY_FAMILIES = {"tiny:sd15": "sd1", "tiny:sdxl": "sdxl"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Single-file (LDM/SGM) key prefixes.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."  # CLIP ViT-L
SD2_TEXT = "cond_stage_model.model."  # OpenCLIP ViT-H
XL_CLIP_L = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L ...
XL_BIGG = "conditioner.embedders.1.model."  # ... and OpenCLIP ViT-bigG
REFINER_BIGG = "conditioner.embedders.0.model."  # the refiner has bigG alone
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "hada_w1_a", "lokr_w1",
                 "oft_blocks", ".alpha")
# A Hugging Face model id: owner/name, as the hub spells them.
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weight files diffusers/transformers load without a `variant` (what loracli's loader asks for).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")


class ModelNotFound(DatasetError):
    """The model path does not exist here and no cached model id matches (exit 3)."""


@dataclass(frozen=True)
class ModelProbe:
    """The base model as the plan sees it."""

    path: str  # what the run loads: a local folder or file, or the tiny model's name
    family: str | None  # "sd1" | "sd2" | "sdxl"; None when the file cannot be read before training (pickles)
    kind: str  # "tiny" | "diffusers" | "single-file" | "pickle"
    detected_by: str  # how the family was told, e.g. "model_index.json (StableDiffusionXLPipeline)"
    source: str = ""  # where a model id was found, e.g. "Hugging Face cache, revision main (3f2a…)"


def _where(value: str) -> str:
    return f"{KEY}: {value}"


def _title(family: str) -> str:
    return FAMILIES[family].title


# --- the Hugging Face cache -------------------------------------------------------------------------

def hf_hub_cache() -> Path:
    """The hub cache folder, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else \
        Path.home() / ".cache"
    return base / "huggingface" / "hub"


def looks_like_model_id(value: str) -> bool:
    return bool(HF_ID.match(value)) and ".." not in value and not value.lower().endswith(
        (".safetensors", *PICKLE_SUFFIXES))


def find_in_hf_cache(model_id: str) -> tuple[Path, str] | None:
    """(snapshot folder, how it was chosen) for a model id in the local cache; None when absent."""
    try:
        return _find_snapshot(hf_hub_cache() / ("models--" + model_id.replace("/", "--")))
    except OSError:  # an unreadable cache is a cache without the model
        return None


def _find_snapshot(repo: Path) -> tuple[Path, str] | None:
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if commit and (snapshots / commit).is_dir():
            return snapshots / commit, f"revision main ({commit[:12]})"
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    note = "its only snapshot" if len(found) == 1 else f"the newest of {len(found)} snapshots (no refs/main)"
    return found[-1], f"{note} ({found[-1].name[:12]})"


def _not_found(value: str) -> ModelNotFound:
    if looks_like_model_id(value):
        return ModelNotFound(Problem(
            _where(value), f"no such file or folder, and model id {value} is not in the Hugging Face cache "
            f"({hf_hub_cache()}); loracli never downloads",
            f"get it with `huggingface-cli download {value}` (loracli then finds it by this id), or "
            f"`huggingface-cli download {value} --local-dir DIR` and set the path to DIR"))
    return ModelNotFound(Problem(_where(value), "no such file or folder",
                                "give a diffusers model folder, a .safetensors checkpoint, a model id in the "
                                "Hugging Face cache, or tiny:sd15 / tiny:sdxl (paths are relative to the "
                                "current folder)"))


# --- diffusers folders ------------------------------------------------------------------------------

def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(Problem(where, f"{path.name} is not readable JSON ({type(exc).__name__})",
                                   "the download is incomplete or the file was edited; fetch it again")) from None
    if not isinstance(data, dict):
        raise DatasetError(Problem(where, f"{path.name} is not a JSON object", "fetch the model again"))
    return data


def _components(index: dict[str, Any]) -> set[str]:
    """Components model_index.json declares (a [library, class] pair that is not null)."""
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and v[0] is not None and v[1] is not None}


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def probe_folder(folder: Path, where: str) -> tuple[str, str]:
    """(family, how) of a diffusers pipeline folder; one-line errors for anything else."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        what = "a single component's folder" if (folder / "config.json").is_file() else "not a diffusers model folder"
        raise DatasetError(Problem(where, f"{what} (no model_index.json)",
                                   "point to the pipeline folder that holds model_index.json, unet/ and vae/, or "
                                   "to a single .safetensors checkpoint"))
    index = _read_json(index_path, where)
    cls = str(index.get("_class_name", ""))
    parts = _components(index)
    unet_cfg = _read_json(folder / "unet" / "config.json", where) if (folder / "unet" / "config.json").is_file() else {}
    xl_signs = [s for s, on in (
        (f"model_index.json ({cls})", "XL" in cls),
        ("model_index.json (text_encoder_2)", "text_encoder_2" in parts),
        ("unet/config.json (addition_embed_type text_time)", unet_cfg.get("addition_embed_type") == "text_time"),
        ("unet/config.json (cross_attention_dim 2048)", unet_cfg.get("cross_attention_dim") == 2048),
    ) if on]
    if "unet" not in parts:
        raise ConfigError(Problem(where, f"a {cls or 'non-pipeline'} model without a UNet; loracli trains "
                                  "Stable Diffusion 1.x, 2.x and SDXL", "use an SD1.x, SD2.x or SDXL base model"))
    if xl_signs and ("text_encoder" not in parts or index.get("requires_aesthetics_score") is True):
        raise ConfigError(Problem(where, "this is an SDXL refiner (OpenCLIP bigG alone, no CLIP-L text encoder; "
                                  "aesthetic-score conditioning); LoRAs are trained on the SDXL base model",
                                  "use an SDXL base model (stable-diffusion-xl-base-1.0 or a fine-tune of it)"))
    in_channels = unet_cfg.get("in_channels", 4)
    if "Inpaint" in cls or in_channels == 9:
        family = "SDXL " if xl_signs else ""
        raise ConfigError(Problem(where, f"this is an {family}inpainting model (UNet in_channels {in_channels}, "
                                  f"{cls or 'pipeline'})", "train LoRAs on the text-to-image base model; they "
                                  "also load on its inpainting variant"))
    if in_channels != 4:
        raise ConfigError(Problem(where, f"a model whose UNet takes {in_channels} channels ({cls}), not a "
                                  "text-to-image base model", "use an SD1.x, SD2.x or SDXL base model"))
    if cls and "StableDiffusion" not in cls and not xl_signs:
        raise ConfigError(Problem(where, f"a {cls} model; loracli trains Stable Diffusion 1.x, 2.x and SDXL",
                                  "use an SD1.x, SD2.x or SDXL base model"))
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if xl_signs:
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [c for c in needed if not (folder / c).is_dir()]
    if missing:
        raise DatasetError(Problem(where, f"missing component folder(s): {', '.join(missing)}",
                                   "the download is incomplete; fetch the whole model folder again"))
    no_weights = [c for c in needed if c.startswith(("unet", "vae", "text_encoder")) and not _has_weights(folder / c)]
    if no_weights:
        variants = sorted(p.name for p in (folder / no_weights[0]).glob("*.*.safetensors"))
        hint = (f"{no_weights[0]}/ holds only variant weights ({variants[0]}); fetch the plain "
                "diffusion_pytorch_model.safetensors / model.safetensors files too") if variants else \
            "the download is incomplete; fetch the weights again"
        raise DatasetError(Problem(where, f"no weights in {', '.join(c + '/' for c in no_weights)}", hint))
    if xl_signs:
        return "sdxl", xl_signs[0]
    te_cfg = folder / "text_encoder" / "config.json"
    te = _read_json(te_cfg, where) if te_cfg.is_file() else {}
    if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024 or unet_cfg.get("cross_attention_dim") == 1024:
        return "sd2", "text_encoder/config.json (OpenCLIP ViT-H text encoder)"
    return "sd1", "text_encoder/config.json (CLIP ViT-L text encoder)"


# --- single files -----------------------------------------------------------------------------------

def _describe_other(keys: list[str]) -> str:
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return "diffusers UNet weights alone; point to the diffusers folder that holds model_index.json"
    if any(k.startswith(("encoder.down", "decoder.up", "quant_conv", VAE)) for k in keys):
        return "a VAE-only file"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return "a standalone text encoder file"
    if any(k.startswith(("transformer.", "double_blocks.", "joint_blocks.", "model.diffusion_model.joint_blocks"))
           for k in keys):
        return "a transformer (SD3/Flux-like) model"
    return f"no model.diffusion_model.* keys; first keys: {', '.join(keys[:3]) or 'no tensors'}"


def probe_header_keys(shapes: dict[str, tuple[int, ...]], where: str) -> tuple[str, str]:
    """(family, how) from a single file's key names and shapes; one-line errors for anything else."""
    keys = list(shapes)
    if any(k.startswith(LORA_PREFIXES) for k in keys) or \
            (keys and all(k.endswith(LORA_SUFFIXES) or "lora_" in k for k in keys[:50])):
        raise DatasetError(Problem(where, "this is a LoRA/LyCORIS file, not a base model",
                                   "point the model to the base checkpoint; continue from a LoRA with "
                                   "network.network_weights"))
    if not any(k.startswith(UNET) for k in keys):
        what = _describe_other(keys)
        raise DatasetError(Problem(where, f"not a Stable Diffusion checkpoint ({what})",
                                   "give an SD1.x/SD2.x/SDXL single-file checkpoint or a diffusers folder"))
    conv_in = shapes.get(f"{UNET}input_blocks.0.0.weight")
    label_emb = shapes.get(f"{UNET}label_emb.0.0.weight")
    has = {p: any(k.startswith(p) for k in keys) for p in (XL_CLIP_L, XL_BIGG, REFINER_BIGG, SD1_TEXT, SD2_TEXT, VAE)}
    xl = label_emb is not None or any(k.startswith("conditioner.embedders.") for k in keys)
    adm = label_emb[1] if label_emb is not None and len(label_emb) == 2 else None
    if xl and ((has[REFINER_BIGG] and not has[XL_CLIP_L]) or adm == 2560):
        raise ConfigError(Problem(where, "this is an SDXL refiner (conditioner.embedders.0 is OpenCLIP bigG alone, "
                                  f"no CLIP-L{f'; adm_in_channels {adm}' if adm else ''}); LoRAs are trained on "
                                  "the SDXL base model", "use an SDXL base checkpoint (sd_xl_base_1.0 or a "
                                  "fine-tune of it: Pony, Illustrious, NoobAI, ...)"))
    if conv_in is None or len(conv_in) != 4:
        raise DatasetError(Problem(where, "the UNet has no input_blocks.0.0 convolution",
                                   "the file is incomplete or not a Stable Diffusion model"))
    if conv_in[1] != 4:
        kind = ("an SDXL inpainting model" if xl else "an inpainting model") if conv_in[1] == 9 else \
            f"a model whose UNet takes {conv_in[1]} input channels"
        raise ConfigError(Problem(where, f"this is {kind} (UNet input_blocks.0.0 has {conv_in[1]} input channels, "
                                  "a text-to-image model has 4)", "train LoRAs on the text-to-image base model; "
                                  "they also load on its inpainting variant"))
    if not has[VAE]:
        raise DatasetError(Problem(where, "the checkpoint holds no VAE (first_stage_model.* keys)",
                                   "use a full checkpoint (UNet, VAE and text encoders in one file)"))
    if xl:
        if not (has[XL_CLIP_L] and has[XL_BIGG]):
            raise DatasetError(Problem(where, "the SDXL checkpoint lacks its text encoders "
                                       "(conditioner.embedders.0.transformer / conditioner.embedders.1.model)",
                                       "use a full checkpoint (UNet, VAE and both text encoders in one file)"))
        return "sdxl", "safetensors header (conditioner.embedders: CLIP-L + OpenCLIP bigG)"
    if has[SD2_TEXT]:
        return "sd2", "safetensors header (cond_stage_model.model: OpenCLIP ViT-H)"
    if has[SD1_TEXT]:
        return "sd1", "safetensors header (cond_stage_model.transformer: CLIP ViT-L)"
    raise DatasetError(Problem(where, "the checkpoint holds no text encoder (cond_stage_model.*)",
                               "use a full checkpoint (UNet, VAE and text encoder in one file)"))


def probe_single_file(path: Path, where: str) -> tuple[str, str]:
    try:
        header = read_header(path)
    except DatasetError as exc:  # the header reader names the file; name the key too
        problem = exc.problems[0]
        raise DatasetError(Problem(where, problem.message, "re-download the file; a partial download or a full "
                                   "disk cuts it short")) from None
    return probe_header_keys({name: entry.shape for name, entry in header.tensors.items()}, where)


# --- entry points -----------------------------------------------------------------------------------

def probe_model(value: str) -> ModelProbe:
    """Find and identify the base model; DatasetError/ConfigError (one line) when it cannot be used."""
    where = _where(value)
    if value.startswith("tiny:"):
        if value not in TINY_FAMILIES:
            raise ConfigError(Problem(where, "unknown built-in model", f"use {' or '.join(TINY_FAMILIES)}"))
        return ModelProbe(value, TINY_FAMILIES[value], "tiny", f"the name {value}, a built-in tiny model")
    path = Path(value).expanduser()
    source = ""
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: nothing by that name exists
        exists = False
    if not exists:
        cached = find_in_hf_cache(value) if looks_like_model_id(value) else None
        if cached is None:
            raise _not_found(value)
        path, how = cached
        source = f"Hugging Face cache, {how}: {path}"
        if not (path / "model_index.json").is_file():
            singles = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f"set the path to the checkpoint file in it, e.g. {path / singles[0]}" if singles else \
                f"fetch the whole pipeline with `huggingface-cli download {value}`"
            raise DatasetError(Problem(where, f"the cached snapshot {path} is not a diffusers pipeline "
                                       "(no model_index.json)", hint))
    if path.is_dir():
        family, how = probe_folder(path, where)
        return ModelProbe(str(path), family, "diffusers", how, source)
    if not path.is_file():
        raise DatasetError(Problem(where, "not a file or folder", "give a model folder or a checkpoint file"))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ModelProbe(str(path), None, "pickle", "")
    family, how = probe_single_file(path, where)
    return ModelProbe(str(path), family, "single-file", how)


@dataclass(frozen=True)
class FamilyChoice:
    family: ModelFamily
    how: str  # "detected from model_index.json (...)", "model.sdxl = true", ...


def resolve_family(model: ModelSection, probe: ModelProbe | None) -> FamilyChoice:
    """The family the run uses: `model.sdxl`/`model.v2` checked against what the probe found.

    `model.sdxl` unset means "as detected"; a flag that contradicts the model is a config error
    naming the key and what was found (sdxl_train_network.py also refuses v2 with SDXL).
    """
    problems: list[Problem] = []
    if model.v2 and model.sdxl:
        problems.append(Problem("model.v2", "v2 = true and sdxl = true: SDXL is not an SD2.x model",
                                "remove model.v2 (sdxl_train_network.py refuses v2 too)"))
    if problems:
        raise ConfigError(problems)
    detected = probe.family if probe else None
    if detected is None:  # a pickle, or no probe: the flags decide
        family = family_for(model.v2, model.sdxl)
        flag = "model.sdxl = true" if model.sdxl else "model.v2 = true" if model.v2 else \
            "the default (model.sdxl and model.v2 unset)"
        why = " (a pickled checkpoint is not read before training)" if probe and probe.kind == "pickle" else ""
        return FamilyChoice(family, f"from {flag}{why}")
    seen = f"{_title(detected)} (detected from {probe.detected_by})"
    if model.sdxl is False and detected == "sdxl":
        raise ConfigError(Problem("model.sdxl", f"is false but the model is {seen}",
                                  "set model.sdxl = true, or remove the key to use what is detected"))
    if model.sdxl and detected != "sdxl":
        raise ConfigError(Problem("model.sdxl", f"is true but the model is {seen}",
                                  "remove model.sdxl, or point the model to an SDXL checkpoint"))
    if model.v2 and detected != "sd2":
        raise ConfigError(Problem("model.v2", f"is true but the model is {seen}",
                                  "remove model.v2 (set model.v2 = false)"))
    if not model.v2 and detected == "sd2":
        raise ConfigError(Problem("model.v2", f"is false but the model is an SD2.x checkpoint (detected from "
                                  f"{probe.detected_by})",
                                  "set model.v2 = true (and model.v_parameterization = true for 768-v models)"))
    flag = " (model.sdxl = true agrees)" if model.sdxl else ""
    return FamilyChoice(FAMILIES[detected], f"detected from {probe.detected_by}{flag}")
