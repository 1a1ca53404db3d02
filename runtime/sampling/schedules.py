"""Noise schedules for every sampler, in k-diffusion's variance-exploding ("VE") form: the names,
the checks, and `make_schedule`, which picks the discretization (diffusers' own in
`runtime.sampling.diffusers_schedules`, A1111's schedule types in `runtime.sampling.a1111_schedules`,
both on the training tables of `runtime.sampling.noise_levels`).

Every schedule is expressed as noise levels ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` over the
VE sample ``x = latent / sqrt(alpha_bar)``. The pipeline feeds the UNet ``x / sqrt(sigma**2 + 1)``
(the VP latent) with the matching timestep and turns its noise prediction ``eps`` into the
denoised sample ``x - sigma * eps``; the samplers in `runtime.sampling.samplers` only ever see sigmas.

Three discretizations are offered:

``"model"``
    Exactly what the diffusers scheduler that matches the sampler (`EulerAncestralDiscreteScheduler`,
    `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler`, `DDIMScheduler`) computes after
    ``X.from_config(pipe.scheduler.config)`` and ``set_timesteps(steps)``. `from_config` passes on
    only the keys the model's file really had (``_use_default_values``), so a key missing from the
    file takes the *target* class's default: SD 1.x repos ship a PNDM config without
    ``timestep_spacing``, which makes the Euler and DPM schedulers use ``"linspace"`` and DDIM use
    ``"leading"`` (with the file's ``steps_offset``).
``"karras"``
    Karras et al. (2022), rho = 7, between the model's smallest and largest training sigma, as
    k-diffusion's ``get_sigmas_karras`` builds it for AUTOMATIC1111's "Karras" scheduler.
``"a1111"``
    AUTOMATIC1111's plain discretization: k-diffusion's ``CompVisDenoiser.get_sigmas(n)`` (what
    "Automatic" gives Euler a and Euler, and what A1111 calls "Uniform") for the k-diffusion
    samplers, A1111's own uniform DDIM timesteps for ``ddim``. Note that since A1111 1.9 the
    "DPM++ 2M" sampler's "Automatic" means Karras (the old "DPM++ 2M Karras"): use ``"karras"``
    to reproduce it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from . import a1111_schedules
from .a1111_schedules import A1111_SCHEDULES, sigma_to_t
from .diffusers_schedules import COMMON_DEFAULTS, CONFIG_DEFAULTS, ddim_model, dpm_model, euler_model
from .lcm import LCM_TRAIN_STEPS, lcm_sigma_table
from .noise_levels import (
    Schedule,
    build_schedule,
    sigma_of_alpha,
    sigma_table,
    training_alphas_cumprod,
    unsupported,
    vp_init,
)
from .timestep_samplers import UNIPC_ORDER, unipc_times

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "Schedule",
    "final_latents",
    "make_schedule",
    "resolve_config",
    "training_alphas_cumprod",
]

# The samplers diffusers has a scheduler for: the only ones schedule "model" serves.
DIFFUSERS_SAMPLERS = ("euler_a", "euler", "dpmpp_2m", "ddim")
SAMPLERS = (
    *DIFFUSERS_SAMPLERS, "lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpm_fast", "dpm_adaptive",
    "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "restart", "unipc", "ddim_cfgpp", "plms", "lcm",
)  # fmt: skip
# "a1111" is A1111's plain discretization ("Uniform"); "automatic" the one A1111's "Automatic"
# gives each sampler (AUTOMATIC below); the others are A1111's schedule types by their names.
SCHEDULES = ("model", "a1111", "automatic", *A1111_SCHEDULES)

# A1111 1.10's "Automatic" per sampler (the `scheduler` option of samplers_k_diffusion; none
# means CompVisDenoiser.get_sigmas, i.e. "uniform"). DDIM is a timestep sampler and takes none.
AUTOMATIC = {
    "dpmpp_2m": "karras", "dpmpp_2s_a": "karras", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_sde": "karras",
    "restart": "karras",
    "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential",
}  # fmt: skip
# Samplers that A1111 gives one step more and then drops the next-to-last level.
DISCARD_PENULTIMATE = ("dpm2", "dpm2_a", "dpmpp_3m_sde")


# ----------------------------------------------------------------------------------------------
# Validation and configuration
# ----------------------------------------------------------------------------------------------


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _bad_sampler(sampler: object) -> InvalidRequestError:
    return InvalidRequestError("sampler", f"unknown sampler {sampler!r}; choose one of {_choices(SAMPLERS)}")


def _check_names(sampler: str, schedule: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise _bad_sampler(sampler)
    if schedule not in SCHEDULES:
        raise InvalidRequestError("schedule", f"unknown schedule {schedule!r}; choose one of {_choices(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidRequestError("steps", f"steps must be a whole number >= 1, got {steps!r}")


def resolve_config(scheduler_config: Mapping[str, Any], sampler: str) -> dict[str, Any]:
    """The constructor arguments the diffusers scheduler behind `sampler` ends up with.

    Mirrors ``X.from_config(config)``: keys the class does not take are dropped, missing keys take
    the class's own defaults, and keys listed in ``_use_default_values`` (present when the dict was
    copied from a live diffusers scheduler) count as missing, because they were never in the file.
    Other keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are metadata.
    """
    if sampler not in SAMPLERS:
        raise _bad_sampler(sampler)
    defaulted = set(scheduler_config.get("_use_default_values", ()) or ())
    resolved = dict(CONFIG_DEFAULTS.get(sampler, COMMON_DEFAULTS))
    for key, value in scheduler_config.items():
        if key in resolved and not key.startswith("_") and key not in defaulted:
            resolved[key] = value
    return resolved


def _check_supported(cfg: Mapping[str, Any], sampler: str, schedule: str) -> None:
    """Reject config options whose effect the samplers here do not reproduce.

    The model's own parameterization matters for every schedule; the options that only shape the
    diffusers discretization are checked for ``schedule="model"`` alone.
    """
    if cfg["prediction_type"] != "epsilon":
        raise unsupported(f"prediction_type {cfg['prediction_type']!r} is not supported; only 'epsilon' models are")
    if cfg["rescale_betas_zero_snr"]:
        raise unsupported("rescale_betas_zero_snr (zero terminal SNR) needs v-prediction; not supported")
    if cfg.get("variance_type") is not None:
        raise unsupported("learned-variance models (variance_type) are not supported")
    if schedule != "model":
        return
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if cfg.get(key):
            raise unsupported(f"{key} is not supported; use schedule 'karras' or 'a1111' instead")
    if cfg.get("thresholding"):
        raise unsupported("dynamic thresholding is not supported")
    if sampler == "euler" and cfg["interpolation_type"] != "linear":
        raise unsupported(f"interpolation_type {cfg['interpolation_type']!r} is not supported; only 'linear'")
    if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise unsupported(f"final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
    if cfg["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise unsupported(
            f"timestep_spacing {cfg['timestep_spacing']!r} is not supported; use 'linspace', 'leading' or 'trailing'"
        )


# ----------------------------------------------------------------------------------------------
# schedule="karras" and schedule="a1111": k-diffusion / AUTOMATIC1111
# ----------------------------------------------------------------------------------------------


def _ldm_sigma_table(cfg: Mapping[str, Any]) -> np.ndarray:
    """k-diffusion's ``CompVisDenoiser.sigmas`` over the LDM-precision ``alphas_cumprod``."""
    return sigma_table(training_alphas_cumprod(cfg, ldm_precision=True))


def _kdiffusion(cfg: Mapping[str, Any], sampler: str, schedule: str, n: int) -> Schedule:
    """An A1111 schedule type for a k-diffusion sampler, as A1111's ``KDiffusionSampler.get_sigmas``
    builds it: "automatic" resolved per sampler, one step more and the next-to-last level dropped
    for DPM2 / DPM2 a, timesteps from ``sigma_to_t``; k-diffusion starts from ``noise * sigmas[0]``
    and hands its last sample to the VAE as it is. "DPM fast" takes the plain levels: its own grid
    runs between their ends (`runtime.sampling.ksamplers.sample`)."""
    table = _ldm_sigma_table(cfg)
    kind = {"a1111": "uniform", "automatic": AUTOMATIC.get(sampler, "uniform")}.get(schedule, schedule)
    if sampler == "lcm":
        table = _lcm_table(table, kind)
    if sampler in ("dpm_fast", "dpm_adaptive"):
        kind = "uniform"  # A1111 passes DPM fast / adaptive the model's sigma range (and fast the step count)
    discard = sampler in DISCARD_PENULTIMATE
    sigmas = a1111_schedules.a1111_sigmas(kind, n + 1 if discard else n, table)
    if discard:
        sigmas = np.append(sigmas[:-2], sigmas[-1])
    log_table = np.log(table)
    return build_schedule(
        sigmas, sigma_to_t(sigmas[:-1], log_table), float(sigmas[0]), rescale_final=False, log_sigmas=log_table
    )


# Schedule types A1111 builds from the inner model's timestep mapping, which LCM's denoiser changes.
LCM_REFUSED = ("sgm_uniform", "simple", "normal", "ddim")


def _lcm_table(table: np.ndarray, kind: str) -> np.ndarray:
    """LCM's denoiser knows only LCM's 50 levels: "Uniform" (its "Automatic") spreads the steps
    over them, the range-based types run between their ends, as A1111 does."""
    if kind in LCM_REFUSED:
        raise InvalidRequestError(
            "schedule", f"schedule type {kind!r} with LCM is not reproduced; use automatic, karras or exponential"
        )
    if len(table) != LCM_TRAIN_STEPS:
        raise unsupported(f"A1111's LCM assumes {LCM_TRAIN_STEPS} training timesteps, this model has {len(table)}")
    return lcm_sigma_table(table)


def _a1111_ddim(cfg: Mapping[str, Any], n: int, least: int = 1) -> Schedule:
    """A1111's DDIM (``sd_samplers_timesteps``; eta 0 by default).

    ``timesteps = clip(range(0, T, T // n) + 1, 0, T - 1)``; the loop visits indices ``len - 1 .. 1``
    and steps from ``alphas_cumprod[timesteps[i]]`` to ``alphas_cumprod[timesteps[i - 1]]``, so it
    makes ``len(timesteps) - 1`` model calls (49 for 50 steps, 28 for 28) and ends at timestep 1's
    level, which the VAE decodes as-is. The initial latent is unscaled unit noise (VP). DDIM CFG++
    and PLMS run on the same grid; PLMS needs `least` = 2 steps (its first asks the model at the
    next step's timestep, which A1111 reads past the grid's end for a single step).
    """
    total = int(cfg["num_train_timesteps"])
    grid = np.clip(np.arange(0, total, total // n) + 1, 0, total - 1)
    if len(grid) < least + 1:
        raise InvalidRequestError(
            "steps",
            f"A1111's timestep grid has len(range(0, {total}, {total} // steps)) - 1 steps: {len(grid) - 1} for "
            f"steps={n}; this sampler needs at least {least} (use more steps)",
        )
    alphas_cumprod = training_alphas_cumprod(cfg, ldm_precision=True)
    sigmas = sigma_of_alpha(alphas_cumprod[grid[::-1]]).astype(np.float32)
    return build_schedule(sigmas, grid[:0:-1], vp_init(sigmas[0]))


def _a1111_unipc(cfg: Mapping[str, Any], n: int) -> Schedule:
    """A1111's UniPC (``sd_samplers_timesteps_impl.unipc``): as many steps as A1111's DDIM grid has
    timesteps (``len(range(0, T, T // n))``), on UniPC's own "time_uniform" grid in continuous time,
    where log(alpha_t) interpolates ``0.5 * log(alphas_cumprod)`` linearly (NoiseScheduleVP
    "discrete") and the UNet gets the fractional timestep ``(t - 1 / T) * T``. It starts from unit
    noise (VP) and ends at t = 1 / T, the first training level, which the VAE decodes as-is."""
    total = int(cfg["num_train_timesteps"])
    steps = len(range(0, total, total // n))
    if steps < UNIPC_ORDER:
        raise InvalidRequestError(
            "steps", f"A1111's UniPC (order {UNIPC_ORDER}) needs at least {UNIPC_ORDER} steps, got {steps}"
        )
    alphas_cumprod = training_alphas_cumprod(cfg, ldm_precision=True).astype(np.float32)
    times = unipc_times(steps, total)
    log_alpha = np.interp(times, np.arange(1, total + 1) / total, 0.5 * np.log(alphas_cumprod.astype(np.float64)))
    sigmas = np.sqrt(np.expm1(-2.0 * log_alpha))  # sigma_t / alpha_t, the VE level
    return build_schedule(sigmas, (times[:-1] - 1.0 / total) * total, vp_init(sigmas[0]))


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def make_schedule(scheduler_config: Mapping[str, Any], sampler: str, schedule: str, steps: int) -> Schedule:
    """Build the schedule for `sampler` (one of `SAMPLERS`) with discretization `schedule` (one of
    `SCHEDULES`) and `steps` steps, from the model's ``scheduler_config.json`` as a plain dict.

    Raises `InvalidRequestError` with field "sampler", "schedule" or "steps" for bad requests, and
    with field "scheduler" for model configs this runtime cannot reproduce (v-prediction etc.).
    """
    _check_names(sampler, schedule, steps)
    steps = int(steps)
    cfg = resolve_config(scheduler_config, sampler)
    _check_supported(cfg, sampler, schedule)
    if steps > int(cfg["num_train_timesteps"]):
        raise InvalidRequestError(
            "steps", f"steps must be at most {cfg['num_train_timesteps']} (the model's training timesteps)"
        )
    if schedule != "model":
        # A1111's DDIM, DDIM CFG++, PLMS and UniPC are timestep samplers: their own grids whatever the schedule type.
        if sampler == "unipc":
            return _a1111_unipc(cfg, steps)
        if sampler in ("ddim", "ddim_cfgpp", "plms"):
            return _a1111_ddim(cfg, steps, 2 if sampler == "plms" else 1)
        return _kdiffusion(cfg, sampler, schedule, steps)
    if sampler not in DIFFUSERS_SAMPLERS:
        raise InvalidRequestError(
            "schedule",
            f"schedule 'model' (the diffusers scheduler's own) exists for {_choices(DIFFUSERS_SAMPLERS)} "
            f"only, not {sampler!r}; use an A1111 schedule type ({_choices(SCHEDULES[1:])})",
        )
    if sampler in ("euler_a", "euler"):
        return euler_model(cfg, steps, ancestral=sampler == "euler_a")
    if sampler == "dpmpp_2m":
        return dpm_model(cfg, steps)
    return ddim_model(cfg, steps)


def final_latents(x: np.ndarray, schedule: Schedule) -> np.ndarray:
    """The latent the VAE decodes from the sampler's result.

    ``x / sqrt(sigmas[-1]**2 + 1)`` turns the VE sample back into the VP latent (the identity when
    the schedule ends at 0). Schedules built for diffusers' Euler samplers skip it
    (``rescale_final=False``): those pipelines decode the last VE sample unchanged.
    """
    level = float(schedule.sigmas[-1])
    if level == 0.0 or not schedule.rescale_final:
        return np.asarray(x, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) / np.float32(math.sqrt(level * level + 1.0))).astype(np.float32)
