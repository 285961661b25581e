"""loss.png / lr.png from metrics.jsonl, and `loracli report` on synthetic run folders."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from loracli.report.curves import Series as CurveSeries
from loracli.report.curves import (
    ema,
    ema_span,
    epoch_starts,
    lr_series,
    read_metrics,
    wants_log_scale,
    write_curves,
)
from loracli.report.summary import summarize_run
from tests.pure.cli_helpers import run_cli


def write_metrics(run: Path, steps: int, per_epoch: int, dadapt: bool = False, extra: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lr: dict[str, float] = {}
        if dadapt:
            lr["d*lr/textencoder"] = 1e-6 * step
            lr["d*lr/unet"] = 2e-6 * step
        lr["textencoder"], lr["unet"] = (0.5, 1.0) if dadapt else (5e-5, 1e-4)
        loss = 0.2 + 0.1 * math.exp(-step / 10) + 0.01 * (step % 3)
        lines.append(json.dumps({"step": step, "epoch": (step - 1) // per_epoch + 1, "loss": loss, "lr": lr}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return run


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()  # raises on a corrupt file
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_curves_are_valid_pngs_with_epoch_data(tmp_path):
    run = write_metrics(tmp_path / "my-lora-20261122-153000", 30, 10)
    written = write_curves(run)
    assert written == [run / "loss.png", run / "lr.png"]
    for path in written:
        w, h = png_size(path)
        assert 600 <= w <= 1600 and 300 <= h <= 900, (path, w, h)
    assert epoch_starts(read_metrics(run)) == [(11, 2), (21, 3)]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # temp files renamed away


def test_dadaptation_draws_d_lr_per_group_in_its_own_panel(tmp_path):
    run = write_metrics(tmp_path / "dadapt-run", 20, 10, dadapt=True)
    lrs, dlrs = lr_series(read_metrics(run))
    assert [s.label for s in dlrs] == ["d·lr textencoder", "d·lr unet"]
    assert [s.label for s in lrs] == ["lr textencoder", "lr unet"]
    assert dlrs[1].values[-1] == pytest.approx(2e-6 * 20) and lrs[1].values == [1.0] * 20
    write_curves(run)
    plain = write_metrics(tmp_path / "plain-run", 20, 10)
    write_curves(plain)
    # two panels (d·lr above the scheduled lr) make the DAdapt figure taller than a plain one
    assert png_size(run / "lr.png")[1] > png_size(plain / "lr.png")[1]


def test_one_step_draws_and_empty_metrics_write_nothing(tmp_path):
    one = write_metrics(tmp_path / "one", 1, 1)
    assert [p.name for p in write_curves(one)] == ["loss.png", "lr.png"]
    png_size(one / "loss.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert write_curves(empty) == [] and not (empty / "loss.png").exists()
    missing = tmp_path / "missing"
    missing.mkdir()
    assert write_curves(missing) == []


def test_partial_last_line_and_nan_are_skipped(tmp_path):
    run = write_metrics(tmp_path / "r", 5, 5, extra='{"step": 6, "epoch": 1, "loss": NaN}\n{"step": 7, "ep')
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


def test_smoothing_and_log_scale_rules():
    assert ema([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    smoothed = ema([0.0, 10.0] * 20, 9)
    assert 3 < smoothed[-1] < 7 and ema_span(30) == 5 and ema_span(100000) == 100
    apart = [CurveSeries("te", [1, 2], [1e-6, 1e-6]), CurveSeries("unet", [1, 2], [1e-3, 1e-3])]
    assert wants_log_scale(apart)
    cosine = [0.5 * (1 + math.cos(math.pi * i / 100)) * 1e-4 for i in range(101)]
    assert not wants_log_scale([CurveSeries("unet", list(range(101)), cosine)])


def fake_lora_file(path: Path, steps: int, epoch: int) -> None:
    header = json.dumps({"__metadata__": {"ss_steps": str(steps), "ss_epoch": str(epoch)},
                         "lora_unet_x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 4.0))


def make_run(tmp_path: Path) -> Path:
    run = write_metrics(tmp_path / "runs" / "smoke-20261122-153000", 30, 10)
    started = time.time() - 100
    (run / "status.json").write_text(json.dumps({
        "state": "finished", "step": 30, "epoch": 3, "total_steps": 30, "last_save": "smoke.safetensors",
        "error": None, "started_at": started, "updated_at": started + 60, "finished_at": started + 60}))
    (run / "plan.json").write_text(json.dumps({"total_steps": 30, "epochs": 3}))
    fake_lora_file(run / "smoke-000001.safetensors", 10, 1)
    fake_lora_file(run / "smoke.safetensors", 30, 3)
    return run


def test_report_summary_numbers(tmp_path):
    run = make_run(tmp_path)
    s = summarize_run(run)
    losses = [r["loss"] for r in read_metrics(run)]
    assert (s["state"], s["steps"], s["total_steps"], s["epoch"], s["epochs"]) == ("finished", 30, 30, 3, 3)
    assert s["wall_seconds"] == pytest.approx(60) and s["it_per_s"] == pytest.approx(0.5)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "start_step": 18}))  # resumed at step 18
    assert summarize_run(run, curves=False)["it_per_s"] == pytest.approx(12 / 60)
    assert s["final_loss"] == pytest.approx(sum(losses[-10:]) / 10) and s["last_step_loss"] == losses[-1]
    assert s["mean_loss"] == pytest.approx(sum(losses) / len(losses))
    assert s["min_loss"] == min(losses) and s["min_loss_step"] == losses.index(min(losses)) + 1
    assert {f["name"]: (f["steps"], f["epoch"]) for f in s["files"]} == {
        "smoke-000001.safetensors": (10, 1), "smoke.safetensors": (30, 3)}
    assert s["curves"] == [str(run / "loss.png"), str(run / "lr.png")]


def test_report_cli_text_json_and_errors(tmp_path):
    run = make_run(tmp_path)
    (run / "loss.png").unlink(missing_ok=True)
    result = run_cli("report", run)
    assert result.exit_code == 0, result.output
    assert "steps       30/30, epoch 3/3" in result.stdout and "0.50 it/s" in result.stdout
    assert "smoke.safetensors" in result.stdout and (run / "loss.png").is_file()
    data = json.loads(run_cli("report", run, "--json").stdout)
    assert data["steps"] == 30 and data["logged_steps"] == 30

    not_run = tmp_path / "photos"
    not_run.mkdir()
    for bad in (not_run, tmp_path / "nope", run / "smoke.safetensors"):
        result = run_cli("report", bad)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
        assert "Traceback" not in result.output
