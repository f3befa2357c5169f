"""l4export.image (numpy + Pillow) against transformers' Llama 4 image processor and processor, bit for bit.

The oracle runs in a subprocess with torchvision installed beside it (tests/hf_image.py: why, and how); it never
skips. Images are made here: gradients with noise (so that resampling errors show), odd aspect ratios, one tile,
several tiles + the global tile, more tiles than max_patches allows, and the modes transformers converts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import hf_image
from l4export.errors import ImageError
from l4export.image import best_fit, load_image, preprocess, supported_resolutions


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 3 * y) % 256], -1).astype(np.uint8)
    return a // 2 + np.random.default_rng(seed).integers(0, 100, a.shape, dtype=np.uint8)


SIZES = {  # (height, width): what each exercises with 56-pixel tiles, 16 at most
    "one-tile": (40, 50),  # smaller than a tile: upscaled into one
    "exact-tile": (56, 56),
    "wide": (90, 200),  # 1 x 4 canvas + global tile
    "tall": (300, 70),
    "tiny": (3, 5),
    "odd": (113, 57),
    "large": (1000, 990),  # would need 18 x 18 tiles: capped at the 4 x 4 canvas
    "line": (1, 2000),  # 1-pixel high: still resized and padded like transformers
    "big-real": (700, 1000),  # with 336-pixel tiles (Scout's): 2 x 3 canvas
}


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: Image.fromarray(gradient(h, w, n)) for n, (name, (h, w)) in enumerate(SIZES.items())}


@pytest.mark.parametrize("tile,max_patches", [(56, 16), (336, 16), (56, 4)])
def test_pixel_values_equal_transformers(images, tile, max_patches):
    """Bit-exact pixel_values (on transformers' bf16 grid) and tile grids, for every size."""
    theirs = hf_image.process(list(images.values()), tile, max_patches)
    for (name, im), (pixels, grid) in zip(images.items(), theirs):
        ours = preprocess(im, tile, max_patches)
        assert ours.grid == grid, name
        assert ours.pixel_values.shape == pixels.shape, name
        assert np.array_equal(ours.pixel_values, pixels), (name, float(np.abs(ours.pixel_values - pixels).max()))
    grids = {name: preprocess(im, 56, 16).grid for name, im in images.items()}
    assert grids["one-tile"] == (1, 1) and grids["wide"][0] * grids["wide"][1] > 1  # both layouts are covered
    assert preprocess(images["large"], 56, 16).num_tiles == 16 + 1  # capped at max_patches, + the global tile


def test_image_modes_convert_like_transformers():
    """Grayscale, grayscale + alpha, RGBA, palette with transparency and CMYK PIL images; an HxWx4 array.
    (transformers does not take an HxW array in a list of images; ours repeats it into RGB, as it does one channel.)"""
    rgb = gradient(70, 90, 7)
    rgba = np.concatenate([rgb, np.linspace(0, 255, 70 * 90).reshape(70, 90, 1).astype(np.uint8)], -1)
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 3
    cases = [Image.fromarray(rgb).convert("L"), Image.fromarray(rgba).convert("LA"), Image.fromarray(rgba), pal,
             Image.fromarray(rgb).convert("CMYK"), rgba]
    theirs = hf_image.process(cases, 56, 16)
    for n, (im, (pixels, _)) in enumerate(zip(cases, theirs)):
        assert np.array_equal(preprocess(im, 56, 16).pixel_values, pixels), n
    gray = rgb[..., 0].copy()
    assert np.array_equal(load_image(gray), np.repeat(gray[..., None], 3, axis=-1))


def test_token_layout_equals_llama4processor(export, scout, images):
    """input_ids of a prompt with a one-tile and a multi-tile image equal Llama4Processor's (tokens + layout)."""
    from l4export.runtimes import load_runtime

    rt = load_runtime(export(scout, "onnx"))
    text = "<|image|>What differs from<|image|>?"
    group = [images["one-tile"], images["wide"]]
    ours, feats = rt.prompt_ids(text, group, add_bos=False)
    assert ours == hf_image.input_ids(text, group, 56, 16, rt.path / "tokenizer.json")
    rows, cols = preprocess(images["wide"], 56, 16).grid
    assert rows * cols > 1 and len(feats) == sum(i == rt.vision.image_token_id for i in ours) == (1 + rows * cols + 1) * 4


def test_canvas_choice_and_ties():
    res = supported_resolutions(16, 336)
    assert len(res) == sum(1 for n in range(1, 17) for d in range(1, n + 1) if n % d == 0)
    assert best_fit(336, 336, res) == (336, 336)
    assert best_fit(200, 300, res) == (336, 336)  # upscaling possible: the smallest scale >= 1, the smaller area
    assert best_fit(100, 2000, res) == (336, 2016)  # 1 x 6 tiles: the smallest upscale (1.008)
    assert best_fit(100, 20000, res) == (336, 5376)  # no upscale possible: the mildest downscale


def test_bad_images_are_one_line_errors(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    Image.fromarray(gradient(64, 64)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = [(not_image, "not an image file"), (tmp_path / "cut.png", "truncated or corrupt"),
             (tmp_path / "missing.png", "no such image file"), (np.zeros((0, 4, 3), np.uint8), "4x0 pixels"),
             (np.zeros((4, 4, 3), np.float32), "uint8"), (np.zeros((4, 4, 2), np.uint8), "shape"), (3, "not an image")]
    for image, msg in cases:
        with pytest.raises(ImageError, match=msg) as err:
            load_image(image)
        assert "\n" not in str(err.value)
