"""AUTOMATIC1111's schedule types (``modules/sd_schedulers.py``, web UI 1.10) as numpy functions.

Each function returns the noise levels of an n-step run, largest first, with the final level
appended (0, except for KL Optimal, which ends at the model's smallest sigma). ``table`` is the
model's training sigmas in float32, index = training timestep: what k-diffusion's
``CompVisDenoiser.sigmas`` holds in A1111 (LDM's float64 ``alphas_cumprod`` rounded to float32).
``sigma_min`` / ``sigma_max`` are its ends, as A1111 passes ``model_wrap.sigmas[0]`` and ``[-1]``.

The arithmetic follows A1111's (mostly float32 torch) closely enough that the levels agree to
about 1e-6; `tests/test_schedules.py` checks each one against A1111's formula.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["A1111_SCHEDULES", "BETA_ALPHA", "BETA_BETA", "a1111_sigmas", "sigma_to_t", "t_to_sigma"]

# A1111's option defaults: beta_dist_alpha / beta_dist_beta, and each scheduler's default_rho.
BETA_ALPHA = 0.6
BETA_BETA = 0.6
KARRAS_RHO = 7.0
POLYEXPONENTIAL_RHO = 1.0
# Align Your Steps' SD 1.5 levels (NVIDIA's published table, as A1111 ships it).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma, interpolating log sigma between the two neighbouring
    training levels (k-diffusion ``DiscreteSchedule.sigma_to_t``); clamped to the table's ends."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    table = log_table.astype(np.float64)
    low = np.clip(np.searchsorted(table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((table[low] - log_sigma) / (table[low] - table[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def t_to_sigma(t: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Sigma at fractional timesteps by interpolating log sigma (k-diffusion ``t_to_sigma``)."""
    t = np.asarray(t, dtype=np.float64)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = t - low
    table = log_table.astype(np.float64)
    return np.exp((1.0 - w) * table[low] + w * table[high])


def _zero_ended(sigmas: np.ndarray) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def uniform(n: int, table: np.ndarray) -> np.ndarray:
    """ "Uniform" (and "Automatic" for Euler, Euler a, LMS, Heun): ``CompVisDenoiser.get_sigmas(n)``,
    n timesteps evenly spaced from the last training one to 0."""
    return _zero_ended(t_to_sigma(np.linspace(len(table) - 1, 0, n), np.log(table)))


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (2022) eq. 5: evenly spaced in sigma**(1/rho) (``get_sigmas_karras``)."""
    ramp = np.linspace(0.0, 1.0, n)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return _zero_ended((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in log sigma (``get_sigmas_exponential``)."""
    return _zero_ended(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = POLYEXPONENTIAL_RHO) -> np.ndarray:
    """A power ramp in log sigma (``get_sigmas_polyexponential``); rho 1 is "Exponential"."""
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return _zero_ended(np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _timestep_levels(n: int, table: np.ndarray, drop_last: bool) -> np.ndarray:
    """A1111's sgm_uniform / normal: timesteps evenly spaced between those of sigma_max and
    sigma_min; sgm_uniform spaces n + 1 and drops the last (the SGM "trailing" grid)."""
    log_table = np.log(table)
    start, end = sigma_to_t(table[-1:], log_table)[0], sigma_to_t(table[:1], log_table)[0]
    t = np.linspace(start, end, n + 1)[:-1] if drop_last else np.linspace(start, end, n)
    return _zero_ended(t_to_sigma(t, log_table))


def sgm_uniform(n: int, table: np.ndarray) -> np.ndarray:
    return _timestep_levels(n, table, drop_last=True)


def normal(n: int, table: np.ndarray) -> np.ndarray:
    return _timestep_levels(n, table, drop_last=False)


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024). n + 1 levels ending at sigma_min, not 0:
    A1111 returns them as they are."""
    fraction = np.arange(n + 1, dtype=np.float64) / n
    return np.tan(fraction * math.atan(sigma_min) + (1.0 - fraction) * math.atan(sigma_max))


def align_your_steps(n: int) -> np.ndarray:
    """NVIDIA's SD 1.5 table, log-linearly interpolated to n levels when n is not its length."""
    levels = np.array(AYS_SD15, dtype=np.float64)
    if n != len(levels):
        # A1111's loglinear_interp: interpolate log sigma (ascending) over an even grid on [0, 1].
        ascending = np.log(levels[::-1])
        grid = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), ascending)
        levels = np.exp(grid)[::-1]
    return _zero_ended(levels)


def simple(n: int, table: np.ndarray) -> np.ndarray:
    """Every (T / n)-th training level from the top, the index truncated as A1111's int()."""
    stride = len(table) / n
    return _zero_ended([table[-(1 + int(i * stride))] for i in range(n)])


def ddim_levels(n: int, table: np.ndarray) -> np.ndarray:
    """DDIM's uniform grid on the training levels: timesteps 1, 1 + T // n, ... below T, top first.
    Its length is not always n (6 steps give 7 levels): the run makes that many steps."""
    stride = max(len(table) // n, 1)
    return _zero_ended(table[1 : len(table) : stride][::-1])


def _log_beta_function(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return result


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (the Beta(a, b) distribution's CDF)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta_function(a, b)
    # The fraction converges fast for x below the mean; use the symmetry I_x(a, b) = 1 - I_1-x(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile (scipy's ``stats.beta.ppf``), by bisection of the CDF: the CDF is
    increasing, and 80 halvings of [0, 1] reach float64 resolution."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if beta_cdf(middle, a, b) < q:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def beta(n: int, sigma_min: float, sigma_max: float, a: float = BETA_ALPHA, b: float = BETA_BETA) -> np.ndarray:
    """ "Beta" (Lee et al. 2024): quantiles of Beta(a, b) at 1 .. 0 mapped onto [sigma_min, sigma_max]."""
    quantiles = [beta_ppf(float(q), a, b) for q in 1.0 - np.linspace(0.0, 1.0, n)]
    return _zero_ended([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


A1111_SCHEDULES = (
    "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal", "align_your_steps",
    "simple", "normal", "ddim", "beta",
)  # fmt: skip


def a1111_sigmas(kind: str, n: int, table: np.ndarray) -> np.ndarray:
    """The levels of A1111 schedule type `kind` (one of `A1111_SCHEDULES`) for n steps, float32."""
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    by_range = {
        "karras": karras, "exponential": exponential, "polyexponential": polyexponential,
        "kl_optimal": kl_optimal, "beta": beta,
    }  # fmt: skip
    by_table = {"uniform": uniform, "sgm_uniform": sgm_uniform, "normal": normal, "simple": simple, "ddim": ddim_levels}
    if kind in by_range:
        sigmas = by_range[kind](n, sigma_min, sigma_max)
    elif kind in by_table:
        sigmas = by_table[kind](n, table)
    elif kind == "align_your_steps":
        sigmas = align_your_steps(n)
    else:
        raise ValueError(f"unknown A1111 schedule {kind!r}")
    return np.asarray(sigmas, dtype=np.float32)
