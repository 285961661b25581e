"""`loracli presets list|show|copy`."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loracli.config.loader import _flatten
from loracli.config.presets import available, load_preset
from loracli.errors import ConfigError, Problem


def list_presets() -> None:
    table = Table(title="presets", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description", ratio=3)
    table.add_column("source", overflow="fold", ratio=2)  # long file names (sdxl_train_network.py) fold too
    table.add_column("file", overflow="fold", ratio=2)  # folded, never cut: the path is for copying
    for name in available():
        p = load_preset(name)
        table.add_row(name, p.description, p.source, str(p.path))
    Console(highlight=False).print(table)


def show_preset(name: str) -> None:
    """Every value as a `key = value` line (pasteable into a config), with its note."""
    from loracli.cli.config_cmd import toml_line

    p = load_preset(name)
    print(f"{p.name}: {p.description}")
    print(f"source: {p.source}")
    print(f"for: {p.purpose}")
    print(f"file: {p.path}")
    for key, value in _flatten(p.values).items():
        parent = key.rsplit(".", 1)[0]
        note = p.notes.get(key) or p.notes.get(parent, "")
        line = toml_line(key, value)
        print(f"{line:<52} # {note}" if note else line)


def copy_preset(name: str, dest: Path, force: bool) -> None:
    p = load_preset(name)
    target = dest / p.path.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise ConfigError(Problem(str(target), "already exists", "pass --force to overwrite"))
    if not target.parent.is_dir():
        raise ConfigError(Problem(str(target.parent), "folder does not exist", "create it first"))
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(p.path, tmp)
    tmp.replace(target)  # atomic: never a half-written preset
    print(f"copied {p.name} to {target}; use it with --preset {target}")
