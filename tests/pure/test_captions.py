"""Caption processing follows sd-scripts' order and quirks (reference §6.5)."""

from __future__ import annotations

import random

import pytest

from loracli.captions import CaptionOptions, process_caption


def opts(**kw) -> CaptionOptions:
    base = dict(caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0,
                caption_dropout_every_n_epochs=0, shuffle_caption=False)
    base.update(kw)
    return CaptionOptions(**base)


def run(caption: str, o: CaptionOptions, seed: int = 0, epoch: int = 1, step: int = 0, total: int = 100) -> str:
    return process_caption(caption, o, epoch, step, total, random.Random(seed))


def test_no_options_leaves_caption_unchanged():
    assert run("a cat,  sitting ,on a mat", opts()) == "a cat,  sitting ,on a mat"


def test_prefix_and_suffix_join_with_spaces():
    assert run("cat", opts(caption_prefix="photo of", caption_suffix="high quality")) == "photo of cat high quality"


def test_prefix_takes_part_in_the_token_stage():
    # The prefix is glued to the first token, so with keep_tokens=1 it stays first together with it.
    out = run("a, b, c, d", opts(caption_prefix="pfx", shuffle_caption=True, keep_tokens=1), seed=5)
    assert out.split(", ")[0] == "pfx a"


def test_shuffle_rejoins_with_comma_space_and_uses_the_rng():
    out = run("x; y; z", opts(shuffle_caption=True, caption_separator=";"), seed=1)
    expected = ["x", "y", "z"]
    random.Random(1).shuffle(expected)
    assert out == ", ".join(expected)


def test_custom_separator_is_rejoined_with_comma_whenever_the_token_stage_runs():
    # A finished token warmup turns the token stage on without any randomness.
    o = opts(caption_separator=";", token_warmup_step=1)
    assert run("x;y; z", o, step=5) == "x, y, z"


def test_keep_tokens_alone_does_nothing():
    caption = "a,b ,  c,"
    assert run(caption, opts(keep_tokens=2)) == caption


def test_keep_tokens_fixes_the_first_tokens():
    for seed in range(20):
        out = run("a, b, c, d, e, f", opts(shuffle_caption=True, keep_tokens=2), seed=seed)
        parts = out.split(", ")
        assert parts[:2] == ["a", "b"]
        assert sorted(parts[2:]) == ["c", "d", "e", "f"]


def test_keep_tokens_shuffle_matches_seeded_rng():
    out = run("a, b, c, d, e", opts(shuffle_caption=True, keep_tokens=1), seed=7)
    flex = ["b", "c", "d", "e"]
    random.Random(7).shuffle(flex)
    assert out == ", ".join(["a"] + flex)


def test_trailing_comma_leaves_an_empty_token_with_keep_tokens():
    out = run("a, b, c,", opts(shuffle_caption=True, keep_tokens=1), seed=3)
    flex = ["b", "c", ""]
    random.Random(3).shuffle(flex)
    assert out == ", ".join(["a"] + flex)
    assert sorted(out.split(", ")) == ["", "a", "b", "c"]


def test_keep_tokens_separator_fixed_flexible_and_fixed_suffix():
    caption = "a, b ||| c, d, e ||| f, g"
    seen = set()
    for seed in range(30):
        out = run(caption, opts(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5), seed=seed)
        parts = out.split(", ")
        assert parts[:2] == ["a", "b"] and parts[-2:] == ["f", "g"]
        assert sorted(parts[2:5]) == ["c", "d", "e"]
        seen.add(tuple(parts[2:5]))
    assert len(seen) > 1  # the middle really is shuffled


def test_keep_tokens_separator_removes_empty_pieces():
    out = run("a,, ||| b,,c,", opts(shuffle_caption=True, keep_tokens_separator="|||"), seed=0)
    parts = out.split(", ")
    assert parts[0] == "a" and sorted(parts[1:]) == ["b", "c"]


def test_keep_tokens_separator_only_once_has_no_suffix():
    out = run("a ||| b, c", opts(shuffle_caption=True, keep_tokens_separator="|||"), seed=4)
    flex = ["b", "c"]
    random.Random(4).shuffle(flex)
    assert out == ", ".join(["a"] + flex)


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    out = run("a, b, c", opts(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1), seed=0)
    assert out.startswith("a, ")


def test_whole_caption_dropout_rate():
    assert run("a, b", opts(caption_dropout_rate=1.0)) == ""
    # seeded: dropped exactly when the first draw is below the rate
    for seed in range(10):
        draw = random.Random(seed).random()
        out = run("a, b", opts(caption_dropout_rate=0.5), seed=seed)
        assert out == ("" if draw < 0.5 else "a, b")


def test_dropout_every_n_epochs_is_one_based():
    o = opts(caption_dropout_every_n_epochs=2)
    results = {e: run("cat", o, epoch=e) for e in range(1, 7)}
    assert results == {1: "cat", 2: "", 3: "cat", 4: "", 5: "cat", 6: ""}


def test_only_the_first_line_is_used():
    assert run("first line\nsecond line", opts()) == "first line"


def test_tag_dropout_only_drops_flexible_tokens():
    assert run("a, b, c, d", opts(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "a"
    rng = random.Random(11)
    kept = [t for t in ["b", "c", "d", "e"] if rng.random() >= 0.5]
    assert run("a, b, c, d, e", opts(caption_tag_dropout_rate=0.5, keep_tokens=1), seed=11) == ", ".join(["a"] + kept)


def test_shuffle_happens_before_tag_dropout():
    rng = random.Random(9)
    flex = ["a", "b", "c", "d", "e"]
    rng.shuffle(flex)
    flex = [t for t in flex if rng.random() >= 0.3]
    o = opts(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    assert run("a, b, c, d, e", o, seed=9) == ", ".join(flex)


@pytest.mark.parametrize("step,expected", [(0, "a"), (5, "a, b, c"), (9, "a, b, c, d"), (10, "a, b, c, d, e")])
def test_token_warmup_cuts_flexible_tokens_in_file_order(step, expected):
    # floor(step * (5 - 1) / 10) + 1 tokens before step 10
    assert run("a, b, c, d, e", opts(token_warmup_step=10, token_warmup_min=1), step=step) == expected


def test_token_warmup_ratio_uses_max_train_steps():
    o = opts(token_warmup_step=0.5, token_warmup_min=1)  # 0.5 * 20 = 10 warmup steps
    assert run("a, b, c, d, e", o, step=5, total=20) == "a, b, c"
    assert run("a, b, c, d, e", o, step=10, total=20) == "a, b, c, d, e"


def test_token_warmup_keeps_fixed_tokens():
    o = opts(token_warmup_step=10, token_warmup_min=1, keep_tokens=2)
    assert run("a, b, c, d, e", o, step=0) == "a, b, c"


def test_secondary_separator_moves_as_one_tag():
    o = opts(shuffle_caption=True, secondary_separator=";;;")
    outs = {run("sky;;;cloud, tree, grass", o, seed=s) for s in range(20)}
    for out in outs:
        assert sorted(out.split(", ")) == ["grass", "sky,cloud", "tree"]
    assert len(outs) > 1


def test_secondary_separator_replaced_without_token_stage():
    assert run("sky;;;cloud", opts(secondary_separator=";;;")) == "sky,cloud"
    assert run("sky;;;cloud", opts(secondary_separator=";;;", caption_separator="|")) == "sky|cloud"


def test_rng_not_consumed_without_random_options():
    rng = random.Random(1)
    before = rng.getstate()
    process_caption("a, b, c", opts(keep_tokens=1), 1, 0, 10, rng)
    assert rng.getstate() == before
