"""How ControlNet residuals enter the UNet at each sampler call, as the ControlNet extension's hook
computes them (Mikubill/sd-webui-controlnet v1.1.455, scripts/hook.py, UnetHook.forward and
guidance_schedule_handler), and as diffusers' StableDiffusionControlNetPipeline does for the
Balanced mode:

- every active unit's ControlNet runs on the UNet's own scaled sample, timestep and text context,
  for each CFG half; its residuals times the unit's scales are summed over the units and added to
  the UNet's skip connections and middle block;
- scales: the weight for every residual (Balanced); "My prompt is more important" and "ControlNet
  is more important" use soft injection, weight * 0.825 ** (12 - i) for residual i (SD1.x's 13:
  the middle block's gets the full weight), and so does the hires pass of a unit whose module is a
  canny or mlsd one (the extension forces it there);
- "ControlNet is more important" also injects on the conditional halves only (the uncond half's
  residuals are zero, cfg_injection): the ControlNet is not run on the uncond half at all;
- guidance_start / guidance_end: the extension's rule (step_rule "a1111") is A1111's
  `sampling_step / sampling_steps` outside [start, end] => off, where sampling_step is the index of
  the last finished step (0 until the first one ends) and sampling_steps the pass's step count
  (txt2img: the requested steps; img2img and hires: the steps that run); diffusers' rule (the
  library's default, step_rule "diffusers") is `i / n < start or (i + 1) / n > end` => off for
  step i of n. Within a step every model call sees the same window here; A1111 advances its step
  count between the two calls of Heun-type samplers, so those may switch one call later there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .hints import hint_from_map
from .request import BALANCED, CONTROLNET_MORE_IMPORTANT, CheckedUnit

SOFT_INJECTION_BASE = 0.825
# hook.py forces soft injection in the hires pass for these modules ("reduces artifacts" there).
HIRES_SOFT_MODULES = ("canny", "mlsd")

ControlNetRun = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Sequence[np.ndarray]]
"""(sample, timestep, context, control image) -> residuals in the UNet's input order."""


def control_scales(weight: float, count: int, soft: bool) -> list[float]:
    """The scale of each of `count` residuals: the weight, or hook.py's soft injection
    `weight * 0.825 ** (12 - i)` (zip()-ed with the residuals there, so for other counts too)."""
    if soft:
        return [weight * SOFT_INJECTION_BASE ** float(12 - index) for index in range(count)]
    return [weight] * count


def in_window(rule: str, finished: int, steps: int, start: float, end: float) -> bool:
    """Whether a unit guides the next model call, `finished` steps of `steps` into the pass (see
    the module docstring for the two rules)."""
    if rule == "a1111":
        fraction = max(finished - 1, 0) / steps  # A1111's state.sampling_step: the last finished step
        return not (fraction < start or fraction > end)
    return not (finished / steps < start or (finished + 1) / steps > end)


@dataclass(eq=False)
class PassUnit:
    """One unit in one sampling pass: its ControlNet, its control image at the pass's size and
    the scales and halves the mode gives it there."""

    run: ControlNetRun
    hint: np.ndarray  # (1, 3, H, W) float32 in [0, 1]
    weight: float
    soft: bool
    cond_only: bool
    start: float
    end: float


def pass_unit(
    unit: CheckedUnit, detected_map: np.ndarray, run: ControlNetRun, hires_pass: bool, pooled: bool = False
) -> PassUnit:
    """A checked unit in one pass, its detected map (uint8, the pass's size) as the ControlNet's
    image. `pooled`: a global-average-pooling ControlNet (the shuffle models), which hook.py applies
    to the conditional halves only, as cfg injection."""
    forced = hires_pass and any(word in unit.plan.module.name for word in HIRES_SOFT_MODULES)
    return PassUnit(
        run, hint_from_map(detected_map)[None], unit.weight, unit.control_mode != BALANCED or forced,
        unit.control_mode == CONTROLNET_MORE_IMPORTANT or pooled, unit.guidance_start, unit.guidance_end,
    )  # fmt: skip


@dataclass(eq=False)
class PassControl:
    """The units of one pass, and how far the pass is (the sampler's step callback tells it)."""

    units: list[PassUnit]
    rule: str
    steps: int  # the pass's step count as `rule` counts it
    finished: int = field(default=0)

    def step_done(self, step: int) -> None:
        """The sampler finished step `step` (from 0)."""
        self.finished = step + 1

    def residuals(
        self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray, uncond_rows: int
    ) -> list[np.ndarray] | None:
        """The summed residuals for one UNet call of `sample` rows, the first `uncond_rows` of them
        the uncond half (0 when the call holds none); None when no unit guides this call."""
        total: list[np.ndarray] | None = None
        rows = len(sample)
        for unit in self.units:
            if not in_window(self.rule, self.finished, max(self.steps, 1), unit.start, unit.end):
                continue
            skip = uncond_rows if unit.cond_only else 0
            if skip >= rows:
                continue  # an uncond-only call: this unit adds nothing to it
            hint = np.repeat(unit.hint, rows - skip, axis=0)
            outputs = unit.run(sample[skip:], timestep[skip:], context[skip:], hint)
            scales = control_scales(unit.weight, len(outputs), unit.soft)
            scaled = [_pad_rows(out * np.float32(scale), skip) for out, scale in zip(outputs, scales, strict=True)]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
        return total


def _pad_rows(residual: np.ndarray, rows: int) -> np.ndarray:
    """Zero residuals for the first `rows` rows (the uncond half, under cfg injection)."""
    if not rows:
        return residual
    return np.concatenate([np.zeros((rows, *residual.shape[1:]), dtype=residual.dtype), residual])
