"""How a plan reads in a terminal: dataset, buckets, steps, saves, warnings."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from loracli.config.loader import ResolvedConfig
from loracli.config.schema import LoracliConfig
from loracli.errors import ConfigError, Problem
from loracli.family import FAMILIES
from loracli.lint import adafactor_uses_relative_step, effective_te_lrs, is_adaptive
from loracli.plan import Plan


def print_plan(resolved: ResolvedConfig, plan: Plan, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    cfg = resolved.config
    presets = ", ".join(p.name for p in resolved.presets) or "none"
    console.print(f"[bold]loracli plan[/bold]  config: {resolved.config_path or '-'}  presets: {presets}")
    console.print(f"model: {cfg.model.pretrained_model_name_or_path} ({plan.model_family}): {model_line(plan)}",
                  markup=False)
    if plan.model_source:
        console.print(f"  found in the {plan.model_source}", markup=False)
    console.print(f"network: {cfg.network.algo} dim {cfg.network.dim} alpha {cfg.network.alpha:g}  "
                  f"optimizer: {cfg.optimizer.optimizer_type}, {cfg.optimizer.lr_scheduler}", markup=False)
    console.print(f"learning rate: {lr_line(cfg, plan.model_family)}", markup=False)

    if plan.datasets:
        print_datasets(plan, console)
    else:
        per_subset: dict[tuple[str, bool], list] = defaultdict(list)
        for image in plan.images:
            per_subset[(image.subset, image.is_reg)].append(image)
        table = Table(title="dataset", title_justify="left")
        for col in ("folder", "kind", "images", "repeats", "samples", "captions"):
            table.add_column(col, justify="right" if col in ("images", "repeats", "samples") else "left")
        for (subset, is_reg), images in per_subset.items():
            captioned = sum(1 for i in images if i.caption_source == "file")
            repeats = sorted({i.repeats for i in images})
            table.add_row(subset, "reg" if is_reg else "train", str(len(images)),
                          "/".join(map(str, repeats)), str(sum(i.repeats for i in images)),
                          f"{captioned}/{len(images)} from files")
        console.print(table)
    console.print(f"num train images × repeats: {plan.num_train_images}   num reg images: {plan.num_reg_images}"
                  + (f"   skipped: {len(plan.skipped)}" if plan.skipped else ""))
    if plan.validation_images:
        console.print(validation_line(cfg, plan), markup=False)
    from loracli.dataset.masks import masks_line

    if line := masks_line(cfg, plan.images):
        console.print(line, markup=False)

    buckets = Table(title="buckets", title_justify="left")
    for col in (("dataset",) if plan.datasets else ()) + ("resolution", "images×repeats", "batches"):
        buckets.add_column(col, justify="right")
    for b in plan.buckets:
        w, h = b["resolution"]
        first = (f"datasets[{b['dataset']}]",) if plan.datasets else ()
        buckets.add_row(*first, f"{w}x{h}", str(b["count"]), str(b["batches"]))
    console.print(buckets)
    if plan.mean_ar_error is not None:
        console.print(f"mean aspect-ratio error: {plan.mean_ar_error:.4f}")

    console.print(f"[bold]steps[/bold]: {plan.formula}")
    console.print(f"batches per epoch: {plan.batches_per_epoch}  steps per epoch: {plan.steps_per_epoch}  "
                  f"epochs: {plan.epochs}  total steps: {plan.total_steps}  warmup steps: {plan.warmup_steps}")
    console.print(f"files: {', '.join(plan.expected_files)}")
    modules_line = network_modules_line(plan.network_modules)
    if modules_line:
        console.print(modules_line, markup=False)
    from loracli.vram import vram_lines

    for line in vram_lines(getattr(plan, "vram", {})):
        console.print(line, markup=False)
    if plan.sample_rounds:
        from loracli.sample_prompts import round_title

        titles = [round_title(r["label"]) + ("" if r["epoch"] is None else f" (step {r['step']})")
                  for r in plan.sample_rounds]
        shown = ", ".join(titles[:8]) + (f", ... ({len(titles)} in all)" if len(titles) > 8 else "")
        console.print(f"sample images: {shown}", markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False)
    from loracli.sdscripts.importer import imported_account  # a config `loracli import` wrote names what it left out

    for line in imported_account(resolved.config_path):
        console.print(line, style="yellow", markup=False)
    for w in plan.warnings:
        line = f"warning [{w['code']}] {w['key']}: {w['message']}"
        if w["hint"]:
            line += f"; {w['hint']}"
        if w["source"]:
            line += f" (source: {w['source']})"
        console.print(line, style="yellow", markup=False)


def print_datasets(plan: Plan, console: Console) -> None:
    """[[datasets]]: each dataset's resolution, batch size and buckets, and its subsets with what they set."""
    samples: dict[tuple[int, int | None], int] = defaultdict(int)
    captioned: dict[tuple[int, int | None], int] = defaultdict(int)
    for image in plan.images:
        samples[(image.dataset, image.subset_index)] += image.repeats
        captioned[(image.dataset, image.subset_index)] += image.caption_source == "file"
    for d_index, d in enumerate(plan.datasets):
        w, h = d["resolution"]
        buckets = (f"buckets {d['min_bucket_reso']}-{d['max_bucket_reso']} step {d['bucket_reso_steps']}"
                   + (" no upscale" if d["bucket_no_upscale"] else "")) if d["enable_bucket"] else "no bucketing"
        table = Table(title=f"{d['key']}: {w}x{h}, batch {d['batch_size']}, {buckets}; {d['num_train_images']} "
                      f"train images × repeats, {d['num_reg_images']} reg, {d['batches']} batches",
                      title_justify="left")
        for col in ("subset", "image_dir", "kind", "images", "repeats", "samples", "captions", "options"):
            table.add_column(col, justify="right" if col in ("images", "repeats", "samples") else "left")
        for s_index, sub in enumerate(d["subsets"]):
            key = (d_index, s_index)
            options = ", ".join(f"{k}={v!r}" for k, v in sub["options"].items())
            if sub["class_tokens"] is not None:
                options = f"class_tokens={sub['class_tokens']!r}" + (", " + options if options else "")
            table.add_row(f"subsets[{s_index}]", sub["image_dir"].replace("\\", "/").rsplit("/", 1)[-1],
                          "reg" if sub["is_reg"] else "train", str(sub["img_count"]), str(sub["num_repeats"]),
                          str(samples.get(key, 0)), f"{captioned.get(key, 0)}/{sub['img_count']} from files",
                          options or "-")
        console.print(table)


def validation_line(cfg: LoracliConfig, plan: Plan) -> str:
    """How many images are held out, from which folders, and when the validation loss is measured."""
    per_folder: dict[str, int] = defaultdict(int)
    for image in plan.validation_images:
        per_folder[image.subset] += 1
    folders = ", ".join(f"{name} {count}" for name, count in per_folder.items())
    tr = cfg.training
    when = [f"every {tr.validate_every_n_steps} steps"] if tr.validate_every_n_steps else []
    when.append(f"every {tr.validate_every_n_epochs} epochs" if tr.validate_every_n_epochs else "every epoch")
    limit = f", at most {tr.max_validation_steps} batches" if tr.max_validation_steps else ""
    timesteps = ", ".join(map(str, plan.validation_timesteps))
    return (f"validation: {len(plan.validation_images)} images held out (split {cfg.dataset.validation_split:g}, "
            f"seed {plan.validation_seed}; {folders}), never trained on; the steps above count the rest. "
            f"Loss {' and '.join(when)}{limit}, at timesteps {timesteps} with fixed noise")


def network_modules_line(rows: list[dict]) -> str:
    """'LoRA modules: 264 (text encoder 72, unet down1 14 ...)'; ranks in brackets where they vary or are set."""
    if not rows:
        return ""
    total = sum(r["modules"] for r in rows)
    ranks = {rank for r in rows for rank in r["ranks"]}
    parts = []
    for r in rows:
        rank = f" [rank {'/'.join(str(x) for x in r['ranks'])}]" if len(ranks) > 1 else ""
        parts.append(f"{r['part']} {r['modules']}{rank}")
    common = f", rank {ranks.pop()}" if len(ranks) == 1 else ""
    return f"LoRA modules: {total}{common} ({', '.join(parts)})"


def lr_line(cfg: LoracliConfig, model_family: str) -> str:
    """The learning rate of each part the run trains, as the optimizer will see it."""
    opt, net = cfg.optimizer, cfg.network
    if adafactor_uses_relative_step(opt.optimizer_type, opt.optimizer_args):
        return "set by Adafactor itself (relative_step), as in sd-scripts"
    parts = []
    if net.network_train_text_encoder_only:
        parts.append("unet not trained")
    else:
        parts.append(f"unet {opt.learning_rate if opt.unet_lr is None else opt.unet_lr:g}")
    family = FAMILIES.get(model_family)
    encoders = len(family.text_encoder_prefixes) if family else 1
    te_lrs = effective_te_lrs(cfg, encoders)
    if net.network_train_unet_only:
        parts.append("text encoder not trained")
    elif not any(te_lrs):
        parts.append("text encoder frozen (lr 0)")
    elif encoders == 1:
        parts.append(f"text encoder {te_lrs[0]:g}")
    else:
        parts.append(", ".join(f"text encoder {i + 1} {lr:g}" for i, lr in enumerate(te_lrs)))
    line = ", ".join(parts)
    if is_adaptive(opt.optimizer_type):
        line += f" (× d: {opt.optimizer_type} adapts d·lr, the real step size, as it trains)"
    return line


def model_line(plan: Plan) -> str:
    """"SDXL (detected from model_index.json (StableDiffusionXLPipeline))" and the like."""
    family = FAMILIES.get(plan.model_family)
    title = family.title if family else plan.model_family
    return f"{title} ({plan.model_detection})" if plan.model_detection else title


def check_strict(plan: Plan, strict: bool) -> None:
    """--strict: any warning is fatal (exit 2)."""
    if strict and plan.warnings:
        raise ConfigError([Problem(w["key"], f"[{w['code']}] {w['message']} (--strict)", w["hint"])
                           for w in plan.warnings])
