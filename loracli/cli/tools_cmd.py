"""`loracli resize`, `loracli merge`, `loracli extract`: after-training tools for LoRA files.

The heavy side (torch, lycoris) lives in loracli/lora_tools and is imported only
when a command runs, so `loracli --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from loracli.errors import ConfigError, Problem

PRECISION_HELP = "float, fp16 or bf16 for every saved tensor (default: float, as sd-scripts)."
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)."
FORCE_HELP = "Overwrite an existing output file."


def _print_resize(report, verbose: bool) -> None:
    from loracli.lora_tools.resize import rank_summary

    if verbose:
        width = max(len(m.name) for m in report.modules)
        for m in report.modules:
            print(f"{m.name:{width}}  rank {m.old_rank:>3} -> {m.new_rank:<3}  alpha {m.new_alpha:<8g}  "
                  f"fro retained {m.fro_retained:.1%}")
    kept = [m for m in report.modules if m.new_rank] or report.modules
    worst = min(kept, key=lambda m: m.fro_retained)
    print(f"{report.output}: {len(report.modules)} modules, ranks {rank_summary(report)} (was {report.old_dim}); "
          f"Frobenius norm retained: mean {report.mean_fro:.1%}, lowest kept {worst.fro_retained:.1%} "
          f"({worst.name})")


def register(app: typer.Typer) -> None:
    from loracli.cli.app import guarded

    @app.command(
        "resize",
        epilog="Examples:\n\n  loracli resize my-lora.safetensors my-lora-d8.safetensors --dim 8\n\n"
        "  loracli resize my-lora.safetensors small.safetensors --method sv_fro --param 0.9 --save-precision fp16\n\n"
        "  loracli resize locon.safetensors out.safetensors --dim 16 --conv-dim 8 --verbose\n\n"
        "  loracli resize my-lora.safetensors small.safetensors --method fro_ckpt --param -3.55 "
        "--base sdxl.safetensors",
    )
    @guarded
    def resize(
        source: Path = typer.Argument(..., help="The LoRA/LoCon file (kohya format: sd-scripts, kohya_ss, loracli).", readable=False),
        target: Path = typer.Argument(..., help="The resized .safetensors file to write.", readable=False),
        dim: Optional[int] = typer.Option(None, "--dim", help="New rank; with --method, the largest rank allowed."),
        conv_dim: Optional[int] = typer.Option(None, "--conv-dim",
                                               help="New rank of 3x3 conv modules (default: --dim)."),
        method: Optional[str] = typer.Option(None, "--method",
                                             help="Rank per module: sv_fro, sv_ratio or sv_cumulative (sd-scripts' "
                                             "--dynamic_method), or fro_ckpt (with --base)."),
        param: Optional[float] = typer.Option(None, "--param", help="The method's target (sd-scripts' "
                                              "--dynamic_param): a share for sv_fro/sv_cumulative, a ratio for "
                                              "sv_ratio."),
        base: Optional[Path] = typer.Option(None, "--base", help="With --method fro_ckpt: the checkpoint the LoRA "
                                            "is used with; keeps singular values above 10^P x the base weight's "
                                            "Frobenius norm (modules with none are dropped).", readable=False),
        save_precision: Optional[str] = typer.Option(None, "--save-precision", help=PRECISION_HELP),
        device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per module: rank, alpha, share kept."),
        as_json: bool = typer.Option(False, "--json", help="Print the per-module report as JSON."),
    ) -> None:
        """Lower a LoRA's rank by SVD (sd-scripts' resize_lora.py): fixed, or per module (sv_fro/sv_ratio/...)."""
        from loracli.lora_tools.resize import ResizeRequest, resize_file

        request = ResizeRequest(dim=dim, conv_dim=conv_dim, method=method, param=param,
                                save_precision=save_precision, device=device, base=base)
        report = resize_file(source, target, request, force=force)
        if as_json:
            print(report.to_json())
        else:
            _print_resize(report, verbose)

    @app.command(
        "merge",
        epilog="Examples:\n\n"
        "  loracli merge a.safetensors --model sd15.safetensors --ratio 0.8 -o sd15-a.safetensors\n\n"
        "  loracli merge a.safetensors b.safetensors --ratio 1 --ratio 0.5 -o ab.safetensors\n\n"
        "  loracli merge a.safetensors b.safetensors --dim 32 -o ab-d32.safetensors",
    )
    @guarded
    def merge(
        loras: List[Path] = typer.Argument(..., help="LoRA/LyCORIS files (kohya format).", readable=False),
        out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write.", readable=False),
        model: Optional[Path] = typer.Option(None, "--model", help="Bake the LoRAs into this base model (a "
                                             "single-file .safetensors checkpoint, or an SD1/SDXL diffusers "
                                             "folder); the output is a single-file checkpoint.", readable=False),
        ratio: Optional[List[float]] = typer.Option(None, "--ratio", "-r", help="Strength of each LoRA, in order "
                                                    "(repeat; default 1.0 each)."),
        dim: Optional[int] = typer.Option(None, "--dim", help="LoRAs into one LoRA by SVD at this rank (LoHa/LoKr "
                                          "too); without it the ranks are concatenated."),
        conv_dim: Optional[int] = typer.Option(None, "--conv-dim", help="SVD rank of 3x3 conv modules (default: "
                                               "--dim)."),
        save_precision: Optional[str] = typer.Option(None, "--save-precision",
                                                     help="float, fp16 or bf16 (default: a checkpoint keeps its "
                                                     "dtypes; a merged LoRA is saved as float)."),
        device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """Bake LoRAs into a checkpoint (--model), or merge several LoRAs into one (concatenated or --dim SVD)."""
        if model is not None:
            if dim is not None or conv_dim is not None:
                raise ConfigError(Problem("--dim", "--dim/--conv-dim set the rank of a merged LoRA; with --model "
                                          "the output is a checkpoint", "drop --dim, or drop --model"))
            from loracli.lora_tools.merge import merge_into_checkpoint

            report = merge_into_checkpoint(model, loras, ratio, out, save_precision, device, force)
            print(f"{report.output}: {model.name} + " + ", ".join(f"{Path(r['file']).name} x{r['ratio']:g} "
                                                                 f"({r['modules']} modules)" for r in report.loras)
                  + f"; {report.tensors_changed} weights changed")
            return
        from loracli.lora_tools.merge import merge_loras

        report = merge_loras(loras, ratio, out, dim, conv_dim, save_precision, device, force)
        how = f"SVD to rank {dim}" if report.mode == "svd" else "ranks concatenated"
        print(f"{report.output}: " + ", ".join(f"{Path(r['file']).name} x{r['ratio']:g}" for r in report.loras)
              + f" ({how})")

    @app.command(
        "extract",
        epilog="Examples:\n\n"
        "  loracli extract sd15.safetensors my-finetune.safetensors my-lora.safetensors --dim 32\n\n"
        "  loracli extract base.safetensors tuned.safetensors locon.safetensors --dim 32 --conv-dim 16 --device cuda",
    )
    @guarded
    def extract(
        base: Path = typer.Argument(..., help="The original model (single-file .safetensors or diffusers folder).", readable=False),
        tuned: Path = typer.Argument(..., help="The fine-tuned model, same family.", readable=False),
        target: Path = typer.Argument(..., help="The LoRA .safetensors file to write.", readable=False),
        dim: int = typer.Option(..., "--dim", help="Rank of the LoRA."),
        conv_dim: Optional[int] = typer.Option(None, "--conv-dim", help="Also extract ResNet/sampler convs, 3x3 at "
                                               "this rank (a LoCon)."),
        save_precision: Optional[str] = typer.Option(None, "--save-precision", help=PRECISION_HELP),
        device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
        clamp_quantile: float = typer.Option(0.99, "--clamp-quantile", help="Clamp the factors at this quantile "
                                             "of their values (sd-scripts' default; 1 = no clamping)."),
        min_diff: float = typer.Option(0.01, "--min-diff", help="Leave the text encoders out unless a weight "
                                       "moved by more than this."),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """A LoRA from the difference of two checkpoints (sd-scripts' extract_lora_from_models.py)."""
        from loracli.lora_tools.extract import extract as run_extract

        report = run_extract(base, tuned, target, dim, conv_dim, save_precision, device, force, clamp_quantile,
                             min_diff)
        te = f"{report.text_encoder_modules} text-encoder modules" if report.text_encoder_kept else \
            f"text encoders left out (max diff {report.text_encoder_max_diff:.3g} <= --min-diff {min_diff:g})"
        print(f"{report.output}: {report.unet_modules} UNet modules, {te}; Frobenius norm retained: mean "
              f"{report.mean_fro:.1%}")
