"""Plan-time rules for weighted and wildcard captions (codes E70-E79, W70-W79).

Called from loracli.lint: `caption_config_findings` with the config rules, `caption_data_findings`
with the dataset rules (it reads the scanned captions and the sample prompt file).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from loracli.config.schema import LoracliConfig
from loracli.errors import DatasetError, Problem
from loracli.prompt_weights import PromptWeightError, parse_prompt_attention

if TYPE_CHECKING:
    from loracli.dataset.scan import DatasetScan
    from loracli.lint import Finding

SD_WEIGHTS = "sd-scripts library/strategy_base.py (weighted captions)"
SD_CAPTIONS = "sd-scripts library/train_util.py (process_caption)"
WEIGHT_HINT = "write the weight as a number, e.g. (word:1.2), or escape literal brackets as \\( \\)"


def _settings(config: LoracliConfig, key: str) -> Iterator[tuple[str, object]]:
    """(where, value) of a dataset option: [dataset], then every [[datasets]] table and subset that sets it."""
    yield f"dataset.{key}", getattr(config.dataset, key)
    for d, entry in enumerate(getattr(config, "datasets", None) or []):
        value = getattr(entry, key, None)
        if value is not None:
            yield f"datasets[{d}].{key}", value
        for s, subset in enumerate(getattr(entry, "subsets", None) or []):
            value = getattr(subset, key, None)
            if value is not None:
                yield f"datasets[{d}].subsets[{s}].{key}", value


def _first_on(config: LoracliConfig, key: str) -> str | None:
    return next((where for where, value in _settings(config, key) if value), None)


def caption_config_findings(config: LoracliConfig) -> list[Finding]:
    from loracli.lint import Finding

    out: list[Finding] = []
    tr = config.training
    wildcard = _first_on(config, "enable_wildcard")
    # E70: a wildcard caption changes at every use, so no single encoding of it can be cached. sd-scripts
    # does not refuse it, but caches the caption text as read ("{a|b}" and all its lines) and trains on that.
    if wildcard and (tr.cache_text_encoder_outputs or tr.cache_text_encoder_outputs_to_disk):
        cache_key = "training.cache_text_encoder_outputs" + ("" if tr.cache_text_encoder_outputs else "_to_disk")
        out.append(Finding("error", "E70", cache_key,
                           f"cannot be combined with {wildcard}: wildcard captions are drawn anew at every use, "
                           "so their encodings cannot be cached (sd-scripts would encode the raw \"{a|b}\" text)",
                           "turn one of them off", SD_CAPTIONS))
    return out


def _separator_inside_brackets(caption: str, separator: str) -> bool:
    """Whether a caption separator sits inside "(...)" or "[...]" (escaped brackets do not count)."""
    depth, i = 0, 0
    while i < len(caption):
        char = caption[i]
        if char == "\\":
            i += 2
            continue
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif depth and caption.startswith(separator, i):
            return True
        i += 1
    return False


def caption_data_findings(config: LoracliConfig, scan: DatasetScan) -> list[Finding]:
    """W70 findings; E71/E72 (a caption or sample prompt whose weight is no number) raise a DatasetError."""
    from loracli.lint import Finding

    out: list[Finding] = []
    problems: list[Problem] = []
    if config.training.weighted_captions:
        bad: list[tuple[str, str]] = []
        split: list[str] = []
        reorders = any(_first_on(config, key) for key in ("shuffle_caption", "caption_tag_dropout_rate",
                                                          "token_warmup_step"))
        separator = config.dataset.caption_separator
        for subset in scan.subsets:
            for image in subset.images:
                for caption in image.caption_lines or (image.caption,):
                    try:
                        parse_prompt_attention(caption)
                    except PromptWeightError as exc:
                        bad.append((str(image.caption_path or image.path), str(exc)))
                    if reorders and _separator_inside_brackets(caption, separator):
                        split.append(str(image.caption_path or image.path))
        # E71: sd-scripts stops at the first step that meets such a caption (float() of the weight fails).
        problems += [Problem(where, f"[E71] {message}", WEIGHT_HINT)
                     for where, message in bad]
        # W70: shuffle/tag dropout split captions at the separator, brackets and all.
        if split:
            out.append(Finding("warning", "W70", split[0],
                               f"{len(split)} caption(s) hold the caption separator {separator!r} inside weight "
                               "brackets; shuffle_caption / caption_tag_dropout_rate / token_warmup split them "
                               "there, which moves or drops half a bracket",
                               "put one tag per bracket: (red hair:1.2), (blue eyes:1.2)", SD_WEIGHTS))
    prompts = config.sample.sample_prompts
    if prompts is not None and prompts.is_file():
        from loracli.sample_prompts import read_prompt_file

        for p in read_prompt_file(prompts):
            for text in (p.prompt, p.negative_prompt):
                try:
                    parse_prompt_attention(text)
                except PromptWeightError as exc:
                    # E72: sample prompts are always read with weights (sd-scripts' sampling pipelines).
                    problems.append(Problem(f"sample.sample_prompts: {prompts} line {p.line}", f"[E72] {exc}",
                                            WEIGHT_HINT))
    if problems:  # a data file is wrong: exit 3, like every other unreadable input
        raise DatasetError(problems)
    return out
