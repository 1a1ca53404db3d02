"""Hires-fix upscaling in numpy: latent resizing that reproduces torch.nn.functional.interpolate
(what A1111's latent upscalers call) mode for mode, and the image upscalers on PIL.

Each resize is separable: a (out, in) weight matrix per axis, applied to the last two axes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from ..registry import UpscalerInfo


def _nearest(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    scale = np.float32(size_in / size_out)  # torch computes the source index in float32
    offset = np.float32(0.5) if exact else np.float32(0.0)
    source = np.floor((np.arange(size_out, dtype=np.float32) + offset) * scale).astype(np.int64)
    weights = np.zeros((size_out, size_in), np.float64)
    weights[np.arange(size_out), np.minimum(source, size_in - 1)] = 1.0
    return weights


def _linear(size_in: int, size_out: int) -> np.ndarray:
    """align_corners=False: source = (dst + 0.5) * scale - 0.5, clamped at 0."""
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    frac = source - low
    high = np.minimum(low + 1, size_in - 1)
    weights = np.zeros((size_out, size_in), np.float64)
    np.add.at(weights, (np.arange(size_out), low), 1 - frac)
    np.add.at(weights, (np.arange(size_out), high), frac)
    return weights


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic(size_in: int, size_out: int) -> np.ndarray:
    """torch's bicubic (A = -0.75, align_corners=False, border taps clamped)."""
    scale = size_in / size_out
    source = (np.arange(size_out) + 0.5) * scale - 0.5
    low = np.floor(source).astype(np.int64)
    frac = source - low
    weights = np.zeros((size_out, size_in), np.float64)
    for tap in range(-1, 3):
        index = np.clip(low + tap, 0, size_in - 1)
        np.add.at(weights, (np.arange(size_out), index), _cubic(frac - tap, -0.75))
    return weights


def _antialiased(size_in: int, size_out: int, cubic: bool) -> np.ndarray:
    """torch's antialias=True path (PIL's resampling): a triangle or Keys (A = -0.5) filter
    widened by the downscale factor, normalized over the taps inside the image."""
    scale = size_in / size_out
    support = (2.0 if cubic else 1.0) * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), size_in)
        taps = (np.arange(low, high) - center + 0.5) * inv
        w = _cubic(taps, -0.5) if cubic else np.maximum(0.0, 1.0 - np.abs(taps))
        total = w.sum()
        weights[i, low:high] = w / total if total != 0 else w
    return weights


def _matrix(mode: str, antialias: bool, size_in: int, size_out: int) -> np.ndarray:
    if mode in ("nearest", "nearest-exact"):
        return _nearest(size_in, size_out, exact=mode == "nearest-exact")
    if antialias:
        return _antialiased(size_in, size_out, cubic=mode == "bicubic")
    return _bicubic(size_in, size_out) if mode == "bicubic" else _linear(size_in, size_out)


def interpolate(x: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=antialias) on an
    (N, C, H, W) array, align_corners=False."""
    rows = _matrix(mode, antialias, x.shape[2], size[0])
    cols = _matrix(mode, antialias, x.shape[3], size[1])
    out = np.einsum("oh,nchw->ncow", rows, x.astype(np.float64))
    out = np.einsum("pw,ncow->ncop", cols, out)
    return out.astype(np.float32)


def upscale_latents(latents: np.ndarray, size: tuple[int, int], info: UpscalerInfo) -> np.ndarray:
    return interpolate(latents, size, info.mode, info.antialias)


_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


ImageResize = Callable[[Image.Image, int, int], Image.Image]  # (image, width, height) -> resized


def upscale_image(
    pixels: np.ndarray, size: tuple[int, int], info: UpscalerInfo, model: ImageResize | None = None
) -> np.ndarray:
    """A1111's image upscalers on an (H, W, 3) float image in [0, 1], through 8 bits as A1111
    does: "Lanczos" and "Nearest" resize with that PIL filter; "None" leaves the upscaling to
    resize_image's final LANCZOS resize; a model upscaler is `model` (resize_image with it)."""
    image = Image.fromarray((pixels * 255).astype(np.uint8))  # A1111 truncates, it does not round
    if model is not None:
        resized = model(image, size[1], size[0])
    else:
        resized = image.resize((size[1], size[0]), resample=_PIL_FILTERS.get(info.mode, Image.Resampling.LANCZOS))
    return np.asarray(resized, dtype=np.float32) / np.float32(255.0)


def target_size(
    width: int, height: int, scale: float, resize_x: int, resize_y: int, factor: int
) -> tuple[int, int, int, int]:
    """A1111's calculate_target_resolution: (upscale_to_x, upscale_to_y, truncate_x, truncate_y);
    truncate_* are latent cells cropped when both resize sizes change the aspect ratio."""
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale), 0, 0
    if resize_y == 0:
        return resize_x, resize_x * height // width, 0, 0
    if resize_x == 0:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return to_x, to_y, (to_x - resize_x) // factor, (to_y - resize_y) // factor


def truncate(latents: np.ndarray, truncate_x: int, truncate_y: int) -> np.ndarray:
    h, w = latents.shape[2:]
    return latents[:, :, truncate_y // 2 : h - (truncate_y + 1) // 2, truncate_x // 2 : w - (truncate_x + 1) // 2]
