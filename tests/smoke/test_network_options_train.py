"""`loracli train` with block-wise LoRA and LoRA+ on tiny:sd15: the file, its metadata and the lrs it trained at."""

from __future__ import annotations

import json

from safetensors import safe_open

from tests.pure.cli_helpers import run_cli

DIMS = [4] * 25
DIMS[17] = 2  # up_blocks.1.attentions.1 of tiny:sd15 (sd-scripts' block 13 + 3·1 + 1)
NETWORK = f"""
[network]
network_dim = 4
network_alpha = 4
down_lr_weight = [1.0, 0.5]
mid_lr_weight = [0]
up_lr_weight = [1, 1, 1, 2.0]
block_dims = {DIMS}
loraplus_unet_lr_ratio = 4
"""


def test_block_weights_dims_and_loraplus_reach_the_file_and_the_optimizer(smoke_project):
    config = smoke_project.read_text()
    start = config.index("[network]")
    end = config.index("[optimizer]")
    smoke_project.write_text(config[:start] + NETWORK + config[end:].replace("max_train_epochs = 3",
                                                                               "max_train_epochs = 1"))
    result = run_cli("train", "--config", smoke_project)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    run = next((smoke_project.parent / "runs").iterdir())
    with safe_open(run / "smoke.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        rank = {k.rsplit(".", 2)[0]: f.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_down.weight")}
    assert json.loads(meta["ss_network_args"]) == {
        "down_lr_weight": "1,0.5", "up_lr_weight": "1,1,1,2", "mid_lr_weight": "0",
        "block_dims": ",".join(map(str, DIMS)), "loraplus_unet_lr_ratio": "4",
        "dropout": None}  # sd-scripts adds network_dropout to the args it records
    assert not any("mid_block" in k for k in keys)  # mid weight 0: no modules (and no group)
    assert {r for m, r in rank.items() if "up_blocks_1_attentions_1" in m} == {2}
    assert {r for m, r in rank.items() if "up_blocks_1_attentions_0" in m} == {4}
    lrs = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    lr = 1e-3
    assert lrs["unet_block16"] == lr * 2 and lrs["unet_block16 plus"] == lr * 2 * 4
    assert lrs["unet_block1"] == lr * 0.5 and lrs["unet_block1 plus"] == lr * 0.5 * 4
    assert lrs["textencoder"] == lr and "textencoder plus" not in lrs
    assert {k for k in lrs if k.startswith("unet")} == {f"unet_block{i}{p}" for i in (1, 16, 17)
                                                        for p in ("", " plus")}
