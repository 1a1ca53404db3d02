"""ONNX Runtime sessions for the exported graphs: provider choice, session options, dtype checks
against the manifest, and the UNet's per-step call (IO binding on CUDA).

Sessions are created once per Pipeline and reused for every request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InvalidRequestError, ModelFolderError
from .model_folder import (
    ONNX_DTYPES,
    UNET_CONTEXT,
    UNET_OUTPUT,
    UNET_SAMPLE,
    UNET_TIMESTEP,
    GraphInfo,
    Manifest,
)

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_warned_cpu_fallback = False


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are made. `threads` None lets onnxruntime use one thread per physical core.
    `optimized_cache` saves the graph ORT optimized at load (next loads skip that work)."""

    provider: str = "auto"
    threads: int | None = None
    cuda_graph: bool = False
    optimized_cache: bool = False
    device_id: int = 0


def resolve_provider(requested: str) -> str:
    """ "auto" takes CUDA when onnxruntime-gpu can use it and falls back to the CPU (with one
    warning, see warn_cpu_fallback); an explicit "cuda" that cannot be had is an error rather than
    a silently slow run."""
    if requested not in PROVIDERS:
        raise InvalidRequestError("provider", f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if requested == "cpu":
        return CPU
    if CUDA in available:
        return CUDA
    if requested == "cuda":
        raise InvalidRequestError(
            "provider",
            "the CUDA execution provider is not available (install onnxruntime-gpu instead of onnxruntime, "
            "with CUDA and cuDNN libraries that match it)",
        )
    return CPU


def warn_cpu_fallback(requested: str, provider: str) -> None:
    """Once per process, after the model loaded (so a bad folder's error stays the only line)."""
    global _warned_cpu_fallback
    if requested == "auto" and provider == CPU and not _warned_cpu_fallback:
        log.warning("CUDA execution provider not available; running on the CPU (much slower)")
        _warned_cpu_fallback = True


def session_options(config: SessionConfig, graph_path: Path, provider: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if config.threads:
        options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    if config.optimized_cache:
        cache = graph_path.with_name(f"model.{provider_tag(provider)}.ort-optimized.onnx")
        if cache.is_file():
            # Already optimized for this provider: skip the optimization pass at load.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            options.optimized_model_filepath = str(cache)
    return options


def provider_tag(provider: str) -> str:
    return "cuda" if provider == CUDA else "cpu"


def provider_list(provider: str, config: SessionConfig) -> list:
    if provider == CUDA:
        cuda_options = {"device_id": config.device_id, "enable_cuda_graph": "1" if config.cuda_graph else "0"}
        return [(CUDA, cuda_options), CPU]
    return [CPU]


class GraphSession:
    """One graph: checks its input dtypes against the manifest, casts inputs, returns float32."""

    def __init__(self, info: GraphInfo, provider: str, config: SessionConfig) -> None:
        self.info = info
        self.provider = provider
        path = info.path
        if (
            config.optimized_cache
            and (cache := path.with_name(f"model.{provider_tag(provider)}.ort-optimized.onnx")).is_file()
        ):
            path = cache
        try:
            self.session = ort.InferenceSession(
                str(path),
                session_options(config, info.path, provider),
                providers=provider_list(provider, config),
            )
        except Exception as error:  # onnxruntime raises its own exception types for bad graphs
            raise ModelFolderError(f"{info.path} could not be loaded by onnxruntime: {error}") from None
        self.input_types = {item.name: ONNX_DTYPES.get(item.type, item.type) for item in self.session.get_inputs()}
        self.output_names = [item.name for item in self.session.get_outputs()]
        self._check_against_manifest()

    def _check_against_manifest(self) -> None:
        declared = {**self.info.inputs}
        if set(declared) != set(self.input_types):
            raise ModelFolderError(
                f"{self.info.path} has inputs {sorted(self.input_types)} but the manifest lists {sorted(declared)}"
            )
        for name, dtype in declared.items():
            if self.input_types[name] != dtype:
                raise ModelFolderError(
                    f"{self.info.path}: input {name} is {self.input_types[name]} but the manifest says {dtype} "
                    f"({self.info.precision} graph); the folder mixes graphs of different precisions, re-export it"
                )

    def feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(value, dtype=self.input_types[name]) for name, value in inputs.items()}

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, self.feed(inputs))[0].astype(np.float32, copy=False)


class UNetSession(GraphSession):
    """The per-step call. On CUDA the text conditioning is uploaded once per generation and the
    output buffer is preallocated on the device (IO binding), so each step moves only the small
    latent tensor; with CUDA graphs on, all buffers keep fixed addresses so ORT replays the step."""

    def __init__(self, info: GraphInfo, provider: str, config: SessionConfig) -> None:
        super().__init__(info, provider, config)
        self.cuda_graph = config.cuda_graph and provider == CUDA
        self.device_id = config.device_id
        self._bound_shapes: tuple | None = None
        self._binding: ort.IOBinding | None = None
        self._device_values: dict[str, ort.OrtValue] = {}

    def begin(self, context: np.ndarray, sample_shape: tuple[int, ...]) -> None:
        """Prepare for a run of steps with this conditioning and latent shape."""
        if self.provider != CUDA:
            self._context = self.feed({UNET_CONTEXT: context})[UNET_CONTEXT]
            return
        context = self.feed({UNET_CONTEXT: context})[UNET_CONTEXT]
        shapes = (context.shape, sample_shape)
        if self.cuda_graph and self._bound_shapes not in (None, shapes):
            raise InvalidRequestError(
                "size",
                "CUDA graphs are on and this session was captured for another size or batch; use one size per pipeline",
            )
        if self._binding is None or self._bound_shapes != shapes:
            self._bind(context, sample_shape)
        else:
            self._device_values[UNET_CONTEXT].update_inplace(context)
        self._bound_shapes = shapes

    def _bind(self, context: np.ndarray, sample_shape: tuple[int, ...]) -> None:
        batch = sample_shape[0]
        values = {
            UNET_CONTEXT: context,
            UNET_SAMPLE: np.zeros(sample_shape, dtype=self.input_types[UNET_SAMPLE]),
            UNET_TIMESTEP: np.zeros((batch,), dtype=self.input_types[UNET_TIMESTEP]),
        }
        binding = self.session.io_binding()
        self._device_values = {}
        for name, array in values.items():
            device_value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            self._device_values[name] = device_value
            binding.bind_ortvalue_input(name, device_value)
        output_dtype = self.input_types[UNET_SAMPLE]
        output = ort.OrtValue.ortvalue_from_shape_and_type(sample_shape, output_dtype, "cuda", self.device_id)
        self._device_values[UNET_OUTPUT] = output
        binding.bind_ortvalue_output(UNET_OUTPUT, output)
        self._binding = binding

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        if self.provider != CUDA:
            feed = self.feed({UNET_SAMPLE: sample, UNET_TIMESTEP: timestep})
            feed[UNET_CONTEXT] = self._context
            return self.session.run(None, feed)[0].astype(np.float32, copy=False)
        inputs = self.feed({UNET_SAMPLE: sample, UNET_TIMESTEP: timestep})
        self._device_values[UNET_SAMPLE].update_inplace(inputs[UNET_SAMPLE])
        self._device_values[UNET_TIMESTEP].update_inplace(inputs[UNET_TIMESTEP])
        self.session.run_with_iobinding(self._binding)
        return self._device_values[UNET_OUTPUT].numpy().astype(np.float32, copy=False)


@dataclass
class Sessions:
    text_encoder: GraphSession
    unet: UNetSession
    vae_decoder: GraphSession
    provider: str


def load_sessions(manifest: Manifest, config: SessionConfig) -> Sessions:
    provider = resolve_provider(config.provider)
    target = manifest.raw.get("target", "cpu")
    if target == "cuda" and provider == CPU:
        raise ModelFolderError(
            f"{manifest.folder} was exported with --target cuda (GPU-only fused ops) and cannot run on the CPU "
            "provider; re-export with --target cpu for CPU use"
        )
    if config.threads is None and provider == CPU:
        log.debug("onnxruntime picks intra-op threads itself (%s logical CPUs)", os.cpu_count())
    sessions = Sessions(
        text_encoder=GraphSession(manifest.graphs["text_encoder"], provider, config),
        unet=UNetSession(manifest.graphs["unet"], provider, config),
        vae_decoder=GraphSession(manifest.graphs["vae_decoder"], provider, config),
        provider=provider,
    )
    warn_cpu_fallback(config.provider, provider)
    return sessions
