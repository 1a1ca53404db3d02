"""A Pipeline's ControlNets: loaded on first use on the pipeline's provider and kept, as its added
VAEs are, and assembled for each sampling pass (runtime.control.injection) from a generation's plan."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..control.injection import PassControl, pass_unit
from ..control.planning import ControlPlan
from ..graphs.controlnets import ControlNetGraph, load_controlnet
from ..graphs.model_folder import CONTROL_COND, UNET_CONTEXT, UNET_SAMPLE, UNET_TIMESTEP, Manifest
from ..graphs.sessions import Sessions

log = logging.getLogger(__name__)


class ControlNets:
    """The loaded ControlNets of one export, by name. An SD1.x ControlNet holds about 360 M
    parameters (1.4 GB in fp32); like the VAEs, the ones a request named stay loaded."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._loaded: dict[str, ControlNetGraph] = {}

    def get(self, name: str, sessions: Sessions) -> ControlNetGraph:
        """ControlNet `name` on the provider and settings of `sessions` (the pipeline's)."""
        if name not in self._loaded:
            self._loaded[name] = load_controlnet(self.manifest, name, sessions)
            log.info("loaded ControlNet %s", name)
        return self._loaded[name]

    def for_pass(
        self, plan: ControlPlan | None, sessions: Sessions, hires_pass: bool, requested_steps: int | None
    ) -> Callable[[int], PassControl | None]:
        """The units guiding one pass (hr_option), for the pass's step count `total` (what its
        sampler runs). The extension's rule counts a txt2img first pass in `requested_steps`
        (A1111's sampling_steps), diffusers' rule the steps that run."""

        def make(total: int) -> PassControl | None:
            if plan is None:
                return None
            units = []
            for unit, detected in plan.pass_units(hires_pass):
                graph = self.get(unit.model, sessions)
                units.append(pass_unit(unit, detected, graph.run, hires_pass, graph.model.global_average_pooling))
            steps = requested_steps if plan.rule == "a1111" and requested_steps is not None else total
            return PassControl(units, plan.rule, steps) if units else None

        return make

    def release_memory(self) -> None:
        """One small run of each loaded ControlNet with arena shrinkage on (Sessions.release_memory's way)."""
        manifest, factor = self.manifest, self.manifest.vae_scale_factor
        small = {
            UNET_SAMPLE: np.zeros((1, manifest.latent_channels, 8, 8), np.float32),
            UNET_TIMESTEP: np.zeros((1,), np.float32),
            UNET_CONTEXT: np.zeros((1, 77, manifest.text_width), np.float32),
            CONTROL_COND: np.zeros((1, 3, 8 * factor, 8 * factor), np.float32),
        }
        for graph in self._loaded.values():
            graph.session.release_memory(small)
