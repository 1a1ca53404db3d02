"""`python -m export --add-controlnet FILE|FOLDER --output EXISTING_DIR`: a ControlNet exported beside
the model for the runtime's ControlNet units, without exporting the rest again.

Sources: a diffusers `ControlNetModel` folder (config.json + weights), or the single files people
download (`control_v11p_sd15_canny.pth` / `.safetensors`: lllyasviel's layout, keys with or without
`control_model.`; ControlNet 1.0 files that hold the whole model too). Pickles are read weights-only
and need --allow-pickle, as checkpoints (checkpoint_file). Single files are converted offline by
diffusers' own converter (single_file_utils.convert_controlnet_checkpoint) into a ControlNet whose
config is the export's own UNet's: the ControlNet must fit that UNet tensor for tensor, and one
that does not (SDXL, SD2.x's cross-attention width, other channel widths, Control-LoRAs, difference
files, adapters) is refused in one line.

Layout: `controlnets/<name>/model.onnx` (OpenVINO IR for openvino exports), (sample, timestep,
encoder_hidden_states, controlnet_cond in [0, 1] at pixel size) -> one output per ControlNet input
of the UNet graph at conditioning scale 1; the export's precision and target; validated against
torch like every graph. Recorded in manifest.json under `controlnets`: name -> {file, source,
sha256, hash (A1111's short model hash), global_average_pooling, conditioning_channels, graph}.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.checkpoint_file import CheckpointError, _load_pickle, _state_dict, is_safetensors
from export.exporter import (
    ExportOptions,
    GraphReport,
    finish_graph,
    graph_entry,
    plan_graph,
    validates_working_size,
    write_json,
)
from export.graphs import controlnet_spec, export_fp32
from export.ldm_layout import CONTROLNET_PREFIX
from export.modules import ControlNetForOnnx
from export.validate import available_provider
from runtime.errors import UserError
from runtime.graphs import model_folder as layout
from runtime.graphs.controlnets import check_controlnet_name
from runtime.graphs.residuals import no_controlnet_error

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# What a diffusers folder's weights are called, preferred first (.bin files are pickles).
FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
# Config fields that fix the ControlNet's architecture; they must equal the export's UNet's.
ARCHITECTURE_FIELDS = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "mid_block_type",
)


class ControlNetError(UserError):
    """The --add-controlnet source cannot serve this export."""


@dataclass
class AddControlNetOptions:
    source: str
    output: Path
    name: str | None = None  # default: the file's stem (or the folder's name), as A1111 lists ControlNets
    overwrite: bool = False
    allow_pickle: bool = False


@dataclass
class LoadedControlNet:
    module: torch.nn.Module  # diffusers ControlNetModel, float32, eval, never pooling itself
    pooled: bool  # A1111's global_average_pooling (the shuffle models)
    weights: Path  # the file its weights came from
    source: Path


def a1111_short_hash(path: Path) -> str:
    """A1111's old model hash (modules/sd_models.py model_hash), which its ControlNet extension
    shows after each model's name: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


def controlnet_config(unet_config: dict[str, Any], conditioning_channels: int) -> dict[str, Any]:
    """A ControlNetModel config of the export's UNet architecture (what ControlNetModel.from_unet
    copies), for a control image of `conditioning_channels` channels."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {key: value for key, value in unet_config.items() if key in accepted}
    return {**config, "conditioning_channels": conditioning_channels, "global_pool_conditions": False}


def _where(path: Path) -> str:
    return f"--add-controlnet {path.name}"


def read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or of a pickle read weights-only (with --allow-pickle)."""
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ControlNetError(f"{_where(path)} is not a readable .safetensors file: {_first_line(error)}") from None
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise ControlNetError(f"{_where(path)}: expected .safetensors, .pth, .pt, .ckpt or a diffusers folder")
    if not allow_pickle:
        raise ControlNetError(
            f"{_where(path)} is a pickle, which can run arbitrary code when loaded; convert it to .safetensors, "
            "or pass --allow-pickle to load its weights only (no code is run)"
        )
    try:
        return _state_dict(_load_pickle(path), path.name)
    except CheckpointError as error:
        raise ControlNetError(f"--add-controlnet {error}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def diffusers_names(state: dict[str, torch.Tensor], layers_per_block: int, where: str) -> dict[str, torch.Tensor]:
    """A single file's ControlNet weights under diffusers' names: lllyasviel's layout (with or
    without `control_model.`) through diffusers' converter; a diffusers-layout file as it is. What
    is not a ControlNet this export can use is refused here, saying what it is."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    if any(key.startswith(CONTROLNET_PREFIX) for key in state):  # ControlNet 1.0 files hold the SD model too
        state = {key.removeprefix(CONTROLNET_PREFIX): value for key, value in state.items()
                 if key.startswith(CONTROLNET_PREFIX)}  # fmt: skip
    if "lora_controlnet" in state:
        raise ControlNetError(f"{where} is a Control-LoRA (low-rank ControlNet weights over the base UNet's), "
                              "which is not supported; use a full ControlNet")  # fmt: skip
    if "difference" in state:
        raise ControlNetError(f"{where} is a 'difference' ControlNet (stored as weights minus SD1.5's), which is "
                              "not supported; use a full ControlNet (e.g. control_v11p_sd15_*)")  # fmt: skip
    if "input_hint_block.0.weight" not in state:
        raise ControlNetError(f"{where} is not a ControlNet: it has no control image embedding (input_hint_block); "
                              "T2I-Adapters, IP-Adapters and other control models are not supported")  # fmt: skip
    if "label_emb.0.0.weight" in state:
        raise ControlNetError(f"{where} is an SDXL ControlNet; this export's UNet is SD1.x")
    return convert_controlnet_checkpoint(state, {"layers_per_block": layers_per_block})


def architecture_problem(state: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> str | None:
    """How diffusers-named ControlNet weights do not fit the export's UNet, in words; None if they fit
    as far as the widths tell (the fill checks every tensor after)."""
    if any(key.startswith(("add_embedding.", "class_embedding.")) for key in state):
        return "a ControlNet with added class or size embeddings (SDXL's kind); this export's UNet is SD1.x"
    conv_in = state.get("conv_in.weight")
    width, latents = unet_config["block_out_channels"][0], unet_config["in_channels"]
    if conv_in is not None and (conv_in.shape[0], conv_in.shape[1]) != (width, latents):
        return (f"a ControlNet of {conv_in.shape[0]} channels over {conv_in.shape[1]} latent channels; this export's "
                f"UNet has {width} over {latents}")  # fmt: skip
    context = next((value.shape[1] for key, value in state.items() if key.endswith("attn2.to_k.weight")), None)
    if context is not None and context != unet_config["cross_attention_dim"]:
        known = {1024: " (SD2.x)", 2048: " (SDXL)"}.get(int(context), "")
        return (f"a ControlNet of cross-attention width {context}{known}; this export's UNet has "
                f"{unet_config['cross_attention_dim']} (SD1.x)")  # fmt: skip
    return None


def fill(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `module`, every tensor present and of its shape, nothing left over."""
    expected = module.state_dict()
    loaded = {}
    for key, tensor in expected.items():
        value = state.get(key)
        if value is None:
            raise ControlNetError(f"{where} lacks {key}: not a ControlNet of this export's UNet architecture")
        if value.ndim == 2 and tensor.ndim == 4:
            value = value[:, :, None, None]  # attention projections stored as linear layers (A1111 reshapes too)
        if tuple(value.shape) != tuple(tensor.shape):
            wanted = tuple(tensor.shape)
            raise ControlNetError(f"{where}: {key} is {tuple(value.shape)}; this export's UNet needs {wanted}")
        loaded[key] = value.float()
    extra = sorted(key for key, value in state.items() if value is not None and key not in expected)
    if extra:
        raise ControlNetError(f"{where} has weights that this export's ControlNet architecture lacks, e.g. {extra[0]}")
    module.load_state_dict(loaded)


def load_controlnet(source: str, unet_config: dict[str, Any], allow_pickle: bool) -> LoadedControlNet:
    from diffusers import ControlNetModel

    path = Path(source)
    if not path.exists():
        raise ControlNetError(f"--add-controlnet {source} does not exist")
    where = _where(path)
    if path.is_dir():
        weights, config = folder_source(path, unet_config)
        pooled = bool(config.pop("global_pool_conditions", False))
        state = read_weights(weights, allow_pickle)
        config["global_pool_conditions"] = False
    else:
        weights = path
        state = diffusers_names(read_weights(path, allow_pickle), unet_config["layers_per_block"], where)
        hint = state.get("controlnet_cond_embedding.conv_in.weight")
        config = controlnet_config(unet_config, int(hint.shape[1]) if hint is not None else 3)
        pooled = "shuffle" in path.stem.lower()  # as A1111's extension decides global_average_pooling
    problem = architecture_problem(state, unet_config)
    if problem is not None:
        raise ControlNetError(f"{where} is {problem}")
    module = ControlNetModel.from_config(config)
    fill(module, state, where)
    return LoadedControlNet(module.eval(), pooled, weights, path)


def folder_source(path: Path, unet_config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """(weights file, config) of a diffusers ControlNetModel folder whose architecture is the UNet's."""
    where = _where(path)
    if not (path / "config.json").is_file():
        raise ControlNetError(f"{where} is a folder without a diffusers ControlNet (config.json)")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ControlNetError(f"{where}/config.json cannot be read: {_first_line(error)}") from None
    if not isinstance(raw, dict) or raw.get("_class_name", "ControlNetModel") != "ControlNetModel":
        kind = raw.get("_class_name") if isinstance(raw, dict) else type(raw).__name__
        raise ControlNetError(f"{where} holds a {kind}, not a ControlNetModel")
    config, reference = with_defaults(raw), with_defaults(controlnet_config(unet_config, 3))
    differing = [key for key in ARCHITECTURE_FIELDS if _plain(config.get(key)) != _plain(reference.get(key))]
    if differing:
        key = differing[0]
        raise ControlNetError(f"{where} is a ControlNet for another architecture: {key} {config.get(key)!r}; this "
                              f"export's UNet has {reference.get(key)!r}")  # fmt: skip
    weights = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ControlNetError(f"{where} has no weights ({' or '.join(FOLDER_WEIGHTS[:3])})")
    return weights, config


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A ControlNetModel config as diffusers builds it: every init argument, defaults for those not given."""
    from diffusers import ControlNetModel

    parameters = inspect.signature(ControlNetModel.__init__).parameters
    defaults = {key: item.default for key, item in parameters.items() if key != "self"}
    return {**defaults, **{key: value for key, value in config.items() if key in defaults}}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def default_name(source: str) -> str:
    path = Path(source.rstrip("/"))
    return path.name if path.is_dir() else path.stem


def add_controlnet(options: AddControlNetOptions) -> GraphReport:
    folder = options.output.resolve()
    manifest = layout.read_manifest(folder)
    if layout.CONTROL_MID_RESIDUAL not in manifest.graphs["unet"].inputs:
        raise ControlNetError(str(no_controlnet_error(folder)))
    name = options.name or default_name(options.source)
    try:
        check_controlnet_name(name)
    except ValueError as error:
        raise ControlNetError(f"ControlNet name {name!r}: {error}") from None
    entries = dict(manifest.raw.get("controlnets") or {})
    final = folder / layout.CONTROLNETS_DIR / name
    if (name in entries or final.exists()) and not options.overwrite:
        raise ControlNetError(
            f"{folder} already has a ControlNet named {name!r}; nothing was changed. Pass --overwrite to replace it"
        )
    unet_config = json.loads((manifest.graphs["unet"].path.parent / "config.json").read_text(encoding="utf-8"))
    loaded = load_controlnet(options.source, unet_config, options.allow_pickle)
    staging = folder / layout.CONTROLNETS_DIR / f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        entry = _export(loaded, name, staging, manifest, unet_config)
        if final.exists():
            shutil.rmtree(final)
        (staging / name).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report, graph = entry
    entries[name] = {
        "file": loaded.source.name,
        "source": options.source,
        "sha256": layout.sha256_of_file(loaded.weights),
        "hash": a1111_short_hash(loaded.weights),
        "global_average_pooling": loaded.pooled,
        "conditioning_channels": int(loaded.module.config.conditioning_channels),
        "graph": graph,
    }
    scratch = folder / f".{layout.MANIFEST_FILE}.{os.getpid()}"
    write_json(scratch, {**manifest.raw, "controlnets": entries})
    scratch.replace(folder / layout.MANIFEST_FILE)  # atomic: the manifest is whole, old or new
    return report


def _export(
    loaded: LoadedControlNet, name: str, staging: Path, manifest: layout.Manifest, unet_config: dict[str, Any]
) -> tuple[GraphReport, dict[str, Any]]:
    """The graph staged as <staging>/<name>/... at the export's precision and target (kept fp32 if
    fp16 misses the tolerance, as every graph); its manifest entry."""
    target = manifest.target
    working = None
    if validates_working_size(target, available_provider(target)):
        working = manifest.default_size // manifest.vae_scale_factor
    # Text conditioning of CLIP's scale (its hidden states after the final layer norm are near unit scale).
    context = torch.randn(2, 77, manifest.text_width, generator=torch.Generator().manual_seed(0))
    residuals = layout.control_residuals(unet_config)
    module = ControlNetForOnnx(loaded.module, loaded.pooled).eval()
    spec = controlnet_spec(module, name, residuals, context, working)
    log.info("tracing ControlNet %s", name)
    report = GraphReport(name, manifest.precision)
    options = ExportOptions(model=str(loaded.source), output=staging, target=target)
    job = plan_graph(spec, staging, options, report)
    export_fp32(spec, job.fp32_path)
    spec.module = None
    files, result, note, disabled = finish_graph(job, manifest.precision)
    entry = graph_entry(staging, name, files, result, note, target, disabled)
    entry["path"] = str(Path(layout.CONTROLNETS_DIR) / entry["path"])
    shutil.rmtree(staging / "_work")
    return report, entry
