"""`tiny:sd15` and `tiny:sdxl`: tiny, deterministic, random-weight pipelines built from configs.

For smoke tests and CI runs of users' configs: `tiny:sd15` has SD1.x's structure
(CrossAttn blocks, a VAE with a latent factor of 8, a CLIP text encoder, the
SD1.5 noise schedule); `tiny:sdxl` has SDXL base's block layout (three levels,
two layers per block, transformers in levels 2 and 3 and the middle, linear
projections, text-time conditioning, two text encoders, the second one with a
projection and a "!"-padding tokenizer). Both train in milliseconds per step on a CPU.
The tokenizer vocabulary is written by this module (byte-level characters and a
few merges), so nothing is ever downloaded. Built once, cached on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TINY_VERSION = 2
TINY_MODELS = {"tiny:sd15": f"tiny-sd15-v{TINY_VERSION}", "tiny:sdxl": "tiny-sdxl-v1"}
MERGES = ["t h", "th e</w>", "a n", "i n", "o n", "e r", "r e", "a r", "o r", "e n"]


# The tiny UNets' configs and text-encoder depths as plain values, so the plan side (torch-free) can lay out
# their LoRA modules before a tiny model is ever built (loracli.network_layout).
TINY_SD15_UNET = {
    "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
TINY_SDXL_TIME_DIM = 8  # SDXL: 256 per number, 6 numbers; pooled 1280 → 2816
TINY_SDXL_UNET = {
    "sample_size": 8, "block_out_channels": (32, 64, 64), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (1, 1, 1),  # 64-wide heads, as SDXL
    "cross_attention_dim": 96, "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": TINY_SDXL_TIME_DIM,
    "projection_class_embeddings_input_dim": 32 + 6 * TINY_SDXL_TIME_DIM,
}
TINY_TEXT_LAYERS = {"tiny:sd15": (2,), "tiny:sdxl": (2, 3)}  # num_hidden_layers of each text encoder


def cache_root() -> Path:
    return Path(os.environ.get("LORACLI_CACHE") or Path.home() / ".cache" / "loracli")


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt for CLIPTokenizer: bytes, bytes + </w>, merges, specials."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")


def build_tiny_sd15(target: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)  # deterministic weights: the same model on every machine
    unet = UNet2DConditionModel(**TINY_SD15_UNET)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=64,
    )
    tok_dir = target / "_tokenizer_src"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon",
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(target)
    shutil.rmtree(tok_dir)


def build_tiny_sdxl(target: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = target / "_tokenizer_src"
    write_tokenizer_files(tok_dir)
    files = (str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*files, pad_token="!", model_max_length=77)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    # CLIP-L's penultimate layer (32 wide here) + bigG's (64 wide) make the UNet's context (96).
    # Heads are 64 wide (one here), as in both real encoders, so single-file configs can be read off shapes.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=32, pad_token_id=tokenizer.pad_token_id, **specials,
    ))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=1, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        pad_token_id=tokenizer_2.pad_token_id, **specials,
    ))
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(target)
    shutil.rmtree(tok_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny:sd15": build_tiny_sd15, "tiny:sdxl": build_tiny_sdxl}


def ensure_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of a built-in tiny model, building it on first use."""
    if name not in TINY_MODELS:
        from loracli.errors import ConfigError, Problem

        raise ConfigError(Problem("model.pretrained_model_name_or_path", f"unknown built-in model {name!r}",
                                  f"built-in models: {', '.join(TINY_MODELS)}"))
    return build_cached_folder((cache_dir or cache_root()) / TINY_MODELS[name], "model_index.json", BUILDERS[name])


def build_cached_folder(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """target, built by `build` on first use. It builds beside the target and renames into place,
    so two processes building at once never see (or leave) a half-written folder."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).is_file():  # lost a race to a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
