"""Weighted captions' parser and wildcard captions, as sd-scripts reads them (torch-free).

Expected values are written out from sd-scripts' behaviour (library/strategy_base.py parse_prompt_attention,
library/train_util.py process_caption / read_caption), not computed with loracli's code.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from loracli.captions import CaptionOptions, caption_as_read, expand_wildcards, process_caption
from loracli.config.loader import resolve_config
from loracli.errors import DatasetError
from loracli.family import SD1
from loracli.lint import lint_config
from loracli.plan import build_plan
from loracli.prompt_weights import PromptWeightError, parse_prompt_attention, plain_text, weighted_token_ids
from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML

# --- the parser -----------------------------------------------------------------------------------

PARSED = [
    # sd-scripts' own examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # the rest of the grammar
    ("(cat:1.5)", [("cat", 1.5)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),  # stray closers are text
    ("ratio 16:9", [("ratio 16:9", 1.0)]),  # a colon that is no weight is text
    ("(ratio 16:9)", [("ratio 16", 9.0)]),  # ":9)" closes the bracket with weight 9
    ("x \\\\ y", [("x \\ y", 1.0)]),  # an escaped backslash
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", PARSED)
def test_parser_matches_sd_scripts(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a_weight_that_is_no_number_is_refused_with_the_text():
    with pytest.raises(PromptWeightError, match=r'"1\.2\.3" in "\(cat:1\.2\.3\)"'):
        parse_prompt_attention("(cat:1.2.3)")


def test_plain_text_drops_the_syntax():
    assert plain_text("a (cat:1.5) on [the] \\(mat\\)") == "a cat on the (mat)"


def _words(piece: str) -> list[int]:
    """A stand-in tokenizer: one token per word (ids are word lengths)."""
    return [len(w) for w in piece.split()]


def test_each_piece_tokenized_on_its_own_with_its_weight():
    ids, weights, cut = weighted_token_ids(_words, "a (big red:1.5) [cat] sits", 75)
    assert ids == [1, 3, 3, 3, 4]
    assert weights == pytest.approx([1.0, 1.5, 1.5, 1 / 1.1, 1.0])
    assert not cut


def test_weighted_tokens_are_cut_at_the_limit():
    ids, weights, cut = weighted_token_ids(_words, "one (two three four:2) five", 3)
    assert ids == [3, 3, 5] and weights == [1.0, 2.0, 2.0] and cut


# --- wildcards ------------------------------------------------------------------------------------

def opts(**kw) -> CaptionOptions:
    base = dict(caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0,
                caption_dropout_every_n_epochs=0, shuffle_caption=False, enable_wildcard=True)
    base.update(kw)
    return CaptionOptions(**base)


def draws(caption: str, o: CaptionOptions, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [process_caption(caption, o, 1, 0, 100, rng) for _ in range(n)]


def test_each_option_is_drawn_about_equally_often():
    counts = Counter(draws("a {red|green|blue} cat", opts(), 6000))
    assert set(counts) == {"a red cat", "a green cat", "a blue cat"}
    for value in counts.values():
        assert abs(value / 6000 - 1 / 3) < 0.03


def test_every_wildcard_draws_on_its_own():
    counts = Counter(draws("{a|b} {c|d}", opts(), 4000))
    assert set(counts) == {"a c", "a d", "b c", "b d"}
    assert min(counts.values()) > 850


def test_draws_are_reproducible_per_seed():
    caption = "{a|b|c|d}, {e|f|g|h}"
    assert draws(caption, opts(), 50, seed=3) == draws(caption, opts(), 50, seed=3)
    assert draws(caption, opts(), 50, seed=3) != draws(caption, opts(), 50, seed=4)


def test_doubled_braces_are_literal():
    assert expand_wildcards("{{x}} and {{a|b}}", random.Random(0)) == "{x} and {a|b}"
    # the markers sd-scripts parks "{{" on are moved aside when the caption holds them
    assert expand_wildcards("\u2985 {{y}} {z}", random.Random(0)) == "\u2985 {y} z"


def test_without_enable_wildcard_braces_stay_and_the_first_line_is_used():
    off = opts(enable_wildcard=False)
    assert draws("a {b|c}\nsecond line", off, 3) == ["a {b|c}"] * 3


def test_lines_are_alternatives_and_prefix_suffix_stick_to_the_first_and_last():
    o = opts(caption_prefix="PRE", caption_suffix="SUF")
    counts = Counter(draws("one\ntwo\nthree", o, 3000))
    # sd-scripts joins prefix and suffix to the whole text before it picks a line
    assert set(counts) == {"PRE one", "two", "three SUF"}
    for value in counts.values():
        assert abs(value / 3000 - 1 / 3) < 0.04


def _sd_scripts_process(caption: str, rate: float, rng: random.Random) -> str:
    """sd-scripts' process_caption for these options, transcribed: dropout draw, line choice, wildcard
    choices left to right, then the shuffle of the comma-split tokens."""
    if rate > 0 and rng.random() < rate:
        return ""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    tokens = [t.strip() for t in caption.strip().split(",")]
    rng.shuffle(tokens)
    return ", ".join(tokens)


def test_order_and_random_stream_follow_sd_scripts():
    caption = "{red|blue} hair, {smile|frown}, solo\nsitting, {day|night}, {1|2|3} cats"
    o = opts(caption_dropout_rate=0.2, shuffle_caption=True)
    ours, theirs = random.Random(11), random.Random(11)
    for _ in range(300):
        assert process_caption(caption, o, 1, 0, 100, ours) == _sd_scripts_process(caption, 0.2, theirs)


def test_a_dropped_caption_draws_no_wildcard():
    o = opts(caption_dropout_every_n_epochs=1)
    rng = random.Random(0)
    before = rng.getstate()
    assert process_caption("{a|b}\nc", o, 1, 0, 10, rng) == ""
    assert rng.getstate() == before


# --- reading caption files ------------------------------------------------------------------------

def _plan(tmp_path: Path, make_image, captions: dict[str, str], extra: str = "", sets: tuple[str, ...] = ()):
    data = tmp_path / "data" / "2_char"
    for stem, text in captions.items():
        make_image(data / f"{stem}.png", 64, 64)
        (data / f"{stem}.txt").write_bytes(text.encode())
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML + extra)
    return build_plan(resolve_config(cfg, [], list(sets)))


def test_multi_line_caption_files_as_sd_scripts_reads_them(tmp_path, make_image):
    plan = _plan(tmp_path, make_image, {"a": "first, x\n\n  second \r\nthird\rfourth\n", "b": "only line\n"})
    images = {Path(i.path).stem: i for i in plan.images}
    # without enable_wildcard: the first line, stripped (lines[0].strip())
    assert images["a"].caption == "first, x" and images["b"].caption == "only line"
    # with it: every non-blank line, stripped, joined by newlines
    assert caption_as_read(images["a"].caption, images["a"].caption_lines, True) == "first, x\nsecond\nthird\nfourth"
    assert caption_as_read(images["a"].caption, images["a"].caption_lines, False) == "first, x"
    assert caption_as_read(images["b"].caption, images["b"].caption_lines, True) == "only line"


# --- plan-time rules ------------------------------------------------------------------------------

def _codes(tmp_path: Path, sets: list[str]) -> dict[str, list[str]]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    resolved = resolve_config(cfg, [], sets)
    out: dict[str, list[str]] = {}
    for f in lint_config(resolved.config, SD1, resolved.origins):
        out.setdefault(f.code, []).append(f"{f.key}: {f.message}")
    return out


def test_e70_wildcards_cannot_be_cached(tmp_path):
    frozen = ["network.network_train_unet_only=true", "training.cache_text_encoder_outputs=true"]
    found = _codes(tmp_path, frozen + ["dataset.enable_wildcard=true"])
    assert "E70" in found
    assert "training.cache_text_encoder_outputs" in found["E70"][0] and "dataset.enable_wildcard" in found["E70"][0]
    assert "E70" not in _codes(tmp_path, frozen)
    assert "E70" not in _codes(tmp_path, ["dataset.enable_wildcard=true"])
    # sd-scripts caches weighted captions (SDXL's is_weighted): no rule against that pair
    assert not {"E70", "E4"} & set(_codes(tmp_path, frozen + ["training.weighted_captions=true"]))


def test_e71_a_caption_weight_that_is_no_number(tmp_path, make_image):
    with pytest.raises(DatasetError, match=r"b\.txt: \[E71\] .*1\.2\.3"):
        _plan(tmp_path, make_image, {"a": "fine (cat:1.2)", "b": "bad (cat:1.2.3)"},
              sets=("training.weighted_captions=true",))
    # without weighted_captions the brackets are plain text
    _plan(tmp_path / "off", make_image, {"a": "fine (cat:1.2)", "b": "bad (cat:1.2.3)"})


def test_e72_sample_prompt_weights_are_checked(tmp_path, make_image):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a (cat:1.3)\n# comment\nbad (dog:..) --n (x:2)\n")
    with pytest.raises(DatasetError, match=r"line 3: \[E72\]"):
        _plan(tmp_path, make_image, {"a": "cat"},
              f"[sample]\nsample_prompts = '{prompts}'\nsample_every_n_epochs = 1\n")


def test_w70_separator_inside_weight_brackets_with_shuffle(tmp_path, make_image):
    captions = {"a": "(red hair, blue eyes:1.2), solo", "b": "(red hair:1.2), \\(a, b\\)"}
    plan = _plan(tmp_path, make_image, captions, sets=("training.weighted_captions=true",))
    assert "W70" not in {w["code"] for w in plan.warnings}  # nothing reorders the tags
    plan = _plan(tmp_path / "s", make_image, captions,
                 sets=("training.weighted_captions=true", "dataset.shuffle_caption=true"))
    w70 = [w for w in plan.warnings if w["code"] == "W70"]
    assert len(w70) == 1 and w70[0]["key"].endswith("a.txt") and "1 caption(s)" in w70[0]["message"]


# --- sd-scripts export / import -------------------------------------------------------------------

def test_export_writes_and_import_reads_both_options(tmp_path):
    from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, build_export, write_export
    from loracli.sdscripts.importer import import_file, render_toml

    example = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "loracli.toml"
    original = resolve_config(example, [], ["training.weighted_captions=true", "dataset.enable_wildcard=true"])
    exported = build_export(original.config, build_plan(original))
    write_export(tmp_path / "export", exported)
    config_text = (tmp_path / "export" / CONFIG_FILE).read_text()
    dataset_text = (tmp_path / "export" / DATASET_FILE).read_text()
    assert re.search(r"^weighted_captions = true$", config_text, re.M)  # sd-scripts' --weighted_captions
    # a subset option in sd-scripts: the dataset TOML's [general], not an argument
    assert re.search(r"\[general\][^\[]*enable_wildcard = true", dataset_text)
    assert "enable_wildcard" not in config_text

    result = import_file(tmp_path / "export" / CONFIG_FILE, tmp_path / "export" / DATASET_FILE)
    assert result.unsupported == {}
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(result), encoding="utf-8")
    back = resolve_config(imported).config
    assert back.training.weighted_captions is True and back.dataset.enable_wildcard is True


def test_import_of_the_command_line_flags(tmp_path):
    from loracli.sdscripts.importer import import_file

    script = tmp_path / "train.sh"
    script.write_text("accelerate launch train_network.py --pretrained_model_name_or_path=/m "
                      "--train_data_dir=/d --weighted_captions --enable_wildcard\n")
    result = import_file(script)
    assert result.values["training"]["weighted_captions"] is True
    assert result.values["dataset"]["enable_wildcard"] is True
    assert not any("wildcard" in k or "weighted" in k for k in result.unsupported)


def test_e70_names_the_subset_that_sets_enable_wildcard(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[network]\nnetwork_train_unet_only = true\n'
                   "[training]\nmax_train_epochs = 1\ncache_text_encoder_outputs = true\n"
                   '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                   '[[datasets.subsets]]\nimage_dir = "b"\nenable_wildcard = true\n')
    resolved = resolve_config(cfg)
    found = [f for f in lint_config(resolved.config, SD1, resolved.origins) if f.code == "E70"]
    assert len(found) == 1 and "datasets[0].subsets[1].enable_wildcard" in found[0].message
