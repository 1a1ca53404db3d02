"""Hires fix: latent resizing equal to torch's interpolate, the first pass equal to plain txt2img,
A1111's sizes and infotext fields, every upscaler."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import Pipeline
from runtime.errors import InvalidRequestError
from runtime.images.upscale import interpolate, target_size
from runtime.registry import UPSCALERS

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


@pytest.mark.parametrize("size", [(16, 24), (13, 17), (5, 7)])
@pytest.mark.parametrize("upscaler", [u for u in UPSCALERS if u.latent], ids=lambda u: u.name)
def test_latent_upscale_equals_torch_interpolate(size, upscaler):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=size, mode=upscaler.mode, antialias=upscaler.antialias
    ).numpy()
    assert np.abs(interpolate(x, size, upscaler.mode, upscaler.antialias) - expected).max() <= 1e-5


def generate(pipe: Pipeline, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipe(PROMPT, negative_prompt=NEGATIVE, seed=1234, width=64, height=64, output_type="np", **kwargs)


def test_first_pass_equals_plain_txt2img(pipe):
    """Scale 1 and denoising 0 leave the first pass untouched: the image is the plain one."""
    plain = generate(pipe).images[0]
    hires = {"hr_scale": 1.0, "denoising_strength": 0.0, "hr_upscaler": "Latent (nearest)"}
    same = generate(pipe, enable_hr=True, hires_options=hires).images[0]
    assert np.abs(same - plain).max() == 0.0


def test_scale_two_gives_the_size_and_a1111_infotext(pipe):
    hires = {"hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7}
    out = generate(pipe, enable_hr=True, hires_options=hires)
    assert out.images[0].shape == (128, 128, 3)
    text = out.infotexts[0]
    for field in ("Size: 64x64", "Hires upscale: 2", "Hires upscaler: Latent", "Denoising strength: 0.7"):
        assert field in text
    assert "Hires steps" not in text


@pytest.mark.parametrize("upscaler", UPSCALERS, ids=lambda u: u.name)
def test_every_upscaler_runs(pipe, upscaler):
    hires = {"hr_scale": 1.5, "hr_upscaler": upscaler.name, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    out = generate(pipe, num_inference_steps=2, enable_hr=True, hires_options=hires)
    assert out.images[0].shape == (96, 96, 3) and out.images[0].std() > 0.01
    assert f"Hires upscaler: {upscaler.name}" in out.infotexts[0] and "Hires steps: 2" in out.infotexts[0]


def test_resize_to_another_aspect_crops_like_a1111(pipe):
    assert target_size(64, 64, 2.0, 128, 96, 8) == (128, 128, 0, 4)
    hires = {"hr_resize_x": 128, "hr_resize_y": 96, "hr_prompt": "1boy", "hr_sampler_name": "Euler"}
    out = generate(pipe, num_inference_steps=2, enable_hr=True, hires_options=hires)
    assert out.images[0].shape == (96, 128, 3)
    text = out.infotexts[0]
    assert "Hires resize: 128x96" in text and "Hires prompt: 1boy" in text and "Hires sampler: Euler" in text


@pytest.mark.parametrize(
    ("hires", "field"),
    [
        ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
        ({"denoising_strength": 1.2}, "denoising_strength"),
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_sampler_name": "Euler z"}, "hr_sampler_name"),
        ({"hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ],
)
def test_bad_hires_fields_name_the_field(pipe, hires, field):
    with pytest.raises(InvalidRequestError) as error:
        pipe.prepare(prompt=PROMPT, enable_hr=True, hires_options=hires)
    assert error.value.field == field
