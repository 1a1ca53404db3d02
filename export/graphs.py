"""Per-graph export: torch.onnx.export to fp32, then ONNX Runtime's transformers optimizer (fusions
for the chosen target) and its float16 converter.

Why `torch.onnx.export(dynamo=False)` rather than optimum's exporter: optimum-onnx 0.1.0 pins
transformers < 4.58 and diffusers 0.39, and its graphs would still need a clip-skip wrapper; the
TorchScript exporter produces the graph patterns that onnxruntime's SD fusions are written for.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.modules import (
    ClipSkipTextEncoder,
    ControlNetForOnnx,
    UNetForOnnx,
    VaeDecoder,
    VaeEncoder,
    clip_skip_reference,
    text_model,
)
from runtime.graphs.model_folder import (
    CONTROL_COND,
    METADATA_PREFIX,
    TEXT_EXTRA,
    TEXT_INPUT,
    UNET_CONTEXT,
    UNET_OUTPUT,
    UNET_SAMPLE,
    UNET_TIMESTEP,
    VAE_DECODER_INPUT,
    VAE_DECODER_OUTPUT,
    VAE_ENCODER_INPUT,
    VAE_ENCODER_OUTPUT,
    ControlResidual,
    control_residuals,
    text_output_name,
)

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a standard op from 17 on
# Fusions whose ops have CUDA kernels only (measured on onnxruntime 1.32's CPU provider).
GPU_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_nhwc_conv",
    "enable_packed_qkv",
    "enable_packed_kv",
)
# Turned off for fp32 CUDA graphs, as onnxruntime's SD recipe does (optimize_pipeline.py packs Q/K/V
# for float16 only): the packed forms exist to feed the fp16 flash / memory-efficient kernels.
FP16_ONLY_FUSIONS = ("enable_packed_qkv", "enable_packed_kv")
# Graphs with more weight than this keep it in one external file beside model.onnx: protobuf cannot
# hold 2 GB, and onnxruntime maps an external file into memory instead of parsing a copy out of the
# protobuf (the full-size fp16-weight UNet loads in 0.1 s instead of 2.9 s).
EXTERNAL_DATA_THRESHOLD = 64 * 2**20
EXTERNAL_DATA_FILE = "model.onnx_data"


@dataclass
class ValidationCase:
    inputs: dict[str, np.ndarray]  # float32 / int64 inputs; cast to the graph's dtypes when run
    reference: np.ndarray  # the torch module's output on the same inputs
    output: str | None = None  # the graph output compared; None: the first


@dataclass
class GraphSpec:
    name: str
    module: torch.nn.Module | None  # released once the fp32 graph is written
    trace_inputs: dict[str, torch.Tensor]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]]
    optimizer_type: str  # onnxruntime.transformers model type: "clip" | "unet" | "vae"
    keep_fp32_io: list[str] = field(default_factory=list)
    input_defaults: dict[str, np.ndarray] = field(default_factory=dict)  # inputs a caller may omit
    cases: list[ValidationCase] = field(default_factory=list)
    # At the size the runtime uses (512 px: 64x64 latents), where ORT picks other kernels than at the
    # small trace sizes (flash attention from 513 tokens up); validated where the target's provider runs.
    working_cases: list[ValidationCase] = field(default_factory=list)
    extra_outputs: list[str] = field(default_factory=list)  # outputs after output_name (more clip skips)

    @property
    def output_names(self) -> list[str]:
        return [self.output_name, *self.extra_outputs]


def _run(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return fn(*args).float().numpy()


def _run_all(fn: Callable[..., tuple[torch.Tensor, ...]], *args: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [output.float().numpy() for output in fn(*args)]


def text_encoder_spec(pipe, clip_skips: tuple[int, ...], prompt_ids: torch.Tensor) -> GraphSpec:
    """input_ids, and extra_embeddings for ids past the vocabulary; one output per clip skip (the
    first is the default). Each output is validated on transformers' output for plain ids, and for
    ids where some tokens are swapped for extra rows that hold those tokens' own vectors (so the
    extra path must give the plain ids' output)."""
    module = ClipSkipTextEncoder(pipe.text_encoder, clip_skips).eval()
    vocab, width = pipe.text_encoder.config.vocab_size, pipe.text_encoder.config.hidden_size
    table = text_model(pipe.text_encoder).embeddings.token_embedding.weight.detach()
    random_ids = torch.randint(0, vocab, (1, prompt_ids.shape[1]))
    swapped = random_ids.clone()
    swapped[0, 3:6] = vocab + torch.arange(3)
    outputs = [text_output_name(clip_skip) for clip_skip in clip_skips]
    cases = []
    for clip_skip, output in zip(clip_skips, outputs, strict=True):
        for ids, fed, extra in (
            (prompt_ids, prompt_ids, torch.zeros(1, width)),
            (random_ids, swapped, table[random_ids[0, 3:6]]),
        ):
            reference = _run(lambda x, n=clip_skip: clip_skip_reference(pipe.text_encoder, x, n), ids)
            inputs = {TEXT_INPUT: fed.numpy(), TEXT_EXTRA: extra.float().numpy()}
            cases.append(ValidationCase(inputs, reference, output))
    return GraphSpec(
        name="text_encoder",
        module=module,
        trace_inputs={TEXT_INPUT: prompt_ids, TEXT_EXTRA: torch.zeros(2, width)},
        output_name=outputs[0],
        extra_outputs=outputs[1:],
        dynamic_axes={TEXT_INPUT: {0: "batch"}, TEXT_EXTRA: {0: "extra"}, **{name: {0: "batch"} for name in outputs}},
        optimizer_type="clip",
        cases=cases,
        input_defaults={TEXT_EXTRA: np.zeros((1, width), dtype=np.float32)},
    )


def residual_axes(residual: ControlResidual) -> dict[int, str]:
    """Dynamic axes of a ControlNet residual: the latents' own names at full size, else per level."""
    if residual.downscale == 1:
        return {0: "batch", 2: "height", 3: "width"}
    return {0: "batch", 2: f"height_{residual.downscale}x_down", 3: f"width_{residual.downscale}x_down"}


@torch.no_grad()
def measured_residual_shapes(unet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> list:
    """The shapes of the UNet's skip connections and middle block output on these inputs, read
    with forward hooks: what a ControlNet's residuals must match."""
    shapes: list[tuple[int, ...]] = []
    hooks = [unet.conv_in.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda _m, _i, out: shapes.extend(tuple(x.shape) for x in out[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))))
    try:
        unet(sample, timestep, context, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def unet_residuals(unet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> tuple:
    """control_residuals of the UNet's config, checked against the shapes the UNet produces (a
    layout that the runtime would size its zeros for wrongly is refused here, at export)."""
    residuals = control_residuals(dict(unet.config))
    expected = [residual.shape(tuple(sample.shape)) for residual in residuals]
    measured = measured_residual_shapes(unet, sample, timestep, context)
    if measured != expected:
        raise ValueError(f"the UNet's skip connections have shapes {measured}, not the SD1.x layout's {expected}")
    return residuals


def random_residuals(residuals: tuple, sample_shape: tuple[int, ...], scale: float = 0.0) -> list[torch.Tensor]:
    """Residuals for the UNet's inputs: zeros (scale 0, the plain UNet) or N(0, scale^2) values."""
    return [torch.randn(residual.shape(sample_shape)) * scale for residual in residuals]


def unet_spec(pipe, context: torch.Tensor, working: int | None = None) -> GraphSpec:
    """Traced on a latent size that is not a multiple of 8 so that diffusers takes its general
    upsampling path (sizes read from the skip connections): the graph then serves every size.
    The ControlNet residual inputs are validated both zero (no ControlNet: the plain UNet) and
    random. `working` (a latent size) adds cases at that size, batch 2 (CFG), with the text of one
    and of two 75-token chunks (77 and 154 tokens)."""
    module = UNetForOnnx(pipe.unet).eval()
    channels = pipe.unet.config.in_channels
    batch = context.shape[0]
    sample = torch.randn(batch, channels, 9, 7)
    residuals = unet_residuals(pipe.unet, sample, torch.tensor([500.0] * batch), context)
    trace = {
        UNET_SAMPLE: sample,
        UNET_TIMESTEP: torch.tensor([500.0] * batch),
        UNET_CONTEXT: torch.cat([context, context], dim=1),
        **dict(zip((r.name for r in residuals), random_residuals(residuals, sample.shape, 0.5), strict=True)),
    }

    def case(sample: torch.Tensor, timestep: torch.Tensor, ctx: torch.Tensor, scale: float) -> ValidationCase:
        added = random_residuals(residuals, tuple(sample.shape), scale)
        inputs = {UNET_SAMPLE: sample.numpy(), UNET_TIMESTEP: timestep.numpy(), UNET_CONTEXT: ctx.numpy()}
        inputs.update({residual.name: value.numpy() for residual, value in zip(residuals, added, strict=True)})
        return ValidationCase(inputs, _run(module, sample, timestep, ctx, *added))

    cases = [
        case(torch.randn(batch, channels, 8, 8), torch.tensor([961.5] * batch), context, 0.0),
        case(torch.randn(1, channels, 6, 10), torch.tensor([21.0]), torch.cat([context[:1], context[1:]], dim=1), 0.0),
        case(torch.randn(batch, channels, 10, 6), torch.tensor([500.0] * batch), context, 1.0),
    ]
    working_cases = []
    if working is not None:
        for ctx, scale in ((context, 0.0), (torch.cat([context, context.flip(0)], dim=1), 1.0)):
            sample, timestep = torch.randn(batch, channels, working, working), torch.tensor([961.5] * batch)
            working_cases.append(case(sample, timestep, ctx, scale))
    return GraphSpec(
        name="unet",
        module=module,
        trace_inputs=trace,
        output_name=UNET_OUTPUT,
        dynamic_axes={
            UNET_SAMPLE: {0: "batch", 2: "height", 3: "width"},
            UNET_TIMESTEP: {0: "batch"},
            UNET_CONTEXT: {0: "batch", 1: "sequence"},
            **{residual.name: residual_axes(residual) for residual in residuals},
            UNET_OUTPUT: {0: "batch", 2: "height", 3: "width"},
        },
        optimizer_type="unet",
        # timesteps such as 961.5 are not representable in float16; diffusers keeps them float32.
        keep_fp32_io=[UNET_TIMESTEP],
        cases=cases,
        working_cases=working_cases,
    )


def controlnet_spec(
    module: ControlNetForOnnx, name: str, residuals: tuple, context: torch.Tensor, working: int | None = None
) -> GraphSpec:
    """(sample, timestep, text, control image at 8x the latent size) -> one output per UNet residual
    input. Traced like the UNet on latents that are no multiple of 8; validated on every output at
    two other sizes (and at the working size, batch 2, where the target's provider runs)."""
    config = module.controlnet.config
    channels, hint = config.in_channels, config.conditioning_channels
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)  # its stride-2 convolutions
    batch = context.shape[0]

    def inputs(latents: tuple[int, int, int], ctx: torch.Tensor, timestep: float) -> dict[str, torch.Tensor]:
        count, height, width = latents
        return {
            UNET_SAMPLE: torch.randn(count, channels, height, width),
            UNET_TIMESTEP: torch.tensor([timestep] * count),
            UNET_CONTEXT: ctx,
            CONTROL_COND: torch.rand(count, hint, height * factor, width * factor),
        }

    def cases(values: dict[str, torch.Tensor]) -> list[ValidationCase]:
        outputs = _run_all(module, *values.values())
        fed = {key: value.numpy() for key, value in values.items()}
        return [ValidationCase(fed, output, residual.name) for residual, output in zip(residuals, outputs, strict=True)]

    found = cases(inputs((batch, 8, 8), context, 961.5))
    found += cases(inputs((1, 6, 10), torch.cat([context[:1], context[1:]], dim=1), 21.0))
    working_cases = [] if working is None else cases(inputs((batch, working, working), context, 500.0))
    names = [residual.name for residual in residuals]
    return GraphSpec(
        name=name,
        module=module,
        trace_inputs=inputs((batch, 9, 7), torch.cat([context, context], dim=1), 500.0),
        output_name=names[0],
        extra_outputs=names[1:],
        dynamic_axes={
            UNET_SAMPLE: {0: "batch", 2: "height", 3: "width"},
            UNET_TIMESTEP: {0: "batch"},
            UNET_CONTEXT: {0: "batch", 1: "sequence"},
            CONTROL_COND: {0: "batch", 2: "image_height", 3: "image_width"},
            **{residual.name: residual_axes(residual) for residual in residuals},
        },
        optimizer_type="unet",
        keep_fp32_io=[UNET_TIMESTEP],
        cases=found,
        working_cases=working_cases,
    )


def vae_decoder_spec(pipe, working: int | None = None) -> GraphSpec:
    module = VaeDecoder(pipe.vae).eval()
    channels = pipe.vae.config.latent_channels
    scale = pipe.vae.config.scaling_factor

    def case(*shape: int) -> ValidationCase:
        latent = torch.randn(*shape) / scale
        return ValidationCase({VAE_DECODER_INPUT: latent.numpy()}, _run(module, latent))

    cases = [case(1, channels, 8, 8), case(2, channels, 6, 10)]
    return GraphSpec(
        name="vae_decoder",
        module=module,
        trace_inputs={VAE_DECODER_INPUT: torch.randn(1, channels, 9, 7) / scale},
        output_name=VAE_DECODER_OUTPUT,
        dynamic_axes={
            VAE_DECODER_INPUT: {0: "batch", 2: "latent_height", 3: "latent_width"},
            VAE_DECODER_OUTPUT: {0: "batch", 2: "height", 3: "width"},
        },
        optimizer_type="vae",
        cases=cases,
        working_cases=[] if working is None else [case(1, channels, working, working)],
    )


def vae_encoder_spec(pipe, working: int | None = None) -> GraphSpec:
    """`working` is a latent size: the image is that many times the VAE's scale factor."""
    module = VaeEncoder(pipe.vae).eval()

    def case(*shape: int) -> ValidationCase:
        image = torch.rand(*shape) * 2 - 1
        return ValidationCase({VAE_ENCODER_INPUT: image.numpy()}, _run(module, image))

    cases = [case(1, 3, 64, 64), case(1, 3, 48, 80)]
    pixels = None if working is None else working * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return GraphSpec(
        name="vae_encoder",
        module=module,
        trace_inputs={VAE_ENCODER_INPUT: torch.rand(1, 3, 72, 56) * 2 - 1},
        output_name=VAE_ENCODER_OUTPUT,
        dynamic_axes={
            VAE_ENCODER_INPUT: {0: "batch", 2: "height", 3: "width"},
            VAE_ENCODER_OUTPUT: {0: "batch", 2: "latent_height", 3: "latent_width"},
        },
        optimizer_type="vae",
        cases=cases,
        working_cases=[] if pixels is None else [case(1, 3, pixels, pixels)],
    )


def export_fp32(spec: GraphSpec, path: Path) -> None:
    """TorchScript-based export; graphs over 2 GB get their weights written beside the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tracing warns about every Python-level shape check in diffusers/transformers; those checks
    # are covered by validating the graph at sizes it was not traced with.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(
            spec.module,
            tuple(spec.trace_inputs.values()),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(spec.trace_inputs),
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=True,
        )


def fusion_options(optimizer_type: str, target: str, precision: str = "fp16", disabled: tuple[str, ...] = ()):
    """onnxruntime's fusions for the target; `disabled` names FusionOptions attributes turned off
    after a validation failure (export.validate.FUSION_FALLBACKS)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(optimizer_type)
    off = [*disabled]
    if target == "cpu":
        off += GPU_ONLY_FUSIONS
    elif precision == "fp32":
        off += FP16_ONLY_FUSIONS
    for name in off:
        setattr(options, name, False)
    return options


def optimize(
    fp32_path: Path,
    spec: GraphSpec,
    target: str,
    precision: str,
    fp16_compute: bool | None = None,
    disabled: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """ONNX Runtime's transformers optimizer, then fp16. `target` picks the fusions ("cpu" keeps
    only ops the CPU provider has kernels for, "cuda" adds GroupNorm, BiasSplitGelu, packed
    attention and NHWC convolutions) and what fp16 means:

    - cuda: fp16 arithmetic, by onnxruntime's float16 converter (the GPU's fast path);
    - cpu: fp16 weights, fp32 arithmetic. ORT's CPU provider has no fp16 convolution or matrix
      kernels: fp16 arithmetic there is the slowest option measured and, with ORT's default load
      folds, the most memory-hungry (benchmarks/README.md). Stored fp16, cast on use, the weights
      take half the memory at 10-15% of the fp32 graph's speed.

    `fp16_compute` overrides the second choice: the CPU-runnable twin of a CUDA graph computes in
    fp16 like the graph it stands in for. `disabled`: fusions turned off (see fusion_options).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    # The weights stay on disk while the optimizer works: its symbolic shape inference copies the
    # whole model several times (a full-size UNet peaked at 21 GB with the weights loaded). Fusions
    # that read a weight (Attention packs Q/K/V) load just that one, from paths relative to the
    # exported file's folder.
    weightless = onnx.load(str(fp32_path), load_external_data=False)
    with working_directory(fp32_path.parent):
        model = optimize_model(
            weightless,
            model_type=spec.optimizer_type,
            num_heads=0,  # deduced from the graph
            hidden_size=0,
            opt_level=0,  # our own fusions only: ORT's runtime-level optimizations run at session load
            optimization_options=fusion_options(spec.optimizer_type, target, precision, disabled),
            use_gpu=target == "cuda",
        )
        log.debug("%s fused operators: %s", spec.name, model.get_fused_operator_statistics())
        fp16_compute = target == "cuda" if fp16_compute is None else fp16_compute
        if precision == "fp16" and fp16_compute:
            # The converter retypes each initializer before it reads it: a weight still on disk
            # would then be read as fp16 from fp32 bytes (the full-size UNet failed so on a GPU box).
            onnx.load_external_data_for_model(model.model, ".")
            projection = float32_projection(model.model, spec.keep_fp32_io)
            model.convert_float_to_float16(keep_io_types=spec.keep_fp32_io, node_block_list=projection)
            if projection:
                read_inputs_uncast(model, spec.keep_fp32_io)
        elif precision == "fp16":
            store_weights_fp16(model.model)
        onnx.load_external_data_for_model(model.model, ".")
    set_output_shape(model.model, spec)
    add_input_defaults(model.model, spec)
    describe_precision(model.model, spec.name, precision, "float16" if fp16_compute else "float32")
    return model.model


PROJECTION_END = ("MatMul", "Gemm")  # the time embedding's first layer: fp16 from there on


def float32_projection(model: onnx.ModelProto, inputs: list[str]) -> list[str]:
    """Nodes from the float32 inputs (the UNet's timestep) up to the first matrix product: the
    sinusoidal time projection, which diffusers computes in float32 in fp16 pipelines too. In fp16
    Euler's fractional timesteps (961.53) and their products with the frequencies (up to ~1000)
    are rounded to steps of 0.5, which turns the fast sines and cosines into noise."""
    names: list[str] = []
    frontier = set(inputs)
    while frontier:
        reached = [node for node in model.graph.node if node.name not in names and frontier & set(node.input)]
        reached = [node for node in reached if node.op_type not in PROJECTION_END]
        names += [node.name for node in reached]
        frontier = {output for node in reached for output in node.output}
    return names


def read_inputs_uncast(model: Any, inputs: list[str]) -> None:
    """The float16 converter casts every kept-float32 input to fp16 first and back to float32 for
    blocked nodes, which loses what blocking was for: blocked nodes read the input itself."""
    graph = model.model.graph
    to_half = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Cast" and node.input[0] in inputs}  # fmt: skip
    back = {node.output[0]: to_half[node.input[0]] for node in graph.node
            if node.op_type == "Cast" and node.input[0] in to_half
            and any(item.name == "to" and item.i == onnx.TensorProto.FLOAT for item in node.attribute)}  # fmt: skip
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in back:
                node.input[index] = back[name]
    model.prune_graph()


@contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def store_weights_fp16(model: onnx.ModelProto, min_elements: int = 4096) -> None:
    """Keep every large float weight as fp16 and recreate its fp32 value with a Cast node. The casts
    come first in the node list: ORT's default execution order then runs each just before the
    weight is needed and frees it after (measured: full-size UNet peak 2.15 GB against 3.5 GB fp32).
    Small tensors (norms, biases; under 16 KB in fp32) stay fp32: no memory worth a cast."""
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < min_elements:
            continue
        name = tensor.name
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name=f"{name}_fp16")
        tensor.CopyFrom(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_cast"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)


def describe_precision(model: onnx.ModelProto, graph: str, precision: str, compute: str) -> None:
    """Written into the graph itself so the runtime can tell a graph of the wrong precision from
    the manifest's word without hashing gigabytes at every load."""
    values = {"graph": graph, "precision": precision, "compute": compute if precision == "fp16" else "float32"}
    entries = {entry.key: entry for entry in model.metadata_props}
    for key, value in values.items():
        key = f"{METADATA_PREFIX}{key}"
        entry = entries.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


def add_input_defaults(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """An initializer with an input's name is that input's default: onnxruntime uses it when the
    caller does not feed the input (and lists it among the overridable initializers)."""
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    for name, value in spec.input_defaults.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])
        model.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), name=name))


def set_output_shape(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Shape inference names every axis it cannot prove constant (a text encoder's 77 becomes
    "LayerNormalizationlast_hidden_state_dim_1"); state each output's shape plainly: our dynamic
    axis names, and the sizes seen in validation for the fixed axes."""
    sizes = {case.output or spec.output_name: case.reference.shape for case in reversed(spec.cases)}
    for value in model.graph.output:
        if value.name not in spec.output_names:
            continue
        names = spec.dynamic_axes.get(value.name, {})
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for axis, size in enumerate(sizes.get(value.name, spec.cases[0].reference.shape)):
            dim = shape.dim.add()
            if axis in names:
                dim.dim_param = names[axis]
            else:
                dim.dim_value = size


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto. (`ModelProto.ByteSize()` itself raises with
    protobuf 7 once a model passes 2 GB, which is the case it is needed for.)"""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * max(
                len(tensor.float_data), len(tensor.int32_data), len(tensor.int64_data), len(tensor.double_data)
            )
    return total


def save_graph(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write the graph (weights external past EXTERNAL_DATA_THRESHOLD); return the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        files = [path.name]
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
        files = [path.name, EXTERNAL_DATA_FILE]
    # onnx creates the data file owner-only; give the files the permissions the user's umask asks.
    umask = os.umask(0)
    os.umask(umask)
    for name in files:
        os.chmod(path.parent / name, 0o666 & ~umask)
    return files
