"""The UNet's device buffers on CUDA (IO binding), ordered with onnxruntime's compute stream, and
one CUDA graph per distinct input shape.

Ordering. `OrtValue.update_inplace` copies a numpy array with a plain `cudaMemcpy` on CUDA's legacy
default stream; from pageable host memory that call may return before the data has landed. ORT
computes on a stream of its own, created non-blocking, which does not wait for the default stream:
nothing orders the copy before the kernels (or the replayed CUDA graph) that read the buffer.
onnxruntime's own SD demo (`io_binding_helper.CudaSession`) copies with torch on the stream it hands
ORT as `user_compute_stream` and calls `synchronize_inputs()` / `synchronize_outputs()` around the
run. The runtime has no torch and no stream of its own to hand over (and a CUDA graph cannot be
captured on the legacy default stream), so it keeps ORT's stream and orders by synchronizing:
`IOBinding.synchronize_inputs()` is the CUDA provider's `Sync()`, a `cudaDeviceSynchronize`, which
waits for every copy issued before it. The device is idle there (the previous run ended with a
stream synchronize), so the wait costs microseconds. `synchronize_outputs()` after the run makes the
output read independent of ORT's own end-of-run synchronize (which a run option can switch off).
Binding CPU inputs instead (`bind_cpu_input`, copied by ORT on its stream) allocates a new device
buffer per bind, and a CUDA graph replays the addresses it captured.

CUDA graphs. ORT keeps one captured graph per `gpu_graph_id` run option (ORT >= 1.18), each
replaying the buffer addresses it was captured with. So each distinct (conditioning, latent) shape
gets its own buffers and id, up to MAX_CUDA_GRAPHS, and those buffers live as long as the session:
freeing them would leave the graph writing into memory the allocator hands to someone else. Shapes
past the limit run IO-bound without a graph (id -1), their buffers reused least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .model_folder import UNET_OUTPUT

GRAPH_ID = "gpu_graph_id"  # ORT run config entry: which captured CUDA graph a run uses
NO_GRAPH = -1  # ORT's "run without a CUDA graph" id
MAX_BINDINGS = 2  # shapes without a graph kept bound: a step runs at most two UNet calls (A1111's cond and uncond)
# Graphs one session keeps: hires fix's two latent sizes times prompt and negative prompt of different
# 75-token chunk counts (two context lengths). Each graph holds its own input and output buffers.
MAX_CUDA_GRAPHS = 4

Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # (context shape, sample shape)


@dataclass
class Binding:
    binding: ort.IOBinding
    values: dict[str, ort.OrtValue]  # the device buffers bound to the inputs and the output
    graph_id: int | None  # None: CUDA graphs are off for the session
    run_options: ort.RunOptions | None
    control: bool = False  # the ControlNet residual buffers hold a ControlNet's values, not zeros


class BindingPool:
    """The bound buffers of one UNet session, by shape: captured ones for good, others LRU."""

    def __init__(self, cuda_graph: bool) -> None:
        self.cuda_graph = cuda_graph
        self.graphs: dict[Shapes, Binding] = {}
        self.plain: OrderedDict[Shapes, Binding] = OrderedDict()

    def get(self, shapes: Shapes) -> Binding | None:
        if shapes in self.graphs:
            return self.graphs[shapes]
        if shapes in self.plain:
            self.plain.move_to_end(shapes)
            return self.plain[shapes]
        return None

    def next_graph_id(self) -> int | None:
        """The id a new shape's binding runs with: None without CUDA graphs, NO_GRAPH past the limit."""
        if not self.cuda_graph:
            return None
        return len(self.graphs) if len(self.graphs) < MAX_CUDA_GRAPHS else NO_GRAPH

    def add(self, shapes: Shapes, bound: Binding) -> None:
        if bound.graph_id is not None and bound.graph_id != NO_GRAPH:
            self.graphs[shapes] = bound
            return
        self.plain[shapes] = bound
        while len(self.plain) > MAX_BINDINGS:
            self.plain.popitem(last=False)

    def release(self) -> None:
        """Drop the buffers that no captured graph refers to."""
        self.plain.clear()


def make_binding(
    session: ort.InferenceSession,
    arrays: dict[str, np.ndarray],
    output: tuple[tuple[int, ...], type],
    device: tuple[str, int],
    graph_id: int | None,
) -> Binding:
    """Device buffers holding `arrays` bound to the inputs, and an output buffer of (shape, dtype)."""
    binding = session.io_binding()
    values = {}
    for name, array in arrays.items():
        values[name] = ort.OrtValue.ortvalue_from_numpy(array, *device)
        binding.bind_ortvalue_input(name, values[name])
    values[UNET_OUTPUT] = ort.OrtValue.ortvalue_from_shape_and_type(*output, *device)
    binding.bind_ortvalue_output(UNET_OUTPUT, values[UNET_OUTPUT])
    run_options = None
    if graph_id is not None:
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(GRAPH_ID, str(graph_id))
    return Binding(binding, values, graph_id, run_options)


def run_bound(
    session: ort.InferenceSession, bound: Binding, inputs: dict[str, np.ndarray], guard: Callable
) -> np.ndarray:
    """Copy the step's inputs (sample, timestep, and ControlNet residuals when they change) into the
    bound buffers, run, and read the output, each ordered with ORT's compute stream (see the
    module's docstring). `guard` maps allocation failures."""
    for name, value in inputs.items():
        bound.values[name].update_inplace(value)
    with guard():
        bound.binding.synchronize_inputs()  # also orders a new conditioning, copied by UNetSession.bind
        session.run_with_iobinding(bound.binding, bound.run_options)
        bound.binding.synchronize_outputs()
    # A copy: on CPU memory numpy() is a view of the buffer that the next step overwrites.
    return np.array(bound.values[UNET_OUTPUT].numpy(), dtype=np.float32)
