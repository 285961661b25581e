"""A corpus of bad inputs: each gives its exact exit code and a one-line message
naming the key or file, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML, run_cli

GOOD = EXAMPLE_DATASET_TOML


@dataclass
class Case:
    name: str
    config: str | bytes | None = GOOD  # None: no config file written
    extra_args: list[str] = field(default_factory=list)
    exit_code: int = 2
    names: list[str] = field(default_factory=list)  # strings the error must contain
    setup: str = ""  # a dataset tweak, see prepare()
    command: str = "plan"
    files: dict[str, str] = field(default_factory=dict)  # extra text files beside the config


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


CASES = [
    Case("malformed toml", GOOD + "[network\nnetwork_dim = 4\n", names=["c.toml", "malformed TOML"]),
    Case("config file missing", None, ["--config", "nope.toml"], names=["nope.toml", "not found"]),
    Case("non-utf8 config", b"[model]\npretrained_model_name_or_path = '\xff'\n", names=["c.toml", "UTF-8"]),
    Case("unknown key with typo", GOOD + "[network]\nnetwork_dimm = 8\n",
         names=["network.network_dimm", "did you mean network.network_dim"]),
    Case("unknown section", GOOD + "[optimiser]\nlearning_rate = 1.0\n", names=["optimiser", "[optimizer]"]),
    Case("key in the wrong section", GOOD + "[network]\nlearning_rate = 1.0\n",
         names=["network.learning_rate", "[optimizer]"]),
    Case("section is not a table", "model = 3\n" + GOOD.split("[dataset]", 1)[1].join(["[dataset]", ""]),
         names=["c.toml: model", "[section] table"]),
    Case("wrong type", GOOD + "[optimizer]\nlearning_rate = 'fast'\n", names=["optimizer.learning_rate"]),
    Case("batch size zero", replace("max_train_epochs = 4", "max_train_epochs = 4\ntrain_batch_size = 0"),
         names=["training.train_batch_size"]),
    Case("negative learning rate", GOOD + "[optimizer]\nlearning_rate = -1.0\n", names=["optimizer.learning_rate"]),
    Case("unknown mixed precision", replace("max_train_epochs = 4", "max_train_epochs = 4\nmixed_precision = 'fp32'"),
         names=["training.mixed_precision"]),
    Case("missing dataset folder", GOOD, setup="no-data", exit_code=3, names=["dataset.train_data_dir", "data"]),
    Case("empty dataset", GOOD, setup="empty", exit_code=3, names=["data", "no usable images"]),
    Case("folders without repeats prefix", GOOD, setup="no-prefix", exit_code=3, names=["data"]),
    Case("corrupt image", GOOD, setup="corrupt", exit_code=3, names=["broken.png"]),
    Case("empty caption file", GOOD, setup="empty-caption", exit_code=3, names=["000.txt"]),
    Case("missing reg folder", GOOD.replace('train_data_dir = "data"', 'train_data_dir = "data"\nreg_data_dir = "reg"'),
         exit_code=3, names=["reg"]),
    Case("missing sample prompts", GOOD + "[sample]\nsample_prompts = 'prompts.txt'\n", exit_code=3,
         names=["sample.sample_prompts", "prompts.txt"]),
    Case("missing network weights", GOOD + "[network]\nnetwork_weights = 'old.safetensors'\n", exit_code=3,
         names=["network.network_weights", "old.safetensors"]),
    Case("image smaller than the bucket step", GOOD.replace("enable_bucket = true", "enable_bucket = true\n"
         "bucket_no_upscale = true"), setup="tiny-image", exit_code=3, names=["small.png"]),
    Case("unknown preset", GOOD, ["--preset", "prodigi"], names=["prodigi", "did you mean prodigy"]),
    Case("malformed preset file", GOOD, ["--preset", "bad-preset.toml"], setup="bad-preset",
         names=["bad-preset.toml"]),
    Case("alpha greater than dim (strict)", GOOD + "[network]\nnetwork_dim = 4\nnetwork_alpha = 8\n", ["--strict"],
         names=["network.network_alpha", "W1"]),
    Case("adafactor scheduler with AdamW", GOOD + "[optimizer]\nlr_scheduler = 'adafactor'\n",
         names=["optimizer.lr_scheduler", "AdaFactor"]),
    Case("constant scheduler with warmup", GOOD + "[optimizer]\nlr_warmup_steps = 10\n",
         names=["optimizer.lr_warmup_steps", "constant_with_warmup"]),
    Case("warmup float >= 1", GOOD + "[optimizer]\nlr_scheduler = 'cosine'\nlr_warmup_steps = 1.5\n",
         names=["optimizer.lr_warmup_steps", "integer"]),
    Case("max_token_length 100", replace("resolution = 128", "resolution = 128\nmax_token_length = 100"),
         names=["dataset.max_token_length", "75, 150 or 225"]),
    Case("empty output name", GOOD + "[output]\noutput_name = ''\n", names=["output.output_name"]),
    Case("min bucket above max", replace("min_bucket_reso = 64", "min_bucket_reso = 512"),
         names=["dataset.min_bucket_reso"]),
    Case("bucket step not multiple of 64", replace("max_bucket_reso = 256", "max_bucket_reso = 256\nbucket_reso_steps = 32"),
         names=["dataset.bucket_reso_steps", "64"]),
    Case("resolution outside bucket limits", replace("resolution = 128", "resolution = 512"),
         names=["dataset.resolution"]),
    Case("no epochs and no steps", replace("max_train_epochs = 4", ""), names=["training.max_train_epochs"]),
    Case("latent cache with color_aug", replace("resolution = 128", "resolution = 128\ncache_latents = true\n"
         "color_aug = true"), names=["dataset.cache_latents", "color_aug"]),
    Case("text-encoder cache with shuffled captions", replace("resolution = 128", "resolution = 128\n"
         "shuffle_caption = true") + "cache_text_encoder_outputs = true\n",
         names=["training.cache_text_encoder_outputs", "shuffle_caption"]),
    Case("unet-only and te-only", GOOD + "[network]\nnetwork_train_unet_only = true\n"
         "network_train_text_encoder_only = true\n", names=["network.network_train_unet_only"]),
    Case("--set without a value", GOOD, ["--set", "training.seed"], names=["--set training.seed"]),
    Case("--set unknown key", GOOD, ["--set", "training.sed=1"], names=["training.sed", "did you mean training.seed"]),
    Case("sampling scheduled without prompts", GOOD + "[sample]\nsample_every_n_epochs = 1\n", command="train",
         names=["sample.sample_prompts", "E13", "no prompt file"]),
    Case("bad value in a prompt file", GOOD + "[sample]\nsample_prompts = 'p.txt'\nsample_at_first = true\n",
         files={"p.txt": "a cat --w wide\n"}, exit_code=3, names=["sample.sample_prompts", "line 1", "--w"]),
    Case("pickle checkpoint without opt-in", GOOD.replace("tiny:sd15", "model.ckpt"),
         names=["model.pretrained_model_name_or_path", "E14", "allow_pickle_checkpoint"]),
    Case("unknown sampler", GOOD + "[sample]\nsample_sampler = 'euler_ancestral'\n",
         names=["sample.sample_sampler"]),
    Case("train with a bad config", GOOD + "[optimizer]\nlr_scheduler = 'adafactor'\n", command="train",
         names=["optimizer.lr_scheduler"]),
]


def prepare(tmp_path: Path, case: Case, make_image) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    data = tmp_path / "data"
    if case.setup != "no-data":
        data.mkdir()
    if case.setup in ("", "corrupt", "empty-caption", "tiny-image", "bad-preset"):
        make_image(data / "2_char" / "000.png", 128, 128)
        (data / "2_char" / "000.txt").write_text("char\n")
    if case.setup == "no-prefix":
        make_image(data / "char" / "000.png", 128, 128)
    if case.setup == "corrupt":
        (data / "2_char" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    if case.setup == "empty-caption":
        (data / "2_char" / "000.txt").write_text("")
    if case.setup == "tiny-image":
        make_image(data / "2_char" / "small.png", 40, 40)
    if case.setup == "bad-preset":
        (tmp_path / "bad-preset.toml").write_text("[preset\nname = 1\n")


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare(tmp_path, case, make_image)
    args = [case.command]
    if case.config is not None:
        cfg = tmp_path / "c.toml"
        cfg.write_bytes(case.config if isinstance(case.config, bytes) else case.config.encode())
        args += ["--config", str(cfg)]
    result = run_cli(*args, *case.extra_args)
    assert result.exit_code == case.exit_code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    for text in case.names:
        assert text in result.stderr, (text, result.stderr)
    if case.command == "train":
        assert not (tmp_path / "output").exists()  # nothing written before the config is right
