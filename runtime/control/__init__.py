"""ControlNet control images without torch, as the A1111 ControlNet extension
(Mikubill/sd-webui-controlnet) makes them: its model-free preprocessor modules (modules.py: the one
table of names, labels and sliders; preprocessors.py: the operations on numpy + OpenCV), the resize
modes and hint preparation (hints.py), and one unit start to end (units.py).

OpenCV is the optional `controlnet` extra, imported on first use (opencv.py)."""

from .hints import (
    RESIZE_MODES,
    fit_detected_map,
    hint_from_map,
    image_array,
    pixel_perfect_resolution,
    resize_mode_from_value,
)
from .modules import MODULES, ModuleInfo, ModuleParams, find_module, module_list, resolve_params
from .preprocessors import numpy_seed, run_module
from .units import DetectedMap, UnitPlan, detect, plan_unit

__all__ = [
    "MODULES",
    "RESIZE_MODES",
    "DetectedMap",
    "ModuleInfo",
    "ModuleParams",
    "UnitPlan",
    "detect",
    "find_module",
    "fit_detected_map",
    "hint_from_map",
    "image_array",
    "module_list",
    "numpy_seed",
    "pixel_perfect_resolution",
    "plan_unit",
    "resize_mode_from_value",
    "resolve_params",
    "run_module",
]
