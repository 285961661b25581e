"""loracli vs sd-scripts, side by side: the same recipe, the same data, the same model, interleaved runs.

    python benchmarks/vs_sdscripts.py --sd-scripts-dir ~/sd-scripts --python ~/sd-scripts/venv/bin/python
    python benchmarks/vs_sdscripts.py --loracli-only --model tiny:sd15      # no sd-scripts needed

It builds one dataset (random images with captions) and one model (default: SD1.5's
shapes with random weights, saved once as a diffusers folder, which sd-scripts loads;
or --model PATH / tiny:sd15), writes one loracli config, exports it with
`loracli export sd-scripts`, and runs `loracli train` and sd-scripts' train_network.py
alternately (A B A B ...). A small sitecustomize hook, put on both runs' PYTHONPATH,
records the wall time, the RSS peak and (on CUDA) max_memory_allocated at every
optimizer step, so both tools are timed by the same clock at the same point.

Printed per tool: time to the first optimizer step (process start → first step; with
--torch-compile it includes compiling),
steady-state images/s (the steps after --warmup-steps; min and median over the
rounds), peak memory (RSS on CPU, max_memory_allocated on CUDA; max over rounds) and
the ratio loracli / sd-scripts. On a shared machine the min/median spread shows the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HOOK = textwrap.dedent('''
    # Written by benchmarks/vs_sdscripts.py: one line per optimizer step, "time rss_kib cuda_max_bytes".
    import os, resource, time
    _log = os.environ.get("VS_SDSCRIPTS_STEP_LOG")
    if _log:
        try:
            import torch
            from torch.optim.optimizer import register_optimizer_step_post_hook
            _threads = os.environ.get("VS_SDSCRIPTS_THREADS")
            if _threads:
                torch.set_num_threads(int(_threads))

            def _record(optimizer, args, kwargs):
                cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                with open(_log, "a") as f:
                    f.write(f"{time.time()} {rss} {cuda}\\n")

            register_optimizer_step_post_hook(_record)
        except Exception as exc:  # never break the run being measured
            print("vs_sdscripts hook not installed:", exc)
''')


@dataclass
class RunResult:
    tool: str
    first_step_s: float
    images_per_s: float
    median_step_s: float  # the median steady-state step: robust to one slow step
    peak_rss_gib: float
    cuda_peak_gib: float
    steps: int


@dataclass
class Summary:
    results: list[RunResult] = field(default_factory=list)

    def of(self, tool: str) -> list[RunResult]:
        return [r for r in self.results if r.tool == tool]


# --- the inputs --------------------------------------------------------------------------------------

def build_dataset(folder: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """count random RGB images (a smooth gradient plus noise, so the VAE sees structure) with captions."""
    import numpy as np
    from PIL import Image

    sub = folder / "1_subject"
    if sub.is_dir() and len(list(sub.glob("*.png"))) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sub.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, resolution, dtype=np.float32)
    for i in range(count):
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        pixels = np.clip(base + rng.normal(0, 20, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"a photo of sks subject, number {i}, outdoors, detailed")
    return folder


def build_sd15_shaped(folder: Path) -> Path:
    """SD1.5's UNet, CLIP-L text encoder and VAE with random weights (seed 0), as a diffusers folder:
    sd-scripts' converter needs SD1.5's exact widths, so this is the smallest model both tools load."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from loracli.run.clip_tokenizer import ensure_tokenizer_files
    from loracli.run.shapes import build_sd15_shapes

    torch.manual_seed(0)
    unet, text_encoder, vae = build_sd15_shapes(with_vae=True)
    tok = ensure_tokenizer_files()
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def tokenizer_cache(folder: Path) -> Path:
    """sd-scripts' --tokenizer_cache_dir with CLIP-L's tokenizer in it (written from loracli's copy of
    the vocabulary), so it never asks the hub for openai/clip-vit-large-patch14."""
    target = folder / "openai_clip-vit-large-patch14"
    if not (target / "vocab.json").is_file():
        from loracli.run.clip_tokenizer import ensure_tokenizer_files

        source = ensure_tokenizer_files()
        target.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):  # the slow tokenizer's files, which every release reads
            shutil.copy(source / name, target / name)
        (target / "tokenizer_config.json").write_text(json.dumps({
            "model_max_length": 77, "do_lower_case": True, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def write_config(path: Path, model: str, data: Path, out: Path, args: argparse.Namespace) -> Path:
    network = f'algo = "{args.algo}"\nnetwork_dim = {args.dim}\nnetwork_alpha = {args.dim / 2:g}\n'
    if args.algo != "lora":
        network += f"conv_dim = {args.conv_dim}\nconv_alpha = {args.conv_dim / 2:g}\n"
    if args.unet_only:
        network += "network_train_unet_only = true\n"
    path.write_text(textwrap.dedent(f'''\
        [model]
        pretrained_model_name_or_path = "{model}"

        [dataset]
        train_data_dir = "{data}"
        resolution = {args.resolution}
        cache_latents = true
        caption_extension = ".txt"

        [network]
        ''') + network + textwrap.dedent(f'''
        [optimizer]
        optimizer_type = "AdamW"
        learning_rate = 1e-4

        [training]
        train_batch_size = {args.batch}
        max_train_steps = {args.steps}
        seed = 42
        mixed_precision = "{args.mixed_precision}"
        gradient_checkpointing = {str(args.gradient_checkpointing).lower()}
        torch_compile = {str(args.torch_compile is not None).lower()}
        dynamo_backend = "{args.torch_compile or 'inductor'}"
        fp8_base = {str(args.fp8_base).lower()}

        [output]
        output_dir = "{out}"
        output_name = "bench"
        '''))
    return path


# --- running -----------------------------------------------------------------------------------------

def run_measured(tool: str, cmd: list[str], cwd: Path, env: dict[str, str], log_dir: Path, index: int,
                 batch: int, warmup_steps: int) -> RunResult:
    steps_file = log_dir / f"{tool}-{index}.steps"
    steps_file.unlink(missing_ok=True)
    run_env = {**env, "VS_SDSCRIPTS_STEP_LOG": str(steps_file)}
    started = time.time()
    with (log_dir / f"{tool}-{index}.log").open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (log_dir / f"{tool}-{index}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tool} failed (exit {proc.returncode}); its output ends with:\n{tail}")
    rows = [line.split() for line in steps_file.read_text().splitlines()] if steps_file.is_file() else []
    if len(rows) < warmup_steps + 2:
        raise SystemExit(f"{tool}: only {len(rows)} optimizer steps were recorded; raise --steps")
    times = [float(r[0]) for r in rows]
    steady = times[warmup_steps:]
    images_per_s = batch * (len(steady) - 1) / (steady[-1] - steady[0])
    median_step = statistics.median(b - a for a, b in zip(steady, steady[1:]))
    return RunResult(tool, times[0] - started, images_per_s, median_step, max(int(r[1]) for r in rows) / 2**20,
                     max(int(r[2]) for r in rows) / 2**30, len(rows))


def sdscripts_command(export_dir: Path, python: str, tok_cache: Path) -> list[str]:
    """train_network.py with the exported config and dataset files (one process, no accelerate launcher)."""
    config = export_dir / "config.toml"
    text = config.read_text()
    if "tokenizer_cache_dir" not in text:
        config.write_text(text.rstrip("\n") + f'\ntokenizer_cache_dir = "{tok_cache}"\n')
    script = "train_network.py"
    train_sh = (export_dir / "train.sh").read_text() if (export_dir / "train.sh").is_file() else ""
    if "sdxl_train_network.py" in train_sh:
        script = "sdxl_train_network.py"
    return [python, script, "--config_file", str(config), "--dataset_config", str(export_dir / "dataset.toml")]


def fmt_range(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"


def print_table(summary: Summary, tools: list[str], cuda: bool, estimate_gib: float | None) -> str:
    lines = []
    memory = "CUDA max_memory_allocated GiB (max)" if cuda else "peak RSS GiB (max)"
    header = (f"| tool | runs | first step s (min / median) | images/s (min / median) | median step s | "
              f"{memory} |")
    lines += [header, "|" + "---|" * 6]
    for tool in tools:
        rs = summary.of(tool)
        mem = max((r.cuda_peak_gib if cuda else r.peak_rss_gib) for r in rs)
        lines.append(f"| {tool} | {len(rs)} | {fmt_range([r.first_step_s for r in rs], 1)} | "
                     f"{fmt_range([r.images_per_s for r in rs], 3)} | "
                     f"{statistics.median(r.median_step_s for r in rs):.2f} | {mem:.2f} |")
    if len(tools) == 2:
        a, b = summary.of(tools[0]), summary.of(tools[1])
        ips = (min(r.images_per_s for r in a) / min(r.images_per_s for r in b),
               statistics.median(r.images_per_s for r in a) / statistics.median(r.images_per_s for r in b))
        first = statistics.median(r.first_step_s for r in a) / statistics.median(r.first_step_s for r in b)
        mem_a = max((r.cuda_peak_gib if cuda else r.peak_rss_gib) for r in a)
        mem_b = max((r.cuda_peak_gib if cuda else r.peak_rss_gib) for r in b)
        step = statistics.median(r.median_step_s for r in a) / statistics.median(r.median_step_s for r in b)
        lines.append(f"| ratio loracli / sd-scripts | | {first:.2f} (median) | {ips[0]:.2f} / {ips[1]:.2f} | "
                     f"{step:.2f} | {mem_a / mem_b:.2f} |")
    if estimate_gib is not None:
        measured = max(r.cuda_peak_gib for r in summary.of("loracli")) if cuda else None
        lines.append("")
        lines.append(f"loracli's VRAM estimate (loracli plan): {estimate_gib:.2f} GiB"
                     + (f"; measured max_memory_allocated {measured:.2f} GiB "
                        f"({(estimate_gib / measured - 1) * 100:+.0f}%)" if measured else ""))
    table = "\n".join(lines)
    print(table)
    return table


def vram_estimate(config: Path, cache: Path) -> float | None:
    """What `loracli plan` estimates for this config (None when it has no estimate)."""
    from loracli.config.loader import resolve_config
    from loracli.plan import build_plan

    old = os.environ.get("LORACLI_CACHE")
    os.environ["LORACLI_CACHE"] = str(cache)  # where the runs built the tiny model, if that is the model
    try:
        summary = build_plan(resolve_config(config)).vram
    finally:
        if old is None:
            os.environ.pop("LORACLI_CACHE", None)
        else:
            os.environ["LORACLI_CACHE"] = old
    return summary.get("total_gib") if summary else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts-dir", type=Path, help="an sd-scripts checkout (train_network.py)")
    parser.add_argument("--python", default=None, help="the Python that runs sd-scripts (its venv)")
    parser.add_argument("--loracli-only", action="store_true", help="time loracli alone")
    parser.add_argument("--sd-scripts-pythonpath", default="",
                        help="extra PYTHONPATH entries for the sd-scripts runs (os.pathsep-separated)")
    parser.add_argument("--model", default="sd15-shaped",
                        help="sd15-shaped (SD1.5's shapes, random weights), tiny:sd15, or a diffusers folder")
    parser.add_argument("--algo", choices=["lora", "locon"], default="lora")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--conv-dim", type=int, default=8)
    parser.add_argument("--unet-only", action="store_true", help="network_train_unet_only")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of images/s")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", metavar="BACKEND", default=None,
                        help="both tools compile the UNet with this dynamo backend (--torch_compile "
                             "--dynamo_backend); the first-step column then holds the compile time")
    parser.add_argument("--fp8-base", action="store_true", help="both tools store the frozen weights in fp8")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vs-sdscripts"))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    if not args.loracli_only and (args.sd_scripts_dir is None or args.python is None):
        parser.error("give --sd-scripts-dir and --python, or --loracli-only")
    import torch

    cuda = torch.cuda.is_available()
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if cuda else "no"
    if args.fp8_base and args.mixed_precision == "no":
        parser.error("--fp8-base computes in the mixed-precision dtype: add --mixed-precision bf16")

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = build_dataset(work / "data", args.images, args.resolution)
    if args.model == "sd15-shaped":
        print("building SD1.5-shaped random model (once)...", flush=True)
        model = str(build_sd15_shaped(work / "sd15-shaped"))
    else:
        model = args.model
    hook_dir = work / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    config = write_config(work / "loracli.toml", model, data, work / "runs", args)

    threads = str(args.threads)
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base_env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, VS_SDSCRIPTS_THREADS=threads,
                    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(hook_dir),
                    LORACLI_CACHE=str(work / "cache"))
    loracli_bin = shutil.which("loracli") or "loracli"
    tools: dict[str, tuple[list[str], Path, dict[str, str]]] = {
        "loracli": ([loracli_bin, "train", "--config", str(config)], work, {}),
    }
    if not args.loracli_only:
        export = work / "export"
        shutil.rmtree(export, ignore_errors=True)
        subprocess.run([loracli_bin, "export", "sd-scripts", "--config", str(config), "--sd-scripts-dir",
                        str(args.sd_scripts_dir), str(export)], check=True, env={**os.environ, **{
                            "LORACLI_CACHE": str(work / "cache")}})
        tok_cache = tokenizer_cache(work / "tokenizers")
        extra = {"PYTHONPATH": os.pathsep.join(p for p in (str(hook_dir), args.sd_scripts_pythonpath) if p)}
        tools["sd-scripts"] = (sdscripts_command(export, args.python, tok_cache), args.sd_scripts_dir.resolve(),
                               extra)

    print(f"model {args.model}; {args.algo} dim {args.dim}; {args.resolution} px; batch {args.batch}; "
          f"{args.steps} steps ({args.warmup_steps} left out of images/s); {args.threads} thread(s); "
          f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}; {args.rounds} round(s), interleaved",
          flush=True)
    summary = Summary()
    for index in range(args.rounds):
        for tool, (cmd, cwd, extra_env) in tools.items():
            result = run_measured(tool, cmd, cwd, {**base_env, **extra_env}, logs, index, args.batch,
                                  args.warmup_steps)
            summary.results.append(result)
            print(f"  round {index + 1} {tool}: first step {result.first_step_s:.1f} s, "
                  f"{result.images_per_s:.3f} images/s, median step {result.median_step_s:.2f} s, RSS {result.peak_rss_gib:.2f} GiB"
                  + (f", CUDA {result.cuda_peak_gib:.2f} GiB" if cuda else ""), flush=True)
    print()
    table = print_table(summary, list(tools), cuda, vram_estimate(config, work / "cache"))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    (work / "results.json").write_text(json.dumps([r.__dict__ for r in summary.results], indent=1))


if __name__ == "__main__":
    main()
