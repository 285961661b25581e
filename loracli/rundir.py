"""Run folders: one per run, never reused, describing themselves.

A run folder holds the resolved config, the plan, the environment and the
command line, and later the saved LoRAs. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from loracli import __version__
from loracli.config.loader import ResolvedConfig
from loracli.config.schema import LoracliConfig
from loracli.plan import Plan

TRACKED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "lycoris_lora", "safetensors",
                    "bitsandbytes", "dadaptation", "prodigyopt", "peft", "pydantic", "typer")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def settle_seed(resolved: ResolvedConfig) -> None:
    """sd-scripts draws a random seed when none is given; draw it here so the run folder records it
    and the run can be repeated."""
    if resolved.config.training.seed is None:
        training = resolved.config.training.model_copy(update={"seed": random.randint(0, 2**32 - 1)})
        resolved.config = resolved.config.model_copy(update={"training": training})
        resolved.origins["training.seed"] = "drawn at random"


def create_run_dir(config: LoracliConfig) -> Path:
    """<output_dir>/<name>-<YYYYmmdd-HHMMSS>[-N]; mkdir without exist_ok, so two jobs never share one."""
    base = config.output.output_dir
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{config.output.output_name or 'lora'}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        candidate = base / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {base}")


def environment() -> dict[str, Any]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "loracli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def write_run_files(run_dir: Path, resolved: ResolvedConfig, plan: Plan, argv: list[str]) -> None:
    from loracli.cli.config_cmd import resolved_toml

    atomic_write_text(run_dir / "config.resolved.toml", resolved_toml(resolved))
    atomic_write_text(run_dir / "plan.json", plan.to_json() + "\n")
    atomic_write_json(run_dir / "run.json", {
        "command": argv,
        "cwd": str(Path.cwd()),
        "seed": resolved.config.training.seed,
        "config_file": str(resolved.config_path) if resolved.config_path else None,
        "presets": [p.name for p in resolved.presets],
        "origins": resolved.origins,
        "environment": environment(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    atomic_write_json(run_dir / "status.json", {
        "state": "planned", "step": 0, "epoch": 0, "total_steps": plan.total_steps, "last_save": None,
        "error": None, "started_at": None, "updated_at": time.time(),
    })
