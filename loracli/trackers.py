"""Experiment trackers (TensorBoard, Weights & Biases) as sd-scripts chooses them, checked at plan time.

`logging.log_with` unset means TensorBoard when `logging.logging_dir` is set (sd-scripts' rule);
"tensorboard" and "all" need a logging_dir; "wandb" and "all" need the wandb package, an optional
extra (`pip install "loracli[wandb]"`), looked up here without importing it. Torch-free: the plan side.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from loracli.config.schema import LoracliConfig
from loracli.lint import Finding

SD_TRACKERS = "sd-scripts library/train_util.py (trackers)"


def tracker_names(config: LoracliConfig) -> list[str]:
    """accelerate's log_with list for this config; empty: no tracker."""
    log = config.logging
    if log.log_with is None:
        return ["tensorboard"] if log.logging_dir is not None else []
    return ["tensorboard", "wandb"] if log.log_with == "all" else [log.log_with]


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def tracker_findings(config: LoracliConfig) -> list[Finding]:
    names = tracker_names(config)
    out = []
    if "tensorboard" in names and config.logging.logging_dir is None:
        out.append(Finding("error", "E19", "logging.log_with",
                           f'log_with = "{config.logging.log_with}" writes TensorBoard logs, which need a folder',
                           'set logging.logging_dir (e.g. "logs"), or log_with = "wandb"', SD_TRACKERS))
    if "wandb" in names and not wandb_installed():
        out.append(Finding("error", "E19", "logging.log_with",
                           f'log_with = "{config.logging.log_with}" needs the wandb package, which is not installed',
                           'pip install "loracli[wandb]" (WANDB_MODE=offline logs without an account), or '
                           'log_with = "tensorboard"', SD_TRACKERS))
    return out


def tracker_config(config: LoracliConfig, plan_summary: dict[str, Any]) -> dict[str, Any]:
    """What the trackers store as the run's configuration: every set option by dotted key and the plan's
    numbers, as scalars (TensorBoard's hparams take only int, float, str and bool)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is None:
            return
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    walk("plan", plan_summary)
    return flat


def plan_summary(plan: Any) -> dict[str, Any]:
    """The plan's numbers a tracker shows next to the config."""
    keys = ("model_family", "total_steps", "epochs", "steps_per_epoch", "batches_per_epoch", "num_train_images",
            "num_reg_images", "warmup_steps", "num_processes", "config_hash")
    return {k: getattr(plan, k) for k in keys if getattr(plan, k, None) is not None}


def init_trackers(accelerator: Any, config: LoracliConfig, plan: Any, run_name: str) -> None:
    """Start the trackers (main process) with the run's config and plan as their configuration.
    wandb writes its files under logging_dir when set (as sd-scripts does) and honours WANDB_MODE."""
    import os

    log = config.logging
    if "wandb" in tracker_names(config) and log.logging_dir is not None:
        log.logging_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(log.logging_dir))
    init_kwargs = {"wandb": {"name": log.wandb_run_name or run_name}}
    accelerator.init_trackers(log.log_tracker_name or log.log_prefix or "loracli",
                              config=tracker_config(config, plan_summary(plan)), init_kwargs=init_kwargs)


def log_sample_images(accelerator: Any, made: list, step: int) -> None:
    """Each sample image of a round, as an image in every tracker (the prompt is wandb's caption)."""
    import numpy as np

    names = {t.name for t in accelerator.trackers}
    if "tensorboard" in names:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for prompt, _, image in made:
            writer.add_image(f"samples/{prompt.index:02d}", np.asarray(image), step, dataformats="HWC")
    if "wandb" in names:
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log({f"samples/{prompt.index:02d}": wandb.Image(image, caption=prompt.prompt)
                 for prompt, _, image in made}, step=step)
