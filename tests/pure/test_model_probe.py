"""The model probe: family and kind of a base model from names, configs and headers (no torch, no weights)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from loracli.config.schema import ModelSection
from loracli.errors import ConfigError, DatasetError
from loracli.model_probe import ModelNotFound, ModelProbe, probe_model, resolve_family

KEY = "model.pretrained_model_name_or_path"


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None,
                      cut: int = 0) -> Path:
    """A real safetensors file (F16 zeros; sparse on disk), optionally cut `cut` bytes short."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset - cut)
    return path


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_KEY = "first_stage_model.encoder.conv_in.weight"


def sd1_file(path: Path, in_channels: int = 4) -> Path:
    return write_safetensors(path, {UNET_IN: (8, in_channels, 3, 3), VAE_KEY: (8, 3, 3, 3),
                                    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (16, 8)})


def sd2_file(path: Path) -> Path:
    return write_safetensors(path, {UNET_IN: (8, 4, 3, 3), VAE_KEY: (8, 3, 3, 3),
                                    "cond_stage_model.model.token_embedding.weight": (16, 8)})


def sdxl_file(path: Path, in_channels: int = 4, adm: int = 2816) -> Path:
    return write_safetensors(path, {
        UNET_IN: (8, in_channels, 3, 3), VAE_KEY: (8, 3, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (4, adm),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (16, 8),
        "conditioner.embedders.1.model.token_embedding.weight": (16, 8),
    })


def refiner_file(path: Path) -> Path:
    return write_safetensors(path, {
        UNET_IN: (8, 4, 3, 3), VAE_KEY: (8, 3, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (4, 2560),
        "conditioner.embedders.0.model.token_embedding.weight": (16, 8),
    })


def diffusers_folder(root: Path, cls: str = "StableDiffusionPipeline", *, xl: bool = False, refiner: bool = False,
                     in_channels: int = 4, hidden_act: str = "quick_gelu", weights: str = "plain") -> Path:
    """A diffusers pipeline folder with configs and (empty) weight files: enough for the probe."""
    parts = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "tokenizer": "CLIPTokenizer", "scheduler": "EulerDiscreteScheduler"}
    if xl:
        parts |= {"text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"}
    index: dict = {"_class_name": cls, "_diffusers_version": "0.30.0"}
    for name, klass in parts.items():
        index[name] = ["diffusers" if name in ("unet", "vae", "scheduler") else "transformers", klass]
    if refiner:
        index["text_encoder"] = index["tokenizer"] = [None, None]
        index["requires_aesthetics_score"] = True
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    unet = {"in_channels": in_channels, "cross_attention_dim": 96 if xl else 32}
    if xl:
        unet["addition_embed_type"] = "text_time"
    configs = {"unet": unet, "vae": {}, "text_encoder": {"hidden_act": hidden_act, "hidden_size": 32},
               "text_encoder_2": {"hidden_act": "gelu"}, "tokenizer": None, "tokenizer_2": None, "scheduler": None}
    for name in parts:
        if refiner and name in ("text_encoder", "tokenizer"):
            continue
        folder = root / name
        folder.mkdir()
        if configs[name] is not None:
            (folder / "config.json").write_text(json.dumps(configs[name]))
        if name in ("unet", "vae") and weights != "none":
            (folder / ("diffusion_pytorch_model.fp16.safetensors" if weights == "variant" else
                       "diffusion_pytorch_model.safetensors")).write_bytes(b"")
        if name.startswith("text_encoder") and weights != "none":
            (folder / "model.safetensors").write_bytes(b"")
    return root


# --- names and folders ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "family"), [("tiny:sd15", "sd1"), ("tiny:sdxl", "sdxl")])
def test_tiny_models_by_name(name, family):
    probe = probe_model(name)
    assert (probe.path, probe.family, probe.kind) == (name, family, "tiny")
    with pytest.raises(ConfigError, match="unknown built-in model; use tiny:sd15 or tiny:sdxl"):
        probe_model("tiny:sd3")


@pytest.mark.parametrize(("kwargs", "family", "evidence"), [
    ({"cls": "StableDiffusionXLPipeline", "xl": True}, "sdxl", "model_index.json (StableDiffusionXLPipeline)"),
    ({"cls": "DiffusionPipeline", "xl": True}, "sdxl", "model_index.json (text_encoder_2)"),
    ({}, "sd1", "CLIP ViT-L"),
    ({"hidden_act": "gelu"}, "sd2", "OpenCLIP ViT-H"),
])
def test_diffusers_folder_family(tmp_path, kwargs, family, evidence):
    folder = diffusers_folder(tmp_path / "m", **kwargs)
    probe = probe_model(str(folder))
    assert (probe.family, probe.kind, probe.path) == (family, "diffusers", str(folder))
    assert evidence in probe.detected_by


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"cls": "StableDiffusionXLImg2ImgPipeline", "xl": True, "refiner": True}, ConfigError, "SDXL refiner"),
    ({"cls": "StableDiffusionXLInpaintPipeline", "xl": True, "in_channels": 9}, ConfigError,
     "SDXL inpainting model (UNet in_channels 9"),
    ({"cls": "StableDiffusionInpaintPipeline", "in_channels": 9}, ConfigError, "an inpainting model"),
    ({"cls": "StableDiffusionInstructPix2PixPipeline", "in_channels": 8}, ConfigError, "takes 8 channels"),
    ({"cls": "FluxPipeline"}, ConfigError, "a FluxPipeline model"),
    ({"weights": "none"}, DatasetError, "no weights in unet/, vae/, text_encoder/"),
    ({"weights": "variant"}, DatasetError, "only variant weights (diffusion_pytorch_model.fp16.safetensors)"),
])
def test_diffusers_folders_that_cannot_train(tmp_path, kwargs, error, words):
    folder = diffusers_folder(tmp_path / "m", **kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        probe_model(str(folder))
    assert str(info.value).startswith(f"{KEY}: {folder}") and "\n" not in str(info.value)


def test_broken_diffusers_folders(tmp_path):
    folder = diffusers_folder(tmp_path / "xl", cls="StableDiffusionXLPipeline", xl=True)
    import shutil

    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(DatasetError, match="missing component folder\\(s\\): tokenizer_2"):
        probe_model(str(folder))
    (folder / "model_index.json").write_text('{"_class_name": ')
    with pytest.raises(DatasetError, match="model_index.json is not readable JSON"):
        probe_model(str(folder))
    (tmp_path / "unet-only").mkdir()
    (tmp_path / "unet-only" / "config.json").write_text("{}")
    with pytest.raises(DatasetError, match="a single component's folder \\(no model_index.json\\)"):
        probe_model(str(tmp_path / "unet-only"))


# --- single files -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("writer", "family", "evidence"), [
    (sd1_file, "sd1", "cond_stage_model.transformer"), (sd2_file, "sd2", "cond_stage_model.model"),
    (sdxl_file, "sdxl", "conditioner.embedders"),
])
def test_single_file_family_from_the_header(tmp_path, writer, family, evidence):
    path = writer(tmp_path / "m.safetensors")
    probe = probe_model(str(path))
    assert (probe.family, probe.kind, probe.path) == (family, "single-file", str(path))
    assert evidence in probe.detected_by


def test_single_files_that_cannot_train(tmp_path):
    lora = write_safetensors(tmp_path / "lora.safetensors", {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 8), "lora_unet_input_blocks_4_1_proj_in.alpha": ()})
    vae = write_safetensors(tmp_path / "vae.safetensors", {"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3),
                                                           "decoder.up.0.block.0.conv1.weight": (8, 8, 3, 3)})
    cases = [
        (refiner_file(tmp_path / "refiner.safetensors"), ConfigError, "SDXL refiner .*adm_in_channels 2560"),
        (sdxl_file(tmp_path / "xl-inpaint.safetensors", in_channels=9), ConfigError,
         "an SDXL inpainting model \\(UNet input_blocks.0.0 has 9 input channels"),
        (sd1_file(tmp_path / "inpaint.safetensors", in_channels=9), ConfigError, "this is an inpainting model"),
        (lora, DatasetError, "LoRA/LyCORIS file, not a base model.*network.network_weights"),
        (vae, DatasetError, "a VAE-only file"),
    ]
    for path, error, words in cases:
        with pytest.raises(error, match=words) as info:
            probe_model(str(path))
        assert str(info.value).startswith(f"{KEY}: {path}") and "\n" not in str(info.value), path


@pytest.mark.parametrize(("name", "content", "words"), [
    ("cut.safetensors", None, "truncated file"),
    ("empty.safetensors", b"", "shorter than the 8-byte header length"),
    ("junk.safetensors", b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}", "header is not JSON"),
    ("huge.safetensors", b"\xff" * 16, "not a plausible header length"),
])
def test_corrupt_and_truncated_files_are_exit_3(tmp_path, name, content, words):
    path = tmp_path / name
    if content is None:
        sdxl_file(path)
        data = path.read_bytes()
        path.write_bytes(data[:-10])  # a download cut short
    else:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=words) as info:
        probe_model(str(path))
    assert info.value.exit_code == 3 and str(info.value).startswith(f"{KEY}: {path}")


def test_pickles_are_not_read_and_missing_paths_are_exit_3(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even a pickle")  # never opened
    probe = probe_model(str(ckpt))
    assert (probe.family, probe.kind) == (None, "pickle")
    for missing in (str(tmp_path / "nope.ckpt"), str(tmp_path / "nope"), "models/sd15", "x" * 5000, "a\x00b"):
        with pytest.raises(ModelNotFound, match="no such file or folder") as info:
            probe_model(missing)
        assert info.value.exit_code == 3


# --- model ids from the Hugging Face cache ----------------------------------------------------------

def cache_snapshot(cache: Path, model_id: str, commit: str = "0123456789abcdef0123") -> Path:
    repo = cache / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_model_id_resolves_from_the_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache_snapshot(cache, "stabilityai/stable-diffusion-xl-base-1.0")
    diffusers_folder(snapshot, "StableDiffusionXLPipeline", xl=True)
    # An older snapshot beside it: refs/main decides.
    diffusers_folder(snapshot.parent / "fedcba9876", "StableDiffusionPipeline")
    probe = probe_model("stabilityai/stable-diffusion-xl-base-1.0")
    assert (probe.path, probe.family, probe.kind) == (str(snapshot), "sdxl", "diffusers")
    assert "Hugging Face cache, revision main (0123456789ab)" in probe.source and str(snapshot) in probe.source


def test_hf_home_is_honoured_and_absent_ids_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    diffusers_folder(cache_snapshot(tmp_path / "hf" / "hub", "org/sd15"), "StableDiffusionPipeline")
    assert probe_model("org/sd15").family == "sd1"
    with pytest.raises(ModelNotFound) as info:
        probe_model("org/missing-model")
    text = str(info.value)
    assert "not in the Hugging Face cache" in text and str(tmp_path / "hf" / "hub") in text
    assert "huggingface-cli download org/missing-model" in text and "--local-dir" in text


def test_cached_snapshot_without_a_pipeline_points_at_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = cache_snapshot(tmp_path, "someone/pony-single")
    snapshot.mkdir(parents=True)
    sdxl_file(snapshot / "pony.safetensors")
    with pytest.raises(DatasetError, match="not a diffusers pipeline.*set the path to the checkpoint file in it"):
        probe_model("someone/pony-single")


# --- the family: flags against what was detected ----------------------------------------------------

def model(**flags) -> ModelSection:
    return ModelSection(pretrained_model_name_or_path="x", **flags)


def probe(family: str | None, kind: str = "single-file") -> ModelProbe:
    return ModelProbe("x", family, kind, "safetensors header (...)")


@pytest.mark.parametrize(("flags", "found", "family", "how"), [
    ({}, "sdxl", "sdxl", "detected from safetensors header"),
    ({"sdxl": True}, "sdxl", "sdxl", "model.sdxl = true agrees"),
    ({}, "sd1", "sd1", "detected from"),
    ({"v2": True}, "sd2", "sd2", "detected from"),
    ({"sdxl": True}, None, "sdxl", "model.sdxl = true (a pickled checkpoint is not read before training)"),
    ({}, None, "sd1", "the default"),
])
def test_family_from_flags_and_detection(flags, found, family, how):
    choice = resolve_family(model(**flags), probe(found, "pickle" if found is None else "single-file"))
    assert choice.family.name == family and how in choice.how


@pytest.mark.parametrize(("flags", "found", "key", "words"), [
    ({"sdxl": False}, "sdxl", "model.sdxl", "is false but the model is SDXL"),
    ({"sdxl": True}, "sd1", "model.sdxl", "is true but the model is SD1.x"),
    ({"sdxl": True}, "sd2", "model.sdxl", "is true but the model is SD2.x"),
    ({"v2": True, "sdxl": True}, "sdxl", "model.v2", "v2 = true and sdxl = true"),
    ({"v2": True}, "sdxl", "model.v2", "is true but the model is SDXL"),
    ({"v2": True}, "sd1", "model.v2", "is true but the model is SD1.x"),
    ({}, "sd2", "model.v2", "is false but the model is an SD2.x checkpoint"),
])
def test_contradictions_name_the_key_and_what_was_detected(flags, found, key, words):
    with pytest.raises(ConfigError) as info:
        resolve_family(model(**flags), probe(found))
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{key}: ") and words in str(info.value)
    if key != "model.v2" or "sdxl = true" not in words:
        assert "safetensors header" in str(info.value)  # says how it was detected


def test_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    path = sd1_file(tmp_path / "locked.safetensors")
    real_open = Path.open

    def deny(self, *args, **kwargs):  # chmod 000 does not stop root, so fail the open itself
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(DatasetError, match="cannot read the file \\(Permission denied\\)") as info:
        probe_model(str(path))
    assert info.value.exit_code == 3 and str(path) in str(info.value)
