"""Prompt weights ("(word:1.2)") applied to text-encoder outputs, as sd-scripts applies them.

Two formulas, because sd-scripts has two:

- Training with weighted_captions (SD1/SD2/SDXL), and SDXL sample images: the caption is cut into
  (text, weight) pieces, each piece tokenized on its own, padded and split into 77-token windows
  exactly like an unweighted caption; every hidden state of a token is multiplied by its weight
  (BOS/EOS/padding by 1). Nothing is rescaled, and SDXL's pooled vector is left unweighted.
- SD1/SD2 sample images (its long-prompt-weighting pipeline): the prompt and the negative prompt get
  as many windows as the longer one needs (1 to 3, whatever max_token_length says); the padding is
  EOS; every window keeps its own BOS and EOS (77·n states, not 2 + 75·n); after weighting, each
  prompt's embedding is rescaled so its mean over tokens and channels is the unweighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loracli.prompt_weights import weighted_token_ids
from loracli.run.step import CLIP_BODY, CLIP_CONTEXT, _final_layer_norm, split_windows

SAMPLE_MAX_WINDOWS = 3  # the long-prompt-weighting pipeline's max_embeddings_multiples


def _piece_ids(tokenizer) -> Callable[[str], list[int]]:
    return lambda piece: tokenizer(piece).input_ids[1:-1]  # without BOS/EOS, as sd-scripts tokenizes a piece


def tokenize_weighted(tokenizer, captions: Sequence[str], max_token_length: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights, both (B, n, 77), windowed as `tokenize_windows` windows plain captions."""
    length = CLIP_CONTEXT if max_token_length is None else max_token_length + 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, weight_rows = [], []
    for caption in captions:
        ids, weights, _ = weighted_token_ids(_piece_ids(tokenizer), caption, length - 2)
        rows.append([bos] + ids + [eos] + [pad] * (length - 2 - len(ids)))
        weight_rows.append([1.0] + weights + [1.0] * (length - 1 - len(weights)))
    windows = split_windows(torch.tensor(rows, dtype=torch.long), tokenizer)
    flat = torch.tensor(weight_rows, dtype=torch.float32)
    if length == CLIP_CONTEXT:
        return windows, flat.unsqueeze(1)
    weights = torch.ones(windows.shape, dtype=torch.float32)
    for window, start in enumerate(range(1, length - CLIP_CONTEXT + 2, CLIP_BODY)):
        weights[:, window, 1:1 + CLIP_BODY] = flat[:, start:start + CLIP_BODY]
    return windows, weights


def apply_window_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden (B, 2 + 75·n, C) from joined windows, weights (B, n, 77): each token's states times its weight."""
    weights = weights.to(hidden.device, hidden.dtype)
    if weights.shape[1] == 1:
        return hidden * weights[:, 0, :, None]
    scale = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
    for window in range(weights.shape[1]):
        body = slice(window * CLIP_BODY + 1, window * CLIP_BODY + 1 + CLIP_BODY)
        scale[:, body] = weights[:, window, 1:-1]
    return hidden * scale[:, :, None]


# --- SD1/SD2 sample prompts (the long-prompt-weighting pipeline) -----------------------------------

def _lpw_tokens(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Ids (B, 2 + 75·n) padded with EOS, weights (B, 77·n: one per state of the n windows) and n."""
    limit = CLIP_BODY * SAMPLE_MAX_WINDOWS
    parsed = [weighted_token_ids(_piece_ids(tokenizer), p, limit)[:2] for p in prompts]
    longest = max(len(ids) for ids, _ in parsed)
    count = max(1, min(SAMPLE_MAX_WINDOWS, (longest - 1) // CLIP_BODY + 1))
    length = CLIP_BODY * count + 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[bos] + t + [eos] * (length - 1 - len(t)) for t, _ in parsed], dtype=torch.long)
    weights = torch.ones(len(prompts), CLIP_CONTEXT * count)
    for row, (_, w) in enumerate(parsed):
        for k, value in enumerate(w):  # token k sits in window k // 75, after that window's BOS
            weights[row, (k // CLIP_BODY) * CLIP_CONTEXT + 1 + k % CLIP_BODY] = value
    return ids, weights, count


def _lpw_hidden(text_encoder, tokens: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None or clip_skip == 1:
        return text_encoder(tokens).last_hidden_state
    out = text_encoder(tokens, output_hidden_states=True)
    return _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def sample_prompt_embeddings(tokenizer, text_encoder, prompts: Sequence[str], clip_skip: int | None,
                             device: torch.device | str) -> torch.Tensor:
    """(B, 77·n, C): the prompts (a prompt and its negative share n) as sd-scripts' SD1/SD2 sampler encodes them."""
    ids, weights, count = _lpw_tokens(tokenizer, prompts)
    ids = ids.to(device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if count == 1:
        hidden = _lpw_hidden(text_encoder, ids, clip_skip)
    else:
        parts = []
        for window in range(count):
            chunk = ids[:, window * CLIP_BODY:(window + 1) * CLIP_BODY + 2].clone()
            chunk[:, 0] = ids[0, 0]
            if pad == eos:
                chunk[:, -1] = ids[0, -1]
            else:  # SD2: a window that ends in text ends with EOS; one that starts with the pad token, with EOS
                ends_in_text = (chunk[:, -1] != eos) & (chunk[:, -1] != pad)
                chunk[:, -1] = torch.where(ends_in_text, torch.full_like(chunk[:, -1], eos), chunk[:, -1])
                chunk[:, 1] = torch.where(chunk[:, 1] == pad, torch.full_like(chunk[:, 1], eos), chunk[:, 1])
            parts.append(_lpw_hidden(text_encoder, chunk, clip_skip))
        hidden = torch.cat(parts, dim=1)
    weights = weights.to(hidden.device, hidden.dtype)
    previous_mean = hidden.float().mean(dim=[-2, -1]).to(hidden.dtype)
    hidden = hidden * weights[:, :, None]
    current_mean = hidden.float().mean(dim=[-2, -1]).to(hidden.dtype)
    return hidden * (previous_mean / current_mean)[:, None, None]
