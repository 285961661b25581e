"""`loracli grid`: compare saved LoRA files at several strengths, as labelled image grids.

Targets are a run folder (its saved files, in training order; its base model,
prompts and text settings) or LoRA files (then --model is needed).
"""

from __future__ import annotations

from pathlib import Path

import typer

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.sample_prompts import SamplePrompt, parse_prompt_line, read_prompt_file

DEFAULT_STRENGTHS = "0.25,0.5,0.75,1.0,1.25"


def parse_numbers(text: str, option: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(Problem(option, f"{text!r} is not a comma-separated list of numbers",
                                  f"e.g. {option} {DEFAULT_STRENGTHS if kind is float else '1,2,3'}")) from None
    if not values:
        raise ConfigError(Problem(option, "empty list", f"e.g. {option} {DEFAULT_STRENGTHS}"))
    return values


def _training_point(path: Path) -> tuple[int | None, int | None]:
    """(ss_epoch, ss_steps) from the file's metadata; None where absent or unreadable."""
    from loracli.safetensors_header import read_header

    try:
        meta = read_header(path).metadata
    except Exception:  # noqa: BLE001 - unreadable files are reported when loaded
        return None, None
    values = [meta.get(k) for k in ("ss_epoch", "ss_steps")]
    return tuple(int(v) if v is not None and str(v).isdigit() else None for v in values)  # type: ignore[return-value]


def _saved_steps(path: Path) -> int:
    """Training order; files without ss_steps sort last."""
    steps = _training_point(path)[1]
    return steps if steps is not None else 1 << 62


def row_label(path: Path) -> str:
    epoch, steps = _training_point(path)
    point = ", ".join(f"{name} {value}" for name, value in (("epoch", epoch), ("step", steps)) if value is not None)
    return f"{path.stem} ({point})" if point else path.stem


def run_files(run_dir: Path) -> list[Path]:
    files = [p for p in run_dir.glob("*.safetensors") if not p.name.startswith(".")]
    return sorted(files, key=lambda p: (_saved_steps(p), p.name))


def collect(targets: list[Path]) -> tuple[list[Path], dict | None, Path | None]:
    """(LoRA files, the run's resolved config or None, the run folder or None)."""
    from loracli.config.loader import read_toml

    files: list[Path] = []
    run_config, run_dir = None, None
    for target in targets:
        if target.is_dir():
            config_file = target / "config.resolved.toml"
            if not config_file.is_file():
                raise DatasetError(Problem(str(target), "not a loracli run folder (no config.resolved.toml)",
                                           "give a run folder or .safetensors files"))
            found = run_files(target)
            if not found:
                raise DatasetError(Problem(str(target), "the run folder has no saved LoRA files yet"))
            files += found
            run_config, run_dir = run_config or read_toml(config_file), run_dir or target
        elif target.is_file():
            if target.suffix != ".safetensors":
                raise DatasetError(Problem(str(target), "not a .safetensors file", "give LoRA .safetensors files"))
            files.append(target)
        else:
            raise DatasetError(Problem(str(target), "no such file or folder", "check the path"))
    return files, run_config, run_dir


def gather_prompts(prompt_texts: list[str], prompts_file: Path | None, run_config: dict | None,
                   width: int | None, height: int | None, steps: int | None, cfg: float | None) -> list[SamplePrompt]:
    prompts: list[SamplePrompt] = []
    source = prompts_file
    if source is None and not prompt_texts and run_config:
        configured = run_config.get("sample", {}).get("sample_prompts")
        source = Path(configured) if configured else None
    if source is not None:
        prompts += read_prompt_file(source)
    for text in prompt_texts:
        prompts.append(parse_prompt_line(text, len(prompts), where="--prompt"))
    if not prompts:
        raise ConfigError(Problem("--prompt", "no prompts to render",
                                  "give --prompt TEXT (repeatable) or --prompts FILE"))
    overrides = {k: v for k, v in (("width", width), ("height", height), ("steps", steps), ("scale", cfg))
                 if v is not None}
    if overrides:
        from dataclasses import replace

        prompts = [replace(p, **overrides) for p in prompts]
    return prompts


def register(app: typer.Typer) -> None:
    from loracli.cli.app import guarded

    @app.command(
        "grid",
        epilog="Examples:\n\n  loracli grid runs/my-lora-20261122-153000\n\n"
        "  loracli grid runs/my-lora-20261122-153000 --prompt '1girl, smiling' --strengths 0.5,0.75,1 --seeds 1,2\n\n"
        "  loracli grid a.safetensors b.safetensors --model ./sd15 --prompts prompts.txt --out grids",
    )
    @guarded
    def grid(
        targets: list[Path] = typer.Argument(..., help="A run folder, or LoRA .safetensors files.", readable=False),
        prompt: list[str] = typer.Option([], "--prompt", help="A prompt (sd-scripts options allowed); repeat."),
        prompts_file: Path = typer.Option(None, "--prompts", help="A prompt file (default: the run's sample prompts).", readable=False),
        strengths: str = typer.Option(DEFAULT_STRENGTHS, "--strengths", help="LoRA strengths, comma-separated."),
        seeds: str = typer.Option("1", "--seeds", help="Seeds, comma-separated: one grid per prompt and seed."),
        model: str = typer.Option(None, "--model", help="Base model (default: the run's)."),
        sampler: str = typer.Option(None, "--sampler", help="sd-scripts sampler name (default: the run's or ddim)."),
        steps: int = typer.Option(None, "--steps", min=1, max=1000, help="Sampling steps (overrides --s)."),
        cfg: float = typer.Option(None, "--cfg", help="CFG scale (overrides --l)."),
        width: int = typer.Option(None, "--width", min=64, help="Image width (overrides --w)."),
        height: int = typer.Option(None, "--height", min=64, help="Image height (overrides --h)."),
        out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/grids or ./grids).", readable=False),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle-checkpoint",
                                          help="Allow a .ckpt base model (a pickle can run code)."),
    ) -> None:
        """Render LoRA files × strengths × prompts × seeds as labelled PNG grids, to pick the best epoch."""
        from loracli.config.schema import SampleSection

        files, run_config, run_dir = collect(targets)
        prompts = gather_prompts(prompt, prompts_file, run_config, width, height, steps, cfg)
        strength_list = parse_numbers(strengths, "--strengths", float)
        seed_list = parse_numbers(seeds, "--seeds", int)
        model_cfg = (run_config or {}).get("model", {})
        base = model or model_cfg.get("pretrained_model_name_or_path")
        if not base:
            raise ConfigError(Problem("--model", "no base model given", "add --model PATH (the model the LoRA was "
                                      "trained on), or give a run folder"))
        chosen_sampler = sampler or (run_config or {}).get("sample", {}).get("sample_sampler", "ddim")
        try:
            SampleSection(sample_sampler=chosen_sampler)
        except ValueError:
            raise ConfigError(Problem("--sampler", f"unknown sampler {chosen_sampler!r}",
                                      "use ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, "
                                      "dpmsolver++, dpmsingle (k_ names too)")) from None
        out_dir = out or (run_dir / "grids" if run_dir else Path("grids"))
        render(files, prompts, strength_list, seed_list, base, model_cfg, run_config, chosen_sampler, out_dir, device,
               allow_pickle)


def render(files, prompts, strengths, seeds, base, model_cfg, run_config, sampler, out_dir, device,
           allow_pickle: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from loracli.run.strength_grid import GridJob, render_grids

    import torch

    job = GridJob(
        files=files, prompts=prompts, strengths=strengths, seeds=seeds, model=base,
        v2=bool(model_cfg.get("v2", False)), v_parameterization=bool(model_cfg.get("v_parameterization", False)),
        allow_pickle=allow_pickle or bool(model_cfg.get("allow_pickle_checkpoint", False)),
        clip_skip=model_cfg.get("clip_skip"),
        max_token_length=(run_config or {}).get("dataset", {}).get("max_token_length"),
        sampler=sampler, out_dir=out_dir, row_labels=[row_label(f) for f in files],
    )
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    columns = [TextColumn("grid"), BarColumn(), TextColumn("{task.completed}/{task.total} images"),
               TimeRemainingColumn()]
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("grid", total=job.image_count)
        written = render_grids(job, chosen, on_image=lambda: progress.advance(task))
    for path in written:
        print(path)
