"""`loracli train --backend sd-scripts`: loracli plans and records the run, sd-scripts trains it.

The run folder is made as for loracli's own trainer (config.resolved.toml,
plan.json, run.json, status.json); the export goes to `RUN/sd-scripts/` and
sd-scripts writes its LoRA files into the run folder itself. sd-scripts' Python
(`choose_python`: LORACLI_SD_SCRIPTS_PYTHON, else the checkout's venv/ or .venv/,
else the active VIRTUAL_ENV, else loracli's own, said out loud) runs
`-m accelerate.commands.launch ... (sdxl_)train_network.py` with the checkout as
working directory; its output is streamed to the terminal and to
`RUN/sd-scripts.log`, scanned for the cases sd-scripts does not signal with its
exit status ("No data found" exits 0), for progress, which status.json records,
and for the child's own last error line (accelerate's launcher ends every
failure with its CalledProcessError, which says nothing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from loracli.config.loader import ResolvedConfig
from loracli.errors import ConfigError, DatasetError, Interrupted, Problem, TrainingError
from loracli.plan import Plan, build_plan
from loracli.rundir import atomic_write_json, create_run_dir, settle_seed, write_run_files
from loracli.sdscripts.export import (
    TRAIN_SCRIPT,
    accelerate_options,
    build_export,
    export_family,
    report_lines,
    script_args,
    write_export,
)
from loracli.sdscripts.options import script_for

EXPORT_DIR = "sd-scripts"
PYTHON_ENV = "LORACLI_SD_SCRIPTS_PYTHON"
# "AssertionError: ...", "torch.OutOfMemoryError: ...", "ValueError" at a line start: an exception line.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)\b(?::|$)")
# A line a library prints before failing ("Error: cannot read preset file. ...").
ERROR_SAID = re.compile(r"^(?:Error|ERROR)\b[:\s]")
# What accelerate's launcher adds after the child fails.
LAUNCHER_LINES = ("CalledProcessError", "accelerate/commands/", "accelerate\\commands\\", "simple_launcher(",
                  "launch_command(", "sys.exit(main())", "raise subprocess", "Traceback (most recent call last)")
LOG_FILE = "sd-scripts.log"
NO_DATA_MARKER = "No data found"
OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError")
OOM_MESSAGE = "out of GPU memory"  # what the queue looks for before retrying a job
# tqdm's bar from train_network.py ("steps:  50%|#####     | 14/28 [...]") and its epoch log line.
STEP_RE = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")
EPOCH_RE = re.compile(r"\bepoch (\d+)/(\d+)")


def find_checkout(sd_scripts_dir: Path | None, script: str = TRAIN_SCRIPT) -> Path:
    if sd_scripts_dir is None:
        raise ConfigError(Problem("--sd-scripts-dir", "the sd-scripts backend needs your sd-scripts checkout",
                                  "pass --sd-scripts-dir PATH or set LORACLI_SD_SCRIPTS_DIR"))
    checkout = sd_scripts_dir.expanduser().absolute()
    if not (checkout / script).is_file():
        hint = ("give the root of a kohya-ss/sd-scripts checkout" if script == TRAIN_SCRIPT else
                f"SDXL runs need {script}: give the root of a kohya-ss/sd-scripts checkout recent enough to have it")
        raise ConfigError(Problem(f"--sd-scripts-dir {sd_scripts_dir}", f"no {script} in this folder", hint))
    return checkout


def _venv_python(venv: Path) -> Path | None:
    return next((venv / rel for rel in ("bin/python", "Scripts/python.exe") if (venv / rel).is_file()), None)


def choose_python(checkout: Path, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(python, where it came from) for sd-scripts: LORACLI_SD_SCRIPTS_PYTHON, the checkout's venv/ or .venv/,
    the active VIRTUAL_ENV, else loracli's own interpreter."""
    env = os.environ if environ is None else environ
    explicit = env.get(PYTHON_ENV, "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = _venv_python(path) or path
        if not path.is_file():
            raise ConfigError(Problem(PYTHON_ENV, f"{explicit} is not a Python interpreter",
                                      "point it at the python of sd-scripts' environment (or at the venv folder)"))
        return str(path), PYTHON_ENV
    for venv in ("venv", ".venv"):
        found = _venv_python(checkout / venv)
        if found:
            return str(found), f"the checkout's {venv}/"
    active = env.get("VIRTUAL_ENV", "").strip()
    if active and (found := _venv_python(Path(active))):
        return str(found), "the active virtual environment (VIRTUAL_ENV)"
    return sys.executable, (f"loracli's own Python: the checkout has no venv/ and no virtual environment is active; "
                            f"set {PYTHON_ENV} to use another")


def checkout_python(checkout: Path) -> str:
    return choose_python(checkout)[0]


def check_python(python: str, source: str) -> None:
    """The chosen Python starts and has accelerate (found without importing it: no torch start-up)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('accelerate') is None)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(Problem(python, f"cannot run this Python ({source}): {exc}",
                                  f"set {PYTHON_ENV} to the python of sd-scripts' environment")) from None
    if done.returncode != 0:
        raise ConfigError(Problem(python, f"this Python ({source}) has no accelerate, which sd-scripts runs under",
                                  f"install sd-scripts' requirements there, or set {PYTHON_ENV} to the python of "
                                  "sd-scripts' environment"))


def launch_command(python: str, num_processes: int, export_dir: Path, script: str = TRAIN_SCRIPT) -> list[str]:
    return [python, "-m", "accelerate.commands.launch", *accelerate_options(num_processes),
            *script_args(export_dir, script)]


class RunStatus:
    """status.json with the fields of loracli's own trainer (state, step, epoch, last_save, error, ...)."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.path = run_dir / "status.json"
        self.data = {"state": "running", "step": 0, "epoch": 0, "total_steps": total_steps, "last_save": None,
                     "error": None, "started_at": time.time(), "updated_at": time.time(), "pid": os.getpid(),
                     "backend": "sd-scripts"}
        self._written = 0.0
        self.write()

    def write(self, **changes) -> None:
        self.data.update(changes, updated_at=time.time())
        atomic_write_json(self.path, self.data)
        self._written = time.monotonic()

    def progress(self, **changes) -> None:
        """Progress lines come many times a second; the file is rewritten at most once a second."""
        self.data.update(changes)
        if time.monotonic() - self._written >= 1.0:
            self.write()


class OutputWatch:
    """Splits the child's output into lines (tqdm uses \\r) and remembers what loracli must act on."""

    def __init__(self, status: RunStatus):
        self.status = status
        self.no_data = False
        self.out_of_memory = False
        self.tail: list[str] = []  # the last lines (progress bars left out)
        self._partial = ""

    def feed(self, text: str) -> None:
        lines = re.split(r"[\r\n]", self._partial + text)
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if NO_DATA_MARKER in line:
            self.no_data = True
        if any(p in line for p in OOM_PATTERNS):
            self.out_of_memory = True
        if m := STEP_RE.search(line):
            self.status.progress(step=int(m.group(1)))
        elif m := EPOCH_RE.search(line):
            self.status.progress(epoch=int(m.group(1)))
        if not STEP_RE.search(line):
            self.tail = (self.tail + [line.strip()])[-200:]

    def error_line(self) -> str:
        """The child's own last exception line, not accelerate's CalledProcessError after it; else the last line
        that is not the launcher's. A bare exception (`AssertionError`) gets the failing source line and an
        `Error: ...` line printed before its traceback, which is where such failures say what went wrong."""
        own = [line for line in self.tail if not any(mark in line for mark in LAUNCHER_LINES)]
        for i in range(len(own) - 1, -1, -1):
            line = own[i]
            if not EXCEPTION_LINE.match(line):
                continue
            if ":" in line:
                return line
            context = [c for c in own[max(0, i - 30):i] if c.strip("^~ ") and not c.startswith("File ")]
            detail = f"{line} (at: {context[-1]})" if context else line
            said = [c for c in context if ERROR_SAID.match(c)]
            return f"{detail}; before it: {said[-1]}" if said else detail
        return own[-1] if own else (self.tail[-1] if self.tail else "no output")


def _stream(proc: subprocess.Popen, log: IO[bytes], watch: OutputWatch, echo: Callable[[bytes], None]) -> None:
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        echo(chunk)
        watch.feed(chunk.decode("utf-8", errors="replace"))
    watch.close()


def _echo(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def run_sd_scripts_job(run_dir: Path, plan: Plan, command: list[str], cwd: Path,
                       echo: Callable[[bytes], None] = _echo, script: str = TRAIN_SCRIPT) -> Path:
    """Run the sd-scripts command for a prepared run folder; returns the final LoRA file."""
    status = RunStatus(run_dir, plan.total_steps)
    watch = OutputWatch(status)
    log_path = run_dir / LOG_FILE
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # stream, not a 4 KiB pipe buffer at a time
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    proc: subprocess.Popen | None = None
    try:
        with open(log_path, "ab") as log:
            log.write(f"$ (cd {cwd} && {' '.join(command)})\n".encode())
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            _stream(proc, log, watch, echo)
            code = proc.wait()
    except KeyboardInterrupt:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        status.write(state="interrupted", error="interrupted by a signal (sd-scripts runs cannot be resumed)")
        raise Interrupted(Problem(str(run_dir), "interrupted; the sd-scripts backend cannot resume",
                                  "run `loracli train --backend sd-scripts` again")) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _outcome(run_dir, plan, code, watch, status, log_path, script)


def _outcome(run_dir: Path, plan: Plan, code: int, watch: OutputWatch, status: RunStatus, log_path: Path,
             script: str = TRAIN_SCRIPT) -> Path:
    if watch.no_data:
        # sd-scripts logs this and returns normally (exit 0): loracli calls it what it is.
        message = "sd-scripts found no training images ('No data found') although loracli's plan did"
        status.write(state="failed", error=message)
        raise DatasetError(Problem(str(log_path), message, "check the image folders and extensions in "
                                   f"{run_dir / EXPORT_DIR / 'dataset.toml'}"))
    if code != 0:
        message = f"{script} exited with status {code}: {watch.error_line()}"
        if watch.out_of_memory:
            message = f"{OOM_MESSAGE}: {message}"
        status.write(state="failed", error=message)
        raise TrainingError(Problem("sd-scripts", message, f"full output in {log_path}"))
    final = run_dir / plan.expected_files[-1]
    if not final.is_file():
        message = f"{script} exited 0 but did not write {final.name}"
        status.write(state="failed", error=message)
        raise TrainingError(Problem("sd-scripts", message, f"full output in {log_path}"))
    status.write(state="finished", step=plan.total_steps, epoch=plan.epochs, last_save=str(final),
                 finished_at=time.time())
    return final


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_train_sd_scripts(resolved: ResolvedConfig, strict: bool, sd_scripts_dir: Path | None) -> Path:
    """Validate and plan here, write the run folder and the export, then let sd-scripts train."""
    from loracli.cli.plan_view import check_strict, print_plan

    checkout = find_checkout(sd_scripts_dir)
    settle_seed(resolved)
    plan = build_plan(resolved)
    print_plan(resolved, plan)
    check_strict(plan, strict)
    script = script_for(export_family(resolved.config, plan).name)
    find_checkout(sd_scripts_dir, script)  # these checks before any folder is made
    python, source = choose_python(checkout)
    check_python(python, source)
    run_dir = create_run_dir(resolved.config)
    export = build_export(resolved.config, plan, output_dir=run_dir)
    write_run_files(run_dir, resolved, plan, sys.argv)
    write_export(run_dir / EXPORT_DIR, export, checkout)
    for line in report_lines(export):
        sys.stderr.write(line + "\n")
    print(f"run folder: {run_dir}", flush=True)
    command = launch_command(python, export.num_processes, run_dir / EXPORT_DIR, export.script)
    print(f"sd-scripts: {checkout} ({export.script})", flush=True)
    print(f"sd-scripts python: {python} ({source})", flush=True)
    final = run_sd_scripts_job(run_dir, plan, command, checkout, script=export.script)
    print(f"saved: {final}")
    return final
