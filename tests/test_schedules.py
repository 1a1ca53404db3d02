"""Schedules against the diffusers schedulers, k-diffusion's formulas and A1111's DDIM grid.

schedule="model" is compared with the real diffusers scheduler built the way users switch
samplers: ``X.from_config(PNDMScheduler.from_config(json).config)`` (what
``pipe.scheduler = X.from_config(pipe.scheduler.config)`` does), then ``set_timesteps(steps)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.sampling.schedules import (
    DIFFUSERS_SAMPLERS as SAMPLERS,
)
from runtime.sampling.schedules import (
    SCHEDULES,
    final_latents,
    make_schedule,
    resolve_config,
    training_alphas_cumprod,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from diffusers_reference import scheduler_like_users_switch  # noqa: E402

STEPS = (1, 2, 4, 20, 28, 50)


def diffusers_reference(sampler: str, config: dict, steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(sigmas, timesteps, VE init_noise_sigma) of the diffusers scheduler after set_timesteps."""
    scheduler = scheduler_like_users_switch(sampler, config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.numpy()
    if sampler in ("euler_a", "euler"):
        return scheduler.sigmas.numpy(), timesteps.astype(np.float32), float(scheduler.init_noise_sigma)
    if sampler == "dpmpp_2m":
        sigmas = scheduler.sigmas.numpy()
    else:  # DDIM keeps alphas: its levels are the timesteps' plus where the last step lands.
        alphas_cumprod = scheduler.alphas_cumprod.numpy().astype(np.float64)
        final = timesteps[-1] - scheduler.config.num_train_timesteps // steps
        last_alpha = alphas_cumprod[final] if final >= 0 else scheduler.final_alpha_cumprod.item()
        levels = np.append(alphas_cumprod[timesteps], last_alpha)
        sigmas = np.sqrt((1 - levels) / levels)
    # VP schedulers start from unit noise: sqrt(sigma_0**2 + 1) in VE space.
    assert scheduler.init_noise_sigma == 1.0
    return sigmas, timesteps.astype(np.float32), math.sqrt(float(sigmas[0]) ** 2 + 1)


def assert_matches_diffusers(sampler: str, config: dict, steps: int) -> None:
    sigmas, timesteps, init = diffusers_reference(sampler, config, steps)
    schedule = make_schedule(config, sampler, "model", steps)
    assert schedule.sigmas.dtype == np.float32 and schedule.timesteps.dtype == np.float32
    assert schedule.timesteps.shape == timesteps.shape
    # Timesteps are bit-exact; sigmas agree to an ulp or two (torch's pow(0.5) is not np.sqrt).
    np.testing.assert_allclose(schedule.timesteps, timesteps, rtol=0, atol=1e-3)
    np.testing.assert_allclose(schedule.sigmas, sigmas, rtol=1e-6, atol=0)
    assert schedule.init_noise_sigma == pytest.approx(init, rel=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_schedule_matches_diffusers_on_the_shipped_config(sampler, steps, raw_config):
    assert_matches_diffusers(sampler, raw_config, steps)


VARIANTS = {
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
    "cosine_betas": {"beta_schedule": "squaredcos_cap_v2"},
    "karras": {"use_karras_sigmas": True},
    "karras_leading": {"use_karras_sigmas": True, "timestep_spacing": "leading"},
    "sigma_min_final": {"final_sigmas_type": "sigma_min"},
    "alpha_to_one": {"set_alpha_to_one": True},
    "dpm_clipped_lambda": {"lambda_min_clipped": -5.1},
}


@pytest.mark.parametrize("steps", (1, 4, 28, 61))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_schedule_matches_diffusers_on_other_configs(sampler, variant, steps, raw_config):
    """Each class reads only the keys it takes (e.g. Euler ancestral ignores use_karras_sigmas),
    as from_config does. 61 steps hits diffusers' "trailing" rounding quirk (an extra timestep -1)."""
    assert_matches_diffusers(sampler, {**raw_config, **VARIANTS[variant]}, steps)


def test_missing_keys_take_the_target_schedulers_defaults(raw_config):
    """The shipped PNDM file has no timestep_spacing: Euler/DPM use linspace, DDIM leading+offset."""
    assert make_schedule(raw_config, "euler_a", "model", 50).timesteps[0] == 999
    euler = make_schedule(raw_config, "euler", "model", 50)
    assert euler.init_noise_sigma == pytest.approx(14.6146, rel=1e-4)  # sigma_max, not sqrt(.. + 1)
    assert make_schedule(raw_config, "dpmpp_2m", "model", 50).timesteps[0] == 999
    assert make_schedule(raw_config, "ddim", "model", 50).timesteps[0] == 981  # 49 * 20 + steps_offset
    # PNDM's own default ("leading") only applies when a file says so.
    leading = make_schedule({**raw_config, "timestep_spacing": "leading"}, "euler_a", "model", 50)
    assert leading.timesteps[0] == 981
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(float(leading.sigmas[0]) ** 2 + 1), rel=1e-6)


def test_use_default_values_from_a_live_diffusers_config_count_as_missing(raw_config):
    """``dict(pipe.scheduler.config)`` lists PNDM's defaulted keys (timestep_spacing="leading") in
    ``_use_default_values``; from_config drops them, and so do we."""
    live = dict(PNDMScheduler.from_config(raw_config).config)
    assert live["timestep_spacing"] == "leading" and "timestep_spacing" in live["_use_default_values"]
    assert resolve_config(live, "euler_a")["timestep_spacing"] == "linspace"
    for sampler in SAMPLERS:
        a, b = make_schedule(live, sampler, "model", 20), make_schedule(raw_config, sampler, "model", 20)
        assert np.array_equal(a.sigmas, b.sigmas) and np.array_equal(a.timesteps, b.timesteps)
        assert_matches_diffusers(sampler, live, 20)


def ldm_sigma_table(raw: dict) -> np.ndarray:
    """CompVis LDM's table as A1111 holds it: float64 betas and cumprod, stored as float32."""
    betas = torch.linspace(raw["beta_start"] ** 0.5, raw["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas.numpy()), dtype=torch.float32)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m"])  # A1111's DDIM takes no schedule type
def test_karras_follows_the_paper(sampler, steps, raw_config):
    """Karras et al. (2022) eq. 5 with rho = 7 between the model's smallest and largest sigma, then
    0; timesteps interpolate log sigma between training levels."""
    table = ldm_sigma_table(raw_config)
    sigma_min, sigma_max, rho = float(table[0]), float(table[-1]), 7.0
    i = np.arange(steps)
    ramp = i / (steps - 1) if steps > 1 else np.zeros(1)
    expected = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    schedule = make_schedule(raw_config, sampler, "karras", steps)
    np.testing.assert_allclose(schedule.sigmas[:-1], expected, rtol=1e-6)
    assert schedule.sigmas[-1] == 0
    log_t = np.interp(np.log(expected), np.log(table.astype(np.float64)), np.arange(1000))
    np.testing.assert_allclose(schedule.timesteps, log_t, atol=1e-3)
    assert schedule.init_noise_sigma == pytest.approx(float(schedule.sigmas[0]))


def test_karras_is_diffusers_use_karras_sigmas_up_to_table_precision(raw_config):
    """diffusers' Euler karras option bounds the ramp by its float32 table; ours by LDM's float64 one."""
    scheduler = scheduler_like_users_switch("euler", raw_config, use_karras_sigmas=True)
    scheduler.set_timesteps(28)
    schedule = make_schedule(raw_config, "euler", "karras", 28)
    np.testing.assert_allclose(schedule.sigmas, scheduler.sigmas.numpy(), rtol=2e-5)
    np.testing.assert_allclose(schedule.timesteps, scheduler.timesteps.numpy(), atol=2e-2)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m"])
def test_a1111_kdiffusion_discretization(sampler, steps, raw_config):
    """k-diffusion ``CompVisDenoiser.get_sigmas(n)``: t = linspace(999, 0, n), log-linear t_to_sigma."""
    table = ldm_sigma_table(raw_config).astype(np.float64)
    t = np.linspace(999, 0, steps)
    expected = np.exp(np.interp(t, np.arange(1000), np.log(table)))
    schedule = make_schedule(raw_config, sampler, "a1111", steps)
    np.testing.assert_allclose(schedule.timesteps, t, atol=1e-4)
    np.testing.assert_allclose(schedule.sigmas[:-1], expected, rtol=1e-6)
    assert schedule.sigmas[-1] == 0
    assert schedule.init_noise_sigma == pytest.approx(float(schedule.sigmas[0]))


@pytest.mark.parametrize(("steps", "calls"), [(2, 1), (4, 3), (5, 4), (20, 19), (28, 28), (50, 49), (3, 3)])
def test_a1111_ddim_uses_a1111s_grid(steps, calls, raw_config):
    """clip(range(0, 1000, 1000 // steps) + 1, 0, 999), stepped from the top down to index 1:
    ``len - 1`` model calls, ending at timestep 1's level (decoded as-is)."""
    grid = np.clip(np.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    schedule = make_schedule(raw_config, "ddim", "a1111", steps)
    assert schedule.steps == calls == len(grid) - 1
    np.testing.assert_array_equal(schedule.timesteps, grid[:0:-1])
    table = ldm_sigma_table(raw_config)
    np.testing.assert_allclose(schedule.sigmas, table[grid[::-1]], rtol=1e-6)
    assert schedule.init_noise_sigma == pytest.approx(math.sqrt(float(schedule.sigmas[0]) ** 2 + 1))
    x = np.ones((1, 4, 2, 2), dtype=np.float32)
    np.testing.assert_allclose(final_latents(x, schedule), x / math.sqrt(float(table[1]) ** 2 + 1), rtol=1e-6)


def test_a1111_ddim_with_one_step_is_refused(raw_config):
    with pytest.raises(InvalidRequestError) as info:
        make_schedule(raw_config, "ddim", "a1111", 1)
    assert info.value.field == "steps"


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_schedule_shape_and_invariants(sampler, schedule_name, raw_config):
    schedule = make_schedule(raw_config, sampler, schedule_name, 12)
    assert schedule.sigmas.shape == (schedule.steps + 1,)
    assert np.all(np.diff(schedule.sigmas) < 0)
    assert not schedule.sigmas.flags.writeable and not schedule.timesteps.flags.writeable
    assert schedule.init_noise_sigma >= float(schedule.sigmas[0])


def test_ddim_trailing_records_where_each_step_lands(raw_config):
    """diffusers' DDIM steps to ``t - T // n`` whatever the spacing; with "trailing" that is not
    the next timestep, so the schedule says where each step really ends."""
    schedule = make_schedule({**raw_config, "timestep_spacing": "trailing"}, "ddim", "model", 28)
    assert schedule.sigmas_to is not None
    assert make_schedule(raw_config, "ddim", "model", 28).sigmas_to is None
    assert make_schedule(raw_config, "ddim", "model", 28).clip_denoised is None
    assert make_schedule({}, "ddim", "model", 28).clip_denoised == 1.0  # DDIM's default clip_sample=True


def test_euler_sigma_min_final_is_decoded_as_is(raw_config):
    schedule = make_schedule({**raw_config, "final_sigmas_type": "sigma_min"}, "euler", "model", 10)
    assert schedule.sigmas[-1] > 0 and not schedule.rescale_final
    x = np.full((1, 4, 2, 2), 2.0, dtype=np.float32)
    assert np.array_equal(final_latents(x, schedule), x)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampler": "dpm++"}, "sampler"),
        ({"sampler": "Euler a"}, "sampler"),
        ({"schedule": "vp"}, "schedule"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 1001}, "steps"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field, raw_config):
    request = {"sampler": "euler_a", "schedule": "model", "steps": 20, **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        make_schedule(raw_config, request["sampler"], request["schedule"], request["steps"])
    assert info.value.field == field
    if field == "sampler":
        assert all(name in info.value.message for name in SAMPLERS)
    if field == "schedule":
        assert all(name in info.value.message for name in SCHEDULES)


def test_ddim_steps_that_overrun_the_timesteps_are_refused(raw_config):
    with pytest.raises(InvalidRequestError) as info:
        make_schedule(raw_config, "ddim", "model", 1000)  # leading + steps_offset 1 reaches t = 1000
    assert info.value.field == "steps"


@pytest.mark.parametrize(
    "overrides",
    [
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"rescale_betas_zero_snr": True},
        {"beta_schedule": "sigmoid"},
    ],
)
def test_unsupported_models_are_refused(overrides, raw_config):
    with pytest.raises(InvalidRequestError) as info:
        make_schedule({**raw_config, **overrides}, "euler", "model", 20)
    assert info.value.field == "scheduler"


def test_discretization_options_only_matter_for_the_model_schedule(raw_config):
    config = {**raw_config, "interpolation_type": "log_linear", "use_exponential_sigmas": True}
    with pytest.raises(InvalidRequestError):
        make_schedule(config, "euler", "model", 20)
    make_schedule(config, "euler", "karras", 20)
    make_schedule(config, "euler", "a1111", 20)


def test_training_table_matches_diffusers_bit_for_bit(raw_config):
    scheduler = EulerDiscreteScheduler.from_config(raw_config)
    assert np.array_equal(training_alphas_cumprod(raw_config), scheduler.alphas_cumprod.numpy())
    linear = {**raw_config, "beta_schedule": "linear"}
    assert np.array_equal(
        training_alphas_cumprod(linear), EulerDiscreteScheduler.from_config(linear).alphas_cumprod.numpy()
    )
