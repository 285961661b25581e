"""The CLI end to end, through Typer's runner (no torch needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML, make_dataset, run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"


@pytest.mark.parametrize("args", [[], ["plan"], ["train"], ["presets", "list"], ["presets", "show"],
                                  ["presets", "copy"], ["config", "validate"], ["config", "show"], ["init"]])
def test_every_help_ends_with_runnable_examples(args):
    result = run_cli(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    tail = result.output.split("Examples:")[-1]
    assert "loracli " in tail


def test_plan_json_on_the_shipped_example():
    result = run_cli("plan", "--config", EXAMPLE, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    for key in ("total_steps", "epochs", "steps_per_epoch", "batches_per_epoch", "num_train_images",
                "num_reg_images", "warmup_steps", "buckets", "images", "skipped", "warnings", "errors"):
        assert key in plan
    assert plan["num_train_images"] == 6 * 2 + 2 * 1
    assert sum(b["count"] for b in plan["buckets"]) == plan["num_train_images"]
    assert plan["total_steps"] == plan["epochs"] * plan["steps_per_epoch"]
    image = plan["images"][0]
    assert set(image) >= {"path", "size", "bucket", "resized", "repeats", "caption_source"}


def test_plan_summary_is_readable():
    result = run_cli("plan", "--config", EXAMPLE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "buckets" in out and "2_tinychar" in out and "total steps" in out
    assert "epochs ×" in out or "epochs x" in out  # the formula line


def test_strict_turns_warnings_into_exit_2(tmp_path, make_image):
    make_dataset(tmp_path, make_image)
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    ok = run_cli("plan", "--config", cfg)
    assert ok.exit_code == 0
    assert "W10" in ok.stdout  # a handful of steps is far from what guides expect
    strict = run_cli("plan", "--config", cfg, "--strict")
    assert strict.exit_code == 2
    assert "W10" in strict.stderr and "--strict" in strict.stderr


def test_presets_list_show_copy(tmp_path):
    listed = run_cli("presets", "list")
    assert listed.exit_code == 0
    for name in ("dadapt-v3", "prodigy", "adamw8bit", "locon", "sdxl-lowvram"):
        assert name in listed.stdout
    shown = run_cli("presets", "show", "dadapt-v3")
    assert shown.exit_code == 0
    for text in ("optimizer.optimizer_type", "DAdaptAdam", "optimizer.optimizer_args.weight_decay", "0.4",
                 "Lazy DAdaptation Guide", "main knob"):
        assert text in shown.stdout, text
    dest = tmp_path / "mine.toml"
    copied = run_cli("presets", "copy", "prodigy", dest)
    assert copied.exit_code == 0 and dest.read_text() == (ROOT / "presets" / "prodigy.toml").read_text()
    again = run_cli("presets", "copy", "prodigy", dest)
    assert again.exit_code == 2 and str(dest) in again.stderr
    used = run_cli("presets", "show", str(dest))
    assert used.exit_code == 0 and "Prodigy" in used.stdout


def test_config_show_explain_names_origins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    result = run_cli("config", "show", "--config", cfg, "--preset", "prodigy", "--set", "training.seed=9",
                     "--explain")
    assert result.exit_code == 0, result.output
    lines = {line.split("=")[0].strip(): line for line in result.stdout.splitlines() if "=" in line}
    assert lines["optimizer_type"].endswith("# preset prodigy")
    assert lines["seed"].endswith("# --set")
    assert lines["max_train_epochs"].endswith(f"# file {cfg}")
    assert lines["gradient_accumulation_steps"].endswith("# default")
    assert lines["optimizer_args.d_coef"].endswith("# preset prodigy")


def test_config_show_round_trips(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    first = run_cli("config", "show", "--config", cfg, "--preset", "dadapt-v3")
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(first.stdout)
    second = run_cli("config", "show", "--config", resolved)
    assert second.exit_code == 0 and second.stdout == first.stdout


def test_config_validate(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    ok = run_cli("config", "validate", cfg)
    assert ok.exit_code == 0 and "ok" in ok.stdout
    cfg.write_text(EXAMPLE_DATASET_TOML + "[optimizer]\nlr_scheduler = \"adafactor\"\n")
    bad = run_cli("config", "validate", cfg)
    assert bad.exit_code == 2 and "optimizer.lr_scheduler" in bad.stderr


def test_init_writes_a_starter_that_validates(tmp_path):
    result = run_cli("init", tmp_path / "proj")
    assert result.exit_code == 0
    starter = tmp_path / "proj" / "loracli.toml"
    assert "[model]" in starter.read_text()
    assert run_cli("config", "validate", starter).exit_code == 0
    assert run_cli("init", tmp_path / "proj").exit_code == 2  # never overwrites


def test_help_and_plan_never_import_torch(tmp_path):
    """A blocker on the import system makes torch & co. unimportable; both commands must still work."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "BLOCKED = ('torch', 'diffusers', 'transformers', 'accelerate', 'lycoris')\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError('blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    for args in (["--help"], ["plan", "--config", str(EXAMPLE), "--json"]):
        proc = subprocess.run([sys.executable, "-c", "from loracli.cli.app import main; main()", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr  # the blocker works


def test_plan_names_the_family_and_how_it_was_found(tmp_path, make_image, monkeypatch):
    from tests.pure.test_model_probe import cache_snapshot, diffusers_folder

    make_dataset(tmp_path, make_image)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache_snapshot(cache, "stabilityai/stable-diffusion-xl-base-1.0")
    diffusers_folder(snapshot, "StableDiffusionXLPipeline", xl=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML.replace("tiny:sd15", "stabilityai/stable-diffusion-xl-base-1.0"))
    shown = run_cli("plan", "--config", cfg)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "SDXL (detected from model_index.json (StableDiffusionXLPipeline))" in text
    assert "found in the Hugging Face cache, revision main (0123456789ab):" in text
    assert str(snapshot) in shown.stdout.replace("\n", "")
    plan = json.loads(run_cli("plan", "--config", cfg, "--json").stdout)
    assert (plan["model_family"], plan["model_path"], plan["model_kind"]) == ("sdxl", str(snapshot), "diffusers")
    # Not in the cache: one line at plan time that says how to get it.
    cfg.write_text(EXAMPLE_DATASET_TOML.replace("tiny:sd15", "runwayml/stable-diffusion-v1-5"))
    missing = run_cli("plan", "--config", cfg)
    assert missing.exit_code == 3 and "huggingface-cli download runwayml/stable-diffusion-v1-5" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_config_validate_uses_the_family_logic(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML.replace("[dataset]", "sdxl = true\n[dataset]"))
    bad = run_cli("config", "validate", cfg)
    assert bad.exit_code == 2 and "model.sdxl: is true but the model is SD1.x" in bad.stderr
    cfg.write_text(EXAMPLE_DATASET_TOML.replace("tiny:sd15", "tiny:sdxl"))
    ok = run_cli("config", "validate", cfg)
    assert ok.exit_code == 0 and "model: SDXL (detected from the name tiny:sdxl" in ok.stdout
    assert "W19" in ok.stdout  # 128 px on SDXL
    # A model that is not on this machine: validate still checks the rest and says so.
    cfg.write_text(EXAMPLE_DATASET_TOML.replace("tiny:sd15", str(tmp_path / "elsewhere.safetensors")))
    moved = run_cli("config", "validate", cfg)
    assert moved.exit_code == 0 and "note:" in moved.stdout and "no such file or folder" in moved.stdout
