"""Run each exported graph in ONNX Runtime on the validation inputs and compare with torch.

Error measure: the largest absolute difference divided by max(1, largest absolute reference
value), so that one tolerance serves outputs of unit scale (UNet noise, VAE pixels) and CLIP
hidden states whose outliers reach tens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.graphs import GraphSpec, ValidationCase
from runtime.graphs.model_folder import ONNX_DTYPES

log = logging.getLogger(__name__)

Runner = Callable[[dict[str, np.ndarray], str | None], np.ndarray]  # (inputs, output name or None: the first)

# fp32 graphs differ from torch by float rounding only (measured ~1e-6 on the tiny model and
# ~1e-5 on the full-size UNet); fp16 graphs round every activation to 11 bits.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
# What a graph that misses its tolerance is rebuilt without, in this order, before an fp16 graph
# falls back to fp32: (name recorded in the manifest, onnxruntime FusionOptions attributes). Packed
# Q/K/V and K/V are what send attention to the flash and memory-efficient kernels; without any
# attention fusion the graph keeps plain MatMul/Softmax, which no kernel choice changes.
FUSION_FALLBACKS = (
    ("packed_qkv", ("enable_packed_qkv", "enable_packed_kv")),
    ("attention", ("enable_attention",)),
)


@dataclass
class ValidationResult:
    graph: str
    precision: str
    max_abs_error: float
    relative_error: float
    tolerance: float
    finite: bool
    provider: str
    working_relative_error: float | None = None  # the cases at the runtime's working size; None: not run

    @property
    def passed(self) -> bool:
        return self.finite and self.relative_error <= self.tolerance


def available_provider(target: str) -> str:
    if target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def next_fallback(result: ValidationResult, disabled: tuple[str, ...], enabled: Iterable[str]) -> str | None:
    """The next FUSION_FALLBACKS step for a graph that failed validation: the first one whose
    fusions are on in this build (`enabled`: FusionOptions attributes on for the target and
    precision) and not yet turned off. None when the graph passed, overflowed (non-finite: a
    matter for the precision fallback) or nothing is left to try."""
    if result.passed or not result.finite:
        return None
    on = set(enabled) - set(disabled)
    return next((name for name, attributes in FUSION_FALLBACKS if on & set(attributes)), None)


def fallback_attributes(name: str) -> tuple[str, ...]:
    return dict(FUSION_FALLBACKS)[name]


def validate_graph(
    path: Path, spec: GraphSpec, precision: str, provider: str, working: bool = False
) -> ValidationResult:
    """`working` adds the spec's working-size cases (run where the target's provider is, so the
    kernels ORT picks at that size are the ones measured)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    values = [*session.get_inputs(), *session.get_overridable_initializers()]
    input_types = {item.name: ONNX_DTYPES[item.type] for item in values}

    def run(inputs: dict[str, np.ndarray], output: str | None) -> np.ndarray:
        feed = {name: value.astype(input_types[name]) for name, value in inputs.items()}
        names = None if output is None else [output]
        return session.run(names, feed)[0].astype(np.float32)

    return compare_cases(spec, precision, run, provider, TOLERANCE, spec.working_cases if working else [])


def measure(cases: list[ValidationCase], run: Runner) -> tuple[float, float, bool]:
    """(worst absolute error, worst relative error, all finite) of `run` against torch on `cases`."""
    worst_abs, worst_rel, finite = 0.0, 0.0, True
    for case in cases:
        output = run(case.inputs, case.output)
        finite = finite and bool(np.isfinite(output).all())
        error = float(np.abs(output - case.reference).max())
        scale = max(1.0, float(np.abs(case.reference).max()))
        worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, error / scale)
    return worst_abs, worst_rel, finite


def compare_cases(
    spec: GraphSpec,
    precision: str,
    run: Runner,
    provider: str,
    tolerances: dict[str, float],
    working: list[ValidationCase] | None = None,
) -> ValidationResult:
    """Run every validation case (and the `working` ones) through `run`; the worst error against torch."""
    worst_abs, worst_rel, finite = measure(spec.cases, run)
    working_rel = None
    if working:
        working_abs, working_rel, working_finite = measure(working, run)
        worst_abs, worst_rel, finite = (
            max(worst_abs, working_abs),
            max(worst_rel, working_rel),
            finite and working_finite,
        )
    result = ValidationResult(
        spec.name, precision, worst_abs, worst_rel, tolerances[precision], finite, provider, working_rel
    )
    log.info(
        "%s (%s) vs torch: max abs error %.3g, relative %.3g%s (tolerance %.0e)%s",
        spec.name,
        precision,
        worst_abs,
        worst_rel,
        "" if working_rel is None else f", at working size {working_rel:.3g}",
        result.tolerance,
        "" if finite else ", NON-FINITE output",
    )
    return result
