"""Record torch.randn on an NVIDIA GPU, as a fixture for runtime.sampling.rng.PhiloxGenerator ("NV" noise).

Run on a machine with CUDA and torch (from the repository root):

    python scripts/make_philox_fixture.py            # writes tests/data/philox_cuda_fixture.npz

For every seed, one CUDA generator makes the successive draws in CALLS, so the fixture also checks
how the Philox offset advances between calls. Array "s{seed}_c{k}" is the k-th draw for that seed;
its shape is the shape that was drawn. tests/test_rng.py replays the same calls.

Every shape here has fewer elements than the GPU has threads in one full wave (SMs x 2048), the
regime in which torch gives each element its own Philox block, and which A1111's emulation assumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

SEEDS = (0, 1, 114514, 2**32 - 2, 2**32 + 5, 3141592653)
CALLS = ((1, 4, 64, 64), (3,), (1, 4, 96, 64), (17,), (2, 4, 8, 8))
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "philox_cuda_fixture.npz"


def record(seeds: tuple[int, ...], calls: tuple[tuple[int, ...], ...]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"seeds": np.array(seeds, np.uint64)}
    for seed in seeds:
        generator = torch.Generator("cuda").manual_seed(seed)
        for k, shape in enumerate(calls):
            noise = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float32)
            arrays[f"s{seed}_c{k}"] = noise.cpu().numpy()
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this fixture must come from an NVIDIA GPU")
    arrays = record(SEEDS, CALLS)
    arrays["device"] = np.array(torch.cuda.get_device_name())
    arrays["torch_version"] = np.array(torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({len(SEEDS)} seeds x {len(CALLS)} calls) on {arrays['device']}")


if __name__ == "__main__":
    main()
