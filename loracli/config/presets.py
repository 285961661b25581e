"""Presets: partial configs shipped as TOML files, listed by globbing folders.

A preset file has a `[preset]` table (name, description, source, purpose and
optional per-key notes) and the sections it sets. Built-in presets ship inside
the wheel as the `loracli.presets` package; users add their own in
`$LORACLI_PRESETS` (a folder list) or `~/.config/loracli/presets`, or pass a
file path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracli.errors import ConfigError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

META_KEYS = {"name", "description", "source", "purpose", "notes"}


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    source: str
    purpose: str
    values: dict[str, Any]  # the config sections it sets
    notes: dict[str, str] = field(default_factory=dict)  # dotted key -> why


def builtin_dir() -> Path:
    """The shipped presets: the installed package, or the repo's presets/ folder."""
    try:
        import loracli.presets as pkg  # mapped from presets/ by the wheel

        return Path(next(iter(pkg.__path__)))
    except (ImportError, StopIteration):
        return Path(__file__).resolve().parents[2] / "presets"


def search_dirs() -> list[Path]:
    dirs = [Path(p).expanduser() for p in os.environ.get("LORACLI_PRESETS", "").split(os.pathsep) if p]
    dirs.append(Path("~/.config/loracli/presets").expanduser())
    dirs.append(builtin_dir())
    return dirs


def available() -> dict[str, Path]:
    """Preset name -> file; user folders shadow built-ins of the same name."""
    found: dict[str, Path] = {}
    for folder in reversed(search_dirs()):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.glob("*.toml"))})
    return dict(sorted(found.items()))


def _looks_like_path(name: str) -> bool:
    return name.endswith(".toml") or os.sep in name or "/" in name


def parse_preset(path: Path, data: dict[str, Any]) -> Preset:
    meta = data.get("preset")
    if not isinstance(meta, dict):
        raise ConfigError(
            Problem(str(path), "preset file has no [preset] table", hint="add name, description and source")
        )
    unknown = set(meta) - META_KEYS
    if unknown:
        raise ConfigError(
            Problem(f"{path}: preset.{sorted(unknown)[0]}", "unknown preset metadata key", hint=f"use {sorted(META_KEYS)}")
        )
    values = {k: v for k, v in data.items() if k != "preset"}
    return Preset(
        name=str(meta.get("name", path.stem)),
        path=path,
        description=str(meta.get("description", "")),
        source=str(meta.get("source", "")),
        purpose=str(meta.get("purpose", "")),
        values=values,
        notes={str(k): str(v) for k, v in dict(meta.get("notes", {})).items()},
    )


def load_preset(name: str) -> Preset:
    """A preset by name (built-in or user) or by file path."""
    if _looks_like_path(name):
        path = Path(name).expanduser()
    else:
        known = available()
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"available: {', '.join(known)}"
            raise ConfigError(Problem(f"--preset {name}", "unknown preset", hint=hint))
        path = known[name]
    if not path.is_file():
        raise ConfigError(Problem(f"--preset {name}", "preset file not found", hint="check the path"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(Problem(str(path), f"malformed preset TOML: {exc}")) from None
    return parse_preset(path, data)
