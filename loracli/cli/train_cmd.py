"""`loracli train`: plan in this process, write the run folder, then train.

One process trains in-process; `training.num_processes > 1` goes through
`accelerate launch`, each child reading the same run folder.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from loracli.cli.plan_view import check_strict, print_plan
from loracli.config.loader import ResolvedConfig
from loracli.plan import build_plan
from loracli.rundir import create_run_dir, write_run_files


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
