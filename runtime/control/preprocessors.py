"""The ControlNet extension's model-free preprocessors, on numpy and OpenCV, as it runs them.

Each takes the unit's RGB image (uint8, H x W x 3) and gives the detected map (uint8, h x w x 3) at
the processor resolution, the way Mikubill/sd-webui-controlnet v1.1.455 (commit 56cec5b) does in
scripts/preprocessor/model_free_preprocessors.py (none, canny, invert, blur_gaussian, scribble_xdog,
shuffle), scripts/preprocessor/legacy/processor.py (threshold, tile_resample, lineart_standard) and
annotator/shuffle + annotator/util.make_noise_disk: most resize the image so that its short side is
the processor resolution, pad it to a multiple of 64 by repeating the edge, run the operation, and
cut the padding off again (scripts/utils.resize_image_with_pad).

Where the extension would crash (a resize to zero pixels) we keep one pixel; where its resize would
make a map of more than MAX_INPUT_PIXELS (a very thin image at a high resolution) we refuse the image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidRequestError
from ..images.inputs import MAX_INPUT_PIXELS
from .modules import ModuleInfo, ModuleParams
from .opencv import opencv

Preprocessor = Callable[[np.ndarray, ModuleParams, int], np.ndarray]


def hwc3(image: np.ndarray, field: str = "image") -> np.ndarray:
    """annotator/util.HWC3: grey -> RGB, RGBA -> RGB composited over white (as the extension reads
    every unit image), uint8 only."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidRequestError(field, "must be a uint8 image array")
    x = image[:, :, None] if image.ndim == 2 else image
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4) or 0 in x.shape[:2]:
        raise InvalidRequestError(field, f"must be an H x W grey, RGB or RGBA image, not shape {image.shape}")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _pad64(size: int) -> int:
    return int(np.ceil(float(size) / 64.0) * 64 - size)


def _resized_size(raw_h: int, raw_w: int, resolution: float) -> tuple[float, int, int]:
    """(scale, height, width) of an image whose short side goes to `resolution`."""
    k = float(resolution) / float(min(raw_h, raw_w))
    return k, max(1, int(np.round(float(raw_h) * k))), max(1, int(np.round(float(raw_w) * k)))


def resize_with_pad(image: np.ndarray, resolution: float) -> tuple[np.ndarray, int, int]:
    """(image resized so that its short side is `resolution` and edge-padded to multiples of 64,
    the resized height, the resized width): the padding is cut off with [:height, :width]."""
    cv2 = opencv()
    k, height, width = _resized_size(*image.shape[:2], resolution)
    # Cubic to enlarge, area to shrink: the extension's choice (k == 1 counts as shrinking).
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    padded = np.pad(resized, [[0, _pad64(height)], [0, _pad64(width)], [0, 0]], mode="edge")
    return padded, height, width


def _none(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    return image


def _invert(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    return 255 - image


def _canny(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    cv2 = opencv()
    padded, height, width = resize_with_pad(image, params.processor_res)
    # The sliders are floats; the extension passes int() of them (truncated) to OpenCV.
    edges = cv2.Canny(padded, int(params.threshold_a), int(params.threshold_b))
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)[:height, :width]


def _threshold(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    padded, height, width = resize_with_pad(image, params.processor_res)
    result = np.zeros_like(padded)
    result[np.min(padded, axis=2) > params.threshold_a] = 255
    return result[:height, :width]


def _blur_gaussian(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    padded, height, width = resize_with_pad(image, params.processor_res)
    return opencv().GaussianBlur(padded[:height, :width], (0, 0), float(params.threshold_a))


def _tile_resample(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    """The input itself below a rate of 1.1, else shrunk by the rate (area); no processor resolution."""
    rate = params.threshold_a
    if rate < 1.1:
        return image
    height = max(1, int(float(image.shape[0]) / float(rate)))
    width = max(1, int(float(image.shape[1]) / float(rate)))
    cv2 = opencv()
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _scribble_xdog(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    cv2 = opencv()
    padded, height, width = resize_with_pad(image, params.processor_res)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded)
    # uint8 arithmetic, as the extension's: 2 * (255 - dog) wraps around past 255.
    result[2 * (255 - dog) > params.threshold_a] = 255
    return result[:height, :width]


def _lineart_standard(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    padded, height, width = resize_with_pad(image, params.processor_res)
    x = padded.astype(np.float32)
    blurred = opencv().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    # The median of the lines' strength (over the padded image, as the extension takes it) sets the
    # scale; 16 when no pixel is above 8 (the extension's max(16, nan)).
    lines = intensity[intensity > 8]
    intensity /= max(16, float(np.median(lines))) if lines.size else 16
    intensity *= 127
    grey = intensity.clip(0, 255).astype(np.uint8)[:height, :width]
    return np.repeat(grey[:, :, None], 3, axis=2)


def _noise_disk(rng: np.random.RandomState, height: int, width: int, cell: int) -> np.ndarray:
    """annotator/util.make_noise_disk with one channel: uniform noise on a coarse grid, upscaled
    (cubic) and normalised to [0, 1], as (height, width, 1) float64."""
    cv2 = opencv()
    noise = rng.uniform(low=0, high=1, size=((height // cell) + 2, (width // cell) + 2, 1))
    noise = cv2.resize(noise, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell : cell + height, cell : cell + width]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def _shuffle(image: np.ndarray, params: ModuleParams, seed: int) -> np.ndarray:
    """ContentShuffleDetector: the image remapped through two smooth noise fields (cell 256). The
    extension draws them from numpy's global generator after np.random.seed(seed): a RandomState
    seeded alike gives the same numbers without touching global state."""
    cv2 = opencv()
    padded, height, width = resize_with_pad(image, params.processor_res)
    img = np.ascontiguousarray(padded[:height, :width])
    rng = np.random.RandomState(seed)
    x = _noise_disk(rng, height, width, 256) * float(width - 1)
    y = _noise_disk(rng, height, width, 256) * float(height - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


# The modules that resize the image to the processor resolution first (resize_with_pad).
AT_PROCESSOR_RESOLUTION = frozenset(
    ("canny", "threshold", "blur_gaussian", "scribble_xdog", "lineart_standard", "shuffle")
)
PREPROCESSORS: dict[str, Preprocessor] = {
    "none": _none,
    "invert": _invert,
    "canny": _canny,
    "threshold": _threshold,
    "blur_gaussian": _blur_gaussian,
    "tile_resample": _tile_resample,
    "scribble_xdog": _scribble_xdog,
    "lineart_standard": _lineart_standard,
    "shuffle": _shuffle,
}


def run_module(
    module: ModuleInfo, image: np.ndarray, params: ModuleParams, seed: int = 0, field: str = "image"
) -> np.ndarray:
    """The module's detected map (uint8, h x w x 3) of `image` (grey, RGB or RGBA uint8: made RGB
    first as the extension reads unit images). `seed` is the numpy seed shuffle draws from
    (see numpy_seed); the other modules ignore it."""
    rgb = np.ascontiguousarray(hwc3(image, field))
    if module.name in AT_PROCESSOR_RESOLUTION:
        _, height, width = _resized_size(*rgb.shape[:2], params.processor_res)
        if (height + _pad64(height)) * (width + _pad64(width)) > MAX_INPUT_PIXELS:
            raise InvalidRequestError(
                field,
                f"a {rgb.shape[1]}x{rgb.shape[0]} image at processor resolution {params.processor_res} "
                f"would be {width}x{height} pixels",
            )
    return np.ascontiguousarray(PREPROCESSORS[module.name](rgb, params, seed))


def numpy_seed(seed: int, subseed: int, first_seed: int) -> int:
    """The seed the extension gives numpy before a unit's preprocessor (controlnet.py
    set_numpy_seed): the request's seed and subseed, each -1 replaced by the generation's first
    image seed (its subseed too, as the extension does), summed modulo 2**32."""
    seed_part = int(first_seed if seed == -1 else max(int(seed), 0))
    subseed_part = int(first_seed if subseed == -1 else max(int(subseed), 0))
    return (seed_part + subseed_part) & 0xFFFFFFFF
