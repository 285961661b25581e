"""Load an SD1.x/SD2.x/SDXL model offline: a diffusers folder, a single-file checkpoint
(loracli.run.checkpoint, loracli.run.checkpoint_sdxl), or a built-in tiny model.

No hub access is ever attempted (HF_HUB_OFFLINE and local_files_only). All base
weights are frozen; only the network trains. The training noise schedule is
sd-scripts' fixed DDPM one, whatever scheduler the model ships with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import SDXL, ModelFamily, family_for

KEY = "model.pretrained_model_name_or_path"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
SDXL_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")


@dataclass
class SDComponents:
    tokenizers: list[Any]  # one per text encoder (SDXL: CLIP-L's, then bigG's which pads with "!")
    text_encoders: list[Any]
    vae: Any
    unet: Any
    noise_scheduler: Any
    family: ModelFamily
    name_or_path: str

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0]

    def frozen_modules(self) -> list[Any]:
        return [*self.text_encoders, self.vae, self.unet]


def training_noise_scheduler(v_parameterization: bool) -> Any:
    """sd-scripts' training schedule for every SD family: DDPM, scaled_linear 0.00085-0.012, 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1,  # as SD ships it
                         prediction_type="v_prediction" if v_parameterization else "epsilon")


def is_sdxl_folder(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "text_encoder_2" in index or index.get("_class_name") == "StableDiffusionXLPipeline"


def resolve_model_dir(name_or_path: str) -> Path:
    if name_or_path.startswith("tiny:"):
        from loracli.run.tiny_model import ensure_tiny_model

        return ensure_tiny_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():  # load_sd_components reads these; a folder is needed here
        raise ConfigError(Problem(f"{KEY}: {path}", "is a single file, not a diffusers folder",
                                  "load it with load_sd_components"))
    if not path.is_dir():
        raise DatasetError(Problem(f"{KEY}: {path}", "model folder not found",
                                   "give a local diffusers folder (loracli never downloads) or tiny:sd15"))
    if not (path / "model_index.json").is_file():
        raise DatasetError(Problem(f"{KEY}: {path}", "not a diffusers model folder (no model_index.json)",
                                   "point to the folder that holds model_index.json"))
    needed = SDXL_COMPONENTS if is_sdxl_folder(path) else COMPONENTS
    missing = [c for c in needed if not (path / c).is_dir()]
    if missing:
        raise DatasetError(Problem(f"{KEY}: {path}", f"missing component folder(s): {', '.join(missing)}",
                                   f"the folder must hold {', '.join(c + '/' for c in needed)}"))
    return path


def load_sd_components(name_or_path: str, v2: bool = False, *, sdxl: bool | None = None,
                       v_parameterization: bool = False, allow_pickle: bool = False) -> SDComponents:
    """The frozen components; `sdxl` None means: as the model is (the plan has checked the flags against it),
    `v_parameterization` sets the noise scheduler's prediction_type, `allow_pickle`
    (model.allow_pickle_checkpoint) admits .ckpt files."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers read it
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # keep the terminal for our progress bar
        lib.set_verbosity_error()
        lib.disable_progress_bar()

    single = Path(name_or_path).expanduser()
    if not name_or_path.startswith("tiny:") and single.is_file():
        from loracli.run.checkpoint import load_single_file

        loaded = load_single_file(single, v2=v2, v_parameterization=v_parameterization, allow_pickle=allow_pickle,
                                  sdxl=sdxl)
        return _frozen(SDComponents(loaded.tokenizers, loaded.text_encoders, loaded.vae, loaded.unet,
                                    training_noise_scheduler(v_parameterization),
                                    SDXL if loaded.detected == "sdxl" else family_for(v2), name_or_path))

    folder = resolve_model_dir(name_or_path)
    found_sdxl = is_sdxl_folder(folder)
    if sdxl is not None and sdxl != found_sdxl:
        what = "an SDXL" if found_sdxl else "an SD1.x/2.x"
        raise ConfigError(Problem("model.sdxl", f"is {str(sdxl).lower()} but {folder} holds {what} model",
                                  f"set model.sdxl = {str(found_sdxl).lower()} or leave it out"))
    try:
        tokenizers, text_encoders = _load_text_side(folder, found_sdxl)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(Problem(f"{KEY}: {folder}", f"could not load the model: {first}")) from None
    family = SDXL if found_sdxl else family_for(v2)
    return _frozen(SDComponents(tokenizers, text_encoders, vae, unet, training_noise_scheduler(v_parameterization),
                                family, name_or_path))


def _load_text_side(folder: Path, sdxl: bool) -> tuple[list[Any], list[Any]]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)]
    text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                         local_files_only=True))
    return tokenizers, text_encoders


def _frozen(sd: SDComponents) -> SDComponents:
    for module in sd.frozen_modules():
        module.requires_grad_(False)
        module.eval()
    return sd
