"""The ControlNet part of a request: ControlUnit as the ControlNet extension
(Mikubill/sd-webui-controlnet) takes it, and its checks. Every field of every enabled unit is checked
before any work, each mistake one InvalidRequestError naming the field (`controlnet[i].weight`).

Read from the extension's internal_controlnet/args.py (ControlNetUnit: fields, defaults, ranges,
legacy aliases) and scripts/controlnet.py (find_closest_lora_model_name, get_enabled_units), v1.1.455.
What differs on purpose: a value of the wrong type is an error here (pydantic coerces it there), and
a library ControlUnit is enabled unless it says otherwise (the extension's API default is off: the
server applies it, see runtime.server.mapping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..images.inputs import check_choice, load_image
from .hints import DEFAULT_RESIZE_MODE, unit_input
from .units import UnitPlan, plan_unit

# The extension's ControlMode values, by index (the API also takes the index: webuiapi sends it so).
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
BALANCED, PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT = range(3)
# HiResFixOption: which pass of hires fix a unit guides (without hires fix: the one pass).
HR_OPTIONS = ("Both", "Low res only", "High res only")
BOTH, LOW_RES_ONLY, HIGH_RES_ONLY = range(3)
# args.py legacy_field_alias and mask_alias: old names clients still send (the Photoshop plugin's
# input_image and lowvram; Forge's mask_image).
LEGACY_ALIASES = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "mask_image": "mask"}
MAX_WEIGHT = 2.0  # args.py: weight in [0, 2]
NO_MODEL = ("", "none")  # the extension's "None" entry: no model chosen


@dataclass
class ControlUnit:
    """One ControlNet unit, with the extension's field names and defaults (but `enabled`).

    `model` names an exported ControlNet (`python -m export --add-controlnet`) as /controlnet/model_list
    lists it ("name [hash]") or by its name; `image` is the control image (PIL image, array, path or
    encoded bytes; None in img2img: the init image, as the extension does); `module` the
    preprocessor run on it ("none": the image is the map). `control_mode`, `resize_mode` and
    `hr_option` take the extension's words or their index."""

    model: str = "None"
    image: Any = None
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "Balanced"
    resize_mode: str | int = DEFAULT_RESIZE_MODE
    processor_res: float = -1  # -1, or a value outside the module's slider: the module's default
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False  # processor_res from the image and generation sizes
    mask: Any = None  # a mask that is not blank or full replaces the image (the extension's "canvas scribble")
    hr_option: str | int = "Both"
    enabled: bool = True
    save_detected_map: bool = True  # the server appends the detected maps to its images
    low_vram: bool = False  # accepted; nothing to save here

    @classmethod
    def from_dict(cls, values: Any, field: str = "controlnet") -> ControlUnit:
        """A unit from the extension's API dict: legacy aliases read, unknown keys ignored (as its
        model ignores them), nulls as omitted; an alias beside its field is an error there too."""
        if not isinstance(values, dict):
            raise InvalidRequestError(field, f"must be a unit object, not {type(values).__name__}")
        values = {key: value for key, value in values.items() if value is not None}
        for alias, name in LEGACY_ALIASES.items():
            if alias in values:
                if name in values:
                    raise InvalidRequestError(f"{field}.{alias}", f"give {alias!r} or {name!r}, not both")
                values[name] = values.pop(alias)
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True, eq=False)
class CheckedUnit:
    """An enabled unit, checked: what planning needs, and the infotext entry."""

    field: str  # "controlnet[i]": what errors found later (the init image's) name
    model: str  # the export's ControlNet name
    plan: UnitPlan  # module, its parameters after the extension's bound check, resize mode
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: int
    hr_option: int
    pixel_perfect: bool
    save_detected_map: bool
    image: np.ndarray | None  # the module's input, (H, W, 3) uint8; None: the img2img init image
    infotext: str | None  # the extension's "ControlNet i" entry (None: it writes none)


def enabled_units(units: Any, max_units: int | None, field: str = "controlnet") -> list[tuple[str, ControlUnit]]:
    """(field, unit) of each enabled unit of `units` (ControlUnits or the extension's API dicts);
    `max_units` bounds how many are enabled (None: no bound)."""
    if units is None:
        return []
    if not isinstance(units, list | tuple):
        raise InvalidRequestError(field, f"must be a list of units, not {type(units).__name__}")
    names = [f"{field}[{index}]" for index in range(len(units))]
    given = [(name, unit if isinstance(unit, ControlUnit) else ControlUnit.from_dict(unit, name))
             for name, unit in zip(names, units, strict=True)]  # fmt: skip
    enabled = [(name, unit) for name, unit in given if _flag(unit.enabled, f"{name}.enabled")]
    if max_units is not None and len(enabled) > max_units:
        raise InvalidRequestError(
            field, f"{len(enabled)} enabled ControlNet units is more than the limit of {max_units} "
            "(--max-controlnet-units)",
        )  # fmt: skip
    return enabled


def check_unit(unit: ControlUnit, models: dict[str, str | None], field: str, init_image: bool) -> CheckedUnit:
    """One enabled unit checked and its image (and mask) read, no preprocessing yet. `models` maps
    the export's ControlNet names to their short hashes; `init_image`: an img2img init image stands
    in for a unit without an image."""
    model = find_model(unit.model, models, f"{field}.model")
    if not isinstance(unit.module, str):
        raise InvalidRequestError(f"{field}.module", f"must be a string, not {unit.module!r}")
    weight = _number(unit.weight, f"{field}.weight", 0.0, MAX_WEIGHT)
    start = _number(unit.guidance_start, f"{field}.guidance_start", 0.0, 1.0)
    end = _number(unit.guidance_end, f"{field}.guidance_end", 0.0, 1.0)
    if start > end:
        raise InvalidRequestError(f"{field}.guidance_start", f"{start:g} is after guidance_end {end:g}")
    # Typed as the extension's model types them (an int resolution, pydantic truncating; float
    # thresholds), so that the infotext writes what it writes.
    plan = plan_unit(
        unit.module, unit.resize_mode, int(_number(unit.processor_res, f"{field}.processor_res")),
        float(_number(unit.threshold_a, f"{field}.threshold_a")),
        float(_number(unit.threshold_b, f"{field}.threshold_b")), prefix=f"{field}.",
    )  # fmt: skip
    image = _unit_image(unit.image, unit.mask, field)
    if image is None and not init_image:
        raise InvalidRequestError(f"{field}.image", "is missing (only img2img has an image of its own to use)")
    control_mode = check_choice(unit.control_mode, f"{field}.control_mode", CONTROL_MODES)
    pixel_perfect = _flag(unit.pixel_perfect, f"{field}.pixel_perfect")
    entry = {
        "Module": unit.module, "Model": unit.model, "Weight": float(weight), "Resize Mode": plan.resize_mode,
        "Processor Res": plan.params.processor_res, "Threshold A": plan.params.threshold_a,
        "Threshold B": plan.params.threshold_b, "Guidance Start": float(start), "Guidance End": float(end),
        "Pixel Perfect": pixel_perfect, "Control Mode": CONTROL_MODES[control_mode],
    }  # fmt: skip
    return CheckedUnit(
        field=field, model=model, plan=plan, weight=float(weight), guidance_start=float(start),
        guidance_end=float(end), control_mode=control_mode,
        hr_option=check_choice(unit.hr_option, f"{field}.hr_option", HR_OPTIONS), pixel_perfect=pixel_perfect,
        save_detected_map=_flag(unit.save_detected_map, f"{field}.save_detected_map"),
        image=image, infotext=serialize(entry),
    )  # fmt: skip


def serialize(entry: dict[str, Any]) -> str | None:
    """The extension's ControlNetUnit.serialize(): "Key: value" pairs, each value str() of what its
    pydantic model holds ("Weight: 1.0"; a slider's default as the extension wrote it, "Processor
    Res: 512"). It writes nothing when a value holds ',' or ':'; neither do we."""
    text = {key: str(value) for key, value in entry.items()}
    if any("," in value or ":" in value for value in text.values()):
        return None
    return ", ".join(f"{key}: {value}" for key, value in text.items())


def find_model(name: Any, models: dict[str, str | None], field: str) -> str:
    """The export's ControlNet that `name` means, found as the extension finds a model
    (find_closest_lora_model_name): its listed title "name [hash]", its name in any case, else the
    shortest name that contains `name`. A title with another hash names another file: unknown."""
    if not isinstance(name, str):
        raise InvalidRequestError(field, f"must be a string, not {name!r}")
    if name.strip().lower() in NO_MODEL:
        raise InvalidRequestError(field, "no ControlNet model chosen; pick one of GET /controlnet/model_list")
    titles = {model_title(model, digest): model for model, digest in models.items()}
    by_name = {model.lower(): model for model in models}
    key = name.lower()
    containing = sorted((model for model in by_name if key in model), key=len)
    found = titles.get(name) or by_name.get(key) or (by_name[containing[0]] if containing else None)
    if found is None:
        listed = ", ".join(titles) or "none (add one: python -m export --add-controlnet FILE --output MODEL)"
        raise InvalidRequestError(field, f"unknown ControlNet model {name!r}; this model has: {listed}")
    return found


def model_title(name: str, digest: str | None) -> str:
    """The extension's listing of a model: "name [hash]" (A1111's short file hash)."""
    return f"{name} [{digest}]" if digest else name


def _unit_image(image: Any, mask: Any, field: str) -> np.ndarray | None:
    """The module's input from the unit's image and mask (hints.unit_input); None without an
    image (None or "", which webuiapi sends for none)."""
    if _absent(image):
        if not _absent(mask):
            raise InvalidRequestError(f"{field}.mask", "a mask needs an image")
        return None
    pixels = decoded_image(image, f"{field}.image")
    return unit_input(pixels, None if _absent(mask) else decoded_image(mask, f"{field}.mask"), f"{field}.")


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value)


def decoded_image(value: Any, field: str) -> np.ndarray:
    """Any image load_image takes, as RGBA uint8: the extension composites transparency over white
    (annotator's HWC3), which unit_input does."""
    return np.asarray(load_image(value, field, "RGBA"))


def _number(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidRequestError(field, f"must be a number, not {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        where = f"between {low:g} and {high:g}" if math.isfinite(low) else "a finite number"
        raise InvalidRequestError(field, f"must be {where}, not {value!r}")
    return value


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(field, f"must be true or false, not {value!r}")
    return value
