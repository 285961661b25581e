"""`loracli train`: plan in this process, write the run folder, then train.

One process trains in-process; `training.num_processes > 1` goes through
`accelerate launch`, each child reading the same run folder.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

from loracli.cli.plan_view import check_strict, print_plan
from loracli.config.loader import ResolvedConfig
from loracli.errors import ConfigError, Problem
from loracli.plan import build_plan
from loracli.rundir import create_run_dir, write_run_files


def _refuse_unbuilt_features(resolved: ResolvedConfig) -> None:
    """Options the plan understands but training does not carry out yet fail here, not silently."""
    sample = resolved.config.sample
    if sample.sample_prompts or sample.sample_every_n_steps or sample.sample_every_n_epochs or sample.sample_at_first:
        raise ConfigError(Problem("sample", "sample images during training are not available yet",
                                  "remove the [sample] settings to train (loracli plan still checks the prompts)"))


def run_train(resolved: ResolvedConfig, strict: bool) -> None:
    if resolved.config.training.seed is None:
        # sd-scripts draws a random seed when none is given; record it so the run can be repeated.
        seed = random.randint(0, 2**32 - 1)
        config = resolved.config.model_copy(
            update={"training": resolved.config.training.model_copy(update={"seed": seed})}
        )
        resolved.config = config
        resolved.origins["training.seed"] = "drawn at random"
    plan = build_plan(resolved)
    _refuse_unbuilt_features(resolved)
    print_plan(resolved, plan)
    check_strict(plan, strict)
    run_dir = create_run_dir(resolved.config)
    write_run_files(run_dir, resolved, plan, sys.argv)
    print(f"run folder: {run_dir}")

    processes = resolved.config.training.num_processes
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "-m", "loracli.run.launch", str(run_dir)]
        code = subprocess.call(cmd, env=dict(os.environ))
        if code:
            raise SystemExit(code)
        return
    from loracli.run.train import train  # the run side: imports torch

    train(run_dir)
