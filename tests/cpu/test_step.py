"""The diffusion training step: noise, timesteps, target, loss weighting, text encoding (§6)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loracli.errors import ConfigError
from loracli.run.step import (
    compute_snr,
    compute_target,
    diffusion_loss,
    encode_prompts,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    tokenize_windows,
)

TIMESTEPS = [0, 50, 100, 200, 500, 999]


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, clip_sample=False)


# --- SNR and min-SNR ---------------------------------------------------------------------------

def test_snr_of_the_sd15_schedule(scheduler):
    snr = compute_snr(scheduler, torch.tensor(TIMESTEPS))
    expected = [(1175.4, 0.05), (19.65, 0.005), (8.454, 0.0005), (3.06, 0.005), (0.382, 0.0005), (0.0047, 0.00005)]
    for value, (want, tol) in zip(snr.tolist(), expected):
        assert abs(value - want) <= tol, (value, want)


def test_min_snr_weights_epsilon_gamma_5(scheduler):
    w = min_snr_weight(compute_snr(scheduler, torch.tensor(TIMESTEPS)), 5.0, False)
    expected = [(0.00425, 0.000005), (0.2544, 0.00005), (0.5915, 0.0001), (1, 1e-6), (1, 1e-6), (1, 1e-6)]
    for value, (want, tol) in zip(w.tolist(), expected):
        assert abs(value - want) <= tol, (value, want)


def test_min_snr_weights_v_prediction_divide_by_snr_plus_one():
    snr = torch.tensor([10.0, 1.0, 0.5])
    w = min_snr_weight(snr, 5.0, True)
    assert torch.allclose(w, torch.tensor([5 / 11, 1 / 2, 0.5 / 1.5]))


# --- target ----------------------------------------------------------------------------------------

def test_epsilon_target_is_the_noise(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert compute_target(scheduler, latents, noise, torch.tensor([10, 900]), False) is noise


def test_v_target_formula(scheduler):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    v = compute_target(scheduler, latents, noise, t, True)
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, ac.sqrt() * noise - (1 - ac).sqrt() * latents, atol=1e-6)


# --- noise ---------------------------------------------------------------------------------------

def _noise(latents, seed, **kw):
    args = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                multires_noise_iterations=None, multires_noise_discount=0.3)
    args.update(kw)
    return sample_noise(latents, torch.Generator().manual_seed(seed), **args)


def test_plain_noise_is_seeded_gaussian():
    latents = torch.zeros(2, 4, 8, 8)
    a, b = _noise(latents, 3), _noise(latents, 3)
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    latents = torch.zeros(2, 4, 8, 8)
    diff = _noise(latents, 5, noise_offset=0.1) - _noise(latents, 5)
    g = torch.Generator().manual_seed(5)
    torch.randn(2, 4, 8, 8, generator=g)  # the base noise
    expected = 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-6)
    per_bc = diff.flatten(2)
    assert torch.allclose(per_bc.std(dim=2), torch.zeros(2, 4), atol=1e-6)  # flat over H, W
    assert per_bc[:, :, 0].unique().numel() == 8  # different for every (b, c)


def test_noise_offset_random_strength_scales_by_one_uniform():
    latents = torch.zeros(2, 4, 8, 8)
    diff = _noise(latents, 6, noise_offset=0.1, noise_offset_random_strength=True) - _noise(latents, 6)
    g = torch.Generator().manual_seed(6)
    torch.randn(2, 4, 8, 8, generator=g)
    u = torch.rand(1, generator=g).item()
    expected = u * 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-6)


def test_adaptive_noise_scale_uses_the_latent_channel_mean():
    latents = torch.zeros(1, 2, 4, 4)
    latents[0, 1] = -2.0  # |mean| 2 in channel 1, 0 in channel 0
    diff = _noise(latents, 7, noise_offset=0.1, adaptive_noise_scale=0.5) - _noise(latents, 7)
    g = torch.Generator().manual_seed(7)
    torch.randn(1, 2, 4, 4, generator=g)
    r = torch.randn(1, 2, 1, 1, generator=g)
    offset = torch.tensor([0.1, 0.1 + 0.5 * 2.0]).view(1, 2, 1, 1)
    assert torch.allclose(diff, (offset * r).expand_as(diff), atol=1e-6)


def test_multires_noise_has_unit_std_and_low_frequencies():
    latents = torch.zeros(4, 4, 32, 32)
    plain = _noise(latents, 8)
    multi = _noise(latents, 8, multires_noise_iterations=6, multires_noise_discount=0.8)
    assert abs(multi.std().item() - 1.0) < 1e-4
    assert not torch.allclose(multi, plain)

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    # the upsampled coarse levels make neighbouring pixels correlated; white noise is not
    assert neighbour_corr(multi) > neighbour_corr(plain) + 0.1


def test_multires_runs_after_the_offset():
    latents = torch.zeros(2, 4, 16, 16)
    both = _noise(latents, 9, noise_offset=0.1, multires_noise_iterations=3, multires_noise_discount=0.3)
    assert abs(both.std().item() - 1.0) < 1e-4


# --- timesteps -----------------------------------------------------------------------------------

def test_timesteps_range_and_seed():
    t = sample_timesteps(1000, None, None, 1000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (1000,)
    assert t.min() >= 0 and t.max() < 1000
    same = sample_timesteps(1000, None, None, 1000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(t, same)
    t = sample_timesteps(500, 100, 200, 1000, "cpu", torch.Generator().manual_seed(1))
    assert t.min() >= 100 and t.max() < 200


def test_timesteps_min_not_below_max_gives_max():
    t = sample_timesteps(4, 300, 300, 1000, "cpu", None)
    assert t.tolist() == [300] * 4


# --- loss ----------------------------------------------------------------------------------------

def test_loss_is_per_sample_mean_times_prior_weight(scheduler):
    target = torch.zeros(2, 4, 2, 2)
    pred = torch.zeros(2, 4, 2, 2)
    pred[0] = 1.0  # MSE 1 for sample 0
    pred[1] = 2.0  # MSE 4 for sample 1
    t = torch.tensor([10, 20])
    assert diffusion_loss(pred, target, t, scheduler, [1.0, 1.0], None, False).item() == pytest.approx(2.5)
    # sample 1 is a regularisation image with prior_loss_weight 0.5
    loss = diffusion_loss(pred, target, t, scheduler, torch.tensor([1.0, 0.5]), None, False)
    assert loss.item() == pytest.approx((1 + 0.5 * 4) / 2)


def test_loss_applies_min_snr_weight(scheduler):
    target = torch.zeros(3, 4, 2, 2)
    pred = torch.ones(3, 4, 2, 2)
    t = torch.tensor([0, 100, 500])
    w = min_snr_weight(compute_snr(scheduler, t), 5.0, False)
    loss = diffusion_loss(pred, target, t, scheduler, [1.0, 1.0, 2.0], 5.0, False)
    assert loss.item() == pytest.approx(((w * torch.tensor([1.0, 1.0, 2.0])).mean()).item(), rel=1e-6)
    v_loss = diffusion_loss(pred, target, t, scheduler, [1.0, 1.0, 1.0], 5.0, True)
    wv = min_snr_weight(compute_snr(scheduler, t), 5.0, True)
    assert v_loss.item() == pytest.approx(wv.mean().item(), rel=1e-6)


# --- text encoding -------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    # The printable byte-to-unicode table of byte-level BPE: printable bytes map to themselves,
    # the rest to code points from 256 up.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tokenizer(folder, pad_token: str | None = None) -> CLIPTokenizer:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"]
    tokens += ["ca", "cat</w>", "do", "dog</w>", "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": 77}
    if pad_token:
        config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return _write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def text_encoder(tokenizer) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval()


LONG = ", ".join(["the cat"] * 30 + ["dog"] * 20)  # well over 75 tokens


def test_tokenizer_merges_and_special_tokens(tokenizer):
    ids = tokenizer("the cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:3] == tokenizer.convert_tokens_to_ids(["the</w>", "cat</w>"])
    assert ids[3:] == [tokenizer.eos_token_id] * 74


@pytest.mark.parametrize("max_len,positions", [(None, 77), (75, 77), (150, 152), (225, 227)])
def test_encode_prompts_positions(tokenizer, text_encoder, max_len, positions):
    with torch.no_grad():
        out = encode_prompts(tokenizer, text_encoder, ["the cat", LONG], max_len, None, "cpu")
    assert out.shape == (2, positions, 32)


def test_clip_skip_one_equals_default_and_two_is_penultimate(tokenizer, text_encoder):
    with torch.no_grad():
        default = encode_prompts(tokenizer, text_encoder, ["the cat", "dog"], None, None, "cpu")
        skip1 = encode_prompts(tokenizer, text_encoder, ["the cat", "dog"], None, 1, "cpu")
        skip2 = encode_prompts(tokenizer, text_encoder, ["the cat", "dog"], None, 2, "cpu")
        ids = tokenize_windows(tokenizer, ["the cat", "dog"], None).reshape(-1, 77)
        hs = text_encoder(ids, output_hidden_states=True).hidden_states
        expected2 = text_encoder.final_layer_norm(hs[-2])
    assert torch.allclose(default, skip1, atol=1e-6)
    assert not torch.allclose(default, skip2, atol=1e-3)
    assert torch.allclose(skip2, expected2, atol=1e-6)


def test_windows_for_v1_tokenizer(tokenizer):
    full = tokenizer([LONG], padding="max_length", truncation=True, max_length=227,
                     return_tensors="pt").input_ids[0]
    win = tokenize_windows(tokenizer, [LONG], 225)
    assert win.shape == (1, 3, 77)
    for k, start in enumerate((1, 76, 151)):
        expected = torch.cat([full[:1], full[start:start + 75], full[-1:]])
        assert torch.equal(win[0, k], expected)
    assert (win[0, :, 0] == tokenizer.bos_token_id).all()


def test_long_output_is_windowed_encoding(tokenizer, text_encoder):
    with torch.no_grad():
        out = encode_prompts(tokenizer, text_encoder, [LONG], 150, None, "cpu")
        win = tokenize_windows(tokenizer, [LONG], 150)[0]
        each = text_encoder(win).last_hidden_state  # (2, 77, 32)
    assert torch.allclose(out[0, 0], each[0, 0], atol=1e-6)  # first window's BOS
    assert torch.allclose(out[0, 1:76], each[0, 1:76], atol=1e-6)
    assert torch.allclose(out[0, 76:151], each[1, 1:76], atol=1e-6)
    assert torch.allclose(out[0, 151], each[1, 76], atol=1e-6)  # final state of the last window


def test_windows_for_pad_not_eos_tokenizer(tmp_path):
    tok = _write_tokenizer(tmp_path, pad_token="!")
    pad, eos, bos = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    assert pad != eos
    # 80 text tokens: window 0 is all text (forced EOS at the end), window 1 holds the rest,
    # window 2 is only padding (BOS EOS ...).
    caption = " ".join(["cat"] * 80)
    win = tokenize_windows(tok, [caption], 225)[0]
    cat = tok.convert_tokens_to_ids("cat</w>")
    assert win[0, 0] == bos and win[0, 75] == cat and win[0, 76] == eos
    assert win[1, 1:6].tolist() == [cat] * 5 and win[1, 6] == eos and win[1, 7] == pad
    assert win[2, 0] == bos and win[2, 1] == eos and (win[2, 2:] == pad).all()
    short = tokenize_windows(tok, ["cat"], 150)[0]
    assert short[0, :4].tolist() == [bos, cat, eos, pad]
    assert short[1, 1] == eos


def test_unsupported_max_token_length(tokenizer, text_encoder):
    with pytest.raises(ConfigError):
        encode_prompts(tokenizer, text_encoder, ["cat"], 100, None, "cpu")
