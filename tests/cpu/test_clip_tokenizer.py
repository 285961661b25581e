"""The CLIP tokenizer built from the shipped BPE file gives CLIP ViT-L/14's exact token ids.

The expected ids (tests/data/clip_token_ids.json) come from OpenAI's reference
tokenizer, run outside loracli; "a photo of a cat" also matches the ids published
for ViT-L/14.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from loracli.run import clip_tokenizer as ct
from loracli.run.step import tokenize_windows

DATA = json.loads((Path(__file__).parents[1] / "data" / "clip_token_ids.json").read_text(encoding="utf-8"))
PROMPTS = DATA["prompts"]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokcache")


@pytest.fixture(scope="module")
def sd1(cache):
    return ct.load_clip_tokenizer(v2=False, cache_dir=cache)


@pytest.fixture(scope="module")
def sd2(cache):
    return ct.load_clip_tokenizer(v2=True, cache_dir=cache)


def test_known_prompts_cover_what_captions_hold():
    assert len(PROMPTS) >= 10
    texts = [p["prompt"] for p in PROMPTS]
    assert texts[0] == "a photo of a cat" and PROMPTS[0]["ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert any("(masterpiece:1.2)" in t for t in texts)  # weights syntax
    assert any(any(c.isupper() for c in t) for t in texts)
    assert any(any(c.isdigit() for c in t) for t in texts)
    assert any(any(ord(c) > 127 for c in t) for t in texts)  # accents, CJK, emoji
    assert any(len(p["ids"]) > 77 for p in PROMPTS)  # longer than one window


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: c["prompt"][:30])
def test_exact_ids(sd1, case):
    assert sd1(case["prompt"]).input_ids == case["ids"]


def test_vocabulary_is_clips(sd1, cache):
    assert len(sd1) == ct.VOCAB_SIZE == 49408
    vocab = json.loads((cache / ct.CACHE_NAME / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    merges = (cache / ct.CACHE_NAME / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == ct.MERGE_COUNT == 48894


def test_padded_and_truncated_to_77_as_sd_uses(sd1, sd2):
    short, long = PROMPTS[0], max(PROMPTS, key=lambda p: len(p["ids"]))
    ids = sd1([short["prompt"], long["prompt"]], padding="max_length", truncation=True, max_length=77).input_ids
    assert ids[0] == short["ids"] + [EOS] * (77 - len(short["ids"]))  # SD1 pads with <|endoftext|>
    assert ids[1] == long["ids"][:76] + [EOS]  # truncation keeps the closing EOS
    ids2 = sd2(short["prompt"], padding="max_length", truncation=True, max_length=77).input_ids
    assert ids2 == short["ids"] + [0] * (77 - len(short["ids"]))  # SD2 pads with "!" (id 0)
    assert sd1.pad_token_id == EOS and sd2.pad_token_id == 0 and sd1.model_max_length == 77


def test_long_captions_split_into_windows(sd1):
    long = max(PROMPTS, key=lambda p: len(p["ids"]))
    windows = tokenize_windows(sd1, [long["prompt"]], 150)[0]
    body = long["ids"][1:-1]
    assert windows.shape == (2, 77)
    assert windows[0].tolist() == [BOS, *body[:75], EOS]
    rest = body[75:150]
    assert 0 < len(rest) < 75 and windows[1].tolist() == [BOS, *rest, *[EOS] * (75 - len(rest)), EOS]


def test_files_written_once_atomically_and_reused(tmp_path):
    folder = ct.ensure_tokenizer_files(tmp_path)
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert ct.ensure_tokenizer_files(tmp_path) == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [ct.CACHE_NAME]  # no temp folder left behind


def test_shipped_bpe_file_and_licence():
    data = ct.BPE_FILE.read_bytes()
    assert hashlib.md5(data).hexdigest() == "933b7abbbbde62c36f02f0e6ccde464f"
    assert gzip.decompress(data).startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2\n')
    licence = (ct.ASSETS / "LICENSE-openai-clip.txt").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
