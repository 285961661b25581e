"""Full-size SD1.5 and SDXL shapes with random weights: for counts, benchmarks and VRAM figures.

No download: the architecture comes from the published configuration values
(UNets of SD1.5 and SDXL base, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
encoders, the SD VAE).
"""

from __future__ import annotations


def sd15_unet_config() -> dict:
    return {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8,
    }


def clip_l_text_config() -> dict:
    return {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    }


def sdxl_unet_config() -> dict:
    return {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 size numbers x 256
    }


def bigg_text_config() -> dict:
    """OpenCLIP ViT-bigG/14's text tower as transformers' CLIPTextModelWithProjection (SDXL's second encoder)."""
    return {**clip_l_text_config(), "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
            "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu", "pad_token_id": 0}


def sd_vae_config() -> dict:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "sample_size": 512,
    }


def build_sd15_shapes(with_vae: bool = False):
    """(unet, text_encoder, vae|None) with SD1.5's shapes and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**sd15_unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l_text_config()))
    vae = AutoencoderKL(**sd_vae_config()) if with_vae else None
    return unet, text_encoder, vae


def build_sdxl_shapes():
    """(unet, [text_encoder, text_encoder_2]) with SDXL base's shapes and random weights (~10 GB in fp32)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**sdxl_unet_config())
    text_encoders = [CLIPTextModel(CLIPTextConfig(**clip_l_text_config())),
                     CLIPTextModelWithProjection(CLIPTextConfig(**bigg_text_config()))]
    return unet, text_encoders
