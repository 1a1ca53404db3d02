"""The web UI's "parameters" text (infotext) and PNG files that carry it.

`format_infotext` writes what AUTOMATIC1111's modules/processing.py (create_infotext) writes:

    <prompt>
    Negative prompt: <negative prompt>            (only when there is one)
    Steps: 28, Sampler: Euler a, CFG scale: 11, Seed: 114514, Size: 512x512, ...

so that the web UI's "PNG Info" tab, civitai and other readers of that format read our images.
Values are written with str(), as there (a float 7.0 is "7.0": pass 7 for "7"); a value holding a
comma, colon or newline is written as a JSON string (infotext_utils.quote).

The PNG keeps the text in a chunk named "parameters": tEXt when the text is latin-1, otherwise
iTXt (UTF-8), which is what Pillow's PngInfo.add_text does for the web UI too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

PNG_TEXT_KEY = "parameters"

# create_infotext's order (web UI 1.10). Keys the caller adds beyond these (the web UI's
# extra_generation_params: Emphasis, Hires upscale, ...) go between LEADING_KEYS and TRAILING_KEYS,
# in the caller's order.
LEADING_KEYS = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
TRAILING_KEYS = ("Version", "User")


def quote(value: object) -> str:
    """infotext_utils.quote: JSON-quote a value that holds a comma, colon or newline.

    Like the web UI, a double quote alone does not trigger quoting; its parser reads such a value
    fine unless the value both starts and ends with a double quote.
    """
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    # default=str: the web UI would json.dumps the object itself; for anything JSON cannot take
    # (it would raise there) we quote its text instead.
    return json.dumps(value, ensure_ascii=False, default=str)


def infotext_number(value: float) -> int | float:
    """11.0 -> 11: A1111 writes whole numbers (CFG scale 11, Hires upscale 2) without a decimal
    point, and str() here would write "11.0"."""
    return int(value) if float(value).is_integer() else value


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _omitted(key: str, value: object) -> bool:
    """Values create_infotext leaves out: None, and the defaults it never writes."""
    if value is None:
        return True
    if key == "Clip skip":
        return (_as_int(value) or 0) <= 1  # written from 2 up only
    if key == "ENSD":
        return _as_int(value) == 0  # written only when the delta is in use
    # RNG is written for "CPU" and "NV"; "GPU" is the default and is left out.
    return key == "RNG" and value == "GPU"


def _ordered(params: Mapping[str, object]) -> list[tuple[str, object]]:
    known = set(LEADING_KEYS) | set(TRAILING_KEYS)
    leading = [(key, params[key]) for key in LEADING_KEYS if key in params]
    extras = [(key, value) for key, value in params.items() if key not in known]
    trailing = [(key, params[key]) for key in TRAILING_KEYS if key in params]
    return leading + extras + trailing


def format_params_line(params: Mapping[str, object]) -> str:
    """`Key: value, Key: value` in the web UI's order, skipping what it would not write."""
    parts = []
    for key, value in _ordered(params):
        if _omitted(key, value):
            continue
        # create_infotext writes a bare key when the value is the key itself (e.g. a flag).
        parts.append(key if isinstance(value, str) and value == key else f"{key}: {quote(value)}")
    return ", ".join(parts)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The web UI's infotext for one image (create_infotext)."""
    negative_line = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    # The web UI strips the whole text: an empty parameter line leaves no trailing newline.
    return f"{prompt}{negative_line}\n{format_params_line(params)}".strip()


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The image as PNG with the infotext in a "parameters" text chunk (tEXt, or iTXt if needed)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_TEXT_KEY, infotext)  # falls back to iTXt for text beyond latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str) -> None:
    """Write the PNG at `path` atomically: a complete file or none (an old file stays as it was).

    The image is encoded in memory first, then written to a temporary file next to the target
    (same folder, so same file system) and renamed over it with os.replace. A full disk or any
    other failure removes the temporary file and re-raises.
    """
    data = png_bytes(image, infotext)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        # "x": a new file, created with the usual permissions (0o666 less the umask).
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the OS allows it (POSIX); best effort elsewhere."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_infotext(source: str | os.PathLike[str] | bytes) -> str | None:
    """The "parameters" text of an image file or of its bytes; None if it has none.

    Raises PIL.UnidentifiedImageError when the data is not an image at all.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with Image.open(stream) as image:
        value = image.info.get(PNG_TEXT_KEY)
        if value is None and isinstance(image, PngImagePlugin.PngImageFile):
            # A text chunk after the image data only shows up once the file is read to the end.
            value = image.text.get(PNG_TEXT_KEY)
    return value if isinstance(value, str) else None


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """The web UI's parse_generation_parameters: Prompt, Negative prompt and each `Key: value` of
    the last line (quoted values unquoted, sizes split into `Key-1` / `Key-2`), values as text."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        size = _IMAGE_SIZE.match(str(value))
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = str(value)
    return result
