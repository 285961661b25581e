"""Every rule of presets-and-rules.md, triggered (and, where it matters, not triggered)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.errors import ConfigError, DatasetError
from loracli.family import FAMILIES, SD1, SD2, SDXL
from loracli.lint import estimate_clip_tokens, lint_config, read_sample_prompts, sample_prompt_token_limit
from loracli.plan import build_plan
from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML

BASE = EXAMPLE_DATASET_TOML


def codes(tmp_path: Path, extra: str = "", presets=(), sets=(), family=SD1) -> dict[str, list[str]]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + extra)
    resolved = resolve_config(cfg, list(presets), list(sets))
    out: dict[str, list[str]] = {}
    for f in lint_config(resolved.config, family, resolved.origins):
        out.setdefault(f.code, []).append(f.key)
    return out


# --- errors -------------------------------------------------------------------------------

def test_e1_unknown_key_and_wrong_type_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean training.max_train_epochs"):
        codes(tmp_path, sets=["training.max_train_epoch=3"])


def test_e2_missing_or_empty_dataset(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    with pytest.raises(DatasetError, match="data"):
        build_plan(resolve_config(cfg))
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        build_plan(resolve_config(cfg))


def test_e3_adafactor_scheduler_needs_adafactor(tmp_path):
    assert "E3" in codes(tmp_path, "[optimizer]\nlr_scheduler = 'adafactor'\n")
    assert "E3" not in codes(tmp_path, "[optimizer]\nlr_scheduler = 'adafactor'\noptimizer_type = 'AdaFactor'\n")


@pytest.mark.parametrize("extra", ["shuffle_caption=true", "caption_dropout_rate=0.1",
                                   "caption_dropout_every_n_epochs=2", "caption_tag_dropout_rate=0.1"])
def test_e4_text_encoder_cache_conflicts(tmp_path, extra):
    frozen = ["network.network_train_unet_only=true", "training.cache_text_encoder_outputs=true"]
    assert "E4" in codes(tmp_path, sets=frozen + [f"dataset.{extra}"])
    assert "E4" not in codes(tmp_path, sets=frozen)


def test_e4_also_when_the_text_encoder_trains(tmp_path):
    assert "E4" in codes(tmp_path, sets=["training.cache_text_encoder_outputs=true"])
    assert "E4" not in codes(tmp_path, sets=["training.cache_text_encoder_outputs=true",
                                             "network.network_train_unet_only=true"])
    # sd-scripts asserts network_train_unet_only itself, even with the text-encoder lr at 0.
    assert "E4" in codes(tmp_path, sets=["training.cache_text_encoder_outputs=true", "optimizer.text_encoder_lr=0"],
                         family=SDXL)


@pytest.mark.parametrize("extra", ["token_warmup_step=10", "shuffle_caption=true"])
def test_e4_names_both_keys_for_the_disk_cache_and_token_warmup(tmp_path, extra):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    resolved = resolve_config(cfg, [], ["training.cache_text_encoder_outputs_to_disk=true",
                                        "network.network_train_unet_only=true", f"dataset.{extra}"])
    (finding,) = [f for f in lint_config(resolved.config, SDXL, resolved.origins) if f.code == "E4"]
    assert finding.key == "training.cache_text_encoder_outputs_to_disk"
    assert f"dataset.{extra.split('=')[0]}" in finding.message
    unet_only = resolve_config(cfg, [], ["training.cache_text_encoder_outputs_to_disk=true"])
    (missing,) = [f for f in lint_config(unet_only.config, SDXL, unet_only.origins) if f.code == "E4"]
    assert "network.network_train_unet_only" in missing.message


@pytest.mark.parametrize("aug", ["color_aug", "random_crop"])
def test_e5_latent_cache_with_pixel_augmentation(tmp_path, aug):
    assert "E5" in codes(tmp_path, sets=["dataset.cache_latents=true", f"dataset.{aug}=true"])
    assert "E5" not in codes(tmp_path, sets=["dataset.cache_latents=true", "dataset.flip_aug=true"])


def test_e6_max_token_length(tmp_path):
    with pytest.raises(ConfigError, match="75, 150 or 225"):
        codes(tmp_path, sets=["dataset.max_token_length=76"])
    assert codes(tmp_path, sets=["dataset.max_token_length=150"]) is not None


def test_e7_empty_output_name(tmp_path):
    assert "E7" in codes(tmp_path, sets=["output.output_name=''"])
    assert "E7" in codes(tmp_path, sets=['output.output_name="  "'])


def test_e8_bucket_steps_follow_the_family(tmp_path):
    sets = ["dataset.bucket_reso_steps=32", "dataset.min_bucket_reso=64", "dataset.max_bucket_reso=256"]
    assert codes(tmp_path, sets=sets, family=SD1)["E8"] == ["dataset.bucket_reso_steps"]
    assert codes(tmp_path, sets=sets, family=SD2)["E8"] == ["dataset.bucket_reso_steps"]
    assert "E8" not in codes(tmp_path, sets=sets, family=SDXL)
    assert codes(tmp_path, sets=["dataset.bucket_reso_steps=48"], family=SDXL)["E8"] == ["dataset.bucket_reso_steps"]


def test_e8_says_where_the_bucket_limits_came_from(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("min_bucket_reso = 64\nmax_bucket_reso = 256\n", ""))
    resolved = resolve_config(cfg, ["prodigy"], [])
    (finding,) = [f for f in lint_config(resolved.config, SD1, resolved.origins) if f.code == "E8"]
    assert "128x128 lies outside the bucket limits 320-768 (set by preset prodigy)" in finding.message


def test_e8_bucket_rules(tmp_path):
    assert codes(tmp_path, sets=["dataset.min_bucket_reso=512"])["E8"] == ["dataset.min_bucket_reso"]
    assert codes(tmp_path, sets=["dataset.resolution=512"])["E8"] == ["dataset.resolution"]
    assert codes(tmp_path, sets=["dataset.bucket_reso_steps=32"])["E8"] == ["dataset.bucket_reso_steps"]
    assert "E8" not in codes(tmp_path, sets=["dataset.bucket_reso_steps=128"])


def test_e9_no_length(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("max_train_epochs = 4", ""))
    resolved = resolve_config(cfg)
    assert "E9" in {f.code for f in lint_config(resolved.config, SD1, resolved.origins)}
    assert "E9" not in codes(tmp_path, sets=["training.max_train_steps=100"])


@pytest.mark.parametrize("scheduler", ["constant", "adafactor"])
def test_e10_schedules_without_warmup(tmp_path, scheduler):
    found = codes(tmp_path, sets=[f"optimizer.lr_scheduler='{scheduler}'", "optimizer.lr_warmup_steps=5",
                                  "optimizer.optimizer_type='AdaFactor'"])
    assert "E10" in found
    assert "E10" not in codes(tmp_path, sets=["optimizer.lr_scheduler='constant_with_warmup'",
                                              "optimizer.lr_warmup_steps=5"])


def test_e10_adafactor_relative_step_takes_no_warmup(tmp_path):
    assert "E10" in codes(tmp_path, sets=["optimizer.optimizer_type='AdaFactor'", "optimizer.lr_scheduler='cosine'",
                                          "optimizer.lr_warmup_steps=0.1"])
    assert "E10" not in codes(tmp_path, sets=["optimizer.optimizer_type='AdaFactor'",
                                              "optimizer.lr_scheduler='cosine'", "optimizer.lr_warmup_steps=0.1",
                                              "optimizer.optimizer_args.relative_step=false"])


def test_e11_float_warmup_at_least_one(tmp_path):
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        codes(tmp_path, sets=["optimizer.lr_warmup_steps=1.0"])
    assert "E10" not in codes(tmp_path, sets=["optimizer.lr_scheduler='cosine'", "optimizer.lr_warmup_steps=0.5"])


def test_e13_w14_sampling_needs_prompts_and_a_schedule(tmp_path):
    assert codes(tmp_path, sets=["sample.sample_every_n_steps=10"])["E13"] == ["sample.sample_prompts"]
    assert "W14" in codes(tmp_path, sets=["sample.sample_prompts='p.txt'"])
    both = codes(tmp_path, sets=["sample.sample_prompts='p.txt'", "sample.sample_at_first=true"])
    assert "E13" not in both and "W14" not in both


@pytest.mark.parametrize("name", ["model.ckpt", "model.PT"])
def test_e14_pickle_checkpoints_need_the_opt_in(tmp_path, name):
    model = f"model.pretrained_model_name_or_path='{name}'"
    assert "E14" in codes(tmp_path, sets=[model])
    assert "E14" not in codes(tmp_path, sets=[model, "model.allow_pickle_checkpoint=true"])
    assert "E14" not in codes(tmp_path, sets=["model.pretrained_model_name_or_path='model.safetensors'"])


# --- warnings -----------------------------------------------------------------------------

def test_w1_alpha_above_dim(tmp_path):
    assert codes(tmp_path, sets=["network.network_dim=4", "network.network_alpha=8"])["W1"] == ["network.network_alpha"]
    assert "W1" not in codes(tmp_path, sets=["network.network_dim=8", "network.network_alpha=8"])
    assert "W1" in codes(tmp_path, sets=["network.conv_dim=2", "network.conv_alpha=4"])


def test_w2_adaptive_optimizer_with_small_lr(tmp_path):
    found = codes(tmp_path, presets=["dadapt-v3"], sets=["optimizer.unet_lr=1e-4"])
    assert found["W2"] == ["optimizer.unet_lr"]
    assert "W2" not in codes(tmp_path, presets=["dadapt-v3"])
    assert "W2" not in codes(tmp_path, presets=["prodigy"], sets=["optimizer.text_encoder_lr=0"])  # 0 = off


def test_w3_weight_decay_without_decouple(tmp_path):
    assert "W3" in codes(tmp_path, presets=["dadapt-v3"], sets=["optimizer.optimizer_args.decouple=false"])
    assert "W3" not in codes(tmp_path, presets=["dadapt-v3"])
    # Prodigy decouples by default: only an explicit false warns.
    assert "W3" not in codes(tmp_path, sets=["optimizer.optimizer_type='Prodigy'", "optimizer.learning_rate=1.0",
                                             "optimizer.optimizer_args.weight_decay=0.01"])


def test_w4_noise_offset_with_adaptive_optimizer(tmp_path):
    assert "W4" in codes(tmp_path, presets=["prodigy"], sets=["training.noise_offset=0.3"])
    assert "W4" not in codes(tmp_path, presets=["prodigy"], sets=["training.noise_offset=0.1"])


def test_w5_discount_without_iterations(tmp_path):
    assert "W5" in codes(tmp_path, sets=["training.multires_noise_discount=0.2"])
    assert "W5" not in codes(tmp_path, sets=["training.multires_noise_discount=0.2",
                                             "training.multires_noise_iterations=6"])


def test_w6_constant_with_manual_lr(tmp_path):
    assert "W6" in codes(tmp_path)  # AdamW + constant by default
    assert "W6" not in codes(tmp_path, presets=["prodigy"])
    assert "W6" not in codes(tmp_path, presets=["adamw8bit"])


def test_w7_prodigy_warmup_without_safeguard(tmp_path):
    sets = ["optimizer.lr_scheduler='cosine'", "optimizer.lr_warmup_steps=0.1"]
    assert "W7" in codes(tmp_path, presets=["prodigy"], sets=sets)
    assert "W7" not in codes(tmp_path, presets=["prodigy"], sets=sets + ["optimizer.optimizer_args.safeguard_warmup=true"])


def test_w8_min_snr_gamma_range(tmp_path):
    assert "W8" in codes(tmp_path, sets=["training.min_snr_gamma=0.5"])
    assert "W8" in codes(tmp_path, sets=["training.min_snr_gamma=25"])
    assert "W8" not in codes(tmp_path, sets=["training.min_snr_gamma=5"])


def test_w12_bucket_limits_not_multiples(tmp_path):
    found = codes(tmp_path, sets=["dataset.min_bucket_reso=100", "dataset.max_bucket_reso=300"])
    assert "W12" in found


# --- the family's own rules -----------------------------------------------------------------------

XL_OK = ["dataset.resolution=1024", "dataset.max_bucket_reso=2048", "network.network_train_unet_only=true"]


def test_w19_sdxl_below_768(tmp_path):
    assert codes(tmp_path, sets=["dataset.resolution=512"], family=SDXL)["W19"] == ["dataset.resolution"]
    assert codes(tmp_path, sets=["dataset.resolution=[1024, 640]", "dataset.max_bucket_reso=2048"],
                 family=SDXL)["W19"] == ["dataset.resolution"]
    assert "W19" not in codes(tmp_path, sets=XL_OK, family=SDXL)
    assert "W19" not in codes(tmp_path, sets=["dataset.resolution=512"], family=SD1)


def test_w20_sdxl_fp16_vae(tmp_path):
    assert codes(tmp_path, sets=XL_OK + ["training.mixed_precision='fp16'"], family=SDXL)["W20"] == \
        ["model.no_half_vae"]
    for fine in (["training.mixed_precision='fp16'", "model.no_half_vae=true"], ["training.mixed_precision='bf16'"]):
        assert "W20" not in codes(tmp_path, sets=XL_OK + fine, family=SDXL)
    assert "W20" not in codes(tmp_path, sets=["training.mixed_precision='fp16'"], family=SD1)


def test_w21_sdxl_text_encoder_training_is_informational(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    resolved = resolve_config(cfg, [], ["dataset.resolution=1024", "dataset.max_bucket_reso=2048"])
    (finding,) = [f for f in lint_config(resolved.config, SDXL, resolved.origins) if f.code == "W21"]
    assert finding.level == "warning" and finding.message.startswith("informational")
    assert "The Other LoRA Training Rentry" in finding.source and "8 GB" in finding.hint
    assert "W21" not in codes(tmp_path, sets=XL_OK, family=SDXL)
    assert "W21" not in codes(tmp_path, sets=XL_OK[:2] + ["optimizer.text_encoder_lr=[0.0, 0.0]"], family=SDXL)
    assert "W21" in codes(tmp_path, sets=XL_OK[:2] + ["optimizer.text_encoder_lr=[0.0, 1e-5]"], family=SDXL)


def test_w22_clip_skip_ignored_on_sdxl(tmp_path):
    assert codes(tmp_path, sets=XL_OK + ["model.clip_skip=2"], family=SDXL)["W22"] == ["model.clip_skip"]
    assert "W22" not in codes(tmp_path, sets=["model.clip_skip=2"], family=SD1)


def test_w23_two_text_encoder_lrs_on_one_encoder(tmp_path):
    found = codes(tmp_path, sets=["optimizer.text_encoder_lr=[5e-5, 1e-5]"], family=SD2)
    assert found["W23"] == ["optimizer.text_encoder_lr"]
    assert "W23" not in codes(tmp_path, sets=XL_OK + ["optimizer.text_encoder_lr=[5e-5, 1e-5]"], family=SDXL)
    assert "W23" not in codes(tmp_path, sets=["optimizer.text_encoder_lr=[5e-5]"], family=SD1)


def plan_warnings(tmp_path, make_image, extra="", setup=None):
    data = tmp_path / "data"
    for i in range(4):
        make_image(data / "2_char" / f"{i}.png", 128, 128)
        (data / "2_char" / f"{i}.txt").write_text("char\n")
    if setup:
        setup(data)
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE + extra)
    plan = build_plan(resolve_config(cfg))
    return {w["code"]: w for w in plan.warnings}, plan


def test_w9_skipped_folders_files_and_uncaptioned(tmp_path, make_image):
    def setup(data):
        make_image(data / "char_no_prefix" / "a.png", 64, 64)
        (data / "2_char" / "notes.gif").write_bytes(b"GIF89a")
        make_image(data / "2_char" / "upper.Png", 128, 128)
        make_image(data / "2_char" / "nocaption.png", 128, 128)

    warnings, plan = plan_warnings(tmp_path, make_image, setup=setup)
    by_code: dict[str, list[str]] = {}
    for w in plan.warnings:
        by_code.setdefault(w["code"], []).append(w["message"])
    # One code per kind of finding, each reported once.
    assert by_code["W9"] == ["1 folder(s) skipped for their name: char_no_prefix"]
    assert len(by_code["W15"]) == 1 and "notes.gif" in by_code["W15"][0]
    assert len(by_code["W16"]) == 1 and "upper.Png" in by_code["W16"][0]
    assert len(by_code["W17"]) == 1 and "nocaption.png" in by_code["W17"][0]
    # The mixed-case extension is said once: as a warning, not also as a note.
    assert not any("mixed-case" in n for n in plan.notes)


def test_w18_dataset_warnings_have_their_own_code(tmp_path, make_image):
    def setup(data):
        make_image(data / "2_char" / "tags.png", 128, 128)
        (data / "2_char" / "tags.caption").write_text("char\n")

    warnings, plan = plan_warnings(tmp_path, make_image, setup=setup)
    assert warnings["W18"]["key"] == "dataset" and ".caption" in warnings["W18"]["message"]
    assert "W9" not in warnings


def test_sources_are_guide_titles_not_file_numbers(tmp_path, make_image):
    found = codes(tmp_path, presets=["dadapt-v3"], sets=["optimizer.unet_lr=1e-4", "network.network_alpha=64"])
    assert found["W2"] and found["W1"]
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    resolved = resolve_config(cfg, ["dadapt-v3"], ["optimizer.unet_lr=1e-4", "network.network_alpha=64"])
    sources = {f.code: f.source for f in lint_config(resolved.config, SD1, resolved.origins)}
    assert sources["W2"] == "Lazy DAdaptation Guide; The Other LoRA Training Rentry"
    assert sources["W1"] == "The Other LoRA Training Rentry"
    for source in sources.values():
        assert "seed" not in source and "../shared" not in source and "§" not in source


def test_w10_total_steps_far_from_guides(tmp_path, make_image):
    warnings, plan = plan_warnings(tmp_path, make_image)
    assert "W10" in warnings and str(plan.total_steps) in warnings["W10"]["message"]


def test_w10_not_raised_in_range(tmp_path, make_image):
    plan_warnings(tmp_path, make_image)  # writes the dataset: 4 images x 2 repeats, batch 1
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("max_train_epochs = 4", "max_train_epochs = 250"))
    plan = build_plan(resolve_config(cfg))
    assert plan.total_steps == 2000
    assert "W10" not in {w["code"] for w in plan.warnings}


def test_w11_long_prompts_and_process_split(tmp_path, make_image):
    prompts = tmp_path / "prompts.txt"
    # 113 tags + 112 commas = 225 tokens: all that SD1's sampler reads (3 windows of 75); one more is cut
    prompts.write_text("# comment\n" + ", ".join(f"tag{i}" for i in range(113)) + " --n bad --w 512\n"
                       "short one\nthird\n")
    extra = f"[sample]\nsample_prompts = '{prompts}'\n"
    warnings, _ = plan_warnings(tmp_path, make_image, extra)
    assert "W11" not in warnings
    prompts.write_text("# comment\n(" + ", ".join(f"tag{i}" for i in range(114)) + ":1.2) --n bad --w 512\n"
                       "short one\nthird\n")  # the weight's brackets and number are not tokens
    warnings, _ = plan_warnings(tmp_path, make_image, extra)
    assert warnings["W11"]["key"] == "sample.sample_prompts" and "225 tokens" in warnings["W11"]["message"]
    assert sample_prompt_token_limit(FAMILIES["sdxl"], None) == 75
    assert sample_prompt_token_limit(FAMILIES["sdxl"], 150) == 150
    assert sample_prompt_token_limit(FAMILIES["sd2"], 75) == 225
    assert read_sample_prompts(prompts)[1:] == ["short one", "third"]
    assert estimate_clip_tokens("a photo, of a cat") == 6
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("max_train_epochs = 4", "max_train_epochs = 4\nnum_processes = 2") + extra)
    plan = build_plan(resolve_config(cfg))
    messages = [w["message"] for w in plan.warnings if w["code"] == "W11"]
    assert any("3 prompts do not divide among 2 processes" in m for m in messages)


def test_w13_buckets_smaller_than_batch(tmp_path, make_image):
    warnings, plan = plan_warnings(tmp_path, make_image, "",
                                   lambda d: make_image(d / "2_char" / "wide.png", 256, 64))
    assert "W13" not in warnings  # batch size 1
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("max_train_epochs = 4", "max_train_epochs = 4\ntrain_batch_size = 4"))
    plan = build_plan(resolve_config(cfg))
    assert "W13" in {w["code"] for w in plan.warnings}


# --- network_weights: read at plan time --------------------------------------------------------------

XL_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
SD1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def lora_file(path: Path, modules: dict[str, tuple[int, int]], rank: int = 4, conv: dict | None = None) -> Path:
    from tests.pure.test_model_probe import write_safetensors

    shapes: dict[str, tuple[int, ...]] = {}
    for name, (n_in, n_out) in modules.items():
        shapes |= {f"{name}.lora_down.weight": (rank, n_in), f"{name}.lora_up.weight": (n_out, rank),
                   f"{name}.alpha": ()}
    for name, (n_in, n_out, conv_rank) in (conv or {}).items():
        shapes |= {f"{name}.lora_down.weight": (conv_rank, n_in, 3, 3), f"{name}.lora_up.weight": (n_out, conv_rank, 1, 1),
                   f"{name}.alpha": ()}
    return write_safetensors(path, shapes)


def plan_with_weights(tmp_path, make_image, weights: Path, model="tiny:sd15", *sets: str):
    from tests.pure.cli_helpers import make_dataset, run_cli

    make_dataset(tmp_path, make_image)
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.replace("tiny:sd15", model) + f"[network]\nnetwork_weights = '{weights}'\n")
    return run_cli("plan", "--config", cfg, *[a for s in sets for a in ("--set", s)])


@pytest.mark.parametrize(("model", "modules", "words"), [
    ("tiny:sd15", {XL_Q: (640, 640), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)},
     "is an SDXL LoRA (two text encoders (lora_te1_/lora_te2_)) but this run trains SD1.x"),
    ("tiny:sd15", {XL_Q: (640, 640)}, "is an SDXL LoRA (SDXL UNet module names"),
    ("tiny:sdxl", {SD1_Q: (320, 320), "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)},
     "is an SD1.x LoRA (text encoder width 768) but this run trains SDXL"),
    ("tiny:sdxl", {SD1_Q: (320, 320)}, "is an SD1.x or SD2.x LoRA"),
])
def test_e16_lora_of_another_family(tmp_path, make_image, model, modules, words):
    weights = lora_file(tmp_path / "old.safetensors", modules)
    result = plan_with_weights(tmp_path, make_image, weights, model)
    assert result.exit_code == 2, result.output
    assert "network.network_weights" in result.stderr and "[E16]" in result.stderr
    assert str(weights) in result.stderr and words in result.stderr.replace("\n", " ")


def test_e15_e17_not_a_lora_and_other_ranks(tmp_path, make_image):
    from tests.pure.test_model_probe import sd1_file

    base = sd1_file(tmp_path / "base.safetensors")
    result = plan_with_weights(tmp_path, make_image, base)
    assert result.exit_code == 2 and "[E15]" in result.stderr and "is not a LoRA/LyCORIS file" in result.stderr
    weights = lora_file(tmp_path / "old.safetensors", {SD1_Q: (32, 32)}, rank=8)
    wrong = plan_with_weights(tmp_path, make_image, weights)
    assert wrong.exit_code == 2
    assert "network.network_dim: [E17] 4 but old.safetensors (network.network_weights) has rank 8" in wrong.stderr
    assert "set network.network_dim = 8" in wrong.stderr
    assert plan_with_weights(tmp_path, make_image, weights, "tiny:sd15", "network.network_dim=8").exit_code == 0
    locon = lora_file(tmp_path / "locon.safetensors", {SD1_Q: (32, 32)}, rank=8,
                      conv={"lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, 2)})
    dropped = plan_with_weights(tmp_path, make_image, locon, "tiny:sd15", "network.network_dim=8")
    assert dropped.exit_code == 2 and "network.conv_dim: [E17] is unset" in dropped.stderr
    assert plan_with_weights(tmp_path, make_image, locon, "tiny:sd15", "network.network_dim=8",
                             "network.conv_dim=2", "network.algo='locon'").exit_code == 0
    loha = plan_with_weights(tmp_path, make_image, weights, "tiny:sd15", "network.network_dim=8",
                             "network.algo='loha'")
    assert loha.exit_code == 2 and "holds lora modules but network.algo is 'loha'" in loha.stderr


def test_corrupt_network_weights_is_exit_3(tmp_path, make_image):
    broken = tmp_path / "old.safetensors"
    broken.write_bytes(b"\x00" * 4)
    result = plan_with_weights(tmp_path, make_image, broken)
    assert result.exit_code == 3 and "old.safetensors" in result.stderr and "Traceback" not in result.output


def test_lycoris_switches_on_plain_lora_are_refused_at_plan_time():
    from loracli.config.schema import LoracliConfig
    from loracli.family import SD1
    from loracli.lint import lint_config

    base = {"model": {"pretrained_model_name_or_path": "tiny:sd15"}, "dataset": {"train_data_dir": "data"}}
    for key in ("use_tucker", "use_scalar", "train_norm", "rank_dropout_scale"):
        lora = LoracliConfig.model_validate({**base, "network": {"algo": "lora", key: True}})
        found = [f for f in lint_config(lora, SD1, {}) if f.code == "E18"]
        assert [f.key for f in found] == [f"network.{key}"] and found[0].level == "error"
        locon = LoracliConfig.model_validate({**base, "network": {"algo": "locon", key: True}})
        assert not [f for f in lint_config(locon, SD1, {}) if f.code == "E18"]
