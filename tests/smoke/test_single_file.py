"""Single-file SD1.x/SD2.x checkpoints: loaded offline from the original layout, trained on, refused clearly.

The checkpoints are written by the test (tests/smoke/ldm_checkpoint.py: tiny random
weights, CLIP's real vocabulary) with the original Stable Diffusion key names. The
network is disabled in this process and in the `loracli train` subprocess: any
attempt to connect or to resolve a host name is recorded and fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loracli.errors import ConfigError, DatasetError
from loracli.run.models import load_sd_components
from tests.pure.cli_helpers import run_cli
from tests.smoke.ldm_checkpoint import build_tiny_modules, write_checkpoint
from tests.smoke.test_train import assert_diffusers_loads

ROOT = Path(__file__).resolve().parents[2]
INTERNET = (socket.AF_INET, socket.AF_INET6)

# Loaded into the `loracli train` subprocess: internet sockets raise, and each attempt is logged.
SITECUSTOMIZE = '''
import os, socket
_log = os.environ["LORACLI_TEST_NET_LOG"]
open(_log + ".guard", "w").close()  # proves the guard was loaded
def _record(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError("network disabled by the test: " + what)
class _NoInternet(socket.socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect %r" % (address,))
        return super().connect(address)
    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _record("connect_ex %r" % (address,))
        return super().connect_ex(address)
socket.socket = _NoInternet
socket.create_connection = lambda address, *a, **k: _record("create_connection %r" % (address,))
socket.getaddrinfo = lambda host, *a, **k: _record("getaddrinfo %r" % (host,))
'''


@pytest.fixture
def no_network(monkeypatch):
    """In this process: connecting anywhere on the internet (or resolving a name) raises; the list
    holds every attempt. (Opening a socket is allowed: urllib3 binds ::1 to probe for IPv6.)"""
    attempts: list[str] = []

    def refuse(what: str):
        attempts.append(what)
        raise OSError("network disabled by the test: " + what)

    class NoInternet(socket.socket):
        def connect(self, address):
            if self.family in INTERNET:
                refuse(f"connect {address}")
            return super().connect(address)

        def connect_ex(self, address):
            if self.family in INTERNET:
                refuse(f"connect_ex {address}")
            return super().connect_ex(address)

    monkeypatch.setattr(socket, "socket", NoInternet)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(f"create_connection {address}"))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(f"getaddrinfo {host}"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # loracli must go offline by itself
    yield attempts
    assert attempts == []


def _config(project: Path, model: Path, *extra: str) -> Path:
    text = (project / "loracli.toml").read_text().replace('"tiny:sd15"', json.dumps(str(model)))
    cfg = project / "single.toml"
    cfg.write_text(text + "\n".join(extra) + "\n")
    return cfg


def test_trains_on_an_original_layout_file_with_the_network_disabled(smoke_project, tmp_path, no_network):
    models = tmp_path / "models"
    model = write_checkpoint(models / "tiny-sd15.safetensors")
    cfg = _config(tmp_path, model)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), LORACLI_TEST_NET_LOG=str(net_log))
    proc = subprocess.run([sys.executable, "-m", "loracli", "train", "--config", str(cfg),
                           "--set", "training.max_train_epochs=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(f"{net_log}.guard").exists() and not net_log.exists(), net_log.read_text()
    assert sorted(p.name for p in models.iterdir()) == ["tiny-sd15.safetensors"]  # nothing written beside it

    (run,) = (tmp_path / "runs").iterdir()
    lora = run / "smoke.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert meta["ss_sd_model_name"] == "tiny-sd15.safetensors" and meta["ss_base_model_version"] == "sd_v1"

    # The file loads onto the single-file model in diffusers and changes what the UNet computes.
    sd = load_sd_components(str(model))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert_diffusers_loads(lora, pipe)


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_loaded_models_compute_what_the_original_weights_compute(tmp_path, no_network, v2):
    unet, vae, text = build_tiny_modules(v2)
    path = write_checkpoint(tmp_path / "m.safetensors", v2=v2, half=False, modules=(unet, vae, text))
    sd = load_sd_components(str(path), v2, v_parameterization=v2)
    assert sd.family.name == ("sd2" if v2 else "sd1")
    assert sd.noise_scheduler.config.prediction_type == ("v_prediction" if v2 else "epsilon")
    assert sd.unet.config.use_linear_projection is v2 and sd.unet.config.block_out_channels == [32, 64]
    assert sd.unet.config.attention_head_dim == ([1, 1] if v2 else 8)  # SD2: 64-wide heads; SD1: 8 heads
    assert not any(p.requires_grad for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())

    ids = sd.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7].item() == (0 if v2 else 49407)  # SD2 pads with "!"
    g = torch.Generator().manual_seed(0)
    image, latents = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        if v2:  # SD2 reads the penultimate layer (then the final norm); the model stops there
            out = text(ids, output_hidden_states=True)
            expected = text.final_layer_norm(out.hidden_states[-2])
            assert sd.text_encoder.config.num_hidden_layers == text.config.num_hidden_layers - 1
        else:
            expected = text(ids).last_hidden_state
        hidden = sd.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(hidden, expected)
        torch.testing.assert_close(sd.unet(latents, torch.tensor([321]), hidden).sample,
                                   unet(latents, torch.tensor([321]), hidden).sample)
        torch.testing.assert_close(sd.vae.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
        torch.testing.assert_close(sd.vae.decode(latents).sample, vae.decode(latents).sample)


def _fake(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


def _train_error(project: Path, model: Path, *extra: str):
    result = run_cli("train", "--config", _config(project, model, *extra))
    return result.exit_code, result.stderr


def test_sdxl_refiner_and_inpainting_files_are_refused_naming_what_they_are(smoke_project, tmp_path, no_network):
    embedder = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    refiner = _fake(tmp_path / "refiner.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.token_embedding.weight": (49408, 8),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    })
    inpaint = _fake(tmp_path / "inpaint.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816), embedder: (49408, 8),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 8),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    })
    for path, words in ((refiner, "refiner"), (inpaint, "inpainting")):
        code, err = _train_error(tmp_path, path)
        assert code == 2 and words in err and str(path) in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()  # refused at plan time: no run folder


def test_ckpt_needs_the_opt_in_and_then_loads(smoke_project, tmp_path, no_network):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    code, err = _train_error(tmp_path, ckpt)
    assert code == 2 and "model.allow_pickle_checkpoint" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="allow_pickle_checkpoint"):
        load_sd_components(str(ckpt))
    sd = load_sd_components(str(ckpt), allow_pickle=True)  # weights-only unpickling is enough here
    assert sd.unet.config.cross_attention_dim == 32

    # Lightning checkpoints also pickle their hyper-parameters: only the opt-in unpickles those.
    payload = torch.load(str(ckpt), weights_only=True)
    payload["hyper_parameters"] = argparse.Namespace(lr=1e-4)
    torch.save(payload, str(ckpt))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(ckpt), weights_only=True)
    sd = load_sd_components(str(ckpt), allow_pickle=True)
    assert sd.text_encoder.config.vocab_size == 49408


def test_model_v2_must_match_the_file(smoke_project, tmp_path, no_network):
    sd2 = write_checkpoint(tmp_path / "sd2.safetensors", v2=True)
    code, err = _train_error(tmp_path, sd2)
    assert code == 2 and "SD2.x checkpoint" in err and "model.v2 = true" in err
    sd1 = write_checkpoint(tmp_path / "sd1.safetensors")
    with pytest.raises(ConfigError, match="SD1.x checkpoint .* model.v2 = false"):
        load_sd_components(str(sd1), v2=True)


def test_files_that_are_not_base_models_are_refused(tmp_path, no_network):
    lora = _fake(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                                                 (4, 32), "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()})
    inpaint = _fake(tmp_path / "inpaint.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
                                                       "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)})
    unknown = _fake(tmp_path / "other.safetensors", {"foo.weight": (3, 3)})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = [(lora, DatasetError, "LoRA/LyCORIS file"), (inpaint, ConfigError, "inpainting model"),
             (unknown, DatasetError, "not a Stable Diffusion checkpoint"),
             (broken, DatasetError, "not a readable .safetensors file")]
    for path, error, words in cases:
        with pytest.raises(error, match=words) as info:
            load_sd_components(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_sd2_file_trains_with_v2_and_v_parameterization(smoke_project, tmp_path, no_network):
    model = write_checkpoint(tmp_path / "tiny-sd2.safetensors", v2=True)
    cfg = _config(tmp_path, model)
    result = run_cli("train", "--config", cfg, "--set", "training.max_train_epochs=1", "--set", "model.v2=true",
                     "--set", "model.v_parameterization=true", "--set", "dataset.max_token_length=150")
    assert result.exit_code == 0, (result.stderr, result.exception)
    (run,) = (tmp_path / "runs").iterdir()
    from safetensors import safe_open

    with safe_open(str(run / "smoke.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    # The SD2 text tower keeps 2 of the file's 3 layers (penultimate): LoRA modules exist for those only.
    layers = {k.split("_layers_")[1].split("_")[0] for k in keys if k.startswith("lora_te_")}
    assert layers == {"0", "1"}


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_full_size_shapes_give_the_shipped_configs(v2):
    """SD1.5 / SD2 shapes (weightless, laid out as in the real files) read back as the real architectures."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loracli.run import checkpoint as ck
    from tests.smoke import ldm_checkpoint as layout

    unet_base = ck._base_config("sd2_unet.json" if v2 else "sd1_unet.json")
    text_base = ck._base_config("sd2_text_encoder.json" if v2 else "sd1_text_encoder.json")
    vae_base = ck._base_config("sd_vae.json")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_base)
        vae = AutoencoderKL.from_config(vae_base)
        # ViT-H/14 has 24 layers; SD2's model keeps 23
        text = CLIPTextModel(CLIPTextConfig(**{**text_base, "num_hidden_layers": 24 if v2 else 12}))
    state = {**layout.unet_to_ldm(unet.state_dict(), layers=2), **layout.vae_to_ldm(vae.state_dict()),
             **(layout.open_clip_to_ldm(text.state_dict(), 1024) if v2 else layout.clip_to_ldm(text.state_dict()))}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in shapes  # the real files' names
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in shapes
    assert ck.detect(shapes, Path("m.safetensors"), v2) == ("sd2" if v2 else "sd1")
    assert ck.unet_config(shapes, v2, False) == unet_base
    assert ck.vae_config(shapes) == vae_base
    assert ck.text_encoder_config(shapes, v2) == text_base
    assert text_base["num_hidden_layers"] == (23 if v2 else 12)


def test_a_tensor_of_an_unexpected_shape_is_a_one_line_error(tmp_path, no_network):
    from safetensors.torch import load_file

    path = write_checkpoint(tmp_path / "odd.safetensors")
    state = load_file(str(path))
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    state[key] = torch.zeros(32, 64, 1, 1, dtype=state[key].dtype)  # the block is 64 wide
    save_file(state, str(path))
    with pytest.raises(DatasetError, match="UNet weights do not fit .*size mismatch for mid_block") as info:
        load_sd_components(str(path))
    assert "\n" not in str(info.value)
