"""The exporter's choices, in a module that imports nothing heavy, so that `python -m export --help`
answers at once (torch, diffusers and onnx load only once an export runs)."""

from runtime.graphs.model_folder import PRECISIONS  # one list for the exporter and the runtime's manifest check

DEFAULT_MODEL = "JosephusCheung/ACertainThing"
TARGETS = ("cpu", "cuda", "openvino")  # openvino: model_folder.OPENVINO_TARGET
QUANTIZE = ("none", "int8")  # int8: --target openvino only (export/quantize.py)
__all__ = ["DEFAULT_MODEL", "PRECISIONS", "QUANTIZE", "TARGETS"]
