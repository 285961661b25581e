"""A newcomer's first hour, run side: what a user sees and gets from `loracli train` (issue 13)."""

from __future__ import annotations

import pytest
import torch

from loracli.run.optim import build_optimizer


def test_adaptive_optimizers_print_nothing_when_built(capsys):
    for name in ("Prodigy", "DAdaptAdam"):
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer, _ = build_optimizer(name, [{"params": [param], "lr": 1.0}], 1.0,
                                       {"decouple": True, "weight_decay": 0.01})
        assert optimizer.param_groups[0]["decouple"] is True  # the argument still arrived
    captured = capsys.readouterr()
    assert "decoupled" not in captured.out + captured.err


def test_a_run_says_what_it_loads_ends_with_a_summary_and_records_what_it_really_did(smoke_project, monkeypatch):
    """fp16 asked on a CPU trains in fp32: the files say "no"; LoRA and state files are 0644 under
    umask 022; the run names the model it loads and ends with time, speed, loss, files and next steps."""
    import json
    import os
    import stat
    from pathlib import Path

    from loracli.final_loss import final_loss
    from loracli.safetensors_header import read_header
    from tests.pure.cli_helpers import run_cli

    if torch.cuda.is_available():
        pytest.skip("the fp16 fallback happens on a CPU only")
    old_umask = os.umask(0o022)
    try:
        result = run_cli("train", "--config", smoke_project, "--set", "training.max_train_epochs=1",
                         "--set", 'training.mixed_precision="fp16"', "--set", "output.save_state_every_n_steps=2",
                         "--set", 'logging.log_with="tensorboard"', "--set", 'logging.logging_dir="tb"',
                         "--set", 'logging.log_tracker_name="first-hour"',
                         # a held-out image, validated every 2 steps; lr 1e-12 keeps the weights (nearly) as they are
                         "--set", "dataset.validation_split=0.34", "--set", "training.validate_every_n_steps=2",
                         "--set", "optimizer.learning_rate=1e-12")
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    out = result.stdout + result.stderr
    run_dir = next(Path("runs").iterdir())
    assert "loading model tiny:sd15 (SD1.x) ..." in out
    assert out.index("loading model") < out.index("done: ")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    summary = out[out.index("done: "):]
    assert f"done: {len(losses)} steps in " in summary and "steps/s" in summary and "images/s" in summary
    assert f"loss: final {final_loss(losses):.4f} (mean of the last {min(10, len(losses))} steps)" in summary
    assert f"mean {sum(losses) / len(losses):.4f} over {len(losses)} steps" in summary
    assert f"wrote {run_dir / 'smoke.safetensors'}" in summary and f"wrote {run_dir / 'loss.png'}" in summary
    assert f"loracli grid {run_dir}" in summary and f"loracli report {run_dir}" in summary

    lora = run_dir / "smoke.safetensors"
    assert read_header(lora).metadata["ss_mixed_precision"] == "no"
    assert stat.S_IMODE(lora.stat().st_mode) == 0o644
    state_files = [p for p in (run_dir / "state").rglob("*") if p.is_file()]
    assert len(state_files) > 4 and {stat.S_IMODE(p.stat().st_mode) for p in state_files} == {0o644}

    # validation: at every 2nd step and the epoch's end, on the held-out image; fixed latents, noise and
    # timesteps, so with the weights unchanged every round gives the same number
    validation = [r for r in records if "val_loss" in r]
    steps = len(losses)
    assert [r["step"] for r in validation] == sorted(list(range(2, steps + 1, 2)) + [steps])
    assert max(r["val_loss"] for r in validation) - min(r["val_loss"] for r in validation) < 1e-6
    assert "validation loss" in out
    plan_data = json.loads((run_dir / "plan.json").read_text())
    assert len(plan_data["validation_images"]) == 1
    assert read_header(run_dir / "smoke.safetensors").metadata["ss_num_validation_images"] == \
        str(sum(i["repeats"] for i in plan_data["validation_images"]))

    # the tracker got the run's config and plan as its configuration, and the loss of every step
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hparams = yaml.safe_load(next(Path("tb", "first-hour").rglob("hparams.yml")).read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert hparams["plan.total_steps"] == plan["total_steps"] and hparams["plan.config_hash"] == plan["config_hash"]
    assert hparams["training.mixed_precision"] == "fp16" and hparams["network.network_dim"] == 4
    events = EventAccumulator(str(next(Path("tb", "first-hour").glob("events.out.tfevents.*"))))
    events.Reload()
    assert [e.value for e in events.Scalars("loss/current")] == pytest.approx(losses)

    assert [e.value for e in events.Scalars("loss/validation")] == pytest.approx([r["val_loss"] for r in validation])

    report = run_cli("report", run_dir)
    assert f"final loss  {final_loss(losses):.4f} (mean of the last" in report.stdout
    assert f"val loss    {validation[-1]['val_loss']:.4f} at step {steps}" in report.stdout
    inspect = run_cli("inspect", lora)
    assert "precision       no" in inspect.stdout or "precision       fp32" in inspect.stdout, inspect.stdout


def test_the_bar_labels_adaptive_optimizers_lr_as_d_lr_and_shows_the_mean_of_the_last_steps():
    from loracli.run.progress import TrainingProgress

    bar = TrainingProgress(20, enabled=False, optimizer_type="Prodigy")
    assert bar.lr_label == "d·lr"
    assert TrainingProgress(20, enabled=False, optimizer_type="AdamW").lr_label == "lr"
    for step, loss in enumerate([1.0] * 5 + [0.0] * 10):
        bar.step(loss, 1e-4, 1)
    assert bar.smoothed == 0.0  # the last 10 steps, not an average that still remembers the first ones
