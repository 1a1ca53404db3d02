"""`alwayson_scripts.controlnet.args` read as the ControlNet extension reads it
(Mikubill/sd-webui-controlnet v1.1.455, internal_controlnet/args.py, A1111's api.py); its endpoints
are runtime.server.controlnet_routes.

- The script is found by name in any case ("ControlNet", "controlnet"), as A1111 finds scripts.
- `args`: unit objects. As in the extension, a unit is off unless `"enabled": true` (its API default),
  unknown keys are ignored, the legacy names `input_image`, `lowvram`, `guidance`, `mask_image` are
  read, and enums take their words or index. Images are base64 or data URLs (never a server path,
  which the extension also reads); `image` may also be {"image", "mask"} or [image, mask]. Off
  units are skipped unread. More enabled units than --max-controlnet-units is a 422 (A1111 would
  silently drop the units past its unit count).
- Each unit's detected maps are appended to `images` after the generated ones (the hires pass's
  then the first pass's), plain PNGs without parameters, unless the unit says
  `"save_detected_map": false`, as the extension's postprocess does. The infotext gets its
  `ControlNet i` entries.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..control.request import ControlUnit
from ..errors import InvalidRequestError
from .images import decode_base64

if TYPE_CHECKING:
    from .schemas import GenerationFields

SCRIPT = "controlnet"  # A1111's script title, lower-case
IMAGE_FIELDS = ("image", "input_image", "mask", "mask_image")  # what a unit sends as base64
_LIBRARY_FIELD = re.compile(r"^controlnet(?:\[(\d+)\])?(.*)$")


def script_key(body: GenerationFields) -> str | None:
    """The key of alwayson_scripts that names the ControlNet script, if any."""
    return next((key for key in body.alwayson_scripts if key.lower() == SCRIPT), None)


def request_units(body: GenerationFields) -> list[ControlUnit]:
    """The units of `alwayson_scripts.controlnet.args`, images decoded; off units kept as off (the
    library skips them without reading them)."""
    key = script_key(body)
    if key is None:
        return []
    entry = body.alwayson_scripts[key]
    where = f"alwayson_scripts.{key}"
    if not isinstance(entry, dict):
        raise InvalidRequestError(where, 'must be an object with "args": a list of ControlNet units')
    args = entry.get("args") or []
    if not isinstance(args, list):
        raise InvalidRequestError(f"{where}.args", "must be a list of ControlNet units")
    units = []
    for index, values in enumerate(args):
        field = f"{where}.args.{index}"
        if not isinstance(values, dict):
            raise InvalidRequestError(field, f"must be a ControlNet unit object, not {type(values).__name__}")
        values = {"enabled": False, **values}  # the extension's default
        if values["enabled"] is True:
            values = _decode_images(_split_image(values, field), field)
        units.append(ControlUnit.from_dict(values, field))
    return units


def _split_image(values: dict[str, Any], field: str) -> dict[str, Any]:
    """The extension's other `image` shapes ({"image", "mask"}, [image, mask], a one-item list of
    those) as `image` and `mask`; several images are IP-Adapter's, which this server does not run."""
    image = values.get("image", values.get("input_image"))
    if isinstance(image, list) and len(image) == 1 and isinstance(image[0], dict):
        image = image[0]
    if isinstance(image, list) and not (len(image) == 2 and not isinstance(image[0], dict)):
        raise InvalidRequestError(f"{field}.image", "takes one image (several are for IP-Adapter units, not run here)")
    if isinstance(image, dict | list):
        pair = (image.get("image"), image.get("mask")) if isinstance(image, dict) else tuple(image)
        rest = {key: value for key, value in values.items() if key not in ("image", "input_image")}
        if pair[1] is not None and (rest.get("mask") is not None or rest.get("mask_image") is not None):
            raise InvalidRequestError(f"{field}.mask", "is given twice (also inside image)")
        return {**rest, "image": pair[0], **({"mask": pair[1]} if pair[1] is not None else {})}
    return values


def _decode_images(values: dict[str, Any], field: str) -> dict[str, Any]:
    decoded = dict(values)
    for name in IMAGE_FIELDS:
        value = values.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise InvalidRequestError(f"{field}.{name}", "must be a base64 image (or data URL)")
        decoded[name] = decode_base64(f"{field}.{name}", value)
    return decoded


def api_field(field: str, key: str) -> str | None:
    """A library field of the units ("controlnet[1].weight") as the request named it
    ("alwayson_scripts.ControlNet.args.1.weight"); None for other fields."""
    match = _LIBRARY_FIELD.match(field)
    if match is None:
        return None
    index, rest = match.groups()
    return f"alwayson_scripts.{key}.args" + (f".{index}" if index is not None else "") + rest
