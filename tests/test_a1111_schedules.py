"""A1111's schedule types (modules/sd_schedulers.py, web UI 1.10) against A1111's own formulas.

Where k-diffusion has the function (Uniform = ``CompVisDenoiser.get_sigmas``, Karras, Exponential,
Polyexponential) the reference is the k-diffusion package itself; the others are A1111's
functions written out below in torch / numpy / scipy, as sd_schedulers.py has them. Tolerance:
1e-6 relative (a few float32 ulps: A1111 computes in float32 torch, we in float64 then round).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")

import kdiffusion_reference as kd  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402
from runtime.sampling import a1111_schedules  # noqa: E402
from runtime.sampling.schedules import make_schedule  # noqa: E402

STEPS = (1, 4, 11, 20, 28)


@pytest.fixture(scope="module")
def inner(raw_config):
    return kd.compvis_denoiser(None, raw_config)


# -- A1111's functions (sd_schedulers.py), written out -----------------------------------------


def sgm_uniform(n, inner):  # sd_schedulers.sgm_uniform
    start, end = (
        inner.sigma_to_t(torch.tensor(inner.sigmas[-1].item())),
        inner.sigma_to_t(torch.tensor(inner.sigmas[0].item())),
    )
    return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0])


def normal(n, inner):  # sd_schedulers.normal_scheduler, sgm=False
    start, end = (
        inner.sigma_to_t(torch.tensor(inner.sigmas[-1].item())),
        inner.sigma_to_t(torch.tensor(inner.sigmas[0].item())),
    )
    return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n)] + [0.0])


def simple(n, inner):  # sd_schedulers.simple_scheduler
    ss = len(inner.sigmas) / n
    return torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])


def ddim(n, inner):  # sd_schedulers.ddim_scheduler
    sigs, ss, x = [], max(len(inner.sigmas) // n, 1), 1
    while x < len(inner.sigmas):
        sigs.append(float(inner.sigmas[x]))
        x += ss
    return torch.FloatTensor([*sigs[::-1], 0.0])


def kl_optimal(n, inner):  # sd_schedulers.kl_optimal
    alpha_min = torch.arctan(torch.tensor(inner.sigmas[0].item()))
    alpha_max = torch.arctan(torch.tensor(inner.sigmas[-1].item()))
    step_indices = torch.arange(n + 1)
    return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)


def align_your_steps(n, inner):  # sd_schedulers.get_align_your_steps_sigmas, SD 1.5 table
    sigmas = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    if n != len(sigmas):
        xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
        sigmas = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
    else:
        sigmas = [*sigmas, 0.0]
    return torch.FloatTensor(sigmas)


def beta(n, inner, alpha=0.6, beta_=0.6):  # sd_schedulers.beta_scheduler, A1111's default options
    sigma_min, sigma_max = inner.sigmas[0].item(), inner.sigmas[-1].item()
    timesteps = [stats.beta.ppf(x, alpha, beta_) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in timesteps] + [0.0])


def kdiffusion(name):
    def build(n, inner):
        if name == "uniform":
            return inner.get_sigmas(n)
        low, high = inner.sigmas[0].item(), inner.sigmas[-1].item()
        return getattr(kd.sampling, f"get_sigmas_{name}")(n, low, high)

    return build


REFERENCES = {
    "uniform": kdiffusion("uniform"), "karras": kdiffusion("karras"), "exponential": kdiffusion("exponential"),
    "polyexponential": kdiffusion("polyexponential"), "sgm_uniform": sgm_uniform, "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps, "simple": simple, "normal": normal, "ddim": ddim, "beta": beta,
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(REFERENCES))
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_types_match_a1111(kind, steps, raw_config, inner):
    if kind in ("sgm_uniform", "normal", "kl_optimal", "align_your_steps") and steps == 1:
        pytest.skip("one level only: nothing between the ends to compare")
    expected = REFERENCES[kind](steps, inner).numpy()
    got = make_schedule(raw_config, "euler", kind, steps)
    np.testing.assert_allclose(got.sigmas, expected, rtol=1e-6, atol=1e-7)
    assert got.init_noise_sigma == pytest.approx(float(expected[0]), rel=1e-6)
    # The UNet timestep of each level: k-diffusion's sigma_to_t.
    t = kd.external.CompVisDenoiser.sigma_to_t(inner, torch.from_numpy(got.sigmas[:-1].copy()))
    np.testing.assert_allclose(got.timesteps, t.numpy(), atol=2e-3)


@pytest.mark.parametrize(
    ("sampler", "kind"),
    [("euler_a", "uniform"), ("euler", "uniform"), ("lms", "uniform"), ("heun", "uniform"),
     ("dpmpp_2m", "karras"), ("dpmpp_2s_a", "karras"), ("dpm2", "karras"), ("dpm2_a", "karras")],
)  # fmt: skip
def test_automatic_is_a1111s_per_sampler_choice(sampler, kind, raw_config, inner):
    """A1111 1.10's samplers_k_diffusion `scheduler` option; DPM2 and DPM2 a also take one step more
    and drop the next-to-last level (discard_next_to_last_sigma)."""
    steps = 8
    got = make_schedule(raw_config, sampler, "automatic", steps).sigmas
    expected = REFERENCES[kind](steps + 1, inner) if sampler.startswith("dpm2") else REFERENCES[kind](steps, inner)
    if sampler.startswith("dpm2"):
        expected = torch.cat([expected[:-2], expected[-1:]])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-7)
    assert len(got) == steps + 1


def test_beta_quantile_matches_scipy():
    for q in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999999):
        for a, b in ((0.6, 0.6), (2.0, 5.0), (0.5, 3.0)):
            assert a1111_schedules.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-12)


def test_kl_optimal_ends_at_sigma_min_and_is_decoded_as_is(raw_config, inner):
    schedule = make_schedule(raw_config, "euler", "kl_optimal", 6)
    assert schedule.sigmas[-1] == pytest.approx(inner.sigmas[0].item(), rel=1e-6)
    assert not schedule.rescale_final and math.isfinite(schedule.sigmas[-1])


def test_model_schedule_only_for_diffusers_samplers(raw_config):
    with pytest.raises(InvalidRequestError) as error:
        make_schedule(raw_config, "heun", "model", 6)
    assert error.value.field == "schedule" and "karras" in error.value.message
