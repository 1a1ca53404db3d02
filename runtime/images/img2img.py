"""img2img and inpainting: what prepare() plans (init pixels, latent mask, overlay) and the numpy
steps run() applies (noising the init latents, blending them in outside the mask, pasting the
result over the original).

The latent process follows diffusers' StableDiffusionImg2ImgPipeline (or A1111's step rule) and,
for masks, the 4-channel-UNet path of StableDiffusionInpaintPipeline (the noised init latents are
blended in outside the mask after every step; DPM adaptive blends as A1111 does); the pixel-side
options (mask blur, masked content, "only masked" crop, overlay of the original) follow A1111's
img2img.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from ..sampling.schedules import Schedule, slice_schedule
from . import inputs

FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)  # A1111's inpainting_fill


@dataclass(frozen=True, eq=False)
class Overlay:
    """What the decoded image is pasted onto: A1111's apply_overlay."""

    original: Image.Image  # the init image as given (RGB)
    mask: np.ndarray  # (H0, W0) float32 in [0, 1]: 1 takes the generated pixel
    paste_box: tuple[int, int, int, int] | None  # "only masked": where the generated image goes


@dataclass(frozen=True, eq=False)
class InitPlan:
    pixels: np.ndarray  # (1, 3, H, W) float32 in [-1, 1]: what the VAE encodes
    strength: float
    latent_mask: np.ndarray | None  # (1, 1, h, w) float32: 1 where the image is repainted
    fill: int
    overlay: Overlay | None
    infotext: dict[str, Any]


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """diffusers: the init image's size rounded down to the VAE's multiple."""
    return image.width // multiple * multiple, image.height // multiple * multiple


def plan_init(
    image: Any,
    mask_image: Any,
    width: int,
    height: int,
    *,
    strength: float,
    resize_mode: Any = 0,
    mask_blur: Any = 4,
    inpainting_fill: Any = ORIGINAL,
    inpaint_full_res: bool = False,
    inpaint_full_res_padding: Any = 32,
    inpainting_mask_invert: bool = False,
    latent_factor: int = 8,
) -> InitPlan:
    """Check and lay out the init image (and mask) for a width x height generation."""
    original = inputs.load_image(image, "image")
    mode = inputs.check_choice(resize_mode, "resize_mode", inputs.RESIZE_MODES)
    info: dict[str, Any] = {"Denoising strength": strength}
    if mask_image is None:
        pixels = inputs.to_model_pixels(inputs.resize_image(mode, original, width, height))
        return InitPlan(pixels, strength, None, ORIGINAL, None, info)
    fill = inputs.check_choice(inpainting_fill, "inpainting_fill", inputs.INPAINTING_FILLS)
    blur = inputs.check_whole_number(mask_blur, "mask_blur")
    padding = inputs.check_whole_number(inpaint_full_res_padding, "inpaint_full_res_padding")
    mask = inputs.load_image(mask_image, "mask_image", "L")
    if mask.size != original.size:
        raise InvalidRequestError(
            "mask_image", f"is {mask.width}x{mask.height} but the image is {original.width}x{original.height}"
        )
    mask_array = np.where(np.asarray(mask) > 128, 255, 0).astype(np.uint8)  # A1111's create_binary_mask
    if inpainting_mask_invert:
        mask_array = 255 - mask_array
    mask_array = inputs.gaussian_blur(mask_array, blur)
    mask = Image.fromarray(mask_array)
    paste_box = None
    if inpaint_full_res:
        box = inputs.crop_region(mask_array, padding)
        if box is None:
            raise InvalidRequestError("mask_image", "is empty: nothing to inpaint in the 'only masked' area")
        paste_box = inputs.expand_crop_region(box, width, height, mask.width, mask.height)
        overlay_mask = mask_array
        work_mask = inputs.resize_image(2, mask.crop(paste_box), width, height)
        work_image = inputs.resize_image(2, original.crop(paste_box), width, height)
    else:
        work_mask = inputs.resize_image(mode, mask, width, height)
        overlay_mask = np.clip(np.asarray(work_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        work_image = inputs.resize_image(mode, original, width, height)
        original = work_image
    if fill != ORIGINAL:  # A1111 paints the hole for every mode but "original"
        work_image = inputs.fill_masked(work_image, work_mask)
    latent_size = (width // latent_factor, height // latent_factor)
    latent = np.asarray(work_mask.convert("RGB").resize(latent_size), dtype=np.float32)[..., 0] / 255
    latent_mask = np.around(latent)[None, None].astype(np.float32)
    info.update(_mask_infotext(blur, fill, inpaint_full_res, padding, inpainting_mask_invert))
    overlay = Overlay(original, overlay_mask.astype(np.float32) / 255, paste_box)
    return InitPlan(inputs.to_model_pixels(work_image), strength, latent_mask, fill, overlay, info)


def _mask_infotext(blur: int, fill: int, full_res: bool, padding: int, invert: bool) -> dict[str, Any]:
    """A1111's inpainting infotext fields."""
    return {
        "Mask blur": blur,
        "Inpaint area": "Only masked" if full_res else None,
        "Masked area padding": padding if full_res else None,
        "Mask mode": "Inpaint not masked" if invert else None,
        "Masked content": inputs.INPAINTING_FILLS[fill] if fill != ORIGINAL else None,
    }


STEP_RULES = ("diffusers", "a1111")


def start_step(steps: int, strength: float) -> int:
    """diffusers' get_timesteps: int(steps * strength) steps run, from the end of the schedule."""
    return steps - min(int(steps * strength), steps)


def a1111_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """(schedule length, t_enc) of A1111's img2img (sd_samplers_common.setup_img2img_steps): the
    schedule has `steps` levels and t_enc = int(min(strength, 0.999) * steps), or with
    "img2img_fix_steps" (always for the hires pass) int(steps / min(strength, 0.999)) levels and
    t_enc = steps - 1. The sampler then runs the last t_enc + 1 steps of it: one more than
    diffusers' rule, starting one level noisier."""
    capped = min(strength, 0.999)
    if fix_steps:
        return (int(steps / capped) if strength > 0 else 0), steps - 1
    return steps, int(capped * steps)


def plan_denoise(make: Any, steps: int, strength: float, rule: str, fix_steps: bool = False) -> Schedule:
    """The schedule an img2img (or hires) pass runs at `strength`: `make(n, t_enc=None)` builds an
    n-step schedule, or with t_enc A1111's img2img run of it (`runtime.sampling.schedules.make_schedule`).
    "a1111" is A1111's rule for A1111's grids (k-diffusion schedules and the timestep samplers);
    "diffusers" (and diffusers' own schedules, which have no A1111 form) keeps diffusers'
    get_timesteps."""
    if rule == "a1111":
        total, t_enc = a1111_steps(steps, strength, fix_steps)
        schedule = make(max(total, 1), t_enc)
        if schedule.a1111_grid:
            return schedule
    schedule = make(steps)
    return slice_schedule(schedule, start_step(schedule.steps, strength))


def noised_init(x0: np.ndarray, noise: np.ndarray, schedule: Schedule) -> np.ndarray:
    """The init latents noised for the run's first step, in VE space at ``sigmas[0]``: x0 + noise *
    sigmas[0]; for A1111's timestep samplers noised to ``init_sigma`` (one grid step higher), and
    that VP latent read at ``sigmas[0]`` (scaled by sqrt(sigmas[0]**2 + 1) / sqrt(init_sigma**2 + 1))."""
    if schedule.init_sigma is None:
        return (x0 + noise * np.float32(schedule.sigmas[0])).astype(np.float32)
    level, start = schedule.init_sigma, float(schedule.sigmas[0])
    scale = math.sqrt(start * start + 1.0) / math.sqrt(level * level + 1.0)
    return ((x0 + noise * np.float32(level)) * np.float32(scale)).astype(np.float32)


def encode_sample(moments: np.ndarray, draws: list[np.ndarray], scaling: float) -> np.ndarray:
    """diffusers' DiagonalGaussianDistribution.sample(generator) per image, times the VAE's
    scaling factor: mean + exp(logvar / 2) * randn, logvar clamped to [-30, 20]."""
    mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)
    std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0)).astype(np.float32)
    return np.concatenate([(mean + std * draw) * np.float32(scaling) for draw in draws]).astype(np.float32)


def fill_latents(x0: np.ndarray, noise: np.ndarray, plan: InitPlan) -> np.ndarray:
    """A1111's latent masked-content modes."""
    if plan.latent_mask is None:
        return x0
    keep = 1 - plan.latent_mask
    if plan.fill == LATENT_NOISE:
        return x0 * keep + noise * plan.latent_mask
    if plan.fill == LATENT_NOTHING:
        return x0 * keep
    return x0


# Samplers that inpaint as A1111 does (its CFGDenoiser blends the init latents into every denoised
# prediction, its img2img sample() once more into the result): DPM adaptive picks its levels as it
# runs, so the per-step blend below, which noises the init latents to each step's end, has no level.
DENOISER_MASK_SAMPLERS = ("dpm_adaptive",)


def keep_known(latents: np.ndarray, x0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's inpainting blend: the init latents outside the mask, `latents` inside."""
    return (x0 * (1 - mask) + mask * latents).astype(np.float32)


def blend(x: np.ndarray, x0: np.ndarray, noise: np.ndarray, sigma: float, mask: np.ndarray) -> np.ndarray:
    """diffusers' 4-channel inpainting: outside the mask, the init latents noised to the level
    the next step starts at (VE space: x0 + sigma * noise)."""
    known = x0 + noise * np.float32(sigma) if sigma > 0 else x0
    return ((1 - mask) * known + mask * x).astype(np.float32)


def apply_overlay(pixels: np.ndarray, overlay: Overlay) -> np.ndarray:
    """Paste the generated image (H, W, 3 float) over the original, through the mask."""
    original = np.asarray(overlay.original, dtype=np.float32) / 255
    if overlay.paste_box is None:
        generated = pixels
    else:
        x1, y1, x2, y2 = overlay.paste_box
        tile = Image.fromarray((pixels * 255).round().astype(np.uint8))
        tile = inputs.resize_image(1, tile, x2 - x1, y2 - y1)
        canvas = overlay.original.copy()
        canvas.paste(tile, (x1, y1))
        generated = np.asarray(canvas, dtype=np.float32) / 255
    mask = overlay.mask[..., None]
    return (generated * mask + original * (1 - mask)).astype(np.float32)
