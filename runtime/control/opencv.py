"""OpenCV, the optional `controlnet` extra: imported when a control image is prepared, never when the
runtime is, so that an install without it serves everything but ControlNet."""

from __future__ import annotations

from types import ModuleType

from ..errors import InvalidRequestError

INSTALL_HINT = "pip install 'acertain-onnx[controlnet]'"


def opencv(field: str = "controlnet") -> ModuleType:
    """cv2, or one InvalidRequestError naming `field` and the extra to install.

    Imported on each call (a dictionary look-up once loaded) so that a missing OpenCV is reported
    however early the first ControlNet request comes."""
    try:
        import cv2
    except ImportError:
        raise InvalidRequestError(
            field, f"ControlNet's image preparation needs OpenCV, which is not installed: {INSTALL_HINT}"
        ) from None
    return cv2
