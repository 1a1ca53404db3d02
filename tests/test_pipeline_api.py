"""The Python API as an app uses it: outputs, callbacks, cancellation, seeds, prompt syntax."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from runtime import InvalidRequestError, ModelFolderError, Pipeline

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def pipe(tiny_fp32) -> Pipeline:
    return Pipeline.from_pretrained(tiny_fp32, provider="auto")


def test_defaults_are_the_model_card_recipe(pipe):
    out = pipe("1girl", seed=3, width=64, height=64)
    assert "Steps: 28, Sampler: Euler a, " in out.infotexts[0] and "CFG scale: 11, " in out.infotexts[0]
    assert "Clip skip: 2" in out.infotexts[0]


def test_pil_and_numpy_outputs(pipe):
    pil = pipe("1girl", seed=1, num_images_per_prompt=2, **SMALL)
    assert [image.size for image in pil.images] == [(64, 64), (64, 64)]
    assert all(isinstance(image, Image.Image) for image in pil.images)
    arrays = pipe("1girl", seed=1, num_images_per_prompt=2, output_type="np", **SMALL).images
    assert all(a.shape == (64, 64, 3) and a.dtype == np.float32 for a in arrays)
    assert min(a.min() for a in arrays) >= 0.0 and max(a.max() for a in arrays) <= 1.0
    assert np.array_equal(np.asarray(pil.images[0]), (arrays[0] * 255).round().astype(np.uint8))
    assert pil.seeds == [1, 2] and "Seed: 2," in pil.infotexts[1]


def test_leading_parameters_by_position_as_by_name(pipe):
    """prompt ... eta_noise_seed_delta may come by position (in prepare()'s order), as before."""
    by_position = pipe("1girl", "lowres", 2, 7.0, 64, 64, 5, 1, "euler", "karras", "cpu", 0, output_type="np")
    by_name = pipe(
        prompt="1girl", negative_prompt="lowres", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
        seed=5, sampler="euler", schedule="karras", output_type="np",
    )  # fmt: skip
    assert np.array_equal(by_position.images[0], by_name.images[0])
    assert by_position.infotexts == by_name.infotexts
    with pytest.raises(TypeError, match="multiple values for seed"):
        pipe("1girl", "", 2, 7.0, 64, 64, 5, seed=6)
    with pytest.raises(TypeError, match="at most 12 positional"):
        pipe("1girl", "", 2, 7.0, 64, 64, 5, 1, "euler", "karras", "cpu", 0, "pil")


def test_same_seed_same_image_and_random_seed_reported(pipe):
    first = pipe("1girl", seed=11, output_type="np", **SMALL).images[0]
    again = pipe("1girl", seed=11, output_type="np", **SMALL).images[0]
    assert np.array_equal(first, again)
    random = pipe("1girl", seed=-1, **SMALL)
    assert 0 <= random.seeds[0] < 2**32 and f"Seed: {random.seeds[0]}," in random.infotexts[0]


def test_callback_sees_every_step_and_can_stop(pipe):
    seen = []
    pipe("1girl", seed=2, callback=lambda step, total, latents: seen.append((step, total, latents.shape)), **SMALL)
    assert seen == [(step, 4, (1, 4, 8, 8)) for step in range(1, 5)]

    stopped = pipe("1girl", seed=2, callback=lambda step, total, latents: step < 2, **SMALL)
    assert stopped.interrupted and stopped.images[0].size == (64, 64)


def test_cancel_event_interrupts(pipe):
    event = threading.Event()
    event.set()
    out = pipe("1girl", seed=2, cancel_event=event, **SMALL)
    assert out.interrupted


def test_nv_rng_is_deterministic_and_differs_from_cpu(pipe):
    nv = pipe("1girl", seed=4, rng="nv", output_type="np", **SMALL)
    assert "RNG: NV" in nv.infotexts[0]
    assert np.array_equal(nv.images[0], pipe("1girl", seed=4, rng="nv", output_type="np", **SMALL).images[0])
    assert not np.array_equal(nv.images[0], pipe("1girl", seed=4, rng="cpu", output_type="np", **SMALL).images[0])


def test_eta_noise_seed_delta_changes_only_ancestral_noise(pipe):
    base = pipe("1girl", seed=4, output_type="np", **SMALL).images[0]
    ensd = pipe("1girl", seed=4, eta_noise_seed_delta=31337, output_type="np", **SMALL)
    assert "ENSD: 31337" in ensd.infotexts[0] and not np.array_equal(base, ensd.images[0])
    # Euler (not ancestral) draws no noise after the start: ENSD changes nothing.
    euler = pipe("1girl", seed=4, sampler="euler", output_type="np", **SMALL).images[0]
    euler_ensd = pipe("1girl", seed=4, sampler="euler", eta_noise_seed_delta=31337, output_type="np", **SMALL)
    assert np.array_equal(euler, euler_ensd.images[0])


def test_emphasis_and_long_prompts(pipe):
    plain = pipe("a cat on a hill", seed=5, output_type="np", **SMALL).images[0]
    emphasized = pipe("a (cat:1.5) on a hill", seed=5, output_type="np", **SMALL)
    assert not np.array_equal(plain, emphasized.images[0])
    long_prompt = ", ".join(["masterpiece", "best quality", "1girl", "solo", "long hair"] * 12)  # > 75 tokens
    out = pipe(long_prompt, negative_prompt="lowres", seed=5, **SMALL)
    assert "Pad conds" not in out.infotexts[0]  # 2 chunks against 1: two UNet calls, as A1111 by default
    padded = pipe(long_prompt, negative_prompt="lowres", seed=5, pad_conds=True, **SMALL)
    assert "Pad conds: True" in padded.infotexts[0]  # A1111's option: the negative was padded


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": 32}, "height"),
        ({"num_inference_steps": 0}, "steps"),
        ({"guidance_scale": -1.0}, "cfg_scale"),
        ({"guidance_scale": float("nan")}, "cfg_scale"),
        ({"sampler": "warp"}, "sampler"),
        ({"schedule": "sideways"}, "schedule"),
        ({"rng": "GPU"}, "rng"),
        ({"seed": 2**33}, "seed"),
        ({"seed": "12"}, "seed"),
        ({"num_images_per_prompt": 0}, "batch_size"),
        ({"output_type": "latent"}, "output_type"),
        ({"negative_prompt": None}, "negative_prompt"),
    ],
)
def test_bad_parameters_name_their_field(pipe, kwargs, field):
    with pytest.raises(InvalidRequestError) as error:
        pipe("1girl", **{**SMALL, **kwargs})
    assert error.value.field == field


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("prompt", ["(cat:" + "9" * 400 + ")", "(cat:5000)", "(" * 2000 + "cat"])
def test_weights_that_would_break_the_embeddings_are_refused(pipe, prompt):
    with pytest.raises(InvalidRequestError) as error:
        pipe(prompt, **SMALL)
    assert error.value.field == "prompt"


def test_schedules_the_model_cannot_serve_are_refused_before_running(pipe):
    calls = []
    with pytest.raises(InvalidRequestError) as error:
        pipe(
            "1girl",
            sampler="ddim",
            schedule="a1111",
            callback=lambda *args: calls.append(args),
            **{**SMALL, "num_inference_steps": 1},
        )
    assert error.value.field == "steps" and calls == []


def test_ensd_is_written_only_for_ancestral_samplers(pipe):
    euler = pipe("1girl", seed=4, sampler="euler", eta_noise_seed_delta=31337, **SMALL)
    assert "ENSD" not in euler.infotexts[0]
