"""`loracli queue run`: many configs, one after another, still going in the morning.

Every job is validated and planned before the first one starts (bad jobs are
reported up front and skipped). Each job trains in its own process, so a crash
or out-of-memory in one never takes the queue down. A queue file records which
run folder belongs to which job, so running the queue again skips finished
jobs and resumes interrupted ones from their last saved state.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from loracli.config.loader import resolve_config
from loracli.errors import EXIT_INTERRUPTED, LoracliError
from loracli.plan import build_plan
from loracli.rundir import atomic_write_json

OOM_MARKER = "out of GPU memory"


@dataclass
class Job:
    config: str
    presets: list[str]
    status: str = "pending"  # pending | invalid | running | finished | failed | interrupted
    run_dir: str | None = None
    total_steps: int = 0
    steps: int = 0
    attempts: int = 0
    seconds: float = 0.0
    output: str | None = None
    error: str | None = None
    backend: str = "loracli"  # or "sd-scripts" (then sd_scripts_dir is the checkout)
    sd_scripts_dir: str | None = None

    @property
    def key(self) -> str:
        return json.dumps([self.config, self.presets])


@dataclass
class QueueFile:
    path: Path
    jobs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> QueueFile:
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, data.get("jobs", {}))

    def record(self, job: Job) -> None:
        self.jobs[job.key] = asdict(job)
        atomic_write_json(self.path, {"jobs": self.jobs})


def _run_status(run_dir: str | None) -> dict:
    path = Path(run_dir or "") / "status.json"
    return json.loads(path.read_text()) if run_dir and path.is_file() else {}


def plan_jobs(configs: list[Path], presets: list[str], log, backend: str = "loracli",
              sd_scripts_dir: Path | None = None) -> list[Job]:
    """Validate and plan every job now; invalid ones are marked and will not run."""
    jobs = []
    checkout = str(sd_scripts_dir.absolute()) if sd_scripts_dir else None
    for config in configs:
        job = Job(str(config.resolve()), list(presets), backend=backend, sd_scripts_dir=checkout)
        try:
            job.total_steps = build_plan(resolve_config(config, presets, [])).total_steps
        except LoracliError as exc:
            job.status, job.error = "invalid", "; ".join(p.render() for p in exc.problems)
            log(f"invalid: {config}: {job.error}")
        jobs.append(job)
    return jobs


def _train_command(job: Job, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "loracli", "train"]
    if resume:
        return base + ["--resume", str(job.run_dir), "--backend", "loracli"]
    if job.backend == "sd-scripts":  # sd-scripts runs cannot resume: an interrupted one starts again
        base += ["--backend", "sd-scripts", "--sd-scripts-dir", str(job.sd_scripts_dir)]
    else:
        base += ["--backend", "loracli"]
    return base + ["--config", job.config] + [a for p in job.presets for a in ("--preset", p)]


def _run_job(job: Job, resume: bool, log) -> int:
    """Train one job in a child process, streaming its output and noting its run folder."""
    proc = subprocess.Popen(_train_command(job, resume), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line.rstrip("\n"))
        if line.startswith("run folder: "):
            job.run_dir = line.removeprefix("run folder: ").strip()
    return proc.wait()


def notify(job: Job, event: str, command: str | None, webhook: str | None, log) -> None:
    body = {"event": event, **asdict(job)}
    if command:
        env = dict(os.environ, LORACLI_EVENT=event, LORACLI_JOB=job.config, LORACLI_STATUS=job.status,
                   LORACLI_RUN_DIR=job.run_dir or "", LORACLI_JSON=json.dumps(body))
        code = subprocess.call(shlex.split(command), env=env)
        if code:
            log(f"warning: notify command exited {code}")
    if webhook:
        request = urllib.request.Request(webhook, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as exc:  # a notification failing must not stop the queue
            log(f"warning: webhook {webhook} failed: {exc}")


def _eta(jobs: list[Job], done_steps: int, seconds: float) -> str:
    remaining = sum(j.total_steps - j.steps for j in jobs if j.status in ("pending", "interrupted", "running"))
    if not done_steps or not seconds:
        return "queue ends --:-- (no speed measured yet)"
    finish = datetime.now() + timedelta(seconds=remaining * seconds / done_steps)
    return f"queue ends ~{finish:%H:%M} ({remaining} steps left at {done_steps / seconds:.2f} steps/s)"


def run_queue(configs: list[Path], presets: list[str], queue_file: Path, retries: int,
              notify_command: str | None, webhook: str | None, log, backend: str = "loracli",
              sd_scripts_dir: Path | None = None) -> list[Job]:
    if backend == "sd-scripts":
        from loracli.sdscripts.backend import find_checkout

        sd_scripts_dir = find_checkout(sd_scripts_dir)  # once, before any job: a bad path fails every job
    state = QueueFile.load(queue_file)
    jobs = plan_jobs(configs, presets, log, backend, sd_scripts_dir)
    measured_steps, measured_seconds = 0, 0.0
    for index, job in enumerate(jobs, 1):
        if job.status == "invalid":
            state.record(job)
            continue
        previous = state.jobs.get(job.key, {})
        job.run_dir, job.attempts = previous.get("run_dir"), 0
        status = _run_status(job.run_dir)
        if status.get("state") == "finished":
            job.status, job.steps = "finished", status.get("step", 0)
            job.output, job.seconds = previous.get("output"), previous.get("seconds", 0.0)
            log(f"skip (finished): {job.config}")
            continue
        resume = bool(job.run_dir) and status.get("state") in ("interrupted", "running", "failed") and \
            any((Path(job.run_dir) / "state").glob("step-*/COMPLETE"))
        while True:
            log(f"job {index}/{len(jobs)}: {job.config}{' (resuming)' if resume else ''}; "
                f"{_eta(jobs, measured_steps, measured_seconds)}")
            job.status, job.attempts = "running", job.attempts + 1
            state.record(job)
            started = time.time()
            code = _run_job(job, resume, log)
            job.seconds += time.time() - started
            status = _run_status(job.run_dir)
            job.steps, job.error = status.get("step", 0), status.get("error")
            if code == 0:
                job.status = "finished"
                job.output = str(Path(job.run_dir) / _final_name(job.run_dir)) if job.run_dir else None
                measured_steps += job.steps
                measured_seconds += time.time() - started
            elif code == EXIT_INTERRUPTED:
                job.status = "interrupted"
            else:
                job.status = "failed"
                transient = OOM_MARKER in (job.error or "")
                if transient and job.attempts <= retries:  # only memory pressure is worth retrying
                    log(f"retrying after out-of-memory ({job.attempts}/{retries})")
                    resume = any((Path(job.run_dir or "") / "state").glob("step-*/COMPLETE"))
                    continue
            break
        state.record(job)
        notify(job, job.status, notify_command, webhook, log)
        if job.status == "interrupted":
            log("queue interrupted; run it again to resume")
            break
    return jobs


def _final_name(run_dir: str) -> str:
    plan = json.loads((Path(run_dir) / "plan.json").read_text())
    return plan["expected_files"][-1]
