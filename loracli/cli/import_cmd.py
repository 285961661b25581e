"""`loracli import FILE`: an sd-scripts TOML, kohya_ss JSON or training script -> a loracli config."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

FileArg = typer.Argument(..., help="sd-scripts config TOML, kohya_ss GUI JSON, or a .sh/.ps1/.bat training script "
                         "(train_network.py or, for SDXL, sdxl_train_network.py).", show_default=False, readable=False)
DatasetConfigOpt = typer.Option(None, "--dataset-config", "-d", show_default=False,
                                help="The sd-scripts dataset TOML (--dataset_config) that goes with FILE.", readable=False)
OutputOpt = typer.Option(None, "--output", "-o", show_default=False,
                         help="Write the loracli TOML here (default: print it).", readable=False)
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing output file.", readable=False)


def run_import(file: Path, dataset_config: Path | None, output: Path | None, force: bool) -> None:
    from loracli.errors import ConfigError, LoracliError, Problem
    from loracli.rundir import atomic_write_text
    from loracli.sdscripts.importer import import_file, render_toml, report_lines

    if output is not None and output.exists() and not force:
        raise ConfigError(Problem(str(output), "already exists", "pass --force to overwrite, or choose another -o"))
    if output is not None and output.is_dir():
        raise ConfigError(Problem(str(output), "is a folder", "give a file name, e.g. -o my-lora.toml"))
    result = import_file(file, dataset_config)
    text = render_toml(result)
    lines = report_lines(result)
    if output is None:
        for line in lines:
            sys.stderr.write(line + "\n")
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text)
    for line in lines:
        print(line)
    print(f"wrote {output}")
    # Say at once whether the result loads, rather than leave it to the first `plan`.
    from loracli.config.loader import resolve_config

    try:
        resolve_config(output)
    except LoracliError as exc:
        for problem in exc.problems:
            print(f"to fix before training: {problem.render()}")
    else:
        print(f"next: loracli config validate {output} && loracli plan --config {output}")


def register(app: typer.Typer) -> None:
    from loracli.cli.app import guarded

    @app.command(
        "import",
        epilog="Examples:\n\n  loracli import sd-config.toml --dataset-config dataset.toml -o my-lora.toml\n\n"
        "  loracli import kohya_ss_lora.json -o my-lora.toml\n\n"
        "  loracli import train.sh > my-lora.toml\n\n"
        "  loracli import train_locon.ps1 -o my-lora.toml --force\n\n"
        "  loracli import pony_sdxl.sh -o pony.toml && loracli plan --config pony.toml",
    )
    @guarded
    def import_cmd(
        file: Path = FileArg,
        dataset_config: Path | None = DatasetConfigOpt,
        output: Path | None = OutputOpt,
        force: bool = ForceOpt,
    ) -> None:
        """Convert an sd-scripts or kohya_ss config (or a training script) into a loracli config.

        Every input key is imported or listed as not imported, with the reason, on the
        terminal and as comments at the top of the new file (`loracli plan` repeats the
        list). SDXL inputs (sdxl_train_network.py, "sdxl": true) set model.sdxl = true.
        Scripts are read, never run: values that need a command are reported.
        """
        run_import(file, dataset_config, output, force)
