"""`loracli train`: plan in this process, write the run folder, then train.

One process trains in-process; `training.num_processes > 1` goes through
`accelerate launch`, each child reading the same run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loracli.cli.plan_view import check_strict, print_plan
from loracli.config.loader import ResolvedConfig
from loracli.errors import ConfigError, Problem
from loracli.plan import build_plan
from loracli.rundir import create_run_dir, settle_seed, write_run_files


def run_train(resolved: ResolvedConfig, strict: bool) -> None:
    settle_seed(resolved)
    plan = build_plan(resolved)
    print_plan(resolved, plan)
    check_strict(plan, strict)
    run_dir = create_run_dir(resolved.config)
    write_run_files(run_dir, resolved, plan, sys.argv)
    print(f"run folder: {run_dir}")

    _launch(run_dir, resolved.config.training.num_processes, resume=False)


def resume_train(run_dir: Path) -> None:
    """Continue a run from its last complete state: same steps, schedule and file names."""
    for name in ("config.resolved.toml", "plan.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(Problem(f"--resume {run_dir}", f"not a loracli run folder (no {name})",
                                      "give the folder `loracli train` printed as 'run folder'"))
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    if status.get("state") == "finished":
        print(f"{run_dir} already finished; nothing to resume")
        return
    plan = json.loads((run_dir / "plan.json").read_text())
    _launch(run_dir, int(plan["num_processes"]), resume=True)


def _launch(run_dir: Path, processes: int, resume: bool) -> None:
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "-m", "loracli.run.launch", str(run_dir)] + (["--resume"] if resume else [])
        code = subprocess.call(cmd, env=dict(os.environ))
        if code:
            raise SystemExit(code)
        return
    from loracli.run.train import train  # the run side: imports torch

    train(run_dir, resume=resume)
