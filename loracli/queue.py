"""`loracli queue run`: many configs, one after another, still going in the morning.

Every job is validated and planned before the first one starts (bad jobs are
reported up front and skipped). Each job trains in its own process, so a crash
or out-of-memory in one never takes the queue down. A queue file records which
run folder belongs to which job, so running the queue again skips finished
jobs and resumes interrupted ones from their last saved state.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from loracli.config.loader import resolve_config
from loracli.errors import EXIT_INTERRUPTED, ConfigError, Problem, crash_line, from_exception, write_crash_report
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
    config_hash: str = ""  # of the config as planned; a finished job whose config changed is told, not hidden

    @property
    def key(self) -> str:
        return json.dumps([self.config, self.presets])


@dataclass
class QueueFile:
    path: Path
    jobs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> QueueFile:
        """The queue file; a damaged one is one clear error (it is only a memo: deleting it is safe)."""
        if not path.exists():
            return cls(path, {})
        hint = "delete it (finished run folders stay; the queue then runs every job again) or pass another --queue-file"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(Problem(f"--queue-file {path}", f"is not a queue file ({exc})"[:300], hint)) from None
        except OSError as exc:
            raise ConfigError(Problem(f"--queue-file {path}", f"cannot be read ({exc.strerror or exc})",
                                      hint)) from None
        jobs = data.get("jobs", {}) if isinstance(data, dict) else None
        if not isinstance(jobs, dict) or not all(isinstance(j, dict) for j in jobs.values()):
            raise ConfigError(Problem(f"--queue-file {path}", "is not a queue file (no \"jobs\" table)", hint))
        return cls(path, jobs)

    def record(self, job: Job) -> None:
        self.jobs[job.key] = asdict(job)
        atomic_write_json(self.path, {"jobs": self.jobs})


def _run_status(run_dir: str | None) -> dict:
    """A job's status.json; {} when there is none or it cannot be read (the job's exit code still counts)."""
    path = Path(run_dir or "") / "status.json"
    if not run_dir or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def failure_text(exc: BaseException) -> str:
    """One line for a job that failed in this process: its problems, or the crash report of a bug."""
    known = from_exception(exc)
    if known is not None:
        return "; ".join(p.render() for p in known.problems)
    return crash_line(exc, write_crash_report(exc))


def plan_jobs(configs: list[Path], presets: list[str], log, backend: str = "loracli",
              sd_scripts_dir: Path | None = None) -> list[Job]:
    """Validate and plan every job now; invalid ones are marked and will not run. Whatever goes wrong
    with one job (a bad config, an unreadable file, a bug) is recorded against it: the others still run."""
    jobs = []
    checkout = str(sd_scripts_dir.absolute()) if sd_scripts_dir else None
    for config in configs:
        job = Job(str(config.absolute()), list(presets), backend=backend, sd_scripts_dir=checkout)
        try:
            job.config = str(config.resolve())
            planned = build_plan(resolve_config(config, presets, []))
            job.total_steps, job.config_hash = planned.total_steps, planned.config_hash
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 -- recorded with its reason, never swallowed
            job.status, job.error = "invalid", failure_text(exc)
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


def _run_job(job: Job, resume: bool, log) -> tuple[int, str | None]:
    """Train one job in a child process, streaming its output and noting its run folder.
    Returns (exit code, the child's last `error:` line, if any)."""
    proc = subprocess.Popen(_train_command(job, resume), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, errors="replace")
    assert proc.stdout is not None
    last_error = None
    for line in proc.stdout:
        log(line.rstrip("\n"))
        if line.startswith("run folder: "):
            job.run_dir = line.removeprefix("run folder: ").strip()
        elif line.startswith("error: "):
            last_error = line.removeprefix("error: ").strip()
    return proc.wait(), last_error


def check_notifications(command: str | None, webhook: str | None) -> None:
    """Refuse, before the first job, a notify command whose program is not there or a webhook that is not
    an http(s) URL: found at the end of the first job, they would only be warnings all night."""
    if command:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(Problem(f"--notify-command {command}", f"cannot be split into words ({exc})",
                                      "check the quotes")) from None
        if not argv or shutil.which(argv[0]) is None:
            raise ConfigError(Problem(f"--notify-command {command}",
                                      f"program {argv[0] if argv else '(none)'!r} not found",
                                      "give a program on PATH or its full path"))
    if webhook:
        parts = urllib.parse.urlsplit(webhook)
        try:
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(Problem(f"--webhook {webhook}", "is not an http:// or https:// URL",
                                      "e.g. --webhook http://127.0.0.1:8000/hook"))


def notify(job: Job, event: str, command: str | None, webhook: str | None, log) -> None:
    """Run the notify command and POST the webhook; any failure of either is a warning, never the queue's end."""
    body = {"event": event, **asdict(job)}
    if command:
        env = dict(os.environ, LORACLI_EVENT=event, LORACLI_JOB=job.config, LORACLI_STATUS=job.status,
                   LORACLI_RUN_DIR=job.run_dir or "", LORACLI_JSON=json.dumps(body))
        try:
            code = subprocess.call(shlex.split(command), env=env, timeout=120)
            if code:
                log(f"warning: notify command exited {code}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            log(f"warning: notify command {command!r} failed: {exc}")
    if webhook:
        try:
            request = urllib.request.Request(webhook, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).close()
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
            log(f"warning: webhook {webhook} failed: {exc}")


def _eta(jobs: list[Job], done_steps: int, seconds: float) -> str:
    remaining = sum(j.total_steps - j.steps for j in jobs if j.status in ("pending", "interrupted", "running"))
    if not done_steps or not seconds:
        return "queue ends --:-- (no speed measured yet)"
    finish = datetime.now() + timedelta(seconds=remaining * seconds / done_steps)
    return f"queue ends ~{finish:%H:%M} ({remaining} steps left at {done_steps / seconds:.2f} steps/s)"


def run_queue(configs: list[Path], presets: list[str], queue_file: Path, retries: int,
              notify_command: str | None, webhook: str | None, log, backend: str = "loracli",
              sd_scripts_dir: Path | None = None, force: bool = False) -> list[Job]:
    """force: train finished jobs again, each in a new run folder (the old one is kept)."""
    if backend == "sd-scripts":
        from loracli.sdscripts.backend import find_checkout

        sd_scripts_dir = find_checkout(sd_scripts_dir)  # once, before any job: a bad path fails every job
    check_notifications(notify_command, webhook)
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
        if status.get("state") == "finished" and force:
            log(f"again (--force): {job.config}; its finished run stays in {job.run_dir}")
            job.run_dir, status = None, {}
        if status.get("state") == "finished":
            job.status, job.steps = "finished", status.get("step", 0)
            job.total_steps = status.get("total_steps", job.total_steps)  # what that run did, not the new plan
            job.output, job.seconds = previous.get("output"), previous.get("seconds", 0.0)
            before = previous.get("config_hash") or ""
            if before and job.config_hash and before != job.config_hash:
                log(f"skip (finished): {job.config}; its config changed since that run finished (config hash "
                    f"{before} -> {job.config_hash}): `loracli queue run --force` trains it again")
            else:
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
            try:
                code, last_error = _run_job(job, resume, log)
            except OSError as exc:  # the child could not even start: this job fails, the queue goes on
                code, last_error = 4, failure_text(exc)
            job.seconds += time.time() - started
            status = _run_status(job.run_dir)
            job.steps, job.error = status.get("step", 0), status.get("error")
            if code not in (0, EXIT_INTERRUPTED) and not job.error:  # failed before its status.json said why
                job.error = last_error or f"the training process exited with code {code}"
            if code == 0:
                job.status = "finished"
                job.output = _final_output(job.run_dir)
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


def _final_output(run_dir: str | None) -> str | None:
    """The run's final LoRA file, as its plan names it; None when the plan cannot be read."""
    if not run_dir:
        return None
    try:
        plan = json.loads((Path(run_dir) / "plan.json").read_text(encoding="utf-8"))
        return str(Path(run_dir) / plan["expected_files"][-1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
