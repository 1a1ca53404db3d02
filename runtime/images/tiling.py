"""Tiled VAE decode and encode, as diffusers' AutoencoderKL.enable_tiling(): overlapping tiles
(tile size from the VAE config's sample_size, overlap factor 0.25) run one at a time, each tile
blended linearly into the one above and the one to its left, then cropped and joined.

The blend works in place on the tiles, as diffusers' does: a tile blended into its upper
neighbour is the one its right neighbour later blends with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor
VAE_TILING = ("auto", "on", "off")
# "auto" tiles images above this many pixels. The VAE's mid-block attention is quadratic in latent
# cells: (H/8 * W/8)^2 floats, 1 GiB at 1024x1024 and 16 GiB at 2048x2048. Measured peak RSS of a
# decode (tiny VAE, fp32, CPU; README "Tiled VAE"): 1024x1024 2.3 GiB untiled vs 0.19 GiB tiled.
AUTO_TILING_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class TileSizes:
    sample: int  # pixels per tile side (diffusers' tile_sample_min_size)
    latent: int  # latent cells per tile side (tile_latent_min_size)

    @classmethod
    def from_folder(cls, folder: Path, default_sample: int, factor: int) -> TileSizes:
        """From the exported vae_decoder/config.json as diffusers reads it."""
        sample = default_sample
        path = folder / "vae_decoder" / "config.json"
        if path.is_file():
            size = json.loads(path.read_text(encoding="utf-8")).get("sample_size", default_sample)
            sample = int(size[0] if isinstance(size, list | tuple) else size)
        return cls(sample, int(sample / factor))


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile_in: int, tile_out: int) -> np.ndarray:
    """Run `run` over overlapping tile_in-sized tiles of x (N, C, H, W) whose outputs are
    tile_out-sized, blending the overlaps as diffusers' tiled_decode / _tiled_encode."""
    step = int(tile_in * (1 - OVERLAP_FACTOR))
    extent = int(tile_out * OVERLAP_FACTOR)
    limit = tile_out - extent
    rows = [
        [np.array(run(x[:, :, i : i + tile_in, j : j + tile_in]), dtype=np.float32) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    joined = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                _blend_h(row[j - 1], tile, extent)
            parts.append(tile[:, :, :limit, :limit])
        joined.append(np.concatenate(parts, axis=3))
    return np.concatenate(joined, axis=2)


def use_tiling(mode: str, width: int, height: int, sizes: TileSizes) -> bool:
    if mode == "on":
        return width > sizes.sample or height > sizes.sample
    return mode == "auto" and width * height > AUTO_TILING_PIXELS
