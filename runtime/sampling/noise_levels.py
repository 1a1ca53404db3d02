"""The numbers every schedule is built from: the model's training noise table (betas, alphas_cumprod,
sigmas, as diffusers or as LDM/A1111 compute them) and `Schedule`, one sampling run's noise levels
and UNet timesteps. `runtime.sampling.schedules` picks the discretization; this module only holds
what they share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from . import a1111_schedules

KARRAS_RHO = 7.0  # the paper's value, k-diffusion's and A1111's default


def unsupported(message: str) -> InvalidRequestError:
    """A model scheduler config this runtime cannot reproduce (field "scheduler")."""
    return InvalidRequestError("scheduler", message)


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

    `a1111_grid` marks every schedule but diffusers' own (schedule "model"): A1111's img2img step
    rule has a form for it. `init_sigma` is where A1111's timestep samplers (DDIM, DDIM CFG++, PLMS,
    UniPC) noise an img2img init latent: ``timesteps[t_enc]``, one grid step above ``sigmas[0]``,
    where their loop starts nevertheless (A1111's sample_img2img); None: at ``sigmas[0]``.
    `end_timestep` is the UNet timestep of ``sigmas[-1]`` on A1111's DDIM grid, where PLMS's first
    step asks the model once more when it is also the last.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    sigmas_to: np.ndarray | None = None
    clip_denoised: float | None = None
    rescale_final: bool = True
    log_sigmas: np.ndarray | None = None
    sigma_range: tuple[float, float] | None = None
    a1111_grid: bool = False
    init_sigma: float | None = None
    end_timestep: float | None = None

    @property
    def steps(self) -> int:
        """Number of UNet evaluations (denoiser calls)."""
        return len(self.timesteps)


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
        raise unsupported(
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


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Training noise levels ``sqrt((1 - a) / a)`` in float32, index = training timestep."""
    a = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - a) / a)


def sigma_of_alpha(alpha: np.ndarray | float) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n levels evenly spaced in sigma**(1/rho), sigma_max first."""
    return a1111_schedules.karras(n, sigma_min, sigma_max, rho)[:-1]


def vp_init(sigma_0: float) -> float:
    """A VP scheduler starts from unit-variance noise; in VE space that is ``sqrt(sigma_0**2 + 1)``."""
    return float(math.sqrt(float(sigma_0) ** 2 + 1.0))


def build_schedule(
    sigmas: np.ndarray,
    timesteps: np.ndarray,
    init_noise_sigma: float,
    *,
    sigmas_to: np.ndarray | None = None,
    clip_denoised: float | None = None,
    rescale_final: bool = True,
    log_sigmas: np.ndarray | None = None,
    end_timestep: float | None = None,
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
        end_timestep=end_timestep,
    )


def slice_schedule(schedule: Schedule, start: int) -> Schedule:
    """The run from step `start` on: an img2img pass's tail of a full schedule."""
    return replace(
        schedule,
        sigmas=schedule.sigmas[start:],
        timesteps=schedule.timesteps[start:],
        sigmas_to=None if schedule.sigmas_to is None else schedule.sigmas_to[start:],
    )
