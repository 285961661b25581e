"""The checks `loracli plan` runs: errors stop the run, warnings explain a risk.

Each rule carries its reason and its source: a guide by its title (README,
"Where the rules come from") or the sd-scripts file whose behaviour it
mirrors. Config-only rules run before the dataset is scanned; dataset rules
run on the scan and the schedule; `lint_network_weights` reads the header of
`network.network_weights`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loracli.caption_rules import caption_config_findings, caption_data_findings
from loracli.config.schema import LoracliConfig
from loracli.dataset.subset_rules import subset_config_findings
from loracli.family import FAMILIES, ModelFamily
from loracli.prompt_weights import PromptWeightError, plain_text
from loracli.sample_prompts import read_prompt_file

if TYPE_CHECKING:
    from loracli.dataset.scan import DatasetScan
    from loracli.schedule import Schedule

# The community guides, by title (README: "Where the rules come from").
LAZY_DADAPT = "Lazy DAdaptation Guide"
DADAPT_NOTES = "D-Adaptation Experiment Notes"
TRAINING_GUIDE = "LoRA Training Guide"  # the SDXL/Pony/NoobAI one
TRAINING_LOGS = "LoRA training logs & notes"
OTHER_RENTRY = "The Other LoRA Training Rentry"
# sd-scripts behaviour, by the file that has it.
SD_BUCKETS = "sd-scripts library/train_util.py (buckets)"
SD_TRAIN = "sd-scripts train_network.py"
SD_SCHEDULERS = "sd-scripts library/train_util.py (lr schedulers)"
SD_OPTIMIZERS = "sd-scripts library/train_util.py (optimizers)"
SD_XL = "sd-scripts sdxl_train_network.py"


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    code: str  # E3, W1, ... as numbered in presets-and-rules.md
    key: str  # dotted key or file the finding is about
    message: str
    hint: str = ""
    source: str = ""  # the guide (by title) or the sd-scripts file the rule comes from

    def render(self) -> str:
        text = f"{self.level} [{self.code}] {self.key}: {self.message}"
        if self.hint:
            text += f"; {self.hint}"
        if self.source:
            text += f" (source: {self.source})"
        return text

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def is_adaptive(optimizer_type: str) -> bool:
    """DAdapt* and Prodigy: they scale lr by their own estimate d, so they expect lr around 1."""
    lower = optimizer_type.lower()
    return lower.startswith("dadapt") or lower == "prodigy"


def adafactor_uses_relative_step(optimizer_type: str, optimizer_args: Mapping[str, object]) -> bool:
    """sd-scripts: Adafactor's relative_step defaults to true; warmup_init forces it on."""
    if optimizer_type.lower() != "adafactor":
        return False
    return bool(optimizer_args.get("relative_step", True)) or bool(optimizer_args.get("warmup_init", False))


def effective_te_lrs(config: LoracliConfig, encoders: int = 1) -> list[float]:
    """The lr of each text encoder (SDXL has two): text_encoder_lr, else learning_rate."""
    opt = config.optimizer
    lrs = [opt.text_encoder_lr_for(i) for i in range(encoders)]
    return [opt.learning_rate if lr is None else lr for lr in lrs]


def trains_text_encoder(config: LoracliConfig, encoders: int = 1) -> bool:
    return not config.network.network_train_unet_only and any(lr != 0 for lr in effective_te_lrs(config, encoders))


def _torch_version() -> tuple[int, int] | None:
    """The installed torch's (major, minor), read without importing it (the plan side stays torch-free)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        match = re.match(r"(\d+)\.(\d+)", version("torch"))
    except PackageNotFoundError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _precision_findings(tr, optimizer_type: str) -> list[Finding]:
    """full_fp16 and fp8_base: the assertions sd-scripts' train_network.py makes, at plan time."""
    out: list[Finding] = []
    # E80: full_fp16 keeps the trained state in fp16, which only an fp16 run computes (and scales) in.
    if tr.full_fp16 and tr.mixed_precision != "fp16":
        out.append(Finding("error", "E80", "training.full_fp16",
                           f'needs training.mixed_precision = "fp16" (now "{tr.mixed_precision}")',
                           'set mixed_precision = "fp16", or remove full_fp16', "train_network.py"))
    # W80: Adam-like optimizers keep their moments in the parameters' dtype; in fp16 a squared gradient
    # below ~6e-8 is 0 and AdamW's eps 1e-8 is 0, so the first update divides by zero (inf/NaN loss).
    lower = optimizer_type.lower()
    if tr.full_fp16 and (lower in ("adamw", "adam") or lower.startswith("dadapt") or lower == "prodigy"):
        out.append(Finding("warning", "W80", "training.full_fp16",
                           f"{optimizer_type} keeps its moments in fp16 here, where small squared gradients and its "
                           "eps round to 0: the loss tends to turn inf/NaN within a few steps",
                           'use optimizer_type = "AdamW8bit" (fp32 arithmetic), or raise optimizer_args eps '
                           "(1e-3), or use full_bf16 / mixed precision alone"))
    fp8_key = "training.fp8_base" if tr.fp8_base else "training.fp8_base_unet"
    if tr.fp8_base or tr.fp8_base_unet:
        # E81: fp8 weights are only stored; every product runs in the mixed-precision dtype.
        if tr.mixed_precision == "no":
            out.append(Finding("error", "E81", fp8_key,
                               'needs training.mixed_precision = "bf16" or "fp16" (now "no"): fp8 weights are '
                               "computed in the mixed-precision dtype",
                               'set mixed_precision = "bf16", or remove the fp8 option', "train_network.py"))
        # E82: float8_e4m3fn exists from torch 2.1 on (sd-scripts asserts the same version).
        found = _torch_version()
        if found is not None and found < (2, 1):
            out.append(Finding("error", "E82", fp8_key, f"needs torch 2.1 or newer (installed: {found[0]}.{found[1]})",
                               "upgrade torch, or remove the fp8 option", "train_network.py"))
    return out


def lint_config(config: LoracliConfig, family: ModelFamily, origins: dict[str, str]) -> list[Finding]:
    """Rules that need only the config."""
    out: list[Finding] = []
    ds, net, opt, tr, outp = config.dataset, config.network, config.optimizer, config.training, config.output
    optimizer = opt.optimizer_type

    # E30: full_bf16 keeps the trained state in bf16, which only a bf16 run computes in (sd-scripts asserts it).
    if tr.full_bf16 and tr.mixed_precision != "bf16":
        out.append(Finding("error", "E30", "training.full_bf16",
                           f'needs training.mixed_precision = "bf16" (now "{tr.mixed_precision}")',
                           'set mixed_precision = "bf16", or remove full_bf16'))
    out.extend(_precision_findings(tr, opt.optimizer_type))
    from loracli.dataset.masks import mask_rules  # E60-E65 (here, not at the top: it imports this module)

    out.extend(mask_rules(config))
    # E3: the adafactor schedule only exists for the Adafactor optimizer.
    if opt.lr_scheduler == "adafactor" and optimizer.lower() != "adafactor":
        out.append(Finding("error", "E3", "optimizer.lr_scheduler",
                           f"the adafactor scheduler needs optimizer_type AdaFactor, not {optimizer}",
                           "use cosine or constant_with_warmup", TRAINING_GUIDE))
    # E4: cached text-encoder outputs cannot change, so captions must be fixed and the TE frozen
    # (sdxl_train_network.py asserts both).
    if tr.cache_text_encoder_outputs or tr.cache_text_encoder_outputs_to_disk:
        cache_key = "training.cache_text_encoder_outputs" + ("" if tr.cache_text_encoder_outputs else "_to_disk")
        if not net.network_train_unet_only:
            out.append(Finding("error", "E4", cache_key,
                               "needs network.network_train_unet_only = true: a text encoder that trains "
                               "changes the outputs the cache holds",
                               "set network.network_train_unet_only = true, or turn the cache off", SD_XL))
        clashes = [k for k, on in (
            ("dataset.shuffle_caption", ds.shuffle_caption),
            ("dataset.caption_dropout_rate", ds.caption_dropout_rate > 0),
            ("dataset.caption_dropout_every_n_epochs", ds.caption_dropout_every_n_epochs > 0),
            ("dataset.caption_tag_dropout_rate", ds.caption_tag_dropout_rate > 0),
            ("dataset.token_warmup_step", ds.token_warmup_step > 0),
        ) if on and not config.datasets]  # [[datasets]]: E43 per subset
        if clashes:
            out.append(Finding("error", "E4", cache_key,
                               f"cannot be combined with {', '.join(clashes)}: cached captions are encoded once",
                               "turn those off, or turn the cache off", f"{SD_XL}; {OTHER_RENTRY}"))
    # E5: cached latents are computed once, so per-step pixel augmentations cannot apply.
    if (ds.cache_latents or ds.cache_latents_to_disk) and not config.datasets:  # [[datasets]]: E41 per subset
        clashes = [k for k, on in (("dataset.color_aug", ds.color_aug), ("dataset.random_crop", ds.random_crop)) if on]
        if clashes:
            out.append(Finding("error", "E5", "dataset.cache_latents",
                               f"latent caching cannot be combined with {', '.join(clashes)}",
                               "turn caching off or the augmentation off (flip_aug is allowed)", OTHER_RENTRY))
    # E7: an empty name makes sd-scripts skip the last save silently.
    if outp.output_name is not None and not outp.output_name.strip():
        out.append(Finding("error", "E7", "output.output_name", "is empty",
                           "give a name, or remove the key to use sd-scripts' default names", TRAINING_GUIDE))
    # E8: bucket limits and steps.
    if ds.bucket_reso_steps % family.bucket_step_multiple and not config.datasets:  # [[datasets]]: E44
        out.append(Finding("error", "E8", "dataset.bucket_reso_steps",
                           f"{ds.bucket_reso_steps} is not a multiple of {family.bucket_step_multiple}, "
                           f"which {family.title} training needs",
                           f"use {family.bucket_step_multiple} (or a multiple of it)",
                           SD_XL if family.name == "sdxl" else SD_TRAIN))
    if ds.enable_bucket and not ds.bucket_no_upscale and not config.datasets:  # [[datasets]]: E44 per dataset
        if ds.min_bucket_reso > ds.max_bucket_reso:
            out.append(Finding("error", "E8", "dataset.min_bucket_reso",
                               f"min_bucket_reso {ds.min_bucket_reso} > max_bucket_reso {ds.max_bucket_reso}",
                               "swap them", SD_BUCKETS))
        else:
            w, h = ds.resolution_wh
            if min(w, h) < ds.min_bucket_reso or max(w, h) > ds.max_bucket_reso:
                came_from = sorted({origins[k] for k in ("dataset.min_bucket_reso", "dataset.max_bucket_reso")
                                    if k in origins})
                limits = f" (set by {', '.join(came_from)})" if came_from else " (the defaults)"
                out.append(Finding("error", "E8", "dataset.resolution",
                                   f"{w}x{h} lies outside the bucket limits {ds.min_bucket_reso}-{ds.max_bucket_reso}"
                                   f"{limits}",
                                   "widen dataset.min_bucket_reso/max_bucket_reso or change the resolution",
                                   SD_BUCKETS))
    # E9: nothing to plan.
    if tr.max_train_epochs is None and tr.max_train_steps is None:
        out.append(Finding("error", "E9", "training.max_train_epochs",
                           "neither max_train_epochs nor max_train_steps is set",
                           "set training.max_train_epochs (sd-scripts would silently train 1600 steps)",
                           SD_TRAIN))
    # E10: these schedules have no warmup phase; sd-scripts refuses them too.
    warmup_set = opt.lr_warmup_steps != 0
    if warmup_set and opt.lr_scheduler in ("constant", "adafactor"):
        out.append(Finding("error", "E10", "optimizer.lr_warmup_steps",
                           f"the {opt.lr_scheduler} scheduler takes no warmup (got {opt.lr_warmup_steps})",
                           "use lr_scheduler = \"constant_with_warmup\" or set lr_warmup_steps = 0",
                           SD_SCHEDULERS))
    elif warmup_set and adafactor_uses_relative_step(optimizer, opt.optimizer_args):
        out.append(Finding("error", "E10", "optimizer.lr_warmup_steps",
                           "Adafactor with relative_step uses its own schedule and takes no warmup",
                           "set lr_warmup_steps = 0, or optimizer_args.relative_step = false",
                           SD_OPTIMIZERS))
    if net.network_train_unet_only and net.network_train_text_encoder_only:
        out.append(Finding("error", "E12", "network.network_train_unet_only",
                           "network_train_unet_only and network_train_text_encoder_only are both true",
                           "set at most one of them"))
    # E18: sd-scripts' networks.lora has none of LyCORIS' switches; accepted, they would change nothing.
    if net.algo == "lora":
        for key in ("use_tucker", "use_scalar", "train_norm", "rank_dropout_scale"):
            if getattr(net, key):
                out.append(Finding("error", "E18", f"network.{key}",
                                   'is a LyCORIS option; plain LoRA (algo = "lora", sd-scripts\' networks.lora) '
                                   "has no such setting", 'remove it, or use algo = "locon" (LyCORIS)',
                                   "sd-scripts networks/lora.py"))
    pickle = pickle_checkpoint_finding(config)
    if pickle:
        out.append(pickle)
    # E13 / W14: a sampling schedule needs prompts, and prompts need a schedule.
    smp = config.sample
    scheduled = smp.sample_every_n_steps or smp.sample_every_n_epochs or smp.sample_at_first
    if scheduled and smp.sample_prompts is None:
        out.append(Finding("error", "E13", "sample.sample_prompts",
                           "sample images are scheduled but no prompt file is given",
                           "set sample.sample_prompts to a .txt file with one prompt per line"))
    if smp.sample_prompts is not None and not scheduled:
        out.append(Finding("warning", "W14", "sample.sample_every_n_epochs",
                           "sample.sample_prompts is set but no sample images are scheduled",
                           "set sample_every_n_epochs, sample_every_n_steps or sample_at_first"))

    # W1: alpha above dim amplifies updates ("burns").
    if net.alpha > net.dim:
        out.append(Finding("warning", "W1", "network.network_alpha",
                           f"alpha {net.alpha:g} is greater than dim {net.dim}: outputs tend to burn",
                           "use alpha <= dim (dim/2 or 1 are common)", OTHER_RENTRY))
    if net.conv_dim and net.conv_alpha is not None and net.conv_alpha > net.conv_dim:
        out.append(Finding("warning", "W1", "network.conv_alpha",
                           f"conv_alpha {net.conv_alpha:g} is greater than conv_dim {net.conv_dim}",
                           "use conv_alpha <= conv_dim", OTHER_RENTRY))
    if is_adaptive(optimizer):
        # W2: adaptive optimizers expect lr around 1 in every group.
        for key, lr in (("optimizer.learning_rate", opt.learning_rate),
                        ("optimizer.unet_lr", opt.unet_lr),
                        *(("optimizer.text_encoder_lr", lr) for lr in
                          (opt.text_encoder_lr if isinstance(opt.text_encoder_lr, list) else [opt.text_encoder_lr]))):
            if lr is not None and lr != 0 and not 0.1 <= lr <= 2:
                out.append(Finding("warning", "W2", key,
                                   f"{optimizer} with lr {lr:g}: adaptive optimizers need lr around 1",
                                   "set it to 1.0 (0.5-1 in the guides)",
                                   f"{LAZY_DADAPT}; {OTHER_RENTRY}"))
        # W3: weight decay without decoupling fights the adapted step size.
        wd = opt.optimizer_args.get("weight_decay", 0)
        decouple = opt.optimizer_args.get("decouple", optimizer.lower() == "prodigy")
        if optimizer.lower() in ("dadaptadam", "prodigy") and wd and decouple is not True:
            out.append(Finding("warning", "W3", "optimizer.optimizer_args.decouple",
                               f"{optimizer} with weight_decay {wd} but decouple is not true",
                               "add decouple = true to optimizer_args", LAZY_DADAPT))
        # W4
        if tr.noise_offset is not None and tr.noise_offset > 0.2:
            out.append(Finding("warning", "W4", "training.noise_offset",
                               f"noise_offset {tr.noise_offset:g} with an adaptive optimizer gives unusable results",
                               "keep it at 0.1 or below", DADAPT_NOTES))
    # W5
    if origins.get("training.multires_noise_discount") and tr.multires_noise_iterations is None:
        out.append(Finding("warning", "W5", "training.multires_noise_discount",
                           "has no effect without training.multires_noise_iterations",
                           "set multires_noise_iterations (6-10 is common) or remove the discount",
                           TRAINING_GUIDE))
    # W6
    if opt.lr_scheduler == "constant" and not is_adaptive(optimizer) and optimizer.lower() != "adafactor":
        out.append(Finding("warning", "W6", "optimizer.lr_scheduler",
                           f"a constant schedule with {optimizer} tends to overtrain",
                           "use cosine or cosine_with_restarts", OTHER_RENTRY))
    # W7
    if optimizer.lower() == "prodigy" and warmup_set and not opt.optimizer_args.get("safeguard_warmup", False):
        out.append(Finding("warning", "W7", "optimizer.optimizer_args.safeguard_warmup",
                           "Prodigy with a warmup but safeguard_warmup is not true",
                           "add safeguard_warmup = true to optimizer_args", OTHER_RENTRY))
    # W8
    if tr.min_snr_gamma is not None and not 1 <= tr.min_snr_gamma <= 20:
        out.append(Finding("warning", "W8", "training.min_snr_gamma",
                           f"{tr.min_snr_gamma:g} is outside the useful range 1-20",
                           "5 is the recommended value", OTHER_RENTRY))
    out += lint_family(config, family)
    # W12: sd-scripts rounds the limits to the step.
    if ds.enable_bucket and not ds.bucket_no_upscale and not config.datasets:
        step = ds.bucket_reso_steps
        if ds.min_bucket_reso % step or ds.max_bucket_reso % step:
            lo, hi = ds.min_bucket_reso // step * step, -(-ds.max_bucket_reso // step) * step
            out.append(Finding("warning", "W12", "dataset.min_bucket_reso",
                               f"bucket limits {ds.min_bucket_reso}-{ds.max_bucket_reso} are not multiples of "
                               f"{step}; used as {lo}-{hi} (min rounded down, max up), as sd-scripts does",
                               f"set them to {lo} and {hi}", SD_BUCKETS))
    from loracli.trackers import tracker_findings  # imports this module

    out += tracker_findings(config)
    out += caption_config_findings(config)  # E70
    out += subset_config_findings(config, family)  # E40-E44, W40: [[datasets]]
    return out


def pickle_checkpoint_finding(config: LoracliConfig) -> Finding | None:
    """E14: pickled checkpoints can run code when loaded; only with an explicit opt-in.

    Checked before the model is probed, so the opt-in is asked for before anything else."""
    model_path = config.model.pretrained_model_name_or_path
    if model_path.lower().endswith((".ckpt", ".pt", ".pth", ".bin")) and not config.model.allow_pickle_checkpoint:
        return Finding("error", "E14", "model.pretrained_model_name_or_path",
                       f"{model_path} is a pickle checkpoint, which can run code when loaded",
                       "use the .safetensors version, or set model.allow_pickle_checkpoint = true for a "
                       "file you trust")
    return None


def lint_family(config: LoracliConfig, family: ModelFamily) -> list[Finding]:
    """Rules that depend on the model family (SDXL's own, and what SD1/SD2 ignore)."""
    from loracli.network_lint import network_findings  # it imports Finding from here

    out: list[Finding] = network_findings(config, family)
    ds, opt, tr, model = config.dataset, config.optimizer, config.training, config.model
    encoders = len(family.text_encoder_prefixes)
    if family.name == "sdxl":
        # W19: SDXL base and its fine-tunes were trained at 1024x1024.
        w, h = ds.resolution_wh
        if min(w, h) < 768 and not config.datasets:  # [[datasets]]: W40 per dataset
            out.append(Finding("warning", "W19", "dataset.resolution",
                               f"{w}x{h} on SDXL, which is trained at 1024x1024: lower resolutions lose detail",
                               "use 1024 (the guide's value for Pony); 512 only as a last resort when VRAM is short",
                               TRAINING_GUIDE))
        # W20: the stock SDXL VAE overflows in fp16.
        if tr.mixed_precision == "fp16" and not model.no_half_vae:
            out.append(Finding("warning", "W20", "model.no_half_vae",
                               "fp16 on SDXL with the VAE in fp16: the stock SDXL VAE produces NaNs (black "
                               "images, NaN loss) in fp16",
                               "set model.no_half_vae = true (sd-scripts' --no_half_vae), or use bf16",
                               f"{TRAINING_GUIDE}; {SD_XL}"))
        # W21: informational: what the guides say about SDXL's two text encoders.
        if trains_text_encoder(config, encoders):
            out.append(Finding("warning", "W21", "network.network_train_unet_only",
                               "informational: the LoRA also trains SDXL's two text encoders (CLIP-L and OpenCLIP "
                               "bigG), which costs memory and rules out caching their outputs",
                               "The Other LoRA Training Rentry trains SDXL in about 8 GB of VRAM with the text "
                               "encoders frozen and their outputs cached (network.network_train_unet_only = true, "
                               "training.cache_text_encoder_outputs = true: preset sdxl-lowvram); the LoRA "
                               "Training Guide's Pony command trains both at 1e-4",
                               f"{OTHER_RENTRY}; {TRAINING_GUIDE}"))
    # W22: SDXL reads fixed layers of both encoders; sd-scripts ignores clip_skip there.
    if model.clip_skip is not None and not family.supports_clip_skip:
        out.append(Finding("warning", "W22", "model.clip_skip",
                           f"is ignored on {family.title}: both text encoders use their penultimate layer "
                           "(sd-scripts ignores clip_skip for SDXL too)", "remove model.clip_skip", SD_XL))
    # W23: one text encoder, two learning rates.
    if isinstance(opt.text_encoder_lr, list) and len(opt.text_encoder_lr) > encoders:
        out.append(Finding("warning", "W23", "optimizer.text_encoder_lr",
                           f"{len(opt.text_encoder_lr)} values on {family.title}, which has {encoders} text "
                           f"encoder: only the first ({opt.text_encoder_lr[0]:g}) is used, as in train_network.py",
                           f"give one value: text_encoder_lr = {opt.text_encoder_lr[0]:g}", SD_TRAIN))
    return out


_FILE_ALGOS = {"lora": ("lora", "locon"), "loha": ("loha",), "lokr": ("lokr",)}


def lint_network_weights(config: LoracliConfig, family: ModelFamily) -> list[Finding]:
    """E15-E17: the LoRA in network.network_weights must be one this run can continue from.

    Read from its safetensors header only: not a LoRA (E15), another model family (E16, e.g. an
    SDXL LoRA on an SD1 run), another algorithm or rank (E17). A broken file is a DatasetError.
    """
    from loracli.lorafile import collect_modules, is_lora_file, lora_family
    from loracli.safetensors_header import read_header

    net = config.network
    path = net.network_weights
    if path is None:
        return []
    key = "network.network_weights"
    where = f"{path.name} ({key})"
    header = read_header(path)
    modules = collect_modules(header)
    if not is_lora_file(modules):
        first = ", ".join(list(header.tensors)[:2]) or "no tensors"
        return [Finding("error", "E15", key, f"{path} is not a LoRA/LyCORIS file (no lora_unet_/lora_te "
                        f"modules; first keys: {first})", "give a LoRA file saved by loracli or sd-scripts")]
    out: list[Finding] = []
    found, evidence = lora_family(modules, header)
    fits = found is None or found == family.name or (found == "sd1/sd2" and family.name in ("sd1", "sd2"))
    if not fits:
        titles = " or ".join(FAMILIES[f].title for f in found.split("/"))
        out.append(Finding("error", "E16", key, f"{path} is an {titles} LoRA ({evidence}) but this run trains "
                           f"{family.title}", "give a LoRA trained on this base model's family, or change the "
                           "model"))
    algos = {m.algo for m in modules if m.algo in _FILE_ALGOS}
    if algos and not any(net.algo in _FILE_ALGOS[a] for a in algos):
        out.append(Finding("error", "E17", "network.algo",
                           f"{where} holds {'/'.join(sorted(algos))} modules but network.algo is {net.algo!r}",
                           f"set network.algo to match the file ({'/'.join(sorted(algos))})"))
        return out
    # E58: a DoRA file's magnitudes (dora_scale) load only into a DoRA network, and a DoRA network needs them.
    dora = any(name.endswith(".dora_scale") for name in header.tensors)
    if dora != net.dora_wd:
        out.append(Finding("error", "E58", "network.dora_wd",
                           f"{where} {'is' if dora else 'is not'} a DoRA file (dora_scale tensors) but "
                           f"network.dora_wd is {str(net.dora_wd).lower()}",
                           f"set network.dora_wd = {str(dora).lower()} to continue from it", "LyCORIS lycoris/kohya.py"))
    linear = {m.dim for m in modules if not m.conv and m.dim is not None}
    if len(linear) == 1 and net.dim not in linear:
        (dim,) = linear
        out.append(Finding("error", "E17", "network.network_dim",
                           f"{net.dim} but {where} has rank {dim}", f"set network.network_dim = {dim}"))
    conv = {m.dim for m in modules if m.conv and m.dim is not None}
    if len(conv) == 1:
        (conv_dim,) = conv
        if net.conv_dim is None:
            out.append(Finding("error", "E17", "network.conv_dim",
                               f"is unset but {where} has 3x3-conv modules of rank {conv_dim}; they would be "
                               "dropped", f"set network.conv_dim = {conv_dim}"))
        elif net.conv_dim != conv_dim:
            out.append(Finding("error", "E17", "network.conv_dim",
                               f"{net.conv_dim} but {where} has 3x3-conv rank {conv_dim}",
                               f"set network.conv_dim = {conv_dim}"))
    return out


def estimate_clip_tokens(prompt: str) -> int:
    """A lower-bound CLIP token count: one per word or punctuation mark.

    The real BPE splits rare words further, so a prompt over this estimate is
    certainly too long; the plan side has no tokenizer (it must not load one).
    """
    return len(re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", prompt))


def sample_prompt_token_limit(family: ModelFamily, max_token_length: int | None) -> int:
    """Tokens sd-scripts' sampler reads: SD1/SD2 up to 3 windows of 75 whatever max_token_length
    (its long-prompt-weighting pipeline); SDXL max_token_length (75 when unset)."""
    return (max_token_length or 75) if family.name == "sdxl" else 3 * 75


def _without_weights(prompt: str) -> str:
    try:
        return plain_text(prompt)
    except PromptWeightError:  # E72 reports it
        return prompt


def read_sample_prompts(path: Path) -> list[str]:
    """Prompt lines of an sd-scripts prompt file, options (--n, --w, ...) removed."""
    return [p.prompt for p in read_prompt_file(path)]


def lint_data(config: LoracliConfig, scan: DatasetScan, schedule: Schedule,
              buckets: list[dict], family: ModelFamily = FAMILIES["sd1"]) -> list[Finding]:
    """Rules that need the dataset scan and the step schedule."""
    out: list[Finding] = []
    tr = config.training
    # What sd-scripts would skip or treat silently; one code per kind of finding.
    # W9: folders skipped for their name.
    skipped_dirs = [s for s in scan.skipped if "prefix" in s.reason or "repeats" in s.reason]
    if skipped_dirs:
        names = ", ".join(s.path.name for s in skipped_dirs[:5])
        out.append(Finding("warning", "W9", "dataset.train_data_dir",
                           f"{len(skipped_dirs)} folder(s) skipped for their name: {names}",
                           "name image folders <repeats>_<name>, e.g. 10_mychar", f"{OTHER_RENTRY}; {SD_TRAIN}"))
    # W15: other files and folders that are not used.
    other = [s for s in scan.skipped if s not in skipped_dirs]
    if other:
        out.append(Finding("warning", "W15", "datasets" if config.datasets else "dataset.train_data_dir",
                           f"{len(other)} file(s) or folder(s) not used, e.g. {other[0].path.name}: {other[0].reason}",
                           "see 'skipped' in the plan for the list", SD_TRAIN))
    # W16: where loracli reads the dataset differently from sd-scripts (mixed-case extensions).
    for note in scan.notes:
        out.append(Finding("warning", "W16", "datasets" if config.datasets else "dataset.train_data_dir", note,
                           "rename the files with a lower-case extension to train the same images with sd-scripts",
                           SD_TRAIN))
    # W17: captions that fall back to the folder's class tokens.
    uncaptioned = [i for s in scan.subsets if not s.is_reg for i in s.images if i.caption_source != "file"]
    if uncaptioned:
        out.append(Finding("warning", "W17", "dataset.caption_extension",
                           f"{len(uncaptioned)} training image(s) have no {config.dataset.caption_extension} "
                           f"caption and use the {'subset' if config.datasets else 'folder'}'s class tokens, e.g. "
                           f"{uncaptioned[0].path.name}",
                           "add caption files or check caption_extension", f"{TRAINING_LOGS}; {OTHER_RENTRY}"))
    # W18: the rest of what the scan noticed (empty folders, unused reg images, other caption extensions).
    for warning in scan.warnings:
        out.append(Finding("warning", "W18", "dataset", warning, source=SD_TRAIN))
    # W10: far from the step counts the guides report working.
    if not 500 <= schedule.total_steps <= 4000:
        out.append(Finding("warning", "W10", "training.max_train_epochs",
                           f"{schedule.total_steps} total steps ({schedule.formula}) is far from the 500-4000 "
                           "the guides find works for a LoRA", "informational", f"{LAZY_DADAPT}; {OTHER_RENTRY}"))
    # Small buckets make small, noisier steps.
    small = [b for b in buckets if b["count"] < tr.train_batch_size]
    if small:
        sizes = ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]} ({b['count']})" for b in small[:5])
        out.append(Finding("warning", "W13", "training.train_batch_size",
                           f"{len(small)} bucket(s) hold fewer images than the batch size {tr.train_batch_size}: "
                           f"{sizes}", "those steps use smaller, noisier batches", SD_BUCKETS))
    # W11: sample prompts.
    prompts_path = config.sample.sample_prompts
    if prompts_path is not None and prompts_path.is_file():
        parsed = read_prompt_file(prompts_path)
        prompts = [p.prompt for p in parsed]
        unknown = [(p.line, o) for p in parsed for o in p.unknown_options]
        if unknown:
            out.append(Finding("warning", "W11", "sample.sample_prompts",
                               f"option {unknown[0][1]} (line {unknown[0][0]}) is not used; loracli reads "
                               "--n --w --h --d --l --s", "remove it", "sd-scripts prompt files"))
        limit = sample_prompt_token_limit(family, config.dataset.max_token_length)
        long = [p for p in prompts if estimate_clip_tokens(_without_weights(p)) > limit]
        if long:
            out.append(Finding("warning", "W11", "sample.sample_prompts",
                               f"{len(long)} prompt(s) longer than the {limit} tokens the sampler reads are cut, "
                               f"e.g. {long[0][:40]!r}...", "shorten them", TRAINING_GUIDE))
        if tr.num_processes > 1 and len(prompts) % tr.num_processes:
            out.append(Finding("warning", "W11", "sample.sample_prompts",
                               f"{len(prompts)} prompts do not divide among {tr.num_processes} processes",
                               f"use a multiple of {tr.num_processes}", TRAINING_GUIDE))
    out += caption_data_findings(config, scan)  # E71, E72, W70
    return out
