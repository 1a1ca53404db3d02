"""`python -m export --add-upscaler FILE --output EXISTING_DIR` (repeatable): image upscalers (ESRGAN,
Real-ESRGAN incl. Anime6B, SRVGGNetCompact, and whatever else spandrel identifies) exported to ONNX
for the runtime's hires fix and extras, without exporting the rest again.

The file is read as the web UI reads it, by spandrel (the architecture loader A1111 1.8+ and ComfyUI
use): its key layout tells the architecture and hyperparameters, no hand-written key maps. Pickles
(.pth/.pt/.ckpt) go through the exporter's weights-only reader (checkpoint_file) and --allow-pickle;
spandrel is handed the tensors only.

Layout: `upscalers/<name>/model.onnx` (one graph, `image` (1, 3, H, W) in [0, 1] -> `upscaled`,
dynamic H and W, clamped to [0, 1] as spandrel's descriptor does), validated against the torch
module, recorded in manifest.json under `upscalers`: name -> {file, sha256, architecture, scale,
size_requirements, tiling, tile_size, tile_overlap, graph}. Every file is staged first; the
upscalers move into place and the manifest is rewritten only when all of them passed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.checkpoint_file import CheckpointError, _load_pickle, _state_dict, is_safetensors
from export.exporter import ExportError, ExportOptions, GraphReport, finish_graph, graph_entry, plan_graph, write_json
from export.graphs import GraphSpec, ValidationCase, export_fp32
from runtime import registry
from runtime.graphs import model_folder as layout
from runtime.graphs.upscalers import (
    UPSCALER_INPUT,
    UPSCALER_OUTPUT,
    UPSCALERS_DIR,
    check_upscaler_name,
    tile_for,
)

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# spandrel purposes the runtime can serve: whole-image super-resolution and restoration (1x models).
# Face restoration needs face detection and alignment around the model; inpainting needs a mask.
SERVED_PURPOSES = ("SR", "Restoration")
TRACE_SIZE = (37, 29)  # odd sizes: the graph must not bake in a size it was traced with
CASE_SIZES = ((24, 40), (33, 17))


@dataclass
class AddUpscalerOptions:
    sources: list[str]
    output: Path
    name: str | None = None  # one source only; default: A1111's name for the file, else its stem
    overwrite: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class LoadedUpscaler:
    descriptor: Any  # spandrel.ImageModelDescriptor
    source: Path


class UpscalerError(ExportError):
    """The file cannot be served as an image upscaler."""


def import_spandrel() -> types.ModuleType:
    """spandrel imports torchvision at the top of two architectures we never serve (LaMa inpainting,
    RestoreFormer face restoration), and torchvision is not installable beside this torch. Without
    it, a stand-in whose functions refuse to run is importable while spandrel loads, then removed."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        import spandrel

        return spandrel
    stand_ins = _torchvision_stand_ins()
    sys.modules.update(stand_ins)
    try:
        import spandrel
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return spandrel


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    def unavailable(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("this architecture needs torchvision, which is not installed")

    modules = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms",
                                                          "torchvision.transforms.functional")}  # fmt: skip
    functional = modules["torchvision.transforms.functional"]
    functional.rotate = functional.normalize = unavailable
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest")
    modules["torchvision.transforms"].functional = functional
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    return modules


def _file_state(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise UpscalerError(f"--add-upscaler {path.name} is not a readable .safetensors file: {error}") from None
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise UpscalerError(f"--add-upscaler {path.name}: expected .pth, .pt, .ckpt or .safetensors")
    if not allow_pickle:
        raise UpscalerError(
            f"--add-upscaler {path.name} is a pickle; pass --allow-pickle to read its weights only (no code runs)"
        )
    loaded = _load_pickle(path)
    # Real-ESRGAN files keep their weights under params_ema / params; spandrel unwraps those.
    return loaded if isinstance(loaded, dict) else _state_dict(loaded, path.name)


def load_upscaler(source: str, allow_pickle: bool) -> LoadedUpscaler:
    """The file as spandrel reads it, refused unless it is a 3-channel image-to-image model we serve."""
    path = Path(source)
    if not path.is_file():
        raise UpscalerError(f"--add-upscaler {source} is not a file")
    spandrel = import_spandrel()
    try:
        state = spandrel.canonicalize_state_dict(_file_state(path, allow_pickle))
    except CheckpointError as error:
        raise UpscalerError(f"--add-upscaler {error}") from None
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(tensors)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(
            f"--add-upscaler {path.name} is not an upscaler of any architecture spandrel knows (its key layout "
            "matches none)"
        ) from None
    except Exception as error:  # a known layout with inconsistent shapes
        raise UpscalerError(f"--add-upscaler {path.name} could not be loaded: {_first_line(error)}") from None
    check_descriptor(descriptor, path.name)
    return LoadedUpscaler(descriptor.eval(), path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_descriptor(descriptor: Any, where: str) -> None:
    spandrel = sys.modules["spandrel"]
    what = f"--add-upscaler {where} is a {descriptor.architecture.name} model"
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{what} that needs more than an image (e.g. a mask), not an image upscaler")
    if descriptor.purpose not in SERVED_PURPOSES:
        raise UpscalerError(f"{what} for {descriptor.purpose}, not an image upscaler")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise UpscalerError(
            f"{what} with {descriptor.input_channels} input and {descriptor.output_channels} output channels; "
            "only RGB -> RGB models are served"
        )
    if not isinstance(descriptor.scale, int) or not 1 <= descriptor.scale <= 16:
        raise UpscalerError(f"{what} with scale {descriptor.scale!r}; a whole number 1-16 is needed")


class ClampedUpscaler(torch.nn.Module):
    """spandrel's ImageModelDescriptor call without its padding (the runtime pads tiles itself):
    the model, clamped to [0, 1]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).clamp(0, 1)


def _fit(size: tuple[int, int], requirements: Any) -> tuple[int, int]:
    pad_w, pad_h = requirements.get_padding(size[1], size[0])
    return size[0] + pad_h, size[1] + pad_w


def upscaler_spec(loaded: LoadedUpscaler, name: str) -> GraphSpec:
    """Traced and validated at sizes that fit the model's size requirements; validated against
    spandrel's own call (which pads and crops: on fitting sizes, exactly the model)."""
    descriptor = loaded.descriptor
    module = ClampedUpscaler(descriptor.model).eval()
    generator = torch.Generator().manual_seed(0)
    cases = []
    for size in CASE_SIZES:
        image = torch.rand(1, 3, *_fit(size, descriptor.size_requirements), generator=generator)
        with torch.no_grad():
            reference = descriptor(image).float().numpy()
        cases.append(ValidationCase({UPSCALER_INPUT: image.numpy()}, reference))
    trace = torch.rand(1, 3, *_fit(TRACE_SIZE, descriptor.size_requirements), generator=generator)
    return GraphSpec(
        name=name,
        module=module,
        trace_inputs={UPSCALER_INPUT: trace},
        output_name=UPSCALER_OUTPUT,
        dynamic_axes={UPSCALER_INPUT: {2: "height", 3: "width"}, UPSCALER_OUTPUT: {2: "out_height", 3: "out_width"}},
        optimizer_type="unet",  # plain convolution graphs: the optimizer's generic fusions only
        cases=cases,
    )


def default_name(path: Path) -> str:
    """A1111's display name for the files it knows ("R-ESRGAN 4x+ Anime6B"), else the file's stem."""
    return registry.A1111_UPSCALER_FILES.get(path.stem, path.stem)


def manifest_entry(loaded: LoadedUpscaler, graph: dict[str, Any]) -> dict[str, Any]:
    descriptor = loaded.descriptor
    requirements = descriptor.size_requirements
    tiling = descriptor.tiling.name.lower()  # supported | discouraged | internal
    tile_size, tile_overlap = tile_for(tiling, requirements.minimum, requirements.multiple_of)
    return {
        "file": loaded.source.name,
        "sha256": layout.sha256_of_file(loaded.source),
        "architecture": descriptor.architecture.id,
        "architecture_name": descriptor.architecture.name,
        "purpose": descriptor.purpose,
        "scale": descriptor.scale,
        "size_requirements": {
            "minimum": requirements.minimum,
            "multiple_of": requirements.multiple_of,
            "square": requirements.square,
        },
        "tiling": tiling,
        "tile_size": tile_size,
        "tile_overlap": tile_overlap,
        "graph": graph,
    }


def _names(options: AddUpscalerOptions) -> list[str]:
    if options.name is not None and len(options.sources) != 1:
        raise UpscalerError("--upscaler-name names one upscaler: give it with a single --add-upscaler")
    names = [options.name or default_name(Path(source)) for source in options.sources]
    for name in names:
        try:
            check_upscaler_name(name)
        except ValueError as error:
            raise UpscalerError(f"upscaler name {name!r}: {error}") from None
    doubled = {name for name in names if names.count(name) > 1}
    if doubled:
        raise UpscalerError(f"two --add-upscaler files would both be named {sorted(doubled)[0]!r}")
    return names


def add_upscalers(options: AddUpscalerOptions) -> list[GraphReport]:
    folder = options.output.resolve()
    manifest = layout.read_manifest(folder)
    target = manifest.target
    if target == layout.OPENVINO_TARGET:
        raise UpscalerError("--add-upscaler serves ONNX exports (--target cpu or cuda), not an OpenVINO export")
    names = _names(options)
    entries = dict(manifest.raw.get("upscalers") or {})
    for name in names:
        if (name in entries or (folder / UPSCALERS_DIR / name).exists()) and not options.overwrite:
            raise UpscalerError(f"{folder} already has an upscaler named {name!r}; nothing was changed. "
                                "Pass --overwrite to replace it")  # fmt: skip
    loaded = [load_upscaler(source, options.allow_pickle) for source in options.sources]
    staging = folder / UPSCALERS_DIR / f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    reports, added = [], {}
    try:
        for name, upscaler in zip(names, loaded, strict=True):
            added[name] = _export_one(upscaler, name, staging, target, manifest.precision, reports)
        for name in names:
            final = folder / UPSCALERS_DIR / name
            if final.exists():
                shutil.rmtree(final)
            (staging / name).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raw = {**manifest.raw, "upscalers": {**entries, **added}}
    scratch = folder / f".{layout.MANIFEST_FILE}.{os.getpid()}"
    write_json(scratch, raw)
    scratch.replace(folder / layout.MANIFEST_FILE)  # atomic: the manifest is whole, old or new
    return reports


def _export_one(
    upscaler: LoadedUpscaler, name: str, staging: Path, target: str, precision: str, reports: list[GraphReport]
) -> dict[str, Any]:
    """One upscaler's graph staged as <staging>/<name>/model.onnx at the export's precision (fp16 where
    the export computes fp16: kept fp32 if fp16 misses the tolerance, as every graph)."""
    spec = upscaler_spec(upscaler, name)
    log.info("tracing upscaler %s (%s, %dx)", name, upscaler.descriptor.architecture.name, upscaler.descriptor.scale)
    report = GraphReport(name, precision)
    job = plan_graph(spec, staging, ExportOptions(model=str(upscaler.source), output=staging, target=target), report)
    try:
        export_fp32(spec, job.fp32_path)
    except Exception as error:  # an architecture the TorchScript exporter cannot trace
        raise UpscalerError(f"{upscaler.source.name} ({upscaler.descriptor.architecture.name}) could not be "
                            f"exported to ONNX: {_first_line(error)}") from None  # fmt: skip
    files, result, note, disabled = finish_graph(job, precision)
    entry = graph_entry(staging, name, files, result, note, target, disabled)
    entry["path"] = str(Path(UPSCALERS_DIR) / entry["path"])
    shutil.rmtree(staging / "_work")
    reports.append(report)
    return manifest_entry(upscaler, entry)
