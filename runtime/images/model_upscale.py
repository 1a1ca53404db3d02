"""Upscaling with an exported model upscaler the way the A1111 web UI does it (1.8+, spandrel era),
without torch: the same tiles, the same 8-bit round trips, the same blending.

- `upscale` is A1111's Upscaler.upscale: the model runs until the image reaches the asked size
  (at most 3 times; a 4x model asked for 2x runs once), then a Lanczos resize to the size rounded
  down to a multiple of 8.
- `upscale_once` is upscaler_utils.upscale_with_model: the image is cut into tile_size squares
  (A1111's ESRGAN_tile 192) overlapping by at least tile_overlap (ESRGAN_tile_overlap 8), spread
  evenly (images.split_grid); each tile is upscaled alone, so memory is bounded by one tile; the
  upscaled tiles are pasted back left to right and top to bottom, each fading in over the overlap
  with a linear 8-bit ramp (images.combine_grid). An image smaller than a tile is one tile padded
  with black on its top and left, as A1111 crops it.
- `run_tile` is upscale_without_tiling: the model sees BGR in [0, 1] (A1111 flips the channels for
  every ESRGAN-family model) and its output is truncated to 8 bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from ..graphs.upscalers import UpscalerModel
from ..registry import UpscalerInfo

Run = Callable[[np.ndarray], np.ndarray]  # (1, 3, h, w) float32 in [0, 1] -> (1, 3, s*h, s*w)
Size = tuple[int, int]  # (width, height)
MAX_PASSES = 3  # A1111 runs the model at most three times to reach the asked scale
PASS_PIXELS_FACTOR = 16


def pad_to_requirements(pixels: np.ndarray, model: UpscalerModel) -> np.ndarray:
    """spandrel's pad_tensor on (1, 3, h, w): up to the minimum and the multiple (square if asked),
    on the bottom and right, reflecting as far as the image allows and repeating the edge beyond."""
    height, width = pixels.shape[2:]

    def fit(size: int) -> int:
        return -(-max(model.minimum, size) // model.multiple_of) * model.multiple_of

    new_w, new_h = fit(width), fit(height)
    if model.square:
        new_w = new_h = max(new_w, new_h)
    pad_w, pad_h = new_w - width, new_h - height
    reflect_w, reflect_h = min(pad_w, width - 1), min(pad_h, height - 1)
    pixels = np.pad(pixels, ((0, 0), (0, 0), (0, reflect_h), (0, reflect_w)), mode="reflect")
    return np.pad(pixels, ((0, 0), (0, 0), (0, pad_h - reflect_h), (0, pad_w - reflect_w)), mode="edge")


def run_tile(run: Run, model: UpscalerModel, tile: Image.Image) -> Image.Image:
    """A1111's upscale_without_tiling on one tile, the model padded to its size requirements."""
    bgr = np.asarray(tile.convert("RGB"))[:, :, ::-1]
    pixels = (bgr.transpose(2, 0, 1)[None] / np.float32(255.0)).astype(np.float32)
    height, width = pixels.shape[2:]
    output = run(pad_to_requirements(pixels, model))[0, :, : height * model.scale, : width * model.scale]
    output = np.clip(output, 0.0, 1.0).transpose(1, 2, 0) * np.float32(255.0)
    return Image.fromarray(np.ascontiguousarray(output.astype(np.uint8)[:, :, ::-1]), "RGB")


@dataclass
class Grid:
    """images.Grid: rows of (y, height, [(x, width, tile)])."""

    rows: list[tuple[int, int, list[tuple[int, int, Image.Image]]]]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis (split_grid): evenly spread, the last flush with the far edge."""
    count = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [size - tile if int(i * step) + tile >= size else int(i * step) for i in range(count)]


def split_grid(image: Image.Image, tile: int, overlap: int) -> Grid:
    width, height = image.size
    rows = []
    for y in _starts(height, tile, overlap):
        row = [(x, tile, image.crop((x, y, x + tile, y + tile))) for x in _starts(width, tile, overlap)]
        rows.append((y, tile, row))
    return Grid(rows, tile, tile, width, height, overlap)


def _ramp(width: int, height: int, overlap: int, horizontal: bool) -> Image.Image:
    """combine_grid's mask: 0..255 over the overlap, truncated to 8 bits."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    mask = np.tile(ramp[None, :], (height, 1)) if horizontal else np.tile(ramp[:, None], (1, width))
    return Image.fromarray(mask, "L")


def combine_grid(grid: Grid) -> Image.Image:
    overlap = grid.overlap
    mask_w = _ramp(overlap, grid.tile_h, overlap, horizontal=True)
    mask_h = _ramp(grid.image_w, overlap, overlap, horizontal=False)
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.rows:
        strip = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                strip.paste(tile, (0, 0))
                continue
            strip.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            strip.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(strip, (0, 0))
            continue
        combined.paste(strip.crop((0, 0, strip.width, overlap)), (0, y), mask=mask_h)
        combined.paste(strip.crop((0, overlap, strip.width, h)), (0, y + overlap))
    return combined


def upscale_once(run: Run, model: UpscalerModel, image: Image.Image) -> Image.Image:
    """One model pass over the image, tiled as A1111's upscale_with_model."""
    if model.tile_size <= 0:
        return run_tile(run, model, image)
    grid = split_grid(image, model.tile_size, model.tile_overlap)
    scale = model.scale
    rows = [(y * scale, h * scale, [(x * scale, w * scale, run_tile(run, model, tile)) for x, w, tile in row])
            for y, h, row in grid.rows]  # fmt: skip
    return combine_grid(Grid(rows, grid.tile_w * scale, grid.tile_h * scale, grid.image_w * scale,
                             grid.image_h * scale, grid.overlap * scale))  # fmt: skip


def pass_sizes(
    width: int, height: int, scale: float, model_scale: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(the sizes after each model pass, the final size) of A1111's Upscaler.upscale."""
    dest = (int(width * scale // 8 * 8), int(height * scale // 8 * 8))
    sizes: list[Size] = []
    for index in range(MAX_PASSES):
        if width >= dest[0] and height >= dest[1] and (index > 0 or scale != 1):
            break
        if model_scale == 1 and index > 0:
            break  # the size did not change: A1111 stops
        width, height = width * model_scale, height * model_scale
        sizes.append((width, height))
    return sizes, dest


def check_upscale(
    width: int, height: int, scale: float, info: UpscalerInfo, max_pixels: int | None, field: str
) -> None:
    """Refuse a scale whose result would pass the pixel limit, or whose model passes would pass
    PASS_PIXELS_FACTOR times it (a 4x model asked for 2x makes a 4x image first, as in A1111: only an
    8-bit image, the tiles bound the model's memory), or that leaves nothing."""
    sizes, dest = pass_sizes(width, height, scale, info.scale or 1)
    if dest[0] < 1 or dest[1] < 1:
        raise InvalidRequestError(field, f"scale {scale:g} makes {width}x{height} smaller than 8 pixels")
    if max_pixels is None:
        return
    for (w, h), limit in [*((size, max_pixels * PASS_PIXELS_FACTOR) for size in sizes), (dest, max_pixels)]:
        if w * h > limit:
            raise InvalidRequestError(
                field, f"{width}x{height} upscaled by {scale:g} with {info.name} ({info.scale}x) makes a "
                f"{w}x{h} image, over the limit of {limit} pixels",
            )  # fmt: skip


def upscale(run: Run, model: UpscalerModel, image: Image.Image, scale: float) -> Image.Image:
    """A1111's Upscaler.upscale(img, scale): model passes, then Lanczos to the multiple-of-8 size."""
    sizes, dest = pass_sizes(image.width, image.height, scale, model.scale)
    for _ in sizes:
        image = upscale_once(run, model, image)
    if image.size != dest:
        image = image.resize(dest, resample=Image.Resampling.LANCZOS)
    return image


def resize_with_model(run: Run, model: UpscalerModel, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image(0, image, width, height, upscaler_name): the hires fix's path."""
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale(run, model, image, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image
