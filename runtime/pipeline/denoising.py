"""The model as the samplers see it: classifier-free guidance (with A1111's AND parts) around the
UNet, conditioning pieces switched at their step, and each image's own noise generator."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..sampling.brownian import BrownianNoise
from ..sampling.rng import NoiseGenerator
from ..text.conditioning import unet_contexts
from .request import CondPiece

if TYPE_CHECKING:
    from ..control.injection import PassControl
    from ..graphs.openvino_sessions import OpenVINOUNet
    from ..graphs.sessions import UNetSession
    from ..sampling.schedules import Schedule

Denoiser = Callable[[np.ndarray, float, float], np.ndarray]
"""(x, sigma, timestep) -> the predicted clean x (VE space) at noise level sigma."""


def make_denoiser(
    unet: UNetSession | OpenVINOUNet,
    conditioning: tuple[CondPiece, ...],
    states: dict[str, np.ndarray],
    scale: float,
    latent_shape: tuple,
    pad_conds: bool = False,
    with_uncond: bool = False,
    control: PassControl | None = None,
) -> Denoiser:
    """The model as samplers see it: x in VE space, its noise level and the UNet timestep for that
    level -> predicted clean x.
    Call i (counted from 0, as A1111 counts denoiser calls) uses the first conditioning
    piece with i < until_step; the UNet is rebound only when the piece changes. With
    guidance one UNet call runs the uncond half first (as diffusers does), then one half per
    AND part; parts and uncond of different lengths run as two calls, as in A1111
    (conditioning.unet_contexts). `with_uncond` makes it return (guided, uncond) predictions, for
    DDIM CFG++ (A1111's need_last_noise_uncond). `control`: the pass's ControlNet units, whose
    summed residuals each UNet call adds (runtime.control.injection), run on the call's own
    sample, timestep and context."""
    batch = latent_shape[0]
    bound: dict[str, Any] = {"calls": 0}

    def bind() -> CondPiece:
        call = bound["calls"]
        bound["calls"] += 1
        index = next((i for i, piece in enumerate(conditioning) if call < piece.until_step), 0)
        if bound.get("piece") != index:
            piece = conditioning[index]
            uncond = states[piece.uncond] if piece.uncond is not None else None
            contexts = unet_contexts([states[text] for text in piece.conds], uncond, pad_conds, states.get(""))
            bound["steps"] = []
            for call, context in enumerate(contexts):
                context = np.repeat(context, batch, axis=0)  # each half once per image
                step = unet.bind(context, (len(context), *latent_shape[1:]))
                uncond_rows = batch if call == 0 and piece.uncond is not None else 0  # the uncond half comes first
                bound["steps"].append((step, len(context) // batch, context, uncond_rows))
            bound["piece"] = index
        return conditioning[index]

    def denoise(x: np.ndarray, sigma: float, timestep: float) -> np.ndarray:
        piece = bind()
        sigma = np.float32(sigma)
        scaled = x / np.sqrt(sigma * sigma + np.float32(1.0))
        outputs = []
        for unet_step, halves, context, uncond_rows in bound["steps"]:
            timesteps = np.full((batch * halves,), timestep, dtype=np.float32)
            sample = np.concatenate([scaled] * halves)
            residuals = control.residuals(sample, timesteps, context, uncond_rows) if control is not None else None
            extra = () if residuals is None else (residuals,)  # no unit guides this call: the UNet's zeros
            outputs.append(unet_step(sample, timesteps, *extra))
        eps = np.concatenate(outputs)
        if piece.uncond is None:
            return x - sigma * eps
        guided = x - sigma * combine_guidance(eps, batch, scale, piece.weights)
        return (guided, x - sigma * eps[:batch]) if with_uncond else guided

    return denoise


def combine_guidance(eps: np.ndarray, batch: int, scale: float, weights: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Classifier-free guidance on one UNet output holding the uncond half first (as diffusers):
    eps = uncond + scale * (cond - uncond). With AND parts after it, A1111's composable
    diffusion: eps = uncond + sum of weight * scale * (cond_part - uncond) (CFGDenoiser's
    combine_denoised, there on the denoised images: the same sum, as denoised = x - sigma * eps)."""
    eps_uncond = combined = eps[:batch]
    for index, weight in enumerate(weights, start=1):
        combined = combined + np.float32(weight * scale) * (eps[index * batch : (index + 1) * batch] - eps_uncond)
    return combined


def per_image_noise(generators: list[NoiseGenerator], shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """Each image draws from its own generator, so image i of a batch equals a single run with
    seed + i (A1111's batch rule; diffusers with a list of generators does the same)."""

    def draw() -> np.ndarray:
        return np.concatenate([generator.randn(shape) for generator in generators])

    return draw


def brownian_noise(seeds: list[int], rng: str, shape: tuple[int, ...], schedule: Schedule) -> BrownianNoise:
    """The SDE samplers' noise as A1111's create_noise_sampler makes it: one Brownian tree per image
    seed (no ENSD) over the whole schedule's level range, also when img2img runs only its tail.
    A1111 draws the tree on the sampling device: "cpu" is A1111 on a CPU, bit for bit; "nv" draws
    each interval as a fresh CUDA generator would (the NV imitation), as on an NVIDIA GPU."""
    if schedule.sigma_range is None:
        raise ValueError("the SDE samplers need a k-diffusion schedule (one with a sigma range)")
    return BrownianNoise(*schedule.sigma_range, seeds, shape, rng)
