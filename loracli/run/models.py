"""Load an SD1.x/SD2.x model offline: a diffusers folder, a single-file checkpoint
(loracli.run.checkpoint), or a built-in tiny model.

No hub access is ever attempted (HF_HUB_OFFLINE and local_files_only). All base
weights are frozen; only the network trains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracli.errors import ConfigError, DatasetError, Problem
from loracli.family import ModelFamily, family_for

KEY = "model.pretrained_model_name_or_path"
COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    family: ModelFamily
    name_or_path: str


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
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise DatasetError(Problem(f"{KEY}: {path}", f"missing component folder(s): {', '.join(missing)}",
                                   "the folder must hold unet/, vae/, text_encoder/, tokenizer/, scheduler/"))
    return path


def load_sd_components(name_or_path: str, v2: bool = False, *, v_parameterization: bool = False,
                       allow_pickle: bool = False) -> SDComponents:
    """The frozen components; `v_parameterization` sets the noise scheduler's prediction_type,
    `allow_pickle` (model.allow_pickle_checkpoint) admits .ckpt files."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers read it
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # keep the terminal for our progress bar
        lib.set_verbosity_error()
        lib.disable_progress_bar()

    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    single = Path(name_or_path).expanduser()
    if not name_or_path.startswith("tiny:") and single.is_file():
        from loracli.run.checkpoint import load_single_file

        loaded = load_single_file(single, v2=v2, v_parameterization=v_parameterization, allow_pickle=allow_pickle)
        return _frozen(SDComponents(loaded.tokenizer, loaded.text_encoder, loaded.vae, loaded.unet,
                                    loaded.noise_scheduler, family_for(v2), name_or_path))

    folder = resolve_model_dir(name_or_path)
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" in index:
        raise ConfigError(Problem(f"{KEY}: {folder}", "this is an SDXL model; loracli trains SD1.x/2.x for now",
                                  "use an SD1.x/2.x model"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        # sd-scripts trains with DDPM whatever sampler the model ships with.
        noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True,
                                                        prediction_type=prediction_type)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(Problem(f"{KEY}: {folder}", f"could not load the model: {first}")) from None
    return _frozen(SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, family_for(v2), name_or_path))


def _frozen(sd: SDComponents) -> SDComponents:
    for module in (sd.text_encoder, sd.vae, sd.unet):
        module.requires_grad_(False)
        module.eval()
    return sd
