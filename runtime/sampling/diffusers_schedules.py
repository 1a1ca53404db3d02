"""schedule="model": exactly what the diffusers scheduler matching a sampler computes after
``X.from_config(pipe.scheduler.config)`` and ``set_timesteps(steps)`` (`EulerAncestralDiscreteScheduler`,
`EulerDiscreteScheduler`, `DPMSolverMultistepScheduler`, `DDIMScheduler`), as VE noise levels.
`from_config` passes on only the keys the model's file really had (``_use_default_values``), so a
key missing from the file takes the *target* class's default (`resolve_config`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from .a1111_schedules import sigma_to_t
from .noise_levels import (
    Schedule,
    build_schedule,
    karras_sigmas,
    sigma_of_alpha,
    sigma_table,
    training_alphas_cumprod,
    vp_init,
)

# Constructor defaults of the diffusers scheduler behind each sampler (diffusers 0.35 - 0.42). Only
# these keys are read from a model's config: `from_config` ignores keys the class does not take.
COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
SIGMA_OPTIONS: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "final_sigmas_type": "zero",
}
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "euler_a": dict(COMMON_DEFAULTS),
    "euler": {
        **COMMON_DEFAULTS,
        **SIGMA_OPTIONS,
        "interpolation_type": "linear",
        "sigma_min": None,
        "sigma_max": None,
    },
    # The sampler name fixes the algorithm (DPM-Solver++ 2M, midpoint, lower_order_final), so
    # solver_order / algorithm_type / solver_type / euler_at_final from a config are not read.
    "dpmpp_2m": {
        **COMMON_DEFAULTS,
        **SIGMA_OPTIONS,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "lambda_min_clipped": -math.inf,
        "thresholding": False,
        "variance_type": None,
    },
    "ddim": {
        **COMMON_DEFAULTS,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
    },
}


def _final_sigma(cfg: Mapping[str, Any], table: np.ndarray) -> float:
    """diffusers' ``final_sigmas_type``: 0, or the smallest training level (timestep 0)."""
    return float(table[0]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0


def _euler_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Euler / Euler-ancestral ``set_timesteps``: float32 timesteps for each spacing."""
    total, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + np.float32(cfg["steps_offset"])
    # trailing: a float stride; for some n (61, 103, ...) arange's rounding adds an extra -1 entry,
    # which diffusers keeps (and runs) - so do we.
    return np.arange(total, 0, -total / n).round().astype(np.float32) - np.float32(1)


def euler_model(cfg: Mapping[str, Any], n: int, ancestral: bool) -> Schedule:
    """`EulerAncestralDiscreteScheduler` / `EulerDiscreteScheduler` after ``set_timesteps(n)``."""
    table = sigma_table(training_alphas_cumprod(cfg))
    timesteps = _euler_timesteps(cfg, n)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    final = 0.0
    if not ancestral:
        if cfg["use_karras_sigmas"]:
            # diffusers bounds the ramp by the *interpolated* inference sigmas unless the config
            # names sigma_min / sigma_max, and derives timesteps back from the new sigmas.
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = karras_sigmas(n, lo, hi)
            timesteps = sigma_to_t(sigmas, np.log(table))
        final = _final_sigma(cfg, table)
    sigmas = np.append(sigmas, final).astype(np.float32)
    # init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max**2 + 1) for leading.
    top = float(sigmas.max())
    init = top if cfg["timestep_spacing"] in ("linspace", "trailing") else vp_init(top)
    # diffusers' Euler pipelines decode the last VE sample as-is (matters for sigma_min finals).
    return build_schedule(sigmas, timesteps, init, rescale_final=False)


def _dpm_timesteps(cfg: Mapping[str, Any], n: int, alphas_cumprod: np.ndarray) -> np.ndarray:
    """`DPMSolverMultistepScheduler.set_timesteps`: integer timesteps for each spacing."""
    total, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    a = alphas_cumprod.astype(np.float32)
    lambdas = np.log(np.sqrt(a)) - np.log(np.sqrt(np.float32(1.0) - a))
    # lambda_min_clipped cuts the noisiest timesteps off (default -inf: none).
    clipped = int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"], side="left"))
    last = total - clipped
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(cfg["steps_offset"])
    return np.arange(last, 0, -total / n).round().astype(np.int64) - 1


def dpm_model(cfg: Mapping[str, Any], n: int) -> Schedule:
    """`DPMSolverMultistepScheduler` (defaults) after ``set_timesteps(n)``."""
    alphas_cumprod = training_alphas_cumprod(cfg)
    table = sigma_table(alphas_cumprod)
    timesteps = _dpm_timesteps(cfg, n, alphas_cumprod)
    if cfg["use_karras_sigmas"]:
        sigmas = karras_sigmas(n, float(table[0]), float(table[-1]))
        t = sigma_to_t(sigmas, np.log(table))
        # diffusers rounds these to integers except for cosine betas, then truncates to int64.
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            t = t.round()
        timesteps = t.astype(np.int64)
    else:
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
    sigmas = np.append(sigmas, _final_sigma(cfg, table)).astype(np.float32)
    return build_schedule(sigmas, timesteps, vp_init(sigmas[0]))


def _ddim_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """`DDIMScheduler.set_timesteps`: integer timesteps for each spacing."""
    total, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + int(cfg["steps_offset"])
    return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1


def ddim_model(cfg: Mapping[str, Any], n: int) -> Schedule:
    """`DDIMScheduler` (eta = 0) after ``set_timesteps(n)``, as VE levels.

    diffusers' step goes from ``alphas_cumprod[t]`` to ``alphas_cumprod[t - T // n]`` (or to
    ``final_alpha_cumprod`` below 0: 1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``, which
    leaves the result slightly noisy). Only "leading" spacing makes that the next step's timestep.
    """
    total = int(cfg["num_train_timesteps"])
    alphas_cumprod = training_alphas_cumprod(cfg)
    timesteps = _ddim_timesteps(cfg, n)
    if timesteps.max() >= total:
        raise InvalidRequestError(
            "steps",
            f"{n} ddim steps with steps_offset {cfg['steps_offset']} reach timestep {int(timesteps.max())}, "
            f"past the model's last ({total - 1}); use fewer steps",
        )
    final_alpha = 1.0 if cfg["set_alpha_to_one"] else float(alphas_cumprod[0])
    prev = timesteps - total // n
    # A -1 timestep (the "trailing" quirk above) indexes the *last* entry, as torch does in diffusers.
    levels = sigma_of_alpha(alphas_cumprod[timesteps])
    targets = np.where(prev >= 0, sigma_of_alpha(alphas_cumprod[np.maximum(prev, 0)]), sigma_of_alpha(final_alpha))
    sigmas = np.append(levels, targets[-1]).astype(np.float32)
    sigmas_to = targets.astype(np.float32)
    consistent = np.array_equal(sigmas_to, sigmas[1:])
    clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    return build_schedule(
        sigmas,
        timesteps,
        vp_init(sigmas[0]),
        sigmas_to=None if consistent else sigmas_to,
        clip_denoised=clip,
    )
