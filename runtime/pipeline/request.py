"""What a generation is once checked: the request, its conditioning pieces, its plan (Prepared),
and the checks of single parameters that planning and running share."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import registry
from ..control.planning import ControlPlan
from ..errors import InvalidRequestError, NonFiniteError
from ..images.hires import HiresPlan
from ..images.img2img import InitPlan
from ..sampling.params import SamplerParams
from ..sampling.schedules import Schedule
from ..text.conditioning import PromptChunks
from ..text.embeddings import ExtraRows
from ..text.extra_networks import LoraUse

MIN_SIZE = 64
MAX_WEIGHT = 1000.0  # far above any useful emphasis; bounds what one weight can do to the embeddings
# Each AND part is one more UNet half per step; A1111 sets no bound, we bound the batch it makes.
MAX_AND_PARTS = 16
MAX_SEED = 2**32 - 1  # A1111's range; random seeds come from [0, 2**32 - 2] as in the web UI
MAX_GENERATOR_SEED = 2**64 - 1  # torch.manual_seed's range: seed + ENSD must fit in it


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: list[int]
    sampler: str
    schedule: str
    rng: str
    eta_noise_seed_delta: int
    pad_conds: bool = False  # A1111's "Pad prompt/negative prompt" (pad_cond_uncond), off there by default
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers, one of the export's (prepare() puts its default)
    sampler_params: SamplerParams = field(default_factory=SamplerParams)  # A1111's eta, s_churn, ... s_noise


def require_int(field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequestError(field_name, f"must be an integer, not {value!r}")
    return int(value)


def check_size(field_name: str, value: Any, multiple: int) -> int:
    value = require_int(field_name, value)
    if value < MIN_SIZE or value % multiple:
        raise InvalidRequestError(field_name, f"must be a multiple of {multiple} and at least {MIN_SIZE}, not {value}")
    return value


def resolve_seeds(seed: int | None, count: int) -> list[int]:
    """A1111: seed -1 (or None) picks a random one; image i of a batch uses seed + i."""
    seed = -1 if seed is None else require_int("seed", seed)
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError("seed", f"must be -1 (random) or between 0 and {MAX_SEED}, not {seed}")
    return [seed + index for index in range(count)]


@dataclass(frozen=True, eq=False)
class CondPiece:
    """The text conditioning of the sampler calls before `until_step`: run() picks, for call i
    (counted from 0 as A1111's CFGDenoiser counts them), the first piece with i < until_step.
    A prompt without editing, alternation or AND is one piece for every step."""

    until_step: int
    conds: tuple[str, ...]  # the texts of the prompt's AND parts (one text without AND) ...
    weights: tuple[float, ...]  # ... and their weights
    uncond: str | None  # the negative prompt's text; None when guidance is off (scale <= 1)


@dataclass(frozen=True, eq=False)
class Prepared:
    """A generation checked and planned once: what run() needs and nothing it must re-check."""

    request: GenerationRequest
    schedule: Schedule
    conditioning: tuple[CondPiece, ...]
    chunks: dict[str, PromptChunks]  # every text a piece names (with pad_conds also "", the empty chunk)
    padded: bool  # pad_conds padded a prompt or negative prompt with empty chunks (infotext "Pad conds")
    chunk_counts: dict[str, int]  # field -> 75-token chunks of its longest text (the server's limit)
    init: InitPlan | None = None  # img2img / inpainting
    hires: HiresPlan | None = None  # txt2img's hires fix
    hires_conditioning: tuple[CondPiece, ...] = ()
    hires_chunks: dict[str, PromptChunks] = field(default_factory=dict)  # as chunks, second pass
    vae_tiling: str = "auto"  # "auto" | "on" | "off": runtime.images.tiling
    loras: tuple[LoraUse, ...] = ()  # the prompt's <lora:...> tags (removed from the encoded text)
    extra: ExtraRows | None = None  # the embeddings the prompts name: text-encoder extra_embeddings rows
    vae: str | None = None  # an added VAE by name (runtime.graphs.vaes); None: the export's own
    control: ControlPlan | None = None  # ControlNet units and their detected maps (runtime.control.planning)

    @property
    def seeds(self) -> list[int]:
        return self.request.seeds

    def with_first_seed(self, seed: int) -> Prepared:
        """The same generation for seeds seed, seed+1, ... (A1111's n_iter batches continue the seeds)."""
        seeds = resolve_seeds(seed, len(self.request.seeds))
        return replace(self, request=replace(self.request, seeds=seeds))


def check_pixels(field_name: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidRequestError(
            field_name, f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels} per image "
            "(max_pixels; CLI --max-pixels)",
        )  # fmt: skip


def check_lora_cache_mb(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(
            "lora_cache_mb", f"must be a whole number of MiB >= 0 (0 keeps no LoRA-patched sessions), not {value!r}"
        )
    return value


def check_finite(values: np.ndarray, what: str) -> None:
    """NaN or inf would be saved as a black image with no error: fail and say why it happens."""
    if not np.isfinite(values).all():
        raise NonFiniteError(
            f"{what} contain NaN or infinite values: the model's weights are likely corrupt (check them with "
            "--verify / verify=True), or an fp16 graph overflowed (export with --precision fp32)"
        )


def check_guidance(guidance_scale: Any) -> None:
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, int | float)
        or not np.isfinite(guidance_scale)
    ):
        raise InvalidRequestError("cfg_scale", f"must be a number, not {guidance_scale!r}")
    if guidance_scale < 0:
        raise InvalidRequestError("cfg_scale", f"must not be negative, not {guidance_scale}")


def uses_ensd(request: GenerationRequest) -> bool:
    """Whether the infotext names ENSD: A1111 writes it for its "uses_ensd" samplers only, although
    ENSD re-seeds every noise drawn after the initial latent (Restart's restarts too)."""
    return request.eta_noise_seed_delta > 0 and registry.sampler(request.sampler).ancestral
