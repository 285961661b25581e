"""A newcomer's first hour: the moments that cost a new user time (issue 13), each held by a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML, make_dataset, run_cli


def test_plan_without_config_uses_loracli_toml_in_the_current_folder(tmp_path, make_image, monkeypatch):
    make_dataset(tmp_path, make_image)
    (tmp_path / "loracli.toml").write_text(EXAMPLE_DATASET_TOML)
    monkeypatch.chdir(tmp_path)
    result = run_cli("plan", "--json")
    assert result.exit_code == 0, result.output
    assert "using ./loracli.toml" in result.stderr
    assert json.loads(result.stdout)["num_train_images"] == 6  # 3 images x 2 repeats: the file was read


def test_plan_without_config_or_loracli_toml_names_the_model_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("plan")
    assert result.exit_code == 2
    assert "model.pretrained_model_name_or_path: required but not set" in result.stderr
    assert "add `pretrained_model_name_or_path = ...` under [model]" in result.stderr
    assert "add `model = ...`" not in result.stderr
    assert "add `train_data_dir = ...` under [dataset]" in result.stderr


def _fake_training(tmp_path: Path, monkeypatch) -> list[str]:
    """Replace the training child process by one that writes a finished run folder."""
    import loracli.queue as queue_module

    started: list[str] = []

    def fake_run_job(job, resume, log):
        run_dir = tmp_path / "runs" / f"run-{len(started)}"
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text(json.dumps(
            {"state": "finished", "step": job.total_steps, "total_steps": job.total_steps}))
        job.run_dir = str(run_dir)
        started.append(job.config)
        return 0, None

    monkeypatch.setattr(queue_module, "_run_job", fake_run_job)
    return started


def test_queue_tells_a_changed_config_and_force_trains_a_finished_job_again(tmp_path, make_image, monkeypatch):
    from loracli.queue import run_queue

    make_dataset(tmp_path, make_image)
    config = tmp_path / "job.toml"
    config.write_text(EXAMPLE_DATASET_TOML)
    started = _fake_training(tmp_path, monkeypatch)
    lines: list[str] = []
    queue_file = tmp_path / "q.json"

    def run(force=False):
        lines.clear()
        return run_queue([config], [], queue_file, 0, None, None, lines.append, force=force)

    finished_steps = run()[0].total_steps
    assert len(started) == 1
    run()  # unchanged: a plain skip
    assert len(started) == 1 and lines == [f"skip (finished): {config}"]

    config.write_text(EXAMPLE_DATASET_TOML.replace("max_train_epochs = 4", "max_train_epochs = 2"))
    jobs = run()
    assert len(started) == 1
    assert "config changed since that run finished" in lines[0] and "--force" in lines[0]
    # the finished run's numbers, not its steps over the new plan's (24/12)
    assert (jobs[0].steps, jobs[0].total_steps) == (finished_steps, finished_steps)

    jobs = run(force=True)
    assert len(started) == 2 and jobs[0].status == "finished"
    assert jobs[0].run_dir.endswith("run-1") and (tmp_path / "runs" / "run-0").is_dir()
    run()  # the rerun recorded the new hash: a plain skip again
    assert lines == [f"skip (finished): {config}"]


def _all_commands():
    import typer.main

    from loracli.cli.app import app

    def walk(command, path):
        if getattr(command, "commands", None):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        yield path, command

    yield from walk(typer.main.get_command(app), [])


def test_help_examples_paste_at_80_columns_and_placeholders_read_plainly(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    checked = 0
    for path, command in _all_commands():
        result = run_cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        assert "<list[" not in text and " range>" not in text, (path, text)
        assert max(len(line) for line in text.splitlines()) <= 80, (path, text)
        if not (command.epilog or "").startswith("Examples:"):
            continue
        # each example, its continuation lines joined, is the command as written in the source
        shown, current = [], ""
        for line in text.split("Examples:", 1)[1].splitlines():
            if not line.strip():
                continue
            current += (" " if current else "") + line.strip().removesuffix("\\").strip()
            if not line.endswith("\\"):
                shown.append(current)
                current = ""
        written = [" ".join(p.split()) for p in command.epilog.split("Examples:", 1)[1].split("\n\n") if p.strip()]
        assert shown == written, path
        checked += 1
    assert checked >= 20


def test_config_show_explain_lists_every_option_unset_ones_too(tmp_path):
    import tomllib

    from loracli.config.schema import SECTIONS

    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML)
    result = run_cli("config", "show", "--config", config, "--preset", "prodigy", "--explain")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            assert any(line.startswith((f"{key} =", f"{key}.", f"# {key} =")) for line in lines), (section, key)
    assert any(line.startswith("# clip_skip =") and "unset" in line for line in lines)
    assert any(line.startswith("optimizer_args.betas = [0.9, 0.999]") and "preset prodigy" in line for line in lines)
    assert tomllib.loads(result.stdout)["training"]["max_train_epochs"] == 4  # still TOML


def test_plan_shows_the_learning_rates_and_says_when_d_adapts(tmp_path, make_image):
    make_dataset(tmp_path, make_image)
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML)
    result = run_cli("plan", "--config", config, "--preset", "adamw8bit")
    assert result.exit_code == 0, result.output
    assert "learning rate: unet 0.0001, text encoder 5e-05" in result.stdout  # the preset's unet_lr / te lr
    result = run_cli("plan", "--config", config, "--preset", "prodigy", "--set", "optimizer.text_encoder_lr=0.5")
    flat = " ".join(result.stdout.split())
    assert "learning rate: unet 1, text encoder 0.5 (× d: Prodigy adapts d·lr" in flat


def test_lr_line_for_two_text_encoders_and_frozen_parts():
    from loracli.cli.plan_view import lr_line
    from loracli.config.schema import LoracliConfig

    def cfg(**optimizer):
        return LoracliConfig.model_validate({"model": {"pretrained_model_name_or_path": "tiny:sdxl"},
                                             "dataset": {"train_data_dir": "d"}, "optimizer": optimizer})

    assert lr_line(cfg(learning_rate=1e-4, text_encoder_lr=[1e-5, 2e-5]), "sdxl") == \
        "unet 0.0001, text encoder 1 1e-05, text encoder 2 2e-05"
    assert lr_line(cfg(learning_rate=1e-4, text_encoder_lr=0.0), "sd1") == "unet 0.0001, text encoder frozen (lr 0)"
    assert "Adafactor" in lr_line(cfg(optimizer_type="AdaFactor"), "sd1")


def test_quoted_numbers_and_booleans_are_refused_while_set_values_parse_as_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML + 'train_batch_size = "4"\n[network]\nnetwork_alpha = "8"\n')
    result = run_cli("config", "validate", config)
    assert result.exit_code == 2
    assert "training.train_batch_size: must be a number" in result.stderr
    assert "network.network_alpha: must be a number" in result.stderr
    config.write_text(EXAMPLE_DATASET_TOML.replace("enable_bucket = true", "enable_bucket = 1"))
    result = run_cli("config", "validate", config)
    assert "dataset.enable_bucket: must be true or false" in result.stderr
    config.write_text(EXAMPLE_DATASET_TOML)
    result = run_cli("config", "show", "--config", config, "--set", "training.train_batch_size=4",
                     "--set", "dataset.flip_aug=true")
    assert result.exit_code == 0, result.output
    assert "train_batch_size = 4" in result.stdout and "flip_aug = true" in result.stdout


def test_paths_are_printed_normalised(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    config = tmp_path / "jobs" / "j.toml"
    config.write_text(EXAMPLE_DATASET_TOML.replace('"data"', '"../data"') + '[output]\noutput_dir = "../runs-queue"\n')
    monkeypatch.chdir(tmp_path)
    result = run_cli("config", "show", "--config", "jobs/j.toml", "--set", 'logging.logging_dir="jobs/../tb"')
    assert result.exit_code == 0, result.output
    assert ".." not in result.stdout
    assert f'output_dir = "{tmp_path / "runs-queue"}"' in result.stdout
    assert f'train_data_dir = "{tmp_path / "data"}"' in result.stdout
    assert f'logging_dir = "{tmp_path / "tb"}"' in result.stdout


def test_trackers_are_checked_at_plan_time(tmp_path, make_image, monkeypatch):
    import loracli.trackers as trackers

    make_dataset(tmp_path, make_image)
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML)
    monkeypatch.setattr(trackers, "wandb_installed", lambda: False)
    result = run_cli("plan", "--config", config, "--set", 'logging.log_with="wandb"')
    assert result.exit_code == 2
    assert "logging.log_with: [E19]" in result.stderr and 'pip install "loracli[wandb]"' in result.stderr
    result = run_cli("plan", "--config", config, "--set", 'logging.log_with="tensorboard"')
    assert result.exit_code == 2 and "set logging.logging_dir" in result.stderr
    monkeypatch.setattr(trackers, "wandb_installed", lambda: True)
    result = run_cli("plan", "--config", config, "--set", 'logging.log_with="wandb"')
    assert result.exit_code == 0, result.output


def test_tracker_names_follow_sd_scripts():
    from loracli.config.schema import LoracliConfig
    from loracli.trackers import tracker_config, tracker_names

    def cfg(**logging):
        return LoracliConfig.model_validate({"model": {"pretrained_model_name_or_path": "tiny:sd15"},
                                             "dataset": {"train_data_dir": "d"}, "logging": logging})

    assert tracker_names(cfg()) == []
    assert tracker_names(cfg(logging_dir="tb")) == ["tensorboard"]
    assert tracker_names(cfg(log_with="all", logging_dir="tb")) == ["tensorboard", "wandb"]
    assert tracker_names(cfg(log_with="wandb")) == ["wandb"]
    flat = tracker_config(cfg(log_with="wandb"), {"total_steps": 30})
    assert flat["plan.total_steps"] == 30 and flat["model.pretrained_model_name_or_path"] == "tiny:sd15"
    assert flat["dataset.resolution"] == 512 and "logging.logging_dir" not in flat  # None left out
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_shell_completion_is_installable_and_completes_commands_and_options():
    import os
    import subprocess
    import sys

    help_text = run_cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    script = Path(sys.executable).parent / "loracli"  # the console script pip installed
    if not script.is_file():
        import pytest

        pytest.skip("loracli is not installed as a console script here")

    def complete(words: str) -> list[str]:
        env = dict(os.environ, _LORACLI_COMPLETE="complete_bash", COMP_WORDS=words,
                   COMP_CWORD=str(len(words.split()) - (0 if words.endswith(" ") else 1)))
        return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60).stdout.split()

    assert complete("loracli pr") == ["presets"]
    assert "--preset" in complete("loracli plan --pre")


def test_validation_split_holds_out_images_as_sd_scripts_splits_and_counts_steps_on_the_rest(tmp_path, make_image):
    import math
    import random

    make_dataset(tmp_path, make_image, {"2_char": [(128, 128)] * 7, "1_style": [(128, 128)] * 2})
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML + "train_batch_size = 1\n")
    base = json.loads(run_cli("plan", "--config", config, "--json").stdout)
    result = run_cli("plan", "--config", config, "--json", "--set", "dataset.validation_split=0.3",
                     "--set", "dataset.validation_seed=7")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)

    def expected_held_out(n: int) -> set[int]:  # sd-scripts: shuffle with the seed, train the first ceil(n(1-s))
        order = list(range(n))
        random.Random(7).shuffle(order)
        return set(order[math.ceil(n * (1 - 0.3)):])

    held = {(Path(i["path"]).parent.name, int(Path(i["path"]).stem)) for i in plan["validation_images"]}
    assert held == {("2_char", i) for i in expected_held_out(7)} | {("1_style", i) for i in expected_held_out(2)}
    trained = {(Path(i["path"]).parent.name, int(Path(i["path"]).stem)) for i in plan["images"]}
    assert not trained & held and len(trained | held) == 9
    # the steps count the training part: 5 x 2 repeats + 2 x 1 (style keeps both: ceil(1.4) = 2)
    assert plan["num_train_images"] == 12 and base["num_train_images"] == 16
    assert plan["total_steps"] == 4 * 12 and base["total_steps"] == 4 * 16
    assert plan["validation_timesteps"] == [200, 400, 600, 800] and plan["validation_seed"] == 7

    text = run_cli("plan", "--config", config, "--set", "dataset.validation_split=0.3", "--set",
                   "dataset.validation_seed=7", "--set", "training.validate_every_n_steps=10").stdout
    flat = " ".join(text.split())
    assert "validation: 2 images held out (split 0.3, seed 7; 2_char 2)" in flat
    assert "Loss every 10 steps and every epoch" in flat


def test_a_dataset_too_small_to_hold_one_out_is_warned(tmp_path, make_image):
    make_dataset(tmp_path, make_image)  # 3 images: 0.1 holds none out (ceil(2.7) = 3 train)
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE_DATASET_TOML)
    plan = json.loads(run_cli("plan", "--config", config, "--json", "--set", "dataset.validation_split=0.1").stdout)
    assert plan["validation_images"] == []
    assert any(w["code"] == "W24" and "holds out no image" in w["message"] for w in plan["warnings"])
    plan = json.loads(run_cli("plan", "--config", config, "--json",
                              "--set", "training.validate_every_n_epochs=1").stdout)
    assert any(w["code"] == "W24" and "validation_split is 0" in w["message"] for w in plan["warnings"])
