"""Test support: tiny random SD1.x/SD2.x checkpoints in the ORIGINAL (LDM/CompVis) single-file layout.

We build small diffusers/transformers modules with random weights and rename their
tensors the way the original Stable Diffusion code names them (model.diffusion_model.*,
first_stage_model.*, cond_stage_model.*), so the loader under test sees what a
downloaded checkpoint holds. The renaming is written here independently of the loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_VOCAB = 49408
WIDTHS = (32, 64)  # UNet levels; LDM's GroupNorm always has 32 groups
LAYERS = 1
VAE_WIDTHS = (32, 32, 32, 32)  # four levels: latents are 1/8 of the image, as in SD


def _resnet_unet(name: str) -> str:
    for old, new in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                     ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                     ("conv_shortcut", "skip_connection")):
        if name.startswith(old + "."):
            return new + name[len(old):]
    raise KeyError(name)


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int = LAYERS) -> dict[str, torch.Tensor]:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        stem = ".".join(parts[:-1])
        if stem in fixed:
            new = f"{fixed[stem]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            b = int(parts[1])
            if parts[2] == "downsamplers":
                new = f"input_blocks.{(b + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                index = 1 + b * (layers + 1) + j
                new = f"input_blocks.{index}.0.{_resnet_unet(rest)}" if parts[2] == "resnets" else \
                    f"input_blocks.{index}.1.{rest}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet_unet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b = int(parts[1])
            if parts[2] == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in state)
                new = f"output_blocks.{b * (layers + 1) + layers}.{2 if has_attention else 1}.conv.{parts[-1]}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                index = b * (layers + 1) + j
                new = f"output_blocks.{index}.0.{_resnet_unet(rest)}" if parts[2] == "resnets" else \
                    f"output_blocks.{index}.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def _vae_attention(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
        value = value[:, :, None, None]
    return rest, value


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if side == "encoder" else levels - 1 - i
            word = "down" if side == "encoder" else "up"
            if parts[3] in ("downsamplers", "upsamplers"):
                new = f"{side}.{word}.{level}.{word}sample.conv.{parts[-1]}"
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{word}.{level}.block.{parts[4]}.{rest}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                rest, value = _vae_attention(rest, value)
                new = f"{side}.mid.attn_1.{rest}"
        else:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
                ) -> dict[str, torch.Tensor]:
    """SD1.x: the transformers names, under cond_stage_model.transformer.text_model (SDXL: embedder 0)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        out[prefix + "text_model." + key] = value
    return out


def open_clip_to_ldm(state: dict[str, torch.Tensor], projection: int = 16,
                     p: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """SD2.x: OpenCLIP names, q/k/v fused into in_proj, under cond_stage_model.model (SDXL: embedder 1,
    with its real projection: OpenCLIP stores the transpose of a Linear weight)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"]}
    width = state["embeddings.token_embedding.weight"].shape[1]
    if "text_projection.weight" in state:
        out[p + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:
        out[p + "text_projection"] = torch.randn(width, projection)
    out[p + "logit_scale"] = torch.tensor(4.6)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def build_tiny_modules(v2: bool = False, seed: int = 0):
    """Random (unet, vae, text_encoder) at tiny widths, with CLIP's real vocabulary size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    context = 64 if v2 else 32
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=WIDTHS, layers_per_block=LAYERS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, attention_head_dim=[1, 1] if v2 else 8, use_linear_projection=v2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=VAE_WIDTHS, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=64)
    # SD2 files hold one more text layer than the model uses (it reads the penultimate one).
    text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=context, intermediate_size=2 * context,
                                        num_hidden_layers=3 if v2 else 2, num_attention_heads=1,
                                        max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu"))
    return unet.eval(), vae.eval(), text.eval()


def ldm_state(unet, vae, text, v2: bool = False) -> dict[str, torch.Tensor]:
    """The modules' weights under the original single-file names."""
    te = open_clip_to_ldm(text.state_dict()) if v2 else clip_to_ldm(text.state_dict())
    state = {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict()), **te}
    # What real SD1.x files also carry: the noise schedule buffers, unused by loaders.
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return {k: v.contiguous() for k, v in state.items()}


def write_checkpoint(path: Path, v2: bool = False, half: bool = True, modules=None) -> Path:
    """Save as .safetensors (fp16 like most downloads) or, for .ckpt, a torch pickle with state_dict."""
    state = ldm_state(*(modules or build_tiny_modules(v2)), v2=v2)
    if half:
        state = {k: v.half() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, str(path))
    return path


def sdxl_ldm_state(pipe) -> dict[str, torch.Tensor]:
    """An SDXL pipeline's weights under sd_xl_base_1.0.safetensors' names."""
    state = {**unet_to_ldm(pipe.unet.state_dict(), layers=pipe.unet.config.layers_per_block),
             **vae_to_ldm(pipe.vae.state_dict()),
             **clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."),
             **open_clip_to_ldm(pipe.text_encoder_2.state_dict(), p="conditioner.embedders.1.model.")}
    return {k: v.contiguous() for k, v in state.items()}
