"""Model upscalers (ESRGAN family and what else spandrel loads) exported beside the model by
`python -m export --add-upscaler`: the manifest's `upscalers` section, checked, and their ONNX
sessions, loaded on first use on the pipeline's provider.

Each is `upscalers/<name>/model.onnx`: `image` (1, 3, H, W) in [0, 1] -> `upscaled` (1, 3, sH, sW)
in [0, 1], H and W padded by the caller to the model's size requirements (runtime.images.model_upscale).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import registry
from ..errors import ModelFolderError
from .model_folder import OPENVINO_TARGET, GraphInfo, Manifest, graph_info, read_manifest
from .sessions import GraphSession, SessionConfig, resolve_provider

log = logging.getLogger(__name__)

UPSCALERS_DIR = "upscalers"
UPSCALER_INPUT, UPSCALER_OUTPUT = "image", "upscaled"
# A1111's ESRGAN_tile / ESRGAN_tile_overlap defaults: every ESRGAN-family upscaler tiles with them.
A1111_TILE_SIZE, A1111_TILE_OVERLAP = 192, 8
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. +()-]{0,127}$")


def check_upscaler_name(name: str) -> None:
    """A name is also a folder name under upscalers/, and must not shadow a built-in upscaler."""
    if not _NAME.match(name) or ".." in name:
        raise ValueError("use letters, digits and . _ - + ( ) space, starting with a letter, digit or _")
    if registry.builtin_upscaler(name) is not None:
        raise ValueError("that is a built-in upscaler's name")


def tile_for(tiling: str, minimum: int, multiple_of: int) -> tuple[int, int]:
    """(tile size, overlap): A1111's 192/8, grown to what the model accepts; 0 (no tiling) for a model
    that tiles internally. A1111 tiles those too; spandrel says tiles would hurt them."""
    if tiling == "internal":
        return 0, 0
    size = max(A1111_TILE_SIZE, minimum)
    return -(-size // multiple_of) * multiple_of, A1111_TILE_OVERLAP


@dataclass(frozen=True)
class UpscalerModel:
    name: str
    file: str  # the file it was exported from (its stem is a second name for it)
    architecture: str
    scale: int
    minimum: int  # size requirements: padded up to (spandrel's SizeRequirements)
    multiple_of: int
    square: bool
    tile_size: int  # 0: untiled
    tile_overlap: int
    graph: GraphInfo

    @property
    def info(self) -> registry.UpscalerInfo:
        return registry.model_upscaler(self.name, Path(self.file).stem, self.scale)


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _model(folder: Path, name: str, entry: Any) -> UpscalerModel:
    where = f"manifest: upscalers[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("graph"), dict):
        raise ModelFolderError(f"{where} is not an object with 'graph'")
    try:
        check_upscaler_name(name)
    except ValueError as error:
        raise ModelFolderError(f"{where}: bad name ({error})") from None
    sizes = entry.get("size_requirements") or {}
    numbers = {"scale": (entry.get("scale"), 1), "tile_size": (entry.get("tile_size"), 0),
               "tile_overlap": (entry.get("tile_overlap"), 0), "minimum": (sizes.get("minimum", 0), 0),
               "multiple_of": (sizes.get("multiple_of", 1), 1)}  # fmt: skip
    for key, (value, low) in numbers.items():
        if not _whole(value, low):
            raise ModelFolderError(f"{where}: {key!r} must be a whole number >= {low}, not {value!r}")
    if not isinstance(entry.get("file"), str) or not isinstance(entry.get("architecture"), str):
        raise ModelFolderError(f"{where}: 'file' and 'architecture' must be strings")
    if entry["tile_size"] and entry["tile_overlap"] >= entry["tile_size"]:
        raise ModelFolderError(f"{where}: the tile overlap must be smaller than the tile")
    graph = graph_info(folder, name, entry["graph"])
    if not graph.path.resolve().is_relative_to((folder / UPSCALERS_DIR).resolve()):
        raise ModelFolderError(f"{where}: {graph.path} lies outside {UPSCALERS_DIR}/")
    if not graph.path.is_file():
        raise ModelFolderError(f"{graph.path} is missing: the model folder is incomplete")
    return UpscalerModel(
        name, entry["file"], entry["architecture"], entry["scale"], numbers["minimum"][0],
        numbers["multiple_of"][0], bool(sizes.get("square", False)), entry["tile_size"], entry["tile_overlap"], graph,
    )  # fmt: skip


def upscaler_models(manifest: Manifest) -> dict[str, UpscalerModel]:
    """The added upscalers by name (the manifest's `upscalers` section checked on the way)."""
    section = manifest.raw.get("upscalers") or {}
    if not isinstance(section, dict):
        raise ModelFolderError("manifest: 'upscalers' must be an object (name -> upscaler)")
    return {name: _model(manifest.folder, name, entry) for name, entry in section.items()}


class UpscalerSessions:
    """The upscalers' ONNX sessions, each loaded when first used (a 4x RRDBNet holds 67 MB of fp32
    weights) and kept. One upscale runs at a time: the tiles of one image already fill the cores,
    and two large images at once would double the memory bound."""

    def __init__(self, manifest: Manifest, provider: str, config: SessionConfig) -> None:
        self.models = upscaler_models(manifest)
        self.provider = provider
        self.config = config
        self.lock = threading.Lock()
        self._sessions: dict[str, GraphSession] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, provider: str = "auto", threads: int | None = None) -> UpscalerSessions:
        """The upscalers of an export without its Stable Diffusion graphs (`python -m runtime upscale`)."""
        manifest = read_manifest(folder)
        if manifest.target == OPENVINO_TARGET:
            raise ModelFolderError(f"{manifest.folder} is an OpenVINO export, which holds no ONNX upscalers")
        return cls(manifest, resolve_provider(provider), SessionConfig(provider=provider, threads=threads))

    @property
    def infos(self) -> tuple[registry.UpscalerInfo, ...]:
        return tuple(model.info for model in self.models.values())

    def runner(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        """The upscaler's graph as a function of (1, 3, h, w) pixels; its session loads on first use."""
        if name not in self._sessions:
            self._sessions[name] = GraphSession(self.models[name].graph, self.provider, self.config)
            log.info("loaded upscaler %s", name)
        session = self._sessions[name]
        return lambda pixels: session.run({UPSCALER_INPUT: pixels})
