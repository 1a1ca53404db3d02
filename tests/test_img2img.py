"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (4-channel UNet path) on the tiny model, fp32 graphs.

Tolerance: max pixel difference <= 1 level of 255 (the issue's bar). Inpainting: A1111 pastes the
original pixels back outside the mask, diffusers does not, so the reference image gets the same
composite (binary mask, mask blur 0) before the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

import diffusers_reference as reference
from runtime import Pipeline
from runtime.errors import InvalidRequestError

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"
STEPS = 10


def init_image(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def rect_mask(size: int = 64, box: tuple[int, int, int, int] = (16, 8, 48, 40)) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source):
    return reference.load(tiny_source["diffusers"])


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def run_diffusers(pipe_class, base, sampler: str, seed: int, strength: float, **kwargs) -> np.ndarray:
    pipe = pipe_class(**base.components)
    pipe.scheduler = reference.SCHEDULERS[sampler].from_config(base.scheduler.config)
    out = pipe(
        prompt_embeds=reference.clip_skip_embeddings(base, PROMPT),
        negative_prompt_embeds=reference.clip_skip_embeddings(base, NEGATIVE),
        image=init_image(), strength=strength, num_inference_steps=STEPS, guidance_scale=11.0,
        generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np", **kwargs,
    )  # fmt: skip
    return out.images[0].astype(np.float32)


def ours(pipe: Pipeline, sampler: str, seed: int, strength: float, **kwargs) -> tuple[np.ndarray, str]:
    kwargs.setdefault("num_inference_steps", STEPS)
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, seed=seed, sampler=sampler,
        image=init_image(), strength=strength, output_type="np", **kwargs,
    )  # fmt: skip
    return out.images[0], out.infotexts[0]


@pytest.mark.parametrize("sampler", ["euler_a", "euler"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_equals_diffusers(diffusers_pipe, runtime_fp32, sampler, strength):
    expected = run_diffusers(StableDiffusionImg2ImgPipeline, diffusers_pipe, sampler, 114514, strength)
    got, text = ours(runtime_fp32, sampler, 114514, strength)
    assert got.shape == expected.shape == (64, 64, 3)
    assert np.abs(got - expected).max() * 255 <= 1.0
    assert f"Denoising strength: {strength}" in text


@pytest.mark.parametrize("sampler", ["euler_a", "euler"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_inpainting_equals_diffusers_4_channel_path(diffusers_pipe, runtime_fp32, sampler, strength):
    expected = run_diffusers(
        StableDiffusionInpaintPipeline, diffusers_pipe, sampler, 42, strength, mask_image=rect_mask()
    )
    inside = (np.asarray(rect_mask()) > 0)[..., None]
    expected = np.where(inside, expected, np.asarray(init_image(), np.float32) / 255)
    got, text = ours(runtime_fp32, sampler, 42, strength, mask_image=rect_mask(), mask_blur=0)
    assert np.abs(got - expected).max() * 255 <= 1.0
    assert "Mask blur: 0" in text


def test_inpainting_options_run(runtime_fp32):
    """Only-masked crop, each masked-content mode, mask invert and blur give images of the asked
    size that keep the original outside the (blurred) mask."""
    original = np.asarray(init_image(), np.float32) / 255
    for fill in ("fill", "latent noise", "latent nothing", 1):
        got, text = ours(
            runtime_fp32, "euler", 3, 0.75, num_inference_steps=4, mask_image=rect_mask(), inpaint_full_res=True,
            inpaint_full_res_padding=4, inpainting_fill=fill, inpainting_mask_invert=True, mask_blur=2,
        )  # fmt: skip
        assert got.shape == (64, 64, 3)
        assert "Inpaint area: Only masked" in text and "Mask mode: Inpaint not masked" in text
        assert np.abs(got[20:28, 24:40] - original[20:28, 24:40]).max() <= 1 / 255  # inside the inverted-away box


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strength": 1.5}, "strength"),
        ({"strength": -0.1}, "strength"),
        ({"image": b"not an image"}, "image"),
        ({"mask_image": Image.new("L", (32, 32))}, "mask_image"),
        ({"mask_image": b"\x89PNG broken"}, "mask_image"),
        ({"resize_mode": 7}, "resize_mode"),
        ({"mask_image": rect_mask(), "inpainting_fill": "paint"}, "inpainting_fill"),
    ],
)
def test_bad_inputs_name_the_field(runtime_fp32, kwargs, field):
    parameters = {"image": init_image(), **kwargs}
    with pytest.raises(InvalidRequestError) as error:
        runtime_fp32.prepare(prompt=PROMPT, **parameters)
    assert error.value.field == field


def test_decompression_bomb_is_refused(runtime_fp32, tmp_path):
    import io

    from runtime.images import inputs

    buffer = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buffer, format="PNG")
    with pytest.raises(InvalidRequestError) as error:
        inputs.load_image(buffer.getvalue(), "image")
    assert error.value.field == "image" and "pixel limit" in error.value.message
