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
from dataclasses import replace
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
    slice_schedule,
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
    "slice_schedule",
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


def _kdiffusion(cfg: Mapping[str, Any], sampler: str, schedule: str, n: int, t_enc: int | None = None) -> Schedule:
    """An A1111 schedule type for a k-diffusion sampler, as A1111's ``KDiffusionSampler.get_sigmas``
    builds it: "automatic" resolved per sampler, one step more and the next-to-last level dropped
    for DPM2 / DPM2 a, timesteps from ``sigma_to_t``; k-diffusion starts from ``noise * sigmas[0]``
    and hands its last sample to the VAE as it is. With `t_enc`, sample_img2img's slice
    ``sigmas[n - t_enc - 1:]``. DPM fast and adaptive run their own grid between the schedule's
    first and next-to-last levels (`runtime.sampling.ksamplers.sample`): for txt2img A1111 passes
    them the model's sigma range (and fast n = steps), the plain levels' ends; for img2img the slice's."""
    table = _ldm_sigma_table(cfg)
    kind = {"a1111": "uniform", "automatic": AUTOMATIC.get(sampler, "uniform")}.get(schedule, schedule)
    if sampler == "lcm":
        table = _lcm_table(table)
    if sampler in ("dpm_fast", "dpm_adaptive") and t_enc is None:
        kind = "uniform"
    discard = sampler in DISCARD_PENULTIMATE
    sigmas = a1111_schedules.a1111_sigmas(kind, n + 1 if discard else n, table)
    if discard:
        sigmas = np.append(sigmas[:-2], sigmas[-1])
    log_table = np.log(table)
    built = build_schedule(
        sigmas, sigma_to_t(sigmas[:-1], log_table), float(sigmas[0]), rescale_final=False, log_sigmas=log_table
    )
    return built if t_enc is None else slice_schedule(built, max(built.steps - t_enc - 1, 0))


def _lcm_table(table: np.ndarray) -> np.ndarray:
    """LCM's denoiser knows only LCM's 50 levels, and A1111 hands it to every schedule type:
    "Uniform" (its "Automatic") spreads the steps over them, the range-based types run between
    their ends, and SGM Uniform, Simple, Normal and DDIM read its table and its timestep mapping,
    which on the 50 levels (t = 20 i + 19, interpolated as (t - 19) / 20) is the table's own."""
    if len(table) != LCM_TRAIN_STEPS:
        raise unsupported(f"A1111's LCM assumes {LCM_TRAIN_STEPS} training timesteps, this model has {len(table)}")
    return lcm_sigma_table(table)


def _ddim_grid(total: int, n: int) -> np.ndarray:
    """A1111's timestep samplers' grid (CompVisSampler.get_timesteps): clip(range(0, T, T // n) + 1,
    0, T - 1); its length is not always n (6 steps give 7 timesteps)."""
    return np.clip(np.arange(0, total, total // n) + 1, 0, total - 1)


def _a1111_ddim(cfg: Mapping[str, Any], n: int, t_enc: int | None = None) -> Schedule:
    """A1111's DDIM (``sd_samplers_timesteps``; eta 0 by default).

    The loop over `_ddim_grid` visits indices ``len - 1 .. 1`` and steps from
    ``alphas_cumprod[timesteps[i]]`` to ``alphas_cumprod[timesteps[i - 1]]``, so it makes
    ``len(timesteps) - 1`` model calls (49 for 50 steps, 28 for 28) and ends at timestep 1's
    level, which the VAE decodes as-is. The initial latent is unscaled unit noise (VP). DDIM CFG++
    and PLMS run on the same grid. With `t_enc` it is A1111's img2img (`_timestep_img2img`).
    """
    total = int(cfg["num_train_timesteps"])
    grid = _ddim_grid(total, n)
    if t_enc is None and len(grid) < 2:
        raise InvalidRequestError(
            "steps",
            f"A1111's timestep grid has len(range(0, {total}, {total} // steps)) - 1 steps: {len(grid) - 1} for "
            f"steps={n}; this sampler needs at least 1 (use more steps)",
        )
    alphas_cumprod = training_alphas_cumprod(cfg, ldm_precision=True)
    sigmas = sigma_of_alpha(alphas_cumprod[grid[::-1]]).astype(np.float32)
    schedule = build_schedule(sigmas, grid[:0:-1], vp_init(sigmas[0]), end_timestep=float(grid[0]))
    return schedule if t_enc is None else _timestep_img2img(schedule, t_enc)


def _timestep_img2img(schedule: Schedule, t_enc: int) -> Schedule:
    """A1111's CompVisSampler.sample_img2img on a DDIM grid: the sampler gets ``timesteps[:t_enc]``,
    so it runs from ``timesteps[t_enc - 1]`` down to ``timesteps[0]`` (t_enc - 1 steps), from the
    init latent noised to ``timesteps[t_enc]``, one grid step noisier than where it starts (A1111
    reads that sample as if it were at ``timesteps[t_enc - 1]``). t_enc 0 or 1 runs no step."""
    levels = len(schedule.sigmas)  # the grid's length, top first
    t_enc = min(t_enc, levels - 1)  # timesteps[t_enc] must exist (strength 0 with img2img_fix_steps)
    start = min(levels - t_enc, levels - 1)
    return replace(slice_schedule(schedule, start), init_sigma=float(schedule.sigmas[levels - 1 - t_enc]))


def _a1111_unipc(cfg: Mapping[str, Any], n: int, t_enc: int | None = None) -> Schedule:
    """A1111's UniPC (``sd_samplers_timesteps_impl.unipc``): as many steps as A1111's DDIM grid has
    timesteps (``len(range(0, T, T // n))``), on UniPC's own "time_uniform" grid in continuous time,
    where log(alpha_t) interpolates ``0.5 * log(alphas_cumprod)`` linearly (NoiseScheduleVP
    "discrete") and the UNet gets the fractional timestep ``(t - 1 / T) * T``. It starts from unit
    noise (VP) and ends at t = 1 / T, the first training level, which the VAE decodes as-is.

    img2img (`t_enc`, A1111's sample_img2img with is_img2img): t_enc steps from
    ``t_start = timesteps[t_enc - 1] / T + 1 / T`` (the level of grid timestep t_enc - 1) on the same
    kind of grid, from the init latent noised to ``timesteps[t_enc]``, as for DDIM."""
    total = int(cfg["num_train_timesteps"])
    grid = _ddim_grid(total, n)
    steps = len(grid) if t_enc is None else min(t_enc, len(grid) - 1)
    if steps < UNIPC_ORDER:
        what = "steps" if t_enc is None else "img2img steps (t_enc = int(strength * steps))"
        raise InvalidRequestError(
            "steps", f"A1111's UniPC (order {UNIPC_ORDER}) needs at least {UNIPC_ORDER} {what}, got {steps}"
        )
    alphas_cumprod = training_alphas_cumprod(cfg, ldm_precision=True).astype(np.float32)
    start, init_sigma = 1.0, None
    if t_enc is not None:
        # float32, as A1111 computes it on the int64 timesteps tensor
        start = float(np.float32(np.float32(grid[steps - 1]) / np.float32(total)) + np.float32(1.0 / total))
        init_sigma = float(sigma_of_alpha(alphas_cumprod[grid[steps]]))
    times = unipc_times(steps, total, start)
    log_alpha = np.interp(times, np.arange(1, total + 1) / total, 0.5 * np.log(alphas_cumprod.astype(np.float64)))
    sigmas = np.sqrt(np.expm1(-2.0 * log_alpha))  # sigma_t / alpha_t, the VE level
    schedule = build_schedule(sigmas, (times[:-1] - 1.0 / total) * total, vp_init(sigmas[0]))
    return replace(schedule, init_sigma=init_sigma)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def make_schedule(
    scheduler_config: Mapping[str, Any], sampler: str, schedule: str, steps: int, t_enc: int | None = None
) -> Schedule:
    """Build the schedule for `sampler` (one of `SAMPLERS`) with discretization `schedule` (one of
    `SCHEDULES`) and `steps` steps, from the model's ``scheduler_config.json`` as a plain dict.

    `t_enc` asks for A1111's img2img run of an n-step schedule (sd_samplers_common's t_enc, see
    `runtime.images.img2img.a1111_steps`): the last t_enc + 1 levels for the k-diffusion samplers
    (KDiffusionSampler.sample_img2img), ``timesteps[:t_enc]`` for the timestep samplers
    (CompVisSampler.sample_img2img). Diffusers' own schedules ("model") have no such form and come
    back whole (``a1111_grid`` False): the caller applies diffusers' rule.

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
            built = _a1111_unipc(cfg, steps, t_enc)
        elif sampler in ("ddim", "ddim_cfgpp", "plms"):
            built = _a1111_ddim(cfg, steps, t_enc)
        else:
            built = _kdiffusion(cfg, sampler, schedule, steps, t_enc)
        return replace(built, a1111_grid=True)
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
