"""resize / merge-into-one-LoRA / LyCORIS deltas on synthetic kohya-format files (no base model).

Expected values come from SVDs and products computed here, independently of the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracli.errors import ConfigError, DatasetError
from loracli.lora_tools.loras import module_delta, open_lora
from loracli.lora_tools.merge import merge_loras
from loracli.lora_tools.resize import ResizeRequest, resize_file
from loracli.run.saving import sshs_hashes

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small SVDs: on a busy 2-core CI machine, LAPACK's threads cost 10-100x more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# kohya module name -> (out, in[, k, k]) of the base weight: SD1-style names, two Linears and a 3x3 conv
SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (96, 80),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (64, 48, 1, 1),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (72, 56),
    "lora_unet_down_blocks_0_resnets_0_conv1": (40, 24, 3, 3),
}


def write_lora(path, rank=32, alpha=16.0, conv_rank=8, conv_alpha=4.0, seed=0, metadata=None, dtype=torch.float32):
    """A kohya LoRA/LoCon file with random (full-rank) factors: what sd-scripts/kohya_ss write."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        conv3 = len(shape) == 4 and shape[2] > 1
        r, a = (conv_rank, conv_alpha) if conv3 else (rank, alpha)
        kernel = shape[2:] if len(shape) == 4 else ()
        # decaying singular spectrum, so truncation keeps a measurable share
        decay = torch.linspace(1, 0.1, r).view(r, *[1] * (1 + len(kernel)))
        down = torch.randn(r, shape[1], *kernel, generator=g) * decay
        up = torch.randn(shape[0], r, *([1, 1] if kernel else []), generator=g) * 0.1
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(a)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_training_comment": "trained",
            "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}),
            **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)
    return path


def effective_delta(tensors, name):
    """scale·up·down of one module, flattened to (out, in·k·k), from a loaded state dict."""
    down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


def test_resize_to_dim_8_keeps_the_best_rank_8_share_and_the_strength(tmp_path):
    source = write_lora(tmp_path / "d32.safetensors")
    report = resize_file(source, tmp_path / "d8.safetensors", ResizeRequest(dim=8))
    before, after = load_file(str(source)), load_file(str(tmp_path / "d8.safetensors"))
    fro_by_name = {m.name: m.fro_retained for m in report.modules}
    for name in SHAPES:
        original = effective_delta(before, name)
        s = torch.linalg.svdvals(original.double())
        rank = 8  # conv_dim defaults to --dim (sd-scripts); the rank-8 conv module stays whole
        assert after[f"{name}.lora_down.weight"].shape[0] == rank
        best_share = math.sqrt(float((s[:rank] ** 2).sum() / (s ** 2).sum()))
        resized = effective_delta(after, name).double()
        kept_share = float(torch.linalg.matrix_norm(resized) / torch.linalg.matrix_norm(original.double()))
        # Eckart-Young: the rank-8 truncation keeps exactly the best share, and the error is the rest
        assert kept_share >= best_share - 1e-5
        assert fro_by_name[name] == pytest.approx(best_share, abs=1e-5)
        error = float(torch.linalg.matrix_norm(original.double() - resized))
        assert error == pytest.approx(float(torch.sqrt((s[rank:] ** 2).sum())), rel=1e-3, abs=1e-5 * float(s[0]))
        # strength kept: alpha/rank of the new file equals the old scale (16/32)
        assert float(after[f"{name}.alpha"]) / rank == pytest.approx(
            float(before[f"{name}.alpha"]) / before[f"{name}.lora_down.weight"].shape[0])


def test_resize_metadata_follows_sd_scripts(tmp_path):
    source = write_lora(tmp_path / "d32.safetensors", conv_rank=32, conv_alpha=16.0)
    out = tmp_path / "d8.safetensors"
    resize_file(source, out, ResizeRequest(dim=8, conv_dim=4, save_precision="fp16"))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(out))
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_training_comment"] == "dimension is resized from 32 to 8 (conv: 4); trained"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    with safe_open(str(source), "pt") as f:
        assert f.metadata().get("sshs_model_hash") != meta["sshs_model_hash"]

    dynamic = tmp_path / "dyn.safetensors"
    resize_file(source, dynamic, ResizeRequest(method="sv_fro", param=0.9))
    with safe_open(str(dynamic), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 32; trained"


def _expected_dynamic_rank(s: torch.Tensor, method: str, param: float, cap: int) -> int:
    """sd-scripts' choice, written out: the smallest rank reaching the target, plus one (its off-by-one)."""
    s = s.double()
    if method == "sv_ratio":
        k = int((s > s[0] / param).sum())
    else:
        values = s ** 2 if method == "sv_fro" else s
        goal = param ** 2 if method == "sv_fro" else param
        shares = torch.cumsum(values, 0) / values.sum()
        k = int((shares < goal).sum()) + 1
    return max(1, min(k + 1, cap))


@pytest.mark.parametrize("method,param", [("sv_fro", 0.8), ("sv_cumulative", 0.6), ("sv_ratio", 4.0)])
def test_dynamic_methods_pick_sd_scripts_ranks(tmp_path, method, param):
    source = write_lora(tmp_path / "d32.safetensors")
    report = resize_file(source, tmp_path / "out.safetensors", ResizeRequest(method=method, param=param))
    before = load_file(str(source))
    chosen = {m.name: m.new_rank for m in report.modules}
    for name in SHAPES:
        s = torch.linalg.svdvals(effective_delta(before, name).double())
        cap = before[f"{name}.lora_down.weight"].shape[0]
        assert chosen[name] == _expected_dynamic_rank(s, method, param, cap), name
    assert len(set(chosen.values())) > 1  # per module, not one rank for all
    if method == "sv_fro":
        assert all(m.fro_retained >= param for m in report.modules)


def test_resize_refusals_write_nothing(tmp_path):
    source = write_lora(tmp_path / "d32.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConfigError, match="above the file's largest rank"):
        resize_file(source, out, ResizeRequest(dim=64))
    with pytest.raises(ConfigError, match="needs --param"):
        resize_file(source, out, ResizeRequest(method="sv_fro"))
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists"):
        resize_file(source, out, ResizeRequest(dim=8))
    assert out.read_bytes() == b"keep me"
    out.unlink()
    not_lora = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(not_lora))
    with pytest.raises(DatasetError, match="not a kohya-format LoRA"):
        resize_file(not_lora, out, ResizeRequest(dim=8))
    loha = tmp_path / "loha.safetensors"
    save_file({f"lora_unet_x.{p}": torch.ones(2, 8) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
              | {"lora_unet_x.alpha": torch.tensor(2.0)}, str(loha))
    with pytest.raises(ConfigError, match="LoHa modules cannot be resized"):
        resize_file(loha, out, ResizeRequest(dim=1))
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_merged_lora_concatenated_reproduces_the_weighted_sum(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", rank=8, alpha=4.0, conv_rank=4, conv_alpha=1.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", rank=16, alpha=16.0, conv_rank=8, conv_alpha=8.0, seed=2)
    out = tmp_path / "ab.safetensors"
    merge_loras([a, b], [0.7, -0.5], out)
    ta, tb, merged = load_file(str(a)), load_file(str(b)), load_file(str(out))
    for name in SHAPES:
        expected = 0.7 * effective_delta(ta, name) - 0.5 * effective_delta(tb, name)
        torch.testing.assert_close(effective_delta(merged, name), expected, atol=1e-5, rtol=1e-4)
        assert merged[f"{name}.lora_down.weight"].shape[0] == ta[f"{name}.lora_down.weight"].shape[0] + \
            tb[f"{name}.lora_down.weight"].shape[0]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "24" and meta["ss_network_module"] == "networks.lora"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(merged, meta)


def test_svd_merge_is_the_truncated_sum(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", rank=8, alpha=4.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", rank=8, alpha=8.0, seed=2)
    out = tmp_path / "ab6.safetensors"
    merge_loras([a, b], [1.0, 0.5], out, dim=6, conv_dim=3, clamp_quantile=1.0)
    ta, tb, merged = load_file(str(a)), load_file(str(b)), load_file(str(out))
    for name in SHAPES:
        total = (effective_delta(ta, name) + 0.5 * effective_delta(tb, name)).double()
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        rank = 3 if name.endswith("conv1") else 6
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert merged[f"{name}.lora_down.weight"].shape[0] == rank
        torch.testing.assert_close(effective_delta(merged, name).double(), best, atol=1e-4, rtol=1e-4)


def _lycoris_module(algo: str, layer: torch.nn.Module, seed: int, name: str):
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.loha import LohaModule

    torch.manual_seed(seed)
    if algo == "locon-tucker":
        from lycoris.modules.locon import LoConModule

        module = LoConModule(name, layer, 1.0, lora_dim=4, alpha=2.0, use_tucker=True)
    elif algo == "loha":
        module = LohaModule(name, layer, 1.0, lora_dim=4, alpha=2.0)
    else:  # factor 2 makes w2 low-rank, so alpha/rank matters
        module = LokrModule(name, layer, 1.0, lora_dim=4, alpha=1.0, factor=2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("algo,layer", [("loha", "linear"), ("loha", "conv"), ("lokr", "linear"), ("lokr", "conv"),
                                        ("locon-tucker", "conv")])
def test_lycoris_delta_is_what_lycoris_applies_once(tmp_path, algo, layer):
    """ΔW from lycoris' functional builders equals the update its own forward adds (alpha ≠ dim), and
    not merge_to's doubly scaled one (stack notes)."""
    base = torch.nn.Linear(32, 48) if layer == "linear" else torch.nn.Conv2d(16, 32, 3, padding=1)
    name = "lora_unet_down_blocks_0_resnets_0_" + ("time_emb_proj" if layer == "linear" else "conv1")
    module = _lycoris_module(algo, base, 3, name)
    path = tmp_path / f"{algo}.safetensors"
    save_file({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    lora = open_lora(path)
    delta = module_delta(lora, lora.modules[name])
    assert delta.shape == base.weight.shape
    x = torch.randn(2, 32) if layer == "linear" else torch.randn(1, 16, 6, 6)
    module.apply_to()
    with torch.no_grad():
        applied = base(x) - module.org_forward(x)
        mine = torch.nn.functional.linear(x, delta) if layer == "linear" else \
            torch.nn.functional.conv2d(x, delta, padding=1)
        doubled = module.get_diff_weight(1.0, module.shape)[0]
    torch.testing.assert_close(mine, applied, atol=1e-5, rtol=1e-4)
    if algo != "locon-tucker":  # LoRA modules scale once in get_diff_weight; LoHa/LoKr twice
        assert module.scale != 1 and not torch.allclose(doubled.reshape(delta.shape), delta)
