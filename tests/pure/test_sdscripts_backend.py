"""`loracli train --backend sd-scripts`: the command line, working directory and exit-code handling.

The sd-scripts checkout is a stand-in: a `train_network.py` in a temporary folder that records its
argv and working directory and writes a LoRA file (a test double for the subprocess boundary only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loracli import queue
from loracli.errors import ConfigError
from loracli.sdscripts import backend
from tests.pure.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"

STAND_IN = '''
import json, os, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
args = sys.argv[1:]
with open(args[args.index("--config_file") + 1], "rb") as f:
    config = tomllib.load(f)
flat = {k: v for section in config.values() for k, v in section.items()}
out = flat["output_dir"]
with open(os.path.join(out, "argv.json"), "w") as f:
    json.dump({"argv": sys.argv, "cwd": os.getcwd(), "python": sys.executable}, f)
mode = os.environ.get("STAND_IN_MODE", "ok")
if mode == "no-data":
    print("No data found. Please verify arguments (train_data_dir must be the parent of folders with images)")
    sys.exit(0)
if mode == "fail":
    print("RuntimeError: something broke", flush=True)
    sys.exit(7)
if mode == "no-file":
    sys.exit(0)
if mode == "launcher-error":  # the child's traceback, then accelerate's launcher's own
    print("Traceback (most recent call last):")
    print('  File "train_network.py", line 1, in <module>')
    print("AssertionError: duplicated lora name: lora_unet_time_embedding_linear_1")
    print("Traceback (most recent call last):")
    print('  File "/venv/lib/python3.10/site-packages/accelerate/commands/launch.py", line 1, in simple_launcher')
    print("    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)")
    print("subprocess.CalledProcessError: Command '['python', 'train_network.py']' returned non-zero exit status 1.")
    sys.exit(1)
if mode == "bare-assert":  # what lycoris_lora does with a preset file it cannot read
    print("import network module: lycoris.kohya")
    print("Error: cannot read preset file.  [Errno 2] No such file or directory: '/x/missing.toml'")
    print("Traceback (most recent call last):")
    print('  File "/venv/lib/python3.10/site-packages/lycoris/kohya.py", line 109, in create_network')
    print("    assert preset is not None")
    print("           ^^^^^^^^^^^^^^^^^^")
    print("AssertionError")
    print("Traceback (most recent call last):")
    print('  File "/venv/lib/python3.10/site-packages/accelerate/commands/launch.py", line 999, in simple_launcher')
    print("subprocess.CalledProcessError: Command '['python', 'train_network.py']' returned non-zero exit status 1.")
    sys.exit(1)
if mode == "oom":
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(1)
if mode == "slow":
    print("loading model", flush=True)
    import time
    time.sleep(30)
print("steps:  50%|#####     | 14/28 [00:01<00:01]", end="\\r", flush=True)
print("epoch 2/4")
with open(os.path.join(out, flat["output_name"] + ".safetensors"), "wb") as f:
    f.write(b"fake lora")
print("model saved.")
'''


@pytest.fixture
def checkout(tmp_path):
    folder = tmp_path / "sd-scripts"
    folder.mkdir()
    (folder / "train_network.py").write_text(STAND_IN)
    return folder


@pytest.fixture
def direct_launch(monkeypatch):
    """Most tests skip accelerate's start-up (seconds): the same script args, run by this Python directly.
    test_real_accelerate_command runs the real launcher."""
    calls = []
    real_launch_command = backend.launch_command

    def launch(python, num_processes, export_dir, script="train_network.py"):
        real = real_launch_command(python, num_processes, export_dir, script)
        calls.append(real)
        return [python, *real[real.index(script):]]

    monkeypatch.setattr(backend, "launch_command", launch)
    return calls


def _train(checkout: Path, runs: Path, *extra: str):
    return run_cli("train", "--config", EXAMPLE, "--backend", "sd-scripts", "--sd-scripts-dir", checkout,
                   "--output-dir", runs, *extra)


def _run_dir(runs: Path) -> Path:
    (run_dir,) = list(runs.iterdir())
    return run_dir


def test_real_accelerate_command(checkout, tmp_path):
    result = _train(checkout, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "runs")
    export = run_dir / "sd-scripts"
    recorded = json.loads((run_dir / "argv.json").read_text())
    assert recorded["argv"] == ["train_network.py", "--config_file", str(export / "config.toml"),
                                "--dataset_config", str(export / "dataset.toml")]
    assert recorded["cwd"] == str(checkout)
    log = (run_dir / "sd-scripts.log").read_text()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
               "--num_processes", "1", "train_network.py", "--config_file", str(export / "config.toml"),
               "--dataset_config", str(export / "dataset.toml")]
    assert log.splitlines()[0] == f"$ (cd {checkout} && {' '.join(command)})"
    assert "model saved." in log and "model saved." in result.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["backend"] == "sd-scripts"
    assert status["last_save"] == str(run_dir / "tiny-example.safetensors")
    assert (run_dir / "tiny-example.safetensors").read_bytes() == b"fake lora"
    for name in ("config.resolved.toml", "plan.json", "run.json"):
        assert (run_dir / name).is_file()
    assert f"run folder: {run_dir}" in result.stdout


def test_launch_command_and_checkout_python(checkout, tmp_path, monkeypatch):
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.delenv(backend.PYTHON_ENV, raising=False)
    assert backend.checkout_python(checkout) == sys.executable
    venv_python = checkout / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert backend.checkout_python(checkout) == str(venv_python)
    (checkout / "venv" / "bin").mkdir(parents=True)
    (checkout / "venv" / "bin" / "python").write_text("")
    assert backend.checkout_python(checkout) == str(checkout / "venv" / "bin" / "python")
    assert backend.launch_command("py", 2, tmp_path) == [
        "py", "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1", "--multi_gpu",
        "--num_processes", "2", "train_network.py", "--config_file", str(tmp_path / "config.toml"),
        "--dataset_config", str(tmp_path / "dataset.toml")]


def test_output_dir_is_the_run_folder(checkout, tmp_path, direct_launch):
    result = _train(checkout, tmp_path / "runs", "--set", "training.seed=7")
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "runs")
    import tomllib

    config = tomllib.loads((run_dir / "sd-scripts" / "config.toml").read_text())
    assert config["output"]["output_dir"] == str(run_dir)
    assert config["training"]["seed"] == 7
    assert direct_launch[0][0] == sys.executable and direct_launch[0][1:3] == ["-m", "accelerate.commands.launch"]


@pytest.mark.parametrize("mode, exit_code, message, error", [
    ("fail", 4, "train_network.py exited with status 7: RuntimeError: something broke", "status 7"),
    ("launcher-error", 4, "train_network.py exited with status 1: AssertionError: duplicated lora name: "
                          "lora_unet_time_embedding_linear_1", "AssertionError: duplicated lora name"),
    ("bare-assert", 4, "train_network.py exited with status 1: AssertionError (at: assert preset is not None); "
                       "before it: Error: cannot read preset file.", "cannot read preset file"),
    ("no-data", 3, "No data found", ""),  # sd-scripts exits 0 here
    ("no-file", 4, "did not write tiny-example.safetensors", "did not write"),  # exit 0 but no LoRA
])
def test_sd_scripts_failures_get_loracli_exit_codes(checkout, tmp_path, direct_launch, monkeypatch, mode, exit_code,
                                                    message, error):
    monkeypatch.setenv("STAND_IN_MODE", mode)
    result = _train(checkout, tmp_path / "runs")
    assert result.exit_code == exit_code
    assert message in result.stderr
    status = json.loads((_run_dir(tmp_path / "runs") / "status.json").read_text())
    assert status["state"] == "failed" and error in status["error"]


def test_bad_checkout_and_resume_are_clear_errors(tmp_path, checkout, monkeypatch):
    result = run_cli("train", "--config", EXAMPLE, "--backend", "sd-scripts", "--output-dir", tmp_path / "runs")
    assert result.exit_code == 2 and "LORACLI_SD_SCRIPTS_DIR" in result.stderr
    result = _train(tmp_path, tmp_path / "runs")
    assert result.exit_code == 2 and "no train_network.py" in result.stderr
    assert not (tmp_path / "runs").exists()
    result = run_cli("train", "--resume", tmp_path, "--backend", "sd-scripts", "--sd-scripts-dir", checkout)
    assert result.exit_code == 2 and "cannot resume" in result.stderr
    result = run_cli("train", "--config", EXAMPLE, "--backend", "kohya")
    assert result.exit_code == 2 and "unknown backend" in result.stderr


def test_environment_variables_pick_the_backend(checkout, tmp_path, direct_launch, monkeypatch):
    monkeypatch.setenv("LORACLI_BACKEND", "sd-scripts")
    monkeypatch.setenv("LORACLI_SD_SCRIPTS_DIR", str(checkout))
    result = run_cli("train", "--config", EXAMPLE, "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert (_run_dir(tmp_path / "runs") / "argv.json").is_file()


def test_progress_lines_update_the_status(tmp_path):
    status = backend.RunStatus(tmp_path, 28)
    watch = backend.OutputWatch(status)
    watch.feed("steps:   0%|          | 0/28 [00:00<?]\rsteps:  50%|#####     | 1")
    watch.feed("4/28 [00:01<00:01]\r\nepoch 3/4\n")
    watch.close()
    assert status.data["step"] == 14 and status.data["epoch"] == 3 and not watch.no_data


def test_queue_runs_jobs_on_the_sd_scripts_backend(checkout, tmp_path):
    job = queue.Job(str(EXAMPLE), ["prodigy"], backend="sd-scripts", sd_scripts_dir=str(checkout))
    command = queue._train_command(job, resume=False)
    assert command[:4] == [sys.executable, "-m", "loracli", "train"]
    assert command[4:] == ["--backend", "sd-scripts", "--sd-scripts-dir", str(checkout), "--config", str(EXAMPLE),
                           "--preset", "prodigy"]
    jobs = queue.plan_jobs([EXAMPLE], [], lambda line: None, "sd-scripts", checkout)
    assert jobs[0].backend == "sd-scripts" and jobs[0].sd_scripts_dir == str(checkout) and jobs[0].total_steps == 28
    plain = queue._train_command(queue.Job(str(EXAMPLE), []), resume=False)
    assert plain[4:6] == ["--backend", "loracli"]


def test_queue_refuses_a_missing_checkout(tmp_path):
    from loracli.errors import ConfigError

    with pytest.raises(ConfigError, match="train_network.py"):
        queue.run_queue([EXAMPLE], [], tmp_path / "q.json", 0, None, None, lambda line: None, "sd-scripts",
                        tmp_path)


def _prepared_run(tmp_path, checkout):
    from loracli.config.loader import resolve_config
    from loracli.plan import build_plan
    from loracli.sdscripts.export import build_export, write_export

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    resolved = resolve_config(EXAMPLE, [], [])
    plan = build_plan(resolved)
    write_export(run_dir / backend.EXPORT_DIR, build_export(resolved.config, plan, output_dir=run_dir), checkout)
    command = [sys.executable, "train_network.py", *backend.script_args(run_dir / backend.EXPORT_DIR)[1:]]
    return run_dir, plan, command


def test_out_of_memory_is_named_for_the_queue_retry(checkout, tmp_path, monkeypatch):
    from loracli.errors import TrainingError

    monkeypatch.setenv("STAND_IN_MODE", "oom")
    run_dir, plan, command = _prepared_run(tmp_path, checkout)
    with pytest.raises(TrainingError) as caught:
        backend.run_sd_scripts_job(run_dir, plan, command, checkout, echo=lambda chunk: None)
    status = json.loads((run_dir / "status.json").read_text())
    assert queue.OOM_MARKER in status["error"] and queue.OOM_MARKER in str(caught.value)


def test_interrupt_stops_the_child_and_marks_the_run(checkout, tmp_path, monkeypatch):
    from loracli.errors import Interrupted

    monkeypatch.setenv("STAND_IN_MODE", "slow")
    run_dir, plan, command = _prepared_run(tmp_path, checkout)

    def ctrl_c(chunk: bytes) -> None:
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as caught:
        backend.run_sd_scripts_job(run_dir, plan, command, checkout, echo=ctrl_c)
    assert caught.value.exit_code == 130
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert not (run_dir / "tiny-example.safetensors").exists()


def _fake_python(path: Path, has_accelerate: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {0 if has_accelerate else 1}\n")
    path.chmod(0o755)
    return path


def test_which_python_runs_sd_scripts(checkout, tmp_path):
    explicit = _fake_python(tmp_path / "env" / "bin" / "python", True)
    active = _fake_python(tmp_path / "active" / "bin" / "python", True)
    env = {backend.PYTHON_ENV: str(explicit), "VIRTUAL_ENV": str(tmp_path / "active")}
    assert backend.choose_python(checkout, env) == (str(explicit), backend.PYTHON_ENV)
    # a venv folder is enough: its bin/python is taken
    assert backend.choose_python(checkout, {backend.PYTHON_ENV: str(tmp_path / "env")})[0] == str(explicit)
    with pytest.raises(ConfigError, match=backend.PYTHON_ENV):
        backend.choose_python(checkout, {backend.PYTHON_ENV: str(tmp_path / "nowhere")})
    assert backend.choose_python(checkout, {"VIRTUAL_ENV": str(tmp_path / "active")}) == (
        str(active), "the active virtual environment (VIRTUAL_ENV)")
    own, why = backend.choose_python(checkout, {})
    assert own == sys.executable and "loracli's own Python" in why and backend.PYTHON_ENV in why
    venv = _fake_python(checkout / "venv" / "bin" / "python", True)
    assert backend.choose_python(checkout, {"VIRTUAL_ENV": str(tmp_path / "active")}) == (
        str(venv), "the checkout's venv/")
    backend.check_python(str(explicit), "test")
    with pytest.raises(ConfigError, match="has no accelerate"):
        backend.check_python(str(_fake_python(tmp_path / "bare" / "python", False)), "test")
    with pytest.raises(ConfigError, match="cannot run"):
        backend.check_python(str(tmp_path / "missing" / "python"), "test")


def test_the_python_is_said_and_a_bad_one_stops_before_the_run_folder(checkout, tmp_path, direct_launch,
                                                                         monkeypatch):
    monkeypatch.setenv(backend.PYTHON_ENV, str(_fake_python(tmp_path / "bare" / "python", False)))
    result = _train(checkout, tmp_path / "runs")
    assert result.exit_code == 2 and "has no accelerate" in result.stderr
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv(backend.PYTHON_ENV, sys.executable)
    result = _train(checkout, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert f"sd-scripts python: {sys.executable} ({backend.PYTHON_ENV})" in result.stdout
