"""How fast `loracli --help` and `loracli plan` answer on a large dataset.

Generates (once) 10,000 images of various sizes in 3 folders, then times each
command as a user runs it (a fresh process), best of N runs.
Targets on a 2-core machine: --help <= 0.25 s, plan <= 1.5 s.

    python benchmarks/plan_speed.py [--images 10000] [--runs 5] [--dir /tmp/loracli-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(512, 512), (512, 768), (768, 512), (1024, 1024), (640, 480), (1920, 1080), (300, 900), (2000, 500)]
FOLDERS = ["10_character", "5_outfit", "1_style"]


def make_dataset(root: Path, count: int) -> Path:
    from PIL import Image

    data = root / "data"
    marker = root / f".complete-{count}"
    if marker.exists():
        return data
    shutil.rmtree(root, ignore_errors=True)
    templates = {}
    for w, h in SIZES:  # encode each size once, copy bytes (only the header matters to plan)
        path = root / f"template-{w}x{h}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 120, 150)).save(path, compress_level=1)
        templates[(w, h)] = path.read_bytes()
    for i in range(count):
        folder = data / FOLDERS[i % len(FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(templates[SIZES[i % len(SIZES)]])
        if i % 10:  # most images captioned, some use the class tokens
            (folder / f"{i:05d}.txt").write_text(f"tag{i % 7}, tag{i % 11}, scene\n")
    marker.touch()
    return data


def best_time(cmd: list[str], runs: int, cwd: Path) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/loracli-bench"))
    args = parser.parse_args()
    data = make_dataset(args.dir, args.images)
    config = args.dir / "bench.toml"
    config.write_text(f"""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "{data}"
resolution = 512
enable_bucket = true
[training]
max_train_epochs = 10
train_batch_size = 4
""")
    exe = shutil.which("loracli") or f"{sys.executable} -m loracli"
    base = exe.split()
    help_time = best_time(base + ["--help"], args.runs, args.dir)
    plan_time = best_time(base + ["plan", "--config", str(config), "--json"], args.runs, args.dir)
    print(f"machine: {os.cpu_count()} cores; dataset: {args.images} images in {len(FOLDERS)} folders")
    print(f"loracli --help: {help_time:.3f} s (target <= 0.25 s)")
    print(f"loracli plan:   {plan_time:.3f} s (target <= 1.5 s)")


if __name__ == "__main__":
    main()
