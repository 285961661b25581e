"""Pixels as sd-scripts feeds them: unbucketed crops, loss masks (alpha and mask images) through data,
latent cache and loss. Expected values are made by hand here (numpy crops, block means), never by
calling the code under test."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loracli.config.loader import resolve_config
from loracli.plan import build_plan
from loracli.run.conditioning import size_time_ids
from loracli.run.data import ALPHA, ExampleLoader, load_example, mask_source, original_size, stack_masks
from loracli.run.latents import LatentCache
from loracli.run.step import diffusion_loss

CONFIG = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[dataset]
train_data_dir = "data"
resolution = 64
[training]
max_train_steps = 2
"""


def _noise(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def _cutout(tmp_path: Path, w: int = 96, h: int = 80) -> np.ndarray:
    """An RGBA character cut-out: noise colours, the left half fully transparent, a soft band in the middle."""
    rgba = _noise(h, w, 4, 1)
    rgba[:, :, 3] = 255
    rgba[:, : w // 2, 3] = 0
    rgba[:, w // 2: w // 2 + 8, 3] = 128
    (tmp_path / "data" / "1_x").mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "data" / "1_x" / "cut.png")
    return rgba


def test_unbucketed_image_is_cropped_not_resized(tmp_path):
    """enable_bucket = false, latents not cached: sd-scripts uses the file's pixels and crops at random."""
    rgba = _cutout(tmp_path)
    plan, _ = _alpha_plan(tmp_path, "random_crop = true")
    image = plan.images[0]
    assert tuple(image.bucket) == (64, 64) and tuple(image.resized) == (96, 80)  # plan numbers: one bucket
    draw = random.Random(7)
    x, y = draw.randint(0, 96 - 64), draw.randint(0, 80 - 64)
    pixels, mask = load_example(image, True, random.Random(7), None)
    assert mask is None
    assert np.array_equal(pixels, rgba[y:y + 64, x:x + 64, :3])  # a hand-made crop of the file, no resize


def test_sdxl_size_conditioning_of_an_unbucketed_crop(tmp_path):
    """sd-scripts' unbucketed pixel path: original_size = the cropped image's size, crop_ltrb = (0, 0, 0, 0)."""
    _cutout(tmp_path)
    plan, config = _alpha_plan(tmp_path, "random_crop = true")
    image = plan.images[0]
    assert original_size(image, config.dataset, latents_cached=False) == (64, 64)
    assert original_size(image, config.dataset, latents_cached=True) == (96, 80)  # the caching path's resize
    # (h, w) original, (top, left) crop, (h, w) target
    assert size_time_ids([(64, 64)], [(64, 64)], [False]).tolist() == [[64, 64, 0, 0, 64, 64]]


def test_cached_unbucketed_image_is_cover_resized_and_centre_cropped(tmp_path):
    """With cached latents sd-scripts' caching goes through its bucket manager: resize to cover, centre crop."""
    rgba = _cutout(tmp_path)
    plan, _ = _alpha_plan(tmp_path, "cache_latents = true")
    image = plan.images[0]
    # cover: scale 64/80 (the height is the short side against the square), int(96·0.8 + 0.5) = 77
    assert tuple(image.resized) == (77, 64) and tuple(image.crop_offset) == ((77 - 64) // 2, 0)
    pixels, _ = load_example(image, False, random.Random(0), None)
    by_hand = np.asarray(Image.fromarray(rgba[:, :, :3]).resize((77, 64), Image.BOX))[:, 6:70]
    assert np.array_equal(pixels, by_hand)


def _alpha_plan(tmp_path: Path, *lines: str, training: str = ""):
    text = CONFIG.replace('resolution = 64', "\n".join(("resolution = 64",) + lines))
    (tmp_path / "c.toml").write_text(text.replace("max_train_steps = 2", "max_train_steps = 2\n" + training))
    resolved = resolve_config(tmp_path / "c.toml")
    return build_plan(resolved), resolved.config


def test_alpha_mask_follows_crop_and_flip(tmp_path):
    rgba = _cutout(tmp_path)
    plan, config = _alpha_plan(tmp_path, "random_crop = true", "alpha_mask = true", "flip_aug = true")
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=3)
    seen = set()
    for step in range(12):
        batch = loader([0], 1, step)
        mask = batch.masks[0].numpy()
        pixels = ((batch.pixels[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
        if batch.flipped[0]:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        # find the crop in the file: the pixels are a crop, and the mask is the alpha of the same crop
        matches = [(x, y) for y in range(80 - 63) for x in range(96 - 63)
                   if np.array_equal(rgba[y:y + 64, x:x + 64, :3], pixels)]
        assert len(matches) == 1
        x, y = matches[0]
        assert np.array_equal(mask, rgba[y:y + 64, x:x + 64, 3].astype(np.float32) / 255.0)
        seen.add(batch.flipped[0])
    assert seen == {False, True}


def test_conditioning_mask_is_the_red_channel_resized_with_the_image(tmp_path, make_image):
    (tmp_path / "data" / "1_x").mkdir(parents=True)
    Image.fromarray(_noise(80, 96, 3, 2)).save(tmp_path / "data" / "1_x" / "a.png")
    mask_rgb = _noise(80, 96, 3, 3)
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask_rgb).save(tmp_path / "masks" / "a.png")
    plan, config = _alpha_plan(tmp_path, "enable_bucket = true", "min_bucket_reso = 64", "max_bucket_reso = 128",
                               'conditioning_data_dir = "masks"', training="masked_loss = true")
    image = plan.images[0]
    assert image.mask == str(tmp_path / "masks" / "a.png")
    source = mask_source(image, config.dataset)
    _, mask = load_example(image, False, random.Random(0), source)
    (x, y), (bw, bh) = image.crop_offset, image.bucket
    red = Image.fromarray(mask_rgb[:, :, 0]).resize(tuple(image.resized), Image.BOX if image.resized[0] < 96
                                                     else Image.LANCZOS)
    assert np.array_equal(mask, np.asarray(red)[y:y + bh, x:x + bw])


def _sd_scripts_masked_mse(pred, target, mask_hw):
    """train_network.py: loss = mse(reduction none); apply_masked_loss (area-resize the mask to the latent size,
    multiply); mean over all but the batch; then the batch mean. Area resize by 8 = the mean of each 8x8 block."""
    b, h, w = mask_hw.shape
    small = mask_hw.reshape(b, h // 8, 8, w // 8, 8).mean(dim=(2, 4)).unsqueeze(1)
    loss = (pred - target) ** 2 * small
    return loss.mean(dim=(1, 2, 3)).mean()


def test_masked_loss_is_sd_scripts_formula():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.rand(2, 64, 64, generator=gen)
    ours = diffusion_loss(pred, target, torch.tensor([10, 500]), None, [1.0, 1.0], None, False, mask=mask)
    assert torch.allclose(ours, _sd_scripts_masked_mse(pred, target, mask), rtol=1e-6)
    plain = diffusion_loss(pred, target, torch.tensor([10, 500]), None, [1.0, 1.0], None, False)
    assert not torch.allclose(ours, plain)


def test_transparent_half_gets_no_gradient(tmp_path):
    """An RGBA cut-out through the loader and the loss: the prediction's gradient is zero where the image is
    transparent (the left half of the latent), and not zero where it is opaque."""
    _cutout(tmp_path, 64, 64)
    plan, config = _alpha_plan(tmp_path, "alpha_mask = true")
    batch = ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=0)([0], 1, 0)
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    loss = diffusion_loss(pred, torch.zeros(1, 4, 8, 8), torch.tensor([100]), None, [1.0], None, False,
                          mask=batch.masks)
    loss.backward()
    assert torch.count_nonzero(pred.grad[..., :4]) == 0  # columns 0-31 of 64 px: alpha 0
    assert torch.all(pred.grad[..., 5:] != 0)  # opaque
    assert torch.all(pred.grad[..., 4] != 0)  # the half-transparent band counts half


def test_rgb_image_under_alpha_mask_is_fully_masked_in(tmp_path, make_image):
    make_image(tmp_path / "data" / "1_x" / "rgb.png", 64, 64)
    plan, config = _alpha_plan(tmp_path, "alpha_mask = true")
    assert [w["code"] for w in plan.warnings if w["code"] == "W60"] == ["W60"]
    _, mask = load_example(plan.images[0], False, random.Random(0), ALPHA)
    assert (mask == 255).all()
    assert stack_masks([None, mask], (64, 64))[0].eq(1).all()  # an unmasked image in a masked batch: ones


class _PoolVAE:
    """A stand-in VAE: 8x8 average pooling (no model needed to test what the cache stores)."""
    device, dtype, config = torch.device("cpu"), torch.float32, {"kind": "pool"}

    def encode(self, pixels):
        latents = torch.nn.functional.avg_pool2d(pixels, 8)
        return type("Out", (), {"latent_dist": type("Dist", (), {"sample": lambda self, g=None: latents})()})()


def test_latent_cache_carries_the_mask_in_memory_and_on_disk(tmp_path):
    rgba = _cutout(tmp_path, 64, 64)
    plan, config = _alpha_plan(tmp_path, "alpha_mask = true", "flip_aug = true", "cache_latents_to_disk = true")
    sources = [mask_source(im, config.dataset) for im in plan.images]
    alpha = torch.from_numpy(rgba[:, :, 3].astype(np.float32) / 255.0)
    for expected_encoded in (2, 0):  # the second cache reads both files (and their masks) from disk
        cache = LatentCache(plan, True, tmp_path / "lat", sources)
        cache.fill(_PoolVAE(), 1.0, "pool", 1, 0)
        assert cache.encoded == expected_encoded
        assert torch.equal(cache.mask_batch([0], [False])[0], alpha)
        assert torch.equal(cache.mask_batch([0], [True])[0], alpha.flip(-1))
    plain = LatentCache(plan, True, tmp_path / "lat", None)  # no mask asked: no mask given
    plain.fill(_PoolVAE(), 1.0, "pool", 1, 0)
    assert plain.mask_batch([0], [False]) is None


@pytest.mark.parametrize("flip", [False, True])
def test_loader_flip_mirrors_pixels_and_mask_together(tmp_path, flip):
    rgba = _cutout(tmp_path, 64, 64)
    plan, config = _alpha_plan(tmp_path, "alpha_mask = true", "flip_aug = true")
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, True, seed=0)
    batch = next(b for b in (loader([0], 1, s) for s in range(20)) if b.flipped[0] == flip)
    opaque = rgba[:, :, 3] > 0
    expected = opaque[:, ::-1] if flip else opaque
    assert np.array_equal(batch.masks[0].numpy() > 0, expected)


def test_a_mask_removed_after_planning_is_named(tmp_path):
    from loracli.errors import DatasetError

    (tmp_path / "data" / "1_x").mkdir(parents=True)
    Image.fromarray(_noise(64, 64, 3, 2)).save(tmp_path / "data" / "1_x" / "a.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.png")
    plan, config = _alpha_plan(tmp_path, 'conditioning_data_dir = "masks"', training="masked_loss = true")
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(DatasetError) as err:
        load_example(plan.images[0], False, random.Random(0), mask_source(plan.images[0], config.dataset))
    assert str(tmp_path / "masks" / "a.png") in str(err.value)
    with pytest.raises(DatasetError):
        LatentCache(plan, False, tmp_path / "lat", [plan.images[0].mask]).fill(_PoolVAE(), 1.0, "pool", 1, 0)
