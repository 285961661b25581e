"""Plain LoRA held against sd-scripts' networks/lora.py LoRAModule, whose equations are
transcribed here (the `kohya_*` helpers), on tiny layers and on tiny:sd15 / tiny:sdxl."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from loracli.errors import ConfigError
from loracli.family import SD1, SDXL
from loracli.run.kohya_lora import KohyaLoRAModule, KohyaLoRANetwork, create_kohya_lora
from loracli.run.network import NetworkSpec, create_network, kohya_names, remember_names, to_kohya_state_dict
from loracli.run.tiny_model import ensure_tiny_model
from loracli.sdscripts.lycoris_targets import targets_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- sd-scripts' equations, transcribed ---------------------------------------------------------

def kohya_branch(x, down, up, scale, multiplier=1.0, conv=None):
    """lora_up(lora_down(x)) * multiplier * scale (conv: down takes the base conv's kernel/stride/padding)."""
    if conv is None:
        return F.linear(F.linear(x, down), up) * multiplier * scale
    return F.conv2d(F.conv2d(x, down, stride=conv.stride, padding=conv.padding), up) * multiplier * scale


def kohya_train_forward(x, base, down, up, scale, dropout=None, rank_dropout=None, module_dropout=None):
    """LoRAModule.forward in training mode, drawing from torch's global RNG in the same order."""
    org = base(x)
    if module_dropout is not None and torch.rand(1) < module_dropout:
        return org
    lx = F.linear(x, down)
    if dropout is not None:
        lx = F.dropout(lx, p=dropout)
    if rank_dropout is not None:
        mask = torch.rand((lx.size(0), down.shape[0]), device=lx.device) > rank_dropout
        if lx.dim() == 3:
            mask = mask.unsqueeze(1)
        lx = lx * mask
        scale = scale * (1.0 / (1.0 - rank_dropout))
    return org + F.linear(lx, up) * scale


def kohya_max_norm(state_dict, max_norm):
    """LoRANetwork.apply_max_norm_regularization on a state dict (scales it in place)."""
    norms, scaled = [], 0
    for down_key in [k for k in state_dict if "lora_down" in k and "weight" in k]:
        up_key, alpha_key = down_key.replace("lora_down", "lora_up"), down_key.replace("lora_down.weight", "alpha")
        down, up, alpha = state_dict[down_key], state_dict[up_key], state_dict[alpha_key]
        scale = alpha / down.shape[0]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown = updown * scale
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = torch.clamp(norm, max=max_norm) / norm
        if ratio != 1:
            scaled += 1
            state_dict[up_key] *= ratio ** 0.5
            state_dict[down_key] *= ratio ** 0.5
        norms.append((updown.norm() * ratio).item())
    return scaled, sum(norms) / len(norms), max(norms)


# --- helpers -------------------------------------------------------------------------------------

def lora_on(layer, dim=4, alpha=2.0, seed=0, **kw):
    torch.manual_seed(seed)
    lora = KohyaLoRAModule("lora_test", layer, dim, alpha, **kw)
    with torch.no_grad():
        lora.lora_up.weight.normal_(0, 0.05)  # a trained-looking, non-zero up
    lora.apply_to()
    return lora


def linear(dtype, n_in=16, n_out=12, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype)


def autocast_for(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


# --- the branch against kohya's equations --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_branch_is_kohyas_equation_under_autocast(dtype):
    base = linear(dtype)
    lora = lora_on(base)
    assert lora.lora_down.weight.dtype == torch.float32  # the network stays in fp32
    x = torch.randn(3, 5, 16).to(dtype)
    with autocast_for(dtype), torch.no_grad():
        got = base(x)
        want = F.linear(x, base.weight, base.bias) + kohya_branch(x, lora.lora_down.weight, lora.lora_up.weight, 0.5)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    lora.multiplier = 0.7  # a sample/grid strength
    with autocast_for(dtype), torch.no_grad():
        got = base(x)
        want = F.linear(x, base.weight, base.bias) + kohya_branch(x, lora.lora_down.weight, lora.lora_up.weight, 0.5,
                                                                  multiplier=0.7)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_branch_is_kohyas_equation(dtype, kernel):
    torch.manual_seed(2)
    base = nn.Conv2d(8, 6, kernel, padding=kernel // 2).to(dtype)
    lora = lora_on(base, dim=3, alpha=1.0)
    assert lora.lora_down.weight.shape == (3, 8, kernel, kernel) and lora.lora_up.weight.shape == (6, 3, 1, 1)
    x = torch.randn(2, 8, 5, 5).to(dtype)
    with autocast_for(dtype), torch.no_grad():
        got = base(x)
        want = F.conv2d(x, base.weight, base.bias, padding=kernel // 2) + kohya_branch(
            x, lora.lora_down.weight, lora.lora_up.weight, 1 / 3, conv=base)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_base_without_autocast_runs_the_branch_in_fp32_and_keeps_the_dtype(dtype):
    """sd-scripts would stop on the dtype mismatch; loracli computes the branch in the LoRA's fp32."""
    base = linear(dtype)
    lora = lora_on(base)
    x = torch.randn(4, 16).to(dtype)
    with torch.no_grad():
        got = base(x)
        branch = kohya_branch(x.float(), lora.lora_down.weight, lora.lora_up.weight, 0.5)
        want = F.linear(x, base.weight, base.bias) + branch.to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_under_autocast_are_kohyas_and_land_in_fp32(dtype):
    base = linear(dtype).requires_grad_(False)
    lora = lora_on(base)
    down = lora.lora_down.weight.detach().clone().requires_grad_(True)
    up = lora.lora_up.weight.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, 16).to(dtype)
    with autocast_for(dtype):
        loss = base(x).float().square().mean()
        want = (F.linear(x, base.weight, base.bias) + kohya_branch(x, down, up, 0.5)).float().square().mean()
    loss.backward()
    want.backward()
    assert lora.lora_down.weight.grad.dtype == torch.float32 and lora.lora_up.weight.grad.abs().max() > 0
    assert torch.equal(lora.lora_down.weight.grad, down.grad) and torch.equal(lora.lora_up.weight.grad, up.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_an_update_below_the_weight_grid_still_shows_in_the_output(dtype):
    """Rebuilding W + ΔW in the base dtype loses an update smaller than W's rounding step; the branch keeps it."""
    base = nn.Linear(2, 1, bias=False).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, -1.0]]))  # W x = 0 for x = (1, 1)
    lora = KohyaLoRAModule("lora_tiny", base, dim=1, alpha=1.0)
    with torch.no_grad():
        lora.lora_down.weight.fill_(1.0)
        lora.lora_up.weight.fill_(1e-4)  # ΔW = 1e-4 everywhere: far below bf16/fp16's step at 1.0
    lora.apply_to()
    x = torch.ones(1, 2, dtype=dtype)
    delta = (lora.lora_up.weight @ lora.lora_down.weight).to(dtype)
    assert torch.equal(base.weight + delta, base.weight)  # on the weight grid the update vanishes ...
    with autocast_for(dtype), torch.no_grad():
        out = base(x)
    assert out.item() == pytest.approx(2e-4, rel=1e-2)  # ... in the branch it is there, at activation precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_output_is_within_activation_error_of_fp32(dtype):
    base32 = linear(torch.float32, 64, 64)
    lora32 = lora_on(base32, dim=8, alpha=4.0)
    base = linear(dtype, 64, 64)
    lora = lora_on(base, dim=8, alpha=4.0)
    lora.load_state_dict(lora32.state_dict())
    x = torch.randn(8, 64)
    with torch.no_grad():
        exact_delta = base32(x) - F.linear(x, base32.weight, base32.bias)
        with autocast_for(dtype):
            half_delta = base(x.to(dtype)).float() - F.linear(x.to(dtype), base.weight, base.bias).float()
    eps = torch.finfo(dtype).eps
    out_scale = base32(x).abs().max().item()
    # the error is bounded by the rounding of activations, not by that of the base weights times |x|
    assert (half_delta - exact_delta).abs().max().item() < 4 * eps * out_scale
    assert exact_delta.abs().max().item() > 0.01


# --- dropouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 16), (4, 7, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("options", [dict(dropout=0.3), dict(rank_dropout=0.4), dict(module_dropout=0.5),
                                     dict(dropout=0.2, rank_dropout=0.25, module_dropout=0.1)],
                         ids=["network_dropout", "rank_dropout", "module_dropout", "all"])
def test_training_forward_is_kohyas_with_its_dropouts(shape, options):
    base = linear(torch.float32)
    lora = lora_on(base, dim=6, alpha=3.0, **options)
    lora.train()
    x = torch.randn(*shape)
    for seed in range(6):
        torch.manual_seed(seed)
        got = base(x)
        torch.manual_seed(seed)
        want = kohya_train_forward(x, lambda t: F.linear(t, base.weight, base.bias), lora.lora_down.weight,
                                   lora.lora_up.weight, 0.5, **options)
        assert torch.allclose(got, want, atol=1e-6)
    lora.eval()  # no dropout outside training
    assert torch.allclose(base(x), F.linear(x, base.weight, base.bias)
                          + kohya_branch(x, lora.lora_down.weight, lora.lora_up.weight, 0.5), atol=1e-6)


def test_dropouts_change_the_output_and_keep_its_size():
    x = torch.randn(64, 16)
    for option in ("dropout", "rank_dropout"):
        base = linear(torch.float32)
        lora = lora_on(base, **{option: 0.5})
        with torch.no_grad():
            lora.eval()
            full = base(x) - F.linear(x, base.weight, base.bias)
            lora.train()
            torch.manual_seed(0)
            dropped = base(x) - F.linear(x, base.weight, base.bias)
        assert not torch.allclose(dropped, full, atol=1e-4), option
        # both rescale by 1/(1-p): on average the branch keeps its size
        assert dropped.abs().mean().item() == pytest.approx(full.abs().mean().item(), rel=0.35), option


def test_rank_dropout_masks_whole_ranks_per_sample_on_convs():
    torch.manual_seed(3)
    base = nn.Conv2d(4, 4, 3, padding=1)
    lora = lora_on(base, dim=8, alpha=8.0, rank_dropout=0.5).train()
    seen = {}
    lora.lora_up.register_forward_pre_hook(lambda _m, inputs: seen.update(lx=inputs[0].detach()))
    torch.manual_seed(5)
    base(torch.randn(3, 4, 6, 6))
    zero = (seen["lx"] == 0).all(dim=(2, 3))  # a dropped rank is zero over every pixel of its sample
    partly = (seen["lx"] == 0).any(dim=(2, 3))
    assert torch.equal(zero, partly) and 0 < zero.sum() < zero.numel()


def test_module_dropout_skips_the_whole_branch():
    base = linear(torch.float32)
    lora = lora_on(base, module_dropout=0.5).train()
    x = torch.randn(2, 16)
    plain = F.linear(x, base.weight, base.bias)
    with torch.no_grad():
        outs = [base(x) for _ in range(40)]
    skipped = sum(torch.equal(o, plain) for o in outs)
    assert 5 < skipped < 35  # about half the calls run the base layer alone
    assert all(torch.equal(o, plain) or not torch.allclose(o, plain, atol=1e-5) for o in outs)


# --- scale_weight_norms ----------------------------------------------------------------------------

def small_network(conv_dim=None):
    torch.manual_seed(4)
    layers = [nn.Linear(16, 16), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(16, 8)]
    loras = [KohyaLoRAModule(f"lora_unet_l{i}", layer, 4, 2.0) for i, layer in enumerate(layers)]
    for i, lora in enumerate(loras):
        with torch.no_grad():
            lora.lora_up.weight.normal_(0, [1.0, 0.001, 2.0, 0.5][i])
    return KohyaLoRANetwork([], loras)


def test_scale_weight_norms_rescales_up_and_down_as_kohya():
    network = small_network()
    expected_state = {k: v.clone() for k, v in network.state_dict().items()}
    expected = kohya_max_norm(expected_state, 1.0)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    got = network.apply_max_norm_regularization(1.0, "cpu")
    assert got[0] == expected[0] and 0 < got[0] < len(network.unet_loras)  # some modules scaled, not all
    assert got[1:] == pytest.approx(expected[1:], rel=1e-5)
    after = network.state_dict()
    for key in after:
        assert torch.allclose(after[key], expected_state[key], rtol=1e-5, atol=1e-7), key
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith("lora_up.weight") or k.endswith("lora_down.weight") for k in changed)
    for lora in network.unet_loras:  # the parameters themselves now give norms within the limit
        assert lora.delta_weight().norm().item() <= 1.0 + 1e-5
    assert got[2] == pytest.approx(max(lora.delta_weight().norm().item() for lora in network.unet_loras), rel=1e-5)


# --- tiny:sd15 and tiny:sdxl ---------------------------------------------------------------------

def tiny_sd15():
    from loracli.run.models import load_sd_components

    return load_sd_components("tiny:sd15")


def unet_out(unet, seed=0, context=32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, context, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), hidden).sample


def perturb(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def lycoris_plain_lora_keys(text_encoder, unet) -> list[str]:
    from lycoris.config import PRESET
    from lycoris.kohya import create_network as lycoris_create

    PRESET["loracli"] = targets_for("lora")
    network = lycoris_create(1.0, 4, 2.0, None, text_encoder, unet, algo="lora", preset="loracli",
                             warn_on_unmatched=False)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    remember_names(network, kohya_names([text_encoder], unet, SD1))
    return list(to_kohya_state_dict(network))


def test_tiny_sd15_targets_and_names_are_kohyas():
    sd = tiny_sd15()
    base = unet_out(sd.unet)
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2), [sd.text_encoder], sd.unet, SD1)
    # 4 transformers x 12 layers (proj_in/out, attn1/attn2 q k v out, ff in/out); 2 encoder layers x 6
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (48, 12)
    keys = network.state_dict()
    assert len(keys) == 3 * 60
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in keys
    assert keys["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert keys["lora_unet_mid_block_attentions_0_proj_out.alpha"].item() == 2.0
    assert torch.equal(unet_out(sd.unet), base)  # zero up: the untrained network changes nothing
    # the same modules LyCORIS picks with loracli's table of kohya's targets (an independent reading)
    other = tiny_sd15()
    assert set(lycoris_plain_lora_keys(other.text_encoder, other.unet)) == set(keys)


def test_conv_dim_adds_kohyas_c3lier_targets_with_conv_alpha_default_1():
    sd = tiny_sd15()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=0, conv_dim=2), [sd.text_encoder], sd.unet,
                                SD1)
    keys = network.state_dict()
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert keys["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0  # sd-scripts' conv_alpha
    assert keys["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"].item() == 4.0  # alpha 0 → dim
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight" in keys
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight" in keys
    other = tiny_sd15()
    locon = create_network(NetworkSpec(algo="locon", dim=4, alpha=4, conv_dim=2, conv_alpha=1), other.text_encoder,
                           other.unet)
    assert set(to_kohya_state_dict(locon)) == set(keys)


def test_parts_that_do_not_train_get_no_modules():
    sd = tiny_sd15()
    unet_only = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, train_text_encoder=False),
                                  [sd.text_encoder], sd.unet, SD1)
    assert unet_only.text_encoder_loras == [] and unet_only.text_encoder_loras_by_index == [[]]
    assert not any(k.startswith("lora_te") for k in unet_only.state_dict())
    unet_only.restore()
    te_only = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, train_unet=False), [sd.text_encoder],
                                sd.unet, SD1)
    assert te_only.unet_loras == [] and not any(k.startswith("lora_unet") for k in te_only.state_dict())


@pytest.mark.parametrize("key,option", [("use_tucker", dict(use_tucker=True)), ("use_scalar", dict(use_scalar=True)),
                                        ("train_norm", dict(extra_args={"train_norm": True}))])
def test_lycoris_only_switches_are_refused_not_ignored(key, option):
    sd = tiny_sd15()
    with pytest.raises(ConfigError, match=f"network.{key}: .*LyCORIS"):
        create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, **option), [sd.text_encoder], sd.unet, SD1)
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, extra_args={"train_norm": False}),
                                [sd.text_encoder], sd.unet, SD1)  # switches left off are fine
    assert network.unet_loras


def test_multiplier_and_restore():
    sd = tiny_sd15()
    base = unet_out(sd.unet)
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2), [sd.text_encoder], sd.unet, SD1)
    perturb(network)
    trained = unet_out(sd.unet)
    assert not torch.allclose(trained, base, atol=1e-4)
    network.set_multiplier(0.0)
    assert torch.allclose(unet_out(sd.unet), base, atol=1e-6)
    network.set_multiplier(1.0)
    network.restore()
    assert torch.equal(unet_out(sd.unet), base)
    network.apply_to()
    assert torch.allclose(unet_out(sd.unet), trained, atol=1e-6)


def test_load_weights_round_trip_shapes_and_alpha():
    sd = tiny_sd15()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2), [sd.text_encoder], sd.unet, SD1)
    perturb(network)
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    trained = unet_out(sd.unet)
    network.restore()
    fresh_sd = tiny_sd15()
    fresh = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=4), [fresh_sd.text_encoder], fresh_sd.unet, SD1)
    assert fresh.load_weights(saved) == (48, 12)
    assert torch.allclose(unet_out(fresh_sd.unet), trained, atol=1e-6)  # the file's alpha sets the scale
    fresh.restore()
    other_sd = tiny_sd15()
    other = create_kohya_lora(NetworkSpec(algo="lora", dim=8, alpha=8), [other_sd.text_encoder], other_sd.unet, SD1)
    with pytest.raises(ConfigError, match="other shapes"):
        other.load_weights(saved)
    with pytest.raises(ConfigError, match="none of the file's UNet modules"):
        other.load_weights({"lora_unet_nowhere.alpha": torch.tensor(1.0)})


def text_out(text_encoder):
    ids = torch.arange(1, 12).unsqueeze(0)
    with torch.no_grad():
        return text_encoder(ids, output_hidden_states=True).hidden_states[-2]


def test_a_saved_file_loads_in_diffusers_and_computes_the_same(tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = tiny_sd15()
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=2),
                                [sd.text_encoder], sd.unet, SD1)
    perturb(network)
    ours, ours_text = unet_out(sd.unet), text_out(sd.text_encoder)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny:sd15"), local_files_only=True,
                                                   safety_checker=None)
    before = unet_out(pipe.unet)
    pipe.load_lora_weights(str(path))
    after = unet_out(pipe.unet)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, ours, atol=1e-5)  # same modules, same scale, same output
    assert torch.allclose(text_out(pipe.text_encoder), ours_text, atol=1e-5)


def sdxl_unet_out(unet):
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample


def test_tiny_sdxl_names_are_sai_and_load_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = ensure_tiny_model("tiny:sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=2, conv_dim=2), [te1, te2], unet, SDXL)
    # transformer depths (1, 1, 2): 17 transformer blocks x 10 layers + 11 models x proj_in/out; 2 and 3 layers x 6
    assert [len(loras) for loras in network.text_encoder_loras_by_index] == [12, 18]
    transformer_loras = [lora for lora in network.unet_loras if "_transformer_blocks_" in lora.lora_name
                         or lora.lora_name.endswith(("_proj_in", "_proj_out"))]
    assert len(transformer_loras) == 192
    keys = network.state_dict()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.alpha" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys
    assert "lora_unet_input_blocks_3_0_op.lora_up.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.alpha" in keys and "lora_unet_output_blocks_5_2_conv.alpha" in keys
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.alpha" in keys
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for k in keys)
    # diffusers maps the SAI names back onto its own modules and computes what we compute
    base = sdxl_unet_out(unet)
    perturb(network)
    ours, ours_te2 = sdxl_unet_out(unet), text_out(te2)
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    network.restore()
    fresh = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    fresh.load_lora_weights(str(path))
    got = sdxl_unet_out(fresh.unet)
    assert not torch.allclose(got, base, atol=1e-4)
    assert torch.allclose(got, ours, atol=1e-5)
    assert torch.allclose(text_out(fresh.text_encoder_2), ours_te2, atol=1e-5)


# --- dropouts change training ----------------------------------------------------------------------

def short_training(sd, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    network = create_kohya_lora(NetworkSpec(algo="lora", dim=4, alpha=4, train_text_encoder=False, **options),
                                [sd.text_encoder], sd.unet, SD1)
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    latents, hidden, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), \
        torch.randn(1, 4, 8, 8, generator=g)
    for _ in range(2):  # two steps: the first moves only `up` (it starts at zero), the second `down` too
        loss = F.mse_loss(sd.unet(latents, torch.tensor([300]), hidden).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    network.restore()  # the base model is frozen: the next run starts from the same one
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def test_network_dropout_and_rank_dropout_change_training():
    sd = tiny_sd15()
    plain, again = short_training(sd), short_training(sd)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the runs are deterministic ...
    for options in (dict(dropout=0.3), dict(rank_dropout=0.3)):
        trained = short_training(sd, **options)
        differing = [k for k in plain if not torch.allclose(plain[k], trained[k])]
        assert len(differing) > len(plain) // 3, options  # ... so the option is what changed the weights
