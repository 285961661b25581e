"""`loracli export sd-scripts`: config.toml, dataset.toml and train.sh for kohya's (sdxl_)train_network.py."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

SD_SCRIPTS_ENV = "LORACLI_SD_SCRIPTS_DIR"
OutDirArg = typer.Argument(..., help="Folder for config.toml, dataset.toml, train.sh.", readable=False)
SdScriptsDirOpt = typer.Option(None, "--sd-scripts-dir", envvar=SD_SCRIPTS_ENV, show_default=False,
                               help="Your sd-scripts checkout (train.sh cds there by default).", readable=False)


def export_sd_scripts(config: Path | None, preset: list[str], set_: list[str], out_dir: Path,
                      sd_scripts_dir: Path | None) -> None:
    from loracli.config.loader import resolve_config
    from loracli.plan import build_plan
    from loracli.sdscripts.export import build_export, report_lines, shell_command, write_export

    resolved = resolve_config(config, preset, set_)
    plan = build_plan(resolved)
    exp = build_export(resolved.config, plan)
    written = write_export(out_dir, exp, sd_scripts_dir)
    for line in report_lines(exp):
        sys.stderr.write(line + "\n")
    print(f"wrote {out_dir}/: {', '.join(sorted(p.name for p in written))}")
    print(f"{exp.script} ({plan.model_family}): {plan.total_steps} steps, {plan.epochs} epochs, "
          f"{sum(len(d['subsets']) for d in exp.dataset['datasets'])} subset(s) in {len(exp.dataset['datasets'])} "
          "dataset(s); "
          f"{len(exp.unsupported)} option(s) not exported, {len(exp.warnings)} warning(s)")
    where = str(sd_scripts_dir) if sd_scripts_dir else "your sd-scripts checkout"
    print(f"run it from {where} (its venv active):")
    print(f"  {shell_command(out_dir, exp.num_processes, exp.script)}")
    print(f"or: SD_SCRIPTS_DIR={where if sd_scripts_dir else 'PATH'} {(out_dir / 'train.sh').absolute()}")


def register(app: typer.Typer) -> None:
    from loracli.cli.app import ConfigOpt, PresetOpt, SetOpt, guarded

    export_app = typer.Typer(help="Export a loracli run for another trainer.", no_args_is_help=True,
                             rich_markup_mode=None,
                             epilog="Examples:\n\n  loracli export sd-scripts --config my.toml exported/")
    app.add_typer(export_app, name="export")

    @export_app.command(
        "sd-scripts",
        epilog="Examples:\n\n  loracli export sd-scripts --config examples/tiny/loracli.toml out/tiny-sd\n\n"
        "  loracli export sd-scripts --preset prodigy --preset locon --config my.toml out/my-sd\n\n"
        "  cd ~/sd-scripts && accelerate launch train_network.py --config_file out/my-sd/config.toml "
        "--dataset_config out/my-sd/dataset.toml",
    )
    @guarded
    def export_sd_scripts_cmd(
        out_dir: Path = OutDirArg,
        config: Path | None = ConfigOpt,
        preset: list[str] | None = PresetOpt,
        set_: list[str] | None = SetOpt,
        sd_scripts_dir: Path | None = SdScriptsDirOpt,
    ) -> None:
        """Plan the run, then write the files kohya's train_network.py (sdxl_train_network.py for SDXL) needs."""
        export_sd_scripts(config, preset or [], set_ or [], out_dir, sd_scripts_dir)
