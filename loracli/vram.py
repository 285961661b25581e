"""Peak GPU memory of a run, estimated at plan time: no torch, no weights loaded.

What a LoRA step keeps on the device, term by term:
- frozen weights: every parameter of the UNet and of the text encoders (unless their outputs
  are cached) in the training dtype (1 byte with fp8_base/fp8_base_unet, the text encoders'
  token embeddings excepted), the VAE too when latents are not cached; the counts come
  from the safetensors headers (exact), the dtype from mixed_precision;
- the network (fp32, or the half type with full_fp16/full_bf16), its gradients and the
  optimizer state: AdamW 2 moments, 8-bit optimizers 2 bytes per moment, Prodigy 4 buffers,
  D-Adaptation Adam 3, Lion/SGD 1, Adafactor about one;
- activations saved for backward at the largest bucket and the batch size: a count per
  ResNet block and per transformer block from the UNet's config (channels × latent area at
  each level), fitted against the live-bytes tracker on real CPU steps (tests hold them to it);
  with gradient checkpointing only the block inputs stay, plus one block recomputed; attention
  matrices only with the math kernel (SDPA's flash/memory-efficient kernels and xformers keep
  one row statistic instead);
- the text encoders' activations when they train.
The largest of the training step and the latent-caching pass (VAE encoding) is the peak.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracli.safetensors_header import DTYPE_BYTES, read_header

GIB = 2**30
RUN_ASSETS = Path(__file__).parent / "run" / "assets"

# Saved-for-backward elements per (channels × area), fitted against LiveBytes on real steps.
RESNET_SAVED = 4.5  # per ResnetBlock2D, times (in + out channels) × area
TRANSFORMER_SAVED = 26.0  # per BasicTransformerBlock (norms, q/k/v, attention out, GEGLU 4C), × C × area
SPATIAL_SAVED = 3.5  # per Transformer2DModel: norm, proj_in, proj_out around the blocks
TEXT_LAYER_SAVED = 16.0  # per CLIP layer, × hidden × tokens, when the text encoder trains
HALF_ACTIVATION_FACTOR = 0.5  # bf16/fp16 autocast: saved activations in the half type (measured: 0.50 of fp32)
CLIP_VOCAB = 49_408  # token embedding rows of every SD text encoder (kept out of fp8)
CHECKPOINT_OVERHEAD = 1.8  # with checkpointing: block inputs kept, plus a recomputed block's worth

# optimizer state in bytes per trained parameter (fp32 parameters)
OPTIMIZER_STATE = {
    "adamw": 8.0, "adamw8bit": 2.0, "pagedadamw8bit": 2.0, "pagedadamw": 8.0, "pagedadamw32bit": 8.0,
    "lion": 4.0, "lion8bit": 1.0, "pagedlion8bit": 1.0, "sgdnesterov": 4.0, "sgdnesterov8bit": 1.0,
    "dadaptation": 12.0, "dadaptadampreprint": 12.0, "dadaptadam": 12.0, "dadaptadagrad": 8.0,
    "dadaptadan": 16.0, "dadaptadanip": 16.0, "dadaptlion": 8.0, "dadaptsgd": 8.0, "prodigy": 16.0,
    "adafactor": 4.0,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
}


@dataclass
class ModelCounts:
    """What the estimate needs to know about a base model."""

    unet_config: dict[str, Any]
    params: dict[str, int]  # component -> parameter count ("unet", "text_encoder", "text_encoder_2", "vae")
    unet_targets: list[tuple[int, int, int]] = field(default_factory=list)  # (in, out, kernel) per LoRA module
    unet_conv_targets: list[tuple[int, int, int]] = field(default_factory=list)  # ResNet/sampler modules
    text_targets: list[tuple[int, int, int]] = field(default_factory=list)
    text_layers: list[tuple[int, int]] = field(default_factory=list)  # (layers, hidden) per encoder
    vae_width: int = 128  # the VAE encoder's first (widest-map) channel count


@dataclass
class VramEstimate:
    parts: dict[str, int]  # name -> bytes, in the order shown
    total: int
    caching_peak: int  # the latent-caching pass (0 when latents are not cached)
    batch_size: int
    bucket: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "total": self.total, "total_gib": round(self.total_gib, 3),
                "caching_peak": self.caching_peak, "batch_size": self.batch_size, "bucket": list(self.bucket),
                "notes": self.notes}


# --- reading the model ----------------------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / f for f in files]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update({name: t.shape for name, t in read_header(f).tensors.items()})
    return shapes


def _linear_or_1x1(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(shape) == 2:
        return shape[1], shape[0], 1
    if len(shape) == 4 and shape[2:] == (1, 1):
        return shape[1], shape[0], 1
    return None


def unet_lora_targets(shapes: dict[str, tuple[int, ...]]) -> tuple[list, list]:
    """(in, out, kernel) of kohya's plain-LoRA targets (Linear/1x1 inside transformer blocks) and of the extra
    ResNet/sampler modules LoCon/conv_dim adds; diffusers or LDM key names."""
    attn, conv = [], []
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        spatial = ".transformer_blocks." in module or module.endswith((".proj_in", ".proj_out"))
        lin = _linear_or_1x1(shape)
        if spatial and lin and "norm" not in module.rsplit(".", 1)[-1]:
            attn.append(lin)
        elif not spatial and (".resnets." in module or "samplers." in module or ".in_layers." in module
                              or ".out_layers." in module or ".op" in module or "emb_layers" in module
                              or "skip_connection" in module or "conv_shortcut" in module):
            if len(shape) == 4:
                conv.append((shape[1], shape[0], shape[2]))
            elif lin and "norm" not in module:
                conv.append(lin)
    return attn, conv


def text_lora_targets(shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, int, int]]:
    out = []
    for name, shape in shapes.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "attn.out_proj.weight",
                          "mlp.c_fc.weight", "mlp.c_proj.weight")) and len(shape) == 2:
            out.append((shape[1], shape[0], 1))
        elif name.endswith("attn.in_proj_weight") and len(shape) == 2:  # OpenCLIP's fused q/k/v
            out += [(shape[1], shape[0] // 3, 1)] * 3
    return out


def _text_layers(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    layers = {n.split("layers.")[1].split(".")[0] for n in shapes if ".layers." in n}
    layers |= {n.split("resblocks.")[1].split(".")[0] for n in shapes if ".resblocks." in n}
    hidden = next((s[0] for n, s in shapes.items() if n.endswith(("final_layer_norm.weight", "ln_final.weight"))), 0)
    return len(layers), hidden


def counts_from_folder(folder: Path) -> ModelCounts | None:
    unet_dir = folder / "unet"
    if not (unet_dir / "config.json").is_file():
        return None
    params: dict[str, int] = {}
    shapes_by: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        files = _weight_files(folder / component)
        if not files:
            if (folder / component).is_dir():
                return None  # .bin weights: not readable without unpickling
            continue
        shapes_by[component] = _shapes(files)
        params[component] = sum(math.prod(s) for s in shapes_by[component].values())
    attn, conv = unet_lora_targets(shapes_by["unet"])
    text = [t for c in ("text_encoder", "text_encoder_2") if c in shapes_by for t in text_lora_targets(shapes_by[c])]
    layers = [_text_layers(shapes_by[c]) for c in ("text_encoder", "text_encoder_2") if c in shapes_by]
    vae_config = folder / "vae" / "config.json"
    vae_width = json.loads(vae_config.read_text())["block_out_channels"][0] if vae_config.is_file() else 128
    return ModelCounts(json.loads((unet_dir / "config.json").read_text()), params, attn, conv, text, layers,
                       vae_width)


SINGLE_PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
                   "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
                   "text_encoder_2": ("conditioner.embedders.1.",)}


def counts_from_single_file(path: Path, family: str) -> ModelCounts:
    header = read_header(path)
    shapes_by: dict[str, dict[str, tuple[int, ...]]] = {c: {} for c in SINGLE_PREFIXES}
    for name, t in header.tensors.items():
        for component, prefixes in SINGLE_PREFIXES.items():
            if name.startswith(prefixes):
                shapes_by[component][name] = t.shape
    params = {c: sum(math.prod(s) for s in v.values()) for c, v in shapes_by.items() if v}
    attn, conv = unet_lora_targets(shapes_by["unet"])
    text = [t for c in ("text_encoder", "text_encoder_2") for t in text_lora_targets(shapes_by[c])]
    layers = [_text_layers(shapes_by[c]) for c in ("text_encoder", "text_encoder_2") if shapes_by[c]]
    if family == "sdxl":
        config = dict(SDXL_UNET)
    else:
        config = json.loads((RUN_ASSETS / ("sd2_unet.json" if family == "sd2" else "sd1_unet.json")).read_text())
    return ModelCounts(config, params, attn, conv, text, layers)


# --- the estimate ---------------------------------------------------------------------------------------

def _per_level(value: Any, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_activation_elements(config: dict[str, Any], latent_hw: tuple[int, int], checkpointing: bool,
                             math_attention: bool, context_tokens: int = 77) -> float:
    """Saved-for-backward elements of one sample through the UNet."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = config.get("layers_per_block", 2)
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels)
    heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads_cfg, levels)
    h, w = latent_hw
    blocks: list[float] = []  # saved elements per checkpointed block
    inputs: list[float] = []  # the input each checkpointed block keeps

    def resnet(cin: int, cout: int, area: float) -> None:
        blocks.append(RESNET_SAVED * (cin + cout) * area)
        inputs.append(cin * area)

    def spatial(c: int, area: float, n: int, level: int) -> None:
        blocks.append(SPATIAL_SAVED * c * area)
        for _ in range(n):
            attention = heads[level] * area * (area + context_tokens) * (2 if math_attention else 0)
            blocks.append(TRANSFORMER_SAVED * c * area + attention)
            inputs.append(c * area)

    skips = [channels[0]]
    prev = channels[0]
    for i, kind in enumerate(config["down_block_types"]):
        area = (h >> i) * (w >> i) if i else h * w
        area = h * w / 4**i
        for _ in range(layers):
            resnet(prev, channels[i], area)
            prev = channels[i]
            if "CrossAttn" in kind:
                spatial(channels[i], area, depth[i], i)
            skips.append(prev)
        if i < levels - 1:
            blocks.append(channels[i] * area)
            skips.append(prev)
    mid_area = h * w / 4 ** (levels - 1)
    resnet(prev, prev, mid_area)
    spatial(prev, mid_area, depth[-1], levels - 1)
    resnet(prev, prev, mid_area)
    rev = list(reversed(channels))
    rev_depth = list(reversed(depth))
    for j, kind in enumerate(config["up_block_types"]):
        level = levels - 1 - j
        area = h * w / 4**level
        for _ in range(layers + 1):
            resnet(prev + skips.pop(), rev[j], area)
            prev = rev[j]
            if "CrossAttn" in kind:
                spatial(prev, area, rev_depth[j], level)
        if j < levels - 1:
            blocks.append(prev * area * 4 * 2)  # upsampled map and its conv input
    if not checkpointing:
        return sum(blocks)
    return (sum(inputs) + max(blocks)) * CHECKPOINT_OVERHEAD


def lora_params(targets: list[tuple[int, int, int]], dim: int, algo: str) -> int:
    """Trained parameters of the network on these modules (LoHa/LoKr: LoHa doubles LoRA's pair)."""
    per = sum(dim * (cin * k * k + cout) + 1 for cin, cout, k in targets)
    return per * 2 if algo == "loha" else per


def estimate(counts: ModelCounts, *, batch_size: int, bucket: tuple[int, int], mixed_precision: str,
             gradient_checkpointing: bool, cache_latents: bool, cache_text_encoder_outputs: bool,
             train_unet: bool, train_text_encoder: bool, algo: str, dim: int, conv_dim: int | None,
             optimizer_type: str, vae_batch_size: int = 1, no_half_vae: bool = False,
             network_half: bool = False, fp8_base: bool = False, fp8_text_encoder: bool = False,
             math_attention: bool = False) -> VramEstimate:
    half = mixed_precision in ("fp16", "bf16")
    wbytes = 2 if half else 4
    notes: list[str] = []
    parts: dict[str, int] = {}
    unet_bytes = counts.params.get("unet", 0) * (1 if fp8_base else wbytes)
    parts["UNet weights"] = unet_bytes
    te_params = counts.params.get("text_encoder", 0) + counts.params.get("text_encoder_2", 0)
    if not cache_text_encoder_outputs or train_text_encoder:
        # fp8: the Linear weights take 1 byte; the token embeddings (CLIP's vocabulary) stay in the compute dtype
        embeddings = sum(CLIP_VOCAB * hidden for _, hidden in counts.text_layers) if fp8_text_encoder else 0
        parts["text encoder weights"] = (te_params - embeddings) * (1 if fp8_text_encoder else wbytes) \
            + embeddings * wbytes
    vae_bytes = counts.params.get("vae", 0) * (4 if (mixed_precision == "fp16" or no_half_vae or not half) else 2)
    if not cache_latents:
        parts["VAE weights"] = vae_bytes

    trained = 0
    if train_unet:
        trained += lora_params(counts.unet_targets, dim, algo)
        if conv_dim or algo in ("locon", "loha", "lokr"):
            trained += lora_params(counts.unet_conv_targets, conv_dim or dim, algo)
    if train_text_encoder:
        trained += lora_params(counts.text_targets, dim, algo)
    pbytes = 2 if network_half else 4
    parts["network"] = trained * pbytes
    parts["gradients"] = trained * pbytes
    state = OPTIMIZER_STATE.get(optimizer_type.lower())
    if state is None:
        state = 8.0
        notes.append(f"optimizer state of {optimizer_type} assumed to be AdamW's (2 moments)")
    parts["optimizer state"] = int(trained * state * (pbytes / 4))

    if algo in ("locon", "loha", "lokr"):
        # LyCORIS rebuilds each targeted weight (W + ΔW) every forward and autograd keeps it for backward
        rebuilt = (counts.unet_targets + counts.unet_conv_targets) if train_unet else []
        rebuilt = rebuilt + (counts.text_targets if train_text_encoder else [])
        parts["rebuilt weights (LyCORIS)"] = sum(cin * cout * k * k for cin, cout, k in rebuilt) * wbytes
    lat = (bucket[1] // 8, bucket[0] // 8)
    act_factor = HALF_ACTIVATION_FACTOR if half else 1.0
    per_sample = unet_activation_elements(counts.unet_config, lat, gradient_checkpointing, math_attention)
    if not train_unet and not train_text_encoder:
        per_sample = 0
    parts["UNet activations"] = int(per_sample * batch_size * 4 * act_factor)
    if train_text_encoder:
        text = sum(TEXT_LAYER_SAVED * n * hidden * 77 for n, hidden in counts.text_layers)
        parts["text encoder activations"] = int(text * batch_size * 4 * act_factor)
    if not cache_latents:
        pixels = bucket[0] * bucket[1]
        parts["VAE encoding"] = int(vae_encode_elements(pixels, counts.vae_width) * batch_size * (4 if vae_bytes and not half else 2))
    total = sum(parts.values())

    caching = 0
    if cache_latents:
        # the caching pass: the text encoders and the VAE on the device (the UNet comes after), the VAE
        # encoding vae_batch_size images, no training state
        caching = parts.get("text encoder weights", te_params * wbytes) + vae_bytes + int(
            vae_encode_elements(bucket[0] * bucket[1], counts.vae_width) * vae_batch_size * (2 if half and not no_half_vae else 4))
        if caching > total:
            notes.append("the peak is the latent-caching pass (VAE encoding), not the training step")
    return VramEstimate(parts, max(total, caching), caching, batch_size, bucket, notes)


def vae_encode_elements(pixels: int, width: int) -> float:
    """Live elements at the VAE encoder's widest point (no grad): about three maps of its first width
    at full resolution."""
    return 3 * width * pixels


def auto_batch_size(fits, limit: int = 64) -> tuple[int, list[str]]:
    """The largest batch (1..limit) for which fits(batch) holds; why, in words."""
    best = 0
    for b in range(1, limit + 1):
        if fits(b):
            best = b
        else:
            break
    return best, []


def detected_gpu_gib() -> float | None:
    """The first GPU's memory from nvidia-smi (no torch), or None."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return float(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# --- the plan's side ------------------------------------------------------------------------------------

AUTO_BATCH_LIMIT = 64


def model_counts(path: str, kind: str, family: str) -> ModelCounts | None:
    """The counts for the plan's model, or None when its weights cannot be read without loading them
    (pickles, .bin folders, a tiny model not built yet)."""
    try:
        if kind == "tiny" or path.startswith("tiny:"):
            from loracli.run.tiny_model import TINY_MODELS, cache_root  # stdlib only at import

            folder = cache_root() / TINY_MODELS.get(path, "")
            return counts_from_folder(folder) if (folder / "model_index.json").is_file() else None
        p = Path(path)
        if p.is_dir():
            return counts_from_folder(p)
        if p.is_file() and p.suffix == ".safetensors":
            return counts_from_single_file(p, family)
    except (OSError, ValueError, KeyError):
        return None
    except Exception as exc:  # noqa: BLE001 - a DatasetError from a damaged header: the probe reports those
        if type(exc).__name__ in ("DatasetError", "ConfigError"):
            return None
        raise
    return None


def largest_bucket(buckets: list[tuple[int, int]]) -> tuple[int, int]:
    return max(buckets, key=lambda b: (b[0] * b[1], b))


def estimate_for_config(config, counts: ModelCounts, bucket: tuple[int, int], batch_size: int,
                        text_encoders: int) -> VramEstimate:
    """The estimate for a loracli config (schema object) at a batch size."""
    from loracli.lint import trains_text_encoder

    net, tr, ds = config.network, config.training, config.dataset
    return estimate(
        counts, batch_size=batch_size, bucket=bucket, mixed_precision=tr.mixed_precision,
        gradient_checkpointing=tr.gradient_checkpointing,
        cache_latents=ds.cache_latents or ds.cache_latents_to_disk,
        cache_text_encoder_outputs=tr.cache_text_encoder_outputs or tr.cache_text_encoder_outputs_to_disk,
        train_unet=not net.network_train_text_encoder_only,
        train_text_encoder=trains_text_encoder(config, text_encoders), algo=net.algo, dim=net.dim,
        conv_dim=net.conv_dim, optimizer_type=config.optimizer.optimizer_type, vae_batch_size=ds.vae_batch_size,
        no_half_vae=config.model.no_half_vae, network_half=tr.full_bf16 or tr.full_fp16,
        fp8_base=tr.fp8_base or tr.fp8_base_unet, fp8_text_encoder=tr.fp8_base and not tr.fp8_base_unet,
    )


def choose_batch_size(estimate_at, limit_bytes: int, target_effective: int, cap: int) -> tuple[int, int, list[str]]:
    """(batch, gradient accumulation, why) for train_batch_size = "auto".

    With gradient_accumulation_steps G > 1 the effective batch G is kept: the largest divisor of G that fits,
    accumulating G / batch. With G = 1, the largest batch that fits, up to `cap` (the largest bucket's samples)."""
    candidates = [b for b in range(1, target_effective + 1) if target_effective % b == 0] \
        if target_effective > 1 else list(range(1, max(1, min(cap, AUTO_BATCH_LIMIT)) + 1))
    chosen, why = 1, []
    for b in candidates:
        if estimate_at(b).total <= limit_bytes:
            chosen = b
        else:
            why.append(f"batch {b} would need {fmt_bytes(estimate_at(b).total)}")
            break
    if estimate_at(chosen).total > limit_bytes:
        why.insert(0, "even batch 1 exceeds the limit")
    elif chosen == candidates[-1] and target_effective == 1:
        why.append(f"the largest bucket holds {cap} sample(s)" if cap <= AUTO_BATCH_LIMIT
                   else f"the auto batch stops at {AUTO_BATCH_LIMIT}")
    elif chosen == candidates[-1]:
        why.append(f"the whole effective batch {target_effective} fits at once")
    return chosen, max(1, target_effective // chosen), why


@dataclass
class PlanMemory:
    summary: dict[str, Any]  # what plan.json records (empty when there is no estimate)
    findings: list  # lint Findings (a warning when the estimate exceeds the memory)


def plan_memory(resolved, probe_path: str, probe_kind: str, family, buckets: list[tuple[int, int]],
                samples_per_bucket: int, dataset_peaks: list[tuple[list[tuple[int, int]], int | None]] | None = None):
    """The estimate for the plan, and train_batch_size = "auto" resolved (resolved.config is updated, as
    settle_seed does for the seed, so the run folder records the number). Returns (config, PlanMemory)."""
    from loracli.errors import ConfigError, Problem
    from loracli.lint import Finding

    config = resolved.config
    tr = config.training
    counts = model_counts(probe_path, probe_kind, family.name) if buckets else None
    limit_gib = tr.vram_gb
    limit_from = "training.vram_gb"
    if limit_gib is None:
        limit_gib = detected_gpu_gib()
        limit_from = "the detected GPU"
    auto = tr.train_batch_size == "auto"
    if auto and counts is None:
        why = ("the built-in tiny model is built on its first run (run once with a number)"
               if probe_kind == "tiny" else "its weights cannot be read without loading them (a pickle or .bin)")
        raise ConfigError(Problem("training.train_batch_size", f'"auto" needs the model\'s size, but {why}',
                                  "set train_batch_size to a number"))
    if auto and limit_gib is None:
        raise ConfigError(Problem("training.train_batch_size", '"auto" needs the GPU memory to fill',
                                  "set training.vram_gb (GiB), or run where nvidia-smi sees the GPU"))
    if counts is None:
        return config, PlanMemory({}, [])
    bucket = largest_bucket(buckets)
    n_te = len(family.text_encoder_prefixes)

    def at(batch: int) -> VramEstimate:
        return estimate_for_config(config, counts, bucket, batch, n_te)

    notes: list[str] = []
    if auto:
        limit = int(limit_gib * GIB)
        batch, accum, why = choose_batch_size(at, limit, tr.gradient_accumulation_steps, samples_per_bucket)
        reason = (f'train_batch_size "auto" → {batch}: estimated {fmt_bytes(at(batch).total)} of '
                  f"{limit_gib:g} GiB ({limit_from})")
        if why:
            reason += "; " + "; ".join(why)
        if accum != tr.gradient_accumulation_steps:
            reason += (f"; gradient_accumulation_steps {tr.gradient_accumulation_steps} → {accum} keeps the "
                       f"effective batch {batch * accum}")
        notes.append(reason)
        training = tr.model_copy(update={"train_batch_size": batch, "gradient_accumulation_steps": accum})
        config = config.model_copy(update={"training": training})
        resolved.config = config
        resolved.origins["training.train_batch_size"] = 'chosen by "auto"'
        if accum != tr.gradient_accumulation_steps:
            resolved.origins["training.gradient_accumulation_steps"] = 'chosen by train_batch_size "auto"'
    # [[datasets]]: each dataset's largest bucket at its own batch_size (None: train_batch_size); the peak is the
    # largest of those
    est = max((estimate_for_config(config, counts, largest_bucket(sizes), config.training.train_batch_size
                                   if batch is None else batch, n_te) for sizes, batch in dataset_peaks if sizes)
              if dataset_peaks else [estimate_for_config(config, counts, bucket, config.training.train_batch_size,
                                                         n_te)], key=lambda e: e.total)
    findings = []
    if limit_gib is not None and est.total > limit_gib * GIB:
        tips = "lower train_batch_size, turn on gradient_checkpointing, cache_latents, or bf16 mixed precision"
        findings.append(Finding("warning", "W30", "training.vram_gb" if tr.vram_gb else "training.train_batch_size",
                                f"the estimated peak GPU memory {fmt_bytes(est.total)} is above the "
                                f"{limit_gib:g} GiB of {limit_from}", tips))
    summary = est.to_dict()
    summary.update(limit_gib=limit_gib, limit_from=limit_from if limit_gib is not None else None,
                   notes=est.notes + notes, gradient_checkpointing=config.training.gradient_checkpointing,
                   mixed_precision=config.training.mixed_precision)
    return config, PlanMemory(summary, findings)


def vram_lines(summary: dict[str, Any]) -> list[str]:
    """How the plan shows the estimate: the total, the parts, and what it assumed."""
    if not summary:
        return []
    w, h = summary["bucket"]
    limit = summary.get("limit_gib")
    fits = ""
    if limit is not None:
        fits = (f" (fits the {limit:g} GiB of {summary['limit_from']})" if summary["total_gib"] <= limit
                else f" (ABOVE the {limit:g} GiB of {summary['limit_from']})")
    lines = [f"estimated peak GPU memory: {fmt_bytes(summary['total'])}{fits}, at batch {summary['batch_size']}, "
             f"bucket {w}x{h}, {summary.get('mixed_precision', 'no')} mixed precision, gradient checkpointing "
             f"{'on' if summary.get('gradient_checkpointing') else 'off'}"]
    lines.append("  " + ", ".join(f"{name} {fmt_bytes(n)}" for name, n in summary["parts"].items() if n))
    if summary.get("caching_peak"):
        lines.append(f"  latent caching pass: {fmt_bytes(summary['caching_peak'])}")
    lines += [f"  {note}" for note in summary.get("notes", [])]
    return lines


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
