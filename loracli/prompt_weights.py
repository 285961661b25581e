"""Attention weights written into prompts and captions: "(word)", "(word:1.3)", "[word]".

The grammar is the one sd-scripts (and AUTOMATIC1111) read, with the same corner cases:

- "(" ... ")" multiplies what it encloses by 1.1, "[" ... "]" divides it by 1.1;
  "(" ... ":w)" multiplies by w instead (a number, optionally signed).
- Brackets nest, multiplying; an unclosed "(" or "[" still applies from where it opened
  to the end; a stray ")" or "]" is plain text.
- "\\(", "\\)", "\\[", "\\]" and "\\\\" are the literal characters; a lone "\\" is text.
- Neighbouring pieces with the same weight merge, so "(a)(b)" is one piece "ab" at 1.1.

Pure Python (the plan side uses it too); `loracli.run.weighted_text` turns the pieces into
token weights for the text encoders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One lexeme at a time: escapes, brackets, an explicit ":weight)", a run of plain text, or a lone ":".
_LEXEME = re.compile(
    r"""
    \\[()\[\]\\]      # an escaped bracket or backslash
    | \\              # a lone backslash
    | [(\[]           # an opening bracket
    | :([+-]?[.\d]+)\)  # ":1.3)" closes a round bracket with an explicit weight
    | [)\]]           # a closing bracket
    | [^\\()\[\]:]+   # plain text
    | :               # a colon that is not a weight
    """,
    re.VERBOSE,
)


class PromptWeightError(ValueError):
    """A ":weight)" that is no number ("(cat:1.2.3)"): sd-scripts stops with a ValueError there."""


def _number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise PromptWeightError(f'"{weight}" in "{text}" is not a weight') from None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of a prompt; never empty (an empty prompt is [("", 1.0)])."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_opens: list[int] = []
    square_opens: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])  # a lone "\" becomes "" (it carries no text), as in sd-scripts
        elif lexeme == "(":
            round_opens.append(len(pieces))
        elif lexeme == "[":
            square_opens.append(len(pieces))
        elif weight is not None and round_opens:
            scale_from(round_opens.pop(), _number(weight, text))
        elif lexeme == ")" and round_opens:
            scale_from(round_opens.pop(), ROUND_MULTIPLIER)
        elif lexeme == "]" and square_opens:
            scale_from(square_opens.pop(), SQUARE_MULTIPLIER)
        else:
            pieces.append([lexeme, 1.0])

    for start in round_opens:  # unclosed brackets apply to the end
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_opens:
        scale_from(start, SQUARE_MULTIPLIER)

    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def weighted_token_ids(encode_piece: Callable[[str], Sequence[int]], text: str, limit: int
                       ) -> tuple[list[int], list[float], bool]:
    """Token ids (no BOS/EOS) and one weight per token; each piece is tokenized on its own, as
    sd-scripts does. At most `limit` tokens; the flag says whether the text was cut."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        tokens = list(encode_piece(piece))
        ids += tokens
        weights += [weight] * len(tokens)
        if len(ids) > limit:
            break
    cut = len(ids) > limit
    return ids[:limit], weights[:limit], cut


def plain_text(text: str) -> str:
    """The prompt without its weight syntax (what the text encoder reads)."""
    return "".join(piece for piece, _ in parse_prompt_attention(text))
