"""OpenVINO sessions (`provider="openvino"`): the IR graphs of a `--target openvino` export run by
OpenVINO's own runtime, behind the same interface as the onnxruntime sessions, so the pipeline
(samplers, RNG, prompts, every mode) does not know which one it drives.

Inference precision: bf16 where the CPU reports BF16 among its optimization capabilities (OpenVINO's
own default there), f32 otherwise; other devices keep their default (GPU: f16). OpenVINO's model
cache (CACHE_DIR) keeps each compiled graph so that later loads skip compilation; it lives under the
same folder as onnxruntime's saved optimized graphs (see sessions.cache_root).

Memory: after a graph's first inference the pages of its mapped IR (or cache blob) are given back,
so that one copy of the weights stays resident, OpenVINO's own (mapped_files.py says why).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError, ModelFolderError
from . import mapped_files
from .model_folder import METADATA_PREFIX, UNET_CONTEXT, UNET_SAMPLE, UNET_TIMESTEP, GraphInfo
from .residuals import ResidualInputs, ResidualsMixin

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "f16", "f32")
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")  # OpenVINO's device combinators, passed through
RT_INFO_TAILS = (8192, 2**20)  # bytes read from the end of the IR's XML, where our rt_info block sits
_RT_INFO = re.compile(r"<(\w+) value=\"([^\"]*)\" />")


def openvino_available() -> bool:
    """Whether the openvino package imports (a broken or shadowed install counts as missing)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise InvalidRequestError(
            "provider", "OpenVINO is not installed: pip install 'acertain-onnx[openvino]'"
        ) from None
    return openvino


def check_device(core: Any, device: str) -> None:
    """A device OpenVINO cannot see is one clear error naming the ones it can."""
    available = list(core.available_devices)
    families = {name.split(".")[0] for name in available}
    if device.split(":")[0] in VIRTUAL_DEVICES or device in available or device.split(".")[0] in families:
        return
    raise InvalidRequestError(
        "device", f"OpenVINO has no device {device!r} on this machine; available: {', '.join(available) or 'none'}"
    )


def resolve_precision(core: Any, device: str, requested: str) -> str | None:
    """The inference precision hint to pass; None leaves the device's default."""
    if requested not in PRECISIONS:
        raise InvalidRequestError(
            "inference_precision", f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if requested != "auto":
        return requested
    if device != "CPU":
        return None
    return "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


def read_graph_metadata(path: Path) -> dict[str, str]:
    """Our rt_info entries (graph, precision, compute, quantization) from the tail of the IR's XML,
    without parsing the whole graph (a full-size UNet's XML is megabytes). OpenVINO writes rt_info
    last, its sections in name order, so NNCF's (after ours; tens of KB for a quantized UNet, it
    lists the layers it skipped) can push ours out of a short tail: then a longer one is read."""
    root = METADATA_PREFIX.rstrip(".")
    size = path.stat().st_size
    for tail in RT_INFO_TAILS:
        with path.open("rb") as handle:
            handle.seek(max(0, size - tail))
            text = handle.read().decode("utf-8", errors="replace")
        block = re.search(rf"<{root}>(.*?)</{root}>", text, re.DOTALL)
        if block:
            return dict(_RT_INFO.findall(block.group(1)))
        if tail >= size:
            break
    return {}


class OpenVINOGraph:
    """One compiled IR graph with one reusable infer request; returns float32 copies."""

    def __init__(self, core: Any, info: GraphInfo, device: str, properties: dict[str, Any]) -> None:
        self.info = info
        self._check_metadata()
        # What compiling maps of the weights: the IR's .bin, or the model-cache blob it imports instead.
        folders = (info.path.parent, *([Path(properties["CACHE_DIR"])] if "CACHE_DIR" in properties else []))
        before = mapped_files.mapped_files(folders)
        try:
            self.compiled = core.compile_model(str(info.path), device, properties)
        except RuntimeError as error:
            raise ModelFolderError(f"{info.path} could not be compiled by OpenVINO for {device}: {error}") from None
        self._mapped = mapped_files.mapped_files(folders) - before
        self._released = False
        self.request = self.compiled.create_infer_request()
        self.input_types = {
            name: port.get_element_type().to_dtype() for port in self.compiled.inputs for name in port.get_names()
        }
        self._check_inputs()

    def _check_metadata(self) -> None:
        written = read_graph_metadata(self.info.path)
        if "precision" not in written:
            raise ModelFolderError(f"{self.info.path} was not written by `python -m export --target openvino`")
        if written.get("graph") != self.info.name:
            raise ModelFolderError(
                f"{self.info.path} is the {written.get('graph')} graph, not the {self.info.name} graph"
            )
        if written["precision"] != self.info.precision:
            raise ModelFolderError(
                f"{self.info.path} is an {written['precision']} graph but the manifest says {self.info.precision}: "
                "the folder mixes graphs of different exports; re-export it"
            )
        if written.get("quantization") != self.info.quantization:
            written_mode, manifest_mode = written.get("quantization", "unquantized"), self.info.quantization
            raise ModelFolderError(
                f"{self.info.path} is {written_mode} but the manifest says {manifest_mode or 'unquantized'}: "
                "the folder mixes graphs of different exports; re-export it"
            )

    def _check_inputs(self) -> None:
        for name, dtype in self.info.inputs.items():
            if name not in self.input_types:
                raise ModelFolderError(f"{self.info.path} has no input {name!r}, which the manifest lists")
            if self.input_types[name].name != dtype:
                raise ModelFolderError(
                    f"{self.info.path}: input {name} is {self.input_types[name].name} but the manifest says {dtype}"
                )

    def feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(value, dtype=self.input_types[name]) for name, value in inputs.items()}

    def infer(self, feed: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
        """The output named `output` (None: the first)."""
        self.request.infer(feed, share_inputs=True)
        if not self._released:  # the plugin has its own copy of the weights now
            mapped_files.release(self._mapped)
            self._released = True
        tensor = self.request.get_output_tensor(0) if output is None else self.request.get_tensor(output)
        return np.array(tensor.data, dtype=np.float32, copy=True)

    def run(self, inputs: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
        return self.infer(self.feed(inputs), output)

    def release_memory(self, inputs: dict[str, np.ndarray], device_id: int = 0) -> None:
        """OpenVINO keeps no growing arena like onnxruntime's (the server's memory release after
        large jobs calls this on every graph); what a new input shape read again of the mapped
        weights goes back."""
        mapped_files.release(self._mapped)


class OpenVINOUNet(ResidualsMixin, OpenVINOGraph):
    """The per-step call: the conditioning is fed once per generation, each step only the latents
    (and a ControlNet's residuals, else the zeros kept per shape: see residuals.py)."""

    def __init__(self, core: Any, info: GraphInfo, device: str, properties: dict[str, Any]) -> None:
        super().__init__(core, info, device, properties)
        self.residual_inputs = ResidualInputs(info, self.input_types)

    def bind(self, context: np.ndarray, sample_shape: tuple[int, ...]) -> Callable[..., np.ndarray]:
        """The step function for this conditioning (see UNetSession.bind)."""
        return partial(self._run, self.feed({UNET_CONTEXT: context})[UNET_CONTEXT])

    def _run(
        self,
        context: np.ndarray,
        sample: np.ndarray,
        timestep: np.ndarray,
        residuals: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        feed = self.feed({UNET_SAMPLE: sample, UNET_TIMESTEP: timestep})
        feed[UNET_CONTEXT] = context
        feed.update(self.residual_inputs.feed(residuals, sample.shape))
        return self.infer(feed)


def compile_properties(
    threads: int | None, precision: str | None, cache_dir: Path | None, device: str
) -> dict[str, Any]:
    properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        properties["INFERENCE_PRECISION_HINT"] = precision
    if threads and device == "CPU":
        properties["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        properties["CACHE_DIR"] = str(cache_dir)
    return properties


def make_core(device: str) -> Any:
    openvino = import_openvino()
    core = openvino.Core()
    check_device(core, device)
    return core


def cache_folder(root: Path) -> Path | None:
    """OpenVINO's model cache: <root>/openvino (OpenVINO keys each blob by graph, device and
    properties itself); None when turned off or not writable."""
    if os.environ.get("ACERTAIN_ONNX_OPTIMIZED_CACHE", "1") == "0":
        return None
    folder = root / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("OpenVINO model cache off: %s", error)
        return None
    return folder
