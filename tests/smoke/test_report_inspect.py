"""`loracli inspect` and `loracli report` on files a real tiny:sd15 run wrote (LoRA and LoCon)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.pure.cli_helpers import run_cli

CASES = {
    "lora": ["network.algo=\"lora\"", "network.network_dim=4", "network.network_alpha=2"],
    "locon": ["network.algo=\"locon\"", "network.network_dim=4", "network.network_alpha=2", "network.conv_dim=2",
              "network.conv_alpha=1"],
}


def train(cfg: Path, overrides: list[str]) -> Path:
    args = [a for o in overrides for a in ("--set", o)]
    result = run_cli("train", "--config", cfg, "--set", "training.max_train_epochs=2", *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return max((cfg.parent / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def module_counts(path: Path) -> Counter:
    """Distinct module prefixes per part, counted from the tensors themselves."""
    modules = {key.split(".", 1)[0] for key in load_file(str(path))}
    return Counter("unet" if m.startswith("lora_unet_") else "text_encoder" if m.startswith("lora_te_") else "other"
                   for m in modules)


@pytest.mark.parametrize("algo", sorted(CASES))
def test_inspect_and_report_match_the_run(smoke_project, algo):
    run = train(smoke_project, CASES[algo])
    plan = json.loads((run / "plan.json").read_text())
    final = run / "smoke.safetensors"

    result = run_cli("inspect", final, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    counts = module_counts(final)
    assert info["modules"] == {"total": sum(counts.values()), **counts}
    assert counts["unet"] > 0 and counts["text_encoder"] > 0
    assert (info["dim"], info["alpha"]) == (4, 2.0)
    tensors = load_file(str(final))
    conv_modules = {k.split(".")[0] for k, v in tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4
                    and v.shape[2] > 1}
    if algo == "locon":
        assert info["algorithm"].startswith("LoCon") and conv_modules
        assert (info["conv_dim"], info["conv_alpha"]) == (2, 1.0)
        assert sum(g["modules"] for g in info["dim_groups"] if g["kind"] == "conv") == len(conv_modules)
        assert info["network_module"] == "lycoris.kohya" and info["network_args"]["algo"] == "locon"
    else:
        assert info["algorithm"] == "LoRA" and not conv_modules and info["conv_dim"] is None
    assert info["parameters"] == sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    t = info["training"]
    assert (t["steps"], t["max_train_steps"]) == (plan["total_steps"], plan["total_steps"])
    assert (t["epoch"], t["num_epochs"]) == (plan["epochs"], 2)
    assert "AdamW" in t["optimizer"] and t["learning_rate"] == pytest.approx(1e-3)
    assert {d["dir"]: (d["images"], d["repeats"]) for d in info["dataset_dirs"]} == {"2_char": (4, 2),
                                                                                      "1_style": (2, 1)}

    result = run_cli("report", run)
    assert result.exit_code == 0, result.output
    total = plan["total_steps"]
    assert f"steps       {total}/{total}, epoch 2/2" in result.stdout and "state       finished" in result.stdout
    assert "smoke.safetensors" in result.stdout
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = sum(losses[-10:]) / len(losses[-10:])  # the mean of the last 10 steps, as the bar and loss.png
    assert f"final loss  {final:.4f}" in result.stdout and all(math.isfinite(x) for x in losses)
    for name in ("loss.png", "lr.png"):
        with Image.open(run / name) as img:
            assert img.format == "PNG" and img.size[0] >= 600
