"""One ControlNet unit's control image, start to end, as the extension's get_control runs it: check
the unit's module and parameters (before any work), read its image and mask, run the module at the
processor resolution (pixel perfect or the unit's), then fit the detected map to each generation size
(the first pass, and hires fix's second) as the (3, H, W) hint and the map the extension shows."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .hints import (
    DEFAULT_RESIZE_MODE,
    fit_detected_map,
    hint_from_map,
    pixel_perfect_resolution,
    resize_mode_from_value,
    unit_input,
)
from .modules import ModuleInfo, ModuleParams, find_module, resolve_params
from .opencv import opencv
from .preprocessors import run_module


@dataclass(frozen=True)
class UnitPlan:
    """A unit's checked module, parameters (the extension's bound check applied) and resize mode."""

    module: ModuleInfo
    params: ModuleParams
    resize_mode: str


def plan_unit(
    module: str = "none",
    resize_mode: str | int = DEFAULT_RESIZE_MODE,
    processor_res: float = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
    prefix: str = "",
) -> UnitPlan:
    """Checks a unit's module, resize mode and OpenCV's presence without touching an image; every
    error is one InvalidRequestError naming `prefix` + the field (module, resize_mode)."""
    info = find_module(module, f"{prefix}module")
    mode = resize_mode_from_value(resize_mode, f"{prefix}resize_mode")
    opencv(f"{prefix}module")
    return UnitPlan(info, resolve_params(info, processor_res, threshold_a, threshold_b), mode)


@dataclass(frozen=True)
class DetectedMap:
    """A unit's module output (uint8 h x w x 3 at the processor resolution) and how it was made."""

    image: np.ndarray
    plan: UnitPlan  # with the processor_res the module ran at (pixel perfect's, if set)

    def control(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(hint float32 (3, H, W) in [0, 1], shown map uint8 (H, W, 3)) for a generation size."""
        shown = fit_detected_map(self.image, self.plan.resize_mode, height, width)
        return hint_from_map(shown), shown


def detect(
    plan: UnitPlan,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    pixel_perfect_size: tuple[int, int] | None = None,
    seed: int = 0,
    prefix: str = "",
) -> DetectedMap:
    """Runs a planned unit's module on its image (and mask, see hints.unit_input).

    pixel_perfect_size: the first pass's (height, width) when the unit asks for pixel_perfect: the
    processor resolution then follows it (hires fix's pass reuses this map, as in the extension).
    seed: numpy's seed for shuffle (preprocessors.numpy_seed of the request; the extension's
    /controlnet/detect has none and draws from numpy's unseeded state, where we take 0).
    For /controlnet/detect pass no mask: the extension ignores masks there for these modules
    (none of them accepts_mask); the result's `image` is what that endpoint returns."""
    rgb = unit_input(image, mask, prefix)
    if pixel_perfect_size is not None:
        resolution = pixel_perfect_resolution(rgb, *pixel_perfect_size, plan.resize_mode)
        plan = replace(plan, params=replace(plan.params, processor_res=resolution))
    return DetectedMap(run_module(plan.module, rgb, plan.params, seed, f"{prefix}image"), plan)
