"""runtime.sampling.rng: torch's CPU randn and A1111's "NV" (Philox) randn, reproduced without torch.

torch is only the reference here: the tests that call it skip where it is missing, and the golden
values below (recorded from torch 2.13 and from A1111's own code) check the same paths without it.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.sampling import rng
from runtime.sampling.rng import PhiloxGenerator, TorchCpuGenerator, make_generator, philox4x32_10

FIXTURE = Path(__file__).parent / "data" / "philox_cuda_fixture.npz"

# Small and large draws interleaved on one generator: sizes < 16 go through torch's scalar path and
# its cached second Box-Muller value, sizes >= 16 through the 16-wide kernel (with the redrawn tail
# when not a multiple of 16), and the cache must survive the large draws in between.
# fmt: off
SHAPE_SEQUENCE = (
    (1,), (3,), (15,), (16,), (17,), (1,), (31,), (33,), (100,), (1, 4, 8, 8), (5,), (1, 4, 9, 7),
    (2, 4, 64, 64), (2,), (1, 4, 96, 64), (7,), (1,),
)
# fmt: on
SEEDS = (0, 1, 114514, 2**32 - 2, 271828, 3141592653, 4000000007)

# The generic (non-AVX2) kernel calls glibc's logf/cosf/sinf, which are not always correctly
# rounded; emulating them from float64 was measured at <= 3 ulp, 4.8e-7 absolute, over 23M values.
SCALAR_KERNEL_ATOL = 1e-6


def f32(*bits: int) -> np.ndarray:
    return np.array(bits, np.uint32).view(np.float32)


def assert_bitwise_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want).max() if got.size else 0.0
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"max abs diff {diff}"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def torch_kernel(torch) -> str:
    """The CPU kernel this torch build runs: x86-64 AVX2/AVX-512 builds share the AVX2 transform."""
    return "avx2" if torch.backends.cpu.get_cpu_capability().startswith("AVX") else "scalar"


def torch_randn(torch, shape: tuple[int, ...], generator) -> np.ndarray:
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


# ------------------------------------------------------------------------------------------------
# Module hygiene
# ------------------------------------------------------------------------------------------------


def test_rng_module_imports_only_numpy_and_the_standard_library() -> None:
    tree = ast.parse(Path(rng.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only runtime.errors is allowed
                assert node.module == "errors"
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        for root in roots:
            assert root == "numpy" or root == "__future__" or root in sys.stdlib_module_names, root


# ------------------------------------------------------------------------------------------------
# torch CPU generator, without torch
# ------------------------------------------------------------------------------------------------


def test_mt19937_seeding_is_init_genrand() -> None:
    # C++ [rand.predef]: the 10000th output of a default-seeded (5489) mt19937 is 4123659995.
    assert int(rng._mt19937_bits(5489).random_raw(10000)[-1]) == 4123659995
    for seed in (0, 1, 114514, 2**32 - 1):
        ours = rng._mt19937_bits(seed).state["state"]["key"]
        legacy = np.random.RandomState(seed).get_state()[1]  # numpy's init_genrand
        np.testing.assert_array_equal(ours, legacy)


def test_cpu_golden_values_recorded_from_torch() -> None:
    # torch 2.13 (x86-64, AVX-512 build) with manual_seed(114514), one generator, in this order.
    g = TorchCpuGenerator(114514)
    assert_bitwise_equal(g.randn((3,)), f32(0xBFE3CE4E, 0xBE8A9E07, 0xBEE43879))
    # fmt: off
    want17 = f32(
        0x3F3D7DF9, 0xBF63100C, 0x3F78F051, 0xBFB4BE21, 0xBEE394A7, 0x3EDD502B, 0x3EAD472B, 0xBFC3BB29,
        0x3FB9593F, 0xBFA005F2, 0x3FC348F2, 0xBFCC6333, 0x3E408686, 0xC01538EA, 0xC0159A93, 0x3F63E00E,
        0xBDEDFC22,
    )
    # fmt: on
    assert_bitwise_equal(g.randn((17,)), want17)
    assert_bitwise_equal(g.randn((1,)), f32(0xBFB08DEE))  # the sine cached by the (3,) draw
    big = g.randn((1, 4, 64, 64)).ravel()
    picked = big[[0, 1, 7, 8, 15, 16, 9999, 16383]]
    want_big = f32(0x3BC76D1F, 0x3F0ECD17, 0x3F0733AF, 0x3EF54468, 0xC00C136B, 0xC022D7F1, 0xBE827462, 0xBFB4F44C)
    assert_bitwise_equal(picked, want_big)
    assert_bitwise_equal(g.randn((2,)), f32(0xBF41D4D8, 0x3F579C37))


def test_cpu_cached_normal_survives_large_draws() -> None:
    a = TorchCpuGenerator(7)
    first = a.randn(1)  # draws one Box-Muller pair, caches its sine half
    a.randn((4, 8))  # the 16-wide path neither uses nor clears the cache
    b = TorchCpuGenerator(7)
    pair = b.randn(2)  # the same pair, both halves
    assert_bitwise_equal(first, pair[:1])
    assert_bitwise_equal(a.randn(1), pair[1:])


def test_cpu_seed_reduction_follows_torch() -> None:
    # at::mt19937 keeps the low 32 bits; manual_seed wraps negative seeds modulo 2**64.
    assert_bitwise_equal(TorchCpuGenerator(2**32 + 5).randn(40), TorchCpuGenerator(5).randn(40))
    assert_bitwise_equal(TorchCpuGenerator(-1).randn(40), TorchCpuGenerator(2**32 - 1).randn(40))
    assert TorchCpuGenerator(-1).seed == 2**64 - 1
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            TorchCpuGenerator(bad)
    with pytest.raises(TypeError):
        TorchCpuGenerator(1.5)  # type: ignore[arg-type]


def test_cpu_output_layout_and_empty_draws() -> None:
    g = TorchCpuGenerator(3)
    out = g.randn((2, 3, 5))
    assert out.dtype == np.float32 and out.shape == (2, 3, 5) and out.flags.c_contiguous
    assert g.randn(4).shape == (4,)
    assert g.randn((0, 4)).shape == (0, 4)
    # An empty draw consumes nothing.
    h = TorchCpuGenerator(3)
    h.randn((2, 3, 5))
    h.randn(4)
    assert_bitwise_equal(g.randn(20), h.randn(20))
    with pytest.raises(ValueError):
        g.randn((2, -1))
    with pytest.raises(ValueError):
        TorchCpuGenerator(0, kernel="neon")


def test_avx2_polynomials_track_exact_box_muller() -> None:
    # Guards the octant and sign logic on inputs the golden values may miss: u = 0 (radius 0),
    # u2 next to 1 (theta next to 2 pi), and every octant boundary of theta.
    edges = np.array([0.0, 2.0**-24, 0.5, 1 - 2.0**-24] + [k / 8 for k in range(8)], np.float64)
    grid = np.concatenate([edges, np.linspace(0, 1 - 2.0**-24, 4084)])
    uniform = (np.round(grid * 2**24) / 2**24).astype(np.float32)
    u1_grid, u2_grid = np.meshgrid(uniform[:64], uniform, indexing="ij")  # 64 x 4096 pairs
    blocks = np.concatenate([u1_grid.reshape(-1, 8), u2_grid.reshape(-1, 8)], axis=1)
    got = rng._box_muller16_avx2(blocks.ravel()).reshape(-1, 16)
    u1 = 1.0 - blocks[:, :8].astype(np.float64)
    theta = 2 * np.pi * blocks[:, 8:].astype(np.float64)
    radius = np.sqrt(-2 * np.log(u1))
    np.testing.assert_allclose(got[:, :8], radius * np.cos(theta), rtol=0, atol=5e-6)
    np.testing.assert_allclose(got[:, 8:], radius * np.sin(theta), rtol=0, atol=5e-6)


def test_cpu_draw_is_fast() -> None:
    g = TorchCpuGenerator(1)
    best = min(_timed(lambda: g.randn((1, 4, 64, 64))) for _ in range(5))
    assert best < 0.010, f"4x64x64 took {best * 1e3:.2f} ms"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# torch CPU generator, against torch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_matches_torch_on_interleaved_draws(torch, seed: int) -> None:
    kernel = torch_kernel(torch)
    ours = TorchCpuGenerator(seed, kernel=kernel)
    theirs = torch.Generator("cpu").manual_seed(seed)
    for shape in SHAPE_SEQUENCE:
        got, want = ours.randn(shape), torch_randn(torch, shape, theirs)
        if kernel == "avx2":
            assert_bitwise_equal(got, want)  # tolerance: exact, bit for bit
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=SCALAR_KERNEL_ATOL)


@pytest.mark.parametrize("seed", [2**32 + 7, 2**63 + 5, 2**64 - 1, -1, -123456789])
def test_cpu_matches_torch_for_out_of_32_bit_seeds(torch, seed: int) -> None:
    if torch_kernel(torch) != "avx2":
        pytest.skip("bitwise comparison needs torch's AVX2 kernel")
    ours = TorchCpuGenerator(seed)
    theirs = torch.Generator("cpu").manual_seed(seed)
    assert ours.seed == theirs.initial_seed()
    for shape in ((3,), (40,), (1, 4, 8, 8), (1,)):
        assert_bitwise_equal(ours.randn(shape), torch_randn(torch, shape, theirs))


def test_scalar_kernel_matches_torch_default_capability(torch, tmp_path: Path) -> None:
    # ATEN_CPU_CAPABILITY must be set before torch loads, hence a child process.
    script = (
        "import numpy as np, torch\n"
        "g = torch.Generator().manual_seed(114514)\n"
        "draw = lambda shape: torch.randn(shape, generator=g).numpy()\n"
        "cap = np.array(torch.backends.cpu.get_cpu_capability())\n"
        "np.savez(r'{out}', a=draw(3), b=draw(4100), c=draw((1, 4, 64, 64)), cap=cap)\n"
    ).format(out=tmp_path / "scalar.npz")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    want = np.load(tmp_path / "scalar.npz")
    assert str(want["cap"]) == "DEFAULT"
    g = TorchCpuGenerator(114514, kernel="scalar")
    assert_bitwise_equal(g.randn(3), want["a"])  # the double path is the C library's own: exact
    np.testing.assert_allclose(g.randn(4100), want["b"], rtol=0, atol=SCALAR_KERNEL_ATOL)
    np.testing.assert_allclose(g.randn((1, 4, 64, 64)), want["c"], rtol=0, atol=SCALAR_KERNEL_ATOL)


# ------------------------------------------------------------------------------------------------
# Philox4x32-10 and the "NV" source
# ------------------------------------------------------------------------------------------------

# Known-answer vectors "counter[4] key[2] -> output[4]". The first three are lines 27-29 of
# Random123's tests/kat_vectors (github.com/DEShawResearch/random123, commit 9545ff6); the other
# three are from Random123's examples/kat_vectors (as mirrored in github.com/girving/random123-manual).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
    ((1, 0, 0, 0), (1, 0), (0xAC08141B, 0xDFC5CCBE, 0x79C07A47, 0xA7F66093)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0, 0xFFFFFFFF),
        (0x08F7720C, 0x845EE9E0, 0x502CCD3D, 0xA9A00E27),
    ),
    ((0, 0, 0, 0x80000000), (0, 0x80000000), (0xF7A0B371, 0xE51DC93D, 0x56CE135D, 0x1D4B5580)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_known_answers(counter, key, expected) -> None:
    assert philox4x32_10(counter, key).tolist() == list(expected)


def test_philox_is_vectorized_over_counters_and_keys() -> None:
    counters = np.array([c for c, _, _ in PHILOX_KAT], np.uint32).T
    keys = np.array([k for _, k, _ in PHILOX_KAT], np.uint32).T
    expected = np.array([e for _, _, e in PHILOX_KAT], np.uint32).T
    out = philox4x32_10(counters, keys)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)


def _nv_value(seed: int, offset: int, index: int) -> float:
    """One "NV" value from the block function and the formula, in plain Python floats."""
    w0, w1, _, _ = philox4x32_10((offset, 0, index, 0), (seed & 0xFFFFFFFF, seed >> 32)).tolist()
    v_step = float(np.float32(2 * math.pi)) * 2.0**-32  # curand's float constant
    u = w0 * 2.0**-32 + 2.0**-33
    v = w1 * v_step + v_step / 2
    return math.sqrt(-2.0 * math.log(u)) * math.sin(v)


@pytest.mark.parametrize("seed", [0, 114514, 2**32 + 5, 2**64 - 1])
def test_philox_randn_follows_counter_layout_and_formula(seed: int) -> None:
    g = PhiloxGenerator(seed)
    for offset, shape in enumerate([(7,), (2, 3), (1,)]):
        got = g.randn(shape).ravel()
        want = np.array([_nv_value(seed, offset, i) for i in range(got.size)])
        # numpy's float64 log/sin against the C library's: the float32 results may differ by 1 ulp.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_philox_golden_values_from_a1111() -> None:
    # Produced by A1111's modules/rng_philox.py (commit ef1698f) under numpy 2.3: bit for bit.
    g = PhiloxGenerator(0)
    # fmt: off
    want = f32(
        0xBF6CB6AD, 0xBED9C6AF, 0xC02934C5, 0x3E14AB15, 0xBDF788DC, 0xBF1468E7, 0xBF1F732F, 0xBEA8225C,
        0xBF898A98, 0xBEB9EE06, 0xBFD5E4FB, 0x4010FE09,
    ).reshape(3, 4)
    # fmt: on
    assert_bitwise_equal(g.randn((3, 4)), want)
    assert_bitwise_equal(g.randn((5,)), f32(0x3E392A6C, 0xBF0D6117, 0x3F6C7F09, 0xBF3C2704, 0x3FB0A3AA))
    h = PhiloxGenerator(2**32 + 5)  # the seed's high word is the second key word
    h.randn((1,))
    want_h = f32(0x3FC3C9BC, 0xBE5C7DD6, 0x3D51F0E5, 0x3FCB4AB4, 0xBF725038, 0x3F586F99).reshape(2, 3)
    assert_bitwise_equal(h.randn((2, 3)), want_h)


def test_philox_matches_a1111_published_example() -> None:
    # The "Expected output" in A1111's rng_philox.py docstring (seed 0, shape (3, 4)). It was printed
    # with 8 decimals by an earlier revision (or on a GPU): today's A1111 code gives our bits exactly
    # and differs from these printed values by up to 2.6e-7.
    published = np.array(
        [
            [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
        ]
    )
    np.testing.assert_allclose(PhiloxGenerator(0).randn((3, 4)), published, rtol=0, atol=3e-7)


def test_philox_draw_is_fast() -> None:
    g = PhiloxGenerator(1)
    best = min(_timed(lambda: g.randn((1, 4, 64, 64))) for _ in range(5))
    assert best < 0.025, f"4x64x64 took {best * 1e3:.2f} ms"


def test_philox_matches_cuda_fixture() -> None:
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE.name} missing: make it on a CUDA machine with scripts/make_philox_fixture.py")
    fixture = np.load(FIXTURE)
    for seed in (int(s) for s in fixture["seeds"]):
        g = PhiloxGenerator(seed)
        k = 0
        while f"s{seed}_c{k}" in fixture:
            want = fixture[f"s{seed}_c{k}"]
            got = g.randn(want.shape)
            # curand computes in float32 (uint -> float rounding, logf, the __sincosf intrinsic), A1111
            # in float64. A float32 model of curand (without __sincosf's own error) differs from this
            # emulation by 8e-8 on average and 1.6e-5 at most over 1M values; the bounds below leave
            # room for the intrinsic and are estimates until a fixture has been recorded.
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"seed {seed}, call {k}")
            assert np.abs(got - want).mean() < 5e-6
            k += 1


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------


def test_make_generator_kinds() -> None:
    cpu = make_generator("cpu", 5)
    nv = make_generator("nv", 5)
    assert isinstance(cpu, TorchCpuGenerator) and isinstance(nv, PhiloxGenerator)
    assert_bitwise_equal(cpu.randn(20), TorchCpuGenerator(5).randn(20))
    assert_bitwise_equal(nv.randn(20), PhiloxGenerator(5).randn(20))


@pytest.mark.parametrize("kind", ["gpu", "CPU", "", "philox"])
def test_make_generator_rejects_unknown_kinds(kind: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_generator(kind, 1)
    assert info.value.field == "rng"


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "7"])
def test_make_generator_rejects_bad_seeds(seed) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_generator("cpu", seed)
    assert info.value.field == "seed"
