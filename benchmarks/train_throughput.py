"""Training throughput and peak memory of the LoRA step (cached latents, SDPA).

Builds full-size SD1.5 or SDXL shapes with random weights (no download) on CUDA,
or a tiny model on a CPU, injects a LoRA (dim 32 / alpha 16) and times the training
step (text encoding, UNet forward/backward with the family's conditioning, AdamW
update) per batch size.

    python benchmarks/train_throughput.py                      # sd15 shapes on CUDA, tiny on CPU
    python benchmarks/train_throughput.py --model sdxl --batches 1 2 4 --dtype bf16   # SDXL at 1024 px
    python benchmarks/train_throughput.py --model tiny-sdxl --batches 1 4 8 --steps 10
    python benchmarks/train_throughput.py --compile inductor --fp8     # torch_compile, fp8_base

The first step of each batch size is timed apart ("first step"): with --compile it compiles the
UNet for that shape; the steady state is the --steps after it.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from loracli.family import SD1, SDXL
from loracli.run.conditioning import conditioner_for
from loracli.run.models import SDComponents, training_noise_scheduler
from loracli.run.network import NetworkSpec, create_network, prepare_param_groups
from loracli.run.step import diffusion_loss, sample_noise, sample_timesteps

MODELS = ("sd15", "sdxl", "tiny", "tiny-sdxl")


def build(model: str) -> tuple[SDComponents, int]:
    """The components and the latent side (512 px SD1.5 → 64, 1024 px SDXL → 128, 64 px tiny → 8)."""
    from loracli.run.clip_tokenizer import load_clip_tokenizer
    from loracli.run.models import load_sd_components

    scheduler = training_noise_scheduler(False)
    if model == "sd15":
        from loracli.run.shapes import build_sd15_shapes

        unet, text_encoder, _ = build_sd15_shapes()
        return SDComponents([load_clip_tokenizer()], [text_encoder], None, unet, scheduler, SD1, model), 64
    if model == "sdxl":
        from loracli.run.shapes import build_sdxl_shapes

        unet, text_encoders = build_sdxl_shapes()
        tokenizers = [load_clip_tokenizer(), load_clip_tokenizer(v2=True)]  # the second pads with "!"
        return SDComponents(tokenizers, text_encoders, None, unet, scheduler, SDXL, model), 128
    return load_sd_components("tiny:sdxl" if model == "tiny-sdxl" else "tiny:sd15"), 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", choices=MODELS, default="sd15" if cuda else "tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16" if cuda else "fp32")
    parser.add_argument("--compile", metavar="BACKEND", default=None,
                        help="torch.compile the UNet with this backend (training.torch_compile / dynamo_backend)")
    parser.add_argument("--fp8", action="store_true", help="frozen UNet and text-encoder weights in fp8 (fp8_base)")
    args = parser.parse_args()
    if args.fp8 and args.dtype == "fp32":
        parser.error("--fp8 computes in the mixed-precision dtype: add --dtype bf16 (or fp16)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    sd, latent_side = build(args.model)
    unet, scheduler = sd.unet, sd.noise_scheduler
    for module in (unet, *sd.text_encoders):
        module.requires_grad_(False)
    spec = NetworkSpec(algo="lora", dim=32, alpha=16, conv_dim=None, conv_alpha=None, dropout=None,
                       rank_dropout=0.0, module_dropout=0.0, use_tucker=False, use_scalar=False,
                       train_unet=True, train_text_encoder=True, extra_args={})
    network = create_network(spec, sd.text_encoders, unet, sd.family)
    for module in (unet, *sd.text_encoders):
        if args.fp8:
            from loracli.run.fp8 import store_in_fp8

            store_in_fp8(module, dtype)  # stored in fp8 before the move, as the run does
            module.to(device)
        else:
            module.to(device, dtype)
    network.to(device)
    if args.compile:
        from loracli.run.compiled import compile_unet

        compile_unet(unet, args.compile)
    conditioner = conditioner_for(sd, None, None)
    optimizer = torch.optim.AdamW(prepare_param_groups(network, 5e-5, 1e-4, 1e-4))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; model: {args.model}; dtype: {args.dtype}; "
          f"attention: SDPA; latents cached ({latent_side * 8} px); compile: {args.compile or 'off'}; "
          f"fp8 base: {'on' if args.fp8 else 'off'}")
    for batch in args.batches:
        latents = torch.randn(batch, 4, latent_side, latent_side, device=device)
        captions = ["a photo of sks person, smiling, outdoors"] * batch
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                cond = conditioner.encode(captions, device)
                noise = sample_noise(latents, None, None, False, None, None, 0.3)
                t = sample_timesteps(batch, None, None, 1000, device, None)
                size = latent_side * 8
                inputs = conditioner.unet_kwargs(cond, [(size, size)] * batch, [(size, size)] * batch,
                                                 [False] * batch, dtype)
                pred = unet(scheduler.add_noise(latents, noise, t).to(dtype), t, **inputs).sample
                loss = diffusion_loss(pred.float(), noise.float(), t, scheduler, torch.ones(batch, device=device),
                                      None, False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        first_started = time.perf_counter()
        step()  # warm-up (allocations, kernels; with --compile, compiling for this shape)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - first_started
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        print(f"batch {batch}: {batch * args.steps / elapsed:8.2f} images/s  {elapsed / args.steps * 1000:8.1f} ms/step"
              f"  first step {first:6.1f} s  peak {'VRAM' if cuda else 'RSS'} {peak:.2f} GiB")


if __name__ == "__main__":
    main()
