"""`loracli import`: sd-scripts TOML (+ dataset TOML), kohya_ss JSON, shell scripts -> loracli configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.errors import ConfigError, DatasetError
from loracli.family import family_for
from loracli.lint import lint_config
from loracli.sdscripts.import_shell import find_command
from loracli.sdscripts.importer import flatten_sections, import_file, render_toml
from tests.pure.cli_helpers import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA = Path(__file__).resolve().parents[1] / "data" / "sdscripts" / "import"


def write_and_resolve(result, tmp_path: Path):
    """The rendered TOML must load as a loracli config and pass the config rules."""
    out = tmp_path / "imported.toml"
    out.write_text(render_toml(result), encoding="utf-8")
    resolved = resolve_config(out)
    errors = [f for f in lint_config(resolved.config, family_for(resolved.config.model.v2, resolved.config.model.sdxl), resolved.origins)
              if f.level == "error"]
    assert errors == []
    return resolved.config


def accounted(result) -> set[str]:
    return set(result.mapped) | set(result.unsupported) | set(result.empty)


# --- sd-scripts TOML + dataset TOML ----------------------------------------------------------------------------


def test_sd_scripts_toml_with_dataset_toml(tmp_path):
    result = import_file(DATA / "sd_config.toml", DATA / "sd_dataset.toml")
    v = result.values
    assert v["model"] == {"pretrained_model_name_or_path": "/models/sd15-diffusers", "v2": False, "clip_skip": 2}
    # subsets map back onto the folder tree: one parent per kind
    assert v["dataset"]["train_data_dir"] == "/data/mychar/img"
    assert v["dataset"]["reg_data_dir"] == "/data/mychar/reg"
    # [general] caption options and [[datasets]] bucket options land in [dataset]
    assert v["dataset"]["caption_extension"] == ".txt"
    assert v["dataset"]["shuffle_caption"] is True and v["dataset"]["keep_tokens"] == 1
    assert v["dataset"]["flip_aug"] is True
    assert (v["dataset"]["min_bucket_reso"], v["dataset"]["max_bucket_reso"]) == (320, 768)
    assert v["network"] == {"network_module": "networks.lora", "algo": "lora", "network_dim": 32,
                            "network_alpha": 16.0, "network_train_unet_only": False}
    # optimizer_args: Python literals -> typed TOML values
    assert v["optimizer"]["optimizer_args"] == {"decouple": True, "weight_decay": 0.4, "betas": [0.9, 0.99]}
    assert v["optimizer"]["lr_warmup_steps"] == 0.1
    assert v["training"]["train_batch_size"] == 6 and v["training"]["max_train_epochs"] == 10
    assert v["output"]["save_every_n_epochs"] == 2 and v["logging"]["logging_dir"] == "/loras/logs"
    from loracli.trackers import wandb_installed

    if wandb_installed():
        assert v["logging"]["log_with"] == "wandb"
    else:  # kept out, saying how to get it
        assert "pip install \"loracli[wandb]\"" in result.unsupported.pop("log_with")
    assert set(result.unsupported) == {"max_data_loader_n_workers", "lowram"}
    config = write_and_resolve(result, tmp_path)
    assert config.dataset.train_data_dir == Path("/data/mychar/img")
    assert config.optimizer.optimizer_args["betas"] == [0.9, 0.99]


def test_every_key_of_the_sd_scripts_toml_is_accounted_for():
    result = import_file(DATA / "sd_config.toml", DATA / "sd_dataset.toml")
    data = tomllib.loads((DATA / "sd_config.toml").read_text())
    assert set(flatten_sections(data)) <= accounted(result)


def test_sd_scripts_defaults_are_kept_when_the_toml_leaves_them_out(tmp_path):
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                     'network_module = "networks.lora"\n')
    result = import_file(tmp_path / "c.toml")
    # sd-scripts reads .caption and trains 1600 steps when nothing says otherwise
    assert result.values["dataset"]["caption_extension"] == ".caption"
    assert result.values["training"]["max_train_steps"] == 1600
    assert any("1600" in n for n in result.notes)


@pytest.mark.parametrize("network_args", ['["algo=lora", "preset=full"]', '["preset=full"]'])
def test_lycoris_algo_lora_is_locon(tmp_path, network_args):
    # LyCORIS create_network: algo defaults to lora, conv_dim to network_dim, and preset=full wraps the
    # ResNet 3x3 convs; so sd-scripts trains the convs, which is loracli's locon (conv_dim unset = dim).
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                     'network_module = "lycoris.kohya"\nnetwork_dim = 8\n'
                                     f"network_args = {network_args}\n")
    network = import_file(tmp_path / "c.toml").values["network"]
    assert network["network_module"] == "lycoris.kohya" and network["algo"] == "locon"
    assert "conv_dim" not in network


def test_text_encoder_lr_list_of_two_reads_the_first(tmp_path):
    # --text_encoder_lr is nargs='*' (train_network.py setup_parser); kohya_ss writes [te, te]
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                     'network_module = "networks.lora"\ntext_encoder_lr = [5e-5, 5e-5]\n')
    result = import_file(tmp_path / "c.toml")
    assert result.values["optimizer"]["text_encoder_lr"] == 5e-5
    write_and_resolve(result, tmp_path)


def test_dataset_toml_that_the_folder_tree_cannot_express(tmp_path):
    """Subsets with their own repeats and options, under two parents: imported 1:1 as [[datasets]]."""
    img = tmp_path / "img"
    for name in ("5_sks dog", "3_other", "7_unlisted"):
        (img / name).mkdir(parents=True)
    (tmp_path / "elsewhere" / "2_cat").mkdir(parents=True)
    dataset = {
        "datasets": [{
            "resolution": 512,
            "subsets": [
                {"image_dir": str(img / "5_sks dog"), "num_repeats": 5, "class_tokens": "sks dog",
                 "shuffle_caption": True},
                {"image_dir": str(img / "3_other"), "num_repeats": 4, "class_tokens": "other",
                 "shuffle_caption": False},
                {"image_dir": str(tmp_path / "elsewhere" / "2_cat"), "num_repeats": 2, "class_tokens": "cat"},
            ],
        }],
        "general": {"validation_split": 0.1},
    }
    import tomli_w

    (tmp_path / "ds.toml").write_text(tomli_w.dumps(dataset))
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\nmax_train_epochs = 1\n')
    result = import_file(tmp_path / "c.toml", tmp_path / "ds.toml")
    assert result.unsupported == {}
    assert "train_data_dir" not in result.values["dataset"]
    assert result.values["datasets"] == dataset["datasets"]  # the same tables, key for key
    assert result.values["dataset"]["validation_split"] == 0.1  # imported: loracli holds images out too
    assert write_and_resolve(result, tmp_path).datasets[0].subsets[1].num_repeats == 4


# --- kohya_ss GUI JSON -----------------------------------------------------------------------------------------


def test_kohya_ss_lora_json(tmp_path):
    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    result = import_file(DATA / "kohya_ss_lora.json")
    v = result.values
    assert v["network"] == {"network_module": "networks.lora", "algo": "lora", "network_alpha": 64.0,
                            "network_dim": 128}
    assert v["dataset"]["resolution"] == 512  # "512,512"
    assert v["dataset"]["max_bucket_reso"] == 2048 and v["dataset"]["enable_bucket"] is True
    assert v["dataset"]["keep_tokens"] == 1 and v["dataset"]["max_token_length"] == 225
    assert v["model"]["clip_skip"] == 2
    assert v["training"]["max_train_epochs"] == 10  # "epoch"
    assert v["training"]["seed"] == 1234 and v["training"]["xformers"] is True
    assert v["training"]["noise_offset"] == 0.1 and v["training"]["min_snr_gamma"] == 5.0
    assert v["optimizer"]["optimizer_type"] == "AdamW8bit"
    assert v["optimizer"]["lr_warmup_steps"] == 0.1  # lr_warmup 10 (%)
    assert v["optimizer"]["lr_scheduler_num_cycles"] == 10  # the GUI's fallback: the epoch count
    assert v["optimizer"]["optimizer_args"] == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert v["optimizer"]["text_encoder_lr"] == 5e-05
    # zero means off in the GUI
    assert "save_every_n_steps" in result.empty and "save_every_n_steps" not in v.get("output", {})
    # keys the chosen LoRA_type does not use, and the multires key under "Original" noise
    assert "Standard" in result.unsupported["conv_dim"]
    assert "Original" in result.unsupported["multires_noise_discount"]
    assert set(data) == accounted(result)
    config = write_and_resolve(result, tmp_path)
    assert config.output.output_dir == Path("/work/kohya/model")


def test_kohya_ss_locon_json(tmp_path):
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    result = import_file(DATA / "kohya_ss_locon.json")
    net = result.values["network"]
    assert net["network_module"] == "lycoris.kohya" and net["algo"] == "locon"
    assert net["lycoris_preset"] == "full"
    assert (net["conv_dim"], net["conv_alpha"], net["network_dim"], net["network_alpha"]) == (8, 1.0, 16, 8.0)
    assert net["use_tucker"] is True and "use_scalar" not in net
    assert result.values["dataset"]["resolution"] == [768, 512]
    tr = result.values["training"]
    assert tr["multires_noise_iterations"] == 6 and "noise_offset" not in tr  # noise_offset_type Multires
    assert tr["xformers"] is False  # "sdpa"
    assert result.values["optimizer"]["max_grad_norm"] == 0.5  # from additional_parameters
    assert result.values["optimizer"]["optimizer_args"]["d_coef"] == 2
    assert "lr_warmup" in result.empty  # "0" with constant
    # each option inside additional_parameters is accounted for under its own "additional_parameters --NAME"
    assert set(data) == {key.split(" --")[0] for key in accounted(result)}
    assert result.mapped["additional_parameters --max_grad_norm"] == ["optimizer.max_grad_norm"]
    config = write_and_resolve(result, tmp_path)
    assert config.network.algo == "locon"
    assert config.output.output_dir == tmp_path / "model"  # a relative path stays relative (to the new file)


@pytest.mark.parametrize(("lora_type", "algo", "module"), [
    ("Kohya LoCon", "lora", "networks.lora"),  # networks.lora + conv_dim: kohya's LoRA-C3Lier
    ("LyCORIS/LoHa", "loha", "lycoris.kohya"),
    ("LyCORIS/LoKr", "lokr", "lycoris.kohya"),
])
def test_kohya_ss_lora_types(tmp_path, lora_type, algo, module):
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    data["LoRA_type"] = lora_type
    data["factor"] = 4
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert result.values["network"]["algo"] == algo
    assert result.values["network"]["network_module"] == module
    assert result.values["network"]["conv_dim"] == 8
    assert ("factor" in result.values["network"]) == (algo == "lokr")


def test_kohya_ss_unsupported_lora_type_and_warmup_with_constant(tmp_path):
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    data.update({"LoRA_type": "LyCORIS/iA3", "lr_warmup": 10})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert "not supported" in result.unsupported["LoRA_type"]
    assert "constant" in result.unsupported["lr_warmup"]
    assert "lr_warmup_steps" not in result.values["optimizer"]


def test_kohya_ss_warmup_steps_win_over_the_percent(tmp_path):
    # kohya_gui/lora_gui.py train_model: lr_warmup_steps > 0 is passed as is and lr_warmup (percent) ignored
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    data.update({"lr_scheduler": "cosine", "lr_warmup": 10, "lr_warmup_steps": 25})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert result.values["optimizer"]["lr_warmup_steps"] == 25
    assert "lr_warmup_steps" in result.unsupported["lr_warmup"]
    data["lr_warmup_steps"] = 0  # unset: the percent becomes a ratio
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert import_file(tmp_path / "p.json").values["optimizer"]["lr_warmup_steps"] == 0.1


def test_kohya_ss_lokr_passes_use_tucker(tmp_path):
    # the GUI writes use_tucker=... into LoKr's network_args too
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    data.update({"LoRA_type": "LyCORIS/LoKr", "use_tucker": True, "factor": 4})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert result.values["network"]["use_tucker"] is True
    assert "use_tucker" not in result.unsupported
    # dora_wd is passed by the GUI for LyCORIS types (dora_wd={dora_wd}): LyCORIS' DoRA in loracli too
    data.update({"dora_wd": True, "decompose_both": True})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert result.values["network"]["dora_wd"] is True and "dora_wd" not in result.unsupported
    assert "decompose_both" in result.unsupported["decompose_both"]


# kohya_gui/lora_gui.py train_model: Standard/Kohya LoCon pass the block-wise keys as networks.lora
# network_args when set; LoCon/LoHa/LoKr (lycoris.kohya) pass preset, dora_wd and bypass_mode; every type gets
# the LoRA+ ratios that are set (append_loraplus_network_args).
GUI_BLOCKS = {"block_dims": "2,4,4,4,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8", "block_alphas": "",
              "conv_block_dims": "", "conv_block_alphas": "", "down_lr_weight": "sine", "mid_lr_weight": "0.5",
              "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,0", "block_lr_zero_threshold": "0.1",
              "loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 0, "loraplus_text_encoder_lr_ratio": 0}
BLOCK_AND_PLUS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                  "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio",
                  "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "dora_wd")


def _gui_json_for_tiny(tmp_path: Path, make_image, name: str, **values) -> Path:
    """A kohya_ss GUI JSON (the shipped Standard one) on the built-in tiny model and a tiny dataset."""
    from tests.pure.cli_helpers import make_dataset

    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    data.update({"pretrained_model_name_or_path": "tiny:sd15", "max_resolution": "128,128",
                 "min_bucket_reso": 64, "max_bucket_reso": 256, "max_token_length": "75",
                 "train_data_dir": str(make_dataset(tmp_path, make_image)), "output_dir": str(tmp_path / "out"),
                 "logging_dir": "", "optimizer": "AdamW", "optimizer_args": "", **values})
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _import_and_plan(path: Path):
    out = path.with_suffix(".toml")
    res = run_cli("import", path, "-o", out)
    assert res.exit_code == 0, res.output
    plan = run_cli("plan", "--config", out, "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["errors"] == []
    return tomllib.loads(out.read_text()), out.read_text()


def test_kohya_ss_standard_block_weights_and_loraplus(tmp_path, make_image):
    path = _gui_json_for_tiny(tmp_path, make_image, "std.json", **GUI_BLOCKS, dora_wd=True)
    result = import_file(path)
    net = result.values["network"]
    assert net["network_module"] == "networks.lora" and net["algo"] == "lora"
    assert net["block_dims"] == [2, 4, 4, 4] + [8] * 21
    assert net["down_lr_weight"] == "sine" and net["mid_lr_weight"] == [0.5]
    assert net["up_lr_weight"] == [1.0] * 11 + [0.0] and net["block_lr_zero_threshold"] == 0.1
    assert net["loraplus_lr_ratio"] == 16
    # set values are passed, "" and 0 are not (the GUI's `if value`)
    assert {"block_alphas", "conv_block_dims", "conv_block_alphas", "loraplus_unet_lr_ratio",
            "loraplus_text_encoder_lr_ratio"} <= set(result.empty)
    assert "loraplus_unet_lr_ratio" not in net and "block_alphas" not in net
    # Standard does not pass dora_wd (only the LyCORIS types do)
    assert "does not pass it" in result.unsupported["dora_wd"]
    toml, text = _import_and_plan(path)
    assert toml["network"]["block_dims"][0] == 2 and toml["network"]["loraplus_lr_ratio"] == 16
    for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims"):
        assert f"#   {key}:" not in text  # not in the "Not imported" account


def test_kohya_ss_kohya_locon_passes_block_keys_too(tmp_path):
    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    data.update({"LoRA_type": "Kohya LoCon", "conv_dim": 4, "conv_alpha": 2, "conv_block_dims": "4," * 24 + "4",
                 "block_dims": "8," * 24 + "8", "loraplus_unet_lr_ratio": 8})
    (tmp_path / "p.json").write_text(json.dumps(data))
    net = import_file(tmp_path / "p.json").values["network"]
    assert (net["conv_dim"], net["conv_alpha"], net["conv_block_dims"]) == (4, 2.0, [4] * 25)
    assert net["block_dims"] == [8] * 25 and net["loraplus_unet_lr_ratio"] == 8
    # without block_dims or an lr weight sd-scripts ignores conv_block_dims; loracli's rule says so
    data["block_dims"] = ""
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert "E54" in import_file(tmp_path / "p.json").unsupported["conv_block_dims"]


def test_kohya_ss_lycoris_locon_dora_preset_and_loraplus(tmp_path, make_image):
    path = _gui_json_for_tiny(tmp_path, make_image, "locon.json", LoRA_type="LyCORIS/LoCon",
                              LyCORIS_preset="attn-mlp", dora_wd=True, bypass_mode=False, loraplus_lr_ratio=4,
                              conv_dim=1, conv_alpha=1, network_dim=8, network_alpha=4, **{
                                  k: "" for k in GUI_BLOCKS if not k.startswith("loraplus")})
    result = import_file(path)
    net = result.values["network"]
    assert net["network_module"] == "lycoris.kohya" and net["algo"] == "locon"
    assert net["lycoris_preset"] == "attn-mlp" and net["dora_wd"] is True and net["loraplus_lr_ratio"] == 4
    # the GUI always passes conv_dim/conv_alpha; attn-mlp wraps no 3x3 convs, so LyCORIS ignores them
    assert "conv_dim" not in net and "E56" in result.unsupported["conv_dim"]
    assert "bypass_mode" in result.empty
    toml, _ = _import_and_plan(path)
    assert toml["network"]["dora_wd"] is True and toml["network"]["lycoris_preset"] == "attn-mlp"
    # block-wise keys are networks.lora's: the LyCORIS types do not pass them
    data = json.loads(path.read_text())
    data.update({"block_dims": "4," * 24 + "4", "bypass_mode": True})
    path.write_text(json.dumps(data))
    result = import_file(path)
    assert "does not pass it" in result.unsupported["block_dims"] and "block_dims" not in result.values["network"]
    assert "not implemented by loracli" in result.unsupported["bypass_mode"]


def test_kohya_ss_network_values_kohya_ss_cannot_pass_are_reported(tmp_path):
    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    data.update({"block_dims": "2, 4, 4", "mid_lr_weight": "x", "block_alphas": "-1," * 24 + "1",
                 "conv_dims": "4,4"})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")  # no crash: each is reported
    assert "splits network_args at spaces" in result.unsupported["block_dims"]
    assert "'x'" in result.unsupported["mid_lr_weight"]
    assert "block_alphas" in result.unsupported and "block_alphas" not in result.values["network"]
    assert "conv_block_dims" in result.unsupported["conv_dims"]
    assert set(data) == accounted(result)


@pytest.mark.parametrize("lora_type", ["Standard", "Kohya LoCon", "LyCORIS/LoCon", "LyCORIS/LoHa"])
def test_kohya_ss_no_longer_calls_passed_network_keys_unsupported(tmp_path, lora_type):
    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    data.update({**GUI_BLOCKS, "LoRA_type": lora_type, "dora_wd": True, "loraplus_unet_lr_ratio": 2,
                 "loraplus_text_encoder_lr_ratio": 3})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    for key in BLOCK_AND_PLUS:
        reason = result.unsupported.get(key, "")
        assert "not supported by loracli" not in reason and "loracli does not support" not in reason, (key, reason)
    lycoris = lora_type.startswith("LyCORIS")
    assert ("dora_wd" in result.mapped) == lycoris
    assert ("block_dims" in result.mapped) == (not lycoris)
    # LoRA+ is passed for every type; loracli refuses it on LoHa (no lora_up matrices: E52), with that reason
    if lora_type == "LyCORIS/LoHa":
        assert "E52" in result.unsupported["loraplus_lr_ratio"]
    else:
        assert result.values["network"]["loraplus_text_encoder_lr_ratio"] == 3


# --- shell scripts ---------------------------------------------------------------------------------------------


def test_seeds_style_bash_script(tmp_path):
    result = import_file(DATA / "train_lora.sh")
    v = result.values
    # variables set with `local x="..."` expand, ${x} inside names too
    assert v["model"]["pretrained_model_name_or_path"] == "/srv/sd/models/anything-v4-diffusers"
    assert v["dataset"]["train_data_dir"] == "/srv/sd/sd-scripts/SETS/rosie/img/"
    assert v["dataset"]["reg_data_dir"] == "/srv/sd/sd-scripts/SETS/rosie/reg/"
    assert v["output"]["output_name"] == "rosie_e8_d96"
    assert v["output"]["training_comment"] == "LoRA of rosie"
    assert v["optimizer"]["optimizer_type"] == "AdamW8bit"  # --use_8bit_adam
    assert v["optimizer"]["optimizer_args"] == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (v["optimizer"]["unet_lr"], v["optimizer"]["text_encoder_lr"]) == (0.0001, 5e-05)
    assert v["network"]["network_dim"] == 96 and v["network"]["network_alpha"] == 48.0
    assert v["dataset"]["enable_bucket"] is True and v["dataset"]["max_token_length"] == 150
    assert v["training"]["max_train_epochs"] == 8 and v["training"]["seed"] == 31337
    assert "face-crop" in result.unsupported["--face_crop_aug_range"]
    assert "--persistent_data_loader_workers" in result.unsupported
    assert "accelerate --num_cpu_threads_per_process" in result.unsupported
    write_and_resolve(result, tmp_path)


def test_powershell_script_with_backticks_and_an_expression(tmp_path):
    result = import_file(DATA / "train_locon.ps1")
    v = result.values
    assert v["model"]["pretrained_model_name_or_path"] == "D:\\sd\\models\\base-v15"  # backslashes kept
    assert v["network"]["algo"] == "locon" and v["network"]["conv_dim"] == 8
    assert v["training"]["train_batch_size"] == 2
    # `$learning_rate = $learning_rate * $train_batch_size` is not evaluated: reported, not guessed
    assert "$learning_rate" in result.unsupported["--learning_rate"]
    assert "learning_rate" not in v["optimizer"]
    assert "block_dims" in result.unsupported["--network_args block_dims"]


def test_shell_parsing_forms():
    cmd = find_command('python "./train_network.py" --network_args conv_dim=4 "algo=loha" '
                       "--optimizer_args 'd_coef=2' --xformers --resolution 768,512 2>&1 | tee log.txt\n")
    assert cmd is not None and cmd.script == "train_network.py"
    assert cmd.args == {"network_args": ["conv_dim=4", "algo=loha"], "optimizer_args": ["d_coef=2"],
                        "xformers": True, "resolution": "768,512"}
    cmd = find_command('set LR=0.0002\r\naccelerate launch --num_processes=2 train_network.py ^\r\n'
                       '  --learning_rate=%LR% --network_dim 8\r\n')
    assert cmd is not None and cmd.style == "cmd"
    assert cmd.args == {"learning_rate": "0.0002", "network_dim": "8"}
    assert find_command("echo hello\n") is None


def test_accelerate_num_processes_and_sdxl_script(tmp_path):
    (tmp_path / "t.sh").write_text('accelerate launch --num_processes=2 --multi_gpu "./sdxl_train_network.py" \\\n'
                                   '  --pretrained_model_name_or_path=/m --train_data_dir=/d --max_train_steps=10\n')
    result = import_file(tmp_path / "t.sh")
    assert result.values["training"]["num_processes"] == 2
    assert result.values["model"]["sdxl"] is True and "sdxl_train_network.py" not in result.unsupported


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_writes_the_toml_with_the_account_on_top(tmp_path):
    out = tmp_path / "lora.toml"
    res = run_cli("import", DATA / "sd_config.toml", "--dataset-config", DATA / "sd_dataset.toml", "-o", out)
    assert res.exit_code == 0, res.output
    text = out.read_text()
    header = text.split("\n\n", 1)[0]
    assert "# Not imported (3):" in header and "#   lowram:" in header
    data = tomllib.loads(text)
    assert data["dataset"]["train_data_dir"] == "/data/mychar/img"
    assert "not imported: lowram" in res.stdout
    # (the input's model path does not exist here; validate checks it, so the built-in model stands in)
    assert run_cli("config", "validate", out, "--set", 'model.pretrained_model_name_or_path="tiny:sd15"').exit_code == 0
    # no overwrite without --force
    again = run_cli("import", DATA / "train_lora.sh", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert tomllib.loads(out.read_text())["dataset"]["train_data_dir"] == "/data/mychar/img"
    forced = run_cli("import", DATA / "train_lora.sh", "-o", out, "--force")
    assert forced.exit_code == 0
    assert tomllib.loads(out.read_text())["output"]["output_name"] == "rosie_e8_d96"


def test_cli_prints_to_stdout_without_output():
    res = run_cli("import", DATA / "kohya_ss_locon.json")
    assert res.exit_code == 0
    assert tomllib.loads(res.stdout)["network"]["algo"] == "locon"
    assert "kohya_ss GUI JSON" in res.stderr


def test_cli_errors_are_one_line(tmp_path):
    missing = run_cli("import", tmp_path / "nope.toml")
    assert missing.exit_code == 3 and missing.stderr.count("\n") == 1
    missing_ds = run_cli("import", DATA / "sd_config.toml", "--dataset-config", tmp_path / "nope.toml")
    assert missing_ds.exit_code == 3
    (tmp_path / "x.cfg").write_text("this is [not anything\n")
    unknown = run_cli("import", tmp_path / "x.cfg")
    assert unknown.exit_code == 2 and "unknown format" in unknown.stderr and unknown.stderr.count("\n") == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert run_cli("import", tmp_path / "bad.json").exit_code == 2
    swapped = run_cli("import", DATA / "sd_dataset.toml")
    assert swapped.exit_code == 2 and "--dataset-config" in swapped.stderr


def test_library_errors():
    with pytest.raises(DatasetError):
        import_file(DATA / "missing.json")
    with pytest.raises(ConfigError):
        import_file(DATA / "sd_dataset.toml")
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match="loracli config already"):
        import_file(root / "examples" / "tiny" / "loracli.toml")


def test_secrets_are_not_copied_into_reports(tmp_path):
    data = json.loads((DATA / "kohya_ss_lora.json").read_text())
    data.update({"use_wandb": True, "wandb_api_key": "sekrit-123"})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert "wandb_api_key" in result.unsupported
    assert "sekrit-123" not in render_toml(result)
    (tmp_path / "t.sh").write_text("accelerate launch train_network.py --pretrained_model_name_or_path=/m "
                                   "--train_data_dir=/d --max_train_epochs=1 --huggingface_token hf_abc\n")
    result = import_file(tmp_path / "t.sh")
    assert "--huggingface_token" in result.unsupported and "hf_abc" not in render_toml(result)


def test_values_loracli_rules_refuse_are_reported_not_written(tmp_path):
    data = json.loads((DATA / "kohya_ss_locon.json").read_text())
    data.update({"bucket_reso_steps": 1, "sample_every_n_epochs": 1, "sample_prompts": "a cat --w 512"})
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "p.json")
    assert "E8" in result.unsupported["bucket_reso_steps"]  # sd-scripts needs a multiple of 64 too
    assert "bucket_reso_steps" not in result.values["dataset"]
    assert "prompt file" in result.unsupported["sample_prompts"]
    assert "sample_every_n_epochs" in result.unsupported and "sample" not in result.values
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                     'max_train_epochs = 2\nlr_scheduler = "constant"\nlr_warmup_steps = 50\n'
                                     'network_alpha = -1\n')
    result = import_file(tmp_path / "c.toml")
    assert "E10" in result.unsupported["lr_warmup_steps"]
    assert "network_alpha" in result.unsupported  # the schema's range
    write_and_resolve(result, tmp_path)


def test_windows_dataset_paths_map_to_their_parent(tmp_path):
    (tmp_path / "ds.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = \'D:\\sd\\img\\4_toon style\'\n'
                                      'num_repeats = 4\nclass_tokens = "toon style"\n')
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "D:\\\\sd\\\\base"\nmax_train_epochs = 3\n')
    result = import_file(tmp_path / "c.toml", tmp_path / "ds.toml")
    assert result.values["dataset"]["train_data_dir"] == "D:\\sd\\img"
    assert result.unsupported == {}
