"""Full-size SD1.5 and SDXL on the meta device (no weights, no memory): plain LoRA targets
exactly sd-scripts' networks.lora module counts and names. `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch

from loracli.family import SD1, SDXL
from loracli.run.kohya_lora import create_kohya_lora
from loracli.run.network import NetworkSpec
from loracli.run.shapes import bigg_text_config, clip_l_text_config, sd15_unet_config, sdxl_unet_config

pytestmark = pytest.mark.slow

def _on_meta(build):
    with torch.device("meta"):
        return build()


def sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return _on_meta(lambda: (UNet2DConditionModel(**sd15_unet_config()),
                             [CLIPTextModel(CLIPTextConfig(**clip_l_text_config()))]))


def sdxl():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return _on_meta(lambda: (UNet2DConditionModel(**sdxl_unet_config()),
                             [CLIPTextModel(CLIPTextConfig(**clip_l_text_config())),
                              CLIPTextModelWithProjection(CLIPTextConfig(**bigg_text_config()))]))


def test_sd15_counts_names_and_parameters():
    unet, tes = sd15()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=32, alpha=16), tes, unet, SD1)
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (192, 72)
    keys = network.state_dict()
    assert len(keys) == 3 * (192 + 72)
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight" in keys
    assert keys["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (32, 320, 1, 1)
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj.alpha" in keys
    params = sum(v.numel() for k, v in keys.items() if not k.endswith("alpha"))
    assert params == 18_874_368  # what sd-scripts prints for SD1.5 at dim 32


def test_sd15_c3lier_matches_the_locon_targets():
    unet, tes = sd15()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=8, alpha=8, conv_dim=4), tes, unet, SD1)
    keys = network.state_dict()
    assert len(network.unet_loras) == 278  # + 22 ResNets (conv1, conv2, time_emb_proj), shortcuts, samplers
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 320, 3, 3)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0  # sd-scripts' conv_alpha
    assert keys["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape == (8, 1280)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight" in keys
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight" in keys


def test_sdxl_counts_and_sai_names():
    unet, tes = sdxl()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=1), tes, unet, SDXL)
    by_index = [len(loras) for loras in network.text_encoder_loras_by_index]
    assert (len(network.unet_loras), by_index) == (722, [72, 192])
    keys = network.state_dict()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2.alpha" in keys
    assert "lora_unet_output_blocks_0_1_proj_out.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_11_self_attn_out_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_down.weight" in keys
    assert not any("down_blocks" in k or "mid_block" in k or "up_blocks" in k for k in keys)


def test_sdxl_c3lier_names_resnets_and_samplers_as_sai():
    unet, tes = sdxl()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=1, conv_dim=4, conv_alpha=2), tes, unet,
                                SDXL)
    keys = network.state_dict()
    assert keys["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (4, 320, 3, 3)
    assert "lora_unet_input_blocks_1_0_emb_layers_1.alpha" in keys
    assert "lora_unet_input_blocks_3_0_op.lora_up.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys
    assert "lora_unet_output_blocks_5_2_conv.lora_up.weight" in keys
    assert "lora_unet_input_blocks_4_0_skip_connection.alpha" in keys
    assert keys["lora_unet_middle_block_2_out_layers_3.alpha"].item() == 2.0
