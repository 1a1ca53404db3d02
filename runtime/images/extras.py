"""A1111's Extras upscaling (scripts/postprocessing_upscale.py, `/sdapi/v1/extra-single-image`):
scale by a factor (resize_mode 0, `upscaling_resize`) or to a size (resize_mode 1,
`upscaling_resize_w/h`, centred on a black canvas of that size when `upscaling_crop`), with
`upscaler_1`, optionally blended with `upscaler_2` at `extras_upscaler_2_visibility`.

Upscalers: the export's model upscalers (runtime.images.model_upscale), "Lanczos" and "Nearest"
(A1111's filter upscalers: the filter to the exact factor, then Lanczos to the multiple-of-8 size)
and "None" (the image is returned as it is, as A1111 does). Latent upscalers have no image here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from .. import registry
from ..errors import InvalidRequestError
from ..graphs.upscalers import UpscalerSessions
from .model_upscale import check_upscale, pass_sizes, upscale

MAX_EXTRAS_SCALE = 8.0  # A1111's Extras slider stops at 8
_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class ExtrasOptions:
    resize_mode: int = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0


def _number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequestError(field, f"must be a number in [{low:g}, {high:g}], not {value!r}")
    return float(value)


def _upscaler(name: Any, field: str, sessions: UpscalerSessions) -> registry.UpscalerInfo | None:
    """The upscaler, None for "None" (A1111: no upscaling at all); latent modes are refused."""
    info = registry.upscaler(name, field, sessions.infos)
    if info.latent:
        raise InvalidRequestError(field, f"{info.name!r} upscales latents; Extras upscale images")
    return None if info.mode == "none" else info


def _scale(image: Image.Image, options: ExtrasOptions) -> float:
    """The factor A1111 upscales by: upscaling_resize, or what covers the asked size."""
    if options.resize_mode == 1:
        return max(options.upscaling_resize_w / image.width, options.upscaling_resize_h / image.height)
    return options.upscaling_resize


def _filter_upscale(image: Image.Image, scale: float, mode: str) -> Image.Image:
    """A1111's UpscalerLanczos / UpscalerNearest through Upscaler.upscale."""
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    image = image.resize((int(image.width * scale), int(image.height * scale)), resample=_FILTERS[mode])
    return image if image.size == dest else image.resize(dest, resample=Image.Resampling.LANCZOS)


def _upscale_with(
    info: registry.UpscalerInfo, image: Image.Image, scale: float, options: ExtrasOptions, sessions: UpscalerSessions
) -> Image.Image:
    if info.mode == registry.MODEL:
        image = upscale(sessions.runner(info.name), sessions.models[info.name], image, scale)
    else:
        image = _filter_upscale(image, scale, info.mode)
    if options.resize_mode == 1 and options.upscaling_crop:
        width, height = options.upscaling_resize_w, options.upscaling_resize_h
        canvas = Image.new("RGB", (width, height))
        canvas.paste(image, box=(width // 2 - image.width // 2, height // 2 - image.height // 2))
        image = canvas
    return image


def check_options(options: ExtrasOptions, sessions: UpscalerSessions) -> None:
    """The fields alone, before any image is read."""
    if options.resize_mode not in (0, 1):
        raise InvalidRequestError("resize_mode", f"must be 0 (scale by) or 1 (scale to), not {options.resize_mode!r}")
    if options.resize_mode == 0:
        _number(options.upscaling_resize, "upscaling_resize", 1.0, MAX_EXTRAS_SCALE)
    for field in ("upscaling_resize_w", "upscaling_resize_h"):
        value = getattr(options, field)
        if options.resize_mode == 1 and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidRequestError(field, f"must be a whole number >= 1, not {value!r}")
    _number(options.extras_upscaler_2_visibility, "extras_upscaler_2_visibility", 0.0, 1.0)
    _upscaler(options.upscaler_1, "upscaler_1", sessions)
    _upscaler(options.upscaler_2, "upscaler_2", sessions)


def run_extras(
    image: Image.Image, options: ExtrasOptions, sessions: UpscalerSessions, max_pixels: int | None
) -> tuple[Image.Image, dict[str, Any]]:
    """The upscaled image and A1111's postprocessing info (`Postprocess upscale by: 2, ...`)."""
    check_options(options, sessions)
    image = image.convert("RGB")
    first = _upscaler(options.upscaler_1, "upscaler_1", sessions)
    if first is None:
        return image, {}
    scale = _scale(image, options)
    if options.resize_mode == 1 and scale > MAX_EXTRAS_SCALE:
        raise InvalidRequestError("upscaling_resize_w", f"asks for a {scale:g}x upscale, over {MAX_EXTRAS_SCALE:g}x")
    second = _upscaler(options.upscaler_2, "upscaler_2", sessions)
    blend = second is not None and options.extras_upscaler_2_visibility > 0
    for info, field in ((first, "upscaler_1"), *(((second, "upscaler_2"),) if blend else ())):
        _check_size(image, scale, info, field, sessions, max_pixels)
    info: dict[str, Any] = {}
    if options.resize_mode == 1:
        info["Postprocess upscale to"] = f"{options.upscaling_resize_w}x{options.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = options.upscaling_resize
    with sessions.lock:
        result = _upscale_with(first, image, scale, options, sessions)
        info["Postprocess upscaler"] = first.name
        if blend:
            other = _upscale_with(second, image, scale, options, sessions)
            result = Image.blend(result, other, options.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second.name
    if options.resize_mode == 1 and options.upscaling_crop:
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    return result, info


def _check_size(
    image: Image.Image,
    scale: float,
    info: registry.UpscalerInfo,
    field: str,
    sessions: UpscalerSessions,
    max_pixels: int | None,
) -> None:
    if info.mode == registry.MODEL:
        check_upscale(image.width, image.height, scale, info, max_pixels, field)
        return
    _, dest = pass_sizes(image.width, image.height, scale, 1)
    if dest[0] < 1 or dest[1] < 1 or (max_pixels is not None and dest[0] * dest[1] > max_pixels):
        raise InvalidRequestError(field, f"{image.width}x{image.height} upscaled by {scale:g} is {dest[0]}x{dest[1]}, "
                                  f"outside 1 pixel to {max_pixels} pixels")  # fmt: skip


def infotext(info: dict[str, Any]) -> str:
    """A1111's postprocessing infotext: `key: value` joined by ", "."""
    return ", ".join(f"{key}: {value}" for key, value in info.items())
