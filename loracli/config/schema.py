"""The config schema: every option, its default and its validation, in one place.

Leaf names are sd-scripts' argument names, so values from guides paste
straight in. Sections only group them. Defaults are sd-scripts' defaults except
where loracli deliberately differs (see README, "Differences from sd-scripts"):
`caption_extension` is ".txt" and no step/epoch count is assumed.
Cross-section rules (those that need several values or the dataset) live in
`loracli.lint`; this module checks what a single value can get wrong.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic.fields import FieldInfo

Resolution = Union[int, tuple[int, int]]


def _kinds(annotation: object) -> set[str]:
    """The plain types a field accepts: int | None -> {"int", "NoneType"}; a Literal is "literal"."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {"literal"}
    if origin in (Union, UnionType):
        return set().union(*(_kinds(arg) for arg in get_args(annotation)))
    if origin is not None:
        return {getattr(origin, "__name__", str(origin))}
    return {getattr(annotation, "__name__", str(annotation))}

OptimizerArg = Union[bool, int, float, str, list[Union[bool, int, float, str]]]

Scheduler = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


# Upper bounds keep the plan's own work bounded (a typo like 1e12 must not loop or fill memory).
MAX_SIDE = 16384  # pixels: resolution and bucket limits
MAX_COUNT = 100_000  # epochs, batch sizes, dims and similar counts
MAX_STEPS = 100_000_000
MAX_SEED = 2**32 - 1  # sd-scripts seeds numpy, whose seeds must fit 32 bits


class Section(BaseModel):
    # allow_inf_nan=False: NaN and inf are refused in every float at plan time, not found after the model loads
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _typed_as_written(cls, value: object, info: ValidationInfo) -> object:
        """TOML has numbers and booleans: train_batch_size = "4" or flip_aug = 1 is a slip that pydantic
        would quietly convert; refuse it, naming the type (--set values are read as TOML too)."""
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        wanted = [k for k in ("int", "float", "bool") if k in kinds]
        if not wanted or "str" in kinds or "literal" in kinds:
            return value
        numeric = [k for k in wanted if k != "bool"]
        if isinstance(value, str):
            what = "a number" if numeric else "true or false"
            raise ValueError(f"must be {what}, not a quoted string; write it without quotes")
        if isinstance(value, bool) and "bool" not in kinds:
            raise ValueError("must be a number, not true/false")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not numeric:
            raise ValueError("must be true or false")
        return value


class ModelSection(Section):
    pretrained_model_name_or_path: str = Field(
        description='A diffusers model folder, a single-file SD1.x/2.x/SDXL .safetensors checkpoint, "tiny:sd15" '
        'or "tiny:sdxl" (built-in tiny random models for smoke tests).'
    )
    allow_pickle_checkpoint: bool = Field(
        False, description="Also load .ckpt/.pt single files: they are pickles that can run code; only trusted files."
    )
    sdxl: bool | None = Field(
        None, description="The base model is SDXL (Pony, Illustrious, NoobAI, ...); unset: detected from the model."
    )
    v2: bool = Field(False, description="The base model is SD 2.x.")
    v_parameterization: bool = Field(False, description="Train with v-prediction targets (SD 2.x 768-v).")
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="Use the n-th last text-encoder layer (2 for NAI-derived anime models)."
    )
    no_half_vae: bool = Field(
        False, description="Keep the VAE in fp32 under fp16/bf16 (the stock SDXL VAE makes NaNs in fp16)."
    )


class DatasetSection(Section):
    train_data_dir: Path | None = Field(None, description="Parent folder of the <repeats>_<name> image folders "
                                        "(or describe the data as [[datasets]] with [[datasets.subsets]]).")
    reg_data_dir: Path | None = Field(None, description="Parent folder of regularisation image folders.")
    resolution: Resolution = Field(512, description="Training resolution: 512 or [width, height].")
    enable_bucket: bool = Field(False, description="Aspect-ratio bucketing.")
    min_bucket_reso: int = Field(256, ge=64, le=MAX_SIDE)
    max_bucket_reso: int = Field(1024, ge=64, le=MAX_SIDE)
    bucket_reso_steps: int = Field(64, ge=1, le=1024, description="Bucket size step; a multiple of 64 for SD1.x/2.x.")
    bucket_no_upscale: bool = Field(False, description="Never enlarge images to fill a bucket.")
    caption_extension: str = Field(".txt", description="Caption file extension (sd-scripts defaults to .caption).")
    shuffle_caption: bool = False
    caption_separator: str = Field(",", min_length=1)
    keep_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    keep_tokens_separator: str = ""
    secondary_separator: str | None = Field(None, min_length=1)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout_every_n_epochs: int = Field(0, ge=0, le=MAX_COUNT)
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    token_warmup_min: int = Field(1, ge=1, le=MAX_COUNT)
    token_warmup_step: float = Field(0, ge=0, le=MAX_STEPS)
    enable_wildcard: bool = Field(
        False, description='Wildcard captions: each "{a|b|c}" becomes one option per use, and a caption file\'s '
        "lines are alternatives (one per use); without it only the first line is read, as sd-scripts.")
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = Field(
        False, description="The images' alpha channel masks the loss (transparent = not trained on), with or "
        "without training.masked_loss, as sd-scripts; an image without alpha counts as fully opaque.")
    conditioning_data_dir: Path | None = Field(
        None, description="Folder of mask images, one per training image with the same file name stem and size: "
        "its red channel masks the loss (white = trained on, black = not). Needs training.masked_loss.")
    cache_latents: bool = Field(False, description="Encode images once with the VAE and keep the latents in memory.")
    cache_latents_to_disk: bool = Field(False, description="Also keep latent caches on disk (implies cache_latents).")
    vae_batch_size: int = Field(1, ge=1, le=MAX_COUNT)
    max_token_length: int | None = Field(None, description="75 (default), 150 or 225 tokens.")
    validation_split: float = Field(0.0, ge=0, lt=1, description="Share of each training folder's images held "
                                    "out for the validation loss (0.1 = 10%), as sd-scripts; reg folders are not split.")
    validation_seed: int | None = Field(None, ge=0, le=MAX_SEED,
                                        description="Seed of the split (unset: training.seed, else 0).")

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, v: Resolution) -> Resolution:
        sides = (v, v) if isinstance(v, int) else v
        if min(sides) < 64:
            raise ValueError("resolution must be at least 64 pixels on each side")
        if max(sides) > MAX_SIDE:
            raise ValueError(f"resolution must be at most {MAX_SIDE} pixels on each side")
        return v

    @field_validator("max_token_length")
    @classmethod
    def _token_windows(cls, v: int | None) -> int | None:
        if v is not None and v not in (75, 150, 225):
            raise ValueError("must be 75, 150 or 225 (77-token windows)")
        return v

    @field_validator("caption_extension")
    @classmethod
    def _dotted(cls, v: str) -> str:
        return v if v.startswith(".") else "." + v

    @property
    def resolution_wh(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


# sd-scripts' dataset config: [dataset] is its [general]; [[datasets]] hold dataset-level keys and subset defaults,
# [[datasets.subsets]] the folders. These [dataset] keys are run-wide (not per dataset or subset in loracli).
GENERAL_ONLY_KEYS = ("train_data_dir", "reg_data_dir", "cache_latents", "cache_latents_to_disk", "vae_batch_size",
                     "max_token_length", "validation_split", "validation_seed")
# Keys a dataset sets for its buckets (sd-scripts refuses them in a subset).
DATASET_LEVEL_KEYS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                      "bucket_no_upscale")


def subset_level_keys() -> tuple[str, ...]:
    """Every other [dataset] key is a subset option (captions, augmentations, ...): a subset, its dataset or
    [dataset] sets it, in that order. Derived from DatasetSection, so new dataset options join automatically."""
    return tuple(k for k in DatasetSection.model_fields if k not in GENERAL_ONLY_KEYS + DATASET_LEVEL_KEYS)


def _inherited(names: tuple[str, ...]) -> dict[str, tuple[object, FieldInfo]]:
    """DatasetSection's fields (types, ranges, descriptions) as optional overrides: None inherits."""
    fields: dict[str, tuple[object, FieldInfo]] = {}
    for name in names:
        info = DatasetSection.model_fields[name]
        fields[name] = (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
    return fields


def _resolution_or_none(cls: type, v: Resolution | None) -> Resolution | None:
    return None if v is None else DatasetSection._positive_resolution(v)


def _dotted_or_none(cls: type, v: str | None) -> str | None:
    return None if v is None else DatasetSection._dotted(v)


_SUBSET_ONLY: dict[str, tuple[object, FieldInfo]] = {
    "image_dir": (Path, Field(description="The folder of this subset's images (read directly, no <repeats>_ name).")),
    "is_reg": (bool, Field(False, description="Regularisation images (balanced to the dataset's training images).")),
}
_SUBSET_OR_DATASET: dict[str, tuple[object, FieldInfo]] = {
    "num_repeats": (Optional[int], Field(None, ge=1, le=MAX_COUNT, description="Repeats per epoch (default 1).")),
    "class_tokens": (Optional[str], Field(None, description="Caption of images without a caption file.")),
}

SubsetSection = create_model(  # type: ignore[call-overload]
    "SubsetSection", __base__=Section, __doc__="One [[datasets.subsets]] table: a folder and its options.",
    __validators__={"_dotted": field_validator("caption_extension")(_dotted_or_none)},
    **_SUBSET_ONLY, **_SUBSET_OR_DATASET, **_inherited(subset_level_keys()),
)

DatasetEntry = create_model(  # type: ignore[call-overload]
    "DatasetEntry", __base__=Section, __doc__="One [[datasets]] table: bucket options, batch size, subsets.",
    __validators__={"_resolution": field_validator("resolution")(_resolution_or_none),
                    "_dotted": field_validator("caption_extension")(_dotted_or_none)},
    batch_size=(Optional[int], Field(None, ge=1, le=MAX_COUNT, description="Images per step of this dataset "
                                     "(default training.train_batch_size).")),
    subsets=(list[SubsetSection], Field(min_length=1, description="The dataset's folders.")),
    **_SUBSET_OR_DATASET, **_inherited(DATASET_LEVEL_KEYS), **_inherited(subset_level_keys()),
)


class NetworkSection(Section):
    network_module: Literal["networks.lora", "lycoris.kohya"] = Field(
        "networks.lora",
        description="kohya's module name, recorded in metadata; LyCORIS algos always record lycoris.kohya.",
    )
    algo: Literal["lora", "locon", "loha", "lokr"] = Field("lora", description="LoRA or a LyCORIS algorithm.")
    network_dim: int | None = Field(None, ge=1, le=MAX_COUNT, description="Rank (4 when unset, as sd-scripts).")
    network_alpha: float = Field(1.0, ge=0, description="Alpha; scale = alpha / dim (0 means alpha = dim).")
    conv_dim: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Rank of 3x3 conv layers (LoCon/LoHa/LoKr; with plain LoRA: kohya's "
        "LoRA-C3Lier, conv_alpha 1 unless set).")
    conv_alpha: float | None = Field(None, ge=0)
    lycoris_preset: Literal["full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only",
                            "unet-convblock-only"] = Field(
        "full", description="LyCORIS target preset (LyCORIS algos); 'full' = kohya's targets for the algorithm, "
        "the others LyCORIS' presets of that name (README, 'Network options').")
    network_dropout: float | None = Field(None, ge=0, lt=1)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    use_tucker: bool = False
    use_scalar: bool = False
    train_norm: bool = False
    rank_dropout_scale: bool = False
    factor: int = Field(-1, description="LoKr factor (-1 = automatic).")
    network_weights: Path | None = Field(None, description="Start from the weights of this LoRA file.")
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    scale_weight_norms: float | None = Field(None, gt=0)
    # Block-wise LoRA (sd-scripts' networks.lora network_args; plain LoRA only).
    down_lr_weight: list[float] | str | None = Field(
        None, description="lr multipliers of the UNet's down blocks (shallow to deep), or a shape: cosine, sine, "
        "linear, reverse_linear, zeros, optionally +number.")
    mid_lr_weight: list[float] | None = Field(None, description="lr multipliers of the UNet's middle block(s).")
    up_lr_weight: list[float] | str | None = Field(
        None, description="lr multipliers of the UNet's up blocks (deep to shallow), or a shape as down_lr_weight.")
    block_lr_zero_threshold: float = Field(
        0.0, ge=0, le=MAX_COUNT, description="Blocks whose lr weight is at or below this get no LoRA modules.")
    block_dims: list[int] | None = Field(None, description="Rank per UNet block (25 for SD1/SD2, 23 for SDXL); "
                                         "0 = no modules in that block.")
    block_alphas: list[float] | None = Field(None, description="Alpha per UNet block (as block_dims).")
    conv_block_dims: list[int] | None = Field(None, description="Rank of the 3x3 convs per UNet block.")
    conv_block_alphas: list[float] | None = Field(None, description="Alpha of the 3x3 convs per UNet block.")
    # LoRA+: the lr of the up (B) matrices is multiplied by the ratio.
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=MAX_COUNT, description="LoRA+ ratio (16 in the paper).")
    loraplus_unet_lr_ratio: float | None = Field(None, gt=0, le=MAX_COUNT)
    loraplus_text_encoder_lr_ratio: float | None = Field(None, gt=0, le=MAX_COUNT)
    dora_wd: bool = Field(False, description="DoRA: weight-decomposed LoCon/LoHa/LoKr (LyCORIS' dora_wd).")

    @field_validator("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas",
                     "conv_block_dims", "conv_block_alphas", mode="before")
    @classmethod
    def _numbers_only(cls, v: object, info: ValidationInfo) -> object:
        if info.field_name == "mid_lr_weight" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return [v]  # SD1/SD2 have one middle block: a number is its weight (sd-scripts reads "0.5" so)
        if isinstance(v, list) and any(isinstance(x, (bool, str)) for x in v):
            raise ValueError("must be a list of numbers (no quotes, no true/false)")
        return v

    @field_validator("down_lr_weight", "up_lr_weight")
    @classmethod
    def _lr_weight_shape(cls, v: list[float] | str | None) -> list[float] | str | None:
        if isinstance(v, str):
            from loracli.network_blocks import parse_shape

            parse_shape(v)  # ValueError names the shapes
        return v

    @field_validator("block_dims", "conv_block_dims")
    @classmethod
    def _block_dims_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= d <= MAX_COUNT for d in v):
            raise ValueError(f"each rank must be between 0 and {MAX_COUNT}")
        return v

    @field_validator("block_alphas", "conv_block_alphas")
    @classmethod
    def _block_alphas_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(a < 0 for a in v):
            raise ValueError("each alpha must be >= 0")
        return v

    @property
    def module_name(self) -> str:
        """What ss_network_module records: kohya's networks.lora only knows plain LoRA."""
        return self.network_module if self.algo == "lora" else "lycoris.kohya"

    @property
    def dim(self) -> int:
        return self.network_dim or 4

    @property
    def alpha(self) -> float:
        return self.network_alpha or float(self.dim)


class OptimizerSection(Section):
    optimizer_type: str = Field("AdamW", description="AdamW, AdamW8bit, DAdaptAdam, Prodigy, ..., or module.Class.")
    learning_rate: float = Field(2e-6, ge=0, description="Default lr for both groups (sd-scripts default 2e-6).")
    unet_lr: float | None = Field(None, ge=0)
    text_encoder_lr: float | list[float] | None = Field(
        None, description="lr of the text encoder(s): one value, or one per encoder for SDXL ([te1, te2])."
    )
    optimizer_args: dict[str, OptimizerArg] = Field(
        default_factory=dict, description="Keyword arguments of the optimizer, as typed TOML values."
    )
    lr_scheduler: Scheduler = "constant"
    lr_warmup_steps: int | float = Field(0, ge=0, le=MAX_STEPS,
                                         description="An int counts steps; a float below 1 is a ratio.")
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=MAX_COUNT)
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")

    @field_validator("text_encoder_lr")
    @classmethod
    def _te_lrs(cls, v: float | list[float] | None) -> float | list[float] | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not 1 <= len(v) <= 2:
            raise ValueError("give one value, or two for SDXL's two text encoders")
        if any(x < 0 for x in values):
            raise ValueError("must be >= 0")
        return v

    def text_encoder_lr_for(self, index: int) -> float | None:
        """The lr of text encoder `index` (0-based): a single value serves every encoder (sd-scripts)."""
        v = self.text_encoder_lr
        if isinstance(v, list):
            return v[index] if index < len(v) else v[0]
        return v

    @field_validator("lr_warmup_steps")
    @classmethod
    def _warmup_form(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            raise ValueError(
                f"{v} is a float >= 1; write an integer to count steps (e.g. {int(v)}) or a ratio below 1 (e.g. 0.1)"
            )
        return v


class TrainingSection(Section):
    train_batch_size: Union[Annotated[int, Field(ge=1, le=MAX_COUNT)], Literal["auto"]] = Field(
        1, description='Images per step; "auto": the largest that fits training.vram_gb (or the GPU), keeping '
        "the effective batch gradient_accumulation_steps when that is above 1.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_COUNT)
    max_train_epochs: int | None = Field(None, ge=1, le=MAX_COUNT,
                                         description="Wins over max_train_steps, as in sd-scripts.")
    max_train_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    num_processes: int = Field(1, ge=1, le=1024,
                               description="Processes (GPUs); more than 1 runs through accelerate launch.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when unset (recorded in the run folder).")
    gradient_checkpointing: bool = False
    xformers: bool = Field(False, description="Use xformers attention (CUDA only; SDPA is the default).")
    noise_offset: float | None = Field(None, ge=0)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = Field(None, ge=1, le=64)
    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    ip_noise_gamma: float | None = Field(
        None, ge=0, le=10, description="Input perturbation: extra noise of this strength on the noised latents (0.1).")
    ip_noise_gamma_random_strength: bool = Field(False, description="Scale ip_noise_gamma by a U(0,1) draw per batch.")
    debiased_estimation_loss: bool = Field(False, description="Weight the loss by 1/sqrt(SNR) (v-pred: 1/(SNR+1)).")
    scale_v_pred_loss_like_noise_pred: bool = Field(
        False, description="v-prediction: scale the loss by SNR/(SNR+1), like a noise-prediction loss.")
    v_pred_like_loss: float | None = Field(
        None, ge=0, le=10, description="Add this much of a v-prediction-like loss (loss·(SNR+1)/SNR).")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule so the last step is pure noise.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2", description="l2 (MSE), l1, or pseudo-Huber (huber, smooth_l1) with huber_schedule/huber_c.")
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    huber_c: float = Field(0.1, gt=0, le=1, description="Huber threshold (its value at the last step, or floor).")
    huber_scale: float = Field(1.0, gt=0, le=100, description="Scales huber_c (constant, exponential schedules).")
    min_timestep: int | None = Field(None, ge=0, le=1000)
    max_timestep: int | None = Field(None, ge=1, le=1000)
    prior_loss_weight: float = Field(1.0, ge=0)
    masked_loss: bool = Field(
        False, description="Multiply the loss by a mask: the mask images of dataset.conditioning_data_dir "
        "(dataset.alpha_mask masks the loss by itself), as sd-scripts' --masked_loss.")
    weighted_captions: bool = Field(
        False, description='Read "(word:1.2)", "(word)", "[word]" in captions as token weights (sd-scripts\' '
        "--weighted_captions); no commas inside the brackets, or shuffle and tag dropout split them.")
    cache_text_encoder_outputs: bool = Field(
        False, description="Encode each caption once (needs a frozen text encoder and fixed captions)."
    )
    cache_text_encoder_outputs_to_disk: bool = Field(
        False, description="Also keep the text-encoder outputs on disk (implies cache_text_encoder_outputs)."
    )
    full_bf16: bool = Field(
        False, description='The network, its gradients and the optimizer state in bf16 (needs mixed_precision = '
        '"bf16"), as sd-scripts\' --full_bf16: half their memory, less precise updates.')
    full_fp16: bool = Field(
        False, description='The network, its gradients and the optimizer state in fp16 (needs mixed_precision = '
        '"fp16"), as sd-scripts\' --full_fp16; the gradient scaler unscales fp16 gradients. On a CPU (no fp16 '
        "there) it falls back to fp32 with the mixed precision.")
    fp8_base: bool = Field(
        False, description="Store the frozen UNet and text-encoder Linear/Conv weights as float8_e4m3fn and compute "
        'in the mixed-precision dtype (needs mixed_precision "bf16" or "fp16"), as sd-scripts\' --fp8_base.')
    fp8_base_unet: bool = Field(
        False, description="fp8_base for the UNet only; the text encoders stay in the mixed-precision dtype "
        "(sd-scripts' --fp8_base_unet).")
    torch_compile: bool = Field(
        False, description="torch.compile the UNet (sd-scripts' --torch_compile): the first steps compile (slow), "
        "later ones run faster; each new bucket shape compiles again.")
    dynamo_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = Field(
        "inductor", description="The torch.compile backend with torch_compile (sd-scripts' --dynamo_backend).")
    vram_gb: float | None = Field(
        None, gt=0, le=4096, description="GPU memory to plan for (GiB): `loracli plan` warns when its estimate "
        'is above it, and train_batch_size = "auto" fills it. Unset: the detected GPU\'s memory.')

    @field_validator("train_batch_size", mode="before")
    @classmethod
    def _batch_number_or_auto(cls, v: object) -> object:
        if (isinstance(v, str) and v != "auto") or isinstance(v, bool):
            raise ValueError('must be a number or "auto"')
        return v
    validate_every_n_steps: int | None = Field(None, ge=1, description="Validation loss every n steps too.")
    validate_every_n_epochs: int | None = Field(
        None, ge=1, description="Validation loss every n epochs (unset: every epoch, with a validation_split).")
    max_validation_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                             description="At most this many validation batches per round.")


class OutputSection(Section):
    output_dir: Path = Field(Path("output"), description="Where run folders are created.")
    output_name: str | None = Field(None, max_length=200, description="File name stem of saved LoRAs.")
    save_model_as: Literal["safetensors"] = "safetensors"
    save_precision: Literal["float", "fp16", "bf16"] | None = None
    save_every_n_epochs: int | None = Field(None, ge=1)
    save_every_n_steps: int | None = Field(None, ge=1)
    save_last_n_epochs: int | None = Field(None, ge=1)
    save_last_n_steps: int | None = Field(None, ge=1)
    save_state_every_n_steps: int | None = Field(
        None, ge=1, description="Save the full training state (for --resume) every n steps; also on Ctrl-C."
    )
    save_last_n_states: int = Field(2, ge=1, le=MAX_COUNT, description="How many training states to keep.")
    training_comment: str | None = None
    no_metadata: bool = False

    @field_validator("output_name")
    @classmethod
    def _file_stem(cls, v: str | None) -> str | None:
        """A file stem: every file loracli writes stays inside the run folder."""
        if v is None:
            return v
        if "/" in v or "\\" in v or v in (".", "..") or ".." in v.split("."):
            raise ValueError("must be a file name stem: no / or \\, no '..'")
        if any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        return v


Sampler = Literal["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                  "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]


class SampleSection(Section):
    sample_prompts: Path | None = Field(
        None, description="A .txt prompt file: one prompt per line, options --n --w --h --d --l --s.")
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    sample_at_first: bool = False
    sample_sampler: Sampler = Field("ddim", description="sd-scripts' sampler name (k_ names are aliases).")


class LoggingSection(Section):
    logging_dir: Path | None = Field(None, description="TensorBoard logs (and wandb's files) go here when set.")
    log_prefix: str | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = Field(
        None, description='Trackers: tensorboard (needs logging_dir), wandb (pip install "loracli[wandb]"; '
        "WANDB_MODE=offline honoured) or all; unset: tensorboard when logging_dir is set.")
    log_tracker_name: str | None = Field(None, description='Project name in the trackers (default "loracli").')
    wandb_run_name: str | None = Field(None, description="The wandb run's name (default: the run folder's name).")


class LoracliConfig(Section):
    model: ModelSection
    dataset: DatasetSection = Field(default_factory=DatasetSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    datasets: list[DatasetEntry] = Field(  # type: ignore[valid-type]
        default_factory=list, description="sd-scripts' [[datasets]] / [[datasets.subsets]] (instead of "
        "dataset.train_data_dir): several folders, each with its own repeats and options.")


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in LoracliConfig.model_fields.items() if name != "datasets"  # an array of tables, not a section
}


def all_keys() -> dict[str, list[str]]:
    """Valid leaf keys per section (for 'did you mean' hints and docs)."""
    return {name: list(model.model_fields) for name, model in SECTIONS.items()}
