"""`loracli import` of shell scripts: the language is read from the whole script, nothing is ever executed,
and values only a shell could work out ($(...), backticks, PowerShell expressions) are reported, not imported."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracli.sdscripts.import_shell import detect_style, find_command
from loracli.sdscripts.importer import import_file

BASH_WITH_BACKTICKS = """\
STAMP=`date +%Y%m%d`
OUT="$(pwd)/out"
MODEL=/models/sd15
accelerate launch train_network.py \\
  --pretrained_model_name_or_path="$MODEL" --train_data_dir=/data \\
  --output_dir="$OUT" --output_name="lora_`date +%F`" --max_train_epochs=4 \\
  --training_comment="made $(touch {canary}) here" \\
  --logging_dir="$(dirname "$OUT")/logs" --log_prefix='$(kept literally)' \\
  --network_dim=8
"""


@pytest.mark.parametrize("shebang", ["", "#!/bin/bash\n", "#!/usr/bin/env bash\n"])
def test_bash_script_with_backticks_is_bash_and_substitutions_are_reported(tmp_path, shebang):
    canary = tmp_path / "executed"
    script = tmp_path / "train.sh"
    script.write_text(shebang + BASH_WITH_BACKTICKS.format(canary=canary))
    assert detect_style(script.read_text()) == "bash"
    result = import_file(script)
    v = result.values
    # what a backtick once made import read as PowerShell (and drop): model, data, epochs
    assert v["model"]["pretrained_model_name_or_path"] == "/models/sd15"
    assert v["dataset"]["train_data_dir"] == "/data"
    assert v["training"]["max_train_epochs"] == 4 and v["network"]["network_dim"] == 8
    # command substitutions: never run, never imported as text
    assert not canary.exists()
    assert "`date +%F`" in result.unsupported["--output_name"]
    assert f"$(touch {canary})" in result.unsupported["--training_comment"]
    assert '$(dirname "$OUT")' in result.unsupported["--logging_dir"]
    assert "$OUT" in result.unsupported["--output_dir"]  # set by a command substitution above
    for key in ("output_name", "output_dir", "training_comment"):
        assert key not in v.get("output", {})
    assert "logging_dir" not in v.get("logging", {})
    assert v["logging"]["log_prefix"] == "$(kept literally)"  # single quotes: literal text in bash
    assert not any(key.startswith("+%F") or key.startswith("here") for key in result.unsupported)


def test_powershell_expressions_are_reported():
    script = ('$stamp = (Get-Date).ToString("yyyyMMdd")\n$name = "lora"\n$dim = 8\n'
              'accelerate launch train_network.py `\n'
              '  --pretrained_model_name_or_path="D:\\m" --output_name="$name-$stamp" `\n'
              '  --training_comment="$(Get-Date)" --network_dim=$dim\n')
    assert detect_style(script) == "powershell"
    cmd = find_command(script)
    assert cmd is not None and cmd.style == "powershell"
    assert cmd.args["network_dim"] == "8" and cmd.args["pretrained_model_name_or_path"] == "D:\\m"
    assert cmd.unresolved == {"output_name": "$stamp", "training_comment": "$(Get-Date)"}


@pytest.mark.parametrize("text, style", [
    ("set LR=1e-4\r\naccelerate launch train_network.py ^\r\n  --learning_rate=%LR%\r\n", "cmd"),
    ("@echo off\r\nREM a comment with a ` backtick\r\npython train_network.py --network_dim 8\r\n", "cmd"),
    ("$lr = 1e-4\naccelerate launch train_network.py `\n  --learning_rate=$lr\n", "powershell"),
    ("#!/usr/bin/env pwsh\naccelerate launch train_network.py --network_dim 8\n", "powershell"),
    ("lr=1e-4 # a comment ending with a backtick `\naccelerate launch train_network.py \\\n --learning_rate=$lr\n",
     "bash"),
    ("accelerate launch train_network.py --network_dim 8\n", "bash"),
    ("accelerate launch './train_network.py' --network_dim 8 --learning_rate '1e-4'\n", "bash"),
])
def test_style_is_decided_by_the_whole_script(text, style):
    assert detect_style(text) == style
    cmd = find_command(text)
    assert cmd is not None and cmd.style == style
    assert cmd.args.get("learning_rate", "1e-4") == "1e-4" and not cmd.unresolved


def test_seed_fixtures_keep_their_styles():
    data = Path(__file__).resolve().parents[1] / "data" / "sdscripts" / "import"
    assert detect_style((data / "train_locon.ps1").read_text()) == "powershell"
    assert detect_style((data / "train_lora.sh").read_text()) == "bash"
    assert detect_style((data / "guide_pony_sdxl.sh").read_text()) == "bash"
