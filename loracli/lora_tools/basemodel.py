"""Where each kohya LoRA module's weight lives in a base model, without loading the model.

A base model is a single-file checkpoint (original LDM/SAI layout, SD1/SD2/SDXL) or
a diffusers folder (SD1/SD2/SDXL). The index maps every kohya module name a LoRA
can carry (`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`) to the
tensor that holds its weight - a row block of a fused `in_proj_weight` for the
OpenCLIP text encoders - read on demand through `safe_open`.

kohya names: SD1/SD2 UNet modules by their diffusers path; SDXL UNet modules by the
SAI path (loracli.keymap); text encoders by transformers' CLIPTextModel path. For an
SD1/SD2 single file the SAI→diffusers direction comes from the module names of a
diffusers UNet built (empty, on the meta device) from the file's own shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import FAMILIES
from loracli.keymap import diffusers_to_sai

UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
# UNet modules outside the blocks (LyCORIS' wider presets can target them): diffusers → SAI.
FIXED_UNET = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_CLIP_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\."
                         r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$")
_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                              r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPEN_CLIP_NAMES = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
                    "mlp.c_proj.weight": "mlp_fc2"}
_RESNET_SAI = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$")
_SAMPLER_SAI = re.compile(r"(^input_blocks\.\d+\.0\.op$)|(^output_blocks\.\d+\.\d+\.conv$)")


@dataclass(frozen=True)
class Target:
    kohya: str  # the LoRA module name
    file: str  # which safetensors file (a diffusers folder has one per component)
    key: str  # the tensor holding the weight
    shape: tuple[int, ...]  # the module weight's shape (the row block's, for fused q/k/v)
    kind: str  # attn | block (ResNet/sampler) | text | other
    rows: tuple[int, int] | None = None  # a row block of a fused tensor

    @property
    def conv3(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)


@dataclass
class BaseModel:
    path: Path
    family: str  # sd1 | sd2 | sdxl
    layout: str  # single-file | diffusers
    files: dict[str, Path]
    targets: dict[str, Target] = field(default_factory=dict)
    v_parameterization: bool = False
    unet_config: dict = field(default_factory=dict)  # diffusers folders
    _handles: dict[str, object] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return FAMILIES[self.family].title

    def handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.files[file]), framework="pt", device="cpu")
        return self._handles[file]

    def read(self, target: Target) -> torch.Tensor:
        handle = self.handle(target.file)
        if target.rows is None:
            return handle.get_tensor(target.key)
        return handle.get_slice(target.key)[target.rows[0]:target.rows[1]]


def _where(path: Path, option: str) -> str:
    return f"{option} {path}".strip()


def _shapes(path: Path, option: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from loracli.safetensors_header import read_header

    header = read_header(path)
    return {k: e.shape for k, e in header.tensors.items()}, {k: e.dtype for k, e in header.tensors.items()}


def _kind_from_sai(sai: str) -> str:
    if ".transformer_blocks." in sai or sai.endswith((".proj_in", ".proj_out")):
        return "attn"
    if _RESNET_SAI.search(sai) or _SAMPLER_SAI.search(sai):
        return "block"
    return "other"


def _name(prefix: str, path: str) -> str:
    return f"{prefix}_{path}".replace(".", "_")


def _clip_targets(shapes: dict[str, tuple[int, ...]], prefix: str, file: str, lora_prefix: str,
                  skip_layer: int | None = None) -> dict[str, Target]:
    """CLIP-L style text encoder (transformers names) stored under `prefix`."""
    out = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        m = _CLIP_LAYER.match(key[len(prefix):])
        if m and int(m[1]) != skip_layer:
            name = _name(lora_prefix, f"text_model.encoder.layers.{m[1]}.{m[2]}")
            out[name] = Target(name, file, key, shape, "text")
    return out


def _open_clip_targets(shapes: dict[str, tuple[int, ...]], prefix: str, file: str, lora_prefix: str,
                       skip_layer: int | None = None) -> dict[str, Target]:
    """OpenCLIP text encoder (SD2, SDXL's second): fused q/k/v become three row blocks."""
    out = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        m = _OPEN_CLIP_LAYER.match(key[len(prefix):])
        if not m or int(m[1]) == skip_layer:
            continue
        layer = f"text_model.encoder.layers.{m[1]}"
        if m[2] == "attn.in_proj_weight":
            width = shape[0] // 3
            for i, part in enumerate("qkv"):
                name = _name(lora_prefix, f"{layer}.self_attn.{part}_proj")
                out[name] = Target(name, file, key, (width, shape[1]), "text", (i * width, (i + 1) * width))
        else:
            name = _name(lora_prefix, f"{layer}.{_OPEN_CLIP_NAMES[m[2]]}")
            out[name] = Target(name, file, key, shape, "text")
    return out


def _unet_layout(config: dict) -> tuple[int, frozenset[int]]:
    layers = config.get("layers_per_block", 2)
    layers = layers if isinstance(layers, int) else layers[0]
    up_attention = frozenset(i for i, t in enumerate(config.get("up_block_types", [])) if "CrossAttn" in t)
    return layers, up_attention


def _diffusers_sai_pairs(config: dict) -> dict[str, str]:
    """SAI path → diffusers path of every weight of a diffusers UNet with this config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    layers, up_attention = _unet_layout(config)
    pairs = {}
    for name, param in unet.named_parameters():
        if name.endswith(".weight") and param.dim() >= 2:
            path = name[: -len(".weight")]
            pairs[FIXED_UNET.get(path) or diffusers_to_sai(path, layers, up_attention)] = path
    return pairs


def _unet_targets_ldm(shapes: dict[str, tuple[int, ...]], family: str, sai_to_diffusers: dict[str, str] | None
                      ) -> dict[str, Target]:
    out = {}
    for key, shape in shapes.items():
        if not (key.startswith(UNET) and key.endswith(".weight") and len(shape) >= 2):
            continue
        sai = key[len(UNET): -len(".weight")]
        if family == "sdxl":
            name = _name("lora_unet", sai)
        else:
            path = (sai_to_diffusers or {}).get(sai)
            if path is None:
                continue
            name = _name("lora_unet", path)
        out[name] = Target(name, "checkpoint", key, shape, _kind_from_sai(sai))
    return out


def _detect_single_file(shapes: dict[str, tuple[int, ...]], where: str) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise DatasetError(Problem(where, "this is a LoRA file, not a base model", "give the checkpoint"))
    if not any(k.startswith(UNET) for k in keys):
        hint = "a diffusers UNet file? give the folder holding model_index.json" \
            if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys) else \
            "give an SD1/SD2/SDXL single-file checkpoint or a diffusers folder"
        raise DatasetError(Problem(where, "not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)", hint))
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith(OPEN_CLIP) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_L) for k in keys):
        return "sd1"
    raise DatasetError(Problem(where, "the checkpoint holds no text encoder (cond_stage_model.* / conditioner.*)",
                               "use a full checkpoint"))


def _layers(shapes: dict[str, tuple[int, ...]], prefix: str, pattern: str) -> int:
    found = {int(m[1]) for k in shapes if k.startswith(prefix) and (m := re.match(pattern, k[len(prefix):]))}
    return max(found) + 1 if found else 0


def _open_single_file(path: Path, option: str) -> BaseModel:
    where = _where(path, option)
    if path.suffix.lower() != ".safetensors":
        raise DatasetError(Problem(where, f"a {path.suffix or 'suffix-less'} file; only .safetensors checkpoints "
                                   "are read (pickles can run code)", "use the model's .safetensors download"))
    shapes, _ = _shapes(path, option)
    family = _detect_single_file(shapes, where)
    model = BaseModel(path, family, "single-file", {"checkpoint": path})
    if family == "sdxl":
        model.targets.update(_unet_targets_ldm(shapes, family, None))
        model.targets.update(_clip_targets(shapes, SDXL_TE1, "checkpoint", "lora_te1"))
        model.targets.update(_open_clip_targets(shapes, SDXL_TE2, "checkpoint", "lora_te2"))
        return model
    from loracli.run.checkpoint import unet_config

    v2 = family == "sd2"
    try:
        config = unet_config(shapes, v2, False)
        pairs = _diffusers_sai_pairs(config)
    except (KeyError, ValueError, IndexError) as exc:
        raise DatasetError(Problem(where, f"an incomplete or unusual {FAMILIES[family].title} checkpoint ({exc})",
                                   "check the file is a full checkpoint")) from None
    model.targets.update(_unet_targets_ldm(shapes, family, pairs))
    if v2:
        # SD2 reads the penultimate layer: the text encoder kohya trains has one layer less than the file
        last = _layers(shapes, OPEN_CLIP, r"transformer\.resblocks\.(\d+)\.") - 1
        model.targets.update(_open_clip_targets(shapes, OPEN_CLIP, "checkpoint", "lora_te", skip_layer=last))
        model.v_parameterization = True  # sd-scripts' default for v2 models (a single file does not say)
    else:
        model.targets.update(_clip_targets(shapes, CLIP_L, "checkpoint", "lora_te"))
    return model


def _component_file(folder: Path, component: str, where: str) -> dict[str, Path]:
    """tensor key → file for one diffusers component (single or sharded safetensors)."""
    sub = folder / component
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        return {k: sub / v for k, v in weight_map.items()}
    files = sorted(p for p in sub.glob("*.safetensors") if not p.name.startswith("."))
    plain = [p for p in files if p.name.count(".") == 1] or files
    if not plain:
        raise DatasetError(Problem(where, f"{component}/ holds no .safetensors weights",
                                   "re-save the model with safetensors (pickled .bin weights are not read)"))
    shapes, _ = _shapes(plain[0], "")
    return {k: plain[0] for k in shapes}


def _open_diffusers(path: Path, option: str) -> BaseModel:
    where = _where(path, option)
    index = json.loads((path / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    sdxl = "XL" in cls
    te_config = json.loads((path / "text_encoder" / "config.json").read_text()) \
        if (path / "text_encoder" / "config.json").is_file() else {}
    family = "sdxl" if sdxl else ("sd2" if te_config.get("hidden_act") == "gelu" else "sd1")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    scheduler = path / "scheduler" / "scheduler_config.json"
    v_param = scheduler.is_file() and json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction"
    model = BaseModel(path, family, "diffusers", {}, v_parameterization=v_param, unet_config=unet_config)
    layers, up_attention = _unet_layout(unet_config)
    components = [("unet", None), ("text_encoder", "lora_te1" if sdxl else "lora_te")]
    if sdxl:
        components.append(("text_encoder_2", "lora_te2"))
    for component, lora_prefix in components:
        files = _component_file(path, component, where)
        by_file: dict[Path, list[str]] = {}
        for key, file in files.items():
            by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            label = str(file.relative_to(path))
            model.files[label] = file
            shapes, _ = _shapes(file, option)
            shapes = {k: v for k, v in shapes.items() if k in set(keys)}
            if lora_prefix:
                model.targets.update(_clip_targets(shapes, "", label, lora_prefix))
                continue
            for key, shape in shapes.items():
                if not key.endswith(".weight") or len(shape) < 2:
                    continue
                dpath = key[: -len(".weight")]
                sai = FIXED_UNET.get(dpath) or diffusers_to_sai(dpath, layers, up_attention)
                name = _name("lora_unet", sai if sdxl else dpath)
                model.targets[name] = Target(name, label, key, shape, _kind_from_sai(sai))
    return model


def open_base_model(path: Path, option: str = "") -> BaseModel:
    """The index of a base model, or a one-line error (exit 3) naming the file."""
    path = Path(path)
    where = _where(path, option)
    if not path.exists():
        raise DatasetError(Problem(where, "no such file or folder", "check the path"))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DatasetError(Problem(where, "a folder without model_index.json",
                                       "give a diffusers model folder or a single-file checkpoint"))
        try:
            return _open_diffusers(path, option)
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise DatasetError(Problem(where, f"an unreadable diffusers folder ({exc})",
                                       "check the folder is a complete diffusers model")) from None
    return _open_single_file(path, option)


def check_family(lora_is_sdxl: bool, lora_where: str, base: BaseModel) -> None:
    """An SDXL LoRA on an SD1/SD2 model (or the reverse) is refused before any work."""
    if lora_is_sdxl != (base.family == "sdxl"):
        made = "SDXL" if lora_is_sdxl else "SD1.x/SD2.x"
        raise ConfigError(Problem(lora_where, f"the LoRA is for {made} (its module names say so) but the base model "
                                  f"{base.path} is {base.title}", f"use an {made} base model"))
