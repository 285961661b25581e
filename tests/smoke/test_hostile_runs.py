"""Hostile cases that need a real run (tiny:sd15 on the CPU): a queue past a broken job, phone photos and
16-bit PNGs trained as they look, a running run's folder locked, a torn metrics line and leftover temp
files on resume, and the disk filling up mid-run (on a small tmpfs, where this machine lets us mount one)."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.pure.test_hostile_mounts import tmpfs
from tests.smoke.conftest import CONFIG

SHORT = CONFIG.replace("max_train_epochs = 3", "max_train_steps = 2")


def loracli(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loracli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, **kw)


def phone_photo(path: Path, stored: tuple[int, int]) -> None:
    """A JPEG stored sideways (EXIF orientation 6, as phones write it): a blue band on its stored left
    edge, which is the top of the picture as it is meant to be seen."""
    im = Image.new("RGB", stored, (220, 40, 40))
    im.paste((30, 30, 230), (0, 0, stored[0] // 4, stored[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def gray16(path: Path, size: tuple[int, int]) -> None:
    """A 16-bit grayscale PNG whose values run from black to white (a plain convert('RGB') clips it white)."""
    w, h = size
    values = np.tile(np.linspace(0, 65535, w), (h, 1)).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def test_images_are_trained_as_they_look(tmp_path, make_image):
    """Plan and loader open images one way: the phone photo is planned and loaded upright, the 16-bit PNG is
    a gradient (not white), LA and P-with-transparency keep their colours."""
    from loracli.config.loader import resolve_config
    from loracli.plan import build_plan
    from loracli.run.data import load_pixels

    folder = tmp_path / "data" / "1_x"
    phone_photo(folder / "phone.jpg", (64, 128))  # stored 64 wide, seen 128 wide
    gray16(folder / "gray16.png", (64, 64))
    Image.new("LA", (64, 64), (90, 255)).save(folder / "la.png")
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(folder / "pal.png", transparency=0)
    cfg = tmp_path / "c.toml"
    cfg.write_text(SHORT.replace("resolution = 64", "resolution = [128, 64]")
                   .replace("max_bucket_reso = 128", "max_bucket_reso = 128\nbucket_no_upscale = true"))
    plan = build_plan(resolve_config(cfg))
    images = {Path(i.path).name: i for i in plan.images}
    assert tuple(images["phone.jpg"].size) == (128, 64)  # as seen, not as stored
    import random

    rng = random.Random(0)
    phone = load_pixels(images["phone.jpg"], False, rng)
    assert phone.shape[:2] == (images["phone.jpg"].bucket[1], images["phone.jpg"].bucket[0])
    assert phone[2, :, 2].mean() > 180 and phone[-3, :, 0].mean() > 180  # blue band on top, red below
    grad = load_pixels(images["gray16.png"], False, rng)[..., 0].astype(float)
    assert grad[:, :4].mean() < 20 and grad[:, -4:].mean() > 235 and 100 < grad.mean() < 155
    assert (load_pixels(images["la.png"], False, rng) == 90).all()
    assert (load_pixels(images["pal.png"], False, rng)[0, 0] == (10, 200, 30)).all()


def test_a_queue_goes_on_past_a_broken_job(smoke_project):
    """Three jobs, the middle one's caption is a folder: the other two train, the summary names the broken one,
    and a notify command that fails is a warning, not the end of the queue."""
    root = smoke_project.parent
    phone_photo(root / "data" / "2_char" / "phone.jpg", (64, 128))  # trains (upright) in job a
    gray16(root / "data" / "1_style" / "gray16.png", (64, 64))
    broken = root / "b"
    for i in range(2):
        Image.new("RGB", (64, 64), (9, 9, 9)).save(broken.joinpath("data", "1_x").mkdir(parents=True, exist_ok=True)
                                                   or broken / "data" / "1_x" / f"{i}.png")
    (broken / "data" / "1_x" / "0.txt").mkdir()
    jobs = []
    for name, folder in (("a", root), ("b", broken), ("c", root)):
        path = folder / f"{name}.toml"
        path.write_text(SHORT.replace('output_name = "smoke"', f'output_name = "{name}"')
                        .replace('output_dir = "runs"', f'output_dir = "{root / "runs"}"'))
        jobs.append(path)
    done = loracli(root, "queue", "run", *jobs, "--notify-command", "false", "--json")
    assert done.returncode == 2, done.stderr[-3000:]  # one invalid job; nothing failed at run time
    results = {Path(j["config"]).stem: j for j in json.loads(done.stdout)}
    assert {k: v["status"] for k, v in results.items()} == {"a": "finished", "b": "invalid", "c": "finished"}
    assert "0.txt" in results["b"]["error"] and "folder" in results["b"]["error"]
    for name in ("a", "c"):
        assert Path(results[name]["output"]).is_file() and Path(results[name]["output"]).name == f"{name}.safetensors"
    assert "warning: notify command exited 1" in done.stderr and "Traceback" not in done.stderr
    summary = loracli(root, "queue", "status")
    assert "b.toml" in summary.stdout and "invalid" in summary.stdout and "0.txt" in summary.stdout


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not get there in time")


def test_a_running_run_is_locked_and_resume_repairs_what_a_kill_leaves(smoke_project):
    root = smoke_project.parent
    cfg = root / "long.toml"
    cfg.write_text(CONFIG.replace("max_train_epochs = 3", "max_train_steps = 8"))
    proc = subprocess.Popen([sys.executable, "-m", "loracli", "train", "--config", str(cfg)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for(lambda: next((m.parent for m in (root / "runs").glob("*/metrics.jsonl")
                                     if len(m.read_text().splitlines()) >= 2), None), proc)
        proc.send_signal(signal.SIGSTOP)  # frozen mid-run, its lock held: no race with its last step
        try:
            second = loracli(root, "train", "--resume", run)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert second.returncode == 4, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0] and str(run) in lines[0]
        proc.send_signal(signal.SIGTERM)  # saves the state after the current step
        assert proc.wait(timeout=120) == 130, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    # What a kill -9 mid-write leaves: a torn metrics line, temp files of an atomic write and of a LoRA save.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9999, "lo')
    leftovers = [run / ".status.json.tmp-4242", run / ".smoke.safetensors.4242-deadbeef.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    resumed = loracli(root, "train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "torn line" in resumed.stdout and not any(p.exists() for p in leftovers)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_the_disk_filling_up_mid_run_is_one_line_naming_the_disk(smoke_project, tmp_path):
    root = smoke_project.parent
    with tmpfs(tmp_path / "disk", "8m") as disk:
        cfg = root / "full.toml"
        cfg.write_text(CONFIG.replace("max_train_epochs = 3", "max_train_steps = 200")
                       .replace('output_dir = "runs"', f'output_dir = "{disk}"'))
        proc = subprocess.Popen([sys.executable, "-m", "loracli", "train", "--config", str(cfg)], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: list(disk.glob("*/metrics.jsonl")), proc)
            filler = threading.Thread(target=_fill, args=(disk / "filler",))
            filler.start()
            filler.join()
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 4, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk full" in errors[0] and str(disk) in errors[0], err[-3000:]
        assert "Traceback" not in err
        assert not list(disk.glob("*/.*.tmp*")), list(disk.glob("*/.*"))  # no half-written temp file left


def _fill(path: Path) -> None:
    """Write zeros until the disk is full (the ENOSPC is the point)."""
    try:
        with path.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc


def test_a_lora_save_on_a_full_disk_leaves_no_temp_file_and_names_the_disk(tmp_path):
    """What train.py's save() reports when the disk is full (save_failure), on a real full tmpfs."""
    import torch

    from loracli.run.saving import atomic_save_safetensors, save_failure

    with tmpfs(tmp_path / "disk", "1m") as disk:
        _fill(disk / "filler")
        target = disk / "run" / "my.safetensors"
        with pytest.raises(OSError) as caught:
            atomic_save_safetensors({"w": torch.zeros(4096, 64)}, {"ss_steps": "1"}, target)
        assert caught.value.errno == errno.ENOSPC
        assert not [p for p in target.parent.iterdir()]  # neither the file nor its temp
        state = disk / "run" / "state" / "step-00000010"
        line = save_failure(caught.value, target, target.parent, state).problems[0].render()
        assert line.startswith(str(target)) and f"disk full on {disk}" in line and "MiB free" in line
        assert f"loracli train --resume {target.parent}" in line and "step-00000010" in line
        assert "no training state" in save_failure(caught.value, target, target.parent, None).problems[0].render()
