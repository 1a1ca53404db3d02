"""A1111's Brownian-tree noise in numpy against k-diffusion's BrownianTreeNoiseSampler over
torchsde's BrownianTree (CPU, float32), seeded as A1111's create_noise_sampler seeds it: one tree
per image seed over the schedule's smallest positive to largest level. Tolerance: 1e-6 absolute
on unit-variance noise (float32 rounding of the bridge arithmetic; measured 2.4e-7)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling.brownian import BrownianNoise, BrownianTree

torch = pytest.importorskip("torch")
pytest.importorskip("torchsde")

import kdiffusion_reference as kd  # noqa: E402

SEEDS = [114514, 4294967295]


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde clamps the rounded tree ends
@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_brownian_noise_equals_kdiffusion(kind: str) -> None:
    sigmas = getattr(kd.sampling, f"get_sigmas_{kind}")(6, 0.0291675, 14.614642)
    x = torch.zeros(len(SEEDS), 4, 8, 6)
    low, high = sigmas[sigmas > 0].min(), sigmas.max()
    reference = kd.sampling.BrownianTreeNoiseSampler(x, low, high, seed=SEEDS)
    ours = BrownianNoise(float(low), float(high), SEEDS, (4, 8, 6))
    # The steps in order, as the samplers ask, with DPM++ SDE's intermediate level and a query
    # spanning two steps (a sum of tree intervals) and one going up (the sign flips).
    queries = [(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 2)]
    queries += [(sigmas[1], (sigmas[1] * sigmas[2]).sqrt()), (sigmas[0], sigmas[3]), (sigmas[4], sigmas[2])]
    for a, b in queries:
        expected = reference(a, b).numpy()
        got = ours(float(a), float(b))
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-6
        assert 0.7 < expected.std() < 1.3  # unit-variance noise, not zeros


def test_brownian_tree_is_additive_and_seeded() -> None:
    """W over [a, c] is W over [a, b] plus W over [b, c] (up to float32 rounding); the same seed
    gives the same path whatever was asked before, another seed another one."""
    tree = BrownianTree(0.03, 14.6, (16,), 7)
    whole = tree(0.5, 3.0)
    parts = tree(0.5, 1.25) + tree(1.25, 3.0)
    assert np.abs(whole - parts).max() < 1e-5
    fresh = BrownianTree(0.03, 14.6, (16,), 7)
    assert np.array_equal(fresh(0.5, 3.0), whole)
    assert not np.allclose(BrownianTree(0.03, 14.6, (16,), 8)(0.5, 3.0), whole)
