"""`loracli export sd-scripts`: every emitted option is one train_network.py accepts, in the form it parses."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.config.schema import all_keys
from loracli.errors import ConfigError
from loracli.plan import build_plan
from loracli.sdscripts import options
from loracli.sdscripts.export import Export, build_export, shell_command, training_args, write_export
from tests.pure.cli_helpers import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"
TEST_TABLE = ROOT / "tests" / "data" / "sdscripts" / "train_network_options.json"
PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.toml"))
# Presets are partial: each is exported on top of the example (which brings a model and a dataset).
CASES = [[]] + [[p] for p in PRESETS] + [["prodigy", "locon"], ["dadapt-v3", "locon"]]
# The dataset TOML's keys, per level (sd-scripts' config_util schema, as the reference lists it).
DATASET_LEVEL = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                 "bucket_reso_steps", "bucket_no_upscale", "network_multiplier", "validation_split",
                 "validation_seed", "resize_interpolation"}
ALL_LEVELS = {"num_repeats", "shuffle_caption", "flip_aug", "color_aug", "random_crop", "enable_wildcard",
              "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator", "caption_prefix",
              "caption_suffix", "face_crop_aug_range", "token_warmup_min", "token_warmup_step", "custom_attributes",
              "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
              "caption_extension", "class_tokens", "cache_info", "resize_interpolation"}
SUBSET_ONLY = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"}


def model_sets(presets: list[str]) -> list[str]:
    """SDXL presets refuse the example's SD1 model (they are exported with the built-in tiny SDXL one) and its
    caption shuffling (the example file wins over presets; cached text-encoder outputs cannot shuffle)."""
    if not any(p.startswith("sdxl") for p in presets):
        return []
    return ['model.pretrained_model_name_or_path="tiny:sdxl"', "dataset.shuffle_caption=false"]


def export_for(presets: list[str], sets: list[str] | None = None) -> Export:
    resolved = resolve_config(EXAMPLE, presets, model_sets(presets) + (sets or []))
    return build_export(resolved.config, build_plan(resolved))


def test_committed_option_table_is_the_shipped_one():
    shipped = json.loads((ROOT / "loracli" / "sdscripts" / "train_network_options.json").read_text())
    assert json.loads(TEST_TABLE.read_text()) == shipped
    assert {"network_args", "optimizer_args", "dataset_config", "config_file"} <= set(shipped["options"])


def test_mapping_covers_every_config_key_and_reads_both_ways():
    keys = {f"{section}.{key}" for section, names in all_keys().items() for key in names}
    assert {m.key for m in options.MAPPINGS} == keys
    table = options.load_option_table()
    sdxl_table = options.load_option_table("sdxl_train_network.py")
    for m in options.MAPPINGS:
        assert sum(bool(x) for x in (m.arg, m.dataset, m.subsets, m.network_arg, m.accelerate, m.unsupported,
                                     m.selects_script)) >= 1
        if m.arg:
            assert m.arg in (sdxl_table if m.only_script == "sdxl_train_network.py" else table), m.key
            assert m.arg in sdxl_table, m.key  # the SDXL script takes every train_network.py option
            assert options.key_for_arg(m.arg) == m.key
        if m.dataset:
            assert options.key_for_dataset_key(m.dataset) == m.key
        if m.network_arg:
            assert options.key_for_network_arg(m.network_arg) == m.key
    assert options.key_for_arg("network_args") is None


def _parse(tokens: list[str], script: str = "train_network.py"):
    return options.build_parser(script).parse_args(tokens)


@pytest.mark.parametrize("presets", CASES, ids=lambda p: "+".join(p) or "example")
def test_exported_arguments_parse_with_train_network_options(presets, tmp_path):
    exp = export_for(presets)
    flat = exp.flat_args()
    tokens = [t for name, value in flat.items() for t in options.cli_tokens(name, value, exp.script)]
    parsed = _parse(tokens, exp.script)  # argparse exits (SystemExit) on an unknown option or a bad value
    for name, value in flat.items():
        got = getattr(parsed, name)
        if isinstance(value, list):
            spec = options.load_option_table(exp.script)[name]
            assert got == [options._CONVERTERS[spec.type](str(v)) for v in value]
        elif isinstance(value, bool):
            assert got is value
        else:
            assert got == value, name
    for item in flat.get("optimizer_args", []):
        key, _, literal = item.partition("=")
        assert key.isidentifier()
        ast.literal_eval(literal)  # sd-scripts reads each value this way
    for item in flat.get("network_args", []):
        key, sep, value = item.partition("=")
        assert sep and key.isidentifier() and value and "=" not in value

    # train.sh's command line: the accelerate part, then a train_network.py command line that parses too
    command = shlex.split(shell_command(tmp_path / "out dir", exp.num_processes, exp.script))
    script = command.index(exp.script)
    assert command[:2] == ["accelerate", "launch"]
    assert exp.script == ("sdxl_train_network.py" if model_sets(presets) else "train_network.py")
    script_args = _parse(command[script + 1:], exp.script)
    assert script_args.config_file == str(tmp_path / "out dir" / "config.toml")
    assert script_args.dataset_config == str(tmp_path / "out dir" / "dataset.toml")


@pytest.mark.parametrize("presets", CASES, ids=lambda p: "+".join(p) or "example")
def test_dataset_toml_uses_only_keys_sd_scripts_allows(presets):
    exp = export_for(presets)
    data = exp.dataset
    assert set(data) == {"general", "datasets"}
    assert set(data["general"]) <= ALL_LEVELS | DATASET_LEVEL
    (dataset,) = data["datasets"]
    assert set(dataset) - {"subsets"} <= ALL_LEVELS | DATASET_LEVEL
    for subset in dataset["subsets"]:
        assert set(subset) <= ALL_LEVELS | SUBSET_ONLY
        assert Path(subset["image_dir"]).is_absolute() and Path(subset["image_dir"]).is_dir()


def test_example_exports_its_folders_and_values():
    exp = export_for(["prodigy", "locon"])
    subsets = exp.dataset["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"], s["is_reg"]) for s in subsets] == [
        ("1_scenery", 1, "scenery", False), ("2_tinychar", 2, "tinychar", False)]
    general = exp.dataset["general"]
    assert general["caption_extension"] == ".txt"  # written out: sd-scripts would default to .caption
    assert general["shuffle_caption"] is True and general["keep_tokens"] == 1
    dataset = exp.dataset["datasets"][0]
    assert dataset["resolution"] == 128 and dataset["batch_size"] == 2 and dataset["enable_bucket"] is True
    flat = exp.flat_args()
    assert flat["network_module"] == "lycoris.kohya"
    assert flat["network_args"] == ["algo=locon", "preset=lycoris_preset.toml", "conv_dim=8", "conv_alpha=1"]
    assert flat["optimizer_args"] == ["decouple=True", "weight_decay=0.01", "d_coef=2", "use_bias_correction=True",
                                      "safeguard_warmup=False", "betas=(0.9,0.999)"]
    assert flat["resolution"] == "128,128" and flat["max_train_epochs"] == 4 and "max_train_steps" not in flat
    assert flat["sdpa"] is True and flat["min_snr_gamma"] == 5


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_algorithms_go_through_network_args(algo):
    flat = export_for(["locon"], [f'network.algo="{algo}"']).flat_args()
    assert flat["network_module"] == "lycoris.kohya"
    assert f"algo={algo}" in flat["network_args"]
    assert ("factor=-1" in flat["network_args"]) == (algo == "lokr")
    flat = export_for(["locon"], [f'network.algo="{algo}"', "network.rank_dropout=0.125",
                                  "network.use_tucker=true"]).flat_args()
    assert "rank_dropout=0.125" in flat["network_args"] and "use_tucker=True" in flat["network_args"]
    assert not any(item.startswith("use_scalar") for item in flat["network_args"])  # false switches: not written


def test_plain_lora_uses_networks_lora():
    flat = export_for([]).flat_args()
    assert flat["network_module"] == "networks.lora" and "network_args" not in flat
    # algo=lora with conv_dim is kohya's LoRA-C3Lier, which loracli's plain LoRA trains as networks.lora does:
    # exported as networks.lora with conv_dim/conv_alpha (lycoris.kohya algo=lora would be LyCORIS' LoCon).
    exp = export_for(["locon"], ['network.algo="lora"'])
    flat = exp.flat_args()
    assert flat["network_module"] == "networks.lora"
    assert flat["network_args"] == ["conv_dim=8", "conv_alpha=1"] and not exp.unsupported
    assert any("exported as networks.lora" in w for w in exp.warnings)
    # without conv_alpha, networks.lora's own default (1) is written out
    plain = export_for([], ["network.conv_dim=4"]).flat_args()
    assert plain["network_args"] == ["conv_dim=4", "conv_alpha=1"]


def test_default_token_length_is_left_out():
    # sd-scripts' --max_token_length takes only 150 or 225 (choices); 75 is its unset value
    assert "max_token_length" not in export_for([], ["dataset.max_token_length=75"]).flat_args()
    assert export_for([], ["dataset.max_token_length=150"]).flat_args()["max_token_length"] == 150
    spec = options.load_option_table()["max_token_length"]
    assert 75 not in spec.choices


def test_python_literals_round_trip():
    args = {"decouple": True, "weight_decay": 0.4, "betas": [0.9, 0.99], "mode": "x y", "one": [1]}
    items = options.optimizer_arg_items(args)
    assert items == ["decouple=True", "weight_decay=0.4", "betas=(0.9,0.99)", "mode='x y'", "one=(1,)"]
    assert dict(options.parse_optimizer_arg(i) for i in items) == args


def _config(presets: list[str], **changes):
    resolved = resolve_config(EXAMPLE, presets, [])
    config = resolved.config
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        part = getattr(config, section).model_copy(update={key: value})
        config = config.model_copy(update={section: part})
    return config, build_plan(resolved)


def test_constant_scheduler_with_warmup_becomes_constant_with_warmup():
    # `loracli plan` refuses this config; the export guards itself the same way sd-scripts would need
    config, _ = _config([], optimizer__lr_scheduler="constant", optimizer__lr_warmup_steps=10)
    exp = Export(args={}, dataset={}, num_processes=1)
    args = training_args(config, exp)
    assert args["optimizer"]["lr_scheduler"] == "constant_with_warmup"
    assert args["optimizer"]["lr_warmup_steps"] == 10
    assert any("constant_with_warmup" in w for w in exp.warnings)


def test_whole_warmup_float_is_written_as_an_integer_and_ratio_kept():
    config, _ = _config([], optimizer__lr_scheduler="cosine", optimizer__lr_warmup_steps=5.0)
    exp = Export(args={}, dataset={}, num_processes=1)
    warmup = training_args(config, exp)["optimizer"]["lr_warmup_steps"]
    assert warmup == 5 and isinstance(warmup, int)
    ratio = export_for(["dadapt-v3"]).flat_args()["lr_warmup_steps"]
    assert ratio == 0.1 and isinstance(ratio, float)


def test_bucket_steps_not_divisible_by_64_are_refused(tmp_path):
    config, plan = _config([], dataset__bucket_reso_steps=32)
    with pytest.raises(ConfigError, match="multiple of 64"):
        build_export(config, plan)
    result = run_cli("export", "sd-scripts", "--config", EXAMPLE, "--set", "dataset.bucket_reso_steps=32",
                     tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out" / "config.toml").exists()


def test_unsupported_options_are_reported_not_dropped(tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", "sd-scripts", "--config", EXAMPLE, "--set", "output.save_state_every_n_steps=10",
                     "--set", "training.vram_gb=8", out)
    assert result.exit_code == 0, result.output
    readme = (out / "README-export.txt").read_text()
    for key in ("output.save_state_every_n_steps", "training.vram_gb"):
        assert key in readme
        assert f"warning: {key}: not exported" in result.stderr
    written = tomllib.loads((out / "config.toml").read_text())
    flat = {k: v for section in written.values() for k, v in section.items()}
    assert "save_state_every_n_steps" not in flat and "vram_gb" not in flat


def test_cli_writes_files_and_an_executable_script(tmp_path):
    out = tmp_path / "my export"
    result = run_cli("export", "sd-scripts", "--preset", "dadapt-v3", "--config", EXAMPLE, out,
                     "--sd-scripts-dir", tmp_path / "sd scripts")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README-export.txt", "config.toml", "dataset.toml", "train.sh"]
    script = out / "train.sh"
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    expected = ["launch", "--num_cpu_threads_per_process", "1", "--num_processes", "1", "train_network.py",
                "--config_file", str(out / "config.toml"), "--dataset_config", str(out / "dataset.toml")]
    assert shlex.split(lines[-1]) == ["accelerate", *expected]
    # run it, with a recording `accelerate` first on PATH: the checkout is the working directory
    checkout = tmp_path / "sd scripts"
    checkout.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "accelerate"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump([os.getcwd(), sys.argv[1:]], open({str(tmp_path / 'rec.json')!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(script)], check=True, env=env)
    assert json.loads((tmp_path / "rec.json").read_text()) == [str(checkout), expected]
    other = tmp_path / "other checkout"
    other.mkdir()
    subprocess.run([str(script)], check=True, env={**env, "SD_SCRIPTS_DIR": str(other)})
    assert json.loads((tmp_path / "rec.json").read_text())[0] == str(other)
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["optimizer"]["optimizer_type"] == "DAdaptAdam"
    assert tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert "accelerate launch" in result.stdout and "28 steps, 4 epochs, 2 subset(s)" in result.stdout
    # loracli's test model cannot be loaded by sd-scripts: said, not hidden
    assert "tiny:sd15" in result.stderr


def test_several_processes_launch_multi_gpu():
    exp = export_for([], ["training.num_processes=2"])
    command = shlex.split(shell_command(Path("/x"), exp.num_processes))
    assert command[2:7] == ["--num_cpu_threads_per_process", "1", "--multi_gpu", "--num_processes", "2"]


def test_mixed_case_extensions_are_warned_about(tmp_path, make_image):
    make_image(tmp_path / "data" / "3_cat" / "a.Png", 64, 64)
    (tmp_path / "data" / "3_cat" / "a.txt").write_text("cat")
    make_image(tmp_path / "data" / "3_cat" / "b.png", 64, 64)
    (tmp_path / "data" / "3_cat" / "b.txt").write_text("cat")
    make_image(tmp_path / "data" / "dogs" / "c.png", 64, 64)  # no <repeats>_ prefix: skipped by both
    config = tmp_path / "c.toml"
    config.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                      "resolution = 64\nmin_bucket_reso = 64\n[training]\nmax_train_epochs = 1\n")
    resolved = resolve_config(config, [], [])
    exp = build_export(resolved.config, build_plan(resolved))
    (warning,) = [w for w in exp.warnings if "mixed-case" in w]
    assert "1 image(s)" in warning and "a.Png" in warning
    assert any("dogs" in w and "left out of dataset.toml" in w for w in exp.warnings)
    assert exp.dataset["datasets"][0]["subsets"][0]["num_repeats"] == 3


def test_optimizer_value_with_an_equals_sign_is_reported():
    config, _ = _config([], optimizer__optimizer_args={"weight_decay": 0.1, "spec": "a=b"})
    exp = Export(args={}, dataset={}, num_processes=1)
    args = training_args(config, exp)
    assert args["optimizer"]["optimizer_args"] == ["weight_decay=0.1"]
    assert [key for key, _ in exp.unsupported] == ["optimizer.optimizer_args.spec"]


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_exports_write_loracli_targets_as_a_preset_file(algo, tmp_path):
    """Not LyCORIS' preset=full (it wraps conv_in/conv_out/time_embedding and lycoris_lora 4.1.3 refuses it on SD
    UNets): the table loracli trains with, in a file beside config.toml that network_args points at."""
    from loracli.sdscripts.lycoris_targets import CONV_TARGETS, PRESET_FILE, same_targets

    exp = export_for(["locon"], [f'network.algo="{algo}"'])
    assert "preset=full" not in exp.flat_args()["network_args"]
    out = tmp_path / "export dir"
    written = write_export(out, exp)
    assert out / PRESET_FILE in written
    preset = tomllib.loads((out / PRESET_FILE).read_text())
    assert preset["unet_target_module"] == ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
    assert preset["unet_target_name"] == [] and "CLIPMLP" in preset["text_encoder_target_module"]
    assert preset == CONV_TARGETS and same_targets(preset, algo) and not same_targets(preset, "lora")
    args = tomllib.loads((out / "config.toml").read_text())["network"]["network_args"]
    assert f"preset={out / PRESET_FILE}" in args  # absolute: sd-scripts runs from its own checkout
    # lycoris_lora's preset reader accepts the file (the keys of its PresetConfig)
    lycoris_keys = {"enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                    "text_encoder_target_name", "module_algo_map", "name_algo_map", "exclude_name", "use_fnmatch"}
    assert set(preset) <= lycoris_keys
    # plain LoRA goes through networks.lora: no preset file
    plain = export_for([])
    assert plain.lycoris_preset is None
    assert PRESET_FILE not in {p.name for p in write_export(tmp_path / "plain", plain)}


def test_import_refuses_a_preset_file_with_other_targets(tmp_path):
    from loracli.sdscripts.importer import import_file
    from loracli.sdscripts.lycoris_targets import CONV_TARGETS

    import tomli_w

    (tmp_path / "mine.toml").write_text(tomli_w.dumps({**CONV_TARGETS, "unet_target_name": ["conv_in"]}))
    (tmp_path / "t.sh").write_text("accelerate launch train_network.py --pretrained_model_name_or_path=/m "
                                   "--train_data_dir=/d --max_train_steps=5 --network_module=lycoris.kohya "
                                   f"--network_args algo=loha preset={tmp_path / 'mine.toml'} preset2=x\n")
    result = import_file(tmp_path / "t.sh")
    assert "other layers" in result.unsupported["--network_args preset"]
    (tmp_path / "t.sh").write_text("accelerate launch train_network.py --network_module=lycoris.kohya "
                                   "--network_args algo=loha preset=missing.toml\n")
    assert "not found" in import_file(tmp_path / "t.sh").unsupported["--network_args preset"]


def _diffusers_folder(root: Path, unet_config: dict) -> Path:
    """A diffusers SD1 pipeline folder as far as the torch-free plan reads it (configs, weight file names)."""
    parts = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors", "tokenizer": "vocab.json", "scheduler": "scheduler_config.json"}
    for part, weights in parts.items():
        (root / part).mkdir(parents=True)
        (root / part / weights).write_bytes(b"")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", **{part: ["diffusers", "X"] for part in parts}}))
    (root / "unet" / "config.json").write_text(json.dumps(unet_config))
    (root / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 768, "hidden_act": "quick_gelu"}))
    return root


def test_a_diffusers_unet_sd_scripts_cannot_rebuild_is_warned_about(tmp_path):
    from loracli.sdscripts.unet_layout import FIXED_LAYOUT, layout_differences

    standard = _diffusers_folder(tmp_path / "sd15", {**FIXED_LAYOUT["sd1"], "cross_attention_dim": 768})
    small = _diffusers_folder(tmp_path / "small", {**FIXED_LAYOUT["sd1"], "block_out_channels": [32, 64],
                                                   "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]})
    assert layout_differences(str(standard), "sd1") == []
    assert [d.split(" ")[0] for d in layout_differences(str(small), "sd1")] == ["block_out_channels",
                                                                             "down_block_types"]
    assert layout_differences("tiny:sd15", "sd1") == [] and layout_differences(str(tmp_path), "sd1") == []
    for model, warned in ((standard, False), (small, True)):
        resolved = resolve_config(EXAMPLE, [], [f'model.pretrained_model_name_or_path="{model}"'])
        exp = build_export(resolved.config, build_plan(resolved))
        warnings = [w for w in exp.warnings if "not laid out like" in w]
        assert bool(warnings) == warned
    assert "[32, 64] (sd-scripts builds [320, 640, 1280, 1280])" in warnings[0]


ALGO_SETS = {"lora": ['network.network_module="networks.lora"', 'network.algo="lora"'],
             "locon": ['network.network_module="lycoris.kohya"', 'network.algo="locon"', "network.conv_dim=4"],
             "loha": ['network.network_module="lycoris.kohya"', 'network.algo="loha"', "network.conv_dim=4"],
             "lokr": ['network.network_module="lycoris.kohya"', 'network.algo="lokr"', "network.factor=4"]}


@pytest.mark.parametrize("algo", list(ALGO_SETS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_with_every_algo_exports_what_its_script_takes(preset, algo, tmp_path):
    from loracli.sdscripts.lycoris_targets import PRESET_FILE, same_targets

    exp = export_for([preset], ALGO_SETS[algo])
    flat = exp.flat_args()
    _parse([t for name, value in flat.items() for t in options.cli_tokens(name, value, exp.script)], exp.script)
    assert set(flat) <= set(options.load_option_table(exp.script))
    written = {p.name for p in write_export(tmp_path, exp)}
    args = tomllib.loads((tmp_path / "config.toml").read_text())["network"].get("network_args", [])
    if algo == "lora":
        assert flat["network_module"] == "networks.lora" and PRESET_FILE not in written
    else:
        assert f"algo={algo}" in args and f"preset={tmp_path / PRESET_FILE}" in args
        assert same_targets(tomllib.loads((tmp_path / PRESET_FILE).read_text()), algo)
    dataset = tomllib.loads((tmp_path / "dataset.toml").read_text())
    assert set(dataset["general"]) <= ALL_LEVELS | DATASET_LEVEL
    (ds,) = dataset["datasets"]
    assert ds["bucket_reso_steps"] % (32 if exp.script == "sdxl_train_network.py" else 64) == 0
    assert [set(s) <= ALL_LEVELS | SUBSET_ONLY for s in ds["subsets"]] == [True, True]
