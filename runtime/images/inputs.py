"""Images coming in (img2img init images, inpainting masks): decoding, A1111's resize modes, mask
blur, masked-content fill and the "only masked" crop, in PIL and numpy.

Every bad input is an InvalidRequestError naming the field: an undecodable file, a decompression
bomb (more pixels than MAX_INPUT_PIXELS), a mask whose size differs from its image's.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import InvalidRequestError

MAX_INPUT_PIXELS = 8192 * 8192  # decoded size above which an input is refused as a likely bomb
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")  # A1111's resize_mode 0, 1, 2
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


def load_image(value: Any, field: str, mode: str = "RGB") -> Image.Image:
    """A PIL image, a (H, W[, C]) uint8 or [0, 1] float array, a path or encoded bytes -> `mode`."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = _from_array(value, field)
    elif isinstance(value, bytes | bytearray | str | os.PathLike):
        image = _decode(value, field)
    else:
        raise InvalidRequestError(
            field, f"must be a PIL image, an array, a path or image bytes, not {type(value).__name__}"
        )
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise InvalidRequestError(field, f"{image.width}x{image.height} is over the {MAX_INPUT_PIXELS} pixel limit")
    return image.convert(mode)


def _decode(value: bytes | bytearray | str | os.PathLike, field: str) -> Image.Image:
    source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else Path(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InvalidRequestError(
                    field, f"{image.width}x{image.height} is over the {MAX_INPUT_PIXELS} pixel limit"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidRequestError(field, f"refused as a decompression bomb: {error}") from None
    except FileNotFoundError:
        raise InvalidRequestError(field, f"{value} does not exist") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidRequestError(field, f"is not a readable image ({error})") from None
    return image


def _from_array(array: np.ndarray, field: str) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or not array.size:
        raise InvalidRequestError(field, f"an array image must be (H, W) or (H, W, 1|3|4), not {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise InvalidRequestError(
                field, f"an array image must be uint8 or finite floats in [0, 1], not {array.dtype}"
            )
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image with its LANCZOS filter: 0 stretch, 1 cover and crop the
    centre, 2 fit and fill the borders with the image's stretched edges."""
    if mode == 0 or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
        out = Image.new(image.mode, (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(
                resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h)
            )
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(
                resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0)
            )
    return out


def gaussian_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A1111's mask blur: cv2.GaussianBlur with kernel 2*int(2.5*sigma+0.5)+1 along each axis
    (reflect-101 borders), on a uint8 mask, rounded back to uint8."""
    if sigma <= 0:
        return mask
    radius = int(2.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect") if out.shape[axis] > radius else np.pad(out, pad, mode="edge")
        out = sum(
            weight * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, weight in enumerate(kernel)
        )
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """A1111's masking.get_crop_region: the masked box grown by `padding`, clamped to the image;
    None when the mask is empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        return None
    height, width = mask.shape
    return (
        max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
        min(int(cols[-1]) + 1 + padding, width), min(int(rows[-1]) + 1 + padding, height),
    )  # fmt: skip


def expand_crop_region(box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int) -> tuple:
    """A1111's masking.expand_crop_region: grow the box to the processing aspect ratio."""
    x1, y1, x2, y2 = box
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_processing = width / height
    if ratio_crop > ratio_processing:
        desired = (x2 - x1) / ratio_processing
        diff = int(desired - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= image_h:
            diff = y2 - image_h
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        y2 = min(y2, image_h)
    else:
        desired = (y2 - y1) * ratio_processing
        diff = int(desired - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= image_w:
            diff = x2 - image_w
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        x2 = min(x2, image_w)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill ("fill" masked content): the masked area painted with ever less
    blurred copies of the unmasked colours."""
    result = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def to_model_pixels(image: Image.Image) -> np.ndarray:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor."""
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (array * 2 - 1).transpose(2, 0, 1)[None].astype(np.float32)


def check_strength(value: Any, field: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise InvalidRequestError(field, f"must be a number in [0, 1], not {value!r}")
    if not 0.0 <= value <= 1.0:
        raise InvalidRequestError(field, f"must be in [0, 1], not {value}")
    return float(value)


def check_whole_number(value: Any, field: str) -> int:
    """A count or size that may be 0 (mask blur, hires resize and steps, where 0 means "off" or
    "as the first pass"); numpy integers count, as for width and height."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InvalidRequestError(field, f"must be a whole number >= 0, not {value!r}")
    return int(value)


def check_choice(value: Any, field: str, names: tuple[str, ...]) -> int:
    """An index into `names`, given as the index (A1111's API) or the name."""
    if isinstance(value, str) and value.lower() in [name.lower() for name in names]:
        return [name.lower() for name in names].index(value.lower())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    choices = ", ".join(f"{index} ({name!r})" for index, name in enumerate(names))
    raise InvalidRequestError(field, f"must be one of {choices}, not {value!r}")
