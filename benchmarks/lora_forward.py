"""Forward+backward time of plain LoRA: kohya's branch form vs LyCORIS' weight-rebuilding forward.

Builds an SD1.5-topology UNet (four levels, two layers per block, cross-attention in the
first three, SD1.5's heads) with smaller widths and random weights (no download), injects a
plain LoRA (dim 32 / alpha 16, UNet only) three ways, and times one training forward+backward
(MSE on the noise prediction, gradients into the LoRA only), the variants interleaved round by
round so drifts in machine load hit all of them alike:

  kohya           loracli.run.kohya_lora (sd-scripts' networks.lora: org(x) + up(down(x))·scale)
  lycoris         lycoris_lora's plain LoRA on the same targets, default mode (rebuilds W + ΔW)
  lycoris-bypass  the same with LyCORIS' bypass_mode (a branch, like kohya's)
  none            no LoRA (gradients to the input instead): the floor

    python benchmarks/lora_forward.py                          # CPU, fp32, widths 64/128/256/256
    python benchmarks/lora_forward.py --threads 1 --rounds 7
    python benchmarks/lora_forward.py --dtype bf16 --widths 320 640 1280 1280 --latent 64   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loracli.family import SD1
from loracli.run.kohya_lora import create_kohya_lora
from loracli.run.network import NetworkSpec
from loracli.run.shapes import sd15_unet_config

VARIANTS = ("kohya", "lycoris", "lycoris-bypass", "none")


def build_unet(widths: tuple[int, ...], context: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**sd15_unet_config(), "block_out_channels": widths,
                                   "cross_attention_dim": context})
    return unet.requires_grad_(False)


def lycoris_lora(unet, dim: int, alpha: float, bypass: bool):
    """LyCORIS' plain LoRA on kohya's targets (what loracli trained plain LoRA with before kohya_lora)."""
    import logging

    from lycoris.config import PRESET
    from lycoris.kohya import create_network as lycoris_create
    from lycoris.logging import logger as lycoris_logger

    from loracli.sdscripts.lycoris_targets import targets_for

    lycoris_logger.setLevel(logging.WARNING)
    PRESET["loracli"] = targets_for("lora")
    network = lycoris_create(1.0, dim, alpha, None, None, unet, algo="lora", preset="loracli",
                             warn_on_unmatched=False, bypass_mode=bypass)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return network.requires_grad_(True)


def inject(variant: str, unet, dim: int, alpha: float):
    if variant == "none":
        return torch.nn.Module()
    if variant == "kohya":
        spec = NetworkSpec(algo="lora", dim=dim, alpha=alpha, train_text_encoder=False)
        return create_kohya_lora(spec, [None], unet, SD1)
    return lycoris_lora(unet, dim, alpha, bypass=variant == "lycoris-bypass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 256])
    parser.add_argument("--context", type=int, default=768, help="cross-attention width (SD1.5: 768)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="base weights' dtype; the LoRA stays fp32 and the step runs under autocast")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    runs = {}
    for variant in args.variants:
        unet = build_unet(tuple(args.widths), args.context)
        network = inject(variant, unet, args.dim, args.alpha)
        unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
        network.to(device)
        network.train()
        runs[variant] = (unet, network)
    g = torch.Generator().manual_seed(1)
    # the input wants a gradient, so "none" runs the same backward through the activations
    latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device).requires_grad_(True)
    hidden = torch.randn(args.batch, 77, args.context, generator=g).to(device)
    target = torch.randn(latents.shape, generator=g).to(device)
    timesteps = torch.full((args.batch,), 500, device=device)

    def step(unet, network) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents.to(dtype), timesteps, hidden.to(dtype)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        network.zero_grad(set_to_none=True)
        latents.grad = None

    def timed(unet, network) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(unet, network)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps * 1000

    for unet, network in runs.values():
        step(unet, network)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in runs}
    for _ in range(args.rounds):
        for variant, (unet, network) in runs.items():
            times[variant].append(timed(unet, network))

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{where}; UNet widths {tuple(args.widths)}, latent {args.latent}x{args.latent}, batch {args.batch}, "
          f"base {args.dtype}, LoRA dim {args.dim}/alpha {args.alpha:g} on the UNet; "
          f"fwd+bwd ms/step over {args.rounds} rounds x {args.steps} steps")
    first = times[args.variants[0]]
    print(f"  {'':<15} {'min':>8} {'median':>8}   (x {args.variants[0]}: min, median; min is the figure "
          f"to trust on a busy machine)")
    for variant, values in times.items():
        low, median = min(values), statistics.median(values)
        print(f"  {variant:<15} {low:8.1f} {median:8.1f}   ({low / min(first):.2f}x, "
              f"{median / statistics.median(first):.2f}x)")


if __name__ == "__main__":
    main()
