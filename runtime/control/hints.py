"""The control image a ControlNet takes, made as the ControlNet extension makes it: the unit's input
(image and optional mask), pixel-perfect processor resolution, the three resize modes with the
extension's "high quality" resize of detected maps, and the (3, H, W) float32 hint in [0, 1].

Read from Mikubill/sd-webui-controlnet v1.1.455 (commit 56cec5b): scripts/controlnet.py
(Script.detectmap_proc with high_quality_resize, choose_input_image's from_rgba_to_input,
get_target_dimensions, get_pytorch_control), internal_controlnet/args.py (ControlNetUnit's
resize_mode aliases, parse_image, combine_image_and_mask), internal_controlnet/external_code.py
(resize_mode_from_value, pixel_perfect_resolution), scripts/lvminthin.py (nake_nms, lvmin_thin).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from .opencv import opencv
from .preprocessors import hwc3

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
DEFAULT_RESIZE_MODE = CROP_AND_RESIZE  # ControlNetUnit.resize_mode's default
_LEGACY_RESIZE_MODES = {  # the extension's resize_mode_aliases (its 1.0 labels)
    "Inner Fit (Scale to Fit)": CROP_AND_RESIZE,
    "Outer Fit (Shrink to Fit)": RESIZE_AND_FILL,
    "Scale to Fit (Inner Fit)": CROP_AND_RESIZE,
    "Envelope (Outer Fit)": RESIZE_AND_FILL,
}
_BY_KEY = {" ".join(k.lower().split()): v for k, v in {**{m: m for m in RESIZE_MODES}, **_LEGACY_RESIZE_MODES}.items()}


def resize_mode_from_value(value: str | int, field: str = "resize_mode") -> str:
    """One of RESIZE_MODES from a label, a legacy label or an integer: 0, 1, 2 in RESIZE_MODES' order
    and 3 (A1111 img2img's "Just resize (latent upscale)") as Just Resize, as the extension's
    resize_mode_from_value. It falls back to Just Resize for larger integers; we refuse them."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequestError(field, f"must be one of {', '.join(RESIZE_MODES)} or 0-3, not {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 3:
            raise InvalidRequestError(field, f"must be 0-3 ({', '.join(RESIZE_MODES)}), not {value}")
        return RESIZE_MODES[value] if value < 3 else JUST_RESIZE
    mode = _BY_KEY.get(" ".join(value.lower().split()))
    if mode is None:
        raise InvalidRequestError(field, f"unknown resize mode {value!r}; choose one of {', '.join(RESIZE_MODES)}")
    return mode


def aligned(size: int) -> int:
    """The extension's align_dim_latent: a generation dimension down to a multiple of 8 (the hint
    matches the latent's pixel size)."""
    return (int(size) // 8) * 8


def image_array(image: Image.Image) -> np.ndarray:
    """A decoded unit image or mask as the extension holds it (np.array of the decoded file): RGB,
    RGBA and L as they are, so that transparency is later composited over white (hwc3) as there.
    Modes np.array cannot give as 1, 3 or 4 channels (LA, P, I;16, CMYK...) go to RGBA when they
    carry transparency, else RGB; the extension would misread or refuse those."""
    if image.mode not in ("RGB", "RGBA", "L"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    return np.asarray(image, dtype=np.uint8)


def unit_input(image: np.ndarray, mask: np.ndarray | None = None, field: str = "") -> np.ndarray:
    """The RGB image a unit's preprocessor gets, from its image and optional mask (uint8 arrays).

    The extension makes the image RGB (RGBA over white), takes the mask's first channel (after the
    same) as alpha, and then, for the modules we run (not inpaint or CLIP ones): an alpha that is
    all <= 5 or all >= 250 (so no mask, or a blank or full one) leaves the image; any other mask
    *replaces* the image, as a grey picture ("canvas scribble mode": the UI's sketch canvas)."""
    rgb = hwc3(image, f"{field}image")
    if mask is None:
        return rgb
    alpha = hwc3(mask, f"{field}mask")[:, :, 0]
    if alpha.shape != rgb.shape[:2]:
        raise InvalidRequestError(
            f"{field}mask",
            f"is {alpha.shape[1]}x{alpha.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]}",
        )
    if (alpha <= 5).all() or (alpha >= 250).all():
        return rgb
    return np.repeat(alpha[:, :, None], 3, axis=2)


def pixel_perfect_resolution(image: np.ndarray, height: int, width: int, resize_mode: str) -> int:
    """The processor resolution pixel_perfect sets: the input's short side scaled as the resize mode
    will scale the image to the generation's (aligned) size; Resize and Fill takes the smaller
    scale (the whole image fits), the others the larger (the target is covered)."""
    raw_h, raw_w = image.shape[:2]
    k0 = float(aligned(height)) / float(raw_h)
    k1 = float(aligned(width)) / float(raw_w)
    k = min(k0, k1) if resize_mode == RESIZE_AND_FILL else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def _unique_colour_count(x: np.ndarray) -> int:
    packed = x[:, :, 0].astype(np.uint32) << 16 | x[:, :, 1].astype(np.uint32) << 8 | x[:, :, 2]
    return int(np.unique(packed).size)


def _nms(x: np.ndarray) -> np.ndarray:
    """lvminthin.nake_nms: keep a pixel where it is a maximum along a row, a column or a diagonal."""
    cv2 = opencv()
    directions = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    )
    y = np.zeros_like(x)
    for kernel in directions:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    return y


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    """Each hit-or-miss kernel in its four rotations, in the extension's order (all kernels at 0
    degrees, then all at 90, ...): the thinning removes pixels in place, so the order matters."""
    return [np.rot90(np.array(k, dtype=np.int32), k=turns) for turns in range(4) for k in kernels]


# lvminthin's hit-or-miss kernels: 1 must be set, -1 must be clear, 0 either.
_THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _thin_once(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clears, kernel after kernel, the pixels each one matches; whether any was cleared."""
    cv2 = opencv()
    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            x[hits] = 0
            changed = True
    return changed


def _thin(x: np.ndarray, prune: bool) -> np.ndarray:
    """lvminthin.lvmin_thin: thin a binary map to one-pixel lines (at most 32 passes), then prune spurs."""
    y = x.copy()
    for _ in range(32):
        if not _thin_once(y, _THINNING):
            break
    if prune:
        _thin_once(y, _PRUNING)
    return y


def high_quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """The extension's high_quality_resize of an RGB uint8 map to width x height.

    Maps of 3 to 199 colours (segmentations, poses) are resized nearest-neighbour; others by area to
    shrink and cubic otherwise. A two-colour map that is black-and-white (min < 16, max > 240) stays
    binary: its resized grey is thresholded by Otsu, and when it is made of one-pixel lines (an
    opening removes more than half of its set pixels, canny's maps) it is first thinned by NMS and
    after thresholding by lvmin's thinning (with pruning when enlarged)."""
    if x.shape[0] == height and x.shape[1] == width:
        return x
    cv2 = opencv()
    shrinks = width * height < x.shape[0] * x.shape[1]
    grows = width * height > x.shape[0] * x.shape[1]
    colours = _unique_colour_count(x)
    binary = colours == 2 and np.min(x) < 16 and np.max(x) > 240
    one_pixel_lines = False
    if binary:
        square = np.ones((3, 3), dtype=np.uint8)
        opened = cv2.dilate(cv2.erode(x, square, iterations=1), square, iterations=1)
        one_pixel_lines = np.count_nonzero(opened < x) * 2 > np.count_nonzero(x > 127)
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif shrinks:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if not binary:
        return y
    grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_lines:
        _, grey = cv2.threshold(_nms(grey), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        grey = _thin(grey, prune=grows)
    else:
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.stack([grey] * 3, axis=2)


def fit_detected_map(detected: np.ndarray, resize_mode: str, height: int, width: int) -> np.ndarray:
    """The detected map at the generation's (aligned) size, uint8 H x W x 3, as the extension's
    detectmap_proc makes it (and shows it among the result images):

    - Just Resize: stretched to the size;
    - Crop and Resize: scaled to cover the size, then its centre cut out;
    - Resize and Fill: scaled to fit inside, centred on the median colour of its border pixels.
    """
    x = hwc3(detected, "detected map")
    h, w = aligned(height), aligned(width)
    if resize_mode == JUST_RESIZE:
        return np.ascontiguousarray(high_quality_resize(x, w, h))
    old_h, old_w = float(x.shape[0]), float(x.shape[1])
    k0, k1 = float(h) / old_h, float(w) / old_w
    fill = resize_mode == RESIZE_AND_FILL
    k = min(k0, k1) if fill else max(k0, k1)
    # np.round as the extension's safeint; at least one pixel where it would resize to none.
    scaled = high_quality_resize(x, max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k))))
    new_h, new_w = scaled.shape[:2]
    if fill:
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        colour = np.median(borders, axis=0).astype(x.dtype)  # truncated, as the extension's astype
        canvas = np.tile(colour[None, None], [h, w, 1])
        top, left = max(0, (h - new_h) // 2), max(0, (w - new_w) // 2)
        canvas[top : top + new_h, left : left + new_w] = scaled
        return canvas
    top, left = max(0, (new_h - h) // 2), max(0, (new_w - w) // 2)
    return np.ascontiguousarray(scaled[top : top + h, left : left + w])


def hint_from_map(detected_map: np.ndarray) -> np.ndarray:
    """The ControlNet's controlnet_cond for one image: float32 (3, H, W) in [0, 1] (get_pytorch_control)."""
    return np.ascontiguousarray(detected_map.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
