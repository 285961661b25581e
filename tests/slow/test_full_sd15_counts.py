"""Full-size SD1.5 shapes (random weights, no download): the module counts and key
names that identify a faithful kohya-style network. ~4 GB and ~20 s: `pytest -m slow`."""

from __future__ import annotations

import pytest

from loracli.run.network import NetworkSpec, count_modules, create_network, to_kohya_state_dict
from loracli.run.shapes import build_sd15_shapes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algo,expected", [("lora", (192, 72)), ("locon", (278, 72))])
def test_module_counts_and_key_names(algo, expected):
    unet, text_encoder, _ = build_sd15_shapes()
    network = create_network(NetworkSpec(algo=algo, dim=32, alpha=16, conv_dim=32 if algo == "locon" else None),
                             text_encoder, unet)
    assert count_modules(network) == expected
    keys = to_kohya_state_dict(network)
    assert len(keys) == 3 * sum(expected)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in keys
    if algo == "lora":
        assert len(keys) == 792
        params = sum(v.numel() for k, v in keys.items() if not k.endswith("alpha"))
        assert params == 18_874_368  # 18.87 M, as sd-scripts prints for SD1.5 dim 32
    else:
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
        assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (32, 320, 3, 3)
