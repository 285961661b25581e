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
from loracli.config.loader import ResolvedConfig, read_toml
from loracli.errors import CONTEXT, ConfigError, DatasetError, Problem
from loracli.plan import Plan, build_plan
from loracli.rundir import RunLock, clean_temp_files, create_run_dir, repair_metrics_log, settle_seed, write_run_files


def run_train(resolved: ResolvedConfig, strict: bool) -> None:
    settle_seed(resolved)
    plan = build_plan(resolved)  # every check that needs no model, before anything is written
    print_plan(resolved, plan)
    check_strict(plan, strict)
    run_dir = create_run_dir(resolved.config)
    with RunLock(run_dir):
        write_run_files(run_dir, resolved, plan, sys.argv)
        print(f"run folder: {run_dir}")
        _launch(run_dir, resolved.config.training.num_processes, resume=False)


def _damaged(path: Path, what: str) -> DatasetError:
    return DatasetError(Problem(str(path), f"is damaged ({what})",
                                "restore it from a backup; a run folder is only written by loracli"))


def read_resume_files(run_dir: Path) -> tuple[dict, Plan]:
    """status.json (may be absent) and plan.json of a run to resume, refused with one line if damaged."""
    from loracli.config.schema import LoracliConfig

    for name in ("config.resolved.toml", "plan.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(Problem(f"--resume {run_dir}", f"not a loracli run folder (no {name})",
                                      "give the folder `loracli train` printed as 'run folder'"))
    try:
        LoracliConfig.model_validate(read_toml(run_dir / "config.resolved.toml", "resolved config"))
    except ValueError as exc:  # pydantic's ValidationError: name the first bad key
        errors = getattr(exc, "errors", lambda: [])()
        first = (".".join(map(str, errors[0]["loc"])) + ": " + errors[0]["msg"]) if errors else str(exc)[:200]
        raise _damaged(run_dir / "config.resolved.toml", first) from None
    except ConfigError as exc:
        raise DatasetError(exc.problems) from None
    plan_path = run_dir / "plan.json"
    try:
        plan = Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")))
        int(plan.num_processes)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _damaged(plan_path, f"{type(exc).__name__}: {exc}"[:200]) from None
    status_path = run_dir / "status.json"
    status: dict = {}
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise DatasetError(Problem(str(status_path), f"is damaged ({exc})"[:200],
                                       "delete it and resume again: the run rewrites it")) from None
        if not isinstance(status, dict):
            raise DatasetError(Problem(str(status_path), "is damaged (not a JSON object)",
                                       "delete it and resume again: the run rewrites it"))
    return status, plan


def resume_train(run_dir: Path) -> None:
    """Continue a run from its last complete state: same steps, schedule and file names."""
    status, plan = read_resume_files(run_dir)
    if status.get("state") == "finished":
        print(f"{run_dir} already finished; nothing to resume")
        return
    CONTEXT.run_dir = run_dir
    with RunLock(run_dir):  # refuses while another process trains here
        for stale in clean_temp_files(run_dir):
            print(f"removed a file left by an interrupted write: {stale.name}")
        dropped = repair_metrics_log(run_dir)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} torn line(s) left by the interruption")
        _launch(run_dir, int(plan.num_processes), resume=True)


def _launch(run_dir: Path, processes: int, resume: bool) -> None:
    CONTEXT.training, CONTEXT.run_dir = True, run_dir  # from here a file error is a run-time failure (exit 4)
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "-m", "loracli.run.launch", str(run_dir)] + (["--resume"] if resume else [])
        code = subprocess.call(cmd, env=dict(os.environ))
        if code:
            raise SystemExit(code)
        return
    from loracli.run.train import train  # the run side: imports torch

    train(run_dir, resume=resume)
