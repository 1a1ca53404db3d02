"""A1111's LCM sampler (modules/sd_samplers_lcm.py) in numpy: a latent consistency model's
sampling, where each step is the model's consistency output at one of the 50 timesteps LCM was
distilled on, re-noised to the next level (Luo et al. 2023).

A1111 wraps the model in ``LCMCompVisDenoiser``: a k-diffusion denoiser over the 50 training levels
``alphas_cumprod[19], [39], ..., [999]`` that asks the UNet at the nearest of those timesteps
(an integer) and applies LCM's boundary condition ``c_skip x + c_out D`` to the prediction D.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .steps import notify

__all__ = ["LCM_ORIGINAL_STEPS", "lcm_boundary", "lcm_sigma_table", "lcm_timestep", "sample_lcm"]

LCM_ORIGINAL_STEPS = 50  # "LCM Original Timesteps", A1111's constant
LCM_TRAIN_STEPS = 1000  # A1111 hard-codes the model's 1000 training steps here
LCM_SKIP = LCM_TRAIN_STEPS // LCM_ORIGINAL_STEPS
SIGMA_DATA = 0.5


def lcm_sigma_table(table: np.ndarray) -> np.ndarray:
    """The 50 levels of the timesteps ``skip - 1, 2 skip - 1, ..., 999`` (``alphas_cumprod_valid``)
    from the model's 1000 training levels, smallest first."""
    return np.asarray(table, dtype=np.float32)[LCM_SKIP - 1 :: LCM_SKIP]


def lcm_timestep(sigma: float, log_table: np.ndarray) -> int:
    """The UNet timestep of level sigma: the nearest of the 50 levels in log sigma, as a training
    timestep (``LCMCompVisDenoiser.sigma_to_t``: argmin, first on a tie)."""
    index = int(np.argmin(np.abs(np.float32(math.log(sigma)) - log_table)))
    return index * LCM_SKIP + (LCM_SKIP - 1)


def lcm_boundary(timestep: int) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's boundary condition at the timestep scaled by 10 (get_scaled_out)."""
    scaled = timestep * 10.0
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)


def sample_lcm(
    denoise: Callable[[np.ndarray, float], np.ndarray],
    x: np.ndarray,
    sigmas: np.ndarray,
    noise: Callable[[], np.ndarray],
    callback=None,
) -> np.ndarray:
    """LCM's multistep sampling (``sample_lcm``): the consistency output at each level, plus fresh
    noise times the next level unless it is the last, 0. `denoise` is the LCM-wrapped model."""
    x = np.asarray(x, dtype=np.float32)
    for i in range(len(sigmas) - 1):
        x = np.asarray(denoise(x, float(sigmas[i])), dtype=np.float32)
        if sigmas[i + 1] > 0:
            x = (x + np.float32(sigmas[i + 1]) * noise()).astype(np.float32)
        x = notify(callback, i, x)
    return x
