"""`loracli report RUN` and `loracli inspect FILE`: after training, without torch."""

from __future__ import annotations

import json
from pathlib import Path

import typer

# module-level so the defaults are not calls in the signatures
RunDirArg = typer.Argument(..., help="A run folder made by `loracli train`.", readable=False)
FileArg = typer.Argument(..., help="A LoRA/LyCORIS .safetensors file (loracli's, sd-scripts', others').", readable=False)
JsonOpt = typer.Option(False, "--json", help="Print as JSON.", readable=False)
TopOpt = typer.Option(10, "--top", min=0, help="How many of the most frequent caption tags to show.", readable=False)


def register(app: typer.Typer) -> None:
    from loracli.cli.app import guarded

    @app.command(
        epilog="Examples:\n\n  loracli report runs/my-lora-20261122-153000\n\n"
        "  loracli report runs/my-lora-20261122-153000 --json",
    )
    @guarded
    def report(
        run_dir: Path = RunDirArg,
        as_json: bool = JsonOpt,
    ) -> None:
        """Redraw loss.png and lr.png, and summarise a run: state, steps, time, it/s, losses, files."""
        from loracli.report.summary import render_summary, summarize_run

        summary = summarize_run(run_dir)
        print(json.dumps(summary, indent=2) if as_json else render_summary(summary))

    @app.command(
        epilog="Examples:\n\n  loracli inspect runs/my-lora-20261122-153000/my-lora.safetensors\n\n"
        "  loracli inspect downloaded-lora.safetensors --top 30\n\n"
        "  loracli inspect my-lora.safetensors --json",
    )
    @guarded
    def inspect(
        file: Path = FileArg,
        as_json: bool = JsonOpt,
        top: int = TopOpt,
    ) -> None:
        """What a LoRA file is: algorithm, modules, dim/alpha, base model, training settings, tags, hashes."""
        from loracli.lorafile import inspect_file, render_inspect

        info = inspect_file(file, top=top)
        print(json.dumps(info, indent=2, ensure_ascii=False) if as_json else render_inspect(info))
