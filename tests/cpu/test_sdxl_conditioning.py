"""SDXL's conditioning as sdxl_train_network.py computes it: the size numbers, both text encoders, the pooled vector."""

from __future__ import annotations

import pytest
import torch

from loracli.run.conditioning import encode_prompts_sdxl, size_time_ids
from loracli.run.models import load_sd_components


@pytest.fixture(scope="module")
def sdxl():
    return load_sd_components("tiny:sdxl")


def test_size_numbers_follow_sd_scripts_crop_box():
    # sd-scripts fits the original image inside the bucket, centred, and floors the offsets
    # (BucketManager.get_crop_ltrb); a flipped image's left is target width - crop right.
    # 96x64 into a 64x64 bucket: fitted 64 x 42.67, top = floor(21.33 / 2) = 10.
    # 64x96 into a 64x64 bucket: fitted 42.67 x 64, left = floor(21.33 / 2) = 10, right = 52.67,
    # flipped left = 64 - 52.67 = 11.33 -> 11.
    ids = size_time_ids([(96, 64), (64, 96), (64, 96), (1024, 768)],
                        [(64, 64), (64, 64), (64, 64), (1152, 896)], [False, False, True, True])
    assert ids.tolist() == [
        [64, 96, 10, 0, 64, 64],
        [96, 64, 0, 10, 64, 64],
        [96, 64, 0, 11, 64, 64],
        # 1152/896 = 1.2857 < 1024/768 = 1.3333: width fills, height 864, top 16, flip keeps left 0
        [768, 1024, 16, 0, 896, 1152],
    ]


def test_text_is_both_penultimate_states_side_by_side_and_the_eos_pooled_projection(sdxl):
    te1, te2 = sdxl.text_encoders
    captions = ["thing one, red", "a much longer caption " * 12]
    with torch.no_grad():
        cond = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, captions, None, "cpu")
        ids1 = sdxl.tokenizers[0](captions, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        ids2 = sdxl.tokenizers[1](captions, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
    assert cond.hidden.shape == (2, 77, 32 + 64)
    torch.testing.assert_close(cond.hidden, torch.cat([h1, out2.hidden_states[-2]], dim=2))
    # The tiny vocabulary's EOS has the highest id, so CLIP's own argmax pooling finds it too.
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    assert (ids2 == sdxl.tokenizers[1].convert_tokens_to_ids("!")).any()  # the second tokenizer pads with "!"


def test_long_captions_use_windows_and_the_first_windows_pooled_vector(sdxl):
    captions = ["word " * 100, "short"]
    with torch.no_grad():
        long = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, captions, 225, "cpu")
        first = encode_prompts_sdxl(sdxl.tokenizers, sdxl.text_encoders, captions, None, "cpu")
    assert long.hidden.shape == (2, 227, 96)
    # The first window holds the same 75 tokens as the unwindowed encoding, so the same pooled vector.
    torch.testing.assert_close(long.pooled, first.pooled)
    torch.testing.assert_close(long.hidden[:, 1:76], first.hidden[:, 1:76])


def test_the_unet_reads_the_size_numbers(sdxl):
    from loracli.run.conditioning import conditioner_for

    conditioner = conditioner_for(sdxl, None, None)
    with torch.no_grad():
        cond = conditioner.encode(["thing"], "cpu")
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        outs = []
        for size in ((64, 64), (128, 96)):
            kwargs = conditioner.unet_kwargs(cond, [size], [(64, 64)], [False], torch.float32)
            outs.append(sdxl.unet(latents, torch.tensor([500]), **kwargs).sample)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[96, 128, 8, 0, 64, 64]]  # fitted 64 x 48: top 8
    assert not torch.allclose(outs[0], outs[1])
