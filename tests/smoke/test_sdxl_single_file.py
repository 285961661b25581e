"""SDXL single-file checkpoints (sd_xl_base_1.0.safetensors layout, as Pony/Illustrious/NoobAI files are):
loaded offline, they compute what the original weights compute, and a LoRA trains on them."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loracli.run.models import load_sd_components
from tests.pure.cli_helpers import run_cli
from tests.smoke.ldm_checkpoint import CLIP_VOCAB, build_tiny_modules, sdxl_ldm_state
from tests.smoke.test_sdxl import CONFIG


def _sdxl_pipeline_with_clip_vocab():
    """tiny:sdxl's modules, its text encoders grown to CLIP's real vocabulary (what every SDXL file has) and
    a VAE with the original layout's 32 norm groups."""
    from diffusers import StableDiffusionXLPipeline

    from loracli.run.tiny_model import ensure_tiny_model

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("tiny:sdxl"), local_files_only=True)
    torch.manual_seed(1)
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.resize_token_embeddings(CLIP_VOCAB)
        te.get_input_embeddings().weight.data.normal_(0, 0.02)
    _, vae, _ = build_tiny_modules()
    vae.register_to_config(scaling_factor=0.13025)
    pipe.vae = vae
    return pipe


def test_sdxl_single_file_loads_to_the_same_computation_and_trains(tmp_path, make_image, monkeypatch):
    pipe = _sdxl_pipeline_with_clip_vocab()
    path = tmp_path / "models" / "tiny-sdxl.safetensors"
    path.parent.mkdir()
    save_file(sdxl_ldm_state(pipe), str(path))

    sd = load_sd_components(str(path))
    assert sd.family.name == "sdxl" and len(sd.text_encoders) == 2
    assert sd.tokenizers[1].pad_token == "!" and sd.vae.config.scaling_factor == 0.13025
    ids = sd.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for mine, theirs in zip(sd.text_encoders, (pipe.text_encoder, pipe.text_encoder_2)):
            a, b = mine(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
            torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2])
            torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
        # the projection that makes SDXL's pooled vector (OpenCLIP stores it transposed)
        torch.testing.assert_close(sd.text_encoders[1].text_projection.weight, pipe.text_encoder_2.text_projection.weight)
        latents, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 96)
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        torch.testing.assert_close(sd.unet(latents, 10, hidden, added_cond_kwargs=added).sample,
                                   pipe.unet(latents, 10, hidden, added_cond_kwargs=added).sample)
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(sd.vae.encode(pixels).latent_dist.mean, pipe.vae.encode(pixels).latent_dist.mean)

    # A LoRA trains on it (detected as SDXL from the header), with SDXL's names.
    monkeypatch.chdir(tmp_path)
    from tests.smoke.conftest import make_smoke_dataset

    make_smoke_dataset(tmp_path, make_image)
    cfg = tmp_path / "loracli.toml"
    cfg.write_text(CONFIG.replace('"tiny:sdxl"', f'"{path.as_posix()}"'))
    result = run_cli("train", "--config", str(cfg), "--set", "training.max_train_epochs=1")
    assert result.exit_code == 0, result.stderr[-2000:]
    (lora,) = (tmp_path / "runs").glob("*/sx.safetensors")
    with safe_open(str(lora), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        assert f.metadata()["ss_sd_model_name"] == "tiny-sdxl.safetensors"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-sdxl.safetensors"]  # nothing beside it
