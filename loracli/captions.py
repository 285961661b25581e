"""Caption processing applied every time an example is fetched (sd-scripts order).

Pure python on purpose: the plan side and the data loader both use it, and the
randomness comes from an explicit `random.Random` so runs are reproducible.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    shuffle_caption: bool
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    enable_wildcard: bool = False


def _pieces(text: str, separator: str, drop_empty: bool) -> list[str]:
    # The schema refuses an empty separator; a library caller passing one gets the caption as one token.
    tokens = [t.strip() for t in text.split(separator)] if separator else [text.strip()]
    return [t for t in tokens if t] if drop_empty else tokens


def _split_tokens(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix, flexible, fixed suffix) tokens of one caption."""
    sep = opts.caption_separator
    kts = opts.keep_tokens_separator
    if kts and kts in caption:
        # before the 1st separator: fixed; between 1st and 2nd: flexible; after the 2nd: fixed.
        fixed_part, flex_part = caption.split(kts, 1)
        suffix: list[str] = []
        if kts in flex_part:
            flex_part, suffix_part = flex_part.split(kts, 1)
            suffix = _pieces(suffix_part, sep, drop_empty=True)
        return _pieces(fixed_part, sep, True), _pieces(flex_part, sep, True), suffix
    # keep_tokens path: empty pieces stay (a trailing comma leaves an empty token), as in sd-scripts.
    tokens = _pieces(caption.strip(), sep, drop_empty=False)
    if opts.keep_tokens > 0:
        return tokens[: opts.keep_tokens], tokens[opts.keep_tokens :], []
    return [], tokens, []


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Each "{a|b|c}" becomes one of its options, drawn left to right; "{{" and "}}" are literal braces."""
    # Park the escaped braces on markers the caption does not hold (sd-scripts' trick), then restore them.
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def caption_as_read(first_line: str, lines: Sequence[str], enable_wildcard: bool) -> str:
    """What sd-scripts reads from a caption file: its first line; with enable_wildcard every non-blank
    line, joined by newlines (process_caption then picks one per use)."""
    return "\n".join(lines) if enable_wildcard and lines else first_line


def _warmup_steps(opts: CaptionOptions, max_train_steps: int) -> float:
    # A value below 1 is a ratio of the whole run (sd-scripts overwrites it on first use).
    if opts.token_warmup_step < 1:
        return math.floor(opts.token_warmup_step * max_train_steps)
    return opts.token_warmup_step


def process_caption(
    caption: str, opts: CaptionOptions, epoch: int, step: int, max_train_steps: int, rng: random.Random
) -> str:
    """The caption the model sees for this fetch. `epoch` is 1-based, `step` the global step."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    # Only draw from the rng when the rate is set, so other options don't shift the stream.
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""

    if opts.enable_wildcard:
        # A caption file's lines (read with enable_wildcard) are alternatives: one per fetch. The prefix
        # and suffix were joined to the whole text, so they stay on the first / last line, as in sd-scripts.
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = _warmup_steps(opts, max_train_steps)
    if opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tokens(caption, opts)
        if warmup and step < warmup:
            count = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
            flex = flex[:count]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption
