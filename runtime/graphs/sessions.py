"""ONNX Runtime sessions for the exported graphs: provider choice, session options, dtype checks
against the manifest, and the UNet's per-step call (IO binding on CUDA).

Sessions are created once per Pipeline and reused for every request.

A little over 500 lines on purpose: provider choice, session options, the optimized-graph cache
and the sessions themselves all turn on one SessionConfig and read as one story; the UNet's CUDA
buffers and graphs already live apart, in `io_binding.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnxruntime as ort

from ..errors import InvalidRequestError, ModelFolderError, OutOfMemoryError
from .io_binding import Binding, BindingPool, make_binding, run_bound
from .model_folder import (
    METADATA_PREFIX,
    ONNX_DTYPES,
    OPENVINO_TARGET,
    TEXT_INPUT,
    UNET_CONTEXT,
    UNET_SAMPLE,
    UNET_TIMESTEP,
    VAE_DECODER_INPUT,
    GraphInfo,
    Manifest,
)
from .residuals import ResidualInputs, ResidualsMixin

if TYPE_CHECKING:
    from .openvino_sessions import OpenVINOGraph, OpenVINOUNet

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cuda", "cpu", "openvino")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"  # run option: free unused arena chunks after the run
ALLOCATION_FAILURES = ("failed to allocate", "bad_alloc", "out of memory", "cudaerrormemoryallocation")
OPENVINO = "OpenVINO"  # not an onnxruntime provider: OpenVINO's own runtime (openvino_sessions)
CACHE_MIN_BYTES = 64 * 2**20  # smaller graphs optimize in well under a second: not worth a saved copy
# The ORT optimizers that turn fp16 weights into fp32 copies at load (CPU provider).
FP16_WEIGHT_FOLDS = ("FuseFp16InitializerToFp32NodeTransformer", "ConstantFolding")
# fp16 graphs whose weights stay fp16 on the CPU provider: the big-weight, low-arithmetic ones. The
# VAE decoder (95 MB in fp16) runs image-sized convolutions and is faster with fp32 copies.
LEAN_FP16_GRAPHS = ("text_encoder", "unet")


@dataclass
class InitializerOverrides:
    """Tensors that replace a graph's stored initializers when its session is built (LoRA-patched
    weights). onnxruntime takes them two ways: weights kept in the graph's external data file are
    swapped in as the graph loads (add_external_initializers), before any optimization; weights
    inside model.onnx only through add_initializer, which the CPU provider's NCHWc layout pass
    does not see (measured: a patched Conv weight had no effect at ORT_ENABLE_ALL), so that pass is
    switched off for such sessions. Full-size graphs keep their weights external: they keep NCHWc."""

    external: dict[str, np.ndarray] = field(default_factory=dict)
    inline: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.external) + len(self.inline)


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are made. `threads` None lets onnxruntime use one thread per physical core.
    `optimized_cache` (opt-in; CPU provider, fp32 graphs of at least 64 MiB): the first load saves the graph
    that ORT optimized (fusions, NCHWc convolution layout) under `cache_dir`, and later loads read it
    back instead of optimizing again (full-size UNet: 1 s instead of 6 s). `cache_dir` None means
    $ACERTAIN_ONNX_CACHE or ~/.cache/acertain-onnx/optimized; ACERTAIN_ONNX_OPTIMIZED_CACHE=0 turns
    the cache off. CUDA graphs, when asked for, are used by the UNet session only.
    `device` and `inference_precision` serve provider "openvino" only (OpenVINO device name, and
    "auto" | "bf16" | "f16" | "f32"; auto: bf16 where the CPU has it); its model cache is always on
    (folder <cache root>/openvino) unless ACERTAIN_ONNX_OPTIMIZED_CACHE=0."""

    provider: str = "auto"
    threads: int | None = None
    cuda_graph: bool = False
    optimized_cache: bool = False
    device_id: int = 0
    cache_dir: Path | None = None
    device: str = "CPU"
    inference_precision: str = "auto"


def resolve_provider(requested: str) -> str:
    """ "auto" takes CUDA when onnxruntime-gpu can use it and falls back to the CPU (which
    choose_provider's line says); an explicit "cuda" that cannot be had is an error rather than a
    silently slow run. "openvino" needs the `openvino` package (the openvino extra)."""
    if requested not in PROVIDERS:
        raise InvalidRequestError("provider", f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    if requested == "openvino":
        from .openvino_sessions import import_openvino

        import_openvino()
        return OPENVINO
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


def choose_provider(requested: str, target: str) -> tuple[str, str]:
    """The provider for an export of `target`, and why (the line the CLI and server print at start).
    "auto" on an OpenVINO export (its IR runs on OpenVINO alone) means OpenVINO, whose package must
    then be installed; on an ONNX export it means CUDA where onnxruntime-gpu can use it, else
    onnxruntime's CPU provider. So on a CPU the fast path is the export's choice: `--target openvino`
    with the openvino extra installed (README, "Which CPU path")."""
    if requested == "auto" and target == OPENVINO_TARGET:
        from .openvino_sessions import openvino_available

        if not openvino_available():
            raise InvalidRequestError(
                "provider",
                "this export is OpenVINO IR (--target openvino) and OpenVINO is not installed: "
                "pip install 'acertain-onnx[openvino]', or export with --target cpu for onnxruntime",
            )
        return resolve_provider("openvino"), "auto: an OpenVINO export, and the openvino package is installed"
    provider = resolve_provider(requested)
    if requested != "auto":
        return provider, "asked for"
    if provider == CUDA:
        return provider, "auto: onnxruntime-gpu can use a GPU"
    return provider, "auto: an ONNX export and no GPU (a --target openvino export runs faster on CPUs; README)"


def session_options(config: SessionConfig, provider: str, fp16_weights: bool = False) -> ort.SessionOptions:
    """Options for one graph. fp16 graphs on the CPU provider: the CPU has no fp16 convolution or
    matrix kernels, and by default ORT turns every fp16 weight into an fp32 copy at load (a full-size
    UNet then peaks at 5.9 GB, more than its fp32 graph's 3.5 GB). Those weight folds are switched
    off here (`cpu_lean_fp16`) so the weights stay fp16 in memory and each is cast just before use."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if config.threads:
        options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    if provider == CPU and fp16_weights:
        # Without a memory pattern each cast weight's buffer is reused as soon as it is consumed.
        options.enable_mem_pattern = False
    return options


def cpu_lean_fp16(graph_computes_fp16: bool) -> tuple[list[str], ort.ExecutionOrder]:
    """(disabled optimizers, execution order) that keep fp16 weights fp16 on the CPU provider.
    ORT schedules the casts it inserts around fp16 nodes just in time only in priority order; a
    graph that computes in fp32 from fp16 weights (its casts first in the node list) does so in
    the default order."""
    order = ort.ExecutionOrder.PRIORITY_BASED if graph_computes_fp16 else ort.ExecutionOrder.DEFAULT
    return list(FP16_WEIGHT_FOLDS), order


def provider_list(provider: str, config: SessionConfig, cuda_graph: bool | None = None) -> list:
    if provider == CUDA:
        graphs = config.cuda_graph if cuda_graph is None else cuda_graph
        cuda_options = {"device_id": config.device_id, "enable_cuda_graph": "1" if graphs else "0"}
        return [(CUDA, cuda_options), CPU]
    return [CPU]


# ---------------------------------------------------------------------------------------------
# saved optimized graphs (CPU)


def cache_root(config: SessionConfig) -> Path:
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    if os.environ.get("ACERTAIN_ONNX_CACHE"):
        return Path(os.environ["ACERTAIN_ONNX_CACHE"])
    return Path.home() / ".cache" / "acertain-onnx" / "optimized"


def _cpu_signature() -> str:
    """ORT's CPU-optimized graphs depend on the instruction set (the NCHWc block size follows the
    vector width), so a cache made on one processor is never read on another."""
    flags = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def _graph_files(path: Path) -> list[Path]:
    return [path, *(item for item in path.parent.glob("*.onnx_data") if item.is_file())]


class OptimizedCache:
    """One graph's saved optimized form: <root>/<key>/model.onnx (+ model.onnx.data), keyed by the
    graph's files (name, size, modification time), ORT's version and the processor. Written into
    a private folder and renamed into place, so concurrent first loads never see half a file."""

    def __init__(self, info: GraphInfo, config: SessionConfig) -> None:
        digest = hashlib.sha256(f"{info.sha256} ort={ort.__version__} cpu={_cpu_signature()}".encode())
        for item in _graph_files(info.path):
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        self.folder = cache_root(config) / f"{info.name}-{digest.hexdigest()[:20]}"
        self.graph = self.folder / "model.onnx"

    @staticmethod
    def wanted(info: GraphInfo, config: SessionConfig, provider: str, fp16_weights: bool) -> bool:
        if not config.optimized_cache or provider != CPU or fp16_weights:
            return False
        if os.environ.get("ACERTAIN_ONNX_OPTIMIZED_CACHE", "1") == "0":
            return False
        return sum(item.stat().st_size for item in _graph_files(info.path)) >= CACHE_MIN_BYTES

    def staging(self) -> Path | None:
        """A private folder to save into; None when the cache folder cannot be written."""
        staging = self.folder.with_name(f"{self.folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as error:
            log.warning("not saving the optimized %s graph: %s", self.folder.name, error)
            return None
        return staging

    def save_options(self, options: ort.SessionOptions, staging: Path) -> None:
        options.optimized_model_filepath = str(staging / "model.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")

    def commit(self, staging: Path) -> None:
        try:
            staging.rename(self.folder)
        except OSError:  # another process saved it first, or the folder cannot be written
            shutil.rmtree(staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class GraphSession:
    """One graph: checks its input dtypes against the manifest, casts inputs, returns float32."""

    use_cuda_graph = False  # CUDA graphs need IO binding and fixed shapes: the UNet session only
    lean_fp16 = False  # keep fp16 weights fp16 on the CPU provider whatever the graph's name (LEAN_FP16_GRAPHS)

    def __init__(
        self, info: GraphInfo, provider: str, config: SessionConfig, overrides: InitializerOverrides | None = None
    ) -> None:
        """`overrides` replace initializers by name when the session is built (LoRA-patched weights);
        such a session never uses or fills the optimized-graph cache, which holds the plain weights."""
        self.info = info
        self.provider = provider
        self.device_id = config.device_id
        overrides = overrides or InitializerOverrides()
        # onnxruntime reads these buffers for as long as the session lives.
        self._overrides = {
            kind: {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()}
            for kind, values in (("external", overrides.external), ("inline", overrides.inline))
        }
        fp16_weights = info.precision == "fp16" and (self.lean_fp16 or info.name in LEAN_FP16_GRAPHS)
        providers = provider_list(provider, config, self.use_cuda_graph and config.cuda_graph)
        wanted = not len(overrides) and OptimizedCache.wanted(info, config, provider, fp16_weights)
        cache = OptimizedCache(info, config) if wanted else None
        try:
            self.session = self._cached(cache, config, providers) if cache else None
            if self.session is None:
                self.session = self._create(info.path, config, providers, fp16_weights, cache)
        except Exception as error:  # onnxruntime raises its own exception types for bad graphs
            raise ModelFolderError(f"{info.path} could not be loaded by onnxruntime: {error}") from None
        # Inputs with a default (an initializer of the same name) are listed apart by onnxruntime.
        values = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.input_types = {item.name: ONNX_DTYPES.get(item.type, item.type) for item in values}
        self.output_names = [item.name for item in self.session.get_outputs()]
        self._check_against_manifest()

    def _create(
        self, path: Path, config: SessionConfig, providers: list, fp16_weights: bool, cache: OptimizedCache | None
    ) -> ort.InferenceSession:
        options = session_options(config, self.provider, fp16_weights)
        external, inline = self._overrides["external"], self._overrides["inline"]
        if external:
            options.add_external_initializers(list(external), list(external.values()))
        for name, value in inline.items():
            options.add_initializer(name, value)
        disabled: list[str] = []
        if self.provider == CPU and fp16_weights:
            disabled, options.execution_order = cpu_lean_fp16(self._computes_fp16())
        if inline:
            disabled.append("NchwcTransformer")
        staging = cache.staging() if cache is not None else None
        if cache is None or staging is None:
            return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
        cache.save_options(options, staging)
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # e.g. no space to save: load once more without saving
            log.warning("could not save the optimized %s graph (%s); loading it unsaved", self.info.name, error)
            shutil.rmtree(staging, ignore_errors=True)
            return ort.InferenceSession(str(path), session_options(config, self.provider), providers=providers)
        cache.commit(staging)
        return session

    def _cached(self, cache: OptimizedCache, config: SessionConfig, providers: list) -> ort.InferenceSession | None:
        """The saved optimized graph, loaded without optimizing again; None when there is none yet
        (or it cannot be read, in which case it is removed and made again)."""
        if not cache.graph.is_file():
            return None
        options = session_options(config, self.provider)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cache.graph), options, providers=providers)
        except Exception as error:
            log.warning("ignoring the saved optimized %s graph %s: %s", self.info.name, cache.folder, error)
            cache.discard()
            return None

    def _computes_fp16(self) -> bool:
        """Whether the graph reads or writes fp16 tensors (the exporter's fp16 graphs) rather than
        computing in fp32 from fp16 weights."""
        return "float16" in {*self.info.inputs.values(), *self.info.outputs.values()}

    def _check_against_manifest(self) -> None:
        """The graph must be the one the manifest describes. The exporter writes the graph's name
        and precision into it, which catches a graph swapped in from another export (an fp32 and
        an fp16-weight CPU graph have the same input dtypes) without hashing gigabytes."""
        metadata = self.session.get_modelmeta().custom_metadata_map
        written = {key: metadata.get(f"{METADATA_PREFIX}{key}") for key in ("graph", "precision")}
        if written["precision"] is None:
            raise ModelFolderError(f"{self.info.path} was not written by `python -m export` (no graph metadata)")
        if written["graph"] != self.info.name:
            raise ModelFolderError(f"{self.info.path} is the {written['graph']} graph, not the {self.info.name} graph")
        if written["precision"] != self.info.precision:
            raise ModelFolderError(
                f"{self.info.path} is an {written['precision']} graph but the manifest says {self.info.precision}: "
                "the folder mixes graphs of different exports; re-export it"
            )
        declared = self.info.inputs
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

    def run(self, inputs: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
        """The output named `output` (None: the first) as float32."""
        with self.memory_errors():
            names = None if output is None else [output]
            return self.session.run(names, self.feed(inputs))[0].astype(np.float32, copy=False)

    @contextlib.contextmanager
    def memory_errors(self) -> Iterator[None]:
        """onnxruntime's allocation failure (a multi-line traceback) as one OutOfMemoryError that
        says which memory ran out: the GPU's, or the system's on the CPU provider."""
        try:
            yield
        except Exception as error:
            text = str(error).lower()
            if not (isinstance(error, MemoryError) or any(sign in text for sign in ALLOCATION_FAILURES)):
                raise
            memory = f"GPU {self.device_id}" if self.provider == CUDA else "system memory (CPU provider)"
            raise OutOfMemoryError(f"the {self.info.name} ran out of {memory}; use a smaller size or batch") from None

    def release_memory(self, inputs: dict[str, np.ndarray], device_id: int = 0) -> None:
        """Run once on small inputs with arena shrinkage on: onnxruntime then frees the arena
        chunks that the last (large) run left unused instead of keeping them for the next one."""
        options = ort.RunOptions()
        arenas = "cpu:0" if self.provider == CPU else f"cpu:0;gpu:{device_id}"
        options.add_run_config_entry(ARENA_SHRINKAGE, arenas)
        self.session.run(None, self.feed(inputs), options)


class UNetStep(Protocol):
    """(sample, timestep, ControlNet residuals or None: zeros) -> noise prediction."""

    def __call__(
        self, sample: np.ndarray, timestep: np.ndarray, residuals: Sequence[np.ndarray] | None = None
    ) -> np.ndarray: ...


class UNetSession(ResidualsMixin, GraphSession):
    """The per-step call. On CUDA the text conditioning is uploaded once per generation and the
    output buffer is preallocated on the device (IO binding), so each step moves only the small
    latent tensor; with CUDA graphs on, each distinct shape keeps fixed buffers and its own captured
    graph (io_binding.py: how copies are ordered with ORT's stream, and the graph limit).
    ControlNet residuals (residuals.py) are further inputs: zeros unless a step is given a
    ControlNet's; bound once per shape on the device, copied only while a ControlNet runs."""

    use_cuda_graph = True

    def __init__(
        self, info: GraphInfo, provider: str, config: SessionConfig, overrides: InitializerOverrides | None = None
    ) -> None:
        super().__init__(info, provider, config, overrides)
        self.cuda_graph = config.cuda_graph and provider == CUDA
        self._bindings = BindingPool(self.cuda_graph)
        self.residual_inputs = ResidualInputs(info, self.input_types)

    def bind(self, context: np.ndarray, sample_shape: tuple[int, ...]) -> UNetStep:
        """The step function for this conditioning and latent shape. A step that needs two calls
        (cond and uncond of different lengths) holds two of these; on CUDA each keeps its own
        device buffers, reused by later generations of the same shapes."""
        context = self.feed({UNET_CONTEXT: context})[UNET_CONTEXT]
        if self.provider != CUDA:
            return partial(self._run, context)
        shapes = (context.shape, tuple(sample_shape))
        bound = self._bindings.get(shapes)
        if bound is None:
            bound = self._bind(context, shapes[1])
            self._bindings.add(shapes, bound)
        else:
            bound.values[UNET_CONTEXT].update_inplace(context)  # ordered by the step's synchronize_inputs
        return partial(self._run_bound, bound)

    def _bind(self, context: np.ndarray, sample_shape: tuple[int, ...]) -> Binding:
        arrays = {
            UNET_CONTEXT: context,
            UNET_SAMPLE: np.zeros(sample_shape, dtype=self.input_types[UNET_SAMPLE]),
            UNET_TIMESTEP: np.zeros((sample_shape[0],), dtype=self.input_types[UNET_TIMESTEP]),
            **self.residual_inputs.new_zeros(sample_shape),  # on the device once, for every step without a ControlNet
        }
        output = (sample_shape, self.input_types[UNET_SAMPLE])
        return make_binding(self.session, arrays, output, ("cuda", self.device_id), self._bindings.next_graph_id())

    def release_memory(self, inputs: dict[str, np.ndarray], device_id: int = 0) -> None:
        self._bindings.release()  # the next bind() of those shapes allocates anew
        if self.cuda_graph:
            return  # the captured graphs own their buffers (and ORT's arena) for the session's lifetime
        zeros = self.residual_inputs.zeros(inputs[UNET_SAMPLE].shape)
        super().release_memory({**inputs, **zeros}, device_id)

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
        with self.memory_errors():
            return self.session.run(None, feed)[0].astype(np.float32, copy=False)

    def _run_bound(
        self, bound: Binding, sample: np.ndarray, timestep: np.ndarray, residuals: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        inputs = self.feed({UNET_SAMPLE: sample, UNET_TIMESTEP: timestep})
        # The bound residual buffers hold zeros until a ControlNet's are copied in; the first step
        # without one after that puts the zeros back.
        if residuals is not None or bound.control:
            inputs.update(self.residual_inputs.feed(residuals, sample.shape))
            bound.control = residuals is not None
        return run_bound(self.session, bound, inputs, self.memory_errors)


@dataclass
class Sessions:
    text_encoder: GraphSession | OpenVINOGraph
    unet: UNetSession | OpenVINOUNet
    vae_decoder: GraphSession | OpenVINOGraph
    provider: str
    vae_encoder: GraphSession | OpenVINOGraph | None = None  # img2img and inpainting only
    config: SessionConfig = SessionConfig()  # how these were made: LoRA sets rebuild sessions the same way
    choice: str = ""  # what runs the graphs and why, in one line (the CLI and server print it at start)

    def release_memory(self, manifest: Manifest, device_id: int = 0) -> None:
        """Give back the memory a large generation left in onnxruntime's arenas (a 512x512 run
        leaves gigabytes there for the next one) and, on glibc, to the operating system."""
        latents = np.zeros((1, manifest.latent_channels, 8, 8), dtype=np.float32)
        self.text_encoder.release_memory({TEXT_INPUT: np.zeros((1, 77), dtype=np.int64)}, device_id)
        context = np.zeros((1, 77, manifest.text_width), dtype=np.float32)
        self.unet.release_memory(
            {UNET_SAMPLE: latents, UNET_TIMESTEP: np.zeros((1,), np.float32), UNET_CONTEXT: context}, device_id
        )
        self.vae_decoder.release_memory({VAE_DECODER_INPUT: latents}, device_id)
        trim_c_heap()


def trim_c_heap() -> None:
    """glibc keeps freed heap pages for reuse; malloc_trim hands them back. Elsewhere: nothing."""
    if platform.system() != "Linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_sessions(manifest: Manifest, config: SessionConfig) -> Sessions:
    target = manifest.target
    provider, why = choose_provider(config.provider, target)
    if (provider == OPENVINO) != (target == OPENVINO_TARGET):
        raise ModelFolderError(
            f"{manifest.folder} was exported with --target {target}, which provider {config.provider!r} cannot run; "
            + ("use provider 'openvino'" if target == OPENVINO_TARGET else "re-export it with --target openvino")
        )
    if provider == OPENVINO:
        sessions = load_openvino_sessions(manifest, config)
        sessions.choice = f"{sessions.choice} ({why})"
        return sessions
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
        vae_encoder=GraphSession(manifest.graphs["vae_encoder"], provider, config)
        if "vae_encoder" in manifest.graphs
        else None,
        config=config,
        choice=f"onnxruntime {provider}, {manifest.precision} graphs ({why})",
    )
    return sessions


def openvino_setup(config: SessionConfig) -> tuple[Any, dict[str, Any], str | None]:
    """(OpenVINO core, compile properties, inference precision) for the graphs of one SessionConfig."""
    from .openvino_sessions import cache_folder, compile_properties, make_core
    from .openvino_sessions import resolve_precision as openvino_precision

    core = make_core(config.device)
    precision = openvino_precision(core, config.device, config.inference_precision)
    properties = compile_properties(config.threads, precision, cache_folder(cache_root(config)), config.device)
    return core, properties, precision


def load_openvino_sessions(manifest: Manifest, config: SessionConfig) -> Sessions:
    from .openvino_sessions import OpenVINOGraph, OpenVINOUNet

    core, properties, precision = openvino_setup(config)
    graphs = manifest.graphs
    quantized = f", UNet {graphs['unet'].quantization}" if graphs["unet"].quantization else ""
    choice = f"OpenVINO on {config.device}, inference precision {precision or 'device default'}{quantized}"
    return Sessions(
        text_encoder=OpenVINOGraph(core, graphs["text_encoder"], config.device, properties),
        unet=OpenVINOUNet(core, graphs["unet"], config.device, properties),
        vae_decoder=OpenVINOGraph(core, graphs["vae_decoder"], config.device, properties),
        provider=f"{OPENVINO}:{config.device}",
        vae_encoder=OpenVINOGraph(core, graphs["vae_encoder"], config.device, properties)
        if "vae_encoder" in graphs
        else None,
        config=config,
        choice=choice,
    )
