"""Run each exported graph in ONNX Runtime on the validation inputs and compare with torch.

Error measure: the largest absolute difference divided by max(1, largest absolute reference
value), so that one tolerance serves outputs of unit scale (UNet noise, VAE pixels) and CLIP
hidden states whose outliers reach tens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.graphs import GraphSpec
from runtime.graphs.model_folder import ONNX_DTYPES

log = logging.getLogger(__name__)

# fp32 graphs differ from torch by float rounding only (measured ~1e-6 on the tiny model and
# ~1e-5 on the full-size UNet); fp16 graphs round every activation to 11 bits.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}


@dataclass
class ValidationResult:
    graph: str
    precision: str
    max_abs_error: float
    relative_error: float
    tolerance: float
    finite: bool
    provider: str

    @property
    def passed(self) -> bool:
        return self.finite and self.relative_error <= self.tolerance


def available_provider(target: str) -> str:
    if target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def validate_graph(path: Path, spec: GraphSpec, precision: str, provider: str) -> ValidationResult:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    values = [*session.get_inputs(), *session.get_overridable_initializers()]
    input_types = {item.name: ONNX_DTYPES[item.type] for item in values}

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: value.astype(input_types[name]) for name, value in inputs.items()}
        return session.run(None, feed)[0].astype(np.float32)

    return compare_cases(spec, precision, run, provider, TOLERANCE)


def compare_cases(
    spec: GraphSpec,
    precision: str,
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    provider: str,
    tolerances: dict[str, float],
) -> ValidationResult:
    """Run every validation case through `run` and measure the worst error against torch."""
    worst_abs, worst_rel, finite = 0.0, 0.0, True
    for case in spec.cases:
        output = run(case.inputs)
        finite = finite and bool(np.isfinite(output).all())
        error = float(np.abs(output - case.reference).max())
        scale = max(1.0, float(np.abs(case.reference).max()))
        worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, error / scale)
    result = ValidationResult(spec.name, precision, worst_abs, worst_rel, tolerances[precision], finite, provider)
    log.info(
        "%s (%s) vs torch: max abs error %.3g, relative %.3g (tolerance %.0e)%s",
        spec.name,
        precision,
        worst_abs,
        worst_rel,
        result.tolerance,
        "" if finite else ", NON-FINITE output",
    )
    return result
