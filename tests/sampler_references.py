"""A1111's images for every sampler, txt2img and img2img, as A1111 1.10 drives k-diffusion and its own
samplers: the reference of tests/test_kdiffusion_parity.py and scripts/check_samplers_http.py.

The model is a diffusers pipeline (its UNet and VAE); k-diffusion's CompVisDenoiser over LDM's
``alphas_cumprod``; A1111's CFG on the denoised images (uncond first as the runtime batches it;
the sum is the same); A1111's schedule for the sampler (KDiffusionSampler.get_sigmas: "Automatic"
per sampler, discard_next_to_last_sigma); the initial noise ``torch.randn`` from the image's seeded
CPU generator, and the samplers' later noise from the same generator (A1111's TorchHijack). The
timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) and LCM are A1111's own code
(tests/a1111_reference.py). img2img is A1111's sample_img2img; the init latent is drawn from the
VAE's distribution with the image's generator before the noise, as the runtime (and diffusers)
draw it (A1111's own draw is unseeded).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import a1111_reference as a1111
import diffusers_reference as reference
import kdiffusion_reference as kd

# A1111 1.10 samplers_k_diffusion: function, "Automatic" schedule type, discard_next_to_last_sigma.
K_DIFFUSION = {
    "euler_a": ("sample_euler_ancestral", None, False),
    "euler": ("sample_euler", None, False),
    "lms": ("sample_lms", None, False),
    "heun": ("sample_heun", None, False),
    "dpm2": ("sample_dpm_2", "karras", True),
    "dpm2_a": ("sample_dpm_2_ancestral", "karras", True),
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", "karras", False),
    "dpmpp_2m": ("sample_dpmpp_2m", "karras", False),
    "dpm_fast": ("sample_dpm_fast", None, False),
    "dpmpp_sde": ("sample_dpmpp_sde", "karras", False),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", "exponential", False),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", "exponential", False),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", "exponential", True),
    "dpm_adaptive": ("sample_dpm_adaptive", None, False),
    "restart": ("restart_sampler", "karras", False),  # A1111's own (tests/a1111_reference.py)
    "lcm": ("sample_lcm", None, False),  # A1111's own, on its LCM denoiser
}
TIMESTEP_SAMPLERS = ("ddim", "ddim_cfgpp", "plms", "unipc")
ALL_SAMPLERS = (*K_DIFFUSION, *TIMESTEP_SAMPLERS)
# A1111's extra arguments: solver_type from the sampler's options; the SDE samplers' noise_sampler
# (create_noise_sampler: a BrownianTreeNoiseSampler over the whole schedule, seeded with the image
# seeds, on the sampling device: the CPU here).
SOLVER_TYPE = {"dpmpp_2m_sde_heun": "heun"}
BROWNIAN = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


@dataclass(frozen=True)
class Setup:
    prompt: str = "masterpiece, best quality, 1girl"
    negative: str = "lowres"
    seed: int = 114514
    cfg: float = 7.0
    size: int = 64

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, 4, self.size // 8, self.size // 8)


def init_image(size: int) -> Image.Image:
    """A smooth RGB test image (the img2img input)."""
    y, x = np.mgrid[0:size, 0:size] * (64 / size)
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8) % 255)


@contextmanager
def a1111_noise(generator: torch.Generator) -> Iterator[None]:
    """k-diffusion's torch.randn_like draws from the image's generator while it runs (TorchHijack)."""
    saved = kd.sampling.torch
    kd.sampling.torch = kd.A1111Noise([generator])
    try:
        yield
    finally:
        kd.sampling.torch = saved


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@dataclass(eq=False)
class Reference:
    """A model (diffusers pipeline and its scheduler_config.json as a dict) and the generation setup."""

    pipe: object
    raw_config: dict
    setup: Setup = field(default_factory=Setup)

    def __post_init__(self) -> None:
        self.cond = reference.clip_skip_embeddings(self.pipe, self.setup.prompt)
        self.uncond = reference.clip_skip_embeddings(self.pipe, self.setup.negative)
        self.alphas_cumprod = kd.ldm_alphas_cumprod(self.raw_config)

    # -- the models ------------------------------------------------------------------------------

    def denoiser(self, sampler: str):
        wrapped = kd._Wrapped(self.pipe.unet, self.alphas_cumprod)
        if sampler == "lcm":
            return a1111.LCMCompVisDenoiser(wrapped)
        return kd.external.CompVisDenoiser(wrapped, quantize=False)

    def uncond_cond_eps(self):
        """The UNet's (uncond, cond) noise predictions, batched uncond first."""

        def eps(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            context = torch.cat([self.uncond, self.cond])
            out = self.pipe.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=context).sample
            return out[:1], out[1:]

        return eps

    def guided_eps(self):
        both = self.uncond_cond_eps()

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            uncond, cond = both(x, t)
            return uncond + (cond - uncond) * self.setup.cfg

        return eps

    # -- schedules -------------------------------------------------------------------------------

    def sigmas(self, denoiser, sampler: str, schedule: str, steps: int) -> torch.Tensor:
        """KDiffusionSampler.get_sigmas with A1111's default options (the A1111 schedule types of
        tests/test_a1111_schedules.py where k-diffusion has no function)."""
        from test_a1111_schedules import REFERENCES

        _, automatic, discard = K_DIFFUSION[sampler]
        kind = automatic if schedule == "automatic" else schedule
        n = steps + 1 if discard else steps
        sigmas = REFERENCES[kind or "uniform"](n, denoiser)  # "uniform": the denoiser's get_sigmas
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    # -- running A1111's samplers ----------------------------------------------------------------

    def _k_run(self, sampler: str, x: torch.Tensor, sched: torch.Tensor, sigmas: torch.Tensor, denoiser, params):
        """KDiffusionSampler.sample / sample_img2img's call: `sched` the levels it runs, `sigmas`
        the whole schedule (the Brownian tree's span); DPM fast and adaptive get its ends. `params`:
        the keyword arguments A1111 adds (eta, s_churn, s_tmin, s_tmax, s_noise), eta 1 by default."""
        params = {"eta": 1.0, **params} if "eta" in inspect.signature(self._function(sampler)).parameters else params
        model = kd.cfg_model(denoiser, self.cond, self.uncond, self.setup.cfg)
        function = self._function(sampler)
        with torch.no_grad():
            if sampler == "dpm_fast":
                return function(model, x, sched[-2].item(), sched[0].item(), len(sched) - 1, disable=True, **params)
            if sampler == "dpm_adaptive":
                return function(model, x, sched[-2].item(), sched[0].item(), disable=True, **params)
            extra = {"solver_type": SOLVER_TYPE[sampler]} if sampler in SOLVER_TYPE else {}
            if sampler in BROWNIAN:
                low, high = sigmas[sigmas > 0].min(), sigmas.max()
                extra["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, low, high, seed=[self.setup.seed])
            return function(model, x, sched, disable=True, **extra, **params)

    @staticmethod
    def _function(sampler: str):
        name = K_DIFFUSION[sampler][0]
        return getattr(kd.sampling, name, None) or getattr(a1111, name)

    def _timestep_run(self, sampler: str, x: torch.Tensor, timesteps: torch.Tensor, generator, img2img: bool, eta=0.0):
        eps = self.guided_eps()
        noise = kd.A1111Noise([generator]).randn_like
        with torch.no_grad():
            if sampler == "ddim":
                return a1111.ddim(eps, x, timesteps, self.alphas_cumprod, eta=eta, randn_like=noise)
            if sampler == "ddim_cfgpp":
                model = a1111.CFGPPModel(self.uncond_cond_eps(), self.setup.cfg)
                return a1111.ddim_cfgpp(model, x, timesteps, self.alphas_cumprod, eta=eta, randn_like=noise)
            if sampler == "plms":
                return a1111.plms(eps, x, timesteps, self.alphas_cumprod)
            unipc = a1111.UniPC(eps, a1111.NoiseScheduleVP(self.alphas_cumprod))
            start = a1111.unipc_img2img_start(timesteps) if img2img else None
            return unipc.sample(x, steps=len(timesteps), t_start=start)

    def txt2img(self, sampler: str, schedule: str, steps: int, ensd: int = 0, **params: float) -> np.ndarray:
        """(1, H, W, 3) in [0, 1]: A1111's image. `ensd` re-seeds the later noise (ImageRNG.first);
        `params` are the sampler function's eta / s_churn / s_tmin / s_tmax / s_noise arguments."""
        generator = torch.Generator("cpu").manual_seed(self.setup.seed)
        noise = torch.randn(self.setup.shape, generator=generator)
        if ensd:
            generator = torch.Generator("cpu").manual_seed(self.setup.seed + ensd)
        if sampler in TIMESTEP_SAMPLERS:
            timesteps = a1111.get_timesteps(steps)
            return decode(self.pipe, self._timestep_run(sampler, noise, timesteps, generator, False, **params))
        denoiser = self.denoiser(sampler)
        # DPM fast / adaptive: A1111 passes the model's sigma range (and fast n = steps), whatever
        # the schedule type: Uniform's ends and length.
        sigmas = self.sigmas(
            denoiser, sampler, "uniform" if sampler in ("dpm_fast", "dpm_adaptive") else schedule, steps
        )
        with a1111_noise(generator):
            return decode(self.pipe, self._k_run(sampler, noise * sigmas[0], sigmas, sigmas, denoiser, params))

    def init_latents(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """(x0, noise, generator): the init image's latent sampled with the image's generator, then
        the noise."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        generator = torch.Generator("cpu").manual_seed(self.setup.seed)
        with torch.no_grad():
            dist = self.pipe.vae.encode(pixels).latent_dist
            draw = torch.randn(self.setup.shape, generator=generator)
            x0 = (dist.mean + dist.std * draw) * self.pipe.vae.config.scaling_factor
        return x0, torch.randn(self.setup.shape, generator=generator), generator

    def img2img(
        self, sampler: str, schedule: str, steps: int, strength: float, image: Image.Image, fix_steps: bool = False
    ) -> np.ndarray:
        """A1111's img2img: KDiffusionSampler.sample_img2img (sigmas[steps - t_enc - 1:] from
        x0 + noise * its first level) or CompVisSampler.sample_img2img (timesteps[:t_enc] from x0
        noised to timesteps[t_enc])."""
        x0, noise, generator = self.init_latents(image)
        if sampler in TIMESTEP_SAMPLERS:
            xi, timesteps = a1111.timesteps_img2img(x0, noise, steps, strength, self.alphas_cumprod, fix_steps)
            return decode(self.pipe, self._timestep_run(sampler, xi, timesteps, generator, True))
        total, t_enc = a1111.setup_img2img_steps(steps, strength, fix_steps)
        denoiser = self.denoiser(sampler)
        sigmas = self.sigmas(denoiser, sampler, schedule, total)
        sched = sigmas[total - t_enc - 1 :]
        with a1111_noise(generator):
            return decode(self.pipe, self._k_run(sampler, x0 + noise * sched[0], sched, sigmas, denoiser, {}))
