"""A generation from request to images, in the order it happens: `request` (what a checked
generation is), `planning` (checks and plans without sessions: `prepare`, `Planner`),
`denoising` (guidance around the UNet), `running` (`Pipeline`: sessions, sampling loop, decode)."""

from .planning import Planner, prepare
from .request import MAX_GENERATOR_SEED, MAX_SEED, GenerationRequest, Prepared
from .running import Pipeline, PipelineOutput, to_pil

__all__ = [
    "MAX_GENERATOR_SEED",
    "MAX_SEED",
    "GenerationRequest",
    "Pipeline",
    "PipelineOutput",
    "Planner",
    "Prepared",
    "prepare",
    "to_pil",
]
