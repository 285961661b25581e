"""Block-wise LoRA, LoRA+, DoRA and the LyCORIS presets on tiny:sd15 / tiny:sdxl, held against sd-scripts'
networks/lora.py (block index, per-block ranks, prepare_optimizer_params) and LyCORIS' preset definitions,
whose rules are transcribed here; and the plan's module table against the modules the run creates."""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loracli.config.schema import NetworkSection
from loracli.family import SD1, SDXL
from loracli.network_layout import model_configs, planned_modules
from loracli.run.models import load_sd_components
from loracli.run.network import create_network, load_network_weights, prepare_param_groups, to_kohya_state_dict
from loracli.run.train import network_spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODELS = {"tiny:sd15": SD1, "tiny:sdxl": SDXL}


@pytest.fixture(scope="module")
def models():
    return {name: load_sd_components(name) for name in MODELS}


def _loras(network) -> list:
    return list(network.text_encoder_loras) + list(network.unet_loras)


@contextmanager
def built(sd, family, **network):
    """The run's network for a [network] section, taken off the models afterwards."""
    net = create_network(network_spec(SimpleNamespace(network=NetworkSection(**network))), sd.text_encoders,
                         sd.unet, family)
    try:
        yield net
    finally:
        for lora in _loras(net):
            lora.restore()


# --- sd-scripts, transcribed ------------------------------------------------------------------------------

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def sd_block_index(name: str, is_sdxl: bool) -> int:
    """networks/lora.py get_block_index."""
    if not is_sdxl:
        m = RE_UPDOWN.search(name)
        if m:
            g = m.groups()
            i, j = int(g[1]), int(g[3])
            idx = 3 * i + 2 if g[2] in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + idx if g[0] == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in name else -1
    name = name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def sd_lr_weight(down: list[float], mid: list[float], up: list[float], n: int, m: int, is_sdxl: bool,
                 threshold: float = 0.0) -> list[float]:
    """get_block_lr_weight for lists (shorter lists filled with 1; at or below the threshold: 0)."""
    down = [w if w > threshold else 0 for w in down + [1.0] * (n - len(down))]
    mid = [w if w > threshold else 0 for w in mid + [1.0] * (m - len(mid))]
    up = [w if w > threshold else 0 for w in up + [1.0] * (n - len(up))]
    weights = down + mid + up
    return [1.0] + weights + [1.0] if is_sdxl else weights


def is_3x3(lora) -> bool:
    down = lora.lora_down
    return isinstance(down, nn.Conv2d) and down.kernel_size != (1, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_block_dims_alphas_and_zero_weights_pick_modules_as_sd_scripts(models, name):
    sd, family = models[name], MODELS[name]
    is_sdxl = family is SDXL
    blocks = 23 if is_sdxl else 25
    dims = [1 + i % 5 for i in range(blocks)]
    alphas = [0.5 * (i % 3) for i in range(blocks)]  # 0: the module's own dim (sd-scripts)
    conv_dims = [(i % 2) * 3 for i in range(blocks)]  # 0 in every other block: no conv module there
    conv_alphas = [1.0 + i for i in range(blocks)]
    down = [1.0, 0.5, 0.0, 0.05]  # 0.05 is at/below the threshold: block gone
    with built(sd, family, network_dim=4, conv_dim=4) as reference:  # every target, sd-scripts' names
        targets = {lora.lora_name: is_3x3(lora) for lora in reference.unet_loras}
    with built(sd, family, network_dim=4, block_dims=dims, block_alphas=alphas, conv_block_dims=conv_dims,
               conv_block_alphas=conv_alphas, down_lr_weight=down, block_lr_zero_threshold=0.05) as net:
        got = {lora.lora_name: (lora.lora_dim, float(lora.alpha)) for lora in net.unet_loras}
    n, m = (9, 3) if is_sdxl else (12, 1)
    weights = sd_lr_weight(down, [], [], n, m, is_sdxl, 0.05)
    expected = {}
    for lora_name, conv in targets.items():
        i = sd_block_index(lora_name, is_sdxl)
        dim, alpha = (conv_dims[i], conv_alphas[i]) if conv else (dims[i], alphas[i])
        if weights[i] == 0:
            dim = 0
        if dim:
            expected[lora_name] = (dim, alpha or float(dim))
    assert got == expected
    assert len(set(got)) < len(targets)  # some blocks really lost their modules


@pytest.mark.parametrize("name", list(MODELS))
def test_block_lr_and_loraplus_groups_as_sd_scripts(models, name):
    sd, family = models[name], MODELS[name]
    is_sdxl = family is SDXL
    down, mid, up = [0.5, 2.0, 0.25], [3.0], [0.0, 0.75]
    unet_lr, te_lr, ratio, unet_ratio = 1e-3, 5e-4, 16.0, 4.0
    with built(sd, family, down_lr_weight=down, mid_lr_weight=mid, up_lr_weight=up,
               loraplus_lr_ratio=ratio, loraplus_unet_lr_ratio=unet_ratio) as net:
        groups = prepare_param_groups(net, te_lr, unet_lr, 1e-4)
        n, m = (9, 3) if is_sdxl else (12, 1)
        weights = sd_lr_weight(down, mid, up, n, m, is_sdxl)
        # prepare_optimizer_params: text encoder (lora, plus), then per block in first-seen order (lora, plus)
        expected = [("textencoder", te_lr), ("textencoder plus", te_lr * ratio)]
        order: list[int] = []
        for lora in net.unet_loras:
            index = sd_block_index(lora.lora_name, is_sdxl)
            if index not in order:
                order.append(index)
        for index in order:
            lr = unet_lr * weights[index]
            expected += [(f"unet_block{index}", lr), (f"unet_block{index} plus", lr * unet_ratio)]
        assert [g["name"] for g in groups] == [e[0] for e in expected]
        assert [g["lr"] for g in groups] == pytest.approx([e[1] for e in expected])
        ups = {id(lora.lora_up.weight) for lora in _loras(net)}
        for group in groups:
            assert all((id(p) in ups) == group["name"].endswith("plus") for p in group["params"])
        assert sum(len(g["params"]) for g in groups) == 2 * len(_loras(net))
    # a block weight of 0 (up_lr_weight[0] is block 13) leaves that block without modules, hence no group
    assert all(g["name"] != "unet_block13" for g in groups)


def test_loraplus_with_locon_multiplies_only_lora_up(models):
    sd = models["tiny:sd15"]
    with built(sd, SD1, algo="locon", network_module="lycoris.kohya", loraplus_lr_ratio=8,
               loraplus_text_encoder_lr_ratio=2) as net:
        groups = prepare_param_groups(net, None, 2e-4, 1e-4)
        assert [(g["name"], g["lr"]) for g in groups] == [
            ("textencoder", 1e-4), ("textencoder plus", 1e-4 * 2), ("unet", 2e-4), ("unet plus", 2e-4 * 8)]
        plus = {id(p) for g in groups if g["name"].endswith("plus") for p in g["params"]}
        named = {id(p): n for lora in _loras(net) for n, p in lora.named_parameters()}
        assert {named[i] for i in plus} == {"lora_up.weight"}


def _unet_out(sd):
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return sd.unet(latents, torch.tensor([500]), hidden).sample


def test_dora_decomposes_saves_dora_scale_and_loads_back(models, tmp_path):
    sd = models["tiny:sd15"]
    locon = dict(algo="locon", network_module="lycoris.kohya", network_dim=4, conv_dim=4)
    with built(sd, SD1, **locon, dora_wd=True) as dora:
        torch.manual_seed(1)
        with torch.no_grad():
            for lora in _loras(dora):
                lora.lora_up.weight.normal_(0, 0.2)
                lora.dora_scale.mul_(1.5)  # a magnitude other than the base weight's norms
        with_dora = _unet_out(sd)
        saved = to_kohya_state_dict(dora)
        trained = {k: v.clone() for k, v in dora.state_dict().items()}
    # one dora_scale per module, under the key name LyCORIS writes, beside the LoCon tensors
    modules = {k.rsplit(".", 2)[0] for k in saved if k.endswith("lora_down.weight")}
    assert {k.rsplit(".", 1)[0] for k in saved if k.endswith(".dora_scale")} == modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale" in saved
    # the same LoCon weights without the decomposition compute something else
    with built(sd, SD1, **locon) as plain:
        plain.load_state_dict({k: v for k, v in trained.items() if "dora_scale" not in k})
        assert not torch.allclose(_unet_out(sd), with_dora, atol=1e-4)
    # the file continues training (network_weights / resume): every tensor comes back, the output too
    path = tmp_path / "dora.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    with built(sd, SD1, **locon, dora_wd=True) as again:
        assert load_network_weights(again, path) == (len(again.unet_loras), len(again.text_encoder_loras))
        assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items())
        assert torch.allclose(_unet_out(sd), with_dora, atol=1e-5)


# --- LyCORIS' presets, transcribed -------------------------------------------------------------------------

# sd-scripts' UNets, transcribed. SD1/SD2 (library/original_unet.py) have diffusers' root layers: conv_in,
# conv_out, and `time_embedding`, a class TimestepEmbedding with linear_1/linear_2. SDXL
# (library/sdxl_original_unet.py) does not: conv_in is input_blocks.0.0 and conv_out out.2; the time embedding
# `time_embed` and the label (add) embedding `label_emb` are nn.Sequential(Linear, SiLU, Linear) (label_emb one
# level deeper: label_emb.0.0/0.2). Its paths and classes, where they differ from diffusers' root layers:
SDXL_ORIGINAL_PATHS = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding": "time_embed",
                       "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                       "add_embedding": "label_emb.0", "add_embedding.linear_1": "label_emb.0.0",
                       "add_embedding.linear_2": "label_emb.0.2"}
SDXL_ORIGINAL_CLASSES = {"time_embedding": "Sequential", "add_embedding": "Sequential"}


def lycoris_preset_names(preset: dict, root: nn.Module, prefix: str, unet: bool, sdxl: bool = False) -> set[str]:
    """LycorisNetworkKohya.create_modules with a preset: every Linear/Conv2d inside a target class, and every
    module whose path a target name matches (re.match); 3x3 convs only with enable_conv. Its traps for SD
    models, undone: attn-only names the CompVis/sd-scripts classes (diffusers: Attention), and full-lin selects
    the time embedding by class and by name (a set here: once). With `sdxl`, classes and names are matched as
    sd-scripts' SDXL UNet has them (above), the module named as in diffusers' UNet (loracli's run)."""
    classes = set(preset["unet_target_module" if unet else "text_encoder_target_module"])
    if classes & {"CrossAttention", "SelfAttention"}:
        classes |= {"Attention"}
    names = preset["unet_target_name" if unet else "text_encoder_target_name"]
    if sdxl and unet:
        # the blocks' paths differ there too (input_blocks.4.1...), but LyCORIS' SD names are root layers only
        assert set(names) <= set(SDXL_ORIGINAL_PATHS), names

    def wraps(module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        return isinstance(module, nn.Conv2d) and (module.kernel_size == (1, 1) or preset["enable_conv"])

    out = set()
    for path, module in root.named_modules():
        cls, match_path = type(module).__name__, path
        if sdxl and unet:
            cls, match_path = SDXL_ORIGINAL_CLASSES.get(path, cls), SDXL_ORIGINAL_PATHS.get(path, path)
        if cls in classes:
            out |= {f"{prefix}_{path}.{child}".replace(".", "_").rstrip("_")
                    for child, sub in module.named_modules() if wraps(sub)}
        elif any(re.match(t, match_path) for t in names) and wraps(module):
            out.add(f"{prefix}_{path}".replace(".", "_"))
    return out


@pytest.mark.parametrize("preset", ["full-lin", "attn-mlp", "attn-only", "unet-transformer-only",
                                    "unet-convblock-only"])
@pytest.mark.parametrize("name", list(MODELS))
def test_presets_pick_what_lycoris_presets_pick(models, name, preset):
    from lycoris.config import PRESET

    """What sd-scripts + LyCORIS trains: on SD1/SD2 LyCORIS' pick on the diffusers UNet (original_unet.py has the
    same classes and root names); on SDXL its pick on sdxl_original_unet.py, where the class TimestepEmbedding
    and the names time_embedding.linear_1/2, conv_in, conv_out match nothing: no time or add embedding, no
    conv_in/conv_out, although LyCORIS would pick them on diffusers' SDXL UNet."""
    sd, family = models[name], MODELS[name]
    definition = PRESET[preset]
    sdxl = family is SDXL
    unet = lycoris_preset_names(definition, sd.unet, "lora_unet", True, sdxl)
    expected = set(unet)
    prefixes = ["lora_te"] if len(sd.text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, te in zip(prefixes, sd.text_encoders):
        expected |= lycoris_preset_names(definition, te, prefix, False)
    with built(sd, family, algo="loha", network_module="lycoris.kohya", lycoris_preset=preset) as net:
        got = {lora.lora_name for lora in _loras(net)}
    assert got == expected and got
    on_diffusers = lycoris_preset_names(definition, sd.unet, "lora_unet", True)
    roots = {f"lora_unet_{p}".replace(".", "_") for p in SDXL_ORIGINAL_PATHS}
    if preset in ("full-lin", "attn-mlp", "unet-transformer-only"):  # TimestepEmbedding: the time embedding
        time = {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"}
        add = {"lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2"}
        assert time <= on_diffusers and (add <= on_diffusers) is sdxl  # what LyCORIS would pick on diffusers' UNet
        assert (time <= got) is not sdxl and not add & got  # what sd-scripts trains
    if preset == "unet-convblock-only":
        assert ({"lora_unet_conv_in", "lora_unet_conv_out"} <= got) is not sdxl
    if sdxl:
        assert not roots & got and unet == on_diffusers - roots
    else:
        assert unet == on_diffusers


# --- the plan's table against the run ------------------------------------------------------------------------

PLAN_CASES = [dict(), dict(conv_dim=4), dict(algo="locon", network_module="lycoris.kohya", conv_dim=2),
              dict(network_dim=8, block_dims=None, down_lr_weight="cosine", conv_dim=2),
              *(dict(algo="lokr", network_module="lycoris.kohya", lycoris_preset=p)
                for p in ("full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only"))]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_module_counts_are_the_modules_the_run_creates(models, name, case):
    sd, family = models[name], MODELS[name]
    options = dict(PLAN_CASES[case])
    if options.get("block_dims", 0) is None:  # a block_dims case: the family's own block count
        options["block_dims"] = [(i % 3) * 4 for i in range(23 if family is SDXL else 25)]
    planned = planned_modules(NetworkSection(**options), family, *model_configs(name, "tiny", family))
    with built(sd, family, **options) as net:
        names = getattr(net, "_loracli_names", {})
        got = {names.get(lora.lora_name, lora.lora_name): getattr(lora, "lora_dim", None) for lora in _loras(net)}
    assert {m.name for m in planned} == set(got)
    # the built model's folder (unet/config.json, text_encoder*/config.json) gives the same table
    from loracli.run.tiny_model import ensure_tiny_model

    folder = model_configs(str(ensure_tiny_model(name)), "diffusers", family)
    assert planned_modules(NetworkSection(**options), family, *folder) == planned
    if options.get("algo", "lora") == "lora":
        assert {m.name: m.rank for m in planned} == got


def test_sd_block_index_transcription_matches_a_hand_count():
    """The transcription itself, on names whose block is known by hand."""
    assert sd_block_index("lora_unet_down_blocks_1_attentions_1_proj_in", False) == 5
    assert sd_block_index("lora_unet_up_blocks_3_resnets_2_conv1", False) == 24
    assert sd_block_index("lora_unet_output_blocks_2_2_conv", True) == 15
    assert math.isclose(sd_lr_weight([2.0], [], [], 12, 1, False)[0], 2.0)
