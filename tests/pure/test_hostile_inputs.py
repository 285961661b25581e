"""The hostile-input corpus: inputs and faults a careless or hostile user brings, each ending in one
line per problem naming the culprit, the documented exit code, and nothing written where it should not
be (tests/pure/test_bad_inputs.py holds the first, friendlier corpus)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loracli.rundir import RunLock
from tests.conftest import write_image
from tests.pure.cli_helpers import run_cli
from tests.pure.permissions import enforced, forget_locks, lock_read_only, lock_unreadable
from tests.pure.hostile_helpers import (
    GOOD,
    Case,
    check,
    fake_run,
    png_header_only,
    project,
    safetensors_bytes,
    snapshot,
)

def conf(extra: str = "", replace: tuple[str, str] | None = None, args: tuple = (), command: str = "plan"):
    """A builder: the example project with extra TOML (or one replacement), then `loracli COMMAND --config`."""
    def build(root: Path) -> list:
        return [command, "--config", project(root, extra, replace), *args]
    return build


def data(make):
    """A builder: the example project, then `make(folder)` breaks something in data/2_char."""
    def build(root: Path) -> list:
        cfg = project(root)
        make(root / "data" / "2_char")
        return ["plan", "--config", cfg]
    return build


def train(extra: str = "", replace: tuple[str, str] | None = None):
    return conf(extra, replace, command="train")


def symlink(target: str):
    return lambda folder, name: os.symlink(target, folder / name)


def chmod0(path: Path) -> None:
    lock_unreadable(path)  # honoured for root too (tests/pure/permissions.py)


CONFIG_CASES = [
    # --- non-finite floats: refused by the schema, before any model or run folder
    Case("learning_rate inf", train("[optimizer]\nlearning_rate = inf\n"), 2, ("optimizer.learning_rate", "finite")),
    Case("learning_rate nan", conf("[optimizer]\nlearning_rate = nan\n"), 2, ("optimizer.learning_rate", "finite")),
    Case("noise_offset inf (not 'lower the learning rate')", train(replace=("max_train_epochs = 4",
         "max_train_epochs = 4\nnoise_offset = inf")), 2, ("training.noise_offset", "finite")),
    Case("unet_lr nan", conf("[optimizer]\nunet_lr = nan\n"), 2, ("optimizer.unet_lr", "finite")),
    Case("text_encoder_lr [inf]", conf("[optimizer]\ntext_encoder_lr = [inf]\n"), 2,
         ("optimizer.text_encoder_lr", "finite")),
    Case("optimizer arg nan", conf("[optimizer.optimizer_args]\nweight_decay = nan\n"), 2,
         ("optimizer.optimizer_args.weight_decay", "finite")),
    Case("min_snr_gamma inf", conf(replace=("max_train_epochs = 4", "max_train_epochs = 4\nmin_snr_gamma = inf")), 2,
         ("training.min_snr_gamma",)),
    Case("network_alpha nan", conf("[network]\nnetwork_alpha = nan\n"), 2, ("network.network_alpha", "finite")),
    Case("caption_dropout_rate nan", conf(replace=("resolution = 128", "resolution = 128\ncaption_dropout_rate = nan")),
         2, ("dataset.caption_dropout_rate",)),
    Case("max_grad_norm -inf", conf("[optimizer]\nmax_grad_norm = -inf\n"), 2, ("optimizer.max_grad_norm",)),
    Case("lr_warmup_steps nan", conf("[optimizer]\nlr_warmup_steps = nan\n"), 2, ("optimizer.lr_warmup_steps",)),
    Case("prior_loss_weight inf", conf(replace=("max_train_epochs = 4", "max_train_epochs = 4\nprior_loss_weight = inf")),
         2, ("training.prior_loss_weight",)),
    Case("adaptive_noise_scale nan", conf(replace=("max_train_epochs = 4",
         "max_train_epochs = 4\nadaptive_noise_scale = nan")), 2, ("training.adaptive_noise_scale",)),
    Case("resolution [64, nan]", conf(args=("--set", "dataset.resolution=[128, nan]")), 2,
         ("dataset.resolution", "--set")),
    Case("--set nan is blamed on --set", conf(args=("--set", "optimizer.learning_rate=nan")), 2,
         ("optimizer.learning_rate", "value from --set")),
    # --- integers out of range
    Case("seed 2**63", conf(replace=("max_train_epochs = 4", "max_train_epochs = 4\nseed = 9223372036854775808")), 2,
         ("training.seed", "4294967295")),
    Case("seed 2**32", conf(replace=("max_train_epochs = 4", "max_train_epochs = 4\nseed = 4294967296")), 2,
         ("training.seed",)),
    Case("seed negative", conf(replace=("max_train_epochs = 4", "max_train_epochs = 4\nseed = -1")), 2,
         ("training.seed",)),
    Case("max_bucket_reso 1e12", conf(replace=("max_bucket_reso = 256", "max_bucket_reso = 1e12")), 2,
         ("dataset.max_bucket_reso",)),
    Case("resolution 10**9", conf(replace=("resolution = 128", "resolution = 1000000000")), 2,
         ("dataset.resolution", "at most")),
    Case("max_train_epochs 1e12", conf(replace=("max_train_epochs = 4", "max_train_epochs = 1e12")), 2,
         ("training.max_train_epochs",)),
    Case("max_train_steps 10**12", conf(replace=("max_train_epochs = 4", "max_train_steps = 1000000000000")), 2,
         ("training.max_train_steps",)),
    Case("train_batch_size 10**9", conf(replace=("max_train_epochs = 4",
         "max_train_epochs = 4\ntrain_batch_size = 1000000000")), 2, ("training.train_batch_size",)),
    Case("network_dim 10**9", conf("[network]\nnetwork_dim = 1000000000\n"), 2, ("network.network_dim",)),
    Case("bucket_reso_steps 10**6", conf(replace=("max_bucket_reso = 256",
         "max_bucket_reso = 256\nbucket_reso_steps = 1000000")), 2, ("dataset.bucket_reso_steps",)),
    Case("empty caption_separator", conf(replace=("resolution = 128",
         "resolution = 128\nshuffle_caption = true\ncaption_separator = ''")), 2, ("dataset.caption_separator",)),
    Case("empty secondary_separator", conf(replace=("resolution = 128",
         "resolution = 128\nsecondary_separator = ''")), 2, ("dataset.secondary_separator",)),
    # --- the plan's own work stays bounded
    Case("save every epoch of 100000", conf("[output]\nsave_every_n_epochs = 1\n",
         ("max_train_epochs = 4", "max_train_epochs = 100000")), 2, ("output.save_every_n_epochs", "100000 files")),
    Case("save every step of 10**8", conf("[output]\nsave_every_n_steps = 1\n",
         ("max_train_epochs = 4", "max_train_steps = 100000000")), 2, ("output.save_every_n_steps",)),
    Case("sample every step of 10**6", lambda root: ["plan", "--config", project(
        root, "[sample]\nsample_prompts = 'p.txt'\nsample_every_n_steps = 1\n",
        ("max_train_epochs = 4", "max_train_steps = 1000000")), *_prompts(root)], 2,
        ("sample.sample_every_n_steps", "rounds")),
    # --- output_name is a file stem
    Case("output_name ../keep", train("[output]\noutput_name = '../keep'\n"), 2, ("output.output_name", "..")),
    Case("output_name with a slash", conf("[output]\noutput_name = 'a/b'\n"), 2, ("output.output_name",)),
    Case("output_name with a backslash", conf("[output]\noutput_name = 'a\\\\b'\n"), 2, ("output.output_name",)),
    Case("output_name with NUL", conf("[output]\noutput_name = \"a\\u0000b\"\n"), 2,
         ("output.output_name", "control")),
    Case("output_name 500 characters", conf(f"[output]\noutput_name = '{'x' * 500}'\n"), 2, ("output.output_name",)),
    # --- optimizer resolved by name, arguments by signature
    Case("unknown optimizer", train("[optimizer]\noptimizer_type = 'AdamX'\n"), 2,
         ("optimizer.optimizer_type", "AdamX")),
    Case("optimizer typo gets a suggestion", conf("[optimizer]\noptimizer_type = 'Prodigi'\n"), 2,
         ("optimizer.optimizer_type", "did you mean Prodigy")),
    Case("optimizer module not installed", conf("[optimizer]\noptimizer_type = 'nosuchpkg.Opt'\n"), 2,
         ("optimizer.optimizer_type", "nosuchpkg", "not installed")),
    Case("unknown optimizer argument", train("[optimizer.optimizer_args]\nbetaz = [0.9, 0.99]\n"), 2,
         ("optimizer.optimizer_args.betaz", "did you mean betas")),
    Case("DAdaptAdam argument of Prodigy", conf("[optimizer]\noptimizer_type = 'DAdaptAdam'\nlearning_rate = 1.0\n"
         "[optimizer.optimizer_args]\nd_coef = 2\n"), 2, ("optimizer.optimizer_args.d_coef", "DAdaptAdam")),
    Case("lr as an optimizer argument", conf("[optimizer.optimizer_args]\nlr = 1e-4\n"), 2,
         ("optimizer.optimizer_args.lr", "learning_rate")),
    Case("two unknown arguments, two lines", conf("[optimizer.optimizer_args]\nfoo = 1\nbar = 2\n"), 2,
         ("optimizer.optimizer_args.foo", "optimizer.optimizer_args.bar"), lines=2),
    # --- model-dependent values readable without torch
    Case("clip_skip above the text encoder's depth", train("", ("tiny:sd15\"", "tiny:sd15\"\nclip_skip = 3")), 2,
         ("model.clip_skip", "2 layers")),
    Case("clip_skip 13", conf("", ("tiny:sd15\"", "tiny:sd15\"\nclip_skip = 13")), 2, ("model.clip_skip",)),
    # --- output folder
    Case("output_dir is a file", lambda root: (root / "out").write_text("x") and
         ["train", "--config", project(root, "[output]\noutput_dir = 'out'\n")], 2,
         ("output.output_dir", "is a file")),
    Case("output_dir under a file", lambda root: (root / "out").write_text("x") and
         ["train", "--config", project(root, "[output]\noutput_dir = 'out/runs'\n")], 2,
         ("output.output_dir", "is a file")),
    Case("--output-dir is a file", lambda root: (root / "out").write_text("x") and
         ["train", "--config", project(root), "--output-dir", root / "out"], 2, ("output.output_dir",)),
    Case("logging_dir is a file", lambda root: (root / "logs").write_text("x") and
         ["train", "--config", project(root, "[logging]\nlogging_dir = 'logs'\n")], 2,
         ("logging.logging_dir", "is a file")),
    Case("output_dir not writable", lambda root: _readonly(root / "ro") and
         ["train", "--config", project(root, "[output]\noutput_dir = 'ro/runs'\n")], 2,
         ("output.output_dir", "not writable")),
    # --- config files themselves
    Case("config with a BOM is read", lambda root: _bom(project(root)) and ["plan", "--config", root / "c.toml"], 0),
    Case("config with a BOM and a real error", lambda root: _bom(project(root, "[network]\nnetwork_dimm = 4\n"))
         and ["plan", "--config", root / "c.toml"], 2, ("network.network_dimm", "did you mean")),
    Case("config is a folder", lambda root: (root / "cfg").mkdir() or ["plan", "--config", root / "cfg"], 2,
         ("cfg", "not a regular file")),
    Case("config is a FIFO", lambda root: os.mkfifo(root / "fifo.toml") or ["plan", "--config", root / "fifo.toml"],
         2, ("fifo.toml", "not a regular file")),
    Case("config is a dangling link", lambda root: os.symlink("gone.toml", root / "c.toml") or
         ["plan", "--config", root / "c.toml"], 2, ("c.toml", "not found")),
    Case("config in UTF-16", lambda root: (root / "c.toml").write_bytes(GOOD.encode("utf-16")) and
         ["plan", "--config", root / "c.toml"], 2, ("c.toml", "UTF-8")),
    Case("config nested 100000 deep", lambda root: (root / "c.toml").write_text(
         GOOD + "x = " + "[" * 100000 + "]" * 100000 + "\n") and ["plan", "--config", root / "c.toml"], 2,
         ("c.toml",)),
    Case("config unreadable", lambda root: chmod0(project(root)) or ["plan", "--config", root / "c.toml"], 2,
         ("c.toml", "cannot read")),
    Case("--set path is relative to the current folder", conf(args=("--set", "dataset.train_data_dir='nowhere'")), 3,
         ("dataset.train_data_dir", "nowhere", "--set"), absent=("c.toml",)),
    Case("--set string for an integer", conf(args=("--set", "training.max_train_epochs=10x")), 2,
         ("training.max_train_epochs", "value from --set", "10x"), absent=("c.toml",)),
    Case("--set value blamed on --set, not the file", conf(replace=("max_train_epochs = 4",
         "max_train_epochs = 4\nseed = 1"), args=("--set", "training.seed=-5")), 2,
         ("training.seed", "value from --set"), absent=("c.toml",)),
    Case("LORACLI_PRESETS pointing nowhere", conf(args=("--preset", "prodigy")), 2,
         ("LORACLI_PRESETS", "folder not found"), env={"LORACLI_PRESETS": "/nonexistent/presets"}),
    Case("LORACLI_PRESETS pointing at a file", lambda root: ["plan", "--config", project(root), "--preset", "prodigy"],
         2, ("LORACLI_PRESETS", "not a folder"), env={"LORACLI_PRESETS": "c.toml"}),
]


def _prompts(root: Path) -> list:
    (root / "p.txt").write_text("a cat\n")
    return []


def _bom(cfg: Path) -> bool:
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    return True


def _readonly(folder: Path) -> bool:
    folder.mkdir()
    lock_read_only(folder)
    return True


DATA_CASES = [
    Case("image is a FIFO", data(lambda d: os.mkfifo(d / "pipe.png")), 3, ("pipe.png", "FIFO")),
    Case("caption is a FIFO", data(lambda d: (d / "000.txt").unlink() or os.mkfifo(d / "000.txt")), 3,
         ("000.txt", "FIFO")),
    Case("caption is a folder", data(lambda d: (d / "000.txt").unlink() or (d / "000.txt").mkdir()), 3,
         ("000.txt", "folder")),
    Case("image is a dangling link", data(lambda d: symlink("gone.png")(d, "lost.png")), 3,
         ("lost.png", "dangling")),
    Case("image is a link loop", data(lambda d: symlink("loop.png")(d, "loop.png")), 3, ("loop.png", "loop")),
    Case("caption is a dangling link", data(lambda d: (d / "000.txt").unlink() or symlink("gone.txt")(d, "000.txt")),
         3, ("000.txt", "dangling")),
    Case("caption is a link loop", data(lambda d: (d / "000.txt").unlink() or symlink("000.txt")(d, "000.txt")), 3,
         ("000.txt", "loop")),
    Case("image is a device", data(lambda d: symlink("/dev/null")(d, "null.png")), 3, ("null.png", "device")),
    Case("caption is a device", data(lambda d: (d / "000.txt").unlink() or symlink("/dev/zero")(d, "000.txt")), 3,
         ("000.txt", "device")),
    Case("decompression bomb header", data(lambda d: (d / "bomb.png").write_bytes(png_header_only(100000, 100000))),
         3, ("bomb.png", "megapixels")),
    Case("caption with NUL bytes", data(lambda d: (d / "000.txt").write_bytes(b"char\x00\x00pose\n")), 3,
         ("000.txt", "NUL")),
    Case("caption in UTF-16", data(lambda d: (d / "000.txt").write_text("char, pose\n", encoding="utf-16")), 3,
         ("000.txt", "NUL")),
    Case("caption in Latin-1", data(lambda d: (d / "000.txt").write_bytes("caf\xe9, pose\n".encode("latin-1"))), 3,
         ("000.txt", "UTF-8")),
    Case("empty image file", data(lambda d: (d / "zero.png").write_bytes(b"")), 3, ("zero.png",)),
    Case("text file named .jpg", data(lambda d: (d / "note.jpg").write_text("hello")), 3, ("note.jpg",)),
    Case("truncated PNG header", data(lambda d: (d / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")), 3,
         ("cut.png",)),
    Case("zero-size image header", data(lambda d: (d / "flat.png").write_bytes(png_header_only(0, 10))), 3,
         ("flat.png",)),
    Case("two broken files, two lines", data(lambda d: os.mkfifo(d / "a.png") or (d / "b.jpg").write_text("x")), 3,
         ("a.png", "b.jpg"), lines=2),
    Case("image unreadable", data(lambda d: chmod0(d / "000.png")), 3, ("000.png",)),
    Case("caption unreadable", data(lambda d: chmod0(d / "000.txt")), 3, ("000.txt", "cannot read")),
    Case("image folder unreadable", data(lambda d: chmod0(d)), 3, ("2_char", "cannot list")),
    Case("train_data_dir is a file", lambda root: ["plan", "--config", project(root, replace=(
        'train_data_dir = "data"', 'train_data_dir = "c.toml"'))], 3, ("dataset.train_data_dir", "not a folder")),
    Case("train_data_dir is a FIFO", lambda root: os.mkfifo(root / "pipe") or ["plan", "--config", project(
        root, replace=('train_data_dir = "data"', 'train_data_dir = "pipe"'))], 3, ("dataset.train_data_dir",)),
    Case("train_data_dir is a link loop", lambda root: os.symlink("loop", root / "loop") or ["plan", "--config",
         project(root, replace=('train_data_dir = "data"', 'train_data_dir = "loop"'))], 3,
         ("dataset.train_data_dir",)),
    Case("sample_prompts is a FIFO", lambda root: os.mkfifo(root / "p.txt") or ["plan", "--config", project(
        root, "[sample]\nsample_prompts = 'p.txt'\nsample_at_first = true\n")], 3, ("sample.sample_prompts",)),
    Case("caption folder on train writes nothing", lambda root: _caption_folder_train(root), 3, ("000.txt", "folder")),
    Case("caption with a BOM is cleaned", data(lambda d: (d / "000.txt").write_bytes(b"\xef\xbb\xbfchar\n")), 0),
]


def _caption_folder_train(root: Path) -> list:
    cfg = project(root)
    (root / "data" / "2_char" / "000.txt").unlink()
    (root / "data" / "2_char" / "000.txt").mkdir()
    return ["train", "--config", cfg]


def _run_with(root: Path, mutate) -> list:
    run = fake_run(root)
    mutate(run)
    return ["train", "--resume", run]


RUN_CASES = [
    Case("resume: plan.json damaged", lambda root: _run_with(root, lambda r: (r / "plan.json").write_text('{"tot')),
         3, ("plan.json", "damaged")),
    Case("resume: plan.json is a list", lambda root: _run_with(root, lambda r: (r / "plan.json").write_text("[1]")),
         3, ("plan.json", "damaged")),
    Case("resume: plan.json lacks fields", lambda root: _run_with(
        root, lambda r: (r / "plan.json").write_text('{"total_steps": 3}')), 3, ("plan.json", "damaged")),
    Case("resume: status.json damaged", lambda root: _run_with(
        root, lambda r: (r / "status.json").write_text('{"state": "runn')), 3, ("status.json", "damaged", "delete it")),
    Case("resume: status.json is not an object", lambda root: _run_with(
        root, lambda r: (r / "status.json").write_text('"running"')), 3, ("status.json", "damaged")),
    Case("resume: status.json binary", lambda root: _run_with(
        root, lambda r: (r / "status.json").write_bytes(b"\xff\xfe\x00garbage")), 3, ("status.json",)),
    Case("resume: config.resolved.toml damaged", lambda root: _run_with(
        root, lambda r: (r / "config.resolved.toml").write_text("[model\n")), 3, ("config.resolved.toml",)),
    Case("resume: config.resolved.toml invalid", lambda root: _run_with(
        root, lambda r: (r / "config.resolved.toml").write_text("[model]\nv2 = 3\n")), 3, ("config.resolved.toml",)),
    Case("resume: not a run folder", lambda root: (root / "photos").mkdir() or ["train", "--resume", root / "photos"],
         2, ("photos", "not a loracli run folder")),
    Case("resume: plan.json is a folder", lambda root: _run_with(
        root, lambda r: (r / "plan.json").unlink() or (r / "plan.json").mkdir()), 2, ("plan.json",)),
    Case("resume: a running run is refused, naming its pid", lambda root: _locked(root), 4,
         ("is being trained by another process", f"pid {os.getpid()}")),
    Case("report: status.json damaged", lambda root: _report_with(
        root, lambda r: (r / "status.json").write_text("{")), 3, ("status.json", "damaged")),
    Case("report: status.json with wrong types", lambda root: _report_with(
        root, lambda r: (r / "status.json").write_text(json.dumps(
            {"state": 3, "step": "x", "started_at": 1e300, "updated_at": "y", "error": ["z"]}))), 0),
    Case("report: torn last metrics line", lambda root: _report_with(root, lambda r: (r / "metrics.jsonl").write_text(
        '{"step": 1, "epoch": 1, "loss": 0.5, "lr": {"unet": 0.001}}\n{"step": 2, "ep')), 0),
    Case("report: binary metrics", lambda root: _report_with(
        root, lambda r: (r / "metrics.jsonl").write_bytes(b"\x00\xff" * 100)), 0),
    Case("report: a file, not a folder", lambda root: (root / "x.safetensors").write_bytes(b"") or
         ["report", root / "x.safetensors"], 2, ("x.safetensors", "inspect")),
]


def _locked(root: Path) -> list:
    run = fake_run(root)
    lock = RunLock(run).acquire()  # this process plays the run that is still training
    _HELD.append(lock)
    return ["train", "--resume", run]


_HELD: list[RunLock] = []


def _report_with(root: Path, mutate) -> list:
    run = fake_run(root)
    mutate(run)
    return ["report", run]


def _inspect(data: bytes, name: str = "x.safetensors"):
    def build(root: Path) -> list:
        (root / name).write_bytes(data)
        return ["inspect", root / name]
    return build


def _unreadable_lora(command: str, *more: str):
    """A builder: a LoRA file nobody may read, given to `loracli COMMAND` (Path arguments are not checked by
    the CLI parser, whose multi-line usage error would hide the file's own one-line message)."""
    def build(root: Path) -> list:
        (root / "x.safetensors").write_bytes(safetensors_bytes({"ss_network_dim": "4"}))
        chmod0(root / "x.safetensors")
        return [command, root / "x.safetensors", *more]
    return build


FILE_CASES = [
    Case("inspect: unreadable file", _unreadable_lora("inspect"), 3, ("x.safetensors", "cannot read")),
    Case("resize: unreadable file", _unreadable_lora("resize", "out.safetensors", "--dim", "2"), 3,
         ("x.safetensors", "cannot read")),
    Case("import: unreadable file", _unreadable_lora("import", "-o", "imported.toml"), 3, ("x.safetensors", "cannot read")),
    Case("inspect: tag frequency not JSON", _inspect(safetensors_bytes({"ss_tag_frequency": "{nope"})), 0),
    Case("inspect: tag frequency a list", _inspect(safetensors_bytes({"ss_tag_frequency": "[1, 2]"})), 0),
    Case("inspect: tag frequency 100000 deep", _inspect(safetensors_bytes(
        {"ss_tag_frequency": "[" * 100000 + "]" * 100000})), 0),
    Case("inspect: dataset dirs of the wrong shape", _inspect(safetensors_bytes(
        {"ss_dataset_dirs": json.dumps({"x": "y"}), "ss_datasets": json.dumps({"a": 1})})), 0),
    Case("inspect: numbers that are not", _inspect(safetensors_bytes(
        {"ss_network_dim": "abc", "ss_steps": "lots", "ss_epoch": "1e999", "ss_learning_rate": "nan",
         "ss_training_started_at": "x", "ss_network_args": "{bad"})), 0),
    Case("inspect: 5000-digit number", _inspect(safetensors_bytes({"ss_steps": "9" * 5000})), 0),
    Case("inspect: metadata is a list", _inspect(safetensors_bytes([1, 2])), 3, ("x.safetensors", "__metadata__")),
    Case("inspect: header length 10**18", _inspect(b"\x00\x00\x64\xa7\xb3\xb6\xe0\x0d{}"), 3, ("x.safetensors",)),
    Case("inspect: header not an object", _inspect(safetensors_bytes(raw_header=b"[1, 2]")), 3, ("x.safetensors",)),
    Case("inspect: header not UTF-8", _inspect(safetensors_bytes(raw_header=b"\xff\xfe{}")), 3, ("x.safetensors",)),
    Case("inspect: tensor entry malformed", _inspect(safetensors_bytes(tensors={"k": {"dtype": "F32"}})), 3,
         ("x.safetensors",)),
    Case("inspect: empty file", _inspect(b""), 3, ("x.safetensors",)),
    Case("inspect: a FIFO", lambda root: os.mkfifo(root / "f.safetensors") or ["inspect", root / "f.safetensors"], 3,
         ("f.safetensors",)),
    Case("inspect: a folder", lambda root: (root / "d.safetensors").mkdir() or ["inspect", root / "d.safetensors"], 3,
         ("d.safetensors",)),
]


def _queue(*args):
    def build(root: Path) -> list:
        return ["queue", "run", project(root), "--queue-file", root / "q.json", *args]
    return build


def _queue_file(text: str):
    def build(root: Path) -> list:
        (root / "q.json").write_text(text)
        return ["queue", "run", project(root), "--queue-file", root / "q.json"]
    return build


QUEUE_CASES = [
    Case("queue: notify program missing", _queue("--notify-command", "no-such-notifier --flag"), 2,
         ("--notify-command", "no-such-notifier", "not found")),
    Case("queue: notify command with an open quote", _queue("--notify-command", "echo 'unclosed"), 2,
         ("--notify-command", "quote")),
    Case("queue: webhook not a URL", _queue("--webhook", "not a url"), 2, ("--webhook", "http")),
    Case("queue: webhook port not a number", _queue("--webhook", "http://127.0.0.1:port/hook"), 2, ("--webhook",)),
    Case("queue: webhook file URL", _queue("--webhook", "file:///etc/passwd"), 2, ("--webhook",)),
    Case("queue: damaged queue file", _queue_file('{"jobs": {'), 2, ("--queue-file", "q.json", "not a queue file")),
    Case("queue: queue file is a list", _queue_file("[1, 2]"), 2, ("q.json", "not a queue file")),
    Case("queue: queue file jobs of the wrong type", _queue_file('{"jobs": {"a": 3}}'), 2, ("q.json",)),
    Case("queue: status of a record without a config", lambda root: (root / "q.json").write_text(
        '{"jobs": {"k": {"status": "finished"}}}') and ["queue", "status", "--queue-file", root / "q.json"], 2,
        ("q.json", "job record")),
    Case("queue: status of a damaged queue file", lambda root: (root / "q.json").write_text("{") and
         ["queue", "status", "--queue-file", root / "q.json"], 2, ("q.json",)),
]

CASES = CONFIG_CASES + DATA_CASES + RUN_CASES + FILE_CASES + QUEUE_CASES


def test_corpus_is_large_enough():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    forget_locks()
    args = case.build(root)
    before = snapshot(root)
    try:
        with enforced():
            result = run_cli(*args)
    finally:
        forget_locks()
        while _HELD:
            _HELD.pop().release()
    check(case, root, result, before)


def test_an_unexpected_error_is_one_line_and_a_crash_report(tmp_path, monkeypatch):
    """A bug (here: planning raises ZeroDivisionError) prints one line naming a crash report with the traceback."""
    import loracli.plan

    def broken(resolved):
        return 1 / 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loracli.plan, "build_plan", broken)
    result = run_cli("plan", "--config", project(tmp_path))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected ZeroDivisionError"), result.stderr
    report = Path(lines[0].rsplit("crash report: ", 1)[1])
    assert report.parent == tmp_path / "cache" / "crash-reports"
    text = report.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "broken" in text


def test_a_file_error_while_training_is_a_run_time_failure_named(tmp_path, monkeypatch):
    """The same OSError is exit 3 (an input file) at plan time and exit 4 once a run trains, naming the disk."""
    import errno

    from loracli.cli import train_cmd

    def full_disk(run_dir, processes, resume):
        train_cmd.CONTEXT.training = True
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "my.safetensors"))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train_cmd, "_launch", full_disk)
    result = run_cli("train", "--config", project(tmp_path))
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "my.safetensors" in lines[0] and "disk full" in lines[0] and "MiB free" in lines[0]
