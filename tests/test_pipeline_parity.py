"""The runtime's images against diffusers' for the same seed (the project's central promise).

Tolerances, on pixels in [0, 255]:
- fp32 graphs: max difference <= 1 (the issue's bar; measured ~4e-4 on the tiny model).
- fp16 graphs: max difference <= 3 and mean <= 0.5. The CPU target's fp16 graphs hold fp16 weights
  and compute in fp32 (measured ~0.08 max on the tiny model); the bound also covers fp16
  arithmetic, as the CUDA target makes it (measured ~0.6 max, ~0.07 mean).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

import diffusers_reference as reference
from runtime import Pipeline
from runtime.errors import InvalidRequestError

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source):
    return reference.load(tiny_source["diffusers"])


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def ours(pipe: Pipeline, sampler: str, seed: int, count: int = 1, **kwargs) -> np.ndarray:
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=seed, num_images_per_prompt=count, width=64, height=64,
        sampler=sampler, output_type="np", **kwargs,
    )  # fmt: skip
    return np.stack(out.images)


def pixel_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    difference = np.abs(a - b) * 255
    return float(difference.max()), float(difference.mean())


def test_card_recipe_equals_diffusers_within_one_level(diffusers_pipe, runtime_fp32):
    """Euler a, 28 steps, CFG 11, clip skip 2, seed 114514 (ACertainThing's card)."""
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, "euler_a", [114514])
    got = ours(runtime_fp32, "euler_a", 114514)
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert expected.std() > 0.05  # a real image, not a saturated one
    worst, _ = pixel_difference(got, expected)
    assert worst <= 1.0


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_other_samplers_equal_their_diffusers_schedulers(diffusers_pipe, runtime_fp32, sampler):
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, sampler, [42], steps=12)
    worst, _ = pixel_difference(ours(runtime_fp32, sampler, 42, num_inference_steps=12), expected)
    assert worst <= 1.0


def test_batch_image_i_uses_seed_plus_i(diffusers_pipe, runtime_fp32):
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, "euler_a", [1000, 1001], steps=8)
    got = ours(runtime_fp32, "euler_a", 1000, count=2, num_inference_steps=8)
    assert pixel_difference(got, expected)[0] <= 1.0
    single = ours(runtime_fp32, "euler_a", 1001, num_inference_steps=8)
    assert pixel_difference(got[1:], single)[0] <= 1e-3


def test_guidance_at_most_one_skips_the_negative_prompt(diffusers_pipe, runtime_fp32):
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, "euler_a", [5], steps=6, guidance_scale=1.0)
    got = ours(runtime_fp32, "euler_a", 5, num_inference_steps=6, guidance_scale=1.0)
    assert pixel_difference(got, expected)[0] <= 1.0


def test_clip_skip_1_equals_diffusers_last_layer(diffusers_pipe, runtime_fp32):
    """The export's second output (clip skip 1) against diffusers encoding the prompts itself
    (clip_skip=None); the infotext follows the request (A1111 writes no "Clip skip" for 1)."""
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, "euler_a", [7], steps=6, a1111_clip_skip=None)
    out = runtime_fp32(PROMPT, NEGATIVE, 6, seed=7, width=64, height=64, sampler="euler_a", output_type="np",
                       clip_skip=1)  # fmt: skip
    assert pixel_difference(np.stack(out.images), expected)[0] <= 1.0
    default = ours(runtime_fp32, "euler_a", 7, num_inference_steps=6)
    assert pixel_difference(default, expected)[0] > 10  # clip skip 2, the default, is another image
    assert "Clip skip" not in out.infotexts[0]
    assert "Clip skip: 2" in runtime_fp32(PROMPT, NEGATIVE, 1, seed=7, width=64, height=64).infotexts[0]


def test_a_clip_skip_the_export_lacks_says_how_to_export_it(runtime_fp32):
    with pytest.raises(InvalidRequestError) as error:
        runtime_fp32.prepare(prompt=PROMPT, clip_skip=3)
    assert error.value.field == "clip_skip" and "python -m export --clip-skip 2,1,3" in error.value.message


def test_fp16_graphs_stay_close_to_diffusers(diffusers_pipe, tiny_fp16):
    pipe = Pipeline.from_pretrained(tiny_fp16, provider="cpu")
    expected = reference.generate(diffusers_pipe, PROMPT, NEGATIVE, "euler_a", [114514])
    worst, mean = pixel_difference(ours(pipe, "euler_a", 114514), expected)
    assert worst <= 3.0 and mean <= 0.5
