"""AUTOMATIC1111's timestep samplers that k-diffusion lacks, in numpy: UniPC
(modules/models/diffusion/uni_pc/uni_pc.py, run by modules/sd_samplers_timesteps_impl.py),
DDIM CFG++ and PLMS (sd_samplers_timesteps_impl.ddim_cfgpp, plms).

They run in VE form like `runtime.sampling.samplers` (``x = latent / sqrt(alpha_bar)``, the model
``denoise(x, i)`` giving the clean prediction at ``sigmas[i]``) over a schedule built by
`runtime.sampling.schedules` (``unipc_levels``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .steps import StepCallback, notify

__all__ = [
    "CFGPP_SAMPLERS",
    "CFGPP_SCALE_DIVISOR",
    "PLMS_COEFFICIENTS",
    "UNIPC_ORDER",
    "UNIPC_VARIANT",
    "ddim_noise",
    "sample_ddim_cfgpp",
    "sample_plms",
    "sample_unipc",
    "unipc_coefficients",
    "unipc_times",
]

# A1111's defaults (shared.opts): uni_pc_variant, uni_pc_order, uni_pc_lower_order_final; its
# uni_pc_skip_type "time_uniform" is `unipc_times`.
UNIPC_VARIANT, UNIPC_ORDER, UNIPC_LOWER_ORDER_FINAL = "bh1", 3, True

# DDIM CFG++ (Chung et al. 2024) as A1111 runs it: the CFG scale divided by 12.5 (its
# cond_scale_miltiplier, mapping 0..12.5 to 0..1), the model also returning the uncond prediction.
CFGPP_SAMPLERS, CFGPP_SCALE_DIVISOR = ("ddim_cfgpp",), 12.5

# PLMS's Adams-Bashforth weights of the newest noise predictions, by how many earlier ones it has.
PLMS_COEFFICIENTS = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

StepDenoiser = Callable[[np.ndarray, int], np.ndarray]


def unipc_times(steps: int, total: int, start: float = 1.0) -> np.ndarray:
    """UniPC's "time_uniform" grid in DPM-Solver's continuous time (t_n = (n + 1) / total for
    training step n): ``steps + 1`` points evenly from `start` (1, or img2img's t_start) down to
    1 / total."""
    return np.linspace(start, 1.0 / total, steps + 1)


def unipc_coefficients(rks: list[float], hh: float, variant: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(B(h), predictor rhos, corrector rhos) of UniPC's B(h) update for one step: the system
    R rho = b with R[i] = rks**i and b[i] = (i + 1)! h phi_(i+2)(h) / B(h), where rks are the
    earlier predictions' distances in lambda relative to this step (the last one 1) and hh = -h.
    Order 2's predictor and order 1's corrector use 1/2, as UniPC does."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    order = len(rks)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
    predictor = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0)
    corrector = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
    return b_h, predictor, corrector


def _unipc_step(
    x: np.ndarray, history: list[tuple[np.ndarray, float]], sigma: float, order: int, variant: str
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """UniPC's predictor from the last `order` predictions (`history`: (prediction, lambda),
    newest last) to level `sigma`, and the corrector that refines it once the model has been
    asked at the predicted x. In VE form: the VP update divided by alpha_t."""
    m0, lambda_0 = history[-1]
    lambda_t = -math.log(sigma)
    h = lambda_t - lambda_0
    rks = [(history[-(i + 1)][1] - lambda_0) / h for i in range(1, order)]
    diffs = [(history[-(i + 1)][0] - m0) / np.float32(rk) for i, rk in enumerate(rks, start=1)]
    b_h, rhos_p, rhos_c = unipc_coefficients([*rks, 1.0], -h, variant)
    base = np.float32(math.exp(-h)) * x - np.float32(math.expm1(-h)) * m0  # sigma_t / sigma_0 = e^-h
    predicted = base
    if diffs:
        predicted = base - np.float32(b_h) * sum(np.float32(rho) * d for rho, d in zip(rhos_p, diffs, strict=True))

    def correct(model_t: np.ndarray) -> np.ndarray:
        residual = sum((np.float32(rho) * d for rho, d in zip(rhos_c[:-1], diffs, strict=True)), np.float32(0))
        return (base - np.float32(b_h) * (residual + np.float32(rhos_c[-1]) * (model_t - m0))).astype(np.float32)

    return predicted.astype(np.float32), correct


def sample_unipc(
    denoise: StepDenoiser,
    x: np.ndarray,
    sigmas: np.ndarray,
    noise=None,
    callback: StepCallback | None = None,
    *,
    order: int = UNIPC_ORDER,
    variant: str = UNIPC_VARIANT,
    lower_order_final: bool = UNIPC_LOWER_ORDER_FINAL,
) -> np.ndarray:
    """UniPC multistep with data prediction (Zhao et al. 2023) as A1111 runs it: step n is a
    predictor of order min(order, n) (and, with lower_order_final, at most the steps left), then
    the model at the new point, which both corrects the step and joins the history; the last step
    has no corrector and asks no model. `len(sigmas) - 1` steps, as many model calls."""
    x = np.asarray(x, dtype=np.float32)
    steps = len(sigmas) - 1
    history = [(np.asarray(denoise(x, 0), dtype=np.float32), -math.log(float(sigmas[0])))]
    for step in range(1, steps + 1):
        step_order = min(order, step, steps + 1 - step) if lower_order_final else min(order, step)
        sigma = float(sigmas[step])
        x, correct = _unipc_step(x, history, sigma, step_order, variant)
        if step < steps:
            model_t = np.asarray(denoise(x, step), dtype=np.float32)
            x = correct(model_t)
            history = [*history, (model_t, -math.log(sigma))][-order:]
        x = notify(callback, step - 1, x)
    return x


def ddim_noise(
    denoised: np.ndarray,
    eps: np.ndarray,
    sigma: float,
    sigma_next: float,
    eta: float,
    noise: Callable[[], np.ndarray] | None,
) -> np.ndarray:
    """A1111's DDIM step with eta > 0 in VE form. Its VP update ``sqrt(a') x0 + sqrt(1 - a' - s_t**2)
    eps + s_t n`` with ``s_t = eta sqrt((1 - a') / (1 - a) (1 - a / a'))``, divided by sqrt(a'), is
    ``D + sqrt(sigma'**2 - u**2) eps + u n`` with ``u = s_t / sqrt(a')``; n is drawn from the image
    generators (A1111's TorchHijack), on every step. DDIM CFG++ passes its uncond eps."""
    if noise is None:
        raise ValueError("DDIM with eta needs a noise source")
    alpha, alpha_next = 1.0 / (1.0 + sigma * sigma), 1.0 / (1.0 + sigma_next * sigma_next)
    s_t = eta * math.sqrt((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next))
    u = s_t / math.sqrt(alpha_next)
    direction = math.sqrt(max(sigma_next * sigma_next - u * u, 0.0))
    fresh = np.asarray(noise(), dtype=np.float32)
    return (denoised + eps * np.float32(direction) + fresh * np.float32(u)).astype(np.float32)


def sample_ddim_cfgpp(
    denoise: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    sigmas: np.ndarray,
    noise=None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """DDIM (eta 0, A1111's default eta_ddim) that re-noises the guided prediction along the
    unconditional noise instead of the guided one: ``x' = D + (sigma' / sigma) (x - D_uncond)``,
    the VE form of ``sqrt(a') x0 + sqrt(1 - a') eps_uncond``; with eta, A1111's DDIM noise term
    (`ddim_noise`). `denoise` returns (guided, uncond)."""
    x = np.asarray(x, dtype=np.float32)
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if eta:
            x = ddim_noise(denoised, (x - uncond) / np.float32(sigma), sigma, sigma_next, eta, noise)
        else:
            x = (denoised + np.float32(sigma_next / sigma) * (x - uncond)).astype(np.float32)
        x = notify(callback, i, x)
    return x


def sample_plms(
    denoise: StepDenoiser, x: np.ndarray, sigmas: np.ndarray, noise=None, callback: StepCallback | None = None
) -> np.ndarray:
    """Pseudo linear multistep (Liu et al. 2022) as A1111's ``plms``: DDIM steps (the Euler step in
    VE form, ``x' = x + (sigma' - sigma) eps``) with the noise prediction eps replaced by a blend:
    on the first step the mean of eps here and at the end of a plain step (a second model call),
    then Adams-Bashforth over up to four predictions."""
    x = np.asarray(x, dtype=np.float32)
    history: list[np.ndarray] = []  # earlier noise predictions, newest first

    def eps_at(sample: np.ndarray, step: int) -> np.ndarray:
        return (sample - np.asarray(denoise(sample, step), dtype=np.float32)) / np.float32(sigmas[step])

    for i in range(len(sigmas) - 1):
        dt = np.float32(float(sigmas[i + 1]) - float(sigmas[i]))
        eps = eps_at(x, i)
        if history:
            weights = PLMS_COEFFICIENTS[len(history)]
            blended = sum(np.float32(w) * e for w, e in zip(weights, [eps, *history], strict=True))
        else:
            blended = (eps + eps_at((x + dt * eps).astype(np.float32), i + 1)) / np.float32(2)
        x = (x + dt * blended).astype(np.float32)
        history = [eps, *history][:3]
        x = notify(callback, i, x)
    return x
