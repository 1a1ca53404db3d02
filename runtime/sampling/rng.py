"""Seed-compatible Gaussian noise in pure numpy: the same latents as torch, without torch.

A Stable Diffusion image is fully determined by its seed only if the initial latent noise is drawn
exactly as the reference implementation draws it. Two reference sources are emulated here:

``TorchCpuGenerator`` ("cpu")
    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` for float32, as
    PyTorch 2.x computes it (checked bit for bit against torch 2.13 on x86-64):

    * the engine is the standard 32-bit Mersenne Twister seeded by ``init_genrand`` with the low
      32 bits of the seed (``at::mt19937``); numpy's ``MT19937`` bit generator produces the same
      stream and does the heavy lifting;
    * a tensor of 16 values or more is first filled with 24-bit uniforms ``(x & 0xFFFFFF) * 2**-24``
      (one 32-bit draw each), then transformed in place in blocks of 16 by Box-Muller over the
      pairs ``(j, j + 8)``; when the size is not a multiple of 16, 16 *fresh* uniforms are drawn and
      the last 16 outputs are recomputed from them (``normal_fill`` in
      ``aten/src/ATen/native/cpu/DistributionTemplates.h``);
    * on x86-64 builds (the AVX2 and the AVX-512 kernels alike) that transform is
      ``NormalFill16<float>`` built on ``log256_ps``/``sincos256_ps`` from ``avx_mathfun.h``:
      Cephes float32 polynomials, not libm, and GCC fuses several of their mul+add pairs into FMAs
      (``-ffp-contract=fast`` applies to intrinsics too). Both facts change the last bits, so the
      polynomials and the fused operations are reproduced one by one below;
    * a tensor of fewer than 16 values takes the scalar path instead: ``normal_distribution<double>``
      with 53-bit uniforms built from two 32-bit draws, ``r = sqrt(-2 log1p(-u2))``,
      ``theta = 2 pi u1``; it returns ``r cos(theta)`` and caches ``r sin(theta)`` *on the
      generator*, where it is returned by the next scalar-path draw, even after intervening large
      draws (which neither use nor clear it).

``PhiloxGenerator`` ("nv")
    The "NV" random source of AUTOMATIC1111's web UI (``modules/rng_philox.py``), a numpy imitation
    of ``torch.randn`` on NVIDIA GPUs: Philox4x32-10 keyed by the 64-bit seed, one block per output
    value with counter ``(call_index, 0, value_index, 0)``, and the first half of curand's
    Box-Muller computed in float64.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..errors import InvalidRequestError

__all__ = [
    "NoiseGenerator",
    "PhiloxGenerator",
    "TorchCpuGenerator",
    "make_generator",
    "philox4x32_10",
]

_U32 = 0xFFFFFFFF
_F32 = np.float32
_F64 = np.float64


class NoiseGenerator(Protocol):
    """A stateful source of standard-normal float32 noise; each call advances its state."""

    def randn(self, shape: int | Sequence[int]) -> np.ndarray: ...


def _seed_to_u64(seed: int) -> int:
    """Reduce a seed the way ``torch.Generator.manual_seed`` does: negative values wrap mod 2**64."""
    value = operator.index(seed)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {value}")
    return value % 2**64


def _normalize_shape(shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    dims = (operator.index(shape),) if isinstance(shape, int | np.integer) else tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims, math.prod(dims)


# --------------------------------------------------------------------------------------------------
# torch CPU generator: mt19937
# --------------------------------------------------------------------------------------------------


def _mt19937_bits(seed32: int) -> np.random.MT19937:
    """An MT19937 bit generator in the state ``init_genrand(seed32)`` leaves it in.

    The key is computed here and set through the public ``state`` setter, rather than through
    numpy's private ``_legacy_seeding``; position 624 makes the first draw regenerate the block,
    exactly as torch's ``left_ = 1`` does.
    """
    key = [seed32]
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & _U32)
    bits = np.random.MT19937(0)
    bits.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, np.uint32), "pos": 624}}
    return bits


# --------------------------------------------------------------------------------------------------
# torch CPU generator: avx_mathfun.h float32 polynomials, with GCC's FMA contraction
# --------------------------------------------------------------------------------------------------


def _fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add.

    The float32 product is exact in float64 (24 + 24 bits < 53), so only the float64 addition and
    the cast round. They can disagree with a single rounding only when the float64 sum lands exactly
    on a float32 halfway point; none of 23 million samples compared with torch hit that case.
    """
    return (np.asarray(a, _F64) * b + c).astype(_F32)


# fmt: off
_LOG_P = tuple(_F32(p) for p in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
))
# fmt: on
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRT_HALF = _F32(0.707106781186547524)


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` for x in [2**-24, 1] (no denormals, zeros or negatives reach it here)."""
    bits = x.view(np.uint32)
    exponent = ((bits >> 23).astype(np.int32) - 127).astype(_F32) + _F32(1)
    mant = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)  # in [0.5, 1)
    small = mant < _SQRT_HALF
    # Cephes keeps the mantissa in [sqrt(1/2), sqrt(2)): below sqrt(1/2) use 2m - 1 and e - 1.
    tmp = np.where(small, mant, _F32(0))
    mant = mant - _F32(1)
    exponent = exponent - np.where(small, _F32(1), _F32(0))
    mant = mant + tmp
    z = mant * mant
    # Every `y = y * x; y = y + p` pair of the Horner chain is contracted to one FMA.
    y = _fma(_LOG_P[0], mant, _LOG_P[1])
    for p in _LOG_P[2:]:
        y = _fma(y, mant, p)
    y = y * mant
    # `y = y * z; tmp = e * q1; y = y + tmp`: GCC fuses the first product (y * z), not e * q1.
    y = _fma(y, z, exponent * _LOG_Q1)
    y = y - z * _F32(0.5)  # z * 0.5 is exact, so fused or not gives the same result
    return (mant + y) + exponent * _LOG_Q2  # e * q2 is exact (q2 has 9 significant bits)


_FOUR_OVER_PI = _F32(1.27323954473516)
_MINUS_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_COS_P = (_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002))
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_SIGN_BIT = np.uint32(0x80000000)


def _flip_sign(x: np.ndarray, negate: np.ndarray) -> np.ndarray:
    return (x.view(np.uint32) ^ (negate.astype(np.uint32) << 31)).view(_F32)


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` for x >= 0 (theta = 2 pi u is never negative here)."""
    octant = (x * _FOUR_OVER_PI).astype(np.int32)  # truncation, like _mm256_cvttps_epi32
    octant = (octant + 1) & ~1
    y = octant.astype(_F32)
    sin_negative = (octant & 4) != 0
    cos_negative = (~(octant - 2) & 4) != 0
    use_sin_poly = (octant & 2) == 0  # for the sine; the cosine takes the other polynomial
    # Cody-Waite reduction x - y * pi/4 in three parts; each `x = x + y * dp` is one FMA.
    for dp in _MINUS_DP:
        x = _fma(y, dp, x)
    z = x * x
    cos_poly = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z
    # `y = y * z; tmp = z * 0.5; y = y - tmp`: the first product is fused into the subtraction.
    cos_poly = _fma(cos_poly, z, -(z * _F32(0.5))) + _F32(1)
    sin_poly = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z
    sin_poly = _fma(sin_poly, x, x)
    sin = np.where(use_sin_poly, sin_poly, cos_poly)
    cos = np.where(use_sin_poly, cos_poly, sin_poly)
    return _flip_sign(sin, sin_negative), _flip_sign(cos, cos_negative)


_TWO_PI_F32 = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)


def _box_muller16_avx2(uniform: np.ndarray) -> np.ndarray:
    """``NormalFill16<float>`` (AVX2 specialization) over rows of 16 uniforms."""
    blocks = uniform.reshape(-1, 16)
    radius = np.sqrt(_F32(-2) * _log256_ps(_F32(1) - blocks[:, :8]))
    sin, cos = _sincos256_ps(_TWO_PI_F32 * blocks[:, 8:])
    # The final fmadd(n, std=1, mean=0) is exact, so it is left out.
    return np.concatenate([radius * cos, radius * sin], axis=1).ravel()


def _box_muller16_scalar(uniform: np.ndarray) -> np.ndarray:
    """The generic ``NormalFill16<float>`` (torch on aarch64, or x86 without AVX2): float libm calls.

    Each libm result is computed in float64 and rounded to float32, which matches glibc's
    logf/cosf/sinf to within 1-2 ulp (they are not always correctly rounded).
    """
    blocks = uniform.reshape(-1, 16)
    log_u1 = np.log((_F32(1) - blocks[:, :8]).astype(_F64)).astype(_F32)
    radius = np.sqrt(_F32(-2) * log_u1)
    theta = ((2.0 * math.pi) * blocks[:, 8:].astype(_F64)).astype(_F32)  # double product, then float
    cos = np.cos(theta.astype(_F64)).astype(_F32)
    sin = np.sin(theta.astype(_F64)).astype(_F32)
    return np.concatenate([radius * cos, radius * sin], axis=1).ravel()


_BOX_MULLER16 = {"avx2": _box_muller16_avx2, "scalar": _box_muller16_scalar}


class TorchCpuGenerator:
    """Emulates ``torch.Generator("cpu").manual_seed(seed)`` feeding ``torch.randn(..., dtype=float32)``.

    ``kernel`` picks torch's CPU transform: "avx2" (the default) is what x86-64 builds run on
    AVX2 and AVX-512 machines, bit for bit; "scalar" is the generic kernel that torch runs on
    aarch64 (Apple Silicon) and on x86 CPUs without AVX2, matched to within 2 float32 ulp.
    """

    def __init__(self, seed: int, kernel: str = "avx2") -> None:
        if kernel not in _BOX_MULLER16:
            raise ValueError(f"kernel must be one of {sorted(_BOX_MULLER16)}, got {kernel!r}")
        self.seed = _seed_to_u64(seed)  # what torch.Generator.initial_seed() reports
        self._bits = _mt19937_bits(self.seed & _U32)  # at::mt19937 only keeps the low 32 bits
        self._box_muller16 = _BOX_MULLER16[kernel]
        self._cached_normal: float | None = None  # CPUGeneratorImpl::next_double_normal_sample_

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        dims, n = _normalize_shape(shape)
        if n == 0:
            return np.empty(dims, _F32)
        values = self._normal_fill(n) if n >= 16 else self._normal_scalar(n)
        return values.reshape(dims)

    def _uniform24(self, n: int) -> np.ndarray:
        """``uniform_real_distribution<float>(0, 1)``: 24 random bits per 32-bit draw."""
        raw = self._bits.random_raw(n)
        return (raw & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _normal_fill(self, n: int) -> np.ndarray:
        uniform = self._uniform24(n)  # all uniforms first, including the tail's unused ones
        out = np.empty(n, _F32)
        whole = n - n % 16
        out[:whole] = self._box_muller16(uniform[:whole])
        if n % 16:
            # torch redraws 16 uniforms and overwrites the last 16 outputs with them.
            out[n - 16 :] = self._box_muller16(self._uniform24(16))
        return out

    def _uniform53(self) -> float:
        """``uniform_real_distribution<double>(0, 1)``: random64() = (first << 32) | second, 53 bits."""
        first, second = (int(v) for v in self._bits.random_raw(2))
        return (((first << 32) | second) & ((1 << 53) - 1)) * 2.0**-53

    def _normal_scalar(self, n: int) -> np.ndarray:
        # Python's math module calls the C library, as torch's scalar path does, so these doubles
        # are torch's own; storing them into the float32 array rounds them as static_cast<float>.
        out = np.empty(n, _F32)
        for i in range(n):
            if self._cached_normal is not None:
                out[i], self._cached_normal = self._cached_normal, None
                continue
            u1 = self._uniform53()
            u2 = self._uniform53()
            radius = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            self._cached_normal = radius * math.sin(theta)
            out[i] = radius * math.cos(theta)
        return out


# --------------------------------------------------------------------------------------------------
# Philox4x32-10 ("NV")
# --------------------------------------------------------------------------------------------------

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # golden ratio and sqrt(3) - 1, as 32-bit fractions
# curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI are float constants; A1111 rounds them to
# float32 the same way, which makes the second one exactly float32(2 pi) * 2**-32, not 2 pi * 2**-32.
_U_STEP = 2.0**-32
_V_STEP = float(np.float32(2.0 * math.pi)) * 2.0**-32


def philox4x32_10(counter: np.ndarray | Sequence, key: np.ndarray | Sequence) -> np.ndarray:
    """The Philox4x32-10 block function (Salmon et al., SC'11; Random123's ``philox4x32_R(10, ...)``).

    ``counter`` is four 32-bit words (shape ``(4,)`` or ``(4, n)``), ``key`` two words (``(2,)`` or
    ``(2, n)``), low word first. Returns the four output words as uint32, shaped like ``counter``.
    """
    # uint64 holds the full 32 x 32 -> 64-bit products, whose halves Philox needs.
    c0, c1, c2, c3 = (np.asarray(counter[i], np.uint64) for i in range(4))
    k0, k1 = (np.asarray(key[i], np.uint64) for i in range(2))
    for round_index in range(10):
        if round_index:  # the key is bumped between rounds: after each of the first nine
            k0 = (k0 + _PHILOX_W[0]) & _U32
            k1 = (k1 + _PHILOX_W[1]) & _U32
        p0 = c0 * _PHILOX_M[0]
        p1 = c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _U32, (p0 >> 32) ^ c3 ^ k1, p0 & _U32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


def _philox_box_muller(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """The sine half of curand's Box-Muller, in float64 like A1111 (curand itself uses float32)."""
    u = w0 * _U_STEP + _U_STEP / 2  # in (0, 1): log never sees 0
    v = w1 * _V_STEP + _V_STEP / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F32)


class PhiloxGenerator:
    """A1111's "NV" noise: what ``torch.randn`` on an NVIDIA GPU gives for a CUDA generator.

    Each ``randn`` call of n values uses Philox blocks with counters ``(offset, 0, i, 0)`` for
    ``i < n`` and key ``(seed & 0xFFFFFFFF, seed >> 32)``, keeps only the first two output words of
    each block, and then increments ``offset``, as torch's CUDA generator advances its Philox
    offset once per small kernel launch.
    """

    def __init__(self, seed: int) -> None:
        self.seed = _seed_to_u64(seed)
        self.offset = 0

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        dims, n = _normalize_shape(shape)
        counter = np.zeros((4, n), np.uint64)
        counter[0] = self.offset & _U32
        counter[2] = np.arange(n, dtype=np.uint64) & _U32
        self.offset += 1  # A1111 advances on every call, empty ones included
        words = philox4x32_10(counter, (self.seed & _U32, self.seed >> 32))
        return _philox_box_muller(words[0], words[1]).reshape(dims)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

_KINDS = {"cpu": TorchCpuGenerator, "nv": PhiloxGenerator}
RNG_KINDS = tuple(_KINDS)


def make_generator(kind: str, seed: int) -> NoiseGenerator:
    """A noise generator for a request: "cpu" (torch CPU, A1111's "CPU") or "nv" (A1111's "NV")."""
    factory = _KINDS.get(kind)
    if factory is None:
        raise InvalidRequestError("rng", f"unknown noise source {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        return factory(seed)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("seed", str(exc)) from exc
