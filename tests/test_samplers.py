"""The numpy samplers against the diffusers scheduler loops (and A1111's DDIM loop).

A synthetic noise predictor stands in for the UNet: ``eps = tanh(0.5 * M @ z + t / 1000) + 0.5 * z``
with a fixed 4x4 channel-mixing matrix M, evaluated on the scaled model input ``z`` exactly as a
pipeline would. It is nonlinear, mixes channels and depends on the timestep, so a wrong sigma,
timestep, input scaling or update formula shows up in the result; the ``0.5 * z`` term keeps the
final latents at realistic magnitudes (std ~1, max ~6). Both sides call the same numpy function, so
any difference comes from the schedulers' arithmetic alone.

Tolerance: the final latents (after `final_latents`) must agree to max |diff| <= 1e-4 on a batch of
two (2, 4, 8, 8) latents; measured differences are 1e-7 .. 1e-5 (float32 rounding only).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers_reference import scheduler_like_users_switch  # noqa: E402
from runtime.sampling.samplers import (  # noqa: E402
    SAMPLER_FUNCTIONS,
    ancestral_step,
    noise_draws,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from runtime.sampling.schedules import Schedule, final_latents, make_schedule, training_alphas_cumprod  # noqa: E402

SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-4

MIX = np.array(
    [[0.9, -0.3, 0.2, 0.1], [0.25, 0.8, -0.2, 0.15], [-0.1, 0.3, 0.7, -0.25], [0.2, -0.15, 0.3, 0.85]],
    dtype=np.float32,
)


def synthetic_eps(z: np.ndarray, t: float) -> np.ndarray:
    z = z.astype(np.float32)
    mixed = np.einsum("oc,bchw->bohw", MIX, z)
    eps = np.tanh(np.float32(0.5) * mixed + np.float32(t / 1000.0)) + np.float32(0.5) * z
    return eps.astype(np.float32)


def initial_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def run_diffusers(scheduler, steps: int, noise: np.ndarray, seed: int, monkeypatch) -> tuple[np.ndarray, int]:
    """The StableDiffusionPipeline denoising loop with the synthetic model; returns the final latents
    and how many noise tensors the scheduler drew."""
    module = sys.modules[type(scheduler).__module__]
    draws = []
    original = module.randn_tensor

    def counting_randn(*args, **kwargs):
        draws.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "randn_tensor", counting_randn)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = torch.from_numpy(synthetic_eps(model_input.numpy(), float(t)))
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents.numpy(), len(draws)


def make_denoiser(schedule: Schedule):
    """What the pipeline does: UNet input x / sqrt(sigma**2 + 1) at timesteps[i], x - sigma * eps."""

    def denoise(x: np.ndarray, i: int) -> np.ndarray:
        sigma = np.float32(schedule.sigmas[i])
        model_input = x / np.float32(math.sqrt(float(sigma) ** 2 + 1.0))
        return x - sigma * synthetic_eps(model_input, float(schedule.timesteps[i]))

    return denoise


class TorchNoise:
    """The per-step noise diffusers draws, reproduced by a twin generator and handed out in order."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0

    def __call__(self) -> np.ndarray:
        self.count += 1
        return torch.randn(SHAPE, generator=self.generator, dtype=torch.float32).numpy()


def run_ours(sampler: str, schedule: Schedule, noise: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    source = TorchNoise(seed)
    x = noise * np.float32(schedule.init_noise_sigma)
    out = sample(sampler, make_denoiser(schedule), x, schedule, source)
    assert out.dtype == np.float32
    return final_latents(out, schedule), source.count


@pytest.mark.parametrize("steps", [28, 5])
@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m", "ddim"])
def test_matches_diffusers_on_the_shipped_config(sampler, steps, raw_config, monkeypatch):
    noise = initial_noise()
    scheduler = scheduler_like_users_switch(sampler, raw_config)
    expected, diffusers_draws = run_diffusers(scheduler, steps, noise, 7, monkeypatch)
    schedule = make_schedule(raw_config, sampler, "model", steps)
    got, our_draws = run_ours(sampler, schedule, noise, 7)
    assert our_draws == diffusers_draws == noise_draws(sampler, schedule)
    assert np.max(np.abs(got - expected)) <= TOLERANCE


@pytest.mark.parametrize(
    ("sampler", "overrides", "steps"),
    [
        ("euler_a", {"timestep_spacing": "leading"}, 28),
        ("euler_a", {"timestep_spacing": "trailing"}, 5),
        ("euler", {"timestep_spacing": "leading"}, 5),
        ("euler", {"use_karras_sigmas": True}, 28),
        ("euler", {"final_sigmas_type": "sigma_min"}, 5),
        ("dpmpp_2m", {"timestep_spacing": "trailing"}, 28),
        ("dpmpp_2m", {"use_karras_sigmas": True}, 28),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 5),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 28),
        ("ddim", {"timestep_spacing": "trailing"}, 28),
        ("ddim", {"timestep_spacing": "linspace"}, 5),
        ("ddim", {"set_alpha_to_one": True}, 5),
        ("ddim", {"clip_sample": True, "clip_sample_range": 1.5}, 5),
    ],
)
def test_matches_diffusers_on_other_configs(sampler, overrides, steps, raw_config, monkeypatch):
    """Spacing, karras, sigma_min finals, DDIM's uneven "trailing"/"linspace" jumps and clipping."""
    noise = initial_noise(1)
    scheduler = scheduler_like_users_switch(sampler, raw_config, **overrides)
    expected, diffusers_draws = run_diffusers(scheduler, steps, noise, 3, monkeypatch)
    schedule = make_schedule({**raw_config, **overrides}, sampler, "model", steps)
    got, our_draws = run_ours(sampler, schedule, noise, 3)
    assert our_draws == diffusers_draws
    assert np.max(np.abs(got - expected)) <= TOLERANCE


def a1111_ddim_reference(raw: dict, steps: int, noise: np.ndarray) -> np.ndarray:
    """A1111's ``sd_samplers_timesteps_impl.ddim`` (eta 0) on the LDM float64 noise table, in VP
    space with torch, written from its source: ``len(timesteps) - 1`` steps from index
    ``len - 1`` down to 1, each going to the previous timestep's alpha."""
    betas = torch.linspace(raw["beta_start"] ** 0.5, raw["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas.numpy()), dtype=torch.float32)
    timesteps = torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    x = torch.from_numpy(noise)
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t = timesteps[index].item()
        e_t = torch.from_numpy(synthetic_eps(x.numpy(), t))
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * e_t
    return x.numpy()


@pytest.mark.parametrize("steps", [28, 5])
def test_a1111_ddim_matches_a1111_loop(steps, raw_config):
    noise = initial_noise(2)
    schedule = make_schedule(raw_config, "ddim", "a1111", steps)
    got, _ = run_ours("ddim", schedule, noise, 0)
    assert np.max(np.abs(got - a1111_ddim_reference(raw_config, steps, noise))) <= TOLERANCE


def kdiffusion_reference(
    sampler: str, sigmas: np.ndarray, timesteps: np.ndarray, noise: np.ndarray, seed: int
) -> np.ndarray:
    """k-diffusion's ``sample_euler_ancestral`` / ``sample_euler`` / ``sample_dpmpp_2m`` written out in
    float64 (``CompVisDenoiser``: input scaled by 1 / sqrt(sigma**2 + 1), denoised = x - sigma * eps)."""
    generator = torch.Generator().manual_seed(seed)
    x = noise.astype(np.float64) * float(sigmas[0])
    s = sigmas.astype(np.float64)
    old = None
    for i in range(len(s) - 1):
        z = (x / math.sqrt(s[i] ** 2 + 1)).astype(np.float32)
        denoised = x - s[i] * synthetic_eps(z, float(timesteps[i]))
        if sampler == "euler_a":
            up = math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
            down = math.sqrt(s[i + 1] ** 2 - up**2)
            x = x + (x - denoised) / s[i] * (down - s[i])
            x = x + torch.randn(SHAPE, generator=generator).numpy() * up
        elif sampler == "euler":
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        else:
            if s[i + 1] == 0:
                x = denoised
            else:
                h = math.log(s[i] / s[i + 1])
                d = denoised
                if old is not None:
                    r = math.log(s[i - 1] / s[i]) / h
                    d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
                x = s[i + 1] / s[i] * x - math.expm1(-h) * d
            old = denoised
    return x


@pytest.mark.parametrize("schedule_name", ["karras", "a1111"])
@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m"])
def test_kdiffusion_schedules_match_kdiffusion_loops(sampler, schedule_name, raw_config):
    schedule = make_schedule(raw_config, sampler, schedule_name, 20)
    noise = initial_noise(4)
    got, _ = run_ours(sampler, schedule, noise, 11)
    expected = kdiffusion_reference(sampler, schedule.sigmas, schedule.timesteps, noise, 11)
    assert np.max(np.abs(got - expected)) <= TOLERANCE


def test_karras_euler_close_to_diffusers_use_karras_sigmas(raw_config, monkeypatch):
    """Our "karras" uses the LDM-precision table (A1111's), diffusers a float32 one: ~1e-5 apart."""
    noise = initial_noise(5)
    scheduler = scheduler_like_users_switch("euler", raw_config, use_karras_sigmas=True)
    expected, _ = run_diffusers(scheduler, 20, noise, 0, monkeypatch)
    got, _ = run_ours("euler", make_schedule(raw_config, "euler", "karras", 20), noise, 0)
    assert np.max(np.abs(got - expected)) <= 1e-3


def test_euler_ancestral_draws_noise_on_every_step_including_the_last(raw_config):
    schedule = make_schedule(raw_config, "euler_a", "karras", 4)
    assert schedule.sigmas[-1] == 0
    source = TorchNoise(0)
    sample("euler_a", make_denoiser(schedule), initial_noise() * schedule.init_noise_sigma, schedule, source)
    assert source.count == 4


def test_ancestral_step_matches_diffusers_float32_formula():
    down, up = ancestral_step(np.float32(2.5), np.float32(1.25))
    s_from, s_to = torch.tensor(2.5), torch.tensor(1.25)
    ref_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    ref_down = (s_to**2 - ref_up**2) ** 0.5
    assert up.dtype == np.float32 and down.dtype == np.float32
    assert abs(float(up) - ref_up.item()) <= 1e-6 and abs(float(down) - ref_down.item()) <= 1e-6
    assert ancestral_step(1.0, 0.0) == (0.0, 0.0)


def test_callbacks_see_every_step_and_can_stop_the_run(raw_config):
    schedule = make_schedule(raw_config, "dpmpp_2m", "model", 6)
    seen = []

    class Stop(Exception):
        pass

    def callback(i: int, x: np.ndarray) -> None:
        seen.append(i)
        assert x.dtype == np.float32 and x.shape == SHAPE
        if i == 3:
            raise Stop

    with pytest.raises(Stop):
        sample_dpmpp_2m(make_denoiser(schedule), initial_noise(), schedule.sigmas, callback=callback)
    assert seen == [0, 1, 2, 3]


def test_ddim_on_a_ve_schedule_is_the_euler_step(raw_config):
    """In VE space, DDIM (eta 0) and Euler are the same update."""
    schedule = make_schedule(raw_config, "euler", "karras", 8)
    x = initial_noise() * np.float32(schedule.init_noise_sigma)
    denoise = make_denoiser(schedule)
    np.testing.assert_allclose(
        sample_ddim(denoise, x, schedule.sigmas), sample_euler(denoise, x, schedule.sigmas), atol=1e-5
    )


def test_deterministic_samplers_never_draw_noise(raw_config):
    for name in ("euler", "dpmpp_2m", "ddim"):
        schedule = make_schedule(raw_config, name, "model", 3)

        def no_noise() -> np.ndarray:
            raise AssertionError("drew noise")

        sample(name, make_denoiser(schedule), initial_noise(), schedule, no_noise)
        assert noise_draws(name, schedule) == 0


def test_sampler_functions_cover_every_sampler():
    """Every sampler has a loop: step-indexed (diffusers' schedules, A1111's timestep samplers) or
    k-diffusion's (A1111's schedule types); Euler a, Euler and DPM++ 2M have both."""
    from runtime.sampling.ksamplers import K_SAMPLERS
    from runtime.sampling.schedules import DIFFUSERS_SAMPLERS, SAMPLERS

    assert set(DIFFUSERS_SAMPLERS) <= set(SAMPLER_FUNCTIONS)
    assert set(SAMPLER_FUNCTIONS) | set(K_SAMPLERS) == set(SAMPLERS)


def test_final_latents_undoes_the_ve_scaling_of_a_noisy_end(raw_config):
    schedule = make_schedule(raw_config, "ddim", "model", 10)  # set_alpha_to_one=False: ends above 0
    level = float(schedule.sigmas[-1])
    alphas_cumprod = training_alphas_cumprod(raw_config)
    assert level == pytest.approx(math.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]), rel=1e-6)
    x = np.ones(SHAPE, dtype=np.float32)
    np.testing.assert_allclose(final_latents(x, schedule), x / math.sqrt(level**2 + 1), rtol=1e-7)
    zero_end = make_schedule(raw_config, "euler", "model", 10)
    assert np.array_equal(final_latents(x, zero_end), x)
