"""The UNet's ControlNet residual inputs at run time: which ones a UNet graph has, the zeros fed
when no ControlNet runs, and the check of residuals a ControlNet gave.

Every export since ControlNet support has them (12 down + 1 mid for SD1.x), so one UNet graph
serves generations with and without a ControlNet. Without one, zeros are fed: adding zeros is
cheap next to the UNet's convolutions, and the zeros are allocated once per latent shape (IO
binding copies them to the device once per bound shape). Exports from before have no such inputs;
they still run, and asking them for a ControlNet is one clear error naming the re-export.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelFolderError
from .model_folder import (
    CONTROL_MID_RESIDUAL,
    UNET_CONTEXT,
    UNET_SAMPLE,
    UNET_TIMESTEP,
    ControlResidual,
    GraphInfo,
    control_residuals,
)

MAX_ZERO_SHAPES = 4  # latent shapes whose zeros are kept: hires fix's two sizes, each for two batch sizes


def unet_residuals(info: GraphInfo) -> tuple[ControlResidual, ...]:
    """The residual inputs of the UNet graph `info` in ControlNet output order; () for an export
    from before ControlNet support. Their sizes follow the UNet config written beside the graph."""
    if CONTROL_MID_RESIDUAL not in info.inputs:
        return ()
    config_path = info.path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        residuals = control_residuals(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{config_path} does not describe the UNet ({error}); re-export the model") from None
    names = {residual.name for residual in residuals}
    declared = set(info.inputs) - {UNET_SAMPLE, UNET_TIMESTEP, UNET_CONTEXT}
    if declared != names:
        raise ModelFolderError(
            f"{info.path} has ControlNet inputs {sorted(declared)}, but its config gives {sorted(names)}; "
            "re-export the model"
        )
    return residuals


def export_folder(info: GraphInfo) -> Path:
    return info.path.parent.parent


def no_controlnet_error(folder: Path) -> ModelFolderError:
    """What asking an export from before ControlNet support for a ControlNet gives."""
    return ModelFolderError(
        f"{folder} was exported before ControlNet support: its UNet takes no ControlNet residuals. Re-export "
        f"it (python -m export --model SOURCE --output {folder} --overwrite), then add ControlNets with "
        f"python -m export --add-controlnet FILE --output {folder}"
    )


class ResidualInputs:
    """One UNet session's residual inputs: their order and dtypes, the zeros fed when no ControlNet
    runs (kept per latent shape, a few shapes at most) and the feed of a ControlNet's residuals."""

    def __init__(self, info: GraphInfo, input_types: dict[str, np.dtype | str]) -> None:
        self.folder = export_folder(info)
        self.residuals = unet_residuals(info)
        self.types = {residual.name: np.dtype(input_types[residual.name]) for residual in self.residuals}
        self._zeros: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()

    def zeros(self, sample_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Zero residuals for latents of `sample_shape` ({} for a UNet without residual inputs),
        shared by every call of that shape: read only, never written."""
        key = tuple(sample_shape)
        if key in self._zeros:
            self._zeros.move_to_end(key)
            return self._zeros[key]
        self._zeros[key] = self.new_zeros(key)
        while len(self._zeros) > MAX_ZERO_SHAPES:
            self._zeros.popitem(last=False)
        return self._zeros[key]

    def new_zeros(self, sample_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Zero residuals of their own, for buffers that are written later (a CPU OrtValue made from
        an array shares its memory). numpy's zeros are untouched pages until written."""
        return {item.name: np.zeros(item.shape(sample_shape), dtype=self.types[item.name]) for item in self.residuals}

    def feed(self, residuals: Sequence[np.ndarray] | None, sample_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The residual inputs for one UNet call: `residuals` (a ControlNet's, in order) cast to
        the graph's dtypes, or zeros when None."""
        if residuals is None:
            return self.zeros(sample_shape)
        if not self.residuals:
            raise no_controlnet_error(self.folder)
        if len(residuals) != len(self.residuals):
            raise ValueError(f"the UNet takes {len(self.residuals)} ControlNet residuals, not {len(residuals)}")
        feed = {}
        for residual, value in zip(self.residuals, residuals, strict=True):
            expected = residual.shape(tuple(sample_shape))
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"ControlNet residual {residual.name} has shape {tuple(value.shape)}; latents of shape "
                    f"{tuple(sample_shape)} need {expected}"
                )
            feed[residual.name] = np.ascontiguousarray(value, dtype=self.types[residual.name])
        return feed


class ResidualsMixin:
    """What a UNet step class (onnxruntime's UNetSession, OpenVINOUNet) says about its residual
    inputs, from its `residual_inputs`."""

    residual_inputs: ResidualInputs

    @property
    def residuals(self) -> tuple[ControlResidual, ...]:
        """The ControlNet residual inputs in the order a step takes them; () for older exports."""
        return self.residual_inputs.residuals

    @property
    def takes_residuals(self) -> bool:
        """False for exports from before ControlNet support (see no_controlnet_error)."""
        return bool(self.residuals)
