"""The SDE samplers' noise as AUTOMATIC1111 draws it: k-diffusion's ``BrownianTreeNoiseSampler`` over
torchsde's ``BrownianTree``, reproduced in numpy.

A1111 (``Sampler.create_noise_sampler``) gives each image its own tree, seeded with the image's seed,
spanning the whole schedule's smallest positive to largest level. A query for the noise between two
levels is the Brownian increment over them divided by the square root of their distance, so the
same seed gives the same noise whatever steps ask for it. torchsde 0.2.6 builds the increment as
``BrownianInterval(halfway_tree=True, tol=1e-6, pool_size=24)`` with no Levy area:

* the times are rounded to 6 decimals; the root's increment is ``randn * sqrt(t1 - t0)``;
* every interval splits at its rounded midpoint, and a query is split into the intervals of this
  dyadic tree that tile it, their increments summed left to right;
* a child's increment is the Brownian bridge ``left = l/h * W + sqrt(l r / h) * z`` (right: W - left)
  of its parent's W, where z is drawn from a fresh torch generator seeded with a word of numpy's
  ``SeedSequence(seed, spawn_key=(key, depth))`` of the parent (the root's key is 0; a child's
  ``2 key + side``), so a node's increment depends only on its place in the tree.

The draws come from `runtime.sampling.rng` (torch's CPU generator, bit for bit), in float32 with
torch's order of operations.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .rng import make_generator

__all__ = ["BrownianNoise", "BrownianTree"]

_DECIMALS = 6  # torchsde's BrownianTree tol=1e-6
_POOL_SIZE = 24  # torchsde's BrownianTree pool_size
_CACHE_SIZE = 64  # increments kept: the upper levels every query walks through


def _round(t: float) -> float:
    return round(t, _DECIMALS)


class BrownianTree:
    """One image's Brownian motion over [t0, t1] (torchsde ``BrownianTree(t0, w0, t1, entropy=seed)``
    with w0 of `shape`), drawing from the `rng` kind's generator ("cpu": torch's CPU generator)."""

    def __init__(self, t0: float, t1: float, shape: Sequence[int], seed: int, rng: str = "cpu") -> None:
        if not t0 < t1:
            raise ValueError(f"a Brownian tree needs t0 < t1, got {t0} and {t1}")
        self.start, self.end = _round(t0), _round(t1)
        self.shape, self.seed, self.rng = tuple(shape), seed, rng
        # A node is (start, end, key, depth); the tree is implicit, as every split is at the midpoint.
        self._root = (self.start, self.end, 0, 0)
        root_w_seed = np.random.SeedSequence(seed, pool_size=_POOL_SIZE).generate_state(3)[0]
        # The root's increment scales with the unrounded span, as torchsde's does.
        self._root_w = self._randn(root_w_seed) * np.float32(math.sqrt(t1 - t0))
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def _randn(self, seed: int) -> np.ndarray:
        return make_generator(self.rng, int(seed)).randn(self.shape)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """The increment W(tb) - W(ta) for ta <= tb, the ends clamped to the tree's span."""
        ta, tb = max(float(ta), self.start), min(float(tb), self.end)
        if ta >= tb:
            return np.zeros(self.shape, np.float32)
        pieces = self._tiling(self._root, _round(ta), _round(tb))
        total = self._increment(pieces[0])
        for piece in pieces[1:]:
            total = total + self._increment(piece)
        return total

    @staticmethod
    def _children(node: tuple) -> tuple[tuple, tuple]:
        start, end, key, depth = node
        mid = _round(0.5 * (end + start))
        return (start, mid, 2 * key, depth + 1), (mid, end, 2 * key + 1, depth + 1)

    def _tiling(self, node: tuple, ta: float, tb: float) -> list[tuple]:
        """The tree's intervals that tile [ta, tb], left to right (torchsde ``_loc``)."""
        if (ta, tb) == node[:2]:
            return [node]
        left, right = self._children(node)
        mid = left[1]
        if tb <= mid:
            return self._tiling(left, ta, tb)
        if ta >= mid:
            return self._tiling(right, ta, tb)
        return self._tiling(left, ta, mid) + self._tiling(right, mid, tb)

    def _parent(self, node: tuple) -> tuple:
        """Walk down from the root to the node's parent (nodes only know their key and depth)."""
        parent = self._root
        for level in range(node[3] - 1, 0, -1):
            parent = self._children(parent)[(node[2] >> level) & 1]
        return parent

    def _w_seed(self, key: int, depth: int) -> int:
        """The seed of the bridge noise a node gives its children (torchsde ``_split_exact``)."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(key, depth), pool_size=_POOL_SIZE)
        return int(sequence.generate_state(4)[0])

    def _increment(self, node: tuple) -> np.ndarray:
        if node == self._root:
            return self._root_w
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        parent = self._parent(node)
        start, end, key, depth = parent
        mid = self._children(parent)[0][1]
        w = self._increment(parent)
        z = self._randn(self._w_seed(key, depth))
        left_span, right_span, inverse = mid - start, end - mid, 1 / (end - start)
        # torchsde: left_W = left_diff * W * h_reciprocal + sqrt(var) * noise, float32 throughout.
        spread = np.float32(math.sqrt(left_span * right_span * inverse))
        left = w * np.float32(left_span) * np.float32(inverse) + spread * z
        value = left if node[2] % 2 == 0 else w - left
        self._cache[node] = value
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return value


class BrownianNoise:
    """A1111's noise sampler for a batch: one `BrownianTree` per image seed over [sigma_min,
    sigma_max]; ``noise(sigma, sigma_next)`` is the stacked increments over the two levels divided by
    the square root of their distance (k-diffusion ``BrownianTreeNoiseSampler``), unit variance."""

    def __init__(
        self, sigma_min: float, sigma_max: float, seeds: Sequence[int], shape: Sequence[int], rng: str = "cpu"
    ):
        low, high = float(np.float32(sigma_min)), float(np.float32(sigma_max))
        self.trees = [BrownianTree(low, high, shape, seed, rng) for seed in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> np.ndarray:
        a, b = np.float32(sigma), np.float32(sigma_next)
        low, high, sign = (a, b, 1) if a < b else (b, a, -1)
        w = np.stack([tree(float(low), float(high)) for tree in self.trees])
        if sign < 0:
            w = -w
        return (w / np.sqrt(np.abs(b - a))).astype(np.float32)
