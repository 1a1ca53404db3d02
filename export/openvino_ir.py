"""`--target openvino`: the plain torch.onnx graph (no onnxruntime fusions: OpenVINO does its own)
converted to OpenVINO IR, validated against torch through OpenVINO itself.

fp16 means fp16-compressed weights (`save_model(compress_to_fp16=True)`): half the file, and the
runtime's inference precision (bf16 where the CPU has it, else f32) decides the arithmetic.
`--quantize int8` runs NNCF on the converted model before it is saved (export/quantize.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.graphs import GraphSpec
from export.validate import TOLERANCE, ValidationResult, compare_cases
from runtime.graphs.model_folder import IR_BIN, METADATA_PREFIX

log = logging.getLogger(__name__)

RT_INFO_ROOT = METADATA_PREFIX.rstrip(".")  # rt_info path ["acertain_onnx", key]
VALIDATION_DEVICE = "CPU"


def convert(
    fp32_path: Path,
    spec: GraphSpec,
    precision: str,
    ir_path: Path,
    compute: str,
    quantization: tuple[str, Callable[[Any], Any]] | None = None,
) -> list[str]:
    """Convert the exported ONNX graph (its external weights are read from beside it) and save it as
    IR: ir_path (.xml) and its .bin. `quantization`: (mode, the ov.Model transform that applies it).
    Returns the file names written."""
    import openvino as ov

    model = ov.convert_model(str(fp32_path))
    metadata = {"graph": spec.name, "precision": precision, "compute": compute}
    if quantization is not None:
        mode, transform = quantization
        model = transform(model)
        metadata["quantization"] = mode
    for key, value in metadata.items():
        model.set_rt_info(value, [RT_INFO_ROOT, key])
    ir_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(ir_path), compress_to_fp16=precision == "fp16")
    return [ir_path.name, IR_BIN]


def validate(ir_path: Path, spec: GraphSpec, precision: str, tolerance: float | None = None) -> ValidationResult:
    """Run the IR on OpenVINO's CPU device at f32 inference precision (the graph itself, not a
    precision hint, is what the export vouches for) on the torch validation cases. `tolerance`
    replaces the precision's own (quantized graphs: export/quantize.py)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(ir_path), VALIDATION_DEVICE, {"INFERENCE_PRECISION_HINT": "f32"})
    types = {name: port.get_element_type().to_dtype() for port in compiled.inputs for name in port.get_names()}

    def run(inputs: dict[str, np.ndarray], output: str | None) -> np.ndarray:
        feed = {name: value.astype(types[name]) for name, value in inputs.items()}
        results = compiled(feed)
        return np.asarray(results[0] if output is None else results[compiled.output(output)], dtype=np.float32)

    tolerances = TOLERANCE if tolerance is None else {precision: tolerance}
    return compare_cases(spec, precision, run, f"OpenVINO {ov.__version__} {VALIDATION_DEVICE} f32", tolerances)


def read(ir_path: Path) -> Any:
    import openvino as ov

    return ov.Core().read_model(str(ir_path))


def describe(ir_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Inputs and outputs (name, dtype, shape with -1 for dynamic axes) and our rt_info entries."""
    model = read(ir_path)

    def values(ports) -> list[dict[str, Any]]:
        return [
            {
                "name": port.any_name,
                "dtype": port.get_element_type().to_dtype().name,
                "shape": [dim.get_length() if dim.is_static else -1 for dim in port.get_partial_shape()],
            }
            for port in ports
        ]

    metadata = {}
    for key in ("graph", "precision", "compute", "quantization"):
        if model.has_rt_info([RT_INFO_ROOT, key]):
            metadata[key] = model.get_rt_info([RT_INFO_ROOT, key]).astype(str)
    return values(model.inputs), values(model.outputs), metadata
