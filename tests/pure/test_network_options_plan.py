"""Block-wise LoRA, LoRA+, DoRA and LyCORIS presets on the plan side (no torch): sd-scripts' formulas,
transcribed here from networks/lora.py (get_block_lr_weight, get_block_index, get_block_dims_and_alphas), the
plan-time rules E50-E56/W50, the plan's module table, and the sd-scripts export and import of every option."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from loracli.config.loader import resolve_config
from loracli.config.presets import builtin_dir
from loracli.errors import ConfigError
from loracli.family import SD1, SDXL
from loracli.lint import lint_config
from loracli.network_blocks import block_index, block_ranks, lr_weights, num_blocks
from loracli.plan import build_plan
from loracli.sdscripts import options
from loracli.sdscripts.export import CONFIG_FILE, DATASET_FILE, build_export, write_export
from loracli.sdscripts.importer import import_file, render_toml
from loracli.sdscripts.lycoris_targets import PRESET_FILE, PRESETS, targets_for
from tests.pure.cli_helpers import EXAMPLE_DATASET_TOML

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny" / "loracli.toml"


# --- sd-scripts' formulas, transcribed ------------------------------------------------------------

def sd_named(name: str, n: int) -> list[float]:
    """get_block_lr_weight's get_list."""
    tokens = name.split("+")
    base = float(tokens[1]) if len(tokens) > 1 else 0.0
    return {"cosine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))],
            "sine": [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)],
            "linear": [i / (n - 1) + base for i in range(n)],
            "reverse_linear": [i / (n - 1) + base for i in reversed(range(n))],
            "zeros": [0.0 + base] * n}[tokens[0]]


def test_named_shapes_and_threshold_as_sd_scripts():
    for shape in ("cosine", "sine", "linear", "reverse_linear", "zeros", "sine+0.5", "cosine+1"):
        got = lr_weights(False, shape, None, None)
        assert got == pytest.approx([w if w > 0 else 0 for w in sd_named(shape, 12)] + [1.0] + [1.0] * 12)
    # threshold: at or below it becomes 0, only in the lists given
    got = lr_weights(False, [0.1, 0.5, 0.2], [0.3], None, zero_threshold=0.2)
    assert got == [0, 0.5, 0, *[1.0] * 9, 0.3, *[1.0] * 12]
    # SDXL: 9 + 3 + 9, framed by the embeddings' and the output's 1.0
    got = lr_weights(True, None, [0, 1, 2], "linear")
    assert got == pytest.approx([1.0] + [1.0] * 9 + [0, 1, 2] + [0] + [i / 8 for i in range(1, 9)] + [1.0])
    assert len(got) == num_blocks(True) == 23 and num_blocks(False) == 25
    # too long: cut; too short: filled with 1
    assert lr_weights(False, [2.0] * 20, None, None)[:12] == [2.0] * 12
    assert lr_weights(False, None, None, None) is None


def test_block_numbers_as_sd_scripts():
    sd1 = {"lora_unet_down_blocks_0_attentions_1_proj_in": 1 + 0 + 1,
           "lora_unet_down_blocks_2_downsamplers_0_conv": 1 + 6 + 2,
           "lora_unet_down_blocks_3_resnets_1_conv1": 1 + 9 + 1,
           "lora_unet_mid_block_attentions_0_proj_out": 12,
           "lora_unet_up_blocks_0_upsamplers_0_conv": 12 + 1 + 0 + 2,
           "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": 12 + 1 + 9 + 2}
    for name, index in sd1.items():
        assert block_index(name, False) == index, name
    sdxl = {"lora_unet_input_blocks_4_1_proj_in": 1 + 4, "lora_unet_middle_block_1_proj_in": 10 + 1,
            "lora_unet_output_blocks_8_0_skip_connection": 13 + 8, "lora_unet_time_embed_0": 0, "lora_unet_out_2": 22}
    for name, index in sdxl.items():
        assert block_index(name, True) == index, name


def test_block_ranks_as_sd_scripts():
    weights = lr_weights(False, [1, 0], None, None)
    ranks = block_ranks(False, 8, 4.0, 2, None, None, None, None, None, weights)
    assert ranks.dims == [8, 0] + [8] * 23 and ranks.alphas == [4.0] * 25
    assert ranks.conv_dims == [2, 0] + [2] * 23 and ranks.conv_alphas == [1.0] * 25  # conv_alpha default 1
    dims = list(range(25))
    ranks = block_ranks(False, 8, 4.0, None, None, dims, None, None, None, None)
    assert ranks.dims == dims and ranks.conv_dims is None
    assert block_ranks(False, 8, 4.0, None, None, None, None, None, None, None) is None


# --- schema and rules ----------------------------------------------------------------------------------------

def codes(tmp_path: Path, sets=(), family=SD1) -> dict[str, list[str]]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    resolved = resolve_config(cfg, [], list(sets))
    out: dict[str, list[str]] = {}
    for f in lint_config(resolved.config, family, resolved.origins):
        out.setdefault(f.code, []).append(f.key)
    return out


@pytest.mark.parametrize("value", ["[1.0, nan]", "[1.0, inf]", '"sinus"', '"sine+x"', "[1, true]"])
def test_bad_lr_weights_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match="down_lr_weight"):
        codes(tmp_path, [f"network.down_lr_weight={value}"])


def test_a_single_mid_weight_may_be_a_number(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(EXAMPLE_DATASET_TOML)
    assert resolve_config(cfg, [], ["network.mid_lr_weight=0.5"]).config.network.mid_lr_weight == [0.5]
    with pytest.raises(ConfigError, match="mid_lr_weight"):
        resolve_config(cfg, [], ["network.mid_lr_weight=true"])


def test_e50_block_options_need_plain_lora(tmp_path):
    locon = ['network.algo="locon"']
    assert codes(tmp_path, locon + ["network.block_dims=[4]"])["E50"] == ["network.block_dims"]
    assert codes(tmp_path, locon + ['network.up_lr_weight="sine"'])["E50"] == ["network.up_lr_weight"]
    assert "E50" not in codes(tmp_path, [f"network.block_dims={[4] * 25}"])


def test_e51_dora_needs_lycoris(tmp_path):
    assert codes(tmp_path, ["network.dora_wd=true"])["E51"] == ["network.dora_wd"]
    for algo in ("locon", "loha", "lokr"):
        assert "E51" not in codes(tmp_path, ["network.dora_wd=true", f'network.algo="{algo}"'])


def test_e52_loraplus_needs_up_matrices(tmp_path):
    for algo in ("loha", "lokr"):
        assert codes(tmp_path, ["network.loraplus_lr_ratio=16", f'network.algo="{algo}"'])["E52"]
    for algo in ("lora", "locon"):
        assert "E52" not in codes(tmp_path, ["network.loraplus_unet_lr_ratio=16", f'network.algo="{algo}"'])
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):  # 0 would freeze the up matrices in sd-scripts
        codes(tmp_path, ["network.loraplus_lr_ratio=0"])


def test_e53_block_lists_have_the_family_s_length(tmp_path):
    sd1, sdxl = [f"network.block_dims={[4] * 25}"], [f"network.block_dims={[4] * 23}"]
    assert "E53" not in codes(tmp_path, sd1) and "E53" in codes(tmp_path, sd1, family=SDXL)
    assert "E53" not in codes(tmp_path, sdxl, family=SDXL) and "E53" in codes(tmp_path, sdxl)
    assert codes(tmp_path, sd1 + ["network.conv_block_alphas=[1]", "network.conv_block_dims=[1]"])["E53"] == [
        "network.conv_block_dims", "network.conv_block_alphas"]


def test_e54_options_sd_scripts_would_not_read(tmp_path):
    assert codes(tmp_path, [f"network.block_alphas={[1] * 25}"])["E54"] == ["network.block_alphas"]
    assert codes(tmp_path, ["network.block_lr_zero_threshold=0.1"])["E54"] == ["network.block_lr_zero_threshold"]
    assert codes(tmp_path, [f"network.block_dims={[4] * 25}", f"network.conv_block_alphas={[1] * 25}"])["E54"] == [
        "network.conv_block_alphas"]
    assert "E54" not in codes(tmp_path, ['network.down_lr_weight="sine"', f"network.conv_block_dims={[2] * 25}"])


def test_e55_e56_presets(tmp_path):
    assert codes(tmp_path, ['network.lycoris_preset="attn-mlp"'])["E55"] == ["network.lycoris_preset"]
    locon = ['network.algo="locon"', "network.conv_dim=4"]
    assert codes(tmp_path, locon + ['network.lycoris_preset="attn-only"'])["E56"] == ["network.conv_dim"]
    assert not {"E55", "E56"} & set(codes(tmp_path, locon + ['network.lycoris_preset="unet-convblock-only"']))


def test_e57_dora_locon_ignores_network_dropout(tmp_path):
    dora = ['network.algo="locon"', "network.dora_wd=true"]
    assert codes(tmp_path, dora + ["network.network_dropout=0.1"])["E57"] == ["network.network_dropout"]
    assert "E57" not in codes(tmp_path, dora + ["network.rank_dropout=0.1", "network.module_dropout=0.1"])


def test_e58_network_weights_and_dora_must_agree(tmp_path, make_image):
    from tests.pure.test_lint import SD1_Q, plan_with_weights
    from tests.pure.test_model_probe import write_safetensors

    shapes = {f"{SD1_Q}.lora_down.weight": (4, 32), f"{SD1_Q}.lora_up.weight": (32, 4), f"{SD1_Q}.alpha": (),
              f"{SD1_Q}.dora_scale": (1, 32)}
    dora_file = write_safetensors(tmp_path / "dora.safetensors", shapes)
    locon = ["network.algo='locon'", "network.network_module='lycoris.kohya'"]
    missing = plan_with_weights(tmp_path, make_image, dora_file, "tiny:sd15", *locon)
    assert missing.exit_code == 2 and "network.dora_wd: [E58]" in missing.stderr
    assert "set network.dora_wd = true" in missing.stderr
    assert plan_with_weights(tmp_path, make_image, dora_file, "tiny:sd15", *locon, "network.dora_wd=true"
                             ).exit_code == 0
    plain = write_safetensors(tmp_path / "plain.safetensors",
                              {k: v for k, v in shapes.items() if not k.endswith("dora_scale")})
    extra = plan_with_weights(tmp_path, make_image, plain, "tiny:sd15", *locon, "network.dora_wd=true")
    assert extra.exit_code == 2 and "is not a DoRA file" in extra.stderr


def test_w50_long_lr_weights_are_cut(tmp_path):
    assert codes(tmp_path, [f"network.mid_lr_weight={[1] * 3}"], family=SDXL).get("W50") is None
    assert codes(tmp_path, [f"network.mid_lr_weight={[1] * 3}"])["W50"] == ["network.mid_lr_weight"]


# --- the plan's module table ------------------------------------------------------------------------------

def test_plan_lists_modules_per_block_with_ranks():
    dims = [4] * 25
    dims[13 + 3] = 2  # up_blocks.1.attentions.0 of tiny:sd15 (up_lr_weight[3])
    plan = build_plan(resolve_config(EXAMPLE, [], [f"network.block_dims={dims}", 'network.up_lr_weight=[0]']))
    rows = {r["part"]: (r["modules"], r["ranks"]) for r in plan.network_modules}
    # tiny:sd15: 2 CLIP layers x 6; a transformer block has 12 layers (proj_in/out + 10); up0 (block 13) has
    # weight 0 and no transformer, up3 and up4 one transformer each, down1 one, mid one
    assert rows == {"text encoder": (12, [4]), "unet down1": (12, [4]), "unet mid": (12, [4]),
                    "unet up3": (12, [2]), "unet up4": (12, [4])}


# --- export to sd-scripts and import back -------------------------------------------------------------------

SHIPPED = sorted(p.stem for p in builtin_dir().glob("*.toml"))
LYCORIS = ['network.network_module="lycoris.kohya"']
KOHYA = ['network.network_module="networks.lora"']
VARIANTS = {
    "lora": KOHYA + ['network.algo="lora"'],
    "locon": LYCORIS + ['network.algo="locon"', "network.conv_dim=4"],
    "loha": LYCORIS + ['network.algo="loha"', "network.conv_dim=4"],
    "lokr": LYCORIS + ['network.algo="lokr"', "network.factor=4"],
    "dora-locon": LYCORIS + ['network.algo="locon"', "network.dora_wd=true"],
    "dora-lokr": LYCORIS + ['network.algo="lokr"', "network.dora_wd=true"],
    "blocks": KOHYA + ['network.algo="lora"', "network.conv_dim=4", "network.conv_alpha=1", 'network.down_lr_weight="sine+0.25"',
               "network.mid_lr_weight=[0.5]", "network.up_lr_weight=[0, 0.5, 1.5]", "network.block_lr_zero_threshold=0.1",
               f"network.block_dims={[8] * 12 + [4] * 13}", f"network.block_alphas={[4.0] * 24 + [0.5]}",
               f"network.conv_block_dims={[2] * 25}"],
    "loraplus-lora": KOHYA + ['network.algo="lora"', "network.loraplus_lr_ratio=16", "network.loraplus_unet_lr_ratio=8.5"],
    "loraplus-locon": LYCORIS + ['network.algo="locon"', "network.loraplus_text_encoder_lr_ratio=4"],
    **{f"preset-{p}": LYCORIS + ['network.algo="loha"', f'network.lycoris_preset="{p}"'] for p in PRESETS[1:]},
}


def _sdxl(preset: str) -> list[str]:
    return ['model.pretrained_model_name_or_path="tiny:sdxl"', "dataset.shuffle_caption=false"] \
        if preset.startswith("sdxl") else []


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("preset", SHIPPED)
def test_every_preset_and_network_option_exports_and_imports_back(preset, variant, tmp_path):
    sets = _sdxl(preset) + VARIANTS[variant]
    if variant == "blocks" and preset.startswith("sdxl"):  # SDXL has 23 blocks (9 + 3 + 9 + 2)
        sets = sets[:-3] + [f"network.block_dims={[8] * 12 + [4] * 11}", f"network.block_alphas={[4.0] * 23}",
                            f"network.conv_block_dims={[2] * 23}", "network.mid_lr_weight=[0.5, 1, 0]"]
    original = resolve_config(EXAMPLE, [preset], sets)
    net = original.config.network
    family = SDXL if preset.startswith("sdxl") else SD1
    if not targets_for(net.algo, net.lycoris_preset, family)["enable_conv"] and net.conv_dim is not None:
        with pytest.raises(ConfigError, match="E56"):  # the shipped locon preset's conv_dim would do nothing
            build_plan(original)
        return
    exp = build_export(original.config, build_plan(original))
    flat = exp.flat_args()
    parser = options.build_parser(exp.script)  # argparse exits on an option sd-scripts does not have
    parser.parse_args([t for name, value in flat.items() for t in options.cli_tokens(name, value, exp.script)])
    assert set(flat) <= set(options.load_option_table(exp.script))
    items = dict(item.split("=", 1) for item in flat.get("network_args", []))
    if variant == "blocks":  # as sd-scripts splits them: lists at commas, a shape by its name
        assert items["down_lr_weight"] == "sine+0.25" and items["mid_lr_weight"].split(",")[0] == "0.5"
        assert [float(x) for x in items["up_lr_weight"].split(",")] == [0, 0.5, 1.5]
        assert [int(x) for x in items["block_dims"].split(",")] == net.block_dims
        assert [float(x) for x in items["block_alphas"].split(",")] == net.block_alphas
    if variant.startswith("loraplus"):
        assert {k for k in items if k.startswith("loraplus")} == {
            k for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
            if getattr(net, k) is not None}
    if variant.startswith("dora"):
        assert items["dora_wd"] == "True" and flat["network_module"] == "lycoris.kohya"
    written = write_export(tmp_path / "export", exp)
    if net.algo != "lora":
        table = tomllib.loads((tmp_path / "export" / PRESET_FILE).read_text())
        assert table == targets_for(net.algo, net.lycoris_preset, family)
    else:
        assert PRESET_FILE not in {p.name for p in written}

    result = import_file(tmp_path / "export" / CONFIG_FILE, tmp_path / "export" / DATASET_FILE)
    assert result.unsupported == {}
    imported = tmp_path / "imported.toml"
    imported.write_text(render_toml(result), encoding="utf-8")
    back = resolve_config(imported)
    assert back.config.network == original.config.network
    assert back.config.model_dump() == original.config.model_dump()


# sd-scripts' UNets, transcribed: SD1/SD2 train on library/original_unet.py, whose time embedding is a class
# TimestepEmbedding `time_embedding` (linear_1, linear_2) beside conv_in/conv_out, as in diffusers; SDXL on
# library/sdxl_original_unet.py, whose time embedding `time_embed` and label (add) embedding `label_emb` are
# nn.Sequential and whose conv_in/conv_out are input_blocks.0.0 / out.2. LyCORIS 4.1.3's full-lin, attn-mlp and
# unet-transformer-only select the time embedding by that class (full-lin also by the names
# time_embedding.linear_1/2), its unet-convblock-only conv_in/conv_out by name: on SDXL none of them matches.
SD_TIME_EMBEDDING = {"time_embedding.linear_1", "time_embedding.linear_2"}
SD_CONV_IN_OUT = {"conv_in", "conv_out"}
SDXL_ROOT_NAMES = {"time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "add_embedding.linear_1",
                   "add_embedding.linear_2", "input_blocks.0.0", "out.2"}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("full", "attn-only")])
def test_sdxl_preset_files_name_no_time_embedding_and_import_back(preset, tmp_path):
    """The export's preset file selects what sd-scripts + LyCORIS' preset trains on the script's UNet: the time
    embedding (and conv_in/conv_out) on SD1/SD2, none of the root layers on SDXL; import recognises each file."""
    found = {}
    for family, sets in ((SD1, []), (SDXL, _sdxl("sdxl"))):
        original = resolve_config(EXAMPLE, [], sets + LYCORIS + ['network.algo="loha"',
                                                                f'network.lycoris_preset="{preset}"'])
        plan = build_plan(original)
        assert plan.model_family == family.name
        out = tmp_path / family.name
        write_export(out, build_export(original.config, plan))
        table = tomllib.loads((out / PRESET_FILE).read_text())
        found[family.name] = set(table["unet_target_name"])
        assert not found[family.name] & SDXL_ROOT_NAMES
        result = import_file(out / CONFIG_FILE, out / DATASET_FILE)
        assert result.unsupported == {}
        (tmp_path / "back.toml").write_text(render_toml(result), encoding="utf-8")
        assert resolve_config(tmp_path / "back.toml").config.network == original.config.network
    convs = preset == "unet-convblock-only"
    assert found == {"sd1": SD_CONV_IN_OUT if convs else SD_TIME_EMBEDDING, "sdxl": set()}


# LyCORIS networks on the released UNets (LoCon, conv_dim = 8 where the preset wraps 3x3 convs): README's table
# "Network options from the guides". SDXL: full-lin, attn-mlp, unet-transformer-only without the 4 time/add
# embedding layers, unet-convblock-only without conv_in/conv_out (see above).
RELEASED_PRESET_COUNTS = {
    "full": ((278, 72), (788, 264)), "full-lin": ((230, 72), (750, 264)), "attn-mlp": ((194, 72), (722, 264)),
    "attn-only": ((128, 48), (560, 176)), "unet-transformer-only": ((194, 0), (722, 0)),
    "unet-convblock-only": ((88, 0), (66, 0)),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_counts_on_the_released_unets(preset, tmp_path):
    from loracli.config.schema import NetworkSection
    from loracli.network_layout import model_configs, planned_modules

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")  # only its existence matters: the family's own layout is used
    for family, counts in zip((SD1, SDXL), RELEASED_PRESET_COUNTS[preset]):
        options = dict(algo="locon", network_module="lycoris.kohya", lycoris_preset=preset)
        if targets_for("locon", preset, family)["enable_conv"]:
            options["conv_dim"] = 8
        modules = planned_modules(NetworkSection(**options), family,
                                  *model_configs(str(checkpoint), "single-file", family))
        assert (sum(m.part == "unet" for m in modules), sum(m.part != "unet" for m in modules)) == counts


def test_full_size_counts_are_the_ones_sd_scripts_prints(tmp_path):
    """Single files lay out the released UNets: SD1.5 192 UNet + 72 text-encoder modules (LoCon: 278 UNet),
    SDXL 722 + 72 + 192, the counts sd-scripts prints for them."""
    from loracli.config.schema import NetworkSection
    from loracli.network_layout import model_configs, planned_modules

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")  # only its existence matters: the family's own layout is used
    for family, kw, unet, te in ((SD1, {}, 192, 72), (SD1, {"conv_dim": 8}, 278, 72), (SDXL, {}, 722, 72 + 192)):
        modules = planned_modules(NetworkSection(**kw), family, *model_configs(str(checkpoint), "single-file", family))
        assert (sum(m.part == "unet" for m in modules), sum(m.part != "unet" for m in modules)) == (unet, te)
