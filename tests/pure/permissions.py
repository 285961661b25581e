"""Permission bits that hold for root too, for the hostile-input tests.

root reads, lists and writes whatever the mode bits say, so `chmod 000` proves nothing when the
tests run as root (CI containers do). Paths locked with `lock_unreadable` / `lock_read_only` are
chmod-ed as usual and, under root, refused by the file functions loracli reaches (open, os.open,
listing, os.access) with the PermissionError a normal user gets.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_UNREADABLE: set[Path] = set()  # chmod 000: no read, no listing, no write
_READ_ONLY: set[Path] = set()  # chmod 555 folders: no new files


def lock_unreadable(path: Path) -> None:
    _UNREADABLE.add(path.resolve())
    path.chmod(0)


def lock_read_only(folder: Path) -> None:
    _READ_ONLY.add(folder.resolve())
    folder.chmod(0o555)


def _resolved(path: object) -> Path | None:
    if isinstance(path, int):  # a file descriptor: already open
        return None
    try:
        return Path(os.fsdecode(path)).resolve()
    except (TypeError, ValueError, OSError):
        return None


def _denied(path: object, writing: bool) -> bool:
    target = _resolved(path)
    if target is None:
        return False
    if target in _UNREADABLE or target.parent in _UNREADABLE:
        return True
    return writing and (target in _READ_ONLY or target.parent in _READ_ONLY)


def _refuse(path: object) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))


def _writes(mode: str | int) -> bool:
    if isinstance(mode, int):  # os.open flags
        return bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return any(c in mode for c in "wax+")


@contextmanager
def enforced() -> Iterator[None]:
    """While active (and only as root), the locked paths behave as their mode bits say."""
    if not IS_ROOT or not (_UNREADABLE or _READ_ONLY):
        yield
        return
    real_open, real_os_open = builtins.open, os.open
    real_scandir, real_listdir, real_access = os.scandir, os.listdir, os.access

    def guarded_open(file, mode="r", *args, **kwargs):
        if _denied(file, _writes(mode)):
            raise _refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if _denied(path, _writes(flags)):
            raise _refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_listing(real):
        def listing(path="."):
            if _resolved(path) in _UNREADABLE:
                raise _refuse(path)
            return real(path)
        return listing

    def guarded_access(path, mode, *args, **kwargs):
        target = _resolved(path)
        if target in _UNREADABLE or (mode & os.W_OK and target in _READ_ONLY):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch = pytest.MonkeyPatch()  # its own: undone on leaving, whatever the test patched itself
    for owner in (builtins, io):
        monkeypatch.setattr(owner, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "scandir", guarded_listing(real_scandir))
    monkeypatch.setattr(os, "listdir", guarded_listing(real_listdir))
    monkeypatch.setattr(os, "access", guarded_access)
    try:
        yield
    finally:
        monkeypatch.undo()


def forget_locks() -> None:
    _UNREADABLE.clear()
    _READ_ONLY.clear()
