"""Images as the API sends them: base64 PNGs with the infotext, and cheap live previews."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from ..images.metadata import png_bytes
from ..pipeline import to_pil

# SD 1.x latent channels -> RGB: the linear fit A1111 calls "Approx cheap". Good enough to see the
# composition emerge at no cost (no VAE run); the real decode happens once, at the end.
_LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    dtype=np.float32,
)


def decode_base64(field: str, text: str) -> bytes:
    """A1111's decode_base64_to_image input: plain base64 or a data: URL."""
    if text.startswith("data:"):
        text = text.split(";", 1)[1].split(",", 1)[-1] if ";" in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "is not valid base64") from None


def png_base64(pixels: np.ndarray, infotext: str) -> str:
    """One decoded image (H, W, 3 floats in [0, 1]) as a base64 PNG carrying its "parameters"."""
    return base64.b64encode(png_bytes(to_pil(pixels), infotext)).decode("ascii")


def map_base64(pixels: np.ndarray) -> str:
    """A uint8 (H, W, 3) image (a ControlNet detected map) as A1111 sends it: a PNG without parameters."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_base64(latents: np.ndarray) -> str | None:
    """A latent-resolution preview of one sampler state (C, h, w), or None if it has no 4 channels.

    The sampler works on x = latent / sqrt(alpha_bar), whose scale follows the noise level; the
    model's latents have unit variance, so dividing by the standard deviation brings x back to
    that scale without knowing the current sigma.
    """
    if latents.ndim != 3 or latents.shape[0] != _LATENT_RGB.shape[0]:
        return None
    scale = float(np.std(latents)) or 1.0
    rgb = np.einsum("chw,cr->hwr", latents / scale, _LATENT_RGB)
    image = Image.fromarray(((np.clip(rgb, -1, 1) + 1) * 127.5).round().astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
