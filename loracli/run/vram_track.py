"""Live tensor bytes through real code: what the VRAM estimate is checked against.

`LiveBytes` is a TorchDispatchMode that sees every tensor an operator creates, counts its
storage once while it is alive (a weak reference tells it when the storage is freed) and
keeps the peak. Start it with the tensors that already exist (weights, inputs) so the peak
is the whole working set of the step, as a GPU allocator would see it (without its
rounding and caching), on any device, the CPU included.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # storage data pointer (or id) -> bytes
        for t in existing:
            self.track(t)

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr() or id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.track(t)
        return out


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def measure_training_step(sd, network, optimizer, batch: int, latent_hw: tuple[int, int], captions: list[str],
                          train_text_encoder: bool, weight_dtype: torch.dtype = torch.float32,
                          gradient_checkpointing: bool = False, steps: int = 2, fp8_unet: bool = False) -> int:
    """Peak live bytes over `steps` training steps (text encoding, UNet forward with the network,
    loss, backward, optimizer step) with the weights, the network and the optimizer state counted.
    The second step includes the optimizer state the first one created. fp8_unet: the UNet's
    weights stored in fp8 (training.fp8_base_unet), as the run stores them."""
    import torch.nn.functional as F

    from loracli.run.step import encode_prompts

    device = torch.device("cpu")
    for module in (sd.unet, *sd.text_encoders):
        module.to(device, dtype=weight_dtype)
    if fp8_unet:
        from loracli.run.fp8 import store_in_fp8

        store_in_fp8(sd.unet, weight_dtype)
    if gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        sd.unet.train()
    h, w = latent_hw
    latents = torch.randn(batch, 4, h, w)
    tracker = LiveBytes([*module_tensors(sd.unet, *sd.text_encoders, network), latents])
    autocast = torch.autocast("cpu", dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with tracker:
        for _ in range(steps):
            with autocast:
                with torch.set_grad_enabled(train_text_encoder):
                    hidden = encode_prompts(sd.tokenizers[0], sd.text_encoders[0], captions * batch, None, None,
                                            device)
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (batch,))
                pred = sd.unet((latents + noise).to(weight_dtype), t, hidden.to(weight_dtype)).sample
                loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del hidden, noise, pred, loss
    return tracker.peak


def build_sd15_topology(target, widths: tuple[int, ...] = (32, 64, 64, 64), text_hidden: int = 32) -> None:
    """A diffusers folder with SD1.5's block structure (3 cross-attention levels and a plain one, two
    layers per block) at small widths and random weights: the second model the estimate is held to."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loracli.run.clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=widths, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=32,
    )
    tokenizer = load_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 4, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(target))
