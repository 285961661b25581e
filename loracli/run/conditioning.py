"""What the UNet is conditioned on, per model family: the one seam the training loop and the
sampler go through.

SD1/SD2: one CLIP text encoder's hidden states (clip_skip, max_token_length windows).
SDXL (as sdxl_train_network.py): CLIP-L's and OpenCLIP bigG's penultimate hidden states
side by side (768 + 1280 = 2048 wide), bigG's pooled and projected EOS state (taken from
the first window), and six size numbers per image — original size, crop top-left, target
size — that diffusers' UNet embeds as `time_ids`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracli.run.step import CLIP_CONTEXT, encode_prompts, encode_windows, join_windows, tokenize_windows
from loracli.run.weighted_text import apply_window_weights, sample_prompt_embeddings, tokenize_weighted


@dataclass
class TextConditioning:
    hidden: torch.Tensor  # (B, tokens, context width)
    pooled: torch.Tensor | None = None  # (B, projection) for SDXL

    def detach(self) -> TextConditioning:
        return TextConditioning(self.hidden.detach(), None if self.pooled is None else self.pooled.detach())

    def take(self, index: int) -> TextConditioning:
        """Row `index` as a batch of one."""
        rows = slice(index, index + 1)
        return TextConditioning(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    def split(self) -> list[TextConditioning]:
        pooled = [None] * len(self.hidden) if self.pooled is None else list(self.pooled)
        return [TextConditioning(h, p) for h, p in zip(self.hidden, pooled)]

    @staticmethod
    def stack(items: Sequence[TextConditioning]) -> TextConditioning:
        hidden = torch.stack([c.hidden for c in items])
        pooled = None if items[0].pooled is None else torch.stack([c.pooled for c in items])
        return TextConditioning(hidden, pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        return TextConditioning(self.hidden.to(device, dtype),
                                None if self.pooled is None else self.pooled.to(device, dtype))


# --- SDXL ------------------------------------------------------------------------------------------

def pooled_at_eos(text_encoder, last_hidden_state: torch.Tensor, input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bigG's pooled vector: the final-normed state at the first EOS, through text_projection.

    CLIP's own pooling takes the highest token id, which is only the EOS when nothing was added
    to the vocabulary; sd-scripts looks for the EOS itself, and so does this.
    """
    index = (input_ids == eos_id).int().argmax(dim=1).to(last_hidden_state.device)
    states = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), index]
    projection = text_encoder.text_projection
    return projection(states.to(projection.weight.dtype)).to(last_hidden_state.dtype)


def encode_prompts_sdxl(tokenizers: Sequence[Any], text_encoders: Sequence[Any], captions: list[str],
                        max_token_length: int | None, device: torch.device | str) -> TextConditioning:
    """Hidden states (B, 77/152/227, w1 + w2) and the pooled vector (B, projection)."""
    ids1 = tokenize_windows(tokenizers[0], captions, max_token_length)
    ids2 = tokenize_windows(tokenizers[1], captions, max_token_length)
    hidden1, hidden2, pooled = encode_windows_sdxl(text_encoders, tokenizers[1].eos_token_id, ids1, ids2, device)
    return TextConditioning(torch.cat([hidden1, hidden2], dim=2), pooled)


def encode_windows_sdxl(text_encoders: Sequence[Any], eos_id2: int, ids1: torch.Tensor, ids2: torch.Tensor,
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, n, 77) token ids of each tokenizer → each encoder's joined hidden states and bigG's pooled vector."""
    batch, count, _ = ids1.shape
    flat1, flat2 = ids1.reshape(-1, CLIP_CONTEXT).to(device), ids2.reshape(-1, CLIP_CONTEXT).to(device)
    hidden1 = text_encoders[0](flat1, output_hidden_states=True).hidden_states[-2]  # penultimate, no final norm
    out2 = text_encoders[1](flat2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    pooled = pooled_at_eos(text_encoders[1], out2.last_hidden_state, flat2, eos_id2)
    # the first window's pooled vector
    return join_windows(hidden1, batch, count), join_windows(hidden2, batch, count), pooled[::count]


def crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' crop box for SDXL's size conditioning (BucketManager.get_crop_ltrb), in the bucket's
    pixels: the image fitted inside the bucket and centred. It ignores where a random crop fell,
    as sd-scripts does."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original[0] / original[1]
    if bucket_ar > image_ar:
        width, height = bucket[1] * image_ar, float(bucket[1])
    else:
        width, height = float(bucket[0]), bucket[0] / image_ar
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return left, top, left + width, top + height


def size_time_ids(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]],
                  flipped: Sequence[bool]) -> torch.Tensor:
    """(B, 6): original (h, w), crop top-left (top, left), target (h, w) per image; a flipped
    image's left is measured from the other side (target width − crop right)."""
    rows = []
    for (w, h), (bw, bh), flip in zip(sizes, buckets, flipped):
        left, top, right, _ = crop_ltrb((bw, bh), (w, h))
        if flip:
            left = bw - right
        rows.append([h, w, int(top), int(left), bh, bw])
    return torch.tensor(rows, dtype=torch.float32)


# --- the seam ----------------------------------------------------------------------------------------

class Conditioner:
    """SD1/SD2: text only. `weighted`: captions carry "(word:1.2)" weights (training.weighted_captions)."""

    def __init__(self, sd, max_token_length: int | None, clip_skip: int | None, weighted: bool = False):
        self.sd, self.max_token_length, self.clip_skip = sd, max_token_length, clip_skip
        self.weighted = weighted

    def encode(self, captions: list[str], device: torch.device | str) -> TextConditioning:
        if self.weighted:
            ids, weights = tokenize_weighted(self.sd.tokenizer, captions, self.max_token_length)
            hidden = encode_windows(self.sd.text_encoder, ids, self.clip_skip, device)
            return TextConditioning(apply_window_weights(hidden, weights))
        return TextConditioning(encode_prompts(self.sd.tokenizer, self.sd.text_encoder, captions,
                                               self.max_token_length, self.clip_skip, device))

    def encode_sample(self, prompt: str, negative: str | None, device: torch.device | str
                      ) -> tuple[TextConditioning, TextConditioning | None]:
        """A sample prompt and its negative (None without guidance), weights read as sd-scripts' sampler
        reads them: its long-prompt-weighting pipeline (up to 3 windows, mean kept; README)."""
        texts = [prompt] if negative is None else [prompt, negative]
        hidden = sample_prompt_embeddings(self.sd.tokenizer, self.sd.text_encoder, texts, self.clip_skip, device)
        both = TextConditioning(hidden)
        return both.take(0), None if negative is None else both.take(1)

    def unet_kwargs(self, cond: TextConditioning, sizes, buckets, flipped, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.hidden.to(dtype)}

    def pipeline_inputs(self, prompt: TextConditioning, negative: TextConditioning | None, dtype: torch.dtype
                        ) -> dict[str, Any]:
        """The embeddings a diffusers pipeline takes instead of text (it never runs the encoders itself)."""
        out = {"prompt_embeds": prompt.hidden.to(dtype)}
        if negative is not None:
            out["negative_prompt_embeds"] = negative.hidden.to(dtype)
        return out

    def identity(self) -> dict[str, Any]:
        return {"max_token_length": self.max_token_length, "clip_skip": self.clip_skip, "weighted": self.weighted,
                "configs": [dict(te.config.to_dict()) for te in self.sd.text_encoders]}


class SDXLConditioner(Conditioner):
    """SDXL: both encoders, the pooled vector and the size numbers (clip_skip does not apply)."""

    def encode(self, captions: list[str], device: torch.device | str) -> TextConditioning:
        if self.weighted:
            return self._encode_weighted(captions, device)
        return encode_prompts_sdxl(self.sd.tokenizers, self.sd.text_encoders, captions, self.max_token_length,
                                   device)

    def _encode_weighted(self, captions: list[str], device: torch.device | str) -> TextConditioning:
        """Each encoder's states times its tokens' weights; the pooled vector unweighted (sd-scripts' SDXL strategy)."""
        tokenizers = self.sd.tokenizers
        ids1, weights1 = tokenize_weighted(tokenizers[0], captions, self.max_token_length)
        ids2, weights2 = tokenize_weighted(tokenizers[1], captions, self.max_token_length)
        hidden1, hidden2, pooled = encode_windows_sdxl(self.sd.text_encoders, tokenizers[1].eos_token_id, ids1, ids2,
                                                       device)
        hidden = torch.cat([apply_window_weights(hidden1, weights1), apply_window_weights(hidden2, weights2)], dim=2)
        return TextConditioning(hidden, pooled)

    def encode_sample(self, prompt: str, negative: str | None, device: torch.device | str
                      ) -> tuple[TextConditioning, TextConditioning | None]:
        """sd-scripts' SDXL sampler weights prompts as weighted training captions are weighted."""
        texts = [prompt] if negative is None else [prompt, negative]
        both = self._encode_weighted(texts, device)
        return both.take(0), None if negative is None else both.take(1)

    def unet_kwargs(self, cond: TextConditioning, sizes, buckets, flipped, dtype: torch.dtype) -> dict[str, Any]:
        device = cond.hidden.device
        time_ids = size_time_ids(sizes, buckets, flipped).to(device, dtype)
        return {"encoder_hidden_states": cond.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}}

    def pipeline_inputs(self, prompt: TextConditioning, negative: TextConditioning, dtype: torch.dtype
                        ) -> dict[str, Any]:
        # The pipeline makes the size numbers itself: the sample's own size, no crop (as sd-scripts samples).
        out = {**super().pipeline_inputs(prompt, negative, dtype), "pooled_prompt_embeds": prompt.pooled.to(dtype)}
        if negative is not None:
            out["negative_pooled_prompt_embeds"] = negative.pooled.to(dtype)
        return out


CONDITIONERS: dict[str, type[Conditioner]] = {"sd1": Conditioner, "sd2": Conditioner, "sdxl": SDXLConditioner}


def conditioner_for(sd, max_token_length: int | None, clip_skip: int | None, weighted: bool = False) -> Conditioner:
    return CONDITIONERS[sd.family.name](sd, max_token_length, clip_skip, weighted)


# --- cached text-encoder outputs ----------------------------------------------------------------------

class TextCache:
    """cache_text_encoder_outputs: each caption encoded once, kept in memory (and on disk with
    cache_text_encoder_outputs_to_disk, keyed by the caption and everything that changes its encoding:
    model, encoder configs, max_token_length, clip_skip)."""

    def __init__(self, conditioner: Conditioner, model_name: str, disk_dir: Path | None):
        self.conditioner = conditioner
        self.disk_dir = disk_dir
        self.memory: dict[str, TextConditioning] = {}
        ident = json.dumps({"model": model_name, **conditioner.identity()}, sort_keys=True, default=str)
        self.identity = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.encoded = 0

    def _path(self, caption: str) -> Path | None:
        if self.disk_dir is None:
            return None
        key = hashlib.sha256(f"{self.identity}\n{caption}".encode()).hexdigest()
        return self.disk_dir / f"{key}.safetensors"

    def fill(self, captions: Sequence[str], device: torch.device | str, batch_size: int) -> None:
        from safetensors.torch import load_file

        todo = []
        for caption in dict.fromkeys(captions):
            path = self._path(caption)
            if caption in self.memory:
                continue
            if path is not None and path.is_file():
                data = load_file(str(path))
                self.memory[caption] = TextConditioning(data["hidden"], data.get("pooled"))
            else:
                todo.append(caption)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            with torch.no_grad():
                encoded = self.conditioner.encode(chunk, device).detach().to("cpu", torch.float32)
            for caption, cond in zip(chunk, encoded.split()):
                self.memory[caption] = cond
                self._save(caption, cond)
            self.encoded += len(chunk)

    def _save(self, caption: str, cond: TextConditioning) -> None:
        path = self._path(caption)
        if path is None:
            return
        from loracli.run.saving import atomic_save_safetensors

        tensors = {"hidden": cond.hidden.contiguous()}
        if cond.pooled is not None:
            tensors["pooled"] = cond.pooled.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, {}, path)

    def __call__(self, captions: list[str], device: torch.device | str) -> TextConditioning:
        missing = [c for c in captions if c not in self.memory]
        if missing:  # a caption the plan did not foresee: encode it now
            self.fill(missing, device, len(missing))
        return TextConditioning.stack([self.memory[c] for c in captions]).to(device)
