"""Whole SDXL runs on tiny:sdxl: sd-scripts' SDXL key names and metadata, files diffusers' SDXL pipeline
loads and that change its output, samples, LoCon with cached latents and text-encoder outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.pure.cli_helpers import run_cli
from tests.smoke.conftest import CONFIG as SMOKE_CONFIG
from tests.smoke.conftest import make_smoke_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the SD1 smoke config on tiny:sdxl, with SDXL's 32-pixel bucket steps
CONFIG = (SMOKE_CONFIG.replace('"tiny:sd15"', '"tiny:sdxl"')
          .replace("max_bucket_reso = 128\n", "max_bucket_reso = 128\nbucket_reso_steps = 32\n")
          .replace('output_name = "smoke"', 'output_name = "sx"').replace("max_train_epochs = 3", "max_train_epochs = 2"))


def _sai_attention_block(path: str) -> tuple[str, str] | None:
    """The SAI/ldm name of the transformer block a diffusers module path is in, and the rest of the path
    (sd-scripts' SDXL conversion table, written out here for two layers per block: down i.j → input
    3i+j+1, up i.j → output 3i+j, the middle attention → middle_block 1)."""
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4 and parts[2] == "attentions":
        i, j = int(parts[1]), int(parts[3])
        block = f"input_blocks_{3 * i + j + 1}_1" if parts[0] == "down_blocks" else f"output_blocks_{3 * i + j}_1"
        return block, "_".join(parts[4:])
    if parts[0] == "mid_block" and len(parts) > 3 and parts[1] == "attentions":
        return "middle_block_1", "_".join(parts[3:])
    return None


def expected_lora_modules(unet, text_encoders) -> set[str]:
    """What sd-scripts' networks.lora targets on SDXL: every Linear inside the transformer blocks, and the
    Linears of each text encoder's attention and MLP."""
    names = set()
    for path, module in unet.named_modules():
        found = _sai_attention_block(path) if isinstance(module, torch.nn.Linear) else None
        if found is not None:
            names.add(f"lora_unet_{found[0]}_{found[1]}")
    for prefix, te in zip(("lora_te1", "lora_te2"), text_encoders):
        for path, module in te.named_modules():
            if isinstance(module, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
                inner = path if path.startswith("text_model.") else f"text_model.{path}"
                names.add(f"{prefix}_{inner.replace('.', '_')}")
    return names


@pytest.fixture
def sdxl_project(tmp_path, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_smoke_dataset(tmp_path, make_image)
    (tmp_path / "prompts.txt").write_text("thing0, color 0 --w 64 --h 96 --s 2 --d 3\n")
    cfg = tmp_path / "loracli.toml"
    cfg.write_text(CONFIG)
    return cfg


def _train(cfg: Path, *sets: str) -> Path:
    args = ["train", "--config", str(cfg)]
    for s in sets:
        args += ["--set", s]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr[-3000:]
    (run,) = [p for p in (cfg.parent / "runs").iterdir() if p.is_dir()]
    return run


def test_sdxl_lora_has_sd_scripts_names_and_loads_in_the_diffusers_sdxl_pipeline(sdxl_project):
    from diffusers import StableDiffusionXLPipeline

    from loracli.run.tiny_model import ensure_tiny_model

    run = _train(sdxl_project, 'sample.sample_prompts="prompts.txt"', "sample.sample_every_n_epochs=1",
                 "dataset.flip_aug=true", "training.max_train_epochs=1")
    lora = run / "sx.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("tiny:sdxl"), local_files_only=True)
    assert modules == expected_lora_modules(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2])
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_network_module"] == "networks.lora"
    assert sorted(p.name for p in (run / "samples").glob("sx_*.png")) == ["sx_e000001_00_3.png"]

    def latents():
        generator = torch.Generator().manual_seed(0)
        return pipe("thing0", num_inference_steps=1, height=64, width=64, generator=generator,
                    output_type="latent").images

    # loracli grid hooks every module of an SDXL file into the SDXL models, and renders.
    from loracli.run.models import load_sd_components
    from loracli.run.strength_grid import GridJob, hook_lora_file, render_grids
    from loracli.sample_prompts import parse_prompt_line

    hooked = hook_lora_file(lora, load_sd_components("tiny:sdxl"))
    assert len(hooked.unet_loras) + len(hooked.text_encoder_loras) == len(modules)

    job = GridJob(files=[lora], prompts=[parse_prompt_line("thing0 --w 64 --h 64 --s 2", 0)], strengths=[0.0, 1.0],
                  seeds=[1], model="tiny:sdxl", out_dir=run / "grids")
    cells = []
    (grid,) = render_grids(job, "cpu", on_image=lambda: cells.append(1))
    assert grid.is_file() and len(cells) == 2

    before = latents()
    pipe.load_lora_weights(str(lora))
    wrapped = [m for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
               for m in model.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(wrapped) == len(modules)  # every module of the file found its layer
    assert not torch.allclose(before, latents(), atol=1e-4)


def test_sdxl_locon_unet_only_with_cached_latents_and_text_encoder_outputs(sdxl_project, monkeypatch, tmp_path):
    from loracli.run.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("tiny:sdxl")  # from the shared cache; the run's own caches go to a fresh one
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    sets = [f'model.pretrained_model_name_or_path="{model}"', 'network.algo="locon"', "network.conv_dim=2",
            "network.network_train_unet_only=true", "training.cache_text_encoder_outputs_to_disk=true",
            "dataset.cache_latents=true", "training.max_train_epochs=1"]
    run = _train(sdxl_project, *sets)
    with safe_open(str(run / "sx.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert not any(m.startswith("lora_te") for m in modules)
    # ResNet convs under SAI names: input_blocks.1.0 is down_blocks.0.resnets.0, conv1 is in_layers.2
    for name in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_middle_block_2_out_layers_3", "lora_unet_output_blocks_2_2_conv"):
        assert name in modules
    assert meta["ss_network_module"] == "lycoris.kohya"
    cached = list((tmp_path / "cache" / "text").glob("*.safetensors"))
    assert len(cached) == 6  # one per distinct caption
    with safe_open(str(cached[0]), "pt") as f:
        assert f.get_tensor("hidden").shape == (77, 96) and f.get_tensor("pooled").shape == (32,)
