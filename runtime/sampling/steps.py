"""What every sampler loop shares with the pipeline: the noise source, the step callback (progress,
interrupts and inpainting's blend, which may hand back a new x) and the float32 that x is kept in
between steps, as torch keeps it in the references."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NoiseSource = Callable[[], np.ndarray]
"""A fresh standard-normal array shaped like x, drawn from the per-image seeded generators."""
StepCallback = Callable[[int, np.ndarray], np.ndarray | None]
"""Called after each step with (step_index, x); may raise to stop the run, or return a new x."""


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def notify(callback: StepCallback | None, i: int, x: np.ndarray) -> np.ndarray:
    """x after step i's callback, in float32: the callback may return a replacement for x
    (inpainting blends the known latents in)."""
    replaced = callback(i, x) if callback is not None else None
    return as_f32(x if replaced is None else replaced)
