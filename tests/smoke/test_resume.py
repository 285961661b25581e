"""Interrupt and resume: real signals to a real `loracli train` process (CPU, tiny:sd15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_image
from tests.smoke.conftest import CONFIG, make_smoke_dataset

SETS = ["training.max_train_epochs=10", "output.save_every_n_epochs=2", "output.save_state_every_n_steps=1",
        "optimizer.lr_scheduler='cosine'",
        # sampling between steps must neither be redone nor skipped, nor disturb the seeded stream
        "sample.sample_prompts='prompts.txt'", "sample.sample_every_n_steps=7"]


PROMPTS = "thing0 --w 64 --h 64 --s 2\n"


@pytest.fixture(autouse=True)
def prompts(smoke_project):
    (smoke_project.parent / "prompts.txt").write_text(PROMPTS)


def command(cfg: Path, *extra: str) -> list[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    return [sys.executable, "-m", "loracli", "train", "--config", str(cfg), *sets, *extra]


def only_run(cfg: Path, name: str) -> Path:
    runs = [p for p in (cfg.parent / name).iterdir()]
    assert len(runs) == 1
    return runs[0]


def wait_for_steps(run_parent: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in run_parent.glob("*/metrics.jsonl"):
            if len(metrics.read_text().splitlines()) >= steps:
                return metrics.parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run of the same data and config, shared by the tests that compare with it."""
    root = tmp_path_factory.mktemp("reference")
    make_smoke_dataset(root, write_image)
    (root / "prompts.txt").write_text(PROMPTS)
    cfg = root / "loracli.toml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "LORACLI_CACHE": os.environ.get("LORACLI_CACHE", str(Path.home() / ".cache" / "loracli"))}
    done = subprocess.run(command(cfg, "--output-dir", "reference"), cwd=root, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return only_run(cfg, "reference")


def assert_same_outcome(run: Path, reference: Path) -> None:
    plan = json.loads((run / "plan.json").read_text())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == plan["total_steps"]
    files = sorted(p.name for p in run.glob("*.safetensors"))
    assert files == sorted(p.name for p in reference.glob("*.safetensors")) == sorted(plan["expected_files"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, plan["total_steps"] + 1))  # same numbering, nothing twice
    samples = sorted(p.name for p in (run / "samples").glob("smoke_*.png"))
    assert samples == sorted(p.name for p in (reference / "samples").glob("smoke_*.png"))
    assert samples == [f"smoke_{r['step']:06d}_00.png" for r in plan["sample_rounds"]]
    mine, theirs = load_file(run / "smoke.safetensors"), load_file(reference / "smoke.safetensors")
    # Same seeds, data order, RNG and schedule on one CPU: equal up to float summation order.
    for key in theirs:
        assert torch.allclose(mine[key].float(), theirs[key].float(), atol=1e-5, rtol=1e-4), key


def test_sigint_saves_state_and_resume_matches_an_uninterrupted_run(smoke_project, reference_run):
    proc = subprocess.Popen(command(smoke_project), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = wait_for_steps(smoke_project.parent / "runs", 5, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "--resume" in status["error"]
    assert list((run / "state").glob("step-*/COMPLETE"))
    resumed = subprocess.run([sys.executable, "-m", "loracli", "train", "--resume", str(run)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outcome(run, reference_run)


KILL_DELAYS = (0.05, 0.3, 0.0, 0.15, 0.01)  # seconds after a resumed run's first new step
MORE_KILL_DELAYS = (0.05, 0.3, 0.0, 0.6, 0.15, 0.02, 0.45, 0.1, 0.25, 0.01)


@pytest.mark.parametrize("delays", [
    pytest.param(KILL_DELAYS, id="5-kills"),
    pytest.param(MORE_KILL_DELAYS, id="10-kills", marks=pytest.mark.slow),
])
def test_sigkill_at_random_moments_then_resume(smoke_project, reference_run, delays):
    """Kill -9 at several points (some during saves); each resume continues from the last whole state."""
    proc = subprocess.Popen(command(smoke_project), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = wait_for_steps(smoke_project.parent / "runs", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = json.loads((run / "plan.json").read_text())["total_steps"]
    kills = 1
    for delay in delays:
        before = len((run / "metrics.jsonl").read_text().splitlines())
        if before >= total:
            break
        proc = subprocess.Popen([sys.executable, "-m", "loracli", "train", "--resume", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_steps(run.parent, before + 1, proc, timeout=60)
        kills += 1
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not [p for p in run.glob("*.safetensors") if p.stat().st_size < 100]  # never truncated
    assert kills == len(delays) + 1, kills  # every kill landed before the run could finish
    final = subprocess.run([sys.executable, "-m", "loracli", "train", "--resume", str(run)],
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert_same_outcome(run, reference_run)
    assert not list(run.glob(".*.tmp")) and not list((run / "state").glob(".*.tmp"))


def test_resume_needs_a_state(smoke_project):
    done = subprocess.run(command(smoke_project, "--set", "output.save_state_every_n_steps=1000",
                                  "--set", "training.max_train_epochs=2"), capture_output=True, text=True)
    assert done.returncode == 0
    run = only_run(smoke_project, "runs")
    again = subprocess.run([sys.executable, "-m", "loracli", "train", "--resume", str(run)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "already finished" in again.stdout
    (run / "status.json").write_text(json.dumps({"state": "failed"}))
    again = subprocess.run([sys.executable, "-m", "loracli", "train", "--resume", str(run)],
                           capture_output=True, text=True)
    assert again.returncode == 4 and "no complete training state" in again.stderr
