"""resize / merge / extract against real (tiny) models: SD1 single files in the original layout,
tiny:sd15 and tiny:sdxl diffusers folders, and diffusers' own LoRA loader as the reference.

LoRA files are written here from the models' module names, the way sd-scripts names them
(independently of the code under test).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loracli.cli.app import app
from loracli.keymap import diffusers_to_sai
from loracli.lora_tools.extract import extract
from loracli.lora_tools.merge import merge_into_checkpoint
from loracli.lora_tools.resize import ResizeRequest, resize_file
from loracli.run.checkpoint import load_single_file
from loracli.run.tiny_model import ensure_tiny_model
from tests.smoke.ldm_checkpoint import build_tiny_modules, write_checkpoint

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small SVDs: on a busy 2-core CI machine, LAPACK's threads cost 10-100x more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


UNET_BLOCKS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_modules(unet, text_encoders, prefixes, sai: bool, conv: bool):
    """{kohya name: layer} for what sd-scripts' networks.lora targets (LoCon: with conv blocks)."""
    layers = unet.config.layers_per_block
    up_attention = frozenset(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    found = {}
    blocks = UNET_BLOCKS + (CONV_BLOCKS if conv else ())
    for path, block in unet.named_modules():
        if type(block).__name__ in blocks:
            for child, layer in block.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    full = f"{path}.{child}"
                    name = diffusers_to_sai(full, layers, up_attention) if sai else full
                    found["lora_unet_" + name.replace(".", "_")] = layer
    for prefix, encoder in zip(prefixes, text_encoders):
        for path, block in encoder.named_modules():
            if type(block).__name__ in TEXT_BLOCKS:
                for child, layer in block.named_modules():
                    if isinstance(layer, torch.nn.Linear):
                        full = f"{path}.{child}" if path.startswith("text_model.") else f"text_model.{path}.{child}"
                        found[f"{prefix}_" + full.replace(".", "_")] = layer
    return found


def write_kohya_lora(path, modules, rank, alpha, conv_rank=None, seed=0, magnitude=0.05, metadata=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in modules.items():
        conv3 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        r = conv_rank if conv3 else rank
        if r is None:
            continue
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=g)
            up = torch.randn(layer.out_channels, r, 1, 1, generator=g)
        else:
            down = torch.randn(r, layer.in_features, generator=g)
            up = torch.randn(layer.out_features, r, generator=g)
        # a decaying spectrum, as trained LoRAs have
        down = down * torch.logspace(0, -1.5, r).view(r, *[1] * (down.dim() - 1))
        tensors[f"{name}.lora_down.weight"] = down * magnitude / math.sqrt(down[0].numel())
        tensors[f"{name}.lora_up.weight"] = up * magnitude
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path


def effective(tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * product


def sd1_pipeline(model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def unet_output(unet, context: int = 32, seed: int = 0, **extra):
    g = torch.Generator().manual_seed(seed)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, context, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), hidden, **extra).sample.float()


def text_output(text_encoder):
    vocab = min(1000, text_encoder.config.vocab_size)
    ids = torch.randint(0, vocab, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return text_encoder(ids)[0].float()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 checkpoint in the original layout (fp16, like downloads) and a LoCon for it."""
    folder = tmp_path_factory.mktemp("sd1")
    unet, vae, text = build_tiny_modules(False)
    base = write_checkpoint(folder / "base.safetensors", half=True, modules=(unet, vae, text))
    base32 = write_checkpoint(folder / "base32.safetensors", half=False, modules=(unet, vae, text))
    modules = kohya_modules(unet, [text], ["lora_te"], sai=False, conv=True)
    locon = write_kohya_lora(folder / "locon.safetensors", modules, rank=4, alpha=2, conv_rank=4, seed=1,
                             magnitude=0.3)
    return {"folder": folder, "base": base, "base32": base32, "locon": locon, "modules": modules}


def test_merged_checkpoint_matches_the_lora_applied_by_diffusers(sd1):
    out = sd1["folder"] / "merged.safetensors"
    result = CliRunner().invoke(app, ["merge", str(sd1["locon"]), "--model", str(sd1["base"]), "--ratio", "0.7",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as merged, safe_open(str(sd1["base"]), "pt") as base:
        assert list(merged.keys()) == list(base.keys())  # same layout, every tensor kept
        assert {merged.get_slice(k).get_dtype() for k in merged.keys()} == {"F16"}
    merged_model = load_single_file(out)
    reference = sd1_pipeline(load_single_file(sd1["base"]))
    base_unet = unet_output(reference.unet)
    reference.load_lora_weights(str(sd1["locon"]), adapter_name="locon")
    reference.set_adapters(["locon"], adapter_weights=[0.7])
    expected = unet_output(reference.unet)
    got = unet_output(merged_model.unet)
    effect = (expected - base_unet).abs().max()
    assert effect > 0.05  # the LoRA does change the output
    assert (got - expected).abs().max() < 0.01 * effect + 2e-3  # fp16 storage of the merged weights
    te_effect = (text_output(reference.text_encoder) - text_output(load_single_file(sd1["base"]).text_encoder))
    te_error = text_output(merged_model.text_encoder) - text_output(reference.text_encoder)
    assert te_error.abs().max() < 0.01 * te_effect.abs().max() + 2e-3


def test_sd2_merge_updates_the_fused_open_clip_weights(tmp_path):
    """SD2: OpenCLIP text encoder (q/k/v fused in in_proj, one layer more in the file than in the model)."""
    unet, vae, text = build_tiny_modules(True)
    base = write_checkpoint(tmp_path / "sd2.safetensors", v2=True, half=False, modules=(unet, vae, text))
    reference = sd1_pipeline(load_single_file(base, v2=True))
    modules = kohya_modules(reference.unet, [reference.text_encoder], ["lora_te"], sai=False, conv=False)
    lora = write_kohya_lora(tmp_path / "sd2-lora.safetensors", modules, rank=4, alpha=2, seed=6, magnitude=0.3)
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [lora], [-0.6], out)
    merged = load_single_file(out, v2=True)
    reference.load_lora_weights(str(lora), adapter_name="sd2")
    reference.set_adapters(["sd2"], adapter_weights=[-0.6])
    assert (unet_output(merged.unet, 64) - unet_output(reference.unet, 64)).abs().max() < 1e-4
    te_before = text_output(load_single_file(base, v2=True).text_encoder)
    te_expected = text_output(reference.text_encoder)
    assert (te_expected - te_before).abs().max() > 0.05
    assert (text_output(merged.text_encoder) - te_expected).abs().max() < 1e-4


def test_resize_against_the_base_model_fro_ckpt(sd1, tmp_path):
    """--base/--method fro_ckpt: keep the singular values of scale·up·down above 10^P × ||W_base||_F."""
    known = load_file(str(sd1["locon"]))
    names = [k[: -len(".alpha")] for k in known if k.endswith(".alpha")]
    scores = {n: torch.log10(torch.linalg.svdvals(effective(known, n)) /
                             float(torch.linalg.vector_norm(sd1["modules"][n].weight.double()))) for n in names}
    threshold = float(torch.tensor([float(v.max()) for v in scores.values()]).median())  # drops about half
    out = tmp_path / "fro.safetensors"
    request = ResizeRequest(method="fro_ckpt", param=threshold, base=sd1["base32"])
    report = resize_file(sd1["locon"], out, request)
    got = load_file(str(out))
    chosen = {m.name: m.new_rank for m in report.modules}
    for name in names:
        expected = min(int((scores[name] > threshold).sum()), known[f"{name}.lora_down.weight"].shape[0])
        assert chosen[name] == expected, name
        if expected:
            assert got[f"{name}.lora_down.weight"].shape[0] == expected
        else:
            assert f"{name}.lora_down.weight" not in got  # dropped
    assert 0 < sum(1 for r in chosen.values() if r == 0) < len(names)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_lycoris_files_bake_in_at_their_ratio(sd1, tmp_path):
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.loha import LohaModule

    torch.manual_seed(5)
    picks = {"loha": "lora_unet_down_blocks_0_resnets_0_conv1",
             "lokr": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"}
    expected_delta = {}
    files = []
    for algo, name in picks.items():
        layer = sd1["modules"][name]
        module = LohaModule(name, layer, 1.0, lora_dim=4, alpha=2.0) if algo == "loha" else \
            LokrModule(name, layer, 1.0, lora_dim=4, alpha=1.0, factor=2)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        # what lycoris' own forward adds at multiplier 1 (scaled once)
        expected_delta[name] = module.get_weight(module.shape).detach().reshape(layer.weight.shape)
        path = tmp_path / f"{algo}.safetensors"
        save_file({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
        files.append(path)
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(sd1["base32"], files, [0.5, -1.5], out)
    base, merged = load_file(str(sd1["base32"])), load_file(str(out))
    keys = {"loha": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            "lokr": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"}
    for (algo, name), ratio in zip(picks.items(), (0.5, -1.5)):
        torch.testing.assert_close(merged[keys[algo]] - base[keys[algo]], ratio * expected_delta[name],
                                   atol=1e-5, rtol=1e-4)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert sorted(changed) == sorted(keys.values())


def test_extract_recovers_a_known_lora(sd1, tmp_path):
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(sd1["base32"], [sd1["locon"]], [1.0], tuned)
    out = tmp_path / "extracted.safetensors"
    report = extract(sd1["base32"], tuned, out, dim=4, conv_dim=4, clamp_quantile=1.0)
    assert report.text_encoder_kept
    known, got = load_file(str(sd1["locon"])), load_file(str(out))
    assert set(got) == set(known)  # same kohya names, UNet and text encoder
    for key in known:
        if key.endswith(".alpha"):
            name = key[: -len(".alpha")]
            torch.testing.assert_close(effective(got, name), effective(known, name), atol=1e-5, rtol=1e-3)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("4", "4.0", "sd_v1")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    # and it does what the fine-tune does
    pipe = sd1_pipeline(load_single_file(sd1["base32"]))
    pipe.load_lora_weights(str(out))
    expected = unet_output(load_single_file(tuned).unet)
    assert (unet_output(pipe.unet) - expected).abs().max() < 1e-4


def test_resized_file_loads_in_diffusers_and_loses_what_truncation_predicts(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = ensure_tiny_model("tiny:sd15")
    pipes = [StableDiffusionPipeline.from_pretrained(folder, local_files_only=True) for _ in range(3)]
    modules = kohya_modules(pipes[0].unet, [pipes[0].text_encoder], ["lora_te"], sai=False, conv=False)
    original = write_kohya_lora(tmp_path / "d32.safetensors", modules, rank=32, alpha=16, seed=2, magnitude=0.15,
                                metadata={"ss_network_dim": "32", "ss_network_alpha": "16"})
    resized = tmp_path / "d8.safetensors"
    report = resize_file(original, resized, ResizeRequest(dim=8))
    base = unet_output(pipes[0].unet)
    weights_before = {k: v.clone() for k, v in pipes[0].unet.state_dict().items()}
    for pipe, path in zip(pipes[1:], (original, resized)):
        pipe.load_lora_weights(str(path))
    out_original, out_resized = unet_output(pipes[1].unet), unet_output(pipes[2].unet)
    # the truncation's prediction, per module: ||ΔW - ΔW_8||_F = sqrt(Σ_{i>8} s_i²) of the original ΔW
    known = load_file(str(original))
    for pipe in pipes[1:]:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    fused_original, fused_resized = pipes[1].unet.state_dict(), pipes[2].unet.state_dict()
    checked = 0
    for name in modules:
        if not name.startswith("lora_unet_"):
            continue
        key = next(k for k in weights_before if "lora_unet_" + k.removesuffix(".weight").replace(".", "_") == name)
        s = torch.linalg.svdvals(effective(known, name))
        predicted = float(torch.sqrt((s[8:] ** 2).sum()))
        difference = (fused_original[key] - fused_resized[key]).double()
        lost = float(torch.linalg.matrix_norm(difference.reshape(difference.shape[0], -1)))
        assert lost == pytest.approx(predicted, rel=1e-3, abs=1e-6), name
        checked += 1
    assert checked == sum(1 for n in modules if n.startswith("lora_unet_"))
    # in the output: the resized LoRA's effect is off by no more than the largest share truncation discards
    effect = (out_original - base).norm()
    discarded = max(math.sqrt(max(0.0, 1 - m.fro_retained ** 2)) for m in report.modules)
    assert 0 < (out_resized - out_original).norm() / effect < discarded


def test_sd1_diffusers_folder_merges_into_a_single_file(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = ensure_tiny_model("tiny:sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    modules = kohya_modules(pipe.unet, [pipe.text_encoder], ["lora_te"], sai=False, conv=True)
    lora = write_kohya_lora(tmp_path / "locon.safetensors", modules, rank=4, alpha=4, conv_rank=2, seed=7,
                            magnitude=0.3)
    out = tmp_path / "tiny-merged.safetensors"
    merge_into_checkpoint(folder, [lora], [1.0], out)
    merged = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    pipe.load_lora_weights(str(lora))
    assert (unet_output(merged.unet) - unet_output(pipe.unet)).abs().max() < 1e-4
    assert (text_output(merged.text_encoder) - text_output(pipe.text_encoder)).abs().max() < 1e-4
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the VAE too (its attention stored as 1x1 convs)
        assert torch.equal(merged.vae.decode(latents).sample, pipe.vae.decode(latents).sample)


def test_sdxl_merge_and_extract_folder_and_single_file(tmp_path):
    """tiny:sdxl: LoRAs with SAI UNet names and lora_te1_/lora_te2_ baked into the diffusers folder (written as a
    single file), then into that single file (OpenCLIP's fused q/k/v); diffusers' own single-file loader and
    LoRA loader are the reference. Extracting base folder vs merged file gives the summed LoRAs back."""
    from diffusers import StableDiffusionXLPipeline

    folder = ensure_tiny_model("tiny:sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    modules = kohya_modules(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], ["lora_te1", "lora_te2"], sai=True,
                            conv=True)
    assert any(n.startswith("lora_unet_input_blocks_4_1_") for n in modules)
    a = write_kohya_lora(tmp_path / "a.safetensors", modules, rank=4, alpha=2, conv_rank=4, seed=3, magnitude=0.3)
    b = write_kohya_lora(tmp_path / "b.safetensors", modules, rank=2, alpha=2, seed=4, magnitude=0.3)
    first, second = tmp_path / "xl-a.safetensors", tmp_path / "xl-ab.safetensors"
    merge_into_checkpoint(folder, [a], [0.7], first)
    merge_into_checkpoint(first, [b], [0.5], second)
    merged = StableDiffusionXLPipeline.from_single_file(str(second), config=str(folder), local_files_only=True)
    g = torch.Generator().manual_seed(0)
    extra = dict(added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                    "time_ids": torch.randn(1, 6, generator=g)})
    base = unet_output(pipe.unet, 96, **extra)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    expected = unet_output(pipe.unet, 96, **extra)
    assert (expected - base).abs().max() > 0.05
    assert (unet_output(merged.unet, 96, **extra) - expected).abs().max() < 1e-4
    for ours, reference in ((merged.text_encoder, pipe.text_encoder), (merged.text_encoder_2, pipe.text_encoder_2)):
        assert (text_output(ours) - text_output(reference)).abs().max() < 1e-4

    out = tmp_path / "extracted.safetensors"
    report = extract(folder, second, out, dim=6, conv_dim=4, clamp_quantile=1.0)
    assert report.family == "sdxl" and report.text_encoder_kept
    ta, tb, got = load_file(str(a)), load_file(str(b)), load_file(str(out))
    assert set(got) == set(ta)
    for key in ta:
        if key.endswith(".alpha"):
            name = key[: -len(".alpha")]
            wanted = 0.7 * effective(ta, name) + (0.5 * effective(tb, name) if key in tb else 0)
            torch.testing.assert_close(effective(got, name), wanted, atol=2e-5, rtol=1e-3)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    resized = resize_file(out, tmp_path / "xl2.safetensors", ResizeRequest(dim=2))
    assert {m.new_rank for m in resized.modules} == {2}


def test_family_and_file_refusals(sd1, tmp_path):
    runner = CliRunner()
    xl_lora = tmp_path / "xl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}, str(xl_lora))
    out = tmp_path / "out.safetensors"
    cases = [
        (["merge", str(xl_lora), "--model", str(sd1["base"]), "-o", str(out)], 2, "the LoRA is for SDXL"),
        (["merge", str(sd1["base"]), "--model", str(sd1["base"]), "-o", str(out)], 3, "not a kohya-format LoRA"),
        (["merge", str(sd1["locon"]), "--model", str(sd1["locon"]), "-o", str(out)], 3, "a LoRA file, not a base"),
        (["merge", str(sd1["locon"]), "--model", str(sd1["base"]), "-o", str(sd1["base"])], 2, "is also an input"),
        (["extract", str(sd1["base"]), str(sd1["base"]), str(out), "--dim", "0"], 2, "must be at least 1"),
        (["extract", str(sd1["base"]), str(sd1["base"]), str(out), "--dim", "2"], 2, "nothing to extract"),
        (["resize", str(sd1["locon"]), str(out), "--dim", "5"], 2, "above the file's largest rank"),
    ]
    for args, code, text in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and text in lines[0], result.output
        assert "Traceback" not in result.output
    assert not out.exists()
    sd2_like = tmp_path / "sd2-lora.safetensors"
    name = next(n for n in sd1["modules"] if n.startswith("lora_te_"))
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 1024), f"{name}.lora_up.weight": torch.zeros(32, 2)},
              str(sd2_like))
    result = runner.invoke(app, ["merge", str(sd2_like), "--model", str(sd1["base"]), "-o", str(out)])
    assert result.exit_code == 2 and "made for another model" in result.output
    assert not out.exists()
