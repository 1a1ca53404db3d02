"""The runtime's k-diffusion samplers against k-diffusion itself, driven as A1111 drives it.

Reference: the tiny model's diffusers UNet and VAE, k-diffusion's CompVisDenoiser over LDM's
``alphas_cumprod``, A1111's CFG on the denoised images, A1111's schedule for the sampler
(KDiffusionSampler.get_sigmas: "Automatic" per sampler, discard_next_to_last_sigma), the initial
noise ``torch.randn`` from the image's seeded CPU generator times ``sigmas[0]``, and the samplers'
later noise from the same generator (A1111's TorchHijack). Ours: `Pipeline` on the fp32 export.
Tolerance: 1/255 on pixels (the issue's bar at fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_a1111_schedules import REFERENCES as A1111_SCHEDULERS  # noqa: E402

import a1111_reference as a1111  # noqa: E402
import diffusers_reference as reference  # noqa: E402
import kdiffusion_reference as kd  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS, CFG, SIZE = "masterpiece, best quality, 1girl", "lowres", 114514, 5, 7.0, 64

# A1111 1.10 samplers_k_diffusion: function, "Automatic" schedule type, discard_next_to_last_sigma.
A1111 = {
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
}
# A1111's extra arguments: solver_type from the sampler's options; the SDE samplers' noise_sampler
# (create_noise_sampler: a BrownianTreeNoiseSampler over the whole schedule, seeded with the image
# seeds, on the sampling device: the CPU here).
SOLVER_TYPE = {"dpmpp_2m_sde_heun": "heun"}
BROWNIAN = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source):
    return reference.load(tiny_source["diffusers"])


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def a1111_sigmas(denoiser, sampler: str, schedule: str, steps: int) -> torch.Tensor:
    """KDiffusionSampler.get_sigmas with A1111's default options."""
    _, automatic, discard = A1111[sampler]
    kind = automatic if schedule == "automatic" else schedule
    n = steps + 1 if discard else steps
    low, high = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    sigmas = denoiser.get_sigmas(n) if kind is None else getattr(kd.sampling, f"get_sigmas_{kind}")(n, low, high)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def a1111_extra(sampler: str, x: torch.Tensor, sigmas: torch.Tensor) -> dict:
    """The keyword arguments A1111's KDiffusionSampler adds for `sampler` (eta_ancestral = 1)."""
    extra = {"solver_type": SOLVER_TYPE[sampler]} if sampler in SOLVER_TYPE else {}
    if sampler in BROWNIAN:
        low, high = sigmas[sigmas > 0].min(), sigmas.max()
        extra["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x, low, high, seed=[SEED])
        extra["eta"] = 1.0
    return extra


def sampler_function(sampler: str):
    name = A1111[sampler][0]
    return getattr(kd.sampling, name, None) or getattr(a1111, name)


def kdiffusion_image(
    pipe, raw_config, sampler: str, schedule: str, monkeypatch, steps: int = STEPS, ensd: int = 0
) -> np.ndarray:
    denoiser = kd.compvis_denoiser(pipe.unet, raw_config)
    cond = reference.clip_skip_embeddings(pipe, PROMPT)
    uncond = reference.clip_skip_embeddings(pipe, NEGATIVE)
    model = kd.cfg_model(denoiser, cond, uncond, CFG)
    generator = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
    if ensd:  # A1111's ImageRNG.first: the later noise from seed + ENSD, whatever the sampler
        generator = torch.Generator("cpu").manual_seed(SEED + ensd)
    monkeypatch.setattr(kd.sampling, "torch", kd.A1111Noise([generator]))
    sigmas = a1111_sigmas(denoiser, sampler, schedule, steps)
    function = sampler_function(sampler)
    x = noise * sigmas[0]
    with torch.no_grad():
        if sampler in ("dpm_fast", "dpm_adaptive"):  # A1111: the model's sigma range (fast: n = steps), eta 1
            low, high = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
            n = (steps,) if sampler == "dpm_fast" else ()
            latents = function(model, x, low, high, *n, disable=True, eta=1.0)
        else:
            latents = function(model, x, sigmas, disable=True, **a1111_extra(sampler, x, sigmas))
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ours(pipe: Pipeline, sampler: str, schedule: str, steps: int = STEPS, ensd: int = 0) -> np.ndarray:
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler=sampler, schedule=schedule,
        num_inference_steps=steps, guidance_scale=CFG, output_type="np", eta_noise_seed_delta=ensd,
    )  # fmt: skip
    return np.stack(out.images)


# DPM adaptive ignores the schedule type (its own steps between the model's sigma range) and makes
# many model calls (three per tried step): once is enough.
CASES = [
    (sampler, schedule)
    for sampler in sorted(A1111)
    for schedule in ("automatic", "karras", "exponential")
    if sampler != "dpm_adaptive" or schedule == "automatic"
]


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde clamps the rounded tree ends
@pytest.mark.parametrize(("sampler", "schedule"), CASES)
def test_sampler_equals_kdiffusion(diffusers_pipe, runtime_fp32, raw_config, monkeypatch, sampler, schedule):
    expected = kdiffusion_image(diffusers_pipe, raw_config, sampler, schedule, monkeypatch)
    got = ours(runtime_fp32, sampler, schedule)
    assert expected.std() > 0.02  # a real image, not a flat one
    assert np.abs(got - expected).max() * 255 <= 1.0


def test_restart_segments_and_ensd(diffusers_pipe, runtime_fp32, raw_config, monkeypatch):
    """From 20 steps Restart re-plans its levels and restarts once from near 0.1 back up to near 2,
    with noise from the generator A1111 re-seeds with seed + ENSD (which its infotext leaves out,
    as Restart is not a "uses_ensd" sampler)."""
    expected = kdiffusion_image(diffusers_pipe, raw_config, "restart", "automatic", monkeypatch, 20, ensd=31337)
    out = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler="Restart", schedule="automatic",
        num_inference_steps=20, guidance_scale=CFG, output_type="np", eta_noise_seed_delta=31337,
    )  # fmt: skip
    got = np.stack(out.images)
    assert np.abs(got - expected).max() * 255 <= 1.0
    assert "ENSD" not in out.infotexts[0] and "Schedule type: Karras" in out.infotexts[0]
    assert np.abs(got - ours(runtime_fp32, "restart", "automatic", 20)).max() * 255 > 1.0  # ENSD does matter


def a1111_unipc_image(pipe, raw_config, steps: int) -> np.ndarray:
    """sd_samplers_timesteps_impl.unipc: UniPC (bh1, order 3, lower_order_final, time_uniform) on
    CFG over the UNet's noise prediction, from unit noise, len(range(0, 1000, 1000 // steps)) steps."""
    both = uncond_cond_eps(pipe)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = both(x, t)
        return uncond + (cond - uncond) * CFG

    generator = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
    unipc = a1111.UniPC(eps_model, a1111.NoiseScheduleVP(kd.ldm_alphas_cumprod(raw_config)))
    with torch.no_grad():
        latents = unipc.sample(x, steps=len(range(0, 1000, 1000 // steps)))
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("steps", [3, 6])
def test_unipc_equals_a1111(diffusers_pipe, runtime_fp32, raw_config, steps):
    """UniPC ignores the schedule type (a timestep sampler in A1111): Karras gives the same image."""
    expected = a1111_unipc_image(diffusers_pipe, raw_config, steps)
    got = ours(runtime_fp32, "unipc", "karras", steps)
    assert expected.std() > 0.02
    assert np.abs(got - expected).max() * 255 <= 1.0


def uncond_cond_eps(pipe):
    """The UNet's (uncond, cond) noise predictions for PROMPT / NEGATIVE, batched uncond first."""
    cond = reference.clip_skip_embeddings(pipe, PROMPT)
    uncond = reference.clip_skip_embeddings(pipe, NEGATIVE)

    def eps(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = pipe.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        return out[:1], out[1:]

    return eps


@pytest.mark.parametrize("cfg", [1.0, CFG])
def test_ddim_cfgpp_equals_a1111(diffusers_pipe, runtime_fp32, raw_config, cfg):
    """A1111's DDIM timesteps, CFG / 12.5, the uncond prediction as the direction; at CFG 1 the
    uncond is still computed, as A1111 does for CFG++."""
    steps = 5
    timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    generator = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
    model = a1111.CFGPPModel(uncond_cond_eps(diffusers_pipe), cfg)
    with torch.no_grad():
        latents = a1111.ddim_cfgpp(model, x, timesteps, kd.ldm_alphas_cumprod(raw_config))
        image = diffusers_pipe.vae.decode(latents / diffusers_pipe.vae.config.scaling_factor).sample
    expected = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler="DDIM CFG++",
        schedule="automatic", num_inference_steps=steps, guidance_scale=cfg, output_type="np",
    ).images[0]  # fmt: skip
    assert expected.std() > 0.02
    assert np.abs(got - expected[0]).max() * 255 <= 1.0


def test_plms_equals_a1111(diffusers_pipe, runtime_fp32, raw_config):
    """Six steps: the improved-Euler start, then Adams-Bashforth of orders 2, 3 and 4 (twice)."""
    steps = 6
    timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    both = uncond_cond_eps(diffusers_pipe)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = both(x, t)
        return uncond + (cond - uncond) * CFG

    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.no_grad():
        latents = a1111.plms(model, x, timesteps, kd.ldm_alphas_cumprod(raw_config))
        image = diffusers_pipe.vae.decode(latents / diffusers_pipe.vae.config.scaling_factor).sample
    expected = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got = ours(runtime_fp32, "plms", "automatic", steps)
    assert expected.std() > 0.02
    assert np.abs(got - expected).max() * 255 <= 1.0


@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential", "sgm_uniform", "simple", "normal", "ddim"])
def test_lcm_equals_a1111(diffusers_pipe, runtime_fp32, raw_config, monkeypatch, schedule):
    """A1111's LCM: its denoiser over LCM's 50 levels ("Automatic" its own get_sigmas, the other
    types over its sigma range; SGM Uniform, Simple, Normal and DDIM through its table and its
    sigma_to_t / t_to_sigma, as A1111's schedulers take the inner model), CFG on its outputs, noise
    from the image generator. The tiny model is no LCM; the arithmetic is the same."""
    denoiser = a1111.LCMCompVisDenoiser(kd._Wrapped(diffusers_pipe.unet, kd.ldm_alphas_cumprod(raw_config)))
    cond = reference.clip_skip_embeddings(diffusers_pipe, PROMPT)
    model = kd.cfg_model(denoiser, cond, reference.clip_skip_embeddings(diffusers_pipe, NEGATIVE), CFG)
    low, high = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if schedule == "automatic":
        sigmas = denoiser.get_sigmas(STEPS)
    elif schedule in A1111_SCHEDULERS:
        sigmas = A1111_SCHEDULERS[schedule](STEPS, denoiser)
    else:
        sigmas = getattr(kd.sampling, f"get_sigmas_{schedule}")(STEPS, low, high)
    generator = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator) * sigmas[0]
    monkeypatch.setattr(kd.sampling, "torch", kd.A1111Noise([generator]))
    with torch.no_grad():
        latents = a1111.sample_lcm(model, x, sigmas)
        image = diffusers_pipe.vae.decode(latents / diffusers_pipe.vae.config.scaling_factor).sample
    expected = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got = ours(runtime_fp32, "lcm", schedule)
    assert expected.std() > 0.02
    assert np.abs(got - expected).max() * 255 <= 1.0


def test_unipc_img2img_needs_three_steps(runtime_fp32):
    """A1111's UniPC asserts steps >= order (3): img2img with t_enc = int(strength * steps) below 3
    is one clear error here, for the hires pass too (its t_enc is its steps - 1)."""
    with pytest.raises(InvalidRequestError) as error:
        runtime_fp32.prepare(
            prompt=PROMPT, sampler="unipc", schedule="automatic", image=init_image(), strength=0.3,
            num_inference_steps=8, step_rule="a1111",
        )  # fmt: skip
    assert error.value.field == "steps" and "UniPC" in error.value.message
    with pytest.raises(InvalidRequestError) as error:
        runtime_fp32.prepare(
            prompt=PROMPT, schedule="automatic", enable_hr=True, step_rule="a1111",
            hires_options={"hr_sampler_name": "UniPC", "hr_second_pass_steps": 3},
        )  # fmt: skip
    assert error.value.field == "steps"


def test_sampler_limits_are_one_clear_error(runtime_fp32):
    """PLMS (as every timestep sampler) on a one-timestep grid has no step to run."""
    with pytest.raises(InvalidRequestError) as error:
        runtime_fp32.prepare(prompt=PROMPT, schedule="automatic", sampler="plms", num_inference_steps=1)
    assert error.value.field == "steps"


def init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8) % 255)


def kdiffusion_img2img(pipe, raw_config, sampler: str, strength: float, monkeypatch, steps: int) -> np.ndarray:
    """A1111's sample_img2img: t_enc = int(min(strength, 0.999) * steps), the sampler runs
    sigmas[steps - t_enc - 1:] from x0 + noise * that first level. The init latent is drawn from
    the VAE's distribution with the image's generator before the noise, as the runtime (and
    diffusers) draw it."""
    denoiser = kd.compvis_denoiser(pipe.unet, raw_config)
    model = kd.cfg_model(
        denoiser, reference.clip_skip_embeddings(pipe, PROMPT), reference.clip_skip_embeddings(pipe, NEGATIVE), CFG
    )
    pixels = torch.from_numpy(np.asarray(init_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    generator = torch.Generator("cpu").manual_seed(SEED)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
        x0 = (dist.mean + dist.std * torch.randn(shape, generator=generator)) * pipe.vae.config.scaling_factor
        noise = torch.randn(shape, generator=generator)
        monkeypatch.setattr(kd.sampling, "torch", kd.A1111Noise([generator]))
        sigmas = a1111_sigmas(denoiser, sampler, "automatic", steps)
        t_enc = int(min(strength, 0.999) * steps)
        schedule = sigmas[steps - t_enc - 1 :]
        function = sampler_function(sampler)
        # The Brownian tree spans the whole schedule, not the slice (A1111's sample_img2img).
        latents = function(model, x0 + noise * schedule[0], schedule, disable=True, **a1111_extra(sampler, x0, sigmas))
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.75])
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "dpmpp_2m_sde"])
def test_img2img_a1111_rule_equals_kdiffusion(diffusers_pipe, runtime_fp32, raw_config, monkeypatch, sampler, strength):
    steps = 6
    expected = kdiffusion_img2img(diffusers_pipe, raw_config, sampler, strength, monkeypatch, steps)
    out = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler=sampler, schedule="automatic", num_inference_steps=steps,
        guidance_scale=CFG, output_type="np", image=init_image(), strength=strength, step_rule="a1111",
    )  # fmt: skip
    assert np.abs(out.images[0] - expected[0]).max() * 255 <= 1.0
    assert "Strength rule" not in out.infotexts[0]  # A1111's own rule: A1111's infotext


def test_img2img_step_rules(runtime_fp32):
    """A1111 runs t_enc + 1 levels (one noisier start than diffusers' int(steps * strength));
    img2img_fix_steps runs exactly `steps` over int(steps / strength) levels."""
    prepare = runtime_fp32.prepare
    common = {"prompt": PROMPT, "image": init_image(), "strength": 0.6, "num_inference_steps": 10, "sampler": "euler"}
    a1111 = prepare(**common, schedule="automatic", step_rule="a1111").schedule
    diffusers = prepare(**common, schedule="automatic").schedule
    fixed = prepare(**common, schedule="automatic", step_rule="a1111", img2img_fix_steps=True).schedule
    assert (a1111.steps, diffusers.steps, fixed.steps) == (7, 6, 10)
    assert a1111.sigmas[1] == diffusers.sigmas[0]
    assert prepare(**common, schedule="automatic").init.infotext["Strength rule"] == "diffusers"


def test_sde_batch_images_equal_single_runs(runtime_fp32):
    """A1111's per-image Brownian trees (create_noise_sampler with the batch's seeds): image i of a
    batch is the single image of seed + i, for either noise source."""
    common = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": 4, "schedule": "automatic"}
    for rng in ("cpu", "nv"):
        batch = runtime_fp32(
            **common, sampler="dpmpp_2m_sde", seed=SEED, num_images_per_prompt=2, rng=rng, output_type="np"
        ).images
        second = runtime_fp32(**common, sampler="dpmpp_2m_sde", seed=SEED + 1, rng=rng, output_type="np").images[0]
        assert np.abs(batch[1] - second).max() * 255 <= 1.0
        assert np.abs(batch[0] - batch[1]).max() * 255 > 10  # the trees differ per seed


def init_latents(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """(x0, noise, generator): the init image's latent sampled from the VAE's distribution with
    the image's generator, then the noise from it, as the runtime (and diffusers) draw them."""
    pixels = torch.from_numpy(np.asarray(init_image(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    generator = torch.Generator("cpu").manual_seed(SEED)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
        x0 = (dist.mean + dist.std * torch.randn(shape, generator=generator)) * pipe.vae.config.scaling_factor
    return x0, torch.randn(shape, generator=generator), generator


def timestep_img2img(pipe, raw_config, sampler: str, strength: float, steps: int, fix_steps: bool) -> np.ndarray:
    """A1111's CompVisSampler.sample_img2img (tests/a1111_reference.py): the init latent noised to
    timesteps[t_enc] with alphas_cumprod, then A1111's DDIM, DDIM CFG++, PLMS or UniPC (is_img2img)
    over timesteps[:t_enc], on CFG over the UNet's noise prediction."""
    x0, noise, generator = init_latents(pipe)
    alphas_cumprod = kd.ldm_alphas_cumprod(raw_config)
    xi, timesteps = a1111.timesteps_img2img(x0, noise, steps, strength, alphas_cumprod, fix_steps)
    both = uncond_cond_eps(pipe)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = both(x, t)
        return uncond + (cond - uncond) * CFG

    with torch.no_grad():
        if sampler == "ddim":
            latents = a1111.ddim(eps, xi, timesteps, alphas_cumprod, randn_like=kd.A1111Noise([generator]).randn_like)
        elif sampler == "ddim_cfgpp":
            latents = a1111.ddim_cfgpp(a1111.CFGPPModel(both, CFG), xi, timesteps, alphas_cumprod)
        elif sampler == "plms":
            latents = a1111.plms(eps, xi, timesteps, alphas_cumprod)
        else:
            unipc = a1111.UniPC(eps, a1111.NoiseScheduleVP(alphas_cumprod))
            latents = unipc.sample(xi, steps=len(timesteps), t_start=a1111.unipc_img2img_start(timesteps))
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# 8 steps: t_enc 2, 4, 6 (PLMS's t_enc 2 is one step, its look-ahead at the grid's end; UniPC needs 3).
TIMESTEP_CASES = [
    *[(sampler, strength, False) for sampler in ("ddim", "ddim_cfgpp", "plms") for strength in (0.3, 0.6, 0.75)],
    ("unipc", 0.6, False), ("unipc", 0.75, False), ("ddim", 0.6, True), ("unipc", 0.6, True),
]  # fmt: skip


@pytest.mark.parametrize(("sampler", "strength", "fix_steps"), TIMESTEP_CASES)
def test_timestep_img2img_a1111_rule_equals_a1111(
    diffusers_pipe, runtime_fp32, raw_config, sampler, strength, fix_steps
):
    steps = 8
    expected = timestep_img2img(diffusers_pipe, raw_config, sampler, strength, steps, fix_steps)
    out = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler=sampler, schedule="automatic", num_inference_steps=steps,
        guidance_scale=CFG, output_type="np", image=init_image(), strength=strength, step_rule="a1111",
        img2img_fix_steps=fix_steps,
    )  # fmt: skip
    assert np.abs(out.images[0] - expected[0]).max() * 255 <= 1.0
    assert "Strength rule" not in out.infotexts[0]


def test_timestep_samplers_keep_diffusers_rule_on_request(runtime_fp32):
    """The library's default rule for them is diffusers' get_timesteps on A1111's grid, and says so."""
    common = {"prompt": PROMPT, "image": init_image(), "strength": 0.6, "num_inference_steps": 8}
    for sampler in ("ddim", "unipc"):
        diffusers = runtime_fp32.prepare(**common, sampler=sampler, schedule="automatic")
        a1111_rule = runtime_fp32.prepare(**common, sampler=sampler, schedule="automatic", step_rule="a1111")
        assert diffusers.init.infotext["Strength rule"] == "diffusers"
        assert diffusers.schedule.init_sigma is None and a1111_rule.schedule.init_sigma is not None


def test_dpm_adaptive_inpaints_as_a1111(diffusers_pipe, runtime_fp32, raw_config, monkeypatch):
    """A1111's CFGDenoiser blends the init latent into every denoised prediction outside the mask
    (init_latent * mask + nmask * denoised) and its img2img sample() the result once more; DPM
    adaptive runs between sigma_sched[-2] and sigma_sched[0] of A1111's img2img slice. Our output
    is pasted over the original through the (unblurred) mask: the reference gets that composite.
    Its step-size controller feeds each error back into the next step: at 6 steps and strength 0.6
    a 1e-6 change of the init latent moves k-diffusion's own image by 0.7/255; at 0.75 by 0.01/255,
    so this case compares the arithmetic, not the chaos."""
    from runtime.images.img2img import apply_overlay

    steps, strength = 6, 0.75
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 16:48] = 255
    latent_mask = torch.from_numpy(np.around(np.asarray(Image.fromarray(mask).resize((SIZE // 8, SIZE // 8))) / 255))
    nmask, keep = latent_mask.float(), 1 - latent_mask.float()
    x0, noise, generator = init_latents(diffusers_pipe)
    denoiser = kd.compvis_denoiser(diffusers_pipe.unet, raw_config)
    cond = reference.clip_skip_embeddings(diffusers_pipe, PROMPT)
    guided = kd.cfg_model(denoiser, cond, reference.clip_skip_embeddings(diffusers_pipe, NEGATIVE), CFG)

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        return x0 * keep + nmask * guided(x, sigma)

    torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # the runtime's masked-image draw
    monkeypatch.setattr(kd.sampling, "torch", kd.A1111Noise([generator]))
    sigmas = a1111_sigmas(denoiser, "dpm_adaptive", "automatic", steps)
    schedule = sigmas[steps - int(strength * steps) - 1 :]
    with torch.no_grad():
        latents = kd.sampling.sample_dpm_adaptive(
            model, x0 + noise * schedule[0], schedule[-2].item(), schedule[0].item(), disable=True, eta=1.0
        )
        latents = latents * nmask + x0 * keep
        image = diffusers_pipe.vae.decode(latents / diffusers_pipe.vae.config.scaling_factor).sample
    decoded = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0]
    got = runtime_fp32.prepare(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler="dpm_adaptive", schedule="automatic",
        num_inference_steps=steps, guidance_scale=CFG, image=init_image(), strength=strength, step_rule="a1111",
        mask_image=Image.fromarray(mask), mask_blur=0,
    )  # fmt: skip
    out = runtime_fp32.run(got, output_type="np")
    expected = apply_overlay(decoded, got.init.overlay)
    assert np.abs(out.images[0] - expected).max() * 255 <= 1.0
    assert np.abs(out.images[0] - decoded).max() * 255 > 1.0  # the overlay did paste the original back
