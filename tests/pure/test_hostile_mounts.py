"""Faults that need a real file system: a read-only output folder and a disk too small for the planned
saves, on a small tmpfs. Mounting needs root and mount rights; elsewhere these tests skip, saying so."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from tests.pure.cli_helpers import run_cli
from tests.pure.hostile_helpers import project, snapshot


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` at mount_point for the duration; skips the test where it cannot be mounted."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=20)


def test_a_read_only_output_folder_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cfg = project(tmp_path, f"[output]\noutput_dir = '{ro / 'runs'}'\n")
        before = snapshot(tmp_path)
        result = run_cli("train", "--config", cfg)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "output.output_dir" in lines[0] and "not writable" in lines[0]
        assert snapshot(tmp_path) == before


def test_a_disk_too_small_for_the_planned_saves_is_refused_at_plan_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tmpfs(tmp_path / "small", "2m") as small:
        cfg = project(tmp_path, f"[output]\noutput_dir = '{small}'\nsave_every_n_epochs = 1\n")
        result = run_cli("plan", "--config", cfg)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not enough disk space" in lines[0] and str(small) in lines[0]
        assert "4 LoRA file(s)" in lines[0]
        ok = run_cli("plan", "--config", project(tmp_path, f"[output]\noutput_dir = '{small}'\n"))
        assert ok.exit_code == 0, ok.output  # one file fits: the estimate refuses what cannot fit, no more
