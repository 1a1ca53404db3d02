#!/usr/bin/env python
"""A/B timing of one UNet step in two exports, alternated in one process so that the drift of a
shared machine hits both alike (bench.py times each system in its own process, minutes apart).

    python scripts/unet_ab.py OLD_EXPORT NEW_EXPORT [ROUNDS]

Used for issue 23: the export without ControlNet residual inputs (OLD) against one whose UNet takes
them, fed zeros as every txt2img without ControlNet does (NEW). Batch 2 (CFG), 256 px, 77 tokens,
onnxruntime CPU provider.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from runtime import Pipeline


def main(old: str, new: str, rounds: int) -> None:
    steps = {}
    rng = np.random.default_rng(0)
    context = rng.standard_normal((2, 77, 768), dtype=np.float32)
    sample = rng.standard_normal((2, 4, 32, 32), dtype=np.float32)
    timestep = np.full((2,), 500.0, dtype=np.float32)
    for tag, folder in (("old", old), ("new", new)):
        unet = Pipeline.from_pretrained(folder, provider="cpu").sessions.unet
        print(tag, "takes residuals:", unet.takes_residuals)
        steps[tag] = unet.bind(context, sample.shape)
        steps[tag](sample, timestep)  # warm-up
    times: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(rounds):
        for tag in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            steps[tag](sample, timestep)
            times[tag].append(time.perf_counter() - start)
    for tag, samples in times.items():
        print(f"{tag} median {statistics.median(samples):.3f} s:", " ".join(f"{x:.3f}" for x in samples))
    print(f"new/old {statistics.median(times['new']) / statistics.median(times['old']):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8)
