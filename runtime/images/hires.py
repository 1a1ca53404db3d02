"""Hires fix (A1111's enable_hr): what prepare() plans for the second pass. run() upscales the
first pass (latent or image upscaler), noises it with fresh generators of the same seeds and
samples img2img-style at the larger size."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from .. import registry
from ..errors import InvalidRequestError
from ..registry import UpscalerInfo
from ..sampling.schedules import Schedule
from .img2img import plan_denoise
from .inputs import check_strength, check_whole_number
from .metadata import infotext_number
from .model_upscale import check_upscale
from .upscale import target_size

MAX_SCALE = 8.0


@dataclass(frozen=True, eq=False)
class HiresPlan:
    upscaler: UpscalerInfo
    upscale_to: tuple[int, int]  # (height, width) the first pass is upscaled to, before truncation
    truncate: tuple[int, int]  # (x, y) latent cells cropped (A1111's truncate_x / truncate_y)
    width: int  # final image size
    height: int
    sampler: str
    schedule: Schedule  # already cut to the denoising strength
    strength: float
    prompt: str
    negative_prompt: str
    infotext: dict[str, Any]


def plan_hires(
    width: int,
    height: int,
    factor: int,
    make_schedule: Any,
    first_sampler: str,
    prompt: str,
    negative_prompt: str,
    steps: int,
    *,
    hr_scale: float = 2.0,
    hr_resize_x: int = 0,
    hr_resize_y: int = 0,
    hr_upscaler: str = "Latent",
    hr_second_pass_steps: int = 0,
    denoising_strength: float = 0.7,
    hr_prompt: str = "",
    hr_negative_prompt: str = "",
    hr_sampler_name: str | None = None,
    step_rule: str = "diffusers",
    max_pixels: int | None = None,
    upscalers: tuple[UpscalerInfo, ...] = (),
) -> HiresPlan:
    """Check the hires fields and lay out the second pass (A1111's calculate_target_resolution)."""
    if isinstance(hr_scale, bool) or not isinstance(hr_scale, int | float) or not 1.0 <= hr_scale <= MAX_SCALE:
        raise InvalidRequestError("hr_scale", f"must be a number in [1, {MAX_SCALE:g}], not {hr_scale!r}")
    resize_x = check_whole_number(hr_resize_x, "hr_resize_x")
    resize_y = check_whole_number(hr_resize_y, "hr_resize_y")
    upscaler = registry.upscaler(hr_upscaler, "hr_upscaler", upscalers)
    second_steps = check_whole_number(hr_second_pass_steps, "hr_second_pass_steps")
    strength = check_strength(denoising_strength, "denoising_strength")
    sampler = registry.sampler(hr_sampler_name, "hr_sampler_name").key if hr_sampler_name else first_sampler
    for name, text in (("hr_prompt", hr_prompt), ("hr_negative_prompt", hr_negative_prompt)):
        if not isinstance(text, str):
            raise InvalidRequestError(name, f"must be a string, not {type(text).__name__}")
    to_x, to_y, truncate_x, truncate_y = target_size(width, height, float(hr_scale), resize_x, resize_y, factor)
    latent_w, latent_h = to_x // factor - truncate_x, to_y // factor - truncate_y
    if latent_w < 1 or latent_h < 1 or to_x < width or to_y < height:
        raise InvalidRequestError("hr_resize_x", f"hires size {to_x}x{to_y} is smaller than the first pass")
    if upscaler.mode == registry.MODEL:
        scale = max(to_x / width, to_y / height)
        check_upscale(width, height, scale, upscaler, max_pixels, "hr_upscaler")
    # A1111 passes the hires pass its step count, so it always takes the img2img_fix_steps rule.
    schedule = plan_denoise(partial(make_schedule, sampler), second_steps or steps, strength, step_rule, True)
    # A1111's init() order: sampler, prompts, then the size, steps and upscaler.
    info: dict[str, Any] = {"Denoising strength": infotext_number(strength)}
    if sampler != first_sampler:
        info["Hires sampler"] = registry.sampler(sampler).name
    info["Hires prompt"] = hr_prompt if hr_prompt and hr_prompt != prompt else None
    info["Hires negative prompt"] = (
        hr_negative_prompt if hr_negative_prompt and hr_negative_prompt != negative_prompt else None
    )
    if resize_x == 0 and resize_y == 0:
        info["Hires upscale"] = infotext_number(float(hr_scale))
    else:
        info["Hires resize"] = f"{resize_x}x{resize_y}"
    info["Hires steps"] = second_steps or None
    info["Hires upscaler"] = upscaler.name
    info["Strength rule"] = "diffusers" if step_rule == "diffusers" and schedule.a1111_grid else None
    return HiresPlan(
        upscaler, (to_y, to_x), (truncate_x, truncate_y), latent_w * factor, latent_h * factor, sampler, schedule,
        strength, hr_prompt or prompt, hr_negative_prompt or negative_prompt, info,
    )  # fmt: skip
