"""Two processes (gloo, launched the way `loracli train` launches them) train the same LoRA as one
process with the doubled batch.

Why the two runs see the same data: the dataset is one image with 4 repeats, so every batch holds
copies of the same cached latent and caption, whatever the shuffle: one process with batch 2 steps
on [img, img], and two processes with batch 1 step on [img] each, which averaged is the same
batch. The per-sample draws are made for the step's whole batch on every process (each keeping its
rows, loracli.run.global_draws), so sample k gets the same noise and timestep in both runs; the
gradients are averaged across processes and the LR schedule steps once per process per update
over total × processes steps, as one process steps it over total. lr_warmup_steps is 0: an integer
warmup counts scheduler steps, which N processes take N at a time (as in sd-scripts).

Before the draws were shared, every process drew the same noise and timesteps for its own sample
and the weights differed by about 5e-3 (the whole update is about that size): the tolerance below
(1e-4) would catch that.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from loracli.config.loader import resolve_config
from loracli.plan import build_plan
from loracli.rundir import create_run_dir, write_run_files


def make_run(tmp: Path, make_image, processes: int, batch: int) -> Path:
    make_image(tmp / "data" / "4_a" / "0.png", 64, 64, color=(200, 30, 90))
    (tmp / "data" / "4_a" / "0.txt").write_text("a red square")
    cfg = tmp / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "tiny:sd15"\n[dataset]\ntrain_data_dir = "data"\n'
                   'resolution = 64\ncache_latents = true\n[training]\nmax_train_epochs = 2\nseed = 1\n'
                   f'num_processes = {processes}\ntrain_batch_size = {batch}\n'
                   '[optimizer]\nlearning_rate = 1e-3\nlr_scheduler = "cosine"\nlr_warmup_steps = 0\n'
                   f'max_grad_norm = 1.0\n[output]\noutput_dir = "{tmp / "runs"}"\n')
    resolved = resolve_config(cfg)
    run_dir = create_run_dir(resolved.config)
    write_run_files(run_dir, resolved, build_plan(resolved), ["test"])
    return run_dir


def test_two_processes_train_as_one_with_the_doubled_batch(tmp_path, make_image, monkeypatch):
    from loracli.cli.train_cmd import _launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    two = make_run(tmp_path / "two", make_image, processes=2, batch=1)
    one = make_run(tmp_path / "one", make_image, processes=1, batch=2)
    _launch(two, 2, resume=False)  # accelerate launch --multi_gpu --num_processes 2 -m loracli.run.launch
    _launch(one, 1, resume=False)

    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # 4 repeats / (2 × 1) per epoch, 2 epochs
    a, b = load_file(two / "last.safetensors"), load_file(one / "last.safetensors")
    assert a.keys() == b.keys()
    moved = max(a[k].abs().max().item() for k in a if "lora_up" in k)  # lora_up starts at zero
    assert moved > 1e-3
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, worst
