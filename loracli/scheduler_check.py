"""Does the model folder's noise schedule differ from the one loracli trains with?

loracli, like sd-scripts, trains every SD family with one fixed DDPM schedule
(scaled_linear betas 0.00085-0.012 over 1000 steps, epsilon or v-prediction as
the config says) and ignores `scheduler/scheduler_config.json`. A folder whose
scheduler says otherwise (zero-terminal SNR, v-prediction, another beta range)
was fine-tuned for a different schedule, and training it with the fixed one
quietly fights that: the plan says which values differ and what to set.
Torch-free: reads one JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loracli.config.schema import LoracliConfig
from loracli.lint import Finding

# sd-scripts train_network.py: DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
# num_train_timesteps=1000, clip_sample=False), whatever the model ships with.
FIXED_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def read_scheduler_config(model_path: str, kind: str) -> dict[str, Any] | None:
    """The folder's scheduler config; None for single files, tiny models and unreadable files."""
    if kind != "diffusers":
        return None
    path = Path(model_path) / "scheduler" / "scheduler_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def schedule_differences(scheduler: dict[str, Any], config: LoracliConfig) -> list[str]:
    """'name: folder value vs trained value' for each value that changes the training noise or target."""
    out: list[str] = []
    for key, fixed in FIXED_SCHEDULE.items():
        value = scheduler.get(key, fixed)
        same = _close(value, fixed) if isinstance(fixed, float) else value == fixed
        if not same:
            out.append(f"{key} {value!r} (loracli trains with {fixed!r})")
    zero_snr = bool(scheduler.get("rescale_betas_zero_snr", False))
    if zero_snr != config.training.zero_terminal_snr:
        out.append(f"rescale_betas_zero_snr {zero_snr} (training.zero_terminal_snr = "
                   f"{str(config.training.zero_terminal_snr).lower()})")
    prediction = scheduler.get("prediction_type", "epsilon")
    trained = "v_prediction" if config.model.v_parameterization else "epsilon"
    if prediction in ("epsilon", "v_prediction") and prediction != trained:
        out.append(f"prediction_type {prediction} (model.v_parameterization = "
                   f"{str(config.model.v_parameterization).lower()} trains {trained})")
    return out


def fix_hint(differences: list[str]) -> str:
    fixes = []
    if any(d.startswith("rescale_betas_zero_snr") for d in differences):
        fixes.append("set training.zero_terminal_snr to match a zero-terminal-SNR model")
    if any(d.startswith("prediction_type") for d in differences):
        fixes.append("set model.v_parameterization to match the model's prediction type")
    if len(fixes) < len(differences):
        fixes.append("the betas cannot be changed: loracli, like sd-scripts, trains every model with one fixed "
                     "DDPM schedule; use a base model made for it")
    return "; ".join(fixes)


def schedule_findings(config: LoracliConfig, model_path: str, kind: str) -> list[Finding]:
    """W31: the model folder's scheduler differs from the schedule the run trains with."""
    scheduler = read_scheduler_config(model_path, kind)
    differences = schedule_differences(scheduler, config) if scheduler is not None else []
    if not differences:
        return []
    return [Finding("warning", "W31", "model.pretrained_model_name_or_path",
                    "the model's scheduler/scheduler_config.json differs from the fixed DDPM schedule training "
                    "uses: " + "; ".join(differences), fix_hint(differences), "sd-scripts train_network.py")]


def _close(a: object, b: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and abs(float(a) - b) <= 1e-9 * max(1.0, abs(b))
