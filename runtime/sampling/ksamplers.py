"""k-diffusion's samplers as AUTOMATIC1111 runs them, in numpy (``k_diffusion/sampling.py``).

Each one is a loop over a model ``denoise(x, sigma) -> denoised`` on the variance-exploding sample
x and a decreasing list of noise levels; unlike `runtime.sampling.samplers` (diffusers' schedulers)
the model may be asked at levels between two of them (Heun, DPM2, DPM++ 2S a, DPM fast).
`noise()` draws fresh standard-normal noise from the per-image generators, as A1111's TorchHijack
makes k-diffusion's ``torch.randn_like`` do; a sampler draws exactly where k-diffusion does.
A1111's defaults apply unless the request says otherwise (`runtime.sampling.params`: eta 1 for
the ancestral and SDE samplers, ``eta_ancestral``; s_noise 1; no churn). The SDE samplers (DPM++
SDE, 2M SDE, 2M SDE Heun, 3M SDE) take their noise between two levels from A1111's Brownian tree
(`runtime.sampling.brownian`) instead. Restart (A1111's own,
modules/sd_samplers_extra.py) is Heun steps with jumps back up to a higher level.

A little over 500 lines on purpose: it mirrors k-diffusion's sampling.py one function to one,
which is easier to check side by side than a split; DPM adaptive and LCM live in their own modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from .a1111_schedules import karras, sigma_to_t
from .dpm_adaptive import sample_dpm_adaptive
from .lcm import lcm_boundary, lcm_timestep, sample_lcm
from .params import SamplerParams
from .steps import NoiseSource, StepCallback, as_f32, notify

if TYPE_CHECKING:
    from .schedules import Schedule

__all__ = [
    "BROWNIAN_SAMPLERS",
    "K_SAMPLERS",
    "ancestral_step",
    "dpm_fast_grid",
    "lms_coefficient",
    "restart_segments",
    "sample",
    "step_ends",
]

SigmaDenoiser = Callable[[np.ndarray, float], np.ndarray]
# Restart's automatic restart_list: from this many steps, a restart from the level nearest
# RESTART_FROM back up to the level nearest RESTART_TO.
RESTART_MIN_STEPS, RESTART_FROM, RESTART_TO = 20, 0.1, 2.0
BrownianSource = Callable[[float, float], np.ndarray]  # noise between two levels (runtime.sampling.brownian)


def _derivative(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """The Karras ODE's dx/dsigma (k-diffusion ``to_d``)."""
    return (x - denoised) / np.float32(sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the level a deterministic step aims at and the fresh noise that
    brings it back to sigma_to (k-diffusion ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def churn(x: np.ndarray, sigma: float, steps: int, noise: NoiseSource | None, **params: float) -> tuple:
    """(x, sigma_hat): Karras et al. (2022) Algorithm 2's churn before a step of Euler, Heun or DPM2.
    With s_churn, gamma = min(s_churn / steps, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, and
    x gets noise (times s_noise) up to sigma_hat = sigma (1 + gamma). k-diffusion draws that noise
    on every step, gamma 0 or not; without s_churn the draws change nothing, so none is made."""
    s_churn = params.get("s_churn", 0.0)
    if not s_churn or noise is None:
        return x, sigma
    level = np.float32(sigma)
    gamma = min(s_churn / steps, 2**0.5 - 1) if params["s_tmin"] <= level <= params["s_tmax"] else 0.0
    eps = noise() * np.float32(params["s_noise"])
    sigma_hat = level * np.float32(gamma + 1)
    if gamma > 0:
        x = as_f32(x + eps * np.sqrt(sigma_hat * sigma_hat - level * level))
    return x, float(sigma_hat)


def sample_euler(denoise: SigmaDenoiser, x, sigmas, noise=None, callback=None, **params: float) -> np.ndarray:
    """Karras et al. (2022) Algorithm 2 with Euler steps (`churn`: s_churn, s_tmin, s_tmax, s_noise)."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, float(sigmas[i]), len(sigmas) - 1, noise, **params)
        x = as_f32(x + _derivative(x, sigma, denoise(x, sigma)) * np.float32(float(sigmas[i + 1]) - sigma))
        x = notify(callback, i, x)
    return x


def sample_euler_ancestral(
    denoise: SigmaDenoiser, x, sigmas, noise: NoiseSource, callback=None, eta: float = 1.0
) -> np.ndarray:
    """An Euler step down to sigma_down, then noise times sigma_up (none into the last level 0)."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x + _derivative(x, sigma, denoised) * np.float32(down - sigma)
        if sigma_next > 0:
            x = x + noise() * np.float32(up)
        x = notify(callback, i, x)
    return x


def heun_step(denoise: SigmaDenoiser, x: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """An Euler step corrected by the slope at its end; Euler alone into 0 (one model call)."""
    d = _derivative(x, sigma, denoise(x, sigma))
    dt = np.float32(sigma_next - sigma)
    if sigma_next == 0:
        return as_f32(x + d * dt)
    x_2 = as_f32(x + d * dt)
    d_2 = _derivative(x_2, sigma_next, denoise(x_2, sigma_next))
    return as_f32(x + (d + d_2) / np.float32(2) * dt)


def sample_heun(denoise: SigmaDenoiser, x, sigmas, noise=None, callback=None, **params: float) -> np.ndarray:
    """Karras et al. (2022) Algorithm 2 with Heun steps (two model calls a step, one for the last
    step into 0) and `churn`."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, float(sigmas[i]), len(sigmas) - 1, noise, **params)
        x = notify(callback, i, heun_step(denoise, x, sigma, float(sigmas[i + 1])))
    return x


def restart_segments(sigmas: np.ndarray) -> list[tuple[float, float]]:
    """A1111's Restart plan (modules/sd_samplers_extra.py ``restart_sampler`` with its automatic
    ``restart_list``): the (from, to) level of every step. Under 20 steps it is plain Heun over
    `sigmas`. From 20 steps, `sigmas` is replaced by a Karras schedule between its ends with fewer
    steps, and after the level nearest 0.1 the sampler jumps back up to the level nearest 2 and
    descends again over `restart_steps` Karras steps (9 steps once; from 36 steps, steps // 4
    twice), so the step count stays the requested one unless the schedule never reaches 2 (img2img)."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    steps = len(sigmas) - 1
    if steps < RESTART_MIN_STEPS:
        return [(float(a), float(b)) for a, b in pairwise(sigmas)]
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    levels = karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0])).astype(np.float32)
    low = int(np.argmin(np.abs(levels - np.float32(RESTART_FROM))))
    high = int(np.argmin(np.abs(levels - np.float32(RESTART_TO))))
    segments = []
    for i in range(len(levels) - 1):
        segments.append((float(levels[i]), float(levels[i + 1])))
        if i + 1 == low and high < low:
            # restart_steps + 1 Karras levels from levels[high] down to levels[low] (the appended 0 dropped)
            again = karras(restart_steps + 1, float(levels[low]), float(levels[high]))[:-1].astype(np.float32)
            segments += [(float(a), float(b)) for a, b in pairwise(again)] * restart_times
    return segments


def sample_restart(denoise: SigmaDenoiser, x, sigmas, noise: NoiseSource, callback=None) -> np.ndarray:
    """Restart sampling (Xu et al. 2023) as A1111 runs it: Heun steps over `restart_segments`;
    where a step starts above the level the last one ended at, fresh noise brings x up to it
    (s_noise 1)."""
    x = as_f32(x)
    last: float | None = None
    for i, (sigma, sigma_next) in enumerate(restart_segments(sigmas)):
        if last is not None and last < sigma:
            x = as_f32(x + noise() * np.float32(math.sqrt(np.float32(sigma) ** 2 - np.float32(last) ** 2)))
        x = notify(callback, i, heun_step(denoise, x, sigma, sigma_next))
        last = sigma_next
    return x


def _log_midpoint(sigma: float, sigma_next: float) -> float:
    """The geometric mean of two levels: k-diffusion's ``sigma.log().lerp(next.log(), 0.5).exp()``."""
    return math.exp(math.log(sigma) + 0.5 * (math.log(sigma_next) - math.log(sigma)))


def _dpm2_step(denoise: SigmaDenoiser, x, sigma: float, target: float, d: np.ndarray) -> np.ndarray:
    """DPM-Solver-2's update from sigma to target, using the slope at their log midpoint."""
    sigma_mid = _log_midpoint(sigma, target)
    x_2 = as_f32(x + d * np.float32(sigma_mid - sigma))
    d_2 = _derivative(x_2, sigma_mid, denoise(x_2, sigma_mid))
    return as_f32(x + d_2 * np.float32(target - sigma))


def sample_dpm_2(denoise: SigmaDenoiser, x, sigmas, noise=None, callback=None, **params: float) -> np.ndarray:
    """DPM2: DPM-Solver-2 steps, Euler into the last level 0, after `churn`."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, float(sigmas[i]), len(sigmas) - 1, noise, **params)
        sigma_next = float(sigmas[i + 1])
        d = _derivative(x, sigma, denoise(x, sigma))
        if sigma_next == 0:
            x = as_f32(x + d * np.float32(sigma_next - sigma))
        else:
            x = _dpm2_step(denoise, x, sigma, sigma_next, d)
        x = notify(callback, i, x)
    return x


def sample_dpm_2_ancestral(
    denoise: SigmaDenoiser, x, sigmas, noise: NoiseSource, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> np.ndarray:
    """DPM2 a: a DPM-Solver-2 step down to sigma_down, then noise times sigma_up."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _derivative(x, sigma, denoise(x, sigma))
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = as_f32(x + d * np.float32(down - sigma))
        else:
            x = as_f32(_dpm2_step(denoise, x, sigma, down, d) + noise() * np.float32(s_noise) * np.float32(up))
        x = notify(callback, i, x)
    return x


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """The integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial of node
    sigmas[i - j] over nodes sigmas[i], ..., sigmas[i - order + 1]. k-diffusion integrates it with
    scipy's quad, which is exact for these cubics at most; numpy's polynomial integral is too."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    integral = basis.integ()
    return float(integral(float(sigmas[i + 1])) - integral(float(sigmas[i])))


def sample_lms(denoise: SigmaDenoiser, x, sigmas, noise=None, callback=None, order: int = 4) -> np.ndarray:
    """Linear multistep: the slopes of the last `order` steps, integrated as a polynomial in sigma."""
    x = as_f32(x)
    slopes: list[np.ndarray] = []
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        slopes = [*slopes, _derivative(x, sigma, denoise(x, sigma))][-order:]
        current = min(i + 1, order)
        coefficients = [lms_coefficient(current, sigmas, i, j) for j in range(current)]
        x = as_f32(x + sum(np.float32(c) * d for c, d in zip(coefficients, reversed(slopes), strict=False)))
        x = notify(callback, i, x)
    return x


def _exp_step(x: np.ndarray, sigma: float, sigma_next: float, denoised: np.ndarray) -> np.ndarray:
    """DPM-Solver++'s first-order update in t = -log(sigma): ``(s'/s) x - expm1(-h) D``."""
    h = math.log(sigma) - math.log(sigma_next)
    return as_f32(np.float32(sigma_next / sigma) * x - np.float32(math.expm1(-h)) * denoised)


def sample_dpmpp_2s_ancestral(
    denoise: SigmaDenoiser, x, sigmas, noise: NoiseSource, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> np.ndarray:
    """DPM-Solver++(2S) steps (midpoint r = 1/2) down to sigma_down, then noise times sigma_up."""
    x = as_f32(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = as_f32(x + _derivative(x, sigma, denoised) * np.float32(down - sigma))
        else:
            sigma_mid = _log_midpoint(sigma, down)
            x_2 = _exp_step(x, sigma, sigma_mid, denoised)
            x = _exp_step(x, sigma, down, denoise(x_2, sigma_mid))
        if sigma_next > 0:
            x = as_f32(x + noise() * np.float32(s_noise) * np.float32(up))
        x = notify(callback, i, x)
    return x


def sample_dpmpp_2m(denoise: SigmaDenoiser, x, sigmas, noise=None, callback=None) -> np.ndarray:
    """DPM-Solver++(2M): the first step and the step into 0 first order, the others blend the last
    two predictions (k-diffusion's ``denoised_d``; no lower-order final steps, unlike diffusers)."""
    x = as_f32(x)
    old_denoised: np.ndarray | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = as_f32(denoise(x, sigma))
        if sigma_next == 0:
            x = denoised  # the h -> infinity limit of the update
        elif old_denoised is None:
            x = _exp_step(x, sigma, sigma_next, denoised)
        else:
            h = math.log(sigma) - math.log(sigma_next)
            half_inv_r = h / (2.0 * (math.log(float(sigmas[i - 1])) - math.log(sigma)))  # 1 / (2r)
            blended = np.float32(1.0 + half_inv_r) * denoised - np.float32(half_inv_r) * old_denoised
            x = _exp_step(x, sigma, sigma_next, blended)
        old_denoised = denoised
        x = notify(callback, i, x)
    return x


def _f32_log(value: float) -> np.float32:
    """float32 log as torch's scalar path computes it (the correctly rounded libm logf)."""
    return np.float32(math.log(float(value)))


def _f32_exp(value: float) -> np.float32:
    return np.float32(math.exp(float(value)))


def sample_dpmpp_sde(
    denoise: SigmaDenoiser, x, sigmas, noise: BrownianSource, callback=None, eta=1.0, s_noise=1.0, r: float = 0.5
) -> np.ndarray:
    """DPM-Solver++ (stochastic): a first-order ancestral step to the point a fraction r along the
    step in t = -log(sigma), then the whole step from the blend of both predictions; two model
    calls a step, Euler into 0. Its levels are k-diffusion's float32 ``exp(-(-log sigma))``
    round trips, which the Brownian noise is queried at, so they are kept in float32 here."""
    x = as_f32(x)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = as_f32(denoise(x, sigma))
        if sigma_next == 0:
            x = as_f32(x + _derivative(x, sigma, denoised) * np.float32(sigma_next - sigma))
        else:
            t, t_next = -_f32_log(sigma), -_f32_log(sigma_next)
            s = t + (t_next - t) * np.float32(r)
            level, level_s, level_next = _f32_exp(-t), _f32_exp(-s), _f32_exp(-t_next)
            down, up = ancestral_step(float(level), float(level_s), eta)
            x_2 = _exp_step(x, float(level), down, denoised)
            x_2 = as_f32(x_2 + noise(level, level_s) * np.float32(s_noise) * np.float32(up))
            denoised_2 = as_f32(denoise(x_2, float(level_s)))
            down, up = ancestral_step(float(level), float(level_next), eta)
            blended = np.float32(1 - fac) * denoised + np.float32(fac) * denoised_2
            x = _exp_step(x, float(level), down, blended)
            x = as_f32(x + noise(level, level_next) * np.float32(s_noise) * np.float32(up))
        x = notify(callback, i, x)
    return x


def sample_dpmpp_2m_sde(
    denoise: SigmaDenoiser,
    x,
    sigmas,
    noise: BrownianSource,
    callback=None,
    eta=1.0,
    s_noise=1.0,
    solver_type: str = "midpoint",
) -> np.ndarray:
    """DPM-Solver++(2M) SDE: the data-prediction SDE step with a second-order correction from the
    last prediction ("midpoint" or "heun" form), plus Brownian noise; the step into 0 returns the
    prediction."""
    x = as_f32(x)
    old_denoised: np.ndarray | None = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = as_f32(denoise(x, sigma))
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = np.float32(sigma_next / sigma * math.exp(-eta_h)) * x + np.float32(decay) * denoised
            if old_denoised is not None:
                weight = (decay / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * decay
                x = x + np.float32(weight * h / h_last) * (denoised - old_denoised)
            if eta:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * np.float32(scale)
            x = as_f32(x)
            h_last = h
        old_denoised = denoised
        x = notify(callback, i, x)
    return x


def sample_dpmpp_3m_sde(denoise: SigmaDenoiser, x, sigmas, noise: BrownianSource, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: the SDE step corrected by the first and second differences of the last
    three predictions (one and two after the first steps), plus Brownian noise."""
    x = as_f32(x)
    history: list[tuple[np.ndarray, float]] = []  # (prediction, its step in t), newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = as_f32(denoise(x, sigma))
        h = math.log(sigma) - math.log(sigma_next) if sigma_next > 0 else 0.0
        if sigma_next == 0:
            x = denoised
        else:
            h_eta = h * (eta + 1)
            x = np.float32(math.exp(-h_eta)) * x + np.float32(-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if len(history) >= 2:
                (denoised_1, h_1), (denoised_2, h_2) = history[:2]
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / np.float32(r0)
                d1_1 = (denoised_1 - denoised_2) / np.float32(r1)
                d1 = d1_0 + (d1_0 - d1_1) * np.float32(r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / np.float32(r0 + r1)
                x = x + np.float32(phi_2) * d1 - np.float32(phi_2 / h_eta - 0.5) * d2
            elif history:
                denoised_1, h_1 = history[0]
                x = x + np.float32(phi_2) * ((denoised - denoised_1) / np.float32(h_1 / h))
            if eta:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * np.float32(scale)
            x = as_f32(x)
        history = [(denoised, h), *history[:1]]
        x = notify(callback, i, x)
    return x


def dpm_fast_grid(sigma_min: float, sigma_max: float, calls: int) -> tuple[np.ndarray, list[int]]:
    """DPM fast's levels and the order of each step: ``calls`` model calls spread over
    floor(calls / 3) + 1 steps evenly spaced in t = -log(sigma), third order but the last one or two."""
    steps = calls // 3 + 1
    t = np.linspace(-math.log(sigma_max), -math.log(sigma_min), steps + 1)
    orders = [3] * (steps - 2) + [2, 1] if calls % 3 == 0 else [3] * (steps - 1) + [calls % 3]
    return np.exp(-t), orders


def _dpm_solver_step(denoise: SigmaDenoiser, x, t: float, t_next: float, order: int) -> np.ndarray:
    """DPM-Solver-1/2/3 from t to t_next in eps form (k-diffusion ``DPMSolver.dpm_solver_*_step``,
    r1 = 1/2 for order 2, r1 = 1/3 and r2 = 2/3 for order 3)."""

    def eps_at(sample: np.ndarray, time: float) -> np.ndarray:
        sigma = math.exp(-time)
        return (sample - denoise(sample, sigma)) / np.float32(sigma)

    h = t_next - t
    sigma_next = math.exp(-t_next)
    eps = eps_at(x, t)
    first = x - np.float32(sigma_next * math.expm1(h)) * eps
    if order == 1:
        return as_f32(first)
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = t + r1 * h
    u1 = as_f32(x - np.float32(math.exp(-s1) * math.expm1(r1 * h)) * eps)
    eps_r1 = eps_at(u1, s1)
    if order == 2:
        return as_f32(first - np.float32(sigma_next / (2 * r1) * math.expm1(h)) * (eps_r1 - eps))
    r2 = 2.0 / 3.0
    s2 = t + r2 * h
    u2 = x - np.float32(math.exp(-s2) * math.expm1(r2 * h)) * eps
    u2 = as_f32(u2 - np.float32(math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - eps))
    eps_r2 = eps_at(u2, s2)
    return as_f32(first - np.float32(sigma_next / r2 * (math.expm1(h) / h - 1)) * (eps_r2 - eps))


def sample_dpm_fast(
    denoise: SigmaDenoiser, x, sigmas, noise: NoiseSource, callback=None, *, orders: list[int], eta=1.0, s_noise=1.0
) -> np.ndarray:
    """DPM-Solver-Fast over the levels and orders of `dpm_fast_grid`. A1111 runs it with eta 1
    (``eta_ancestral``): each step aims at the ancestral sigma_down (not below the grid's end), then
    adds noise for the rest; the noise is drawn on every step, the last included."""
    x = as_f32(x)
    t_end = -math.log(float(sigmas[-1]))
    for i, order in enumerate(orders):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if eta:
            down, _ = ancestral_step(sigma, sigma_next, eta)
            t_target = min(t_end, -math.log(down))
            up = math.sqrt(max(sigma_next**2 - math.exp(-t_target) ** 2, 0.0))
        else:
            t_target, up = -math.log(sigma_next), 0.0
        x = _dpm_solver_step(denoise, x, -math.log(sigma), t_target, order)
        x = as_f32(x + np.float32(up) * np.float32(s_noise) * noise())
        x = notify(callback, i, x)
    return x


K_SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "euler_a": sample_euler_ancestral,
    "euler": sample_euler,
    "lms": sample_lms,
    "heun": sample_heun,
    "dpm2": sample_dpm_2,
    "dpm2_a": sample_dpm_2_ancestral,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,  # runtime.sampling.dpm_adaptive
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": partial(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "restart": sample_restart,
    "lcm": sample_lcm,  # runtime.sampling.lcm
}
# The SDE samplers: their noise is a BrownianSource (A1111's Brownian tree), the others' a NoiseSource.
BROWNIAN_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


def step_ends(name: str, schedule: Schedule) -> np.ndarray:
    """The level x is at after each of the sampler's steps (their count is the progress total):
    the schedule's next levels, but Restart's own plan for Restart."""
    if name == "restart" and schedule.log_sigmas is not None:
        return np.array([end for _, end in restart_segments(schedule.sigmas)], dtype=np.float32)
    return np.asarray(schedule.sigmas[1:], dtype=np.float32)


def sample(
    name: str,
    denoise: Callable[[np.ndarray, float, float], np.ndarray],
    x: np.ndarray,
    schedule: Schedule,
    noise: NoiseSource | BrownianSource | None = None,
    callback: StepCallback | None = None,
    params: SamplerParams | None = None,
) -> np.ndarray:
    """Run k-diffusion sampler `name` over a k-diffusion `schedule` (one with ``log_sigmas``).

    `noise` is a BrownianSource for the SDE samplers (`BROWNIAN_SAMPLERS`), a NoiseSource for the
    others that draw noise.
    `denoise(x, sigma, timestep)` is the model; each level the sampler asks for gets its timestep
    from ``sigma_to_t``, as k-diffusion's ``CompVisDenoiser`` does. DPM fast runs its own grid
    between the schedule's first and next-to-last levels with one model call per step of it, as
    A1111 passes it ``sigma_max``, ``sigma_min`` and ``n``. `params`: A1111's eta / s_churn /
    s_tmin / s_tmax / s_noise, each given to the samplers A1111 gives it to.
    """
    if name not in K_SAMPLERS:
        raise ValueError(f"unknown k-diffusion sampler {name!r}; choose one of {', '.join(K_SAMPLERS)}")
    if schedule.log_sigmas is None:
        raise ValueError("a k-diffusion sampler needs a k-diffusion schedule (one with log_sigmas)")
    log_table = schedule.log_sigmas

    def at_sigma(x_in: np.ndarray, sigma: float) -> np.ndarray:
        return denoise(x_in, sigma, float(sigma_to_t(np.array([sigma]), log_table)[0]))

    sigmas = schedule.sigmas
    if name == "lcm":  # the model at LCM's own timesteps, its boundary condition applied

        def lcm_model(x_in: np.ndarray, sigma: float) -> np.ndarray:
            timestep = lcm_timestep(sigma, log_table)
            c_skip, c_out = lcm_boundary(timestep)
            return np.float32(c_out) * denoise(x_in, sigma, float(timestep)) + np.float32(c_skip) * x_in

        return sample_lcm(lcm_model, x, sigmas, noise, callback)
    keywords = (params or SamplerParams()).keywords(name)
    if name == "dpm_adaptive":  # as DPM fast: between the schedule's ends
        return sample_dpm_adaptive(at_sigma, x, float(sigmas[-2]), float(sigmas[0]), noise, callback, **keywords)
    if name == "dpm_fast":
        levels, orders = dpm_fast_grid(float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1)
        return sample_dpm_fast(at_sigma, x, levels, noise, callback, orders=orders, **keywords)
    return K_SAMPLERS[name](at_sigma, x, sigmas, noise, callback, **keywords)
