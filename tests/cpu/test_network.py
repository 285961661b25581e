"""The network on tiny:sd15: targets, key names, zero init, loading back (ours, diffusers, lycoris)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loracli.errors import ConfigError
from loracli.run.models import load_sd_components
from loracli.run.network import (
    NetworkSpec,
    count_modules,
    create_network,
    load_network_weights,
    prepare_param_groups,
    to_kohya_state_dict,
)
from loracli.run.tiny_model import ensure_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SUFFIXES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
            "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2", "alpha"}}


def unet_out(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return sd.unet(latents, torch.tensor([500]), hidden).sample


def make(algo="lora", **kw):
    sd = load_sd_components("tiny:sd15")
    return sd, create_network(NetworkSpec(algo=algo, dim=4, alpha=2, **kw), sd.text_encoder, sd.unet)


@pytest.mark.parametrize("algo", ["lora", "locon", "loha", "lokr"])
def test_key_names_and_zero_init(algo):
    sd = load_sd_components("tiny:sd15")
    base = unet_out(sd)
    network = create_network(NetworkSpec(algo=algo, dim=4, alpha=2), sd.text_encoder, sd.unet)
    keys = to_kohya_state_dict(network)
    te = [k for k in keys if k.startswith("lora_te")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    assert any(k.startswith("lora_unet_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} <= SUFFIXES[algo] | {"lokr_w2_a", "lokr_w2_b", "lokr_w1_a", "lokr_w1_b"}
    assert torch.allclose(unet_out(sd), base, atol=1e-6)  # untrained network changes nothing


def test_lora_wraps_no_3x3_convs_and_locon_does():
    _, lora = make("lora")
    _, locon = make("locon", conv_dim=2, conv_alpha=1)
    lora_keys = to_kohya_state_dict(lora)
    locon_keys = to_kohya_state_dict(locon)
    assert not any("resnets" in k for k in lora_keys)
    assert any("resnets_0_conv1" in k for k in locon_keys)
    conv = locon_keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv.shape[0] == 2 and conv.shape[-1] == 3  # conv_dim, 3x3 kernel
    u_lora, t_lora = count_modules(lora)
    u_locon, t_locon = count_modules(locon)
    assert u_locon > u_lora and t_lora == t_locon == 12  # 2 layers x 6 (q, k, v, out, fc1, fc2)


def test_train_only_parts_saves_only_them():
    _, unet_only = make(train_text_encoder=False)
    assert not any(k.startswith("lora_te") for k in to_kohya_state_dict(unet_only))
    _, te_only = make(train_unet=False)
    assert not any(k.startswith("lora_unet") for k in to_kohya_state_dict(te_only))


def test_param_groups_text_encoder_first_and_zero_lr_dropped():
    _, network = make()
    groups = prepare_param_groups(network, None, 1e-4, 2e-6)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 2e-6), ("unet", 1e-4)]
    groups = prepare_param_groups(network, 0, 1e-4, 1.0)
    assert [g["name"] for g in groups] == ["unet"]
    with pytest.raises(ConfigError):
        prepare_param_groups(network, 0, 0, 1.0)


def _perturb(network):
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_save_and_load_round_trip_matches_text_encoder_modules(tmp_path):
    """Trap 3: a standard kohya file must load its text-encoder modules, not silently zero of them."""
    _, network = make("locon")
    _perturb(network)
    sd_file = tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in to_kohya_state_dict(network).items()}, str(sd_file))
    _, fresh = make("locon")
    unet, te = load_network_weights(fresh, sd_file)
    assert (unet, te) == count_modules(fresh)
    saved, loaded = to_kohya_state_dict(network), to_kohya_state_dict(fresh)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_loading_a_file_of_another_shape_fails_clearly(tmp_path):
    _, network = make("lora")
    path = tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in to_kohya_state_dict(network).items()}, str(path))
    sd = load_sd_components("tiny:sd15")
    other = create_network(NetworkSpec(algo="lora", dim=8, alpha=8), sd.text_encoder, sd.unet)
    with pytest.raises(ConfigError, match="other shapes"):
        load_network_weights(other, path)


@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_diffusers_load_lora_weights_changes_the_unet(tmp_path, algo):
    from diffusers import StableDiffusionPipeline

    _, network = make(algo)
    _perturb(network)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in to_kohya_state_dict(network).items()}, str(path))
    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny:sd15"), local_files_only=True,
                                                   safety_checker=None)
    before = unet_out(pipe)
    pipe.load_lora_weights(str(path))
    after = unet_out(pipe)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_loads_loha_and_lokr(tmp_path, algo):
    from lycoris.kohya import create_network_from_weights

    sd, network = make(algo)
    _perturb(network)
    expected = unet_out(sd)
    path = tmp_path / "net.safetensors"
    state = to_kohya_state_dict(network)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh = load_sd_components("tiny:sd15")
    base = unet_out(fresh)
    # lycoris' own loader reads the file (text-encoder keys in lycoris' naming for this transformers)
    weights = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in load_file(str(path)).items()}
    loaded, _ = create_network_from_weights(1.0, str(path), None, fresh.text_encoder, fresh.unet,
                                            weights_sd=weights)
    loaded.apply_to(fresh.text_encoder, fresh.unet, apply_text_encoder=True, apply_unet=True)
    loaded.load_state_dict(weights, strict=False)
    got = unet_out(fresh)
    assert not torch.allclose(got, base, atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_tiny_model_is_deterministic(tmp_path):
    a = ensure_tiny_model("tiny:sd15", tmp_path / "a")
    b = ensure_tiny_model("tiny:sd15", tmp_path / "b")
    wa = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
