"""Tiled VAE decode/encode against diffusers' AutoencoderKL with enable_tiling(), on images larger
than one tile of the tiny VAE (sample_size 64: 64-pixel / 8-latent tiles). Tolerance: 1/255 on
decoded pixels, 1e-4 on the encoder's moments."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import AutoencoderKL  # noqa: E402

from runtime import Pipeline  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


@pytest.fixture(scope="module")
def vae(tiny_source):
    model = AutoencoderKL.from_pretrained(str(tiny_source["diffusers"]), subfolder="vae").eval()
    model.enable_tiling()
    return model


def test_tile_sizes_come_from_the_vae_config(pipe, vae):
    assert (pipe.tile_sizes.sample, pipe.tile_sizes.latent) == (vae.tile_sample_min_size, vae.tile_latent_min_size)


@pytest.mark.parametrize("shape", [(14, 20), (16, 16)])
def test_tiled_decode_equals_diffusers(pipe, vae, shape):
    latents = np.random.default_rng(1).standard_normal((1, 4, *shape)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents / vae.config.scaling_factor)).sample.numpy()
    expected = np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    got = pipe.decode(latents, "on")
    assert got.shape == expected.shape == (1, shape[0] * 8, shape[1] * 8, 3)
    assert np.abs(got - expected).max() * 255 <= 1.0
    assert np.abs(pipe.decode(latents, "off") - got).max() > 1e-3  # the tiles really were blended


def test_tiled_encode_equals_diffusers(pipe, vae):
    pixels = np.random.default_rng(2).uniform(-1, 1, (1, 3, 112, 160)).astype(np.float32)
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(pixels)).latent_dist
    mean, logvar = np.split(pipe.encode_pixels(pixels, "on"), 2, axis=1)
    assert np.abs(mean - expected.mean.numpy()).max() <= 1e-4
    assert np.abs(logvar - expected.logvar.numpy()).max() <= 1e-4


def test_vae_tiling_is_checked(pipe):
    with pytest.raises(InvalidRequestError) as error:
        pipe.prepare(prompt="x", vae_tiling="sometimes")
    assert error.value.field == "vae_tiling"
