"""The project's error types. Library code raises these; only the CLI maps them
to exit codes and one-line messages (never a traceback)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_CONFIG = 2  # config or usage error
EXIT_DATASET = 3  # dataset or input-file error
EXIT_TRAINING = 4  # training failed at run time
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: state saved, resumable
EXIT_INTERNAL = 1  # an unexpected error (a bug): one line plus the path of a crash report


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    where: the file and/or dotted key it concerns (e.g. "my.toml: optimizer.lr").
    origin: where the value came from (default, preset NAME, file, --set), if known.
    """

    where: str
    message: str
    hint: str = ""
    origin: str = ""

    def render(self) -> str:
        text = f"{self.where}: {self.message}"
        if self.origin:
            text += f" (value from {self.origin})"
        if self.hint:
            text += f"; {self.hint}"
        return text


class LoracliError(Exception):
    """Base error: carries one or more problems and the exit code to use."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("loracli", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))


class ConfigError(LoracliError):
    exit_code = EXIT_CONFIG


class DatasetError(LoracliError):
    exit_code = EXIT_DATASET


class TrainingError(LoracliError):
    exit_code = EXIT_TRAINING


class Interrupted(LoracliError):
    """SIGINT/SIGTERM: the state was saved and the run can be resumed."""

    exit_code = EXIT_INTERRUPTED


@dataclass
class FailureContext:
    """What the CLI needs to word a failure: is a run training (exit 4, not 3), and in which folder
    (where a crash report goes)."""

    training: bool = False
    run_dir: Path | None = None


CONTEXT = FailureContext()

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_OS_MESSAGES = {
    errno.ENOENT: ("not found", "check the path"),
    errno.EACCES: ("permission denied", "check the file's permissions (or run as its owner)"),
    errno.EPERM: ("operation not permitted", "check the file's permissions"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.EISDIR: ("is a folder, not a file", "give a file"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "check the path"),
    errno.ELOOP: ("symbolic link loop", "fix or remove the link"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter name"),
    errno.EEXIST: ("already exists", "remove it or choose another name"),
    errno.ENXIO: ("not a regular file (a device or socket)", "give a regular file"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
    errno.EIO: ("input/output error (a failing disk or network share?)", "check the disk"),
}


def disk_of(path: str | os.PathLike[str] | None) -> str:
    """'<mount point> (N MiB free)' for the disk holding `path`, or '' when it cannot be told."""
    if not path:
        return ""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    mount = folder.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{mount} ({free / 2**20:.0f} MiB free)"


def _exit_class() -> type[LoracliError]:
    """File errors are input errors (3) until a run trains, then run-time errors (4)."""
    return TrainingError if CONTEXT.training else DatasetError


def from_exception(exc: BaseException) -> LoracliError | None:
    """An expected failure class (file system, decoding, corrupt files, resource limits) as a
    loracli error naming what it can; None for anything else (a bug: crash report)."""
    if isinstance(exc, LoracliError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        # a write to an open file (metrics, a log) fails without a file name: the run folder is the place
        where = exc.filename or (str(CONTEXT.run_dir) if CONTEXT.run_dir else "loracli")
        if exc.errno in _DISK_FULL:
            disk = disk_of(exc.filename or CONTEXT.run_dir) or "the disk"
            return TrainingError(Problem(str(where), f"disk full while writing it (on {disk})",
                                         "free some space, then run it again"))
        message, hint = _OS_MESSAGES.get(exc.errno, (exc.strerror or name, "check the path"))
        if exc.filename2:
            where = f"{where} -> {exc.filename2}"
        return _exit_class()(Problem(str(where), message, hint))
    if isinstance(exc, UnicodeDecodeError):
        return DatasetError(Problem("loracli", f"a file is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                                               f"at offset {exc.start})", "re-save it as UTF-8"))
    if isinstance(exc, json.JSONDecodeError):
        return DatasetError(Problem("loracli", f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                                    "the file is damaged; restore or delete it"))
    if name == "TOMLDecodeError":
        return ConfigError(Problem("loracli", f"malformed TOML ({exc})", "see https://toml.io for the syntax"))
    if name == "SafetensorError" and "os error" in str(exc):  # a failed write (full disk) or read
        import re

        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code:
            return from_exception(OSError(int(code.group(1)), os.strerror(int(code.group(1)))))
    if name == "SafetensorError":
        return DatasetError(Problem("loracli", f"not a readable safetensors file ({exc})",
                                    "the file is truncated or not safetensors; download it again"))
    if name == "DecompressionBombError":
        return DatasetError(Problem("loracli", f"image too large ({exc})", "downscale the image"))
    if isinstance(exc, RecursionError):
        return DatasetError(Problem("loracli", "input nested too deeply to read", "simplify the file"))
    if isinstance(exc, MemoryError):
        return _exit_class()(Problem("loracli", "out of memory (RAM)",
                                              "close other programs, or lower the batch size or resolution"))
    return None


def crash_report_folder() -> Path:
    """The run folder when a run is under way, else the cache."""
    if CONTEXT.run_dir is not None and CONTEXT.run_dir.is_dir():
        return CONTEXT.run_dir
    return Path(os.environ.get("LORACLI_CACHE") or Path.home() / ".cache" / "loracli") / "crash-reports"


def write_crash_report(exc: BaseException) -> Path | None:
    """The traceback and what ran, in a file a bug report can carry; None when it cannot be written."""
    import platform
    import time
    import traceback

    from loracli import __version__

    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = (f"loracli {__version__} crash report {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            f"command: {sys.argv}\ncwd: {os.getcwd()}\npython {platform.python_version()} on {platform.platform()}\n"
            f"run folder: {CONTEXT.run_dir}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (crash_report_folder(), Path(os.environ.get("TMPDIR", "/tmp"))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def crash_line(exc: BaseException, report: Path | None) -> str:
    first = (str(exc).splitlines() or [""])[0][:300]
    where = f"crash report: {report}" if report else "the crash report could not be written"
    return (f"unexpected {type(exc).__name__}: {first} (a bug in loracli; please report it with the crash "
            f"report); {where}")
