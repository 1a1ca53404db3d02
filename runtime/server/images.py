"""Images as the API sends them: base64 PNGs with the infotext, and cheap live previews."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ..images.metadata import png_bytes
from ..pipeline import to_pil

# SD 1.x latent channels -> RGB: the linear fit A1111 calls "Approx cheap". Good enough to see the
# composition emerge at no cost (no VAE run); the real decode happens once, at the end.
_LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    dtype=np.float32,
)


def png_base64(pixels: np.ndarray, infotext: str) -> str:
    """One decoded image (H, W, 3 floats in [0, 1]) as a base64 PNG carrying its "parameters"."""
    return base64.b64encode(png_bytes(to_pil(pixels), infotext)).decode("ascii")


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
