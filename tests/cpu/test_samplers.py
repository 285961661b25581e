"""Every sd-scripts sampler name makes a picture with its diffusers scheduler; seeds are reproducible."""

from __future__ import annotations

import typing

import pytest
import torch
from PIL import ImageChops

from loracli.config.schema import Sampler
from loracli.run.models import load_sd_components
from loracli.run.conditioning import conditioner_for
from loracli.run.sampling import SAMPLERS, build_pipeline, generate, inference_mode, prompt_seed
from loracli.sample_prompts import parse_prompt_line

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


@pytest.fixture(scope="module")
def sd():
    return load_sd_components("tiny:sd15")


def test_every_schema_sampler_has_a_scheduler():
    assert set(typing.get_args(Sampler)) == set(SAMPLERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_makes_an_image(sd, name):
    pipe = build_pipeline(sd, name, v_parameterization=False)
    assert type(pipe.scheduler).__name__ == EXPECTED_CLASSES[name.removeprefix("k_")]
    if name.startswith("dpmsolver"):
        assert pipe.scheduler.config.algorithm_type == name
    prompt = parse_prompt_line("thing0 --w 64 --h 96 --s 3 --l 5", 0)
    with inference_mode(sd.unet, sd.text_encoder):
        image = generate(pipe, conditioner_for(sd, None, None), prompt, 1, torch.device("cpu"))
    assert image.size == (64, 96)
    assert len(image.getcolors(1 << 16) or []) > 10  # a picture, not a flat fill


def test_v_parameterization_sets_the_prediction_type(sd):
    assert build_pipeline(sd, "euler", v_parameterization=True).scheduler.config.prediction_type == "v_prediction"
    assert build_pipeline(sd, "euler", v_parameterization=False).scheduler.config.prediction_type == "epsilon"


def test_same_seed_same_picture_other_seed_other_picture(sd):
    pipe = build_pipeline(sd, "euler_a", v_parameterization=False)
    prompt = parse_prompt_line("thing0 --n blurry --w 64 --h 64 --s 3", 2)
    with inference_mode(sd.unet, sd.text_encoder):
        conditioner = conditioner_for(sd, None, 2)
        a, b, c = (generate(pipe, conditioner, prompt, seed, torch.device("cpu")) for seed in (5, 5, 6))
    assert ImageChops.difference(a, b).getbbox() is None
    assert ImageChops.difference(a, c).getbbox() is not None
    assert prompt_seed(prompt, 100) == 102 and prompt_seed(parse_prompt_line("x --d 9", 0), 100) == 9
