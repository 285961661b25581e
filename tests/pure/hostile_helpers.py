"""Shared pieces of the hostile-input corpus: a small project on disk, a file-tree snapshot, and the
checks every case makes (exit code, one line per problem, the culprit named, nothing written)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.conftest import write_image
from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML, run_cli

GOOD = EXAMPLE_DATASET_TOML
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def project(root: Path, extra: str = "", replace: tuple[str, str] | None = None, images: int = 1) -> Path:
    """root/c.toml and root/data/2_char/NNN.png + .txt; returns the config path."""
    text = GOOD if replace is None else GOOD.replace(*replace)
    assert replace is None or replace[0] in GOOD
    cfg = root / "c.toml"
    cfg.write_text(text + extra)
    for i in range(images):
        write_image(root / "data" / "2_char" / f"{i:03d}.png", 128, 128)
        (root / "data" / "2_char" / f"{i:03d}.txt").write_text(f"char, pose {i}\n")
    return cfg


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (what a bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def safetensors_bytes(metadata: object = None, tensors: dict | None = None, raw_header: bytes | None = None) -> bytes:
    """A small LoRA-shaped safetensors file with the given (possibly crafted) metadata or header."""
    tensors = tensors or {
        "lora_unet_a.lora_down.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
        "lora_unet_a.lora_up.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [128, 256]},
        "lora_unet_a.alpha": {"dtype": "F32", "shape": [], "data_offsets": [256, 260]},
    }
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 260


def fake_run(root: Path, name: str = "run") -> Path:
    """A run folder as `loracli train` leaves it before training (real plan and config, from `plan --json`)."""
    cfg = project(root)
    run = root / name
    run.mkdir()
    result = run_cli("plan", "--config", cfg, "--json")
    assert result.exit_code == 0, result.output
    (run / "plan.json").write_text(result.stdout)
    shown = run_cli("config", "show", "--config", cfg)
    assert shown.exit_code == 0, shown.output
    (run / "config.resolved.toml").write_text(shown.stdout)
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "step": 2, "total_steps": 8}))
    return run


def snapshot(root: Path) -> set[str]:
    """Every path under root (links not followed), relative."""
    found = set()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


@dataclass
class Case:
    name: str
    build: Callable[[Path], list]  # prepares the project folder, returns the CLI arguments
    code: int
    names: tuple[str, ...] = ()  # what the error line must contain (the key, the file, the reason)
    lines: int = 1  # error lines expected
    may_write: tuple[str, ...] = ()  # paths (relative to the project) the command may create
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # what the error must not say (e.g. blame the file for a --set value)


def check(case: Case, root: Path, result, before: set[str]) -> None:
    assert result.exit_code == case.code, (case.name, result.exit_code, result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    if case.code == 0:
        assert not lines, result.stderr
        return
    assert len(lines) == case.lines, (case.name, result.stderr)
    assert all(line.startswith("error: ") for line in lines), result.stderr
    for text in case.names:
        assert text in result.stderr, (case.name, text, result.stderr)
    for text in case.absent:
        assert text not in result.stderr, (case.name, text, result.stderr)
    written = snapshot(root) - before
    allowed = {w for w in written if any(w == p or w.startswith(p + os.sep) for p in case.may_write)}
    assert written == allowed, (case.name, sorted(written - allowed))
