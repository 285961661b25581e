"""Training throughput and peak memory of the LoRA step (cached latents, SDPA).

Builds full-size SD1.5 shapes with random weights (no download) on CUDA, or the
tiny model on a CPU, injects a LoRA (dim 32 / alpha 16) and times the training
step (text encoding, UNet forward/backward, AdamW update) per batch size.

    python benchmarks/train_throughput.py                      # sd15 shapes on CUDA, tiny on CPU
    python benchmarks/train_throughput.py --model tiny --batches 1 4 8 --steps 10
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from loracli.run.network import NetworkSpec, create_network, prepare_param_groups
from loracli.run.step import diffusion_loss, encode_prompts, sample_noise, sample_timesteps


def build(model: str):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    if model == "sd15":
        from transformers import CLIPTokenizer  # noqa: F401  (only the tiny tokenizer is shipped)

        from loracli.run.shapes import build_sd15_shapes
        from loracli.run.tiny_model import ensure_tiny_model

        unet, text_encoder, _ = build_sd15_shapes()
        tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny_model("tiny:sd15") / "tokenizer")
        return unet, text_encoder, tokenizer, scheduler, 64  # 512 px -> 64x64 latents
    from loracli.run.models import load_sd_components

    sd = load_sd_components("tiny:sd15")
    return sd.unet, sd.text_encoder, sd.tokenizer, scheduler, 8  # 64 px -> 8x8 latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15" if cuda else "tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16" if cuda else "fp32")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    unet, text_encoder, tokenizer, scheduler, latent_side = build(args.model)
    for module in (unet, text_encoder):
        module.requires_grad_(False)
    spec = NetworkSpec(algo="lora", dim=32, alpha=16, conv_dim=None, conv_alpha=None, dropout=None,
                       rank_dropout=0.0, module_dropout=0.0, use_tucker=False, use_scalar=False,
                       train_unet=True, train_text_encoder=True, extra_args={})
    network = create_network(spec, text_encoder, unet)
    unet.to(device, dtype)
    text_encoder.to(device, dtype)
    network.to(device)
    optimizer = torch.optim.AdamW(prepare_param_groups(network, 5e-5, 1e-4, 1e-4))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; model: {args.model}; dtype: {args.dtype}; "
          f"attention: SDPA; latents cached ({latent_side * 8} px)")
    for batch in args.batches:
        latents = torch.randn(batch, 4, latent_side, latent_side, device=device)
        captions = ["a photo of sks person, smiling, outdoors"] * batch
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                hidden = encode_prompts(tokenizer, text_encoder, captions, None, None, device)
                noise = sample_noise(latents, None, None, False, None, None, 0.3)
                t = sample_timesteps(batch, None, None, 1000, device, None)
                pred = unet(scheduler.add_noise(latents, noise, t).to(dtype), t, hidden.to(dtype)).sample
                loss = diffusion_loss(pred.float(), noise.float(), t, scheduler, torch.ones(batch, device=device),
                                      None, False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (allocations, kernels)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        print(f"batch {batch}: {batch * args.steps / elapsed:8.2f} images/s  {elapsed / args.steps * 1000:8.1f} ms/step"
              f"  peak {'VRAM' if cuda else 'RSS'} {peak:.2f} GiB")


if __name__ == "__main__":
    main()
