"""k-diffusion's DPM adaptive (``sample_dpm_adaptive``: DPM-Solver-23 with a PID step-size
controller, Lu et al. 2022) in numpy, as A1111 runs it: order 3, k-diffusion's tolerances, and
A1111's eta 1 (``eta_ancestral``), so each accepted step aims at the ancestral sigma_down and adds
noise for the rest.

The step sizes are chosen by the solver's own error estimate, so the run's length is not known in
advance; the scalars (times t = -log sigma, the levels) are kept in float32 as k-diffusion's
tensors hold them, because an accept/reject decision near the threshold would otherwise flip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .steps import notify

__all__ = ["AdaptiveSettings", "PIDController", "sample_dpm_adaptive"]

f32 = np.float32


class AdaptiveSettings:
    """k-diffusion's defaults for sample_dpm_adaptive (A1111 passes none of them but eta)."""

    order = 3
    rtol, atol = 0.05, 0.0078
    h_init = 0.05
    pcoeff, icoeff, dcoeff = 0.0, 1.0, 0.0
    accept_safety = 0.81


class PIDController:
    """k-diffusion's PIDStepSizeController: the step h grows or shrinks by a limited factor of the
    last inverse errors; a step whose factor falls below accept_safety is rejected."""

    def __init__(self, h: float, order: float, s: type[AdaptiveSettings] = AdaptiveSettings, eps: float = 1e-8):
        self.h = h
        self.b1 = (s.pcoeff + s.icoeff + s.dcoeff) / order
        self.b2 = -(s.pcoeff + 2 * s.dcoeff) / order
        self.b3 = s.dcoeff / order
        self.accept_safety = s.accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # the limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def _sigma(t: np.float32) -> np.float32:
    return f32(np.exp(-t))


def _solver_23(eps_at: Callable, x: np.ndarray, t: np.float32, t_next: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3 from t to t_next, sharing their model calls (three)."""
    r1, r2 = 1 / 3, 2 / 3
    h = f32(t_next - t)
    eps = eps_at(x, t)
    s1, s2 = f32(t + f32(r1 * h)), f32(t + f32(r2 * h))
    u1 = x - _sigma(s1) * np.expm1(f32(r1 * h)) * eps
    eps_r1 = eps_at(u1, s1)
    base = x - _sigma(t_next) * np.expm1(h) * eps
    low = base - _sigma(t_next) / f32(2 * r1) * np.expm1(h) * (eps_r1 - eps)
    phi = np.expm1(f32(r2 * h)) / f32(r2 * h) - f32(1)
    u2 = x - _sigma(s2) * np.expm1(f32(r2 * h)) * eps - _sigma(s2) * f32(r2 / r1) * phi * (eps_r1 - eps)
    eps_r2 = eps_at(u2, s2)
    high = base - _sigma(t_next) / f32(r2) * (np.expm1(h) / h - f32(1)) * (eps_r2 - eps)
    return low.astype(np.float32), high.astype(np.float32)


def _ancestral_target(s: np.float32, t: np.float32, t_end: np.float32, eta: float) -> tuple[np.float32, np.float32]:
    """(t_, sigma_up): where the deterministic part of an eta step aims, and the noise it adds."""
    if not eta:
        return t, f32(0)
    sigma_from, sigma_to = _sigma(s), _sigma(t)
    up = min(sigma_to, f32(eta) * f32(np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)))
    down = f32(np.sqrt(sigma_to**2 - up**2))
    t_ = min(t_end, f32(-np.log(down)))
    return t_, f32(np.sqrt(sigma_to**2 - _sigma(t_) ** 2))


def sample_dpm_adaptive(
    denoise: Callable[[np.ndarray, float], np.ndarray],
    x: np.ndarray,
    sigma_min: float,
    sigma_max: float,
    noise: Callable[[], np.ndarray],
    callback=None,
    eta: float = 1.0,
    s: type[AdaptiveSettings] = AdaptiveSettings,
) -> np.ndarray:
    """Adaptive DPM-Solver-23 from sigma_max down to sigma_min; the callback sees each accepted
    step (counted from 0). The error is one norm over the whole batch, as in k-diffusion."""

    def eps_at(sample: np.ndarray, time: np.float32) -> np.ndarray:
        return (sample - np.asarray(denoise(sample, float(_sigma(time))), dtype=np.float32)) / _sigma(time)

    x = np.asarray(x, dtype=np.float32)
    t_now, t_end = f32(-np.log(f32(sigma_max))), f32(-np.log(f32(sigma_min)))
    x_prev, accepted = x, 0
    pid = PIDController(s.h_init, 1.5 if eta else s.order, s)
    while t_now < t_end - 1e-5:
        t = min(t_end, f32(t_now + f32(pid.h)))
        t_, up = _ancestral_target(t_now, t, t_end, eta)
        low, high = _solver_23(eps_at, x, t_now, t_)
        delta = np.maximum(f32(s.atol), f32(s.rtol) * np.maximum(np.abs(low), np.abs(x_prev)))
        error = float(np.linalg.norm(((low - high) / delta).ravel()) / f32(math.sqrt(x.size)))
        if pid.propose_step(error):
            x_prev = low
            x = (high + up * noise()).astype(np.float32)
            t_now = t
            x = notify(callback, accepted, x)
            accepted += 1
    return x
