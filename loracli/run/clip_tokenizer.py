"""The real CLIP tokenizer (ViT-L/14 for SD1.x, the same vocabulary for SD2.x), built offline.

CLIP's vocabulary is not a file of its own: it is derived from the BPE merge list
(`assets/bpe_simple_vocab_16e6.txt.gz`, MIT, see `assets/LICENSE-openai-clip.txt`):
the 256 byte characters, the same with the end-of-word marker, one token per merge
(48,894 of them), then the two special tokens: 49,408 entries. We write that as the
vocab.json + merges.txt pair transformers' CLIPTokenizer reads, once, into the cache.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
BPE_FILE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2  # 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
CACHE_NAME = "clip-vit-l-14-tokenizer-v1"


def clip_byte_chars() -> list[str]:
    """The printable-looking character CLIP uses for each byte, in CLIP's vocabulary order.

    Printable Latin-1 bytes come first and stand for themselves; the remaining bytes
    follow, mapped to code points from 256 upwards (so no token holds a space or a
    control character).
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in set(visible)]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def read_merges(bpe_file: Path = BPE_FILE) -> list[str]:
    """The merges CLIP uses: the file's first line is a header, and only the first 48,894 count."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:1 + MERGE_COUNT]
    if len(merges) != MERGE_COUNT or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_file} is not CLIP's BPE merge list")
    return merges


def clip_vocab(merges: list[str]) -> dict[str, int]:
    chars = clip_byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # a duplicate token would shift every later id
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def _write_files(folder: Path) -> None:
    merges = read_merges()
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def ensure_tokenizer_files(cache_dir: Path | None = None) -> Path:
    """The folder holding vocab.json and merges.txt, written on first use (atomically)."""
    from loracli.run.tiny_model import build_cached_folder, cache_root

    # merges.txt is written last: its presence means the folder is complete
    return build_cached_folder((cache_dir or cache_root()) / CACHE_NAME, "merges.txt", _write_files)


@lru_cache(maxsize=4)
def _load(pad_token: str, folder: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token, model_max_length=CONTEXT_LENGTH,
    )


def load_clip_tokenizer(v2: bool = False, cache_dir: Path | None = None) -> Any:
    """CLIPTokenizer for SD1.x (pads with <|endoftext|>) or SD2.x (pads with "!", id 0).

    SD2's tokenizer (stabilityai/stable-diffusion-2, which sd-scripts and diffusers load)
    differs from ViT-L/14's only in its pad token, as OpenCLIP pads with zeros.
    """
    import copy

    folder = ensure_tokenizer_files(cache_dir)
    # A copy: callers may change settings (model_max_length) without touching the cached one.
    return copy.deepcopy(_load("!" if v2 else EOS, str(folder)))
