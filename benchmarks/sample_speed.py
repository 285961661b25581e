"""Time of one sample image (text encoding, denoising with CFG, VAE decode) per sampler.

The tiny model on a CPU by default; full-size SD1.5 shapes with random weights
(no download) with --model sd15 (meant for a CUDA GPU). A LoRA is hooked in, as
during training.

    python benchmarks/sample_speed.py                                   # tiny, 128 px, 20 steps
    python benchmarks/sample_speed.py --model sd15 --size 512 --steps 30 --samplers euler_a ddim
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from loracli.family import family_for
from loracli.run.network import NetworkSpec, create_network
from loracli.run.sampling import build_pipeline, generate, inference_mode
from loracli.sample_prompts import parse_prompt_line


def components(model: str, device: str):
    from loracli.run.models import load_sd_components

    sd = load_sd_components("tiny:sd15")  # tokenizer and scheduler (and the tiny weights)
    if model == "sd15":
        from loracli.run.shapes import build_sd15_shapes

        unet, text_encoder, vae = build_sd15_shapes(with_vae=True)
        # the tiny tokenizer's ids stay inside CLIP-L's 49,408-entry embedding
        sd = SimpleNamespace(tokenizer=sd.tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                             noise_scheduler=sd.noise_scheduler, family=family_for(False))
    dtype = torch.float16 if device == "cuda" else torch.float32
    for module in (sd.unet, sd.text_encoder, sd.vae):
        module.to(device, dtype=dtype).requires_grad_(False)
    network = create_network(NetworkSpec(algo="lora", dim=32, alpha=16), sd.text_encoder, sd.unet)
    network.to(device)
    return sd, network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=3, help="timed images per sampler (after one warm-up)")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "euler_a", "dpmsolver++", "heun"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd, network = components(args.model, device)
    prompt = parse_prompt_line(f"a photo of a cat --n blurry --w {args.size} --h {args.size} --s {args.steps}", 0)
    autocast = torch.autocast(device) if device == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"model {args.model}, {device}, {args.size}x{args.size}, {args.steps} steps, CFG on")
    for name in args.samplers:
        pipe = build_pipeline(sd, name, v_parameterization=False)
        with inference_mode(sd.unet, sd.text_encoder, network), autocast:
            generate(pipe, sd, prompt, 0, torch.device(device), None, None)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for seed in range(args.images):
                generate(pipe, sd, prompt, seed, torch.device(device), None, None)
            if device == "cuda":
                torch.cuda.synchronize()
        print(f"{name:12s} {(time.perf_counter() - start) / args.images:.3f} s/image")


if __name__ == "__main__":
    main()
