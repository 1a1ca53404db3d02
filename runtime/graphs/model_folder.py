"""The exported model folder: its layout, its manifest, and the checks made before loading it.

The exporter writes this layout and the runtime reads it; both use the names defined here so the
two sides cannot drift apart. Layout (optimum-style, plus our manifest):

    model_index.json  manifest.json  scheduler/scheduler_config.json  tokenizer/tokenizer.json
    text_encoder/model.onnx  unet/model.onnx  vae_decoder/model.onnx  vae_encoder/model.onnx

An export for OpenVINO (`--target openvino`) has <graph>/openvino_model.xml + .bin (IR) instead
of model.onnx, as optimum-intel names them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError

FORMAT_NAME = "acertain-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp16", "fp32")
GRAPH_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")  # the encoder only serves img2img
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
TOKENIZER_DIR = "tokenizer"

# Graph input/output names, shared by exporter and runtime.
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "last_hidden_state"  # TEXT_OUTPUT: exports with one clip skip, before clip_skips
# (k, width) vectors that ids >= the vocabulary size select (textual-inversion embeddings); the
# graph holds a one-row default, so callers without embeddings feed input_ids alone.
TEXT_EXTRA = "extra_embeddings"
UNET_SAMPLE, UNET_TIMESTEP, UNET_CONTEXT, UNET_OUTPUT = (
    "sample",
    "timestep",
    "encoder_hidden_states",
    "out_sample",
)
VAE_DECODER_INPUT, VAE_DECODER_OUTPUT = "latent_sample", "sample"
VAE_ENCODER_INPUT, VAE_ENCODER_OUTPUT = "sample", "latent_parameters"
# ControlNet. The UNet graph takes the residuals a ControlNet adds to its skip connections and to its
# middle block's output (zeros when no ControlNet runs), and a ControlNet graph gives them under the
# same names. Their count follows the UNet's blocks (12 down + 1 mid for SD1.x): read it off a graph.
CONTROL_COND = "controlnet_cond"  # the control image, (batch, 3, height, width) in [0, 1]
CONTROL_MID_RESIDUAL = "mid_block_residual"
CONTROLNETS_DIR = "controlnets"  # controlnets/<name>/model.onnx (or the OpenVINO IR), one per ControlNet


def control_down_residual(index: int) -> str:
    return f"down_block_residual_{index}"


@dataclass(frozen=True)
class ControlResidual:
    """One ControlNet residual: a UNet input and a ControlNet output of the same name and shape."""

    name: str
    channels: int
    downscale: int  # the latents' height and width divided by this, rounded up, are the residual's

    def shape(self, sample_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(batch, channels, height, width) for UNet latents of `sample_shape`. Each stride-2
        downsampling convolution (kernel 3, padding 1) turns a size n into ceil(n / 2)."""
        batch, _, height, width = sample_shape
        return (batch, self.channels, -(-height // self.downscale), -(-width // self.downscale))


def control_residuals(unet_config: dict[str, Any]) -> tuple[ControlResidual, ...]:
    """The residuals of a diffusers UNet2DConditionModel's config (unet/config.json), in the order
    of its skip connections, then the middle block's: conv_in's output, then per level one per
    resnet layer and one for the level's downsampler (every level but the last). SD1.x: 12 + 1;
    the exporter checks this against the shapes the UNet itself produces."""
    widths = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    per_level = list(layers) if isinstance(layers, list | tuple) else [layers] * len(widths)
    found = [(widths[0], 1)]
    for level, width in enumerate(widths):
        found += [(width, 2**level)] * per_level[level]
        if level < len(widths) - 1:
            found.append((width, 2 ** (level + 1)))
    down = [ControlResidual(control_down_residual(index), width, scale) for index, (width, scale) in enumerate(found)]
    return (*down, ControlResidual(CONTROL_MID_RESIDUAL, widths[-1], 2 ** (len(widths) - 1)))


# Keys of the metadata the exporter writes into every graph (graph name, precision, compute dtype).
METADATA_PREFIX = "acertain_onnx."

ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


OPENVINO_TARGET = "openvino"
IR_FILE, IR_BIN = "openvino_model.xml", "openvino_model.bin"


def graph_path(name: str, target: str = "cpu") -> Path:
    return Path(name) / (IR_FILE if target == OPENVINO_TARGET else "model.onnx")


def text_output_name(clip_skip: int) -> str:
    """The text encoder's output for one clip skip (A1111 counting), in exports that list clip_skips."""
    return f"hidden_states_clip_skip_{clip_skip}"


@dataclass(frozen=True)
class GraphInfo:
    """What the manifest says about one graph."""

    name: str
    path: Path
    precision: str
    inputs: dict[str, str]  # name -> dtype ("float16", "float32", "int64")
    outputs: dict[str, str]
    sha256: str
    files: dict[str, str]  # file name in the graph's folder -> sha256 (model.onnx and its weights)


@dataclass(frozen=True)
class Manifest:
    folder: Path
    raw: dict[str, Any]
    graphs: dict[str, GraphInfo]

    @property
    def precision(self) -> str:
        return self.raw["precision"]

    @property
    def target(self) -> str:
        return self.raw.get("target", "cpu")  # manifests written before targets were recorded: cpu

    @property
    def clip_skip(self) -> int:
        """The default clip skip: what a request that names none gets."""
        return int(self.raw["clip_skip"])

    @property
    def clip_skips(self) -> tuple[int, ...]:
        """Every clip skip the text encoder has an output for (exports before `clip_skips`: one)."""
        return tuple(self.raw.get("clip_skips") or (self.clip_skip,))

    def text_output(self, clip_skip: int) -> str:
        """The text encoder's output for `clip_skip` (one of clip_skips)."""
        return text_output_name(clip_skip) if "clip_skips" in self.raw else TEXT_OUTPUT

    @property
    def vae_scale_factor(self) -> int:
        return int(self.raw["vae_scale_factor"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.raw["vae_scaling_factor"])

    @property
    def latent_channels(self) -> int:
        return int(self.raw["latent_channels"])

    @property
    def text_width(self) -> int:
        return int(self.raw["text_width"])

    @property
    def default_size(self) -> int:
        return int(self.raw.get("default_image_size", 512))

    @property
    def model_name(self) -> str:
        return str(self.raw.get("model_name") or self.folder.name)

    @property
    def model_hash(self) -> str | None:
        return self.raw.get("model_hash")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path} is not valid JSON ({error}): {what}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(data).__name__}, not an object: {what}")
    return data


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")


# What each manifest field must hold, and how to say it.
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "precision": (lambda value: value in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "clip_skip": (_positive_int, "a whole number >= 1"),
    "vae_scale_factor": (_positive_int, "a whole number >= 1"),
    "vae_scaling_factor": (_positive_number, "a positive number"),
    "latent_channels": (_positive_int, "a whole number >= 1"),
    "text_width": (_positive_int, "a whole number >= 1"),
}
_OPTIONAL_CHECKS: dict[str, tuple[Any, str]] = {
    "default_image_size": (_positive_int, "a whole number >= 1"),
    "model_name": (lambda value: isinstance(value, str), "a string"),
    "model_hash": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "model_sha256": (lambda value: value is None or isinstance(value, str), "a string or null"),
    "clip_skips": (
        lambda value: isinstance(value, list) and bool(value) and all(_positive_int(item) for item in value),
        "a non-empty list of whole numbers >= 1",
    ),
}


def _check_fields(raw: dict[str, Any], path: Path) -> None:
    for key, (valid, wanted) in {**_FIELD_CHECKS, **_OPTIONAL_CHECKS}.items():
        if key not in raw:
            if key in _FIELD_CHECKS:
                raise ModelFolderError(f"{path} has no {key!r}: the export is incomplete")
            continue
        if not valid(raw[key]):
            raise ModelFolderError(f"{path}: {key!r} must be {wanted}, not {raw[key]!r}; re-export the model")
    if raw["clip_skip"] not in raw.get("clip_skips", [raw["clip_skip"]]):
        raise ModelFolderError(f"{path}: 'clip_skip' {raw['clip_skip']} is not among 'clip_skips'; re-export the model")


def graph_info(folder: Path, name: str, entry: Any) -> GraphInfo:
    if not isinstance(entry, dict):
        raise ModelFolderError(f"manifest entry for graph {name!r} is not an object")
    if entry.get("precision") not in PRECISIONS:
        raise ModelFolderError(f"manifest: graph {name!r} has precision {entry.get('precision')!r}, not fp16 or fp32")
    try:
        return GraphInfo(
            name=name,
            path=folder / entry["path"],
            precision=entry["precision"],
            inputs={item["name"]: item["dtype"] for item in entry["inputs"]},
            outputs={item["name"]: item["dtype"] for item in entry["outputs"]},
            sha256=entry["sha256"],
            files=dict(entry.get("files") or {Path(entry["path"]).name: entry["sha256"]}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelFolderError(f"manifest entry for graph {name!r} is incomplete (missing {error})") from None


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check a model folder's manifest; every problem is one clear ModelFolderError."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder: give the folder that `python -m export` wrote")
    raw = _read_json(folder / MANIFEST_FILE, "not a folder written by `python -m export`")
    if raw.get("format") != FORMAT_NAME:
        raise ModelFolderError(f"{folder / MANIFEST_FILE} is not an {FORMAT_NAME} manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"manifest format version {version!r} is not supported by this runtime (it reads version "
            f"{FORMAT_VERSION}); re-export the model with the matching `python -m export`"
        )
    entries = raw.get("graphs")
    if not isinstance(entries, dict):
        raise ModelFolderError(f"{folder / MANIFEST_FILE} lists no graphs")
    missing = [name for name in REQUIRED_GRAPHS if name not in entries]
    if missing:
        raise ModelFolderError(f"manifest lists no {', '.join(missing)} graph: the export is incomplete")
    graphs = {name: graph_info(folder, name, entry) for name, entry in entries.items()}
    for info in graphs.values():
        if not info.path.is_file():
            raise ModelFolderError(f"{info.path} is missing: the model folder is incomplete")
    for relative, what in ((SCHEDULER_CONFIG, "scheduler config"), (Path(TOKENIZER_DIR), "tokenizer")):
        if not (folder / relative).exists():
            raise ModelFolderError(f"{folder / relative} is missing: the model folder has no {what}")
    _check_fields(raw, folder / MANIFEST_FILE)
    manifest = Manifest(folder=folder, raw=raw, graphs=graphs)
    from .controlnets import controlnet_models  # the added ControlNets' section, checked the same way
    from .upscalers import upscaler_models  # the added upscalers' section, checked the same way
    from .vaes import vae_choices  # the added VAEs' section: types, names, files inside the folder

    vae_choices(manifest)
    upscaler_models(manifest)
    controlnet_models(manifest)
    return manifest


def text_vocab_size(manifest: Manifest) -> int:
    """Rows of the text encoder's token table (ids past it select extra_embeddings rows)."""
    config = _read_json(manifest.folder / "text_encoder" / "config.json", "the text encoder config is missing")
    return int(config.get("vocab_size", 49408))


def read_scheduler_config(folder: str | Path) -> dict[str, Any]:
    return _read_json(Path(folder) / SCHEDULER_CONFIG, "the model folder has no scheduler config")


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(manifest: Manifest) -> None:
    """Check every graph file against the sha256 the exporter wrote: weights changed on disk
    (bit rot, a bad copy) otherwise give black or noisy images without any error."""
    from .controlnets import controlnet_graphs
    from .upscalers import upscaler_models
    from .vaes import vae_choices

    added = [choice for choice in vae_choices(manifest).values() if choice.name is not None]
    extra = [info for choice in added for info in (choice.decoder, choice.encoder) if info is not None]
    extra += [model.graph for model in upscaler_models(manifest).values()]
    extra += list(controlnet_graphs(manifest).values())
    for info in [*manifest.graphs.values(), *extra]:
        for name, expected in info.files.items():
            path = info.path.parent / name
            if not path.is_file():
                raise ModelFolderError(f"{path} is missing: the model folder is incomplete")
            if sha256_of_file(path) != expected:
                raise ModelFolderError(
                    f"{path} does not match its sha256 in the manifest: the file is corrupt; copy or export it again"
                )
