"""W31: a model folder whose scheduler differs from the fixed DDPM schedule training uses."""

from __future__ import annotations

import json

import pytest

from loracli.config.schema import LoracliConfig
from loracli.scheduler_check import schedule_differences
from tests.pure.cli_helpers import make_dataset, run_cli
from tests.pure.test_model_probe import diffusers_folder

# What the SD1.5 repository ships (PNDM, but the same betas as sd-scripts' DDPM).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
                  "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def config(**training) -> LoracliConfig:
    model = {"pretrained_model_name_or_path": "m", "v_parameterization": training.pop("v_parameterization", False)}
    return LoracliConfig.model_validate({"model": model, "dataset": {"train_data_dir": "d"}, "training": training})


def test_the_stock_sd_schedule_is_no_difference():
    assert schedule_differences(SD15_SCHEDULER, config()) == []
    assert schedule_differences({"prediction_type": "epsilon"}, config()) == []  # missing keys: diffusers defaults


@pytest.mark.parametrize("changes, settings, words", [
    ({"rescale_betas_zero_snr": True}, {}, "rescale_betas_zero_snr True"),
    ({"prediction_type": "v_prediction"}, {}, "prediction_type v_prediction"),
    ({"prediction_type": "epsilon"}, {"v_parameterization": True}, "trains v_prediction"),
    ({"beta_end": 0.02}, {}, "beta_end 0.02"),
    ({"beta_schedule": "linear"}, {}, "beta_schedule 'linear'"),
    ({"num_train_timesteps": 2000}, {}, "num_train_timesteps 2000"),
    ({}, {"zero_terminal_snr": True}, "rescale_betas_zero_snr False"),
])
def test_each_difference_is_named(changes, settings, words):
    found = schedule_differences({**SD15_SCHEDULER, **changes}, config(**settings))
    assert len(found) == 1 and words in found[0], found


def test_a_matching_setting_accounts_for_the_difference():
    v_zsnr = {**SD15_SCHEDULER, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    assert schedule_differences(v_zsnr, config(zero_terminal_snr=True, v_parameterization=True)) == []


def plan_with_scheduler(tmp_path, make_image, scheduler: dict | None, extra: str = "") -> dict:
    model = diffusers_folder(tmp_path / "model")
    if scheduler is not None:
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    make_dataset(tmp_path, make_image)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npretrained_model_name_or_path = "{model.as_posix()}"\n{extra}'
                   f'[dataset]\ntrain_data_dir = "{(tmp_path / "data").as_posix()}"\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\n'
                   "[training]\nmax_train_epochs = 1\n")
    result = run_cli("plan", "--config", cfg, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_warns_about_a_zero_terminal_snr_v_prediction_folder(tmp_path, make_image):
    noob_like = {**SD15_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    warnings = [w for w in plan_with_scheduler(tmp_path, make_image, noob_like)["warnings"] if w["code"] == "W31"]
    assert len(warnings) == 1
    assert "rescale_betas_zero_snr True" in warnings[0]["message"]
    assert "prediction_type v_prediction" in warnings[0]["message"]
    assert "training.zero_terminal_snr" in warnings[0]["hint"] and "model.v_parameterization" in warnings[0]["hint"]


def test_plan_is_quiet_for_the_stock_schedule_and_a_missing_file(tmp_path, make_image):
    assert not [w for w in plan_with_scheduler(tmp_path / "a", make_image, SD15_SCHEDULER)["warnings"]
                if w["code"] == "W31"]
    assert not [w for w in plan_with_scheduler(tmp_path / "b", make_image, None)["warnings"] if w["code"] == "W31"]
