"""The runtime's samplers against A1111's: k-diffusion's own sampling code and A1111's samplers,
driven as A1111 1.10 drives them (tests/sampler_references.py), txt2img and img2img.

Ours: `Pipeline` on the fp32 export of the tiny model. Tolerance: 1/255 on pixels (the issue's bar
at fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sampler_references import K_DIFFUSION, Reference, Setup, a1111_noise, decode  # noqa: E402
from sampler_references import init_image as make_init_image  # noqa: E402

import diffusers_reference as reference  # noqa: E402
import kdiffusion_reference as kd  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402

SETUP = Setup()
PROMPT, NEGATIVE, SEED, CFG, SIZE = SETUP.prompt, SETUP.negative, SETUP.seed, SETUP.cfg, SETUP.size
STEPS = 5


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source):
    return reference.load(tiny_source["diffusers"])


@pytest.fixture(scope="module")
def a1111(diffusers_pipe, raw_config) -> Reference:
    return Reference(diffusers_pipe, raw_config, SETUP)


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def init_image() -> Image.Image:
    return make_init_image(SIZE)


def ours(
    pipe: Pipeline, sampler: str, schedule: str, steps: int = STEPS, ensd: int = 0, cfg: float = CFG
) -> np.ndarray:
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler=sampler, schedule=schedule,
        num_inference_steps=steps, guidance_scale=cfg, output_type="np", eta_noise_seed_delta=ensd,
    )  # fmt: skip
    return np.stack(out.images)


def ours_img2img(pipe: Pipeline, sampler: str, schedule: str, steps: int, strength: float, **kwargs):
    return pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler=sampler, schedule=schedule, num_inference_steps=steps,
        guidance_scale=CFG, output_type="np", image=init_image(), strength=strength, step_rule="a1111", **kwargs,
    )  # fmt: skip


# DPM adaptive ignores the schedule type (its own steps between the model's sigma range) and makes
# many model calls (three per tried step): once is enough. LCM has its own test.
CASES = [
    (sampler, schedule)
    for sampler in sorted(set(K_DIFFUSION) - {"lcm"})
    for schedule in ("automatic", "karras", "exponential")
    if sampler != "dpm_adaptive" or schedule == "automatic"
]


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde clamps the rounded tree ends
@pytest.mark.parametrize(("sampler", "schedule"), CASES)
def test_sampler_equals_kdiffusion(a1111, runtime_fp32, sampler, schedule):
    expected = a1111.txt2img(sampler, schedule, STEPS)
    got = ours(runtime_fp32, sampler, schedule)
    assert expected.std() > 0.02  # a real image, not a flat one
    assert np.abs(got - expected).max() * 255 <= 1.0


def test_restart_segments_and_ensd(a1111, runtime_fp32):
    """From 20 steps Restart re-plans its levels and restarts once from near 0.1 back up to near 2,
    with noise from the generator A1111 re-seeds with seed + ENSD (which its infotext leaves out,
    as Restart is not a "uses_ensd" sampler)."""
    expected = a1111.txt2img("restart", "automatic", 20, ensd=31337)
    out = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler="Restart", schedule="automatic",
        num_inference_steps=20, guidance_scale=CFG, output_type="np", eta_noise_seed_delta=31337,
    )  # fmt: skip
    got = np.stack(out.images)
    assert np.abs(got - expected).max() * 255 <= 1.0
    assert "ENSD" not in out.infotexts[0] and "Schedule type: Karras" in out.infotexts[0]
    assert np.abs(got - ours(runtime_fp32, "restart", "automatic", 20)).max() * 255 > 1.0  # ENSD does matter


@pytest.mark.parametrize(
    ("sampler", "steps"), [("ddim", 5), ("unipc", 3), ("unipc", 6), ("ddim_cfgpp", 5), ("plms", 2), ("plms", 6)]
)
def test_timestep_sampler_equals_a1111(a1111, runtime_fp32, sampler, steps):
    """A1111's timestep samplers ignore the schedule type (Karras gives the same image). UniPC: bh1,
    order 3, lower_order_final, time_uniform, len(range(0, 1000, 1000 // steps)) steps. PLMS: the
    improved-Euler start (at 2 steps a single step looking ahead at the grid's last timestep), then
    Adams-Bashforth of orders 2, 3 and 4."""
    expected = a1111.txt2img(sampler, "automatic", steps)
    got = ours(runtime_fp32, sampler, "karras", steps)
    assert expected.std() > 0.02
    assert np.abs(got - expected).max() * 255 <= 1.0


def test_ddim_cfgpp_at_cfg_1_equals_a1111(diffusers_pipe, raw_config, runtime_fp32):
    """CFG / 12.5 along the uncond prediction; at CFG 1 the uncond is still computed, as A1111 does."""
    expected = Reference(diffusers_pipe, raw_config, Setup(cfg=1.0)).txt2img("ddim_cfgpp", "automatic", 5)
    got = ours(runtime_fp32, "DDIM CFG++", "automatic", 5, cfg=1.0)
    assert np.abs(got - expected).max() * 255 <= 1.0


CHURN = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 0.9}
PARAM_CASES = [
    ("euler", CHURN), ("heun", CHURN), ("dpm2", CHURN), ("euler", {"s_churn": 2.0}),
    ("euler_a", {"eta": 0.5}), ("dpm2_a", {"eta": 0.5, "s_noise": 0.9}), ("dpmpp_2s_a", {"eta": 0.7, "s_noise": 1.1}),
    ("dpm_fast", {"eta": 0.5, "s_noise": 0.9}), ("dpm_fast", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.9}), ("dpmpp_2m_sde_heun", {"eta": 0.0}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.9}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}),
    ("ddim_cfgpp", {"eta": 0.5}),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize(("sampler", "params"), PARAM_CASES, ids=[f"{a}-{b}" for a, b in PARAM_CASES])
def test_sampler_parameters_equal_a1111(a1111, runtime_fp32, sampler, params):
    """eta, s_churn, s_tmin, s_tmax and s_noise as A1111 passes them to k-diffusion's functions and
    its DDIM / DDIM CFG++ (their noise from the image generators, drawn on every step); the
    infotext names each value that differs from the default."""
    steps = 6 if sampler in ("ddim", "ddim_cfgpp") else STEPS
    expected = a1111.txt2img(sampler, "automatic", steps, **params)
    out = runtime_fp32(
        PROMPT, negative_prompt=NEGATIVE, seed=SEED, width=SIZE, height=SIZE, sampler=sampler, schedule="automatic",
        num_inference_steps=steps, guidance_scale=CFG, output_type="np", **params,
    )  # fmt: skip
    assert np.abs(np.stack(out.images) - expected).max() * 255 <= 1.0
    default = ours(runtime_fp32, sampler, "automatic", steps)
    assert np.abs(np.stack(out.images) - default).max() * 255 > 1.0  # the parameters did change the image
    label = "Eta DDIM" if sampler.startswith("ddim") else "Eta"
    assert ("eta" in params) == (f"{label}: {params.get('eta')}" in out.infotexts[0])


def test_sampler_parameters_are_checked(runtime_fp32):
    """One clear error each: a negative value, DDIM's eta above 1 (A1111 would give NaN), and a
    non-default value on diffusers' own schedulers, which do not take them here."""
    for options, field in (
        ({"s_noise": -1.0}, "s_noise"), ({"eta": float("nan")}, "eta"), ({"sampler": "ddim", "eta": 1.5}, "eta"),
        ({"sampler": "euler_a", "schedule": "model", "eta": 0.5}, "schedule"),
    ):  # fmt: skip
        with pytest.raises(InvalidRequestError) as error:
            runtime_fp32.prepare(prompt=PROMPT, **{"sampler": "euler", "schedule": "automatic", **options})
        assert error.value.field == field
    # Values a sampler does not take change nothing, as in A1111.
    plain = runtime_fp32.prepare(prompt=PROMPT, sampler="dpmpp_2m", schedule="automatic")
    ignored = runtime_fp32.prepare(prompt=PROMPT, sampler="dpmpp_2m", schedule="automatic", eta=0.3, s_churn=1.0)
    assert ignored.request.sampler_params.keywords("dpmpp_2m") == plain.request.sampler_params.keywords("dpmpp_2m")


@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential", "sgm_uniform", "simple", "normal", "ddim"])
def test_lcm_equals_a1111(a1111, runtime_fp32, schedule):
    """A1111's LCM: its denoiser over LCM's 50 levels ("Automatic" its own get_sigmas, the other
    types over its sigma range; SGM Uniform, Simple, Normal and DDIM through its table and its
    sigma_to_t / t_to_sigma, as A1111's schedulers take the inner model), CFG on its outputs, noise
    from the image generator. The tiny model is no LCM; the arithmetic is the same."""
    expected = a1111.txt2img("lcm", schedule, STEPS)
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


IMG2IMG_CASES = [
    *[(name, "automatic", value) for name in ("euler_a", "dpmpp_2m", "dpmpp_2m_sde") for value in (0.3, 0.6, 0.75)],
    ("dpm_fast", "karras", 0.6), ("dpm_adaptive", "automatic", 0.75), ("lcm", "automatic", 0.6),
    ("dpm2", "automatic", 0.6),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize(("sampler", "schedule", "strength"), IMG2IMG_CASES)
def test_img2img_a1111_rule_equals_kdiffusion(a1111, runtime_fp32, sampler, schedule, strength):
    """A1111's sample_img2img: t_enc = int(min(strength, 0.999) * steps), the sampler runs
    sigmas[steps - t_enc - 1:] from x0 + noise * that first level (DPM fast / adaptive between its
    ends); the Brownian tree spans the whole schedule."""
    steps = 6
    expected = a1111.img2img(sampler, schedule, steps, strength, init_image())
    out = ours_img2img(runtime_fp32, sampler, schedule, steps, strength)
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


# 8 steps: t_enc 2, 4, 6 (PLMS's t_enc 2 is one step, its look-ahead at the grid's end; UniPC needs 3).
TIMESTEP_CASES = [
    *[(sampler, strength, False) for sampler in ("ddim", "ddim_cfgpp", "plms") for strength in (0.3, 0.6, 0.75)],
    ("unipc", 0.6, False), ("unipc", 0.75, False), ("ddim", 0.6, True), ("unipc", 0.6, True),
]  # fmt: skip


@pytest.mark.parametrize(("sampler", "strength", "fix_steps"), TIMESTEP_CASES)
def test_timestep_img2img_a1111_rule_equals_a1111(a1111, runtime_fp32, sampler, strength, fix_steps):
    """A1111's CompVisSampler.sample_img2img: the init latent noised to timesteps[t_enc] with
    alphas_cumprod, then the sampler over timesteps[:t_enc] (UniPC from is_img2img's t_start)."""
    steps = 8
    expected = a1111.img2img(sampler, "automatic", steps, strength, init_image(), fix_steps)
    out = ours_img2img(runtime_fp32, sampler, "automatic", steps, strength, img2img_fix_steps=fix_steps)
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


def test_dpm_adaptive_inpaints_as_a1111(a1111, runtime_fp32):
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
    x0, noise, generator = a1111.init_latents(init_image())
    denoiser = a1111.denoiser("dpm_adaptive")
    guided = kd.cfg_model(denoiser, a1111.cond, a1111.uncond, CFG)

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        return x0 * keep + nmask * guided(x, sigma)

    torch.randn(SETUP.shape, generator=generator)  # the runtime's masked-image draw
    sigmas = a1111.sigmas(denoiser, "dpm_adaptive", "automatic", steps)
    schedule = sigmas[steps - int(strength * steps) - 1 :]
    with a1111_noise(generator), torch.no_grad():
        latents = kd.sampling.sample_dpm_adaptive(
            model, x0 + noise * schedule[0], schedule[-2].item(), schedule[0].item(), disable=True, eta=1.0
        )
    decoded = decode(a1111.pipe, latents * nmask + x0 * keep)[0]
    got = runtime_fp32.prepare(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, sampler="dpm_adaptive", schedule="automatic",
        num_inference_steps=steps, guidance_scale=CFG, image=init_image(), strength=strength, step_rule="a1111",
        mask_image=Image.fromarray(mask), mask_blur=0,
    )  # fmt: skip
    out = runtime_fp32.run(got, output_type="np")
    expected = apply_overlay(decoded, got.init.overlay)
    assert np.abs(out.images[0] - expected).max() * 255 <= 1.0
    assert np.abs(out.images[0] - decoded).max() * 255 > 1.0  # the overlay did paste the original back
