"""SDXL through sd-scripts: export writes sdxl_train_network.py launches, import recognises SDXL inputs.

The option tables are the project's own (loracli/sdscripts/*_options.json); sdxl_train_network.py's parser is
train_network.py's plus the three options of sdxl_train_util.add_sdxl_training_arguments.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.errors import ConfigError
from loracli.plan import build_plan
from loracli.sdscripts import options
from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, SCRIPT_FILE, build_export, write_export
from loracli.sdscripts.importer import import_file, imported_account, render_toml
from tests.pure.cli_helpers import run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"
DATA = ROOT / "tests" / "data" / "sdscripts"
GUIDE_COMMAND = DATA / "import" / "guide_pony_sdxl.sh"
SDXL = "sdxl_train_network.py"
SDXL_SETS = ["model.sdxl=true", 'model.pretrained_model_name_or_path="tiny:sdxl"']
ALGOS = {"lora": [], "locon": ['network.algo="locon"', "network.conv_dim=4", "network.conv_alpha=1"],
         "loha": ['network.algo="loha"', "network.conv_dim=4"], "lokr": ['network.algo="lokr"', "network.factor=4"]}


def sdxl_export(*sets: str, presets: list[str] | None = None):
    resolved = resolve_config(EXAMPLE, presets or [], [*SDXL_SETS, *sets])
    return build_export(resolved.config, build_plan(resolved))


def parse(tokens: list[str], script: str = SDXL):
    return options.build_parser(script).parse_args(tokens)


# --- the option tables -----------------------------------------------------------------------------------------


def test_sdxl_table_is_train_network_plus_the_sdxl_options():
    shipped = json.loads((ROOT / "loracli" / "sdscripts" / "sdxl_train_network_options.json").read_text())
    assert json.loads((DATA / "sdxl_train_network_options.json").read_text()) == shipped
    sdxl, sd = options.load_option_table(SDXL), options.load_option_table("train_network.py")
    assert set(sdxl) - set(sd) == {"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                                   "disable_mmap_load_safetensors"}
    assert set(sd) <= set(sdxl) and options.SDXL_ONLY_ARGS == tuple(sorted(set(sdxl) - set(sd)))
    assert parse(["--cache_text_encoder_outputs", "--text_encoder_lr", "1e-4", "5e-5"]).text_encoder_lr == [1e-4, 5e-5]
    with pytest.raises(SystemExit):  # train_network.py's argparse has no such option
        parse(["--cache_text_encoder_outputs"], "train_network.py")
    assert options.script_for("sdxl") == SDXL and options.script_for("sd2") == "train_network.py"


# --- export ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", list(ALGOS))
def test_sdxl_export_is_an_sdxl_train_network_launch_for_every_algo(algo, tmp_path):
    exp = sdxl_export(*ALGOS[algo], "optimizer.text_encoder_lr=[1e-4, 5e-5]", "model.no_half_vae=true")
    assert exp.script == SDXL
    flat = exp.flat_args()
    tokens = [t for name, value in flat.items() for t in options.cli_tokens(name, value, SDXL)]
    parsed = parse(tokens)  # every option is one sdxl_train_network.py takes, in a form its argparse reads
    assert parsed.text_encoder_lr == [1e-4, 5e-5] and parsed.no_half_vae is True
    assert flat["network_module"] == ("networks.lora" if algo == "lora" else "lycoris.kohya")
    if algo != "lora":
        assert f"algo={algo}" in flat["network_args"]
    assert ("factor=4" in flat.get("network_args", [])) == (algo == "lokr")
    # the SDXL warning about the second encoder's lr: sd-scripts' networks use the first value for both
    assert any("text_encoder_lr" in w and "first" in w for w in exp.warnings)
    write_export(tmp_path, exp)
    command = shlex.split((tmp_path / SCRIPT_FILE).read_text().splitlines()[-1])
    assert command[command.index(SDXL) + 1:] == ["--config_file", str(tmp_path / CONFIG_FILE),
                                                 "--dataset_config", str(tmp_path / DATASET_FILE)]
    assert "train_network.py" not in command
    assert SDXL in (tmp_path / CONFIG_FILE).read_text().splitlines()[0]


def test_sdxl_only_options_are_written_for_sdxl_and_reported_for_sd1():
    sets = ["training.cache_text_encoder_outputs_to_disk=true", "training.cache_text_encoder_outputs=true",
            "network.network_train_unet_only=true", "dataset.shuffle_caption=false"]
    flat = sdxl_export(*sets).flat_args()
    assert flat["cache_text_encoder_outputs"] is True and flat["cache_text_encoder_outputs_to_disk"] is True
    resolved = resolve_config(EXAMPLE, [], sets)
    sd1 = build_export(resolved.config, build_plan(resolved))
    assert sd1.script == "train_network.py"
    assert "cache_text_encoder_outputs" not in sd1.flat_args()
    assert [k for k, _ in sd1.unsupported] == ["training.cache_text_encoder_outputs",
                                               "training.cache_text_encoder_outputs_to_disk"]


def test_sdxl_export_leaves_clip_skip_out_and_says_so():
    exp = sdxl_export("model.clip_skip=2")
    assert "clip_skip" not in exp.flat_args()
    assert any(w.startswith("model.clip_skip") and SDXL in w for w in exp.warnings)
    resolved = resolve_config(EXAMPLE, [], ["model.clip_skip=2"])
    assert build_export(resolved.config, build_plan(resolved)).flat_args()["clip_skip"] == 2  # SD1 keeps it


def test_sdxl_bucket_steps_are_multiples_of_32(tmp_path):
    assert sdxl_export("dataset.bucket_reso_steps=32").dataset["datasets"][0]["bucket_reso_steps"] == 32
    result = run_cli("export", "sd-scripts", "--config", EXAMPLE, *[a for s in SDXL_SETS for a in ("--set", s)],
                     "--set", "dataset.bucket_reso_steps=48", tmp_path / "out")
    assert result.exit_code == 2 and "multiple of 32" in result.output
    assert not (tmp_path / "out").exists()


def test_sdxl_export_refuses_v2():
    resolved = resolve_config(EXAMPLE, [], SDXL_SETS)
    config = resolved.config.model_copy(update={"model": resolved.config.model.model_copy(update={"v2": True})})
    with pytest.raises(ConfigError, match="v2"):
        build_export(config, build_plan(resolved))


def test_cli_names_the_sdxl_script(tmp_path):
    result = run_cli("export", "sd-scripts", "--config", EXAMPLE, *[a for s in SDXL_SETS for a in ("--set", s)],
                     tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"accelerate launch --num_cpu_threads_per_process 1 --num_processes 1 {SDXL}" in result.stdout
    assert "tiny:sdxl" in result.stderr  # sd-scripts cannot load loracli's test model: said


# --- import ----------------------------------------------------------------------------------------------------

GUIDE_NOT_IMPORTED = {"accelerate --num_cpu_threads_per_process", "--network_args block_dims",
                      "--network_args block_alphas", "--lowram", "--dataset_repeats"}


def test_guide_sdxl_command_imports_as_sdxl():
    result = import_file(GUIDE_COMMAND)
    v = result.values
    assert v["model"] == {"sdxl": True, "pretrained_model_name_or_path": "/ponydiffusers/", "no_half_vae": True}
    assert result.mapped["sdxl_train_network.py"] == ["model.sdxl"]
    assert v["dataset"]["bucket_reso_steps"] == 32  # valid for SDXL (a multiple of 32), not refused as for SD1
    assert v["dataset"]["resolution"] == 1024 and v["dataset"]["cache_latents_to_disk"] is True
    assert v["network"]["algo"] == "locon" and v["network"]["conv_dim"] == 256 and v["network"]["network_dim"] == 8
    assert v["optimizer"]["text_encoder_lr"] == 0.0001
    assert (v["training"]["gradient_accumulation_steps"], v["training"]["train_batch_size"]) == (6, 8)
    assert v["training"]["max_train_steps"] == 400
    assert set(result.unsupported) == GUIDE_NOT_IMPORTED
    assert "block-wise" in result.unsupported["--network_args block_dims"] or \
        "not supported" in result.unsupported["--network_args block_dims"]


def test_guide_sdxl_command_imports_then_plans_naming_what_was_left_out(tmp_path, make_image):
    out = tmp_path / "pony.toml"
    result = run_cli("import", GUIDE_COMMAND, "-o", out)
    assert result.exit_code == 0, result.output
    for sizes, folder in (([(1024, 1024), (832, 1216)], "3_kindred"), ([(1216, 832)], "2_wolf")):
        for i, (w, h) in enumerate(sizes):
            make_image(tmp_path / "data" / folder / f"{i}.png", w, h)
            (tmp_path / "data" / folder / f"{i}.txt").write_text("anthro, wolf")
    (tmp_path / "prompts.txt").write_text("anthro female wolf --w 1024 --h 1024\n")
    sets = ['model.pretrained_model_name_or_path="tiny:sdxl"', f'dataset.train_data_dir="{tmp_path / "data"}"',
            f'sample.sample_prompts="{tmp_path / "prompts.txt"}"', f'output.output_dir="{tmp_path / "runs"}"']
    plan = run_cli("plan", "--config", out, *[a for s in sets for a in ("--set", s)])
    assert plan.exit_code == 0, plan.output
    text = " ".join(plan.stdout.split())
    for key in GUIDE_NOT_IMPORTED:
        assert f"not imported from guide_pony_sdxl.sh (bash script): {key}:" in text, key
    assert "total steps: 400" in text
    as_json = run_cli("plan", "--config", out, "--json", *[a for s in sets for a in ("--set", s)])
    data = json.loads(as_json.stdout)
    assert data["model_family"] == "sdxl" and data["total_steps"] == 400
    assert all(b["resolution"][0] % 32 == 0 and b["resolution"][1] % 32 == 0 for b in data["buckets"])


def test_imported_account_reads_only_import_headers(tmp_path):
    result = import_file(GUIDE_COMMAND)
    path = tmp_path / "c.toml"
    path.write_text(render_toml(result))
    lines = imported_account(path)
    assert len(lines) == len(result.unsupported) and all(ln.startswith("not imported from ") for ln in lines)
    path.write_text("# my own notes\n# Not imported (1):\n#   x: y\n[model]\n")
    assert imported_account(path) == [] and imported_account(None) == []


def test_sd1_script_with_sdxl_only_options_reports_them(tmp_path):
    (tmp_path / "t.sh").write_text("accelerate launch train_network.py --pretrained_model_name_or_path=/m "
                                   "--train_data_dir=/d --max_train_steps=10 --cache_text_encoder_outputs "
                                   "--text_encoder_lr 1e-4 5e-5\n")
    result = import_file(tmp_path / "t.sh")
    assert "sdxl" not in result.values["model"]
    assert "sdxl_train_network.py option" in result.unsupported["--cache_text_encoder_outputs"]
    assert "cache_text_encoder_outputs" not in result.values.get("training", {})
    assert result.values["optimizer"]["text_encoder_lr"] == 1e-4  # one text encoder: the first value


def test_sdxl_script_keeps_one_lr_per_encoder_and_refuses_clip_skip(tmp_path):
    (tmp_path / "t.sh").write_text("accelerate launch sdxl_train_network.py --pretrained_model_name_or_path=/m "
                                   "--train_data_dir=/d --max_train_steps=10 --clip_skip=2 "
                                   "--text_encoder_lr 1e-4 5e-5 --cache_text_encoder_outputs_to_disk "
                                   "--network_train_unet_only\n")
    result = import_file(tmp_path / "t.sh")
    v = result.values
    assert v["model"]["sdxl"] is True and "clip_skip" not in v["model"]
    assert "ignores clip_skip" in result.unsupported["--clip_skip"]
    assert v["optimizer"]["text_encoder_lr"] == [1e-4, 5e-5]
    assert any("first value" in n for n in result.notes)
    assert v["training"]["cache_text_encoder_outputs_to_disk"] is True


def test_sd_scripts_toml_with_an_sdxl_only_option_is_sdxl(tmp_path):
    (tmp_path / "c.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                     'network_module = "networks.lora"\nmax_train_steps = 10\n'
                                     "cache_text_encoder_outputs = true\nnetwork_train_unet_only = true\n"
                                     "text_encoder_lr = [1e-4, 1e-4]\n")
    result = import_file(tmp_path / "c.toml")
    assert result.values["model"]["sdxl"] is True
    assert result.mapped["cache_text_encoder_outputs"] == ["model.sdxl", "training.cache_text_encoder_outputs"]
    assert result.values["optimizer"]["text_encoder_lr"] == 1e-4  # the same value for both encoders
    (tmp_path / "plain.toml").write_text('pretrained_model_name_or_path = "/m"\ntrain_data_dir = "/d"\n'
                                         "cache_text_encoder_outputs = false\n")
    assert "sdxl" not in import_file(tmp_path / "plain.toml").values.get("model", {})


@pytest.mark.parametrize("sdxl", [True, False])
def test_kohya_ss_sdxl_switches(tmp_path, sdxl):
    data = json.loads((DATA / "import" / "kohya_ss_lora.json").read_text())
    data.update(sdxl=sdxl, sdxl_cache_text_encoder_outputs=True, sdxl_no_half_vae=True, text_encoder_lr=0,
                shuffle_caption=False, clip_skip="0",
                additional_parameters="--cache_text_encoder_outputs_to_disk --max_grad_norm 0.5")
    (tmp_path / "k.json").write_text(json.dumps(data))
    result = import_file(tmp_path / "k.json")
    v = result.values
    if sdxl:
        assert v["model"]["sdxl"] is True and v["model"]["no_half_vae"] is True
        assert v["training"]["cache_text_encoder_outputs"] is True
        assert result.mapped["sdxl_no_half_vae"] == ["model.no_half_vae"]
        # the GUI appends additional_parameters to the SDXL script's command line: its flags are known there
        assert v["training"]["cache_text_encoder_outputs_to_disk"] is True
        assert v["optimizer"]["max_grad_norm"] == 0.5
    else:  # the GUI passes its SDXL switches only with "sdxl" on
        assert "sdxl" not in v["model"] and "no_half_vae" not in v["model"]
        assert "cache_text_encoder_outputs" not in v.get("training", {})
        assert {"sdxl", "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs"} <= set(result.empty)
        assert "sdxl_train_network.py option" in result.unsupported["additional_parameters --cache_text_encoder_outputs_to_disk"]
    assert not {"sdxl", "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs"} & set(result.unsupported)


def test_written_sdxl_config_toml_keeps_its_script_through_import(tmp_path):
    exp = sdxl_export()
    write_export(tmp_path, exp)
    written = tomllib.loads((tmp_path / CONFIG_FILE).read_text())
    assert "sdxl" not in {k for section in written.values() for k in section}  # no key sd-scripts lacks
    result = import_file(tmp_path / CONFIG_FILE, tmp_path / DATASET_FILE)
    assert result.values["model"]["sdxl"] is True


# --- --backend sd-scripts ------------------------------------------------------------------------------------------


def test_backend_launches_the_sdxl_script(tmp_path, monkeypatch):
    from loracli.sdscripts import backend
    from tests.pure.test_sdscripts_backend import STAND_IN

    checkout = tmp_path / "sd-scripts"
    checkout.mkdir()
    (checkout / "train_network.py").write_text(STAND_IN)
    sets = [a for s in SDXL_SETS for a in ("--set", s)]
    # a checkout without the SDXL script: refused before any run folder is made
    result = run_cli("train", "--config", EXAMPLE, *sets, "--backend", "sd-scripts", "--sd-scripts-dir", checkout,
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 2 and f"no {SDXL}" in result.stderr
    assert not (tmp_path / "runs").exists()

    (checkout / SDXL).write_text(STAND_IN)
    real = backend.launch_command
    monkeypatch.setattr(backend, "launch_command", lambda python, n, export_dir, script: [
        python, *real(python, n, export_dir, script)[real(python, n, export_dir, script).index(script):]])
    result = run_cli("train", "--config", EXAMPLE, *sets, "--backend", "sd-scripts", "--sd-scripts-dir", checkout,
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run_dir,) = list((tmp_path / "runs").iterdir())
    recorded = json.loads((run_dir / "argv.json").read_text())
    assert recorded["argv"][0] == SDXL and recorded["cwd"] == str(checkout)
    assert f"({SDXL})" in result.stdout
