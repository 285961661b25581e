"""Writing LoRA files: atomic safetensors saves, save_precision casts, and the
hashes A1111 / sd-webui-additional-networks read from sd-scripts' metadata.

A save must never leave a half-written `.safetensors` where a UI would load it:
the file is written under a hidden temp name in the same folder, synced to disk
and then renamed over the target in one step (`os.replace`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

from loracli.errors import Problem, TrainingError, disk_of

SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The window both the old A1111 model hash and the addnet legacy hash read.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_TEMP_SUFFIX = ".tmp"
_CHUNK = 1024 * 1024


def temp_path_for(path: Path) -> Path:
    """A hidden, unique temp name next to `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def is_save_temp_file(path: Path) -> bool:
    """True for temp files this module writes (and nothing else, e.g. status.json temps)."""
    name = path.name
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX) and ".safetensors." in name


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_file(path: Path) -> None:
    # save_file closes its own handle; fsync through a new one flushes the same inode.
    with open(path, "r+b") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible (nor needed) on Windows."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ready(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous tensors; moving to CPU here keeps save_file simple."""
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path) -> None:
    """Write `tensors` + `metadata` to `path` so that `path` is either the old file,
    absent, or the complete new file - never a truncated one.

    A process killed mid-write leaves only a hidden `.<name>.<pid>-<rand>.tmp`
    (see `cleanup_temp_files`); an exception removes the temp file and re-raises.
    """
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; not str: {sorted(map(str, bad))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        try:
            save_file(_ready(tensors), str(tmp), metadata=dict(metadata))
        except safetensors.SafetensorError as exc:
            raise as_os_error(exc, path) from None
        _fsync_file(tmp)
        _chmod_as_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


def _chmod_as_umask(path: Path) -> None:
    """safetensors creates its files 0600; a LoRA file gets the mode any new file would (0644 under
    umask 022), so a web UI or container running as another user can read it."""
    if os.name == "nt":
        return
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process umask, read without changing it (Linux), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_os_error(exc: Exception, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk) as SafetensorError("... (os error 28)"): give it back
    as the OSError it is, naming the file, so it is worded like every other file-system failure."""
    code = os_error_code(str(exc))
    return OSError(code, os.strerror(code), str(path)) if code is not None else exc


def os_error_code(message: str) -> int | None:
    match = re.search(r"\(os error (\d+)\)", message)
    return int(match.group(1)) if match else None


def save_failure(exc: OSError, target: Path, run_dir: Path, state_saved: Path | None) -> TrainingError:
    """The one line for a LoRA save that failed (a full disk, a quota, a read-only remount): the file,
    the disk and its free space, and how to go on. `state_saved` is the training state the caller
    managed to save after the failure (None: none could be saved)."""
    disk = disk_of(target) or "its disk"
    reason = "disk full" if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) else \
        (exc.strerror or type(exc).__name__)
    if state_saved is not None:
        after = f"the training state is saved ({state_saved.name}): free some space, then loracli train --resume {run_dir}"
    else:
        after = ("no training state could be saved either; free some space and start again (the LoRA files "
                 "already in the run folder are whole)")
    return TrainingError(Problem(str(target), f"could not be saved: {reason} on {disk}", after))


def cleanup_temp_files(folder: Path) -> list[Path]:
    """Remove temp files left by saves that were killed mid-write; returns what was removed.

    Call it when no save is running in `folder` (at run start or resume): it does not
    tell a stale temp file from one being written right now.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and is_save_temp_file(entry):
            _discard(entry)
            removed.append(entry)
    return removed


def cast_for_save(tensors: Mapping[str, torch.Tensor], save_precision: str | None) -> dict[str, torch.Tensor]:
    """The tensors as they go into the file: detached CPU copies, contiguous.

    save_precision None keeps every dtype (so an integer alpha stays I64, as sd-scripts
    writes it); "float" / "fp16" / "bf16" cast every tensor, alpha included.
    """
    if save_precision is not None and save_precision not in SAVE_DTYPES:
        raise ValueError(f"save_precision must be one of {sorted(SAVE_DTYPES)} or None, got {save_precision!r}")
    dtype = SAVE_DTYPES.get(save_precision) if save_precision else None
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        # copy=True: the saved tensor must not alias a parameter that keeps training
        t = value.detach().to("cpu", copy=True)
        if dtype is not None:
            t = t.to(dtype)
        out[key] = t.contiguous()
    return out


def _sha256_after_header(data: bytes) -> str:
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len:]).hexdigest()


def _legacy_window_hash(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def sshs_hashes(tensors: Mapping[str, torch.Tensor], ss_metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them.

    Both come from an in-memory serialisation carrying only the `ss_*` metadata (so
    modelspec and later edits to other keys do not change them): the model hash is
    the sha256 of everything after the header, the legacy hash the first 8 hex of the
    sha256 of bytes [1 MiB, 1 MiB + 64 KiB) - "e3b0c442" (empty input) for small files.
    Pass the tensors exactly as they will be saved (after `cast_for_save`).
    """
    ss_only = {k: v for k, v in ss_metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(_ready(tensors), metadata=ss_only)
    return _sha256_after_header(data), _legacy_window_hash(data)


def model_file_hashes(path: Path) -> tuple[str, str]:
    """(ss_sd_model_hash, ss_new_sd_model_hash) of a single checkpoint file.

    The first is A1111's old model hash (sha256 of the 64 KiB at 1 MiB, first 8 hex),
    the second the sha256 of the whole file. sd-scripts writes them only for a local
    single-file model; for a diffusers folder or a hub id loracli writes neither, so
    a folder is rejected here (IsADirectoryError).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; model hashes exist only for single checkpoint files")
    old = hashlib.sha256()
    new = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        old.update(f.read(_LEGACY_LENGTH))
        f.seek(0)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            new.update(chunk)
    return old.hexdigest()[:8], new.hexdigest()
