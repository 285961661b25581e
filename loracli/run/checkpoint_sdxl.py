"""Single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors` layout, shared by Pony, Illustrious,
NoobAI and the other SDXL fine-tunes), loaded fully offline.

The layout: the UNet under `model.diffusion_model.` (with `label_emb`, the text-time
embedding), the VAE under `first_stage_model.`, CLIP ViT-L under
`conditioner.embedders.0.transformer.` (transformers names) and OpenCLIP ViT-bigG under
`conditioner.embedders.1.model.` (OpenCLIP names, q/k/v fused, with `text_projection`).
The architecture is read from the tensor shapes, as for SD1/SD2 files; diffusers'
conversion functions rename the weights. Both tokenizers are CLIP's (shipped vocabulary);
the second pads with "!", as SDXL's does.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.run.checkpoint import (
    CLIP_VOCAB,
    UNET,
    VAE,
    SingleFileModel,
    _base_config,
    _build,
    _build_empty,
    _first_line,
    _indices,
    _where,
    check_text_to_image_unet,
    scheduler_config,
    unet_config,
    vae_config,
)

TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
REFINER_TE = "conditioner.embedders.0.model."  # the refiner has bigG only, as embedder 0


def check_sdxl(shapes: dict[str, tuple[int, ...]], path: Path, v2: bool, sdxl: bool | None) -> None:
    """One line naming what is wrong when the file is not an SDXL base model loracli can train on."""
    keys = list(shapes)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if sdxl is False or v2:
        key = "model.v2" if v2 else "model.sdxl"
        raise ConfigError(Problem(key, f"is {'true' if v2 else 'false'} but {path} is an SDXL checkpoint "
                                  "(conditioner.embedders keys)", "set model.sdxl = true (and model.v2 = false)"))
    if has(REFINER_TE) and not has(TE1):
        raise ConfigError(Problem(_where(path), "this is an SDXL refiner checkpoint (OpenCLIP bigG only, no CLIP-L)",
                                  "train LoRAs on the SDXL base model or a fine-tune of it"))
    check_text_to_image_unet(shapes, path, "SDXL")
    for prefix, what in ((VAE, "VAE (first_stage_model.*)"), (TE1, "CLIP-L text encoder (conditioner.embedders.0)"),
                         (TE2, "OpenCLIP bigG text encoder (conditioner.embedders.1)")):
        if not has(prefix):
            raise DatasetError(Problem(_where(path), f"the checkpoint holds no {what}",
                                       "use a full SDXL checkpoint (UNet, VAE and both text encoders in one file)"))


def sdxl_unet_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """SDXL's UNet from its shapes: the SD2-style reading (64-wide heads, linear projections) plus the
    text-time embedding, whose input is the pooled text vector and six 256-wide size embeddings."""
    config = unet_config(shapes, True, False)
    label_in = shapes[f"{UNET}label_emb.0.0.weight"][1]
    pooled = shapes[f"{TE2}text_projection"][1]
    config.update(addition_embed_type="text_time", addition_time_embed_dim=(label_in - pooled) // 6,
                  projection_class_embeddings_input_dim=label_in, upcast_attention=False)
    return config


def _clip_config(base: str, hidden_act: str, vocab: int, hidden: int, positions: int, layers: int,
                 intermediate: int, projection: int | None) -> dict[str, Any]:
    config = _base_config(base)
    heads = max(1, hidden // 64)  # both CLIP text towers use 64-wide heads
    while hidden % heads:
        heads -= 1
    config.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions, num_hidden_layers=layers,
                  intermediate_size=intermediate, num_attention_heads=heads, hidden_act=hidden_act)
    if projection is not None:
        config["projection_dim"] = projection
    return config


def te1_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    inner = f"{TE1}text_model."
    vocab, hidden = shapes[f"{inner}embeddings.token_embedding.weight"]
    return _clip_config("sd1_text_encoder.json", "quick_gelu", vocab, hidden,
                        shapes[f"{inner}embeddings.position_embedding.weight"][0],
                        len(_indices(shapes, f"{inner}encoder.layers.")),
                        shapes[f"{inner}encoder.layers.0.mlp.fc1.weight"][0], None)


def te2_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    vocab, hidden = shapes[f"{TE2}token_embedding.weight"]
    # every layer is kept: the pooled vector comes from the last one, the hidden states from the penultimate
    return _clip_config("sd1_text_encoder.json", "gelu", vocab, hidden, shapes[f"{TE2}positional_embedding"][0],
                        len(_indices(shapes, f"{TE2}transformer.resblocks.")),
                        shapes[f"{TE2}transformer.resblocks.0.mlp.c_fc.weight"][0],
                        shapes[f"{TE2}text_projection"][1])


def _te_states(checkpoint: dict[str, Any], t2: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    te1 = {k: v for k, v in checkpoint.items() if k.startswith(TE1)}
    state1 = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(te1, TE1).items()}
    state1.pop("embeddings.position_ids", None)
    te2 = {k: v for k, v in checkpoint.items() if k.startswith(TE2)}
    state2 = convert_open_clip_checkpoint(SimpleNamespace(config=t2), te2, prefix=TE2)
    state2 = {k.removeprefix("text_model."): v for k, v in state2.items()}
    state2.pop("embeddings.position_ids", None)
    return state1, state2


def _nest(model_cls: Any, config: Any, state: dict[str, Any]) -> dict[str, Any]:
    """transformers versions differ in whether the text tower sits under `text_model.`."""
    if hasattr(_build_empty(model_cls, config), "text_model"):
        return {(k if k.startswith("text_projection") else f"text_model.{k}"): v for k, v in state.items()}
    return state


def load_sdxl_single_file(path: Path, shapes: dict[str, tuple[int, ...]], checkpoint: dict[str, Any] | None,
                          *, v2: bool = False, sdxl: bool | None = None) -> SingleFileModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loracli.run.clip_tokenizer import load_clip_tokenizer

    check_sdxl(shapes, path, v2, sdxl)
    try:
        u_config, v_config = sdxl_unet_config(shapes), vae_config(shapes)
        t1, t2 = CLIPTextConfig(**te1_config(shapes)), CLIPTextConfig(**te2_config(shapes))
    except (KeyError, ValueError, IndexError) as exc:
        raise DatasetError(Problem(_where(path), f"an incomplete or unusual SDXL checkpoint (missing or odd "
                                   f"tensor: {_first_line(exc)})", "check the file is a full SDXL checkpoint")) from None
    v_config["scaling_factor"] = 0.13025
    if t1.vocab_size != CLIP_VOCAB or t2.vocab_size != CLIP_VOCAB:
        raise DatasetError(Problem(_where(path), f"the text encoders have {t1.vocab_size}/{t2.vocab_size} token "
                                   f"embeddings; CLIP's tokenizer has {CLIP_VOCAB}", "use an SDXL checkpoint"))
    if checkpoint is None:
        from safetensors.torch import load_file

        checkpoint = load_file(str(path))
    unet = _build(UNet2DConditionModel.from_config, u_config, convert_ldm_unet_checkpoint(checkpoint, u_config),
                  "UNet", path)
    vae = _build(AutoencoderKL.from_config, v_config, convert_ldm_vae_checkpoint(checkpoint, v_config), "VAE", path)
    state1, state2 = _te_states(checkpoint, t2)
    del checkpoint
    te1 = _build(lambda _c: CLIPTextModel(t1), {}, _nest(CLIPTextModel, t1, state1), "text encoder 1", path)
    te2 = _build(lambda _c: CLIPTextModelWithProjection(t2), {}, _nest(CLIPTextModelWithProjection, t2, state2),
                 "text encoder 2", path)
    tokenizers = [load_clip_tokenizer(False), load_clip_tokenizer(True)]  # the second pads with "!", as SDXL's
    # SDXL shares SD1's noise schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon)
    return SingleFileModel(tokenizers, [te1, te2], vae, unet, DDPMScheduler.from_config(scheduler_config(False)), "sdxl")
