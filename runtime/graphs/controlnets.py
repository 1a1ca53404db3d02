"""ControlNets exported beside the model by `python -m export --add-controlnet`: the manifest's
`controlnets` section, checked, and their graphs, loaded on the pipeline's provider.

Each is `controlnets/<name>/model.onnx` (or OpenVINO IR): (sample, timestep, encoder_hidden_states,
controlnet_cond) -> one residual per ControlNet input of the UNet graph, same names and shapes, at
conditioning scale 1 (the caller scales them). controlnet_cond is the control image, (batch,
channels, 8 * latent height, 8 * latent width) in [0, 1]. A ControlNet of A1111's
global_average_pooling kind (the shuffle models) already gives its residuals spatially averaged,
broadcast back to full size; the manifest says which it is, since A1111 also applies such a
ControlNet to the conditional half only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError, ModelFolderError
from .model_folder import (
    CONTROL_COND,
    CONTROLNETS_DIR,
    UNET_CONTEXT,
    UNET_SAMPLE,
    UNET_TIMESTEP,
    GraphInfo,
    Manifest,
    graph_info,
)
from .residuals import export_folder, no_controlnet_error
from .sessions import OPENVINO, GraphSession, Sessions, openvino_setup

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. +()-]{0,127}$")


def check_controlnet_name(name: str) -> None:
    """A name is also a folder name under controlnets/; A1111 lists "None" for no ControlNet."""
    if not _NAME.match(name) or ".." in name:
        raise ValueError("use letters, digits and . _ - + ( ) space, starting with a letter, digit or _")
    if name == "None":
        raise ValueError("'None' is A1111's name for no ControlNet")


@dataclass(frozen=True)
class ControlNetModel:
    name: str
    hash: str | None  # A1111's short model hash of the file (its list shows "name [hash]")
    global_average_pooling: bool  # A1111 applies such a ControlNet to the conditional half only
    graph: GraphInfo

    @property
    def title(self) -> str:
        """The name as A1111's ControlNet extension lists it: "control_v11p_sd15_canny [d14c016b]"."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name


def _model(folder: Path, name: str, entry: Any) -> ControlNetModel:
    where = f"manifest: controlnets[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("graph"), dict):
        raise ModelFolderError(f"{where} is not an object with 'graph'")
    try:
        check_controlnet_name(name)
    except ValueError as error:
        raise ModelFolderError(f"{where}: bad name ({error})") from None
    if not isinstance(entry.get("hash", ""), str | None) or not isinstance(entry.get("global_average_pooling"), bool):
        raise ModelFolderError(f"{where}: 'hash' must be a string and 'global_average_pooling' true or false")
    graph = graph_info(folder, name, entry["graph"])
    if not graph.path.resolve().is_relative_to((folder / CONTROLNETS_DIR).resolve()):
        raise ModelFolderError(f"{where}: {graph.path} lies outside {CONTROLNETS_DIR}/")
    if not graph.path.is_file():
        raise ModelFolderError(f"{graph.path} is missing: the model folder is incomplete")
    return ControlNetModel(name, entry.get("hash") or None, entry["global_average_pooling"], graph)


def controlnet_models(manifest: Manifest) -> dict[str, ControlNetModel]:
    """The added ControlNets by name (the manifest's `controlnets` section checked on the way)."""
    section = manifest.raw.get("controlnets") or {}
    if not isinstance(section, dict):
        raise ModelFolderError("manifest: 'controlnets' must be an object (name -> ControlNet)")
    return {name: _model(manifest.folder, name, entry) for name, entry in section.items()}


def controlnet_graphs(manifest: Manifest) -> dict[str, GraphInfo]:
    """name -> the ControlNet's graph."""
    return {name: model.graph for name, model in controlnet_models(manifest).items()}


class ControlNetSession(GraphSession):
    """A ControlNet on onnxruntime: UNet-sized weights, kept fp16 on the CPU provider as the UNet's."""

    lean_fp16 = True

    def run_all(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.memory_errors():
            outputs = self.session.run(None, self.feed(inputs))
        return {
            name: value.astype(np.float32, copy=False) for name, value in zip(self.output_names, outputs, strict=True)
        }


class ControlNetGraph:
    """One loaded ControlNet: run() gives its residuals in the order of the UNet's residual inputs."""

    def __init__(self, model: ControlNetModel, order: Sequence[str], session: Any) -> None:
        self.model = model
        self.order = tuple(order)
        self.session = session  # a ControlNetSession, or an OpenVINOGraph

    def run(
        self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray, cond: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """float32 residuals for latents `sample` (batch, 4, h, w), `timestep` (batch,), text
        `context` (batch, tokens, width) and control images `cond` (batch, channels, 8h, 8w) in [0, 1]."""
        inputs = {UNET_SAMPLE: sample, UNET_TIMESTEP: timestep, UNET_CONTEXT: context, CONTROL_COND: cond}
        if isinstance(self.session, ControlNetSession):
            outputs = self.session.run_all(inputs)
        else:
            outputs = _openvino_outputs(self.session, inputs, self.order)
        return tuple(outputs[name] for name in self.order)


def _openvino_outputs(graph: Any, inputs: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    graph.request.infer(graph.feed(inputs), share_inputs=True)
    return {name: np.array(graph.request.get_tensor(name).data, dtype=np.float32, copy=True) for name in names}


def load_controlnet(manifest: Manifest, name: str, sessions: Sessions) -> ControlNetGraph:
    """The ControlNet `name` on the provider and settings of `sessions` (the pipeline's). An export
    whose UNet takes no residuals (made before ControlNet support) is refused, naming the re-export."""
    models = controlnet_models(manifest)
    if name not in models:
        raise InvalidRequestError("model", f"unknown ControlNet {name!r}; available: {', '.join(models) or 'none'}")
    unet = sessions.unet
    if not unet.takes_residuals:
        raise no_controlnet_error(export_folder(unet.info))
    model = models[name]
    order = [residual.name for residual in unet.residuals]
    if set(model.graph.outputs) != set(order):
        raise ModelFolderError(
            f"{model.graph.path} gives residuals {sorted(model.graph.outputs)}, but the UNet takes {sorted(order)}: "
            f"it was added to another export; add it again with python -m export --add-controlnet"
        )
    if sessions.provider.startswith(OPENVINO):
        from .openvino_sessions import OpenVINOGraph

        core, properties = openvino_setup(sessions.config)
        return ControlNetGraph(model, order, OpenVINOGraph(core, model.graph, sessions.config.device, properties))
    return ControlNetGraph(model, order, ControlNetSession(model.graph, sessions.provider, sessions.config))
