"""`--quantize int8` (with `--target openvino`): NNCF at export time; the runtime reads the
quantized IR as any other (numpy + OpenVINO, no NNCF).

- UNet: hybrid mode, as optimum-intel quantizes Stable Diffusion UNets (its `_hybrid_quantization`):
  first `nncf.compress_weights` gives every MatMul weight int8 (weight-only: asymmetric, per output
  channel), Convolutions left out; then `nncf.quantize` puts int8 FakeQuantize on the inputs and
  weights of every Convolution and of the MatMuls between two activations (attention scores and
  values), leaving out the MatMuls whose weights the first pass compressed. Those are the linear
  layers of attention and feed-forward, whose activations (outliers in the text conditioning)
  carry the most error. Model type TRANSFORMER (attention patterns), preset MIXED (asymmetric
  activations), SmoothQuant off, as optimum-intel; OpenVINO runs the convolutions in int8 on CPUs
  with VNNI/AMX. One change from optimum-intel: the first and last convolutions (conv_in, conv_out:
  the latents themselves go in and the noise prediction comes out) keep float activations and get
  int8 weights from the first pass; measured on the tiny model, quantizing conv_in's input alone
  cost more than all other convolutions together (held-out SNR 18.8 dB for conv_in alone; the
  whole hybrid UNet 14.7 dB with it, 20.8 dB without it), for about 1% of the UNet's arithmetic.
- Text encoder and VAE: int8 weights only (`nncf.compress_weights`), activations stay float.

Calibration: UNet inputs recorded from diffusers' own pipeline (Euler a, CFG 11 as the runtime's
default, clip skip as the export's default) on prompts made here from a fixed tag list with a
seeded RNG (no data set is downloaded), `samples` UNet calls of `steps` steps each prompt.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from export.modules import clip_skip_reference
from runtime.graphs.model_folder import UNET_CONTEXT, UNET_SAMPLE, UNET_TIMESTEP, control_residuals

log = logging.getLogger(__name__)

INT8 = "int8"
HYBRID = "int8-hybrid"  # UNet: int8 weights everywhere, int8 activations in convolutions and attention
WEIGHTS_ONLY = "int8-weights"  # text encoder, VAE
# Validation against torch (max |difference| / max(1, max |reference|), as for every graph). int8
# rounds each weight to 1/255 of its channel's range, and the UNet's activations to 1/255 of the
# calibrated range, so the bounds are looser than fp16's 3e-2. Measured, int8 weights: 1.3e-2 to
# 2.1e-2 on the tiny model, 2.5e-2 (VAE decoder) and 3.0e-2 (text encoder) on the full-size SD1.5
# architecture with random weights; the hybrid UNet: 1.7e-1 to 2.1e-1 tiny, 2.0e-1 full-size (the
# worst element; the validation inputs are drawn anew each export). The bounds leave room for
# trained weights and catch a broken quantization (a wrong calibration gives errors of the
# output's own scale).
TOLERANCE = {WEIGHTS_ONLY: 1e-1, HYBRID: 3e-1}
EDGE_CONVOLUTIONS = ("/unet/conv_in/", "/unet/conv_out/")
CALIBRATION_CFG = 11.0  # the runtime's default (ACertainThing's card)
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Calibration:
    """How the UNet's calibration inputs are made: `samples` UNet calls (batch 2: CFG), `steps`
    denoising steps per prompt, at `size` pixels square (None: the model's default image size).
    200 samples as optimum-intel's hybrid mode; 20 steps spread them over 10 prompts."""

    samples: int = 200
    steps: int = 20
    size: int | None = None


def mode_for(graph: str) -> str:
    return HYBRID if graph == "unet" else WEIGHTS_ONLY


# Tags as A1111 users write prompts for anime checkpoints, and plain captions: the UNet sees both.
_QUALITY = ("masterpiece", "best quality", "high quality", "detailed", "absurdres", "highres", "")
_SUBJECTS = (
    "1girl", "1boy", "2girls", "a cat", "a dog", "a castle", "a city street", "a forest", "a mountain lake",
    "a bowl of fruit", "a robot", "a dragon", "an old man", "a woman reading a book", "a sports car",
)  # fmt: skip
_DETAILS = (
    "long hair", "short hair", "blue eyes", "red eyes", "smile", "looking at viewer", "school uniform",
    "kimono", "armor", "hat", "holding umbrella", "sitting", "standing", "from side", "upper body",
    "full body", "close-up", "silver hair", "twintails", "glasses",
)  # fmt: skip
_SCENES = (
    "cherry blossoms", "night sky", "stars", "rain", "snow", "sunset", "beach", "classroom", "cafe",
    "library", "flowers", "clouds", "neon lights", "ruins", "garden", "indoors", "outdoors", "underwater",
)  # fmt: skip
_STYLES = (
    "watercolor", "oil painting", "photo", "sketch", "anime screencap", "digital art", "cinematic lighting",
    "soft lighting", "dramatic lighting", "depth of field", "",
)  # fmt: skip
_NEGATIVES = (
    "", "lowres", "lowres, bad anatomy, bad hands, text, error, missing fingers, worst quality",
    "blurry, jpeg artifacts", "nsfw, lowres, bad anatomy", "worst quality, low quality, watermark",
)  # fmt: skip


def calibration_prompts(count: int, seed: int = CALIBRATION_SEED) -> list[tuple[str, str]]:
    """`count` (prompt, negative prompt) pairs, the same for the same seed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        tags = [rng.choice(_QUALITY), rng.choice(_SUBJECTS), *rng.sample(_DETAILS, rng.randint(0, 4))]
        tags += [*rng.sample(_SCENES, rng.randint(0, 2)), rng.choice(_STYLES)]
        pairs.append((", ".join(tag for tag in tags if tag), rng.choice(_NEGATIVES)))
    return pairs


def default_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def _embeddings(pipe, text: str, clip_skip: int) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return clip_skip_reference(pipe.text_encoder, ids.input_ids, clip_skip)


@torch.no_grad()
def collect_unet_inputs(pipe, calibration: Calibration, clip_skip: int) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs, as the graph takes them, at every step of diffusers' Euler a with CFG on
    the generated prompts (batch 2: negative and positive conditioning, as the runtime runs it)."""
    from diffusers import EulerAncestralDiscreteScheduler

    size = calibration.size or default_size(pipe)
    prompts = calibration_prompts(math.ceil(calibration.samples / calibration.steps))
    recorded: list[dict[str, np.ndarray]] = []
    # The UNet graph's ControlNet residual inputs get zeros, as every txt2img without ControlNet
    # feeds them (runtime/graphs/residuals.py): the activations calibrated are those of that case.
    residuals = control_residuals(dict(pipe.unet.config))

    def record(_module, args, kwargs) -> None:
        sample, timestep = args[0], args[1]
        zeros = {residual.name: np.zeros(residual.shape(tuple(sample.shape)), np.float32) for residual in residuals}
        recorded.append({
            UNET_SAMPLE: sample.float().numpy().copy(),
            UNET_TIMESTEP: np.full((sample.shape[0],), float(timestep), dtype=np.float32),
            UNET_CONTEXT: kwargs["encoder_hidden_states"].float().numpy().copy(),
            **zeros,
        })  # fmt: skip

    scheduler = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    log.info(
        "calibration: %d UNet inputs from %d prompts, %d steps each, %dx%d",
        calibration.samples, len(prompts), calibration.steps, size, size,
    )  # fmt: skip
    try:
        for index, (prompt, negative) in enumerate(prompts):
            pipe(
                prompt_embeds=_embeddings(pipe, prompt, clip_skip),
                negative_prompt_embeds=_embeddings(pipe, negative, clip_skip),
                num_inference_steps=calibration.steps, guidance_scale=CALIBRATION_CFG, height=size, width=size,
                generator=torch.Generator().manual_seed(CALIBRATION_SEED + index), output_type="latent",
            )  # fmt: skip
    finally:
        handle.remove()
        pipe.scheduler = scheduler
    return recorded[: calibration.samples]


def _constant_input(node: Any, port: int) -> bool:
    """Whether input `port` of `node` is a weight: a Constant, possibly behind converts/reshapes."""
    source = node.input_value(port).get_node()
    while source.get_type_name() in ("Convert", "Reshape", "Transpose", "FakeQuantize"):
        source = source.input_value(0).get_node()
    return source.get_type_name() == "Constant"


def weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMuls with a weight input (the linear layers)."""
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and (_constant_input(op, 0) or _constant_input(op, 1))
    ]


def edge_convolutions(model: Any) -> tuple[list[str], list[str]]:
    """(conv_in and conv_out, every other Convolution), by the diffusers module names that
    torch.onnx gives the nodes (UNetForOnnx holds the UNet as `unet`)."""
    convolutions = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Convolution"]
    edges = [name for name in convolutions if name.startswith(EDGE_CONVOLUTIONS)]
    if len(edges) != len(EDGE_CONVOLUTIONS):
        raise ValueError(f"the UNet graph has no single {' and '.join(EDGE_CONVOLUTIONS)} convolution: {edges}")
    return edges, [name for name in convolutions if name not in edges]


def hybrid(model: Any, inputs: list[dict[str, np.ndarray]]) -> Any:
    """The UNet: int8 weights everywhere, int8 activations in convolutions (but the first and last)
    and attention."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # NNCF logs every layer it touches at INFO
    linear = weighted_matmuls(model)  # before compression hides their constants
    edges, convolutions = edge_convolutions(model)
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(names=convolutions)
    )
    return nncf.quantize(
        model,
        nncf.Dataset(inputs),
        preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(inputs),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=linear + edges),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
        ),
    )


def weights_only(model: Any) -> Any:
    import nncf

    nncf.set_log_level(logging.WARNING)  # NNCF logs every layer it touches at INFO
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def transform(mode: str, inputs: list[dict[str, np.ndarray]] | None) -> Callable[[Any], Any]:
    """The ov.Model -> ov.Model step for a graph's quantization mode."""
    if mode == HYBRID:
        if not inputs:
            raise ValueError("hybrid quantization needs calibration inputs")
        return lambda model: hybrid(model, inputs)
    return weights_only


def summary(model: Any, mode: str, calibration: Calibration | None) -> dict[str, Any]:
    """What the manifest records of a saved quantized IR (`model`: read back from the file): the
    mode, what each part holds, and what was counted in the graph."""
    import nncf

    counts = {"int8_weight_tensors": 0, "activation_quantizers": 0}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8"):
            counts["int8_weight_tensors"] += 1
        elif kind == "FakeQuantize":
            counts["activation_quantizers"] += 1
    entry: dict[str, Any] = {
        "mode": mode,
        "weights": "int8: MatMul and embedding weights asymmetric per output channel (weight-only), "
        + ("Convolution weights symmetric per output channel" if mode == HYBRID else "Convolution weights likewise"),
        "activations": "int8 into every Convolution but conv_in and conv_out, and every MatMul of two "
        "activations (attention)"
        if mode == HYBRID
        else "float (the runtime's inference precision)",
        "nncf": nncf.__version__,
        **counts,
    }
    if mode == HYBRID and calibration is not None:
        entry["calibration"] = {**asdict(calibration), "sampler": "Euler a", "cfg": CALIBRATION_CFG}
    return entry
