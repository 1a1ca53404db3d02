"""Noise schedules for the four samplers, in k-diffusion's variance-exploding ("VE") form.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from . import a1111_schedules
from .a1111_schedules import A1111_SCHEDULES, sigma_to_t

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
    *DIFFUSERS_SAMPLERS, "lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpm_fast",
    "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
)  # fmt: skip
# "a1111" is A1111's plain discretization ("Uniform"); "automatic" the one A1111's "Automatic"
# gives each sampler (AUTOMATIC below); the others are A1111's schedule types by their names.
SCHEDULES = ("model", "a1111", "automatic", *A1111_SCHEDULES)

# A1111 1.10's "Automatic" per sampler (the `scheduler` option of samplers_k_diffusion; none
# means CompVisDenoiser.get_sigmas, i.e. "uniform"). DDIM is a timestep sampler and takes none.
AUTOMATIC = {
    "dpmpp_2m": "karras", "dpmpp_2s_a": "karras", "dpm2": "karras", "dpm2_a": "karras", "dpmpp_sde": "karras",
    "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential",
}  # fmt: skip
# Samplers that A1111 gives one step more and then drops the next-to-last level.
DISCARD_PENULTIMATE = ("dpm2", "dpm2_a", "dpmpp_3m_sde")

KARRAS_RHO = 7.0  # the paper's value, k-diffusion's and A1111's default

# Constructor defaults of the diffusers scheduler behind each sampler (diffusers 0.35 - 0.42). Only
# these keys are read from a model's config: `from_config` ignores keys the class does not take.
_COMMON_DEFAULTS: dict[str, Any] = {
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
_SIGMA_OPTIONS: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "final_sigmas_type": "zero",
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "euler_a": dict(_COMMON_DEFAULTS),
    "euler": {
        **_COMMON_DEFAULTS,
        **_SIGMA_OPTIONS,
        "interpolation_type": "linear",
        "sigma_min": None,
        "sigma_max": None,
    },
    # The sampler name fixes the algorithm (DPM-Solver++ 2M, midpoint, lower_order_final), so
    # solver_order / algorithm_type / solver_type / euler_at_final from a config are not read.
    "dpmpp_2m": {
        **_COMMON_DEFAULTS,
        **_SIGMA_OPTIONS,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "lambda_min_clipped": -math.inf,
        "thresholding": False,
        "variance_type": None,
    },
    "ddim": {
        **_COMMON_DEFAULTS,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
    },
}


@dataclass(frozen=True, eq=False)
class Schedule:
    """The noise levels and UNet timesteps of one sampling run.

    `sigmas` has one entry more than `timesteps`: step ``i`` starts at ``sigmas[i]`` (UNet timestep
    ``timesteps[i]``) and ends at ``sigmas[i + 1]``; ``sigmas[-1]`` is the level of the result.
    ``len(timesteps)`` is the number of UNet evaluations. It is normally the requested step count,
    but it follows the reference where that differs (diffusers' "trailing" spacing yields one extra
    timestep for some counts, A1111's DDIM runs ``len(range(0, 1000, 1000 // steps)) - 1`` steps).

    The last three fields only matter for DDIM and for non-default configs; `runtime.sampling.samplers.sample`
    applies them:

    * `sigmas_to`: where diffusers' DDIM step really lands (``prev_timestep = t - T // steps``), when
      that is not the next step's level (``"linspace"``/``"trailing"`` spacing); the sample is then
      re-read at the next level, as diffusers does by indexing ``alphas_cumprod`` with the next
      timestep. None when it always equals ``sigmas[1:]``.
    * `clip_denoised`: DDIM's ``clip_sample_range`` when the config asks for ``clip_sample``.
    * `rescale_final`: whether `final_latents` turns the result back into a VP latent. diffusers'
      Euler schedulers (and k-diffusion) hand their last VE sample to the VAE unchanged, which only
      differs when the schedule ends above 0 (``final_sigmas_type="sigma_min"``, KL Optimal).

    `log_sigmas` marks a k-diffusion schedule (A1111's schedule types): the model may be asked at
    any level, its timestep found by ``sigma_to_t`` over this table (``CompVisDenoiser``), and
    `runtime.sampling.ksamplers.sample` runs it. `sigma_range` is its (smallest positive, largest)
    level before any img2img slicing: the span of A1111's Brownian tree for the SDE samplers.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    sigmas_to: np.ndarray | None = None
    clip_denoised: float | None = None
    rescale_final: bool = True
    log_sigmas: np.ndarray | None = None
    sigma_range: tuple[float, float] | None = None

    @property
    def steps(self) -> int:
        """Number of UNet evaluations (denoiser calls)."""
        return len(self.timesteps)


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
    resolved = dict(_DEFAULTS.get(sampler, _COMMON_DEFAULTS))
    for key, value in scheduler_config.items():
        if key in resolved and not key.startswith("_") and key not in defaulted:
            resolved[key] = value
    return resolved


def _unsupported(message: str) -> InvalidRequestError:
    return InvalidRequestError("scheduler", message)


def _check_supported(cfg: Mapping[str, Any], sampler: str, schedule: str) -> None:
    """Reject config options whose effect the samplers here do not reproduce.

    The model's own parameterization matters for every schedule; the options that only shape the
    diffusers discretization are checked for ``schedule="model"`` alone.
    """
    if cfg["prediction_type"] != "epsilon":
        raise _unsupported(f"prediction_type {cfg['prediction_type']!r} is not supported; only 'epsilon' models are")
    if cfg["rescale_betas_zero_snr"]:
        raise _unsupported("rescale_betas_zero_snr (zero terminal SNR) needs v-prediction; not supported")
    if cfg.get("variance_type") is not None:
        raise _unsupported("learned-variance models (variance_type) are not supported")
    if schedule != "model":
        return
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if cfg.get(key):
            raise _unsupported(f"{key} is not supported; use schedule 'karras' or 'a1111' instead")
    if cfg.get("thresholding"):
        raise _unsupported("dynamic thresholding is not supported")
    if sampler == "euler" and cfg["interpolation_type"] != "linear":
        raise _unsupported(f"interpolation_type {cfg['interpolation_type']!r} is not supported; only 'linear'")
    if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise _unsupported(f"final_sigmas_type {cfg['final_sigmas_type']!r} is not supported")
    if cfg["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise _unsupported(
            f"timestep_spacing {cfg['timestep_spacing']!r} is not supported; use 'linspace', 'leading' or 'trailing'"
        )


# ----------------------------------------------------------------------------------------------
# Training noise table
# ----------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit.

    torch fills the first half as ``start + step * i`` and the second as ``end - step * (n - 1 - i)``
    with a float32 step, each value rounded once (a fused multiply-add); ``np.linspace`` differs in
    the last bit for about one value in ten, which would make the betas differ from diffusers'.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return values.astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal's squaredcos_cap_v2 betas (diffusers' ``betas_for_alpha_bar``), in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]


def _betas(cfg: Mapping[str, Any], ldm_precision: bool) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    start, end, kind = float(cfg["beta_start"]), float(cfg["beta_end"]), cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif kind == "linear":
        betas = np.linspace(start, end, n) if ldm_precision else _torch_linspace_f32(start, end, n)
    elif kind == "scaled_linear":
        # LDM (and so A1111) squares a float64 ramp; diffusers squares a float32 one in float32.
        if ldm_precision:
            betas = np.linspace(start**0.5, end**0.5, n) ** 2
        else:
            ramp = _torch_linspace_f32(start**0.5, end**0.5, n)
            betas = ramp * ramp
    elif kind == "squaredcos_cap_v2":
        betas = np.asarray(_cosine_betas(n), dtype=np.float64)
    else:
        raise _unsupported(
            f"beta_schedule {kind!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )
    return betas if ldm_precision else betas.astype(np.float32)


def training_alphas_cumprod(scheduler_config: Mapping[str, Any], ldm_precision: bool = False) -> np.ndarray:
    """The model's ``alphas_cumprod`` table (float32), as diffusers or as LDM/A1111 compute it.

    diffusers: float32 betas, ``1 - betas`` in float32, then ``torch.cumprod``, which accumulates in
    double on CPU and rounds each product to float32. LDM (``ldm_precision``): everything in
    float64, rounded to float32 at the end; A1111's k-diffusion wrapper reads that buffer. The two
    differ by up to ~1e-5 relative at the noisy end.
    """
    betas = _betas(scheduler_config, ldm_precision)
    alphas = 1.0 - betas
    if not ldm_precision:
        alphas = alphas.astype(np.float32).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def _sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Training noise levels ``sqrt((1 - a) / a)`` in float32, index = training timestep."""
    a = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - a) / a)


def _sigma_of_alpha(alpha: np.ndarray | float) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n levels evenly spaced in sigma**(1/rho), sigma_max first."""
    return a1111_schedules.karras(n, sigma_min, sigma_max, rho)[:-1]


def _vp_init(sigma_0: float) -> float:
    """A VP scheduler starts from unit-variance noise; in VE space that is ``sqrt(sigma_0**2 + 1)``."""
    return float(math.sqrt(float(sigma_0) ** 2 + 1.0))


def _schedule(
    sigmas: np.ndarray,
    timesteps: np.ndarray,
    init_noise_sigma: float,
    *,
    sigmas_to: np.ndarray | None = None,
    clip_denoised: float | None = None,
    rescale_final: bool = True,
    log_sigmas: np.ndarray | None = None,
) -> Schedule:
    def frozen(values: np.ndarray) -> np.ndarray:
        array = np.array(values, dtype=np.float32)  # a private copy, read-only like the dataclass
        array.setflags(write=False)
        return array

    levels = frozen(sigmas)
    return Schedule(
        sigmas=levels,
        timesteps=frozen(timesteps),
        init_noise_sigma=float(init_noise_sigma),
        sigmas_to=None if sigmas_to is None else frozen(sigmas_to),
        clip_denoised=clip_denoised,
        rescale_final=rescale_final,
        log_sigmas=None if log_sigmas is None else frozen(log_sigmas),
        sigma_range=None if log_sigmas is None else (float(levels[levels > 0].min()), float(levels.max())),
    )


# ----------------------------------------------------------------------------------------------
# schedule="model": the diffusers schedulers
# ----------------------------------------------------------------------------------------------


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


def _euler_model(cfg: Mapping[str, Any], n: int, ancestral: bool) -> Schedule:
    """`EulerAncestralDiscreteScheduler` / `EulerDiscreteScheduler` after ``set_timesteps(n)``."""
    table = _sigma_table(training_alphas_cumprod(cfg))
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
    init = top if cfg["timestep_spacing"] in ("linspace", "trailing") else _vp_init(top)
    # diffusers' Euler pipelines decode the last VE sample as-is (matters for sigma_min finals).
    return _schedule(sigmas, timesteps, init, rescale_final=False)


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


def _dpm_model(cfg: Mapping[str, Any], n: int) -> Schedule:
    """`DPMSolverMultistepScheduler` (defaults) after ``set_timesteps(n)``."""
    alphas_cumprod = training_alphas_cumprod(cfg)
    table = _sigma_table(alphas_cumprod)
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
    return _schedule(sigmas, timesteps, _vp_init(sigmas[0]))


def _ddim_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """`DDIMScheduler.set_timesteps`: integer timesteps for each spacing."""
    total, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + int(cfg["steps_offset"])
    return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1


def _ddim_model(cfg: Mapping[str, Any], n: int) -> Schedule:
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
    levels = _sigma_of_alpha(alphas_cumprod[timesteps])
    targets = np.where(prev >= 0, _sigma_of_alpha(alphas_cumprod[np.maximum(prev, 0)]), _sigma_of_alpha(final_alpha))
    sigmas = np.append(levels, targets[-1]).astype(np.float32)
    sigmas_to = targets.astype(np.float32)
    consistent = np.array_equal(sigmas_to, sigmas[1:])
    clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    return _schedule(
        sigmas,
        timesteps,
        _vp_init(sigmas[0]),
        sigmas_to=None if consistent else sigmas_to,
        clip_denoised=clip,
    )


# ----------------------------------------------------------------------------------------------
# schedule="karras" and schedule="a1111": k-diffusion / AUTOMATIC1111
# ----------------------------------------------------------------------------------------------


def _ldm_sigma_table(cfg: Mapping[str, Any]) -> np.ndarray:
    """k-diffusion's ``CompVisDenoiser.sigmas`` over the LDM-precision ``alphas_cumprod``."""
    return _sigma_table(training_alphas_cumprod(cfg, ldm_precision=True))


def _kdiffusion(cfg: Mapping[str, Any], sampler: str, schedule: str, n: int) -> Schedule:
    """An A1111 schedule type for a k-diffusion sampler, as A1111's ``KDiffusionSampler.get_sigmas``
    builds it: "automatic" resolved per sampler, one step more and the next-to-last level dropped
    for DPM2 / DPM2 a, timesteps from ``sigma_to_t``; k-diffusion starts from ``noise * sigmas[0]``
    and hands its last sample to the VAE as it is. "DPM fast" takes the plain levels: its own grid
    runs between their ends (`runtime.sampling.ksamplers.sample`)."""
    table = _ldm_sigma_table(cfg)
    kind = {"a1111": "uniform", "automatic": AUTOMATIC.get(sampler, "uniform")}.get(schedule, schedule)
    if sampler == "dpm_fast":
        kind = "uniform"  # A1111 passes DPM fast the model's sigma range and the step count only
    discard = sampler in DISCARD_PENULTIMATE
    sigmas = a1111_schedules.a1111_sigmas(kind, n + 1 if discard else n, table)
    if discard:
        sigmas = np.append(sigmas[:-2], sigmas[-1])
    log_table = np.log(table)
    return _schedule(
        sigmas, sigma_to_t(sigmas[:-1], log_table), float(sigmas[0]), rescale_final=False, log_sigmas=log_table
    )


def _a1111_ddim(cfg: Mapping[str, Any], n: int) -> Schedule:
    """A1111's DDIM (``sd_samplers_timesteps``; eta 0 by default).

    ``timesteps = clip(range(0, T, T // n) + 1, 0, T - 1)``; the loop visits indices ``len - 1 .. 1``
    and steps from ``alphas_cumprod[timesteps[i]]`` to ``alphas_cumprod[timesteps[i - 1]]``, so it
    makes ``len(timesteps) - 1`` model calls (49 for 50 steps, 28 for 28) and ends at timestep 1's
    level, which the VAE decodes as-is. The initial latent is unscaled unit noise (VP).
    """
    total = int(cfg["num_train_timesteps"])
    grid = np.clip(np.arange(0, total, total // n) + 1, 0, total - 1)
    if len(grid) < 2:
        raise InvalidRequestError(
            "steps",
            f"A1111's ddim makes len(range(0, {total}, {total} // steps)) - 1 model calls: none for "
            f"steps={n}; use at least 2 steps",
        )
    alphas_cumprod = training_alphas_cumprod(cfg, ldm_precision=True)
    sigmas = _sigma_of_alpha(alphas_cumprod[grid[::-1]]).astype(np.float32)
    return _schedule(sigmas, grid[:0:-1], _vp_init(sigmas[0]))


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
        # A1111's DDIM is a timestep sampler: its own uniform grid whatever the schedule type.
        return _a1111_ddim(cfg, steps) if sampler == "ddim" else _kdiffusion(cfg, sampler, schedule, steps)
    if sampler not in DIFFUSERS_SAMPLERS:
        raise InvalidRequestError(
            "schedule",
            f"schedule 'model' (the diffusers scheduler's own) exists for {_choices(DIFFUSERS_SAMPLERS)} "
            f"only, not {sampler!r}; use an A1111 schedule type ({_choices(SCHEDULES[1:])})",
        )
    if sampler in ("euler_a", "euler"):
        return _euler_model(cfg, steps, ancestral=sampler == "euler_a")
    if sampler == "dpmpp_2m":
        return _dpm_model(cfg, steps)
    return _ddim_model(cfg, steps)


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
