"""diffusers' four samplers as small k-diffusion-style loops over a denoiser, in numpy (and, in the
same step-indexed form, A1111's timestep samplers of `runtime.sampling.timestep_samplers`).

All of them work on the variance-exploding sample ``x`` (``latent / sqrt(alpha_bar)``) and a
decreasing list of noise levels ``sigmas`` (see `runtime.sampling.schedules`). The denoiser maps ``(x, i)``
to the predicted clean sample at ``sigmas[i]``; the pipeline computes it as ``x - sigma * eps``
from the UNet's noise prediction. Each loop reproduces the update of the matching diffusers
scheduler step for step (same float32 sample arithmetic, same noise draws), so a pipeline built on
them gives diffusers' images for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .params import DDIM_ETA, SamplerParams
from .schedules import Schedule
from .steps import NoiseSource, StepCallback, as_f32, notify
from .timestep_samplers import ddim_noise, sample_ddim_cfgpp, sample_plms, sample_unipc

__all__ = [
    "SAMPLER_FUNCTIONS",
    "Denoiser",
    "NoiseSource",
    "StepCallback",
    "ancestral_step",
    "noise_draws",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
]

Denoiser = Callable[[np.ndarray, int], np.ndarray]
"""(x, step_index) -> denoised: the predicted clean sample (VE space) at ``sigmas[step_index]``."""

# diffusers' DPMSolverMultistepScheduler with its default lower_order_final=True also takes a
# first-order last step when the run is shorter than this, even if the schedule ends above 0.
_DPM_LOWER_ORDER_FINAL_BELOW = 15


def ancestral_step(sigma_from: float, sigma_to: float) -> tuple[np.float32, np.float32]:
    """(sigma_down, sigma_up) of an ancestral step, eta = 1, in float32 as diffusers computes them.

    ``sigma_up**2 = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2`` is the fresh noise
    to add and ``sigma_down = sqrt(sigma_to**2 - sigma_up**2)`` the level the deterministic Euler
    step aims at, so that the result is back at ``sigma_to``
    (`EulerAncestralDiscreteScheduler.step`, k-diffusion ``get_ancestral_step``).
    """
    s_from, s_to = np.float32(sigma_from), np.float32(sigma_to)
    up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    down = np.sqrt(np.maximum(s_to**2 - up**2, np.float32(0.0)))
    return np.float32(down), np.float32(up)


def sample_euler_ancestral(
    denoise: Denoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    noise: NoiseSource,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Euler ancestral (eta = 1), as `EulerAncestralDiscreteScheduler.step` and k-diffusion's
    ``sample_euler_ancestral``: an Euler step down to sigma_down, then fresh noise times sigma_up."""
    x = as_f32(x)
    sigmas = as_f32(sigmas)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, i)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1])
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_down - sigma)
        # Draw on *every* step, the last one included, where sigma_up is 0 and the draw is wasted:
        # diffusers' step() calls randn_tensor unconditionally (k-diffusion skips it when the next
        # sigma is 0). The image does not depend on that last draw, but the generator's position
        # does, and with one generator per image the following images of the same call draw from
        # where this one stopped.
        fresh = as_f32(noise())
        if sigma_up > 0:
            x = x + fresh * sigma_up
        x = as_f32(x)
        x = notify(callback, i, x)
    return x


def sample_euler(
    denoise: Denoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Euler (Karras et al. 2022, Algorithm 2 without churn), as `EulerDiscreteScheduler.step` with
    its default ``s_churn=0``: deterministic, so `noise` is never drawn from."""
    x = as_f32(x)
    sigmas = as_f32(sigmas)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        derivative = (x - denoise(x, i)) / sigma
        x = as_f32(x + derivative * (sigmas[i + 1] - sigma))
        x = notify(callback, i, x)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """DPM-Solver++(2M), as `DPMSolverMultistepScheduler` with its defaults (solver_order=2,
    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True) and k-diffusion's
    ``sample_dpmpp_2m``. Deterministic: `noise` is never drawn from.

    Why the VE form here equals diffusers' VP update: diffusers works on the VP latent
    ``z = alpha * x`` with ``alpha = 1 / sqrt(sigma**2 + 1)`` and ``sigma_vp = sigma * alpha``, and
    ``lambda = log(alpha / sigma_vp) = -log(sigma)``. Its data prediction
    ``(z - sigma_vp * eps) / alpha = x - sigma * eps`` is our ``denoised``. Its first-order step
    ``z' = (sigma_vp' / sigma_vp) z - alpha' (exp(-h) - 1) D`` with ``h = lambda' - lambda`` becomes,
    divided by ``alpha'``, ``x' = (sigma' / sigma) x - expm1(-h) D`` since
    ``sigma_vp' z / (sigma_vp alpha') = sigma' alpha x / sigma_vp = (sigma' / sigma) x``.
    The midpoint second-order step uses ``D = D0 + D1 / 2`` with ``D1 = (m0 - m1) / r``,
    ``r = h_last / h``, i.e. ``(1 + 1 / (2r)) m0 - m1 / (2r)``: k-diffusion's ``denoised_d``.
    The first step has no history and is first order; so is the last when the schedule ends at 0
    (there ``x' = denoised`` exactly, diffusers' ``final_sigmas_type="zero"``) or, following
    ``lower_order_final``, when the run has fewer than 15 steps.
    """
    x = as_f32(x)
    sigmas = as_f32(sigmas)
    steps = len(sigmas) - 1
    old_denoised: np.ndarray | None = None
    for i in range(steps):
        denoised = as_f32(denoise(x, i))
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if sigma_next == 0.0:
            x = denoised  # the h -> infinity limit of the first-order step
        else:
            h = math.log(sigma) - math.log(sigma_next)
            last_step = i == steps - 1 and steps < _DPM_LOWER_ORDER_FINAL_BELOW
            h_last = math.log(float(sigmas[i - 1])) - math.log(sigma) if i > 0 else 0.0
            if old_denoised is None or last_step or h == 0.0 or h_last == 0.0:
                blended = denoised
            else:
                half_inv_r = h / (2.0 * h_last)  # 1 / (2r)
                blended = as_f32((1.0 + half_inv_r) * denoised - half_inv_r * old_denoised)
            x = as_f32((sigma_next / sigma) * x - math.expm1(-h) * blended)
        old_denoised = denoised
        x = notify(callback, i, x)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    sigmas_to: np.ndarray | None = None,
    clip_denoised: float | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """DDIM with eta = 0, as `DDIMScheduler.step` (and A1111's ``ddim``). Deterministic, but for
    A1111's eta (`runtime.sampling.timestep_samplers.ddim_noise`: A1111's grids only, where `sigmas_to` is None).

    diffusers' VP update ``z' = sqrt(a') x0 + sqrt(1 - a') eps`` divided by ``sqrt(a')`` is
    ``x' = denoised + sigma' * eps``: in VE space DDIM is the Euler step. The result may stay
    above 0 (``set_alpha_to_one=False``: ``sigmas[-1]`` is timestep 0's level).

    `sigmas_to` (see `Schedule`) gives where each step lands when that is not ``sigmas[i + 1]``;
    the VP latent there is then read at the next level, i.e. rescaled by
    ``sqrt(sigmas[i+1]**2 + 1) / sqrt(sigmas_to[i]**2 + 1)``. `clip_denoised` clamps the prediction
    as diffusers' ``clip_sample`` does, leaving the noise direction unclipped.
    """
    x = as_f32(x)
    sigmas = as_f32(sigmas)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        target = sigmas[i + 1] if sigmas_to is None else np.float32(sigmas_to[i])
        denoised = as_f32(denoise(x, i))
        eps = (x - denoised) / sigma
        if clip_denoised is not None:
            denoised = np.clip(denoised, -clip_denoised, clip_denoised)
        if eta:
            x = ddim_noise(denoised, eps, float(sigma), float(target), eta, noise)
            x = notify(callback, i, x)
            continue
        x = as_f32(denoised + eps * target)
        if target != sigmas[i + 1]:
            scale = math.sqrt(float(sigmas[i + 1]) ** 2 + 1.0) / math.sqrt(float(target) ** 2 + 1.0)
            x = as_f32(x * np.float32(scale))
        x = notify(callback, i, x)
    return x


SAMPLER_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "euler_a": sample_euler_ancestral,
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "unipc": sample_unipc,  # A1111's (runtime.sampling.timestep_samplers)
    "ddim_cfgpp": sample_ddim_cfgpp,
    "plms": sample_plms,
}


def noise_draws(name: str, schedule: Schedule) -> int:
    """How many arrays `sample` draws from the noise source: one per step for ``euler_a`` (the
    last included, as in diffusers), none for the deterministic samplers."""
    return schedule.steps if name == "euler_a" else 0


def sample(
    name: str,
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    params: SamplerParams | None = None,
) -> np.ndarray:
    """Run sampler `name` over `schedule`, passing DDIM the schedule's extra fields and DDIM and
    DDIM CFG++ A1111's eta (`params`; planning refuses it on diffusers' own schedules).

    `x` is the initial VE sample (noise times ``schedule.init_noise_sigma``); the result is in VE
    space too: `runtime.sampling.schedules.final_latents` gives the latent to decode.
    """
    # Only A1111's DDIM and DDIM CFG++ take one of A1111's sampler parameters (eta) among these.
    keywords = (params or SamplerParams()).keywords(name) if name in DDIM_ETA else {}
    if name not in SAMPLER_FUNCTIONS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_FUNCTIONS)}")
    if name == "ddim":
        return sample_ddim(
            denoise,
            x,
            schedule.sigmas,
            noise,
            callback,
            sigmas_to=schedule.sigmas_to,
            clip_denoised=schedule.clip_denoised,
            **keywords,
        )
    if name == "euler_a" and noise is None:
        raise ValueError("euler_a needs a noise source")
    return SAMPLER_FUNCTIONS[name](denoise, x, schedule.sigmas, noise, callback, **keywords)
