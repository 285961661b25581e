"""The `loracli` command line: thin commands over the plan and run modules.

Nothing here imports torch: `loracli --help`, `plan`, `presets`, `config` and
`init` stay fast. `train` imports the run side only when it starts training.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

from loracli import __version__
from loracli.cli.helptext import install as _install_help_layout
from loracli.errors import (
    CONTEXT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    ConfigError,
    Problem,
    crash_line,
    from_exception,
    write_crash_report,
)

F = TypeVar("F", bound=Callable)
_install_help_layout()  # examples that paste at 80 columns, plain placeholders

app = typer.Typer(
    name="loracli",
    help="Train LoRA and LyCORIS adapters for Stable Diffusion, the sd-scripts way, with fewer surprises.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    epilog="Examples:\n\n  loracli init my-lora\n\n  loracli plan --preset dadapt-v3 --config my-lora/loracli.toml\n\n"
    "  loracli train --preset dadapt-v3 --config my-lora/loracli.toml",
)
presets_app = typer.Typer(help="List, show and copy presets.", no_args_is_help=True, rich_markup_mode=None)
config_app = typer.Typer(help="Validate and show configs.", no_args_is_help=True, rich_markup_mode=None)
queue_app = typer.Typer(help="Run many configs one after another, unattended.", no_args_is_help=True,
                        epilog="Examples:\n\n  loracli queue run jobs/*.toml\n\n  loracli queue status --json",
                        rich_markup_mode=None)
app.add_typer(presets_app, name="presets")
app.add_typer(queue_app, name="queue")
app.add_typer(config_app, name="config")


def err(line: str) -> None:
    sys.stderr.write(line + "\n")


def report_failure(exc: BaseException) -> int:
    """The one place where a failure becomes a message: one line per problem (an expected failure
    class names its file), or one line and a crash report for a bug. Returns the exit code."""
    known = from_exception(exc)
    if known is not None:
        for problem in known.problems:
            err(f"error: {problem.render()}")
        return known.exit_code
    err(f"error: {crash_line(exc, write_crash_report(exc))}")
    return EXIT_INTERNAL


def guarded(fn: F) -> F:
    """Turn every failure into one line per problem and the documented exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CONTEXT.training, CONTEXT.run_dir = False, None  # a fresh command (tests run many in one process)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError as exc:
            if not _stdout_closed():
                raise typer.Exit(report_failure(exc)) from None
            raise typer.Exit(0) from None  # `loracli config show | head`: the reader has all it wanted
        except Exception as exc:  # noqa: BLE001 -- mapped to a message or a crash report, never swallowed
            raise typer.Exit(report_failure(exc)) from None

    return wrapper  # type: ignore[return-value]


def _stdout_closed() -> bool:
    """True when stdout's reader went away (a pipe into `head`); stdout is then pointed at /dev/null so
    that Python's own flush at exit stays quiet too."""
    import os

    try:
        sys.stdout.flush()
        return False
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return True
    except (OSError, ValueError):  # not a real file (a test runner's buffer)
        return False


# Path options and arguments say readable=False: loracli reports an unreadable file itself, in one line
# naming it (exit 2 or 3); the parser's own check would print a usage screen instead.
ConfigOpt = typer.Option(None, "--config", "-c", help="The TOML config file (default: ./loracli.toml when present).",
                         show_default=False, readable=False)
PresetOpt = typer.Option(None, "--preset", "-p", metavar="<name>", help="A preset name or file; repeat to compose, left to right.", readable=False)
SetOpt = typer.Option(None, "--set", "-s", metavar="<key=value>", help="Override one value: section.key=value (TOML value).", readable=False)


def version_callback(value: bool) -> None:
    if value:
        print(f"loracli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Train LoRA and LyCORIS adapters for Stable Diffusion."""


def _resolve(config: Optional[Path], preset: Optional[List[str]], set_: Optional[List[str]]):
    from loracli.cli.config_cmd import default_config
    from loracli.config.loader import resolve_config

    return resolve_config(default_config(config), preset or [], set_ or [])


@app.command(
    epilog="Examples:\n\n  loracli plan --config examples/tiny/loracli.toml\n\n"
    "  loracli plan --preset prodigy --preset locon --config my.toml --json\n\n"
    "  loracli plan --config my.toml --set training.max_train_epochs=20 --strict",
)
@guarded
def plan(
    config: Optional[Path] = ConfigOpt,
    preset: Optional[List[str]] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings as errors."),
) -> None:
    """Show buckets, steps, epochs and warnings before spending GPU hours."""
    from loracli.cli.plan_view import check_strict, print_plan
    from loracli.plan import build_plan

    resolved = _resolve(config, preset, set_)
    the_plan = build_plan(resolved)
    if as_json:
        print(the_plan.to_json())
    else:
        print_plan(resolved, the_plan)
    check_strict(the_plan, strict)


@app.command(
    epilog="Examples:\n\n  loracli train --preset dadapt-v3 --config examples/tiny/loracli.toml\n\n"
    "  loracli train --config my.toml --set training.max_train_epochs=20 --output-dir runs\n\n"
    "  loracli train --resume runs/my-lora-20261122-153000\n\n"
    "  loracli train --config my.toml --backend sd-scripts --sd-scripts-dir ~/sd-scripts",
)
@guarded
def train(
    config: Optional[Path] = ConfigOpt,
    preset: Optional[List[str]] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
    strict: bool = typer.Option(False, "--strict", help="Treat warnings as errors."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Overrides output.output_dir.", readable=False),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue an interrupted run from its last saved state (a run folder).", readable=False
    ),
    backend: str = typer.Option("loracli", "--backend", envvar="LORACLI_BACKEND",
                                help="Who trains: loracli, or sd-scripts (your checkout's train_network.py)."),
    sd_scripts_dir: Optional[Path] = typer.Option(
        None, "--sd-scripts-dir", envvar="LORACLI_SD_SCRIPTS_DIR", show_default=False,
        help="The sd-scripts checkout for --backend sd-scripts.", readable=False),
) -> None:
    """Validate, plan, write a run folder, then train."""
    from loracli.cli.train_cmd import resume_train, run_train

    if backend not in ("loracli", "sd-scripts"):
        raise ConfigError(Problem(f"--backend {backend}", "unknown backend", "use loracli or sd-scripts"))
    if backend == "sd-scripts":
        if resume is not None:
            raise ConfigError(Problem("--resume", "the sd-scripts backend cannot resume a run",
                                      "start it again, or use --backend loracli"))
        from loracli.sdscripts.backend import run_train_sd_scripts

        extra = [f"output.output_dir={json.dumps(str(output_dir.absolute()))}"] if output_dir is not None else []
        run_train_sd_scripts(_resolve(config, preset, list(set_ or []) + extra), strict, sd_scripts_dir)
        return
    if resume is not None:
        if config or preset or set_ or output_dir:
            raise ConfigError(Problem("--resume", "a resumed run keeps its own config",
                                      "drop --config/--preset/--set/--output-dir"))
        resume_train(resume)
        return

    overrides = list(set_ or [])
    if output_dir is not None:
        overrides.append(f"output.output_dir={json.dumps(str(output_dir.absolute()))}")
    run_train(_resolve(config, preset, overrides), strict)


@presets_app.command(
    "list", epilog="Examples:\n\n  loracli presets list\n\n  LORACLI_PRESETS=~/my-presets loracli presets list"
)
@guarded
def presets_list() -> None:
    """List the built-in and user presets."""
    from loracli.cli.presets_cmd import list_presets

    list_presets()


@presets_app.command("show", epilog="Examples:\n\n  loracli presets show dadapt-v3\n\n  loracli presets show ./my.toml")
@guarded
def presets_show(name: str = typer.Argument(..., help="Preset name or file.")) -> None:
    """Every value a preset sets, with its note and source."""
    from loracli.cli.presets_cmd import show_preset

    show_preset(name)


@presets_app.command(
    "copy", epilog="Examples:\n\n  loracli presets copy prodigy my-prodigy.toml\n\n  loracli presets copy locon presets-dir/"
)
@guarded
def presets_copy(
    name: str = typer.Argument(..., help="Preset to copy."),
    dest: Path = typer.Argument(..., help="Destination file or folder.", readable=False),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a preset out for editing (use it with --preset PATH)."""
    from loracli.cli.presets_cmd import copy_preset

    copy_preset(name, dest, force)


@config_app.command(
    "validate",
    epilog="Examples:\n\n  loracli config validate my.toml\n\n  loracli config validate my.toml --preset prodigy",
)
@guarded
def config_validate(
    file: Path = typer.Argument(..., help="The config file.", readable=False),
    preset: Optional[List[str]] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Check a config file: keys, types and the config rules (not the dataset)."""
    from loracli.cli.config_cmd import validate

    validate(_resolve(file, preset, set_))


@config_app.command(
    "show",
    epilog="Examples:\n\n  loracli config show --config my.toml --preset dadapt-v3 --explain\n\n"
    "  loracli config show --config my.toml --preset prodigy --set training.seed=1",
)
@guarded
def config_show(
    config: Optional[Path] = ConfigOpt,
    preset: Optional[List[str]] = PresetOpt,
    set_: Optional[List[str]] = SetOpt,
    explain: bool = typer.Option(False, "--explain", help="Show where each value comes from."),
) -> None:
    """Print the resolved config (TOML)."""
    from loracli.cli.config_cmd import show

    show(config, preset or [], set_ or [], explain)


@app.command(epilog="Examples:\n\n  loracli init\n\n  loracli init my-lora && loracli plan --config my-lora/loracli.toml")
@guarded
def init(
    directory: Path = typer.Argument(Path("."), help="Folder for the new loracli.toml.", readable=False),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing loracli.toml."),
) -> None:
    """Write a commented starter config."""
    from loracli.cli.config_cmd import write_starter

    write_starter(directory, force)


QueueFileOpt = typer.Option(Path(".loracli-queue.json"), "--queue-file", help="Where the queue remembers its jobs.", readable=False)


@queue_app.command(
    "run",
    epilog="Examples:\n\n  loracli queue run jobs/*.toml\n\n"
    "  loracli queue run jobs/*.toml --preset dadapt-v3 --retries 2 --webhook http://127.0.0.1:8000/hook\n\n"
    "  loracli queue run a.toml b.toml --notify-command 'notify-send loracli'\n\n"
    "  loracli queue run jobs/*.toml --backend sd-scripts --sd-scripts-dir ~/sd-scripts",
)
@guarded
def queue_run(
    configs: List[Path] = typer.Argument(..., help="Config files, one job each.", readable=False),
    preset: Optional[List[str]] = PresetOpt,
    queue_file: Path = QueueFileOpt,
    retries: int = typer.Option(1, "--retries", min=0, help="Retries of a job that ran out of GPU memory."),
    notify_command: Optional[str] = typer.Option(None, "--notify-command",
                                                 help="Run after each job (LORACLI_* variables describe it)."),
    webhook: Optional[str] = typer.Option(None, "--webhook", help="POST each job's result as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the job results as JSON."),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="loracli or sd-scripts (default: LORACLI_BACKEND or loracli)."),
    sd_scripts_dir: Optional[Path] = typer.Option(None, "--sd-scripts-dir", envvar="LORACLI_SD_SCRIPTS_DIR",
                                                  help="The sd-scripts checkout for --backend sd-scripts.", readable=False),
    force: bool = typer.Option(False, "--force",
                               help="Train finished jobs again, each in a new run folder (old ones are kept)."),
) -> None:
    """Plan every job, then train them in turn; finished jobs are skipped, interrupted ones resumed."""
    from loracli.cli.queue_cmd import queue_run as run

    code = run(configs, preset or [], queue_file, retries, notify_command, webhook, as_json,
               backend=backend, sd_scripts_dir=sd_scripts_dir, force=force)
    raise typer.Exit(code)


@queue_app.command("status", epilog="Examples:\n\n  loracli queue status\n\n  loracli queue status --json")
@guarded
def queue_status(queue_file: Path = QueueFileOpt,
                 as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """What the queue file says about each job."""
    from loracli.cli.queue_cmd import queue_status as show

    show(queue_file, as_json)


from loracli.cli.export_cmd import register as _register_export  # noqa: E402
_register_export(app)
from loracli.cli.report_cmd import register as _register_report  # noqa: E402
_register_report(app)

from loracli.cli.grid_cmd import register as _register_grid  # noqa: E402
_register_grid(app)
from loracli.cli.import_cmd import register as _register_import  # noqa: E402
_register_import(app)
from loracli.cli.tools_cmd import register as _register_tools  # noqa: E402
_register_tools(app)


def main() -> None:
    app()
