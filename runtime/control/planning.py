"""A generation's ControlNet units planned once, in prepare(): each unit's input (its image, or the
img2img init image), its module run once, and the detected map fitted to each pass's size, as the
ControlNet extension's get_control does (scripts/controlnet.py, v1.1.455):

- no unit image in img2img: the init image, fitted with A1111's img2img resize mode;
- inpainting "only masked": the input is fitted to the init image's size, the masked area's box
  cut out and fitted to the generation size ("Resize and fill"), as try_crop_image_with_a1111_mask
  does (we cut the box the inpainting itself uses);
- pixel perfect: the processor resolution from the input and the first pass's size;
- hires fix: the same detected map fitted to the second pass's size as well; the detected maps shown
  are the hires one then the first pass's, per unit that keeps them (save_detected_map).

The maps travel in the Prepared as uint8 (what the extension shows); runtime.control.injection makes
them the ControlNets' (3, H, W) float images in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from ..images.img2img import InitPlan
from ..images.inputs import resize_image
from .hints import RESIZE_MODES, resize_mode_from_value, unit_input
from .preprocessors import numpy_seed
from .request import BOTH, HIGH_RES_ONLY, LOW_RES_ONLY, CheckedUnit, decoded_image
from .units import detect

RESIZE_AND_FILL = RESIZE_MODES.index("Resize and Fill")


@dataclass(frozen=True, eq=False)
class UnitMaps:
    """One unit's detected map at each pass's size."""

    unit: CheckedUnit
    first: np.ndarray  # (H, W, 3) uint8 at the first pass's size
    hires: np.ndarray | None  # at the hires pass's size (hires fix only)


@dataclass(frozen=True, eq=False)
class ControlPlan:
    units: tuple[UnitMaps, ...]
    rule: str  # how guidance_start / guidance_end count steps: "diffusers" or "a1111" (injection.in_window)

    @property
    def detected_maps(self) -> list[np.ndarray]:
        """What the extension appends to the result images: per unit that keeps them, the hires
        pass's map (hires fix) then the first pass's."""
        maps = []
        for item in self.units:
            if item.unit.save_detected_map:
                maps += [item.hires, item.first] if item.hires is not None else [item.first]
        return maps

    def pass_units(self, hires_pass: bool) -> list[tuple[CheckedUnit, np.ndarray]]:
        """(unit, map) of each unit guiding this pass: hr_option picks the passes of hires fix
        (without it every unit guides the one pass, as the extension forces "Both")."""
        if not hires_pass:
            wanted = (BOTH, LOW_RES_ONLY) if self._hires else (BOTH, LOW_RES_ONLY, HIGH_RES_ONLY)
            return [(item.unit, item.first) for item in self.units if item.unit.hr_option in wanted]
        return [(item.unit, item.hires) for item in self.units
                if item.hires is not None and item.unit.hr_option in (BOTH, HIGH_RES_ONLY)]  # fmt: skip

    @property
    def _hires(self) -> bool:
        return any(item.hires is not None for item in self.units)

    def infotext(self) -> dict[str, Any]:
        """The extension's "ControlNet i" entries (i counts the enabled units), and "ControlNet rule:
        diffusers" where diffusers' step rule changes which steps a unit guides."""
        entries: dict[str, Any] = {f"ControlNet {index}": item.unit.infotext for index, item in enumerate(self.units)}
        windowed = any(item.unit.guidance_start > 0 or item.unit.guidance_end < 1 for item in self.units)
        entries["ControlNet rule"] = "diffusers" if self.rule == "diffusers" and windowed else None
        return entries


def plan_control(
    units: tuple[CheckedUnit, ...],
    width: int,
    height: int,
    hires_size: tuple[int, int] | None,
    init: InitPlan | None,
    init_image: Any,
    init_resize_mode: Any,
    first_seed: int,
    rule: str,
) -> ControlPlan | None:
    """Every unit's detected maps. `hires_size`: the second pass's (width, height); `init` and
    `init_image`: img2img's plan and image as given, `init_resize_mode` A1111's img2img resize
    mode (0-3); `first_seed`: the first image's seed, which seeds numpy for shuffle as the
    extension does (its subseed -1: the same seed)."""
    if not units:
        return None
    seed = numpy_seed(first_seed, -1, first_seed)
    init_rgb = None
    planned = []
    for unit in units:
        rgb, mode = unit.image, unit.plan.resize_mode
        if rgb is None:  # check_unit made sure there is an init image
            if init_rgb is None:
                init_rgb = unit_input(decoded_image(init_image, "image"), None, "")
            rgb, mode = init_rgb, resize_mode_from_value(init_resize_mode, "resize_mode")
        if init is not None and init.overlay is not None and init.overlay.paste_box is not None:
            rgb = only_masked(rgb, mode, init.overlay.original.size, init.overlay.paste_box, width, height)
        plan = replace(unit.plan, resize_mode=mode)
        detected = detect(plan, rgb, None, (height, width) if unit.pixel_perfect else None, seed, f"{unit.field}.")
        first = detected.control(height, width)[1]
        hires = detected.control(hires_size[1], hires_size[0])[1] if hires_size is not None else None
        planned.append(UnitMaps(replace(unit, image=None), first, hires))  # the input is done with: not carried
    return ControlPlan(tuple(planned), rule)


def only_masked(
    rgb: np.ndarray, mode: str, size: tuple[int, int], box: tuple[int, int, int, int], width: int, height: int
) -> np.ndarray:
    """try_crop_image_with_a1111_mask: the input fitted to the init image's size with its resize
    mode, the inpainting box cut out, and that fitted to the generation size by Resize and fill
    (A1111's resize_image, LANCZOS)."""
    image = resize_image(RESIZE_MODES.index(mode), Image.fromarray(rgb), *size)
    return np.asarray(resize_image(RESIZE_AND_FILL, image.crop(box), width, height))
