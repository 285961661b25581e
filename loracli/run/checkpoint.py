"""Single-file SD1.x/SD2.x checkpoints (original LDM layout), loaded fully offline.

The file's keys tell what it is; its tensor shapes give the architecture (widths,
depths, context size), laid over the SD1/SD2 base configs shipped in `assets/`.
diffusers' own LDM→diffusers key conversions do the renaming. Nothing is fetched
and nothing is written next to the user's file.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loracli.errors import ConfigError, DatasetError, Problem

KEY = "model.pretrained_model_name_or_path"
PICKLE_KEY = "model.allow_pickle_checkpoint"
ASSETS = Path(__file__).parent / "assets"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CLIP_VOCAB = 49408

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."  # SD1.x: transformers' CLIPTextModel names
OPEN_CLIP = "cond_stage_model.model."  # SD2.x: OpenCLIP names
LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "oft_blocks", "alpha")


@dataclass
class SingleFileModel:
    tokenizers: list[Any]
    text_encoders: list[Any]
    vae: Any
    unet: Any
    noise_scheduler: Any
    detected: str  # sd1 | sd2 | sdxl

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0]


def _where(path: Path) -> str:
    return f"{KEY}: {path}"


def _base_config(name: str) -> dict[str, Any]:
    data = json.loads((ASSETS / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_comment")}


# --- reading ----------------------------------------------------------------------------------------

def _shapes_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Every key and its shape, from the header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = f.keys()
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError) as exc:
        raise DatasetError(Problem(_where(path), f"not a readable .safetensors file ({_first_line(exc)})",
                                   "re-download the file; a partial download has a broken header")) from None


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        # weights_only refuses anything but tensors and plain containers; the user opted in
        # to running the file's pickled code, so unpickle it fully.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - unpickling can raise anything; report it in one line
            raise DatasetError(Problem(_where(path), f"cannot read the checkpoint ({_first_line(exc)})")) from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a bad magic number, ...
        raise DatasetError(Problem(_where(path), f"cannot read the checkpoint ({_first_line(exc)})")) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DatasetError(Problem(_where(path), f"holds a {type(obj).__name__}, not a state dict",
                                   "give an SD1.x/2.x checkpoint"))
    return {k: v for k, v in obj.items() if isinstance(k, str) and hasattr(v, "shape")}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_file_type(path: Path, allow_pickle: bool) -> str:
    """'safetensors' or 'pickle'; pickled files only with the opt-in (they can run code)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConfigError(Problem(_where(path), f"a {suffix} file is a pickle that can run code when loaded",
                                      f"use the .safetensors version of the model, or set {PICKLE_KEY} = true "
                                      "if you trust this file"))
        return "pickle"
    return "safetensors"


# --- what the file is -------------------------------------------------------------------------------

def is_sdxl(shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in shapes) or f"{UNET}label_emb.0.0.weight" in shapes


def check_text_to_image_unet(shapes: dict[str, tuple[int, ...]], path: Path, family: str) -> None:
    """The UNet takes 4 latent channels: a missing input conv or an inpainting-style UNet is one line."""
    conv_in = shapes.get(f"{UNET}input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise DatasetError(Problem(_where(path), "the UNet has no input_blocks.0.0 convolution",
                                   f"the file is incomplete or not an {family} model"))
    if conv_in[1] != 4:
        inpainting = "an SDXL inpainting model" if family == "SDXL" else "an inpainting model"
        kind = inpainting if conv_in[1] == 9 else f"a model whose UNet takes {conv_in[1]} channels"
        raise ConfigError(Problem(_where(path), f"this is {kind} (UNet in_channels {conv_in[1]}, expected 4)",
                                  "train LoRAs on the text-to-image base model; they also load on its "
                                  "inpainting variant"))


def detect(shapes: dict[str, tuple[int, ...]], path: Path, v2: bool) -> str:
    """'sd1' or 'sd2', or a one-line error naming what the file is and what to do (SDXL files go to
    loracli.run.checkpoint_sdxl before this)."""
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys) or \
            (keys and all(any(m in k for m in LORA_MARKERS) for k in keys[:50])):
        raise DatasetError(Problem(_where(path), "this is a LoRA/LyCORIS file, not a base model",
                                   "point to the SD1.x/2.x checkpoint; continue from a LoRA with "
                                   "network.network_weights"))
    if not any(k.startswith(UNET) for k in keys):
        raise DatasetError(Problem(_where(path), f"not a Stable Diffusion checkpoint ({_describe_other(keys)})",
                                   "give an SD1.x/2.x single-file checkpoint or a diffusers folder"))
    check_text_to_image_unet(shapes, path, "SD1.x/2.x")
    if not any(k.startswith(VAE) for k in keys):
        raise DatasetError(Problem(_where(path), "the checkpoint holds no VAE (first_stage_model.* keys)",
                                   "use a full checkpoint (UNet, VAE and text encoder in one file)"))
    if any(k.startswith(OPEN_CLIP) for k in keys):
        found = "sd2"
    elif any(k.startswith(CLIP_L) for k in keys):
        found = "sd1"
    else:
        raise DatasetError(Problem(_where(path), "the checkpoint holds no text encoder (cond_stage_model.*)",
                                   "use a full checkpoint (UNet, VAE and text encoder in one file)"))
    context = _context_dim(shapes)
    if found == "sd2" and not v2:
        raise ConfigError(Problem(_where(path), f"this is an SD2.x checkpoint (OpenCLIP text encoder, context "
                                  f"dim {context}) but model.v2 is false",
                                  "set model.v2 = true (and model.v_parameterization = true for 768-v models)"))
    if found == "sd1" and v2:
        raise ConfigError(Problem(_where(path), f"this is an SD1.x checkpoint (CLIP ViT-L text encoder, context "
                                  f"dim {context}) but model.v2 is true", "set model.v2 = false"))
    return found


def _describe_other(keys: list[str]) -> str:
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        return "diffusers UNet weights only; point to the diffusers folder that holds model_index.json"
    if any(k.startswith(("encoder.down", "decoder.up")) for k in keys):
        return "a standalone VAE file"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in keys):
        return "a standalone text encoder file"
    if any(k.startswith(("transformer.", "double_blocks.", "joint_blocks.")) for k in keys):
        return "a transformer (SD3/Flux-like) model"
    sample = ", ".join(keys[:3]) or "no tensors"
    return f"no model.diffusion_model.* keys; first keys: {sample}"


def _context_dim(shapes: dict[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight"):
            return shape[1]
    return None


# --- architecture from the tensor shapes ------------------------------------------------------------

def _indices(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[int]:
    """The sorted integers N of keys `prefix + N + '.'...`."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def unet_config(shapes: dict[str, tuple[int, ...]], v2: bool, v_parameterization: bool) -> dict[str, Any]:
    config = _base_config("sd2_unet.json" if v2 else "sd1_unet.json")
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth) of each resnet
    for i in _indices(shapes, f"{UNET}input_blocks.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if f"{block}0.op.weight" in shapes:  # a downsampler closes the level
            levels.append([])
            continue
        channels = shapes[f"{block}0.out_layers.3.weight"][0]
        depth = len(_indices(shapes, f"{block}1.transformer_blocks."))
        levels[-1].append((channels, depth))
    per_level = {len(level) for level in levels}
    if len(per_level) != 1 or 0 in per_level:
        raise ValueError(f"uneven UNet levels {[len(level) for level in levels]}")
    channels = [level[0][0] for level in levels]
    depths = [level[0][1] for level in levels]
    attention = [d > 0 for d in depths]
    proj_in = next((s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("proj_in.weight")), None)
    conv_in = shapes[f"{UNET}input_blocks.0.0.weight"]
    config.update(
        in_channels=conv_in[1],
        out_channels=shapes[f"{UNET}out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=per_level.pop(),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=_context_dim(shapes) or config["cross_attention_dim"],
        transformer_layers_per_block=max(depths) if len({d for d in depths if d}) <= 1 else
        [max(d, 1) for d in depths],
        use_linear_projection=proj_in is not None and len(proj_in) == 2,
    )
    # SD1 fixes the number of heads (8); SD2 fixes their width (64), so wider blocks get more heads.
    # (diffusers calls the head count attention_head_dim for these models.)
    config["attention_head_dim"] = [max(1, c // 64) for c in channels] if v2 else 8
    config["upcast_attention"] = bool(v2 and v_parameterization)  # 768-v overflows fp16 attention otherwise
    return config


def vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    config = _base_config("sd_vae.json")
    levels = _indices(shapes, f"{VAE}encoder.down.")
    channels = [shapes[f"{VAE}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    config.update(
        in_channels=shapes[f"{VAE}encoder.conv_in.weight"][1],
        out_channels=shapes[f"{VAE}decoder.conv_out.weight"][0],
        block_out_channels=channels,
        layers_per_block=len(_indices(shapes, f"{VAE}encoder.down.0.block.")),
        latent_channels=shapes[f"{VAE}decoder.conv_in.weight"][1],
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
    )
    return config


def _clip_l_inner(shapes: dict[str, tuple[int, ...]]) -> str:
    # Most files say cond_stage_model.transformer.text_model.*; some older ones drop text_model.
    return CLIP_L + ("text_model." if f"{CLIP_L}text_model.embeddings.token_embedding.weight" in shapes else "")


def text_encoder_config(shapes: dict[str, tuple[int, ...]], v2: bool) -> dict[str, Any]:
    config = _base_config("sd2_text_encoder.json" if v2 else "sd1_text_encoder.json")
    if v2:
        vocab, hidden = shapes[f"{OPEN_CLIP}token_embedding.weight"]
        positions = shapes[f"{OPEN_CLIP}positional_embedding"][0]
        # SD2 reads the penultimate layer: the model keeps all layers but the last.
        layers = len(_indices(shapes, f"{OPEN_CLIP}transformer.resblocks.")) - 1
        intermediate = shapes[f"{OPEN_CLIP}transformer.resblocks.0.mlp.c_fc.weight"][0]
    else:
        inner = _clip_l_inner(shapes)
        vocab, hidden = shapes[f"{inner}embeddings.token_embedding.weight"]
        positions = shapes[f"{inner}embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, f"{inner}encoder.layers."))
        intermediate = shapes[f"{inner}encoder.layers.0.mlp.fc1.weight"][0]
    heads = max(1, hidden // 64)  # both CLIP text towers use 64-wide heads
    while hidden % heads:
        heads -= 1
    config.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions,
                  num_hidden_layers=max(1, layers), intermediate_size=intermediate, num_attention_heads=heads)
    return config


def scheduler_config(v_parameterization: bool) -> dict[str, Any]:
    config = _base_config("scheduler.json")
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return config


# --- conversion -------------------------------------------------------------------------------------

def _float32(state: dict[str, Any]) -> dict[str, Any]:
    # Frozen weights load in fp32 like a diffusers folder; the trainer casts them for mixed precision.
    return {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in state.items()}


def _build(cls_from_config, config: dict[str, Any], state: dict[str, Any], what: str, path: Path):
    """Instantiate without random init, then assign the converted weights; every weight must be there."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls_from_config(config)
    state = {k: v for k, v in _float32(state).items() if v is not None}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor whose shape the derived config does not expect
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line] or [_first_line(exc)]
        raise DatasetError(Problem(_where(path), f"the {what} weights do not fit the architecture read from the "
                                   f"file ({lines[0][:200]})",
                                   "the checkpoint is unusual or not an SD1.x/2.x model")) from None
    on_meta = [n for n, p in model.named_parameters() if p.device == torch.device("meta")]
    missing = sorted(set(result.missing_keys) | set(on_meta))
    if missing:
        raise DatasetError(Problem(_where(path), f"the {what} weights do not match the shapes found in the file "
                                   f"({len(missing)} missing, e.g. {missing[0]})",
                                   "the checkpoint is incomplete or not an SD1.x/2.x model"))
    return model


def _text_encoder_state(model: Any, checkpoint: dict[str, Any], v2: bool, layers: int) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if v2:
        # Leave out the last layer (SD2 uses the penultimate one) and the projection (unused by SD).
        last = f"{OPEN_CLIP}transformer.resblocks.{layers}."
        kept = {k: v for k, v in checkpoint.items()
                if k.startswith(OPEN_CLIP) and not k.startswith(last) and k != f"{OPEN_CLIP}text_projection"}
        state = convert_open_clip_checkpoint(model, kept, prefix=OPEN_CLIP)
    else:
        inner = _clip_l_inner(checkpoint)
        if inner == CLIP_L:  # the older layout: put text_model. back
            checkpoint = {CLIP_L + "text_model." + k[len(CLIP_L):]: v for k, v in checkpoint.items()
                          if k.startswith(CLIP_L)}
        state = convert_ldm_clip_checkpoint(checkpoint)
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state.pop("embeddings.position_ids", None)  # a buffer, not a weight
    state.pop("text_projection.weight", None)
    return state


def load_single_file(path: Path, v2: bool = False, v_parameterization: bool = False,
                     allow_pickle: bool = False, sdxl: bool | None = None) -> SingleFileModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from loracli.run.clip_tokenizer import load_clip_tokenizer

    kind = check_file_type(path, allow_pickle)
    if kind == "safetensors":
        shapes = _shapes_safetensors(path)
        checkpoint = None
    else:
        checkpoint = _load_pickle(path)
        shapes = {k: tuple(v.shape) for k, v in checkpoint.items()}
    if is_sdxl(shapes) or sdxl:
        from loracli.run.checkpoint_sdxl import load_sdxl_single_file

        return load_sdxl_single_file(path, shapes, checkpoint, v2=v2, sdxl=sdxl)
    detected = detect(shapes, path, v2)
    if checkpoint is None:
        from safetensors.torch import load_file

        checkpoint = load_file(str(path))
    try:
        u_config, v_config = unet_config(shapes, v2, v_parameterization), vae_config(shapes)
        t_config = text_encoder_config(shapes, v2)
    except (KeyError, ValueError, IndexError) as exc:
        raise DatasetError(Problem(_where(path), f"an incomplete or unusual {detected.upper()} checkpoint "
                                   f"(missing or odd tensor: {_first_line(exc)})",
                                   "check the file is a full SD1.x/2.x checkpoint")) from None
    if t_config["vocab_size"] != CLIP_VOCAB:
        raise DatasetError(Problem(_where(path), f"the text encoder has {t_config['vocab_size']} token embeddings; "
                                   f"CLIP's tokenizer has {CLIP_VOCAB}", "use an SD1.x/2.x checkpoint"))

    unet = _build(UNet2DConditionModel.from_config, u_config,
                  convert_ldm_unet_checkpoint(checkpoint, u_config), "UNet", path)
    vae = _build(AutoencoderKL.from_config, v_config, convert_ldm_vae_checkpoint(checkpoint, v_config), "VAE", path)
    te_config = CLIPTextConfig(**t_config)
    # convert_open_clip_checkpoint only reads the model's config (hidden size, to split q/k/v).
    te_state = _text_encoder_state(SimpleNamespace(config=te_config), checkpoint, v2, t_config["num_hidden_layers"])
    if hasattr(_build_empty(CLIPTextModel, te_config), "text_model"):  # transformers < 5.6 nests the tower
        te_state = {f"text_model.{k}": v for k, v in te_state.items()}
    text_encoder = _build(lambda _c: CLIPTextModel(te_config), {}, te_state, "text encoder", path)
    del checkpoint
    noise_scheduler = DDPMScheduler.from_config(scheduler_config(v_parameterization))
    tokenizer = load_clip_tokenizer(v2)
    return SingleFileModel([tokenizer], [text_encoder], vae, unet, noise_scheduler, detected)



def _build_empty(cls: Any, config: Any) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(config)
