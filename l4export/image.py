"""Llama 4 image preprocessing with numpy and Pillow: a port of transformers' ``Llama4ImageProcessor`` (its
torchvision backend) that gives the same ``pixel_values``, and of ``Llama4Processor``'s image token layout.

    image (path, PIL image, HWC/HW array)
      -> RGB uint8 [H, W, 3]          alpha composited on white, grayscale/CMYK/palette converted (as transformers)
      -> best-fit canvas               among the (rows x cols) tile grids with rows * cols <= max_patches
      -> aspect-preserving resize      bilinear with antialias, torch's uint8 arithmetic (see ``resize``)
      -> pad bottom/right with 0       to the canvas
      -> rescale + normalize in bf16   as the original implementation: 2 * bf16(bf16(x / 255) - 0.5)
      -> row-major tiles [n, 3, t, t]  + a global tile (the whole image resized to t x t) last when n > 1

Why a port rather than transformers: its processor needs torch and torchvision (whose registry wheels do not load
beside a CPU torch), and the runtimes run with numpy + the backend only. Parity is exact, not approximate:
tests/test_image.py compares the two bit for bit on the bf16 grid.

Resize arithmetic: torchvision resizes uint8 images with torch's native uint8 kernel (a port of Pillow-SIMD):
per-axis triangle-filter weights in float64, stretched by the scale when downsampling, normalized, then rounded to
int16 fixed point at the largest precision (<= 22 bits) that keeps the largest weight under 2^15; each output is
``(sum(pixel * weight) + 2^(p-1)) >> p`` clamped to 0..255, horizontal pass first (every input row), then vertical.
Pillow's own resize uses 22 bits always and differs by 1 in up to a few percent of downsampled pixels.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageError, UsageError

F32 = np.float32
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 x its warning threshold)


# ---- loading -----------------------------------------------------------------------------------------------
def load_image(image: Any, where: str = "image") -> np.ndarray:
    """RGB uint8 [H, W, 3] from a path, a PIL image or an array ([H, W], [H, W, 1|3|4] uint8), converted as
    transformers converts it. Raises ImageError (one line: what, where, how to fix)."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("images need Pillow: pip install 'l4export[vision]'") from None

    if isinstance(image, (str, Path)):
        image = _open(Path(image))
        where = str(image.filename) if getattr(image, "filename", None) else where
    if isinstance(image, Image.Image):
        rgb = _pil_rgb(image, where)
    elif isinstance(image, np.ndarray):
        rgb = _array_rgb(image, where)
    else:
        raise ImageError(f"{where}: {type(image).__name__} is not an image; pass a file path, a PIL image or an "
                         "[H, W, 3] uint8 array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{where}: the image has {rgb.shape[1]}x{rgb.shape[0]} pixels; pass an image with at "
                         "least one pixel")
    return rgb


def _open(path: Path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(f"{path}: {img.width}x{img.height} pixels is more than Pillow's limit of {MAX_PIXELS}; "
                             "downscale the image first")
        img.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read; pass a PNG, JPEG, WebP, GIF or BMP file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode the image ({err}); the file is truncated or corrupt") from None
    return ImageOps.exif_transpose(img)  # as transformers' load_image (paths and URLs only)


def _pil_rgb(img, where: str) -> np.ndarray:
    """transformers' convert_to_rgb for PIL images: transparency is composited on white."""
    from PIL import Image

    if img.width == 0 or img.height == 0:
        return np.zeros((img.height, img.width, 3), np.uint8)
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.array(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ImageError(f"{where}: cannot convert the {img.mode} image to RGB ({err})") from None


def _array_rgb(a: np.ndarray, where: str) -> np.ndarray:
    """transformers' path for arrays: grayscale repeated, RGBA composited on white in float32."""
    if a.dtype != np.uint8:
        raise ImageError(f"{where}: array of {a.dtype}; pass uint8 pixels (0..255)")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{where}: array of shape {list(a.shape)}; pass [H, W], [H, W, 3] or [H, W, 4]")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        x = a.astype(F32) * F32(1.0 / 255)  # torchvision's to_dtype(float32, scale=True): times 1/255, not / 255
        rgb = x[..., :3] * x[..., 3:] + (F32(1) - x[..., 3:])
        return (rgb * F32(255.999)).astype(np.uint8)  # and back: to_dtype(uint8, scale=True)
    return np.ascontiguousarray(a)


# ---- resize ------------------------------------------------------------------------------------------------
def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Taps for one axis: first input index [n_out], int weights [n_out, K] and their precision (bits)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0  # bilinear: half-width 1, stretched when downsampling (antialias)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    k = int(math.ceil(support)) * 2 + 1
    first = np.zeros(n_out, np.int64)
    w = np.zeros((n_out, k), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int(): C's truncation toward zero
        size = min(int(center + support + 0.5), n_in) - lo
        x = (np.arange(size) + lo - center + 0.5) * inv
        row = np.maximum(0.0, 1.0 - np.abs(x))
        total = row.sum()
        w[i, :size] = row / total if total != 0.0 else row
        first[i] = lo
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return first, np.floor(0.5 + w * (1 << precision)).astype(np.int32), precision


def _resize_axis(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resize uint8 [H, W, C] along ``axis`` (1: width, 0: height) with the fixed-point taps."""
    src = np.moveaxis(img, axis, 0)  # [n_in, other, C]
    first, w, p = _axis_weights(src.shape[0], n_out)
    idx = np.minimum(first[:, None] + np.arange(w.shape[1]), src.shape[0] - 1)  # [n_out, K]; extra taps weigh 0
    out = np.empty((n_out,) + src.shape[1:], np.uint8)
    step = max(1, (1 << 22) // max(1, w.size * src.shape[2]))  # bound the gathered block to ~16 MB of int32
    for a in range(0, src.shape[1], step):
        block = src[:, a : a + step].astype(np.int32)[idx]  # [n_out, K, b, C]
        acc = np.einsum("okbc,ok->obc", block, w) + (1 << (p - 1))
        out[:, a : a + step] = np.clip(acc >> p, 0, 255)
    return np.moveaxis(out, 0, axis)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear antialiased resize of uint8 [H, W, C], as torchvision gives it for uint8 images on CPU."""
    if img.shape[1] != width:
        img = _resize_axis(img, width, 1)
    if img.shape[0] != height:
        img = _resize_axis(img, height, 0)
    return np.ascontiguousarray(img)


# ---- canvas ------------------------------------------------------------------------------------------------
def supported_resolutions(max_patches: int, tile: int) -> list[tuple[int, int]]:
    """Every (rows * tile, cols * tile) with rows * cols <= max_patches, in transformers' order (ties break on it)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_patches, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[rows / (n // rows)].append((rows, n // rows))
    return [(r * tile, c * tile) for grids in by_ratio.values() for r, c in grids]


def best_fit(height: int, width: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas: the smallest upscale (>= 1) if any, else the mildest downscale; ties go to the smaller area.
    Scales are float32, as transformers computes them (int64 tensors divided by ints)."""
    res = np.array(resolutions, np.int64)
    scales = np.minimum(res[:, 1].astype(F32) / F32(width), res[:, 0].astype(F32) / F32(height))
    up = scales[scales >= 1]
    chosen = res[scales == (up.min() if up.size else scales[scales < 1].max())]
    h, w = chosen[int(np.argmin(chosen[:, 0] * chosen[:, 1]))]
    return int(h), int(w)


def fit_size(height: int, width: int, canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """The aspect-preserving size inside the canvas (never upscaled past max(side, tile)).

    Mirrors transformers' arithmetic exactly: a target side that comes from the canvas tensor (the image is larger
    than the canvas on that side) divides in float32, one that is a Python int in float64."""
    targets = []
    for side, limit in ((height, canvas[0]), (width, canvas[1])):
        bound = max(side, tile)
        targets.append((limit, True) if limit < bound else (bound, False))  # (value, is a float32 tensor)
    (th, th32), (tw, tw32) = targets

    def div(t: int, is32: bool, n: int) -> float:
        return float(F32(t) / F32(n)) if is32 else t / n

    sw, sh = div(tw, tw32, width), div(th, th32, height)
    if th32 or tw32:  # a comparison with a float32 tensor happens in float32
        less = F32(sw) < F32(sh)
    else:
        less = sw < sh
    if less:
        new_w, new_h = tw, min(_floor(height, sw, tw32), th)
    else:
        new_h, new_w = th, min(_floor(width, sh, th32), tw)
    return max(new_h, 1), max(new_w, 1)


def _floor(n: int, scale: float, is32: bool) -> int:
    return int(math.floor(F32(n) * F32(scale))) if is32 else math.floor(n * scale)


# ---- normalize, tile ----------------------------------------------------------------------------------------
def bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), kept as float32: torch's float -> bfloat16 rounding
    for the finite values here, in numpy alone."""
    bits = np.ascontiguousarray(x, F32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(F32)


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] on the bf16 grid: transformers rescales and normalizes in bfloat16
    (mean = std = 0.5): 2 * bf16(bf16(x * f32(1/255)) - 0.5)."""
    x = bf16(img.astype(F32) * F32(1 / 255))
    x = bf16(x - F32(0.5)) * F32(2)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # float32 [tiles, 3, tile, tile]: rows x cols tiles, row-major, + the global tile
    grid: tuple[int, int]  # (rows, cols) of the canvas; one tile: (1, 1)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def preprocess(image: Any, tile: int = 336, max_patches: int = 16, where: str = "image") -> ProcessedImage:
    """One image -> its tiles, as ``Llama4ImageProcessor(size=tile, max_patches=max_patches)``."""
    rgb = load_image(image, where)
    h, w = rgb.shape[:2]
    canvas = best_fit(h, w, supported_resolutions(max_patches, tile))
    nh, nw = fit_size(h, w, canvas, tile)
    padded = np.zeros((canvas[0], canvas[1], 3), np.uint8)
    padded[:nh, :nw] = resize(rgb, nh, nw)
    rows, cols = canvas[0] // tile, canvas[1] // tile
    x = normalize(padded)  # [3, rows*t, cols*t]
    tiles = x.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        tiles = np.concatenate([tiles, normalize(resize(rgb, tile, tile))[None]])
    return ProcessedImage(np.ascontiguousarray(tiles), (rows, cols))


# ---- token layout --------------------------------------------------------------------------------------------
IMAGE_PLACEHOLDER = "<|image|>"  # one per image in a prompt (what Llama 4's chat template writes for an image)
IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>")


@dataclass(frozen=True)
class ImageTokenIds:
    start: int  # <|image_start|>
    end: int  # <|image_end|>
    image: int  # <|image|>: the prompt's placeholder, and the marker before the global tile
    patch: int  # <|patch|>: the positions image features replace (config image_token_index)
    tile_x: int  # <|tile_x_separator|>: between tiles of a row
    tile_y: int  # <|tile_y_separator|>: after each row


def image_token_ids(grid: tuple[int, int], tokens_per_tile: int, ids: ImageTokenIds) -> list[int]:
    """``Llama4Processor._prompt_split_image``: one tile gives start, image, patches, end; a grid gives start, each
    row's tiles of patches (x separators between, a y separator after the row), then image + the global tile's
    patches + end."""
    out = [ids.start]
    rows, cols = grid
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [ids.patch] * tokens_per_tile
                if c < cols - 1:
                    out.append(ids.tile_x)
            out.append(ids.tile_y)
    return out + [ids.image] + [ids.patch] * tokens_per_tile + [ids.end]
