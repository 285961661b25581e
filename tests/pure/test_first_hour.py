"""A newcomer's first hour: the moments that cost a new user time (issue 13), each held by a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML, make_dataset, run_cli


def test_plan_without_config_uses_loracli_toml_in_the_current_folder(tmp_path, make_image, monkeypatch):
    make_dataset(tmp_path, make_image)
    (tmp_path / "loracli.toml").write_text(EXAMPLE_DATASET_TOML)
    monkeypatch.chdir(tmp_path)
    result = run_cli("plan", "--json")
    assert result.exit_code == 0, result.output
    assert "using ./loracli.toml" in result.stderr
    assert json.loads(result.stdout)["num_train_images"] == 6  # 3 images x 2 repeats: the file was read


def test_plan_without_config_or_loracli_toml_names_the_model_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("plan")
    assert result.exit_code == 2
    assert "model.pretrained_model_name_or_path: required but not set" in result.stderr
    assert "add `pretrained_model_name_or_path = ...` under [model]" in result.stderr
    assert "add `model = ...`" not in result.stderr
    assert "add `train_data_dir = ...` under [dataset]" in result.stderr
