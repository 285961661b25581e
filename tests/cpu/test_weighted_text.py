"""Weighted captions and weighted sample prompts on the tiny encoders, against transcriptions of sd-scripts.

Training (and SDXL samples): library/strategy_base.py _get_weighted_input_ids / _get_input_ids, then
strategy_sd.py / strategy_sdxl.py encode_tokens_with_weights. SD1/SD2 samples: library/lpw_stable_diffusion.py
get_weighted_text_embeddings (max_embeddings_multiples 3, no_boseos_middle False, mean kept). The (text, weight)
pieces are written out by hand here, so the expected values do not come from loracli's parser.
"""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loracli.config.loader import resolve_config
from loracli.plan import build_plan
from loracli.run.conditioning import TextCache, conditioner_for
from loracli.run.data import ExampleLoader
from loracli.run.models import load_sd_components
from loracli.run.sampling import build_pipeline, generate
from loracli.sample_prompts import SamplePrompt


@pytest.fixture(scope="module")
def sd15():
    return load_sd_components("tiny:sd15")


@pytest.fixture(scope="module")
def sdxl():
    return load_sd_components("tiny:sdxl")


CAPTION = "a (cat:1.5) on a [mat]"
PIECES = [("a ", 1.0), ("cat", 1.5), (" on a ", 1.0), ("mat", 1 / 1.1)]
# the tiny vocabulary spells most words with several tokens; "a" is one: "red" starts at token 80, in window 2
LONG = "a " * 80 + "(red:1.3) " + "a " * 20
LONG_PIECES = [("a " * 80, 1.0), ("red", 1.3), (" " + "a " * 20, 1.0)]


# --- transcriptions of sd-scripts -----------------------------------------------------------------

def final_norm(text_encoder):
    """text_encoder.text_model.final_layer_norm (transformers 5 no longer nests it under text_model)."""
    return next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))


def sd_weighted_ids(tokenizer, pieces, max_length):
    """strategy_base: pieces tokenized one by one, padded, then cut into 77-token windows (and weights)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens, weights = [], []
    for word, weight in pieces:
        token = tokenizer(word).input_ids[1:-1]
        tokens += token
        weights += [weight] * len(token)
        if len(tokens) > max_length - 2:
            break
    tokens, weights = tokens[:max_length - 2], weights[:max_length - 2]
    tokens = [bos] + tokens + [eos] + [pad] * (max_length - 2 - len(tokens))
    weights = [1.0] + weights + [1.0] * (max_length - 1 - len(weights))
    ids, w = torch.tensor(tokens), torch.tensor(weights)
    if max_length <= 77:
        return ids[None], w[None]
    chunks = []
    for i in range(1, max_length - 77 + 2, 75):
        chunk = torch.cat((ids[0:1], ids[i:i + 75], ids[-1:]))
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    ids = torch.stack(chunks)
    new_w = torch.ones(ids.shape)
    for i in range(1, max_length - 77 + 2, 75):
        new_w[i // 75, 1:76] = w[i:i + 75]
    return ids, new_w


def sd_join(hidden, batch, windows):
    """strategy_sd (v1) / strategy_sdxl: <BOS>, every window's 75 states, the last state."""
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    if windows == 1:
        return hidden
    parts = [hidden[:, 0:1]] + [hidden[:, i:i + 75] for i in range(1, windows * 77, 77)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def sd_apply(hidden, weights):
    """encode_tokens_with_weights: states times weights, nothing rescaled."""
    if weights.shape[1] == 1:
        return hidden * weights.squeeze(1).unsqueeze(2)
    hidden = hidden.clone()
    for i in range(weights.shape[1]):
        hidden[:, i * 75 + 1:i * 75 + 76] = hidden[:, i * 75 + 1:i * 75 + 76] * weights[:, i, 1:-1].unsqueeze(-1)
    return hidden


def sd_training_encoding(tokenizer, text_encoder, captions_pieces, max_length, clip_skip):
    ids, weights = zip(*(sd_weighted_ids(tokenizer, p, max_length) for p in captions_pieces))
    ids, weights = torch.stack(ids), torch.stack(weights)
    flat = ids.reshape(-1, 77)
    if clip_skip is None:
        hidden = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        hidden = final_norm(text_encoder)(out["hidden_states"][-clip_skip])
    return sd_apply(sd_join(hidden, len(captions_pieces), ids.shape[1]), weights)


def lpw_embeddings(tokenizer, text_encoder, prompts_pieces, clip_skip=None):
    """lpw_stable_diffusion.get_weighted_text_embeddings with max_embeddings_multiples=3, no_boseos_middle=False."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_tokens, all_weights = [], []
    for pieces in prompts_pieces:
        tokens, weights = [], []
        for word, weight in pieces:
            token = tokenizer(word).input_ids[1:-1]
            tokens += token
            weights += [weight] * len(token)
            if len(tokens) > 225:
                break
        all_tokens.append(tokens[:225])
        all_weights.append(weights[:225])
    max_length = max(len(t) for t in all_tokens)
    multiples = max(1, min(3, (max_length - 1) // 75 + 1))
    max_length = 75 * multiples + 2
    padded, padded_w = [], []
    for tokens, weights in zip(all_tokens, all_weights):
        padded.append([bos] + tokens + [eos] * (max_length - 1 - len(tokens)))
        w = []
        if len(weights) == 0:
            w = [1.0] * (multiples * 77)
        else:
            for j in range(multiples):
                w.append(1.0)
                w += weights[j * 75:min(len(weights), (j + 1) * 75)]
                w.append(1.0)
            w += [1.0] * (multiples * 77 - len(w))
        padded_w.append(w)
    text_input = torch.tensor(padded)

    def encode(ids):
        if clip_skip is None or clip_skip == 1:
            return text_encoder(ids)[0]
        out = text_encoder(ids, output_hidden_states=True, return_dict=True)
        return final_norm(text_encoder)(out["hidden_states"][-clip_skip])

    if multiples > 1:
        embeddings = []
        for i in range(multiples):
            chunk = text_input[:, i * 75:(i + 1) * 75 + 2].clone()
            chunk[:, 0] = text_input[0, 0]
            if pad == eos:
                chunk[:, -1] = text_input[0, -1]
            else:
                for j in range(len(chunk)):
                    if chunk[j, -1] != eos and chunk[j, -1] != pad:
                        chunk[j, -1] = eos
                    if chunk[j, 1] == pad:
                        chunk[j, 1] = eos
            embeddings.append(encode(chunk))
        embeddings = torch.concat(embeddings, axis=1)
    else:
        embeddings = encode(text_input)
    weights = torch.tensor(padded_w, dtype=embeddings.dtype)
    previous_mean = embeddings.float().mean(axis=[-2, -1]).to(embeddings.dtype)
    embeddings = embeddings * weights.unsqueeze(-1)
    current_mean = embeddings.float().mean(axis=[-2, -1]).to(embeddings.dtype)
    return embeddings * (previous_mean / current_mean).unsqueeze(-1).unsqueeze(-1)


# --- training: weighted_captions --------------------------------------------------------------------

@pytest.mark.parametrize("max_token_length,clip_skip", [(None, None), (150, None), (None, 2), (225, 2)])
def test_sd_training_weights_match_sd_scripts(sd15, max_token_length, clip_skip):
    conditioner = conditioner_for(sd15, max_token_length, clip_skip, weighted=True)
    length = 77 if max_token_length is None else max_token_length + 2
    with torch.no_grad():
        got = conditioner.encode([CAPTION, LONG], "cpu").hidden
        want = sd_training_encoding(sd15.tokenizer, sd15.text_encoder, [PIECES, LONG_PIECES], length, clip_skip)
    assert got.shape == want.shape == (2, 2 + 75 * ((length - 2) // 75), want.shape[-1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_weight_scales_its_tokens_only_and_keeps_no_mean(sd15):
    weighted = conditioner_for(sd15, None, None, weighted=True)
    with torch.no_grad():
        plain = weighted.encode(["a cat"], "cpu").hidden
        heavy = weighted.encode(["a (cat:1.5)"], "cpu").hidden
        unweighted = conditioner_for(sd15, None, None).encode(["a cat"], "cpu").hidden
    torch.testing.assert_close(plain, unweighted)  # no brackets: the same as an unweighted run
    cat = range(2, len(sd15.tokenizer("a cat").input_ids) - 1)  # BOS, "a", then the tokens of "cat"
    torch.testing.assert_close(heavy[:, cat], 1.5 * plain[:, cat])
    others = [i for i in range(77) if i not in cat]
    torch.testing.assert_close(heavy[:, others], plain[:, others])
    # sd-scripts' training strategy does not rescale to the old mean (its sampler does, below)
    assert not torch.allclose(heavy.mean(), plain.mean())


def test_sdxl_training_weights_both_encoders_and_leaves_the_pooled_vector(sdxl):
    conditioner = conditioner_for(sdxl, 150, None, weighted=True)
    te1, te2 = sdxl.text_encoders
    with torch.no_grad():
        got = conditioner.encode([CAPTION, LONG], "cpu")
        ids1, w1 = zip(*(sd_weighted_ids(sdxl.tokenizers[0], p, 152) for p in (PIECES, LONG_PIECES)))
        ids2, w2 = zip(*(sd_weighted_ids(sdxl.tokenizers[1], p, 152) for p in (PIECES, LONG_PIECES)))
        ids1, ids2 = torch.stack(ids1).reshape(-1, 77), torch.stack(ids2).reshape(-1, 77)
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        eos = (ids2 == sdxl.tokenizers[1].eos_token_id).int().argmax(dim=1)
        pool = te2.text_projection(out2.last_hidden_state[torch.arange(len(ids2)), eos])[::2]
        want = torch.cat([sd_apply(sd_join(h1, 2, 2), torch.stack(w1)),
                          sd_apply(sd_join(out2.hidden_states[-2], 2, 2), torch.stack(w2))], dim=2)
        plain = conditioner_for(sdxl, 150, None).encode(["a cat on a mat", LONG.replace("(red:1.3)", "red")], "cpu")
    assert 75 < len(sdxl.tokenizers[0](LONG).input_ids) - 2 <= 150
    torch.testing.assert_close(got.hidden, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled, pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled, plain.pooled, rtol=1e-5, atol=1e-6)  # weights never reach it
    assert not torch.allclose(got.hidden, plain.hidden)


def test_cached_text_is_keyed_by_weighting(sd15, tmp_path):
    plain = TextCache(conditioner_for(sd15, None, None), "tiny:sd15", tmp_path)
    weighted = TextCache(conditioner_for(sd15, None, None, weighted=True), "tiny:sd15", tmp_path)
    assert plain.identity != weighted.identity  # a disk cache of one never serves the other


# --- sample prompts ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_biased(sd15):
    """The tiny SD1.5 with a final layer norm bias: a zero bias (random init) makes every state's mean 0, and
    the sampler's mean rescale 0/0 (a real CLIP's bias is not zero)."""
    encoder = copy.deepcopy(sd15.text_encoder)
    with torch.no_grad():
        final_norm(encoder).bias.add_(0.25)
    return SimpleNamespace(family=sd15.family, tokenizer=sd15.tokenizer, text_encoder=encoder,
                           text_encoders=[encoder])


def test_sd_sample_prompts_follow_the_long_prompt_weighting_pipeline(sd15_biased):
    sd15 = sd15_biased
    conditioner = conditioner_for(sd15, 225, None)  # max_token_length does not matter to SD samples
    with torch.no_grad():
        positive, negative = conditioner.encode_sample(CAPTION, "ugly, (blurry:1.2)", "cpu")
        want = lpw_embeddings(sd15.tokenizer, sd15.text_encoder, [PIECES, [("ugly, ", 1.0), ("blurry", 1.2)]])
        unweighted, _ = conditioner.encode_sample("a cat on a mat", None, "cpu")
    assert positive.hidden.shape == (1, 77, want.shape[-1])  # one window: short prompts
    torch.testing.assert_close(positive.hidden, want[0:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(negative.hidden, want[1:2], rtol=1e-5, atol=1e-6)
    # the weight changes the embedding, and the rescale keeps its mean
    assert not torch.allclose(positive.hidden, unweighted.hidden, atol=1e-4)
    torch.testing.assert_close(positive.hidden.float().mean(), unweighted.hidden.float().mean(),
                               rtol=1e-4, atol=1e-6)


def test_sd_long_sample_prompts_keep_every_windows_bos_and_eos(sd15_biased):
    sd15 = sd15_biased
    conditioner = conditioner_for(sd15, None, 2)  # SD samples take up to 3 windows even so
    with torch.no_grad():
        positive, negative = conditioner.encode_sample(LONG, "(bad:0.8)", "cpu")
        want = lpw_embeddings(sd15.tokenizer, sd15.text_encoder, [LONG_PIECES, [("bad", 0.8)]], clip_skip=2)
    assert positive.hidden.shape == negative.hidden.shape == (1, 154, want.shape[-1])  # 2 windows of 77
    torch.testing.assert_close(torch.cat([positive.hidden, negative.hidden]), want, rtol=1e-5, atol=1e-6)


def test_sd2_style_padding_in_long_sample_prompts(sdxl):
    """The v2 branch (pad token "!" != EOS): the tiny SDXL's second tokenizer with a CLIPTextModel."""
    from loracli.run.weighted_text import sample_prompt_embeddings

    tokenizer, encoder = sdxl.tokenizers[1], sdxl.text_encoders[0]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    prompts = [LONG, "short ! (x:1.1)"]
    with torch.no_grad():
        got = sample_prompt_embeddings(tokenizer, encoder, prompts, None, "cpu")
        want = lpw_embeddings(tokenizer, encoder, [LONG_PIECES, [("short ! ", 1.0), ("x", 1.1)]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sdxl_sample_prompts_use_the_training_strategy(sdxl):
    conditioner = conditioner_for(sdxl, None, None)  # weighted_captions off: samples still read weights
    with torch.no_grad():
        positive, negative = conditioner.encode_sample(CAPTION, "", "cpu")
        want = conditioner_for(sdxl, None, None, weighted=True).encode([CAPTION, ""], "cpu")
        unweighted, none = conditioner.encode_sample("a cat on a mat", None, "cpu")
    torch.testing.assert_close(positive.hidden, want.hidden[0:1])
    torch.testing.assert_close(negative.pooled, want.pooled[1:2])
    assert none is None and not torch.allclose(positive.hidden, unweighted.hidden, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_a_weighted_sample_prompt_makes_a_different_picture(sd15, scale):
    pipe = build_pipeline(sd15, "euler", False)
    images = []
    with torch.no_grad():
        for text in ("a red cat", "a (red:1.6) cat"):
            prompt = SamplePrompt(index=0, prompt=text, negative_prompt="blurry", width=64, height=64, steps=2,
                                  scale=scale)
            image = generate(pipe, conditioner_for(sd15, None, None), prompt, 1, torch.device("cpu"))
            images.append(torch.from_numpy(np.asarray(image).astype(np.float32)))
    assert (images[0] - images[1]).abs().max() > 0


# --- the loader: wildcard captions per use ------------------------------------------------------------

def test_loader_draws_a_line_and_the_wildcards_per_use(tmp_path, make_image):
    for i in range(2):
        make_image(tmp_path / "data" / "1_x" / f"{i}.png", 64, 64)
    (tmp_path / "data" / "1_x" / "0.txt").write_text("a {red|blue} cat\na dog\n")
    (tmp_path / "data" / "1_x" / "1.txt").write_text("{one|two}\nignored when off\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                   "resolution = 64\n[training]\nmax_train_epochs = 1\n")
    resolved = resolve_config(cfg, [], ["dataset.enable_wildcard=true"])
    plan = build_plan(resolved)
    first = {im.path.rsplit("/", 1)[-1]: i for i, im in enumerate(plan.images)}["0.png"]
    loader = ExampleLoader(plan, resolved.config.dataset, plan.total_steps, load_pixels_=False, seed=3)
    seen = Counter(loader([first], epoch=1, step=0).captions[0] for _ in range(600))
    assert set(seen) == {"a red cat", "a blue cat", "a dog"}
    assert abs(seen["a dog"] / 600 - 0.5) < 0.08
    off = resolve_config(cfg)
    plan_off = build_plan(off)
    loader = ExampleLoader(plan_off, off.config.dataset, plan_off.total_steps, load_pixels_=False, seed=3)
    assert {loader([first], epoch=1, step=0).captions[0] for _ in range(20)} == {"a {red|blue} cat"}
