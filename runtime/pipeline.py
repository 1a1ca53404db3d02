"""Text-to-image on ONNX Runtime: prompt -> text conditioning -> sampler loop with CFG -> VAE.

The API follows diffusers' StableDiffusionPipeline (`Pipeline.from_pretrained(folder)`, then call
it with a prompt) and its defaults follow ACertainThing's model card (28 steps, Euler a, CFG 11).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, registry, samplers
from .conditioning import PromptChunks, empty_chunks, encode_chunks, prompt_to_chunks, unet_contexts
from .embeddings import EmbeddingLibrary, EmbeddingMatcher, ExtraRows, ti_hashes
from .errors import InvalidRequestError, NonFiniteError
from .extra_networks import LoraUse, parse_prompt
from .hires import HiresPlan, plan_hires
from .img2img import (
    InitPlan,
    apply_overlay,
    blend,
    default_size,
    encode_sample,
    fill_latents,
    plan_init,
    slice_schedule,
    start_step,
)
from .inputs import check_strength, load_image
from .limits import LORA_CACHE_MB, MAX_PIXELS
from .lora import LoraLibrary, LoraResolver, LoraSessions
from .metadata import format_infotext, infotext_number
from .model_folder import (
    TEXT_EXTRA,
    TEXT_INPUT,
    VAE_DECODER_INPUT,
    VAE_ENCODER_INPUT,
    Manifest,
    read_manifest,
    read_scheduler_config,
    text_vocab_size,
    verify_files,
)
from .prompt_schedule import ConditioningPlan
from .rng import NoiseGenerator, make_generator
from .schedules import Schedule, final_latents, make_schedule
from .sessions import GraphSession, SessionConfig, Sessions, load_sessions
from .tiling import VAE_TILING, TileSizes, tiled, use_tiling
from .tokenizer import ClipTokenizer
from .upscale import truncate, upscale_image, upscale_latents
from .vaes import resolve_vae, vae_choices, vae_label

log = logging.getLogger(__name__)

MIN_SIZE = 64
MAX_WEIGHT = 1000.0  # far above any useful emphasis; bounds what one weight can do to the embeddings
# Each AND part is one more UNet half per step; A1111 sets no bound, we bound the batch it makes.
MAX_AND_PARTS = 16
MAX_SEED = 2**32 - 1  # A1111's range; random seeds come from [0, 2**32 - 2] as in the web UI
MAX_GENERATOR_SEED = 2**64 - 1  # torch.manual_seed's range: seed + ENSD must fit in it
OUTPUT_TYPES = ("pil", "np")

INIT_OPTIONS = (  # prepare()'s img2img / inpainting keywords beyond image, strength, mask_image
    "resize_mode", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
    "inpainting_mask_invert",
)  # fmt: skip

StepCallback = Callable[[int, int, np.ndarray], Any]  # (step, total, latents); returning False stops


@dataclass
class PipelineOutput:
    images: list  # PIL images, or float32 (H, W, 3) arrays in [0, 1] for output_type="np"
    infotexts: list[str]
    seeds: list[int]
    interrupted: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


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


def _require_int(field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidRequestError(field_name, f"must be an integer, not {value!r}")
    return int(value)


def check_size(field_name: str, value: Any, multiple: int) -> int:
    value = _require_int(field_name, value)
    if value < MIN_SIZE or value % multiple:
        raise InvalidRequestError(field_name, f"must be a multiple of {multiple} and at least {MIN_SIZE}, not {value}")
    return value


def resolve_seeds(seed: int | None, count: int) -> list[int]:
    """A1111: seed -1 (or None) picks a random one; image i of a batch uses seed + i."""
    seed = -1 if seed is None else _require_int("seed", seed)
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
    vae_tiling: str = "auto"  # "auto" | "on" | "off": runtime.tiling
    loras: tuple[LoraUse, ...] = ()  # the prompt's <lora:...> tags (removed from the encoded text)
    extra: ExtraRows | None = None  # the embeddings the prompts name: text-encoder extra_embeddings rows
    vae: str | None = None  # an added VAE by name (runtime.vaes); None: the export's own

    @property
    def seeds(self) -> list[int]:
        return self.request.seeds

    def with_first_seed(self, seed: int) -> Prepared:
        """The same generation for seeds seed, seed+1, ... (A1111's n_iter batches continue the seeds)."""
        seeds = resolve_seeds(seed, len(self.request.seeds))
        return replace(self, request=replace(self.request, seeds=seeds))


def prepare(
    manifest: Manifest,
    scheduler_config: dict[str, Any],
    tokenizer: ClipTokenizer,
    *,
    prompt: str,
    negative_prompt: str = "",
    num_inference_steps: int = 28,
    guidance_scale: float = 11.0,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = -1,
    num_images_per_prompt: int = 1,
    sampler: str = "euler_a",
    schedule: str = "model",
    rng: str = "cpu",
    eta_noise_seed_delta: int = 0,
    image: Any = None,
    strength: float = 0.75,
    mask_image: Any = None,
    enable_hr: bool = False,
    hires_options: dict[str, Any] | None = None,
    vae_tiling: str = "auto",
    max_pixels: int | None = MAX_PIXELS,
    embeddings: EmbeddingMatcher | None = None,
    vae: str | None = None,
    pad_conds: bool = False,
    **init_options: Any,
) -> Prepared:
    """Every parameter checked (one InvalidRequestError naming the field) before any work runs;
    prompts parsed and chunked, schedule and seeds made: once, for run().

    img2img: `image` (PIL image, array, path or bytes) and `strength` (A1111's denoising
    strength; int(steps * strength) steps run, as diffusers). Inpainting adds `mask_image` (white
    is repainted) and A1111's `mask_blur`, `inpainting_fill`, `inpaint_full_res`,
    `inpaint_full_res_padding`, `inpainting_mask_invert`; `resize_mode` fits the image to the
    size (default: the image's own size rounded down to a multiple of 8).

    Hires fix (txt2img): `enable_hr` and `hires_options`, A1111's hr_scale, hr_resize_x/y,
    hr_upscaler, hr_second_pass_steps, denoising_strength, hr_prompt, hr_negative_prompt,
    hr_sampler_name (see runtime.hires.plan_hires).

    `pad_conds` is A1111's "Pad prompt/negative prompt" option: prompt and negative prompt of
    different 75-token chunk counts share one UNet call, the shorter padded with empty chunks
    (faster; another image). Off, as in the web UI: they run as two UNet calls.

    `max_pixels` bounds width * height (and the hires size): a huge size would otherwise run for
    minutes and end in an allocation failure (100000x100000 asks for terabytes); None lifts it.

    `<lora:...>` tags are taken out of the prompt (runtime.extra_networks) before its editing
    schedule is planned, as A1111 does; `embeddings` (the pipeline's EmbeddingMatcher) places
    textual-inversion embeddings named in any prompt."""
    unknown = set(init_options) - set(INIT_OPTIONS)
    if unknown:
        raise TypeError(f"prepare() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if image is None and (mask_image is not None or init_options):
        raise InvalidRequestError("image", "mask_image and the img2img options need an init image")
    if image is not None:
        strength = check_strength(strength)
        loaded = load_image(image, "image")
        if width is None and height is None:
            width, height = default_size(loaded, manifest.vae_scale_factor)
            width, height = max(width, MIN_SIZE), max(height, MIN_SIZE)
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InvalidRequestError(name, f"must be a string, not {type(text).__name__}")
    text_prompt, loras = parse_prompt(prompt)
    steps = _require_int("steps", num_inference_steps)
    if steps < 1:
        raise InvalidRequestError("steps", f"must be at least 1, not {steps}")
    check_guidance(guidance_scale)
    multiple = manifest.vae_scale_factor
    width = check_size("width", manifest.default_size if width is None else width, multiple)
    height = check_size("height", manifest.default_size if height is None else height, multiple)
    check_pixels("width", width, height, max_pixels)
    count = _require_int("batch_size", num_images_per_prompt)
    if count < 1:
        raise InvalidRequestError("batch_size", f"must be at least 1, not {count}")
    sampler = registry.sampler(sampler).key
    schedule = registry.schedule(schedule)
    rng = registry.rng(rng)
    delta = _require_int("eta_noise_seed_delta", eta_noise_seed_delta)
    if delta < 0:
        raise InvalidRequestError("eta_noise_seed_delta", f"must not be negative, not {delta}")
    if not isinstance(pad_conds, bool):
        raise InvalidRequestError("pad_conds", f"must be true or false, not {pad_conds!r}")
    seeds = resolve_seeds(seed, count)
    if seeds[-1] + delta > MAX_GENERATOR_SEED:
        most = MAX_GENERATOR_SEED - seeds[-1]
        raise InvalidRequestError("eta_noise_seed_delta", f"seed + ENSD must stay below 2**64, so at most {most}")
    plan = make_schedule(scheduler_config, sampler, schedule, steps)
    init = None
    if image is not None:
        init = plan_init(loaded, mask_image, width, height, strength=strength, latent_factor=multiple, **init_options)
        plan = slice_schedule(plan, start_step(plan.steps, strength))
    request = GenerationRequest(
        prompt, negative_prompt, steps, float(guidance_scale), width, height,
        seeds, sampler, schedule, rng, delta, pad_conds,
    )  # fmt: skip
    cond_plan = ConditioningPlan.build(text_prompt, negative_prompt, steps)
    pieces, chunks, padded, counts = plan_conditioning(
        tokenizer, cond_plan, guidance_scale, embeddings=embeddings, pad_conds=pad_conds
    )
    vae = resolve_vae(manifest, vae)
    if vae_tiling not in VAE_TILING:
        raise InvalidRequestError("vae_tiling", f"must be one of {', '.join(VAE_TILING)}, not {vae_tiling!r}")
    hires, hires_conditioning, hires_chunks = None, (), {}
    if enable_hr:
        if image is not None:
            raise InvalidRequestError("enable_hr", "hires fix is for txt2img; img2img has no second pass")
        hires = plan_hires(
            width, height, multiple, lambda name, n: make_schedule(scheduler_config, name, schedule, n),
            sampler, prompt, negative_prompt, steps, **(hires_options or {}),
        )  # fmt: skip
        check_pixels("hr_scale", hires.width, hires.height, max_pixels)
        hires_conditioning, hires_chunks, padded_hr, hr_counts = _hires_conditioning(
            tokenizer, hires, request, embeddings
        )
        padded = padded or padded_hr
        counts = {name: max(count, counts.get(name, 0)) for name, count in {**counts, **hr_counts}.items()}
    rows = embeddings.rows if embeddings is not None else None
    return Prepared(
        request, plan, pieces, chunks, padded, counts, init, hires, hires_conditioning, hires_chunks, vae_tiling,
        tuple(loras), rows, vae,
    )  # fmt: skip


def _hires_conditioning(
    tokenizer: ClipTokenizer,
    hires: HiresPlan,
    request: GenerationRequest,
    embeddings: EmbeddingMatcher | None = None,
) -> tuple[tuple[CondPiece, ...], dict[str, PromptChunks], bool, dict[str, int]]:
    """The second pass's conditioning from hr_prompt / hr_negative_prompt (the first pass's
    prompts unless given). As A1111, its editing schedule is over the second pass's steps on the
    hires timeline (prompt_schedule's hires_steps), also when the prompts are the first pass's.
    <lora:...> tags of a separate hires prompt are removed; the first pass's LoRAs stay on."""
    own = hires.prompt != request.prompt or hires.negative_prompt != request.negative_prompt
    fields = ("hr_prompt", "hr_negative_prompt") if own else ("prompt", "negative_prompt")
    # A1111 plans it over hr_second_pass_steps (or the first pass's steps), not over the steps the
    # denoising strength leaves to run; HiresPlan keeps that number in its infotext.
    hires_steps = hires.infotext.get("Hires steps") or request.steps
    text = parse_prompt(hires.prompt, fields[0])[0]
    cond_plan = ConditioningPlan.build(text, hires.negative_prompt, request.steps, hires_steps=hires_steps)
    return plan_conditioning(tokenizer, cond_plan, request.guidance_scale, fields, embeddings, request.pad_conds)


def prompt_chunks(
    tokenizer: ClipTokenizer, field_name: str, text: Any, embeddings: EmbeddingMatcher | None = None
) -> PromptChunks:
    """A prompt parsed and chunked, its attention weights finite: `(x:1e400)` or thousands of
    nested brackets would turn the embeddings into NaN (a black image in A1111)."""
    if not isinstance(text, str):
        raise InvalidRequestError(field_name, f"must be a string, not {type(text).__name__}")
    chunks = prompt_to_chunks(tokenizer, text, embeddings=embeddings)
    bad = chunks.weights[~np.isfinite(chunks.weights) | (np.abs(chunks.weights) > MAX_WEIGHT)]
    if bad.size:
        raise InvalidRequestError(field_name, f"weight {bad[0]:g} is out of range (|weight| <= {MAX_WEIGHT:g})")
    return chunks


def plan_conditioning(
    tokenizer: ClipTokenizer,
    plan: ConditioningPlan,
    guidance_scale: float,
    fields: tuple[str, str] = ("prompt", "negative_prompt"),
    embeddings: EmbeddingMatcher | None = None,
    pad_conds: bool = False,
) -> tuple[tuple[CondPiece, ...], dict[str, PromptChunks], bool, dict[str, int]]:
    """The conditioning pieces of one pass from the prompts' editing/alternation/AND plan (made for
    that pass's step count), and every text they name parsed and chunked once (its weights
    checked as prompt_chunks does; a hires second pass builds its plan with hires_steps).

    Each text keeps its own chunk count; how parts and negative of different lengths meet in the
    UNet is conditioning.unet_contexts (A1111's CFGDenoiser). With `pad_conds` the empty text's
    chunk comes along (what the shorter side is padded with), and the bool returned says whether
    any step pads (infotext `Pad conds: True`). Guidance at most 1 drops the negative prompt,
    except with AND or a part weight: A1111 combines those around the uncond always."""
    positive, negative = fields
    if len(plan.parts) > MAX_AND_PARTS:
        raise InvalidRequestError(positive, f"{len(plan.parts)} AND parts is more than {MAX_AND_PARTS}")
    for _, weight in plan.parts:
        if not np.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise InvalidRequestError(positive, f"AND weight {weight:g} is out of range (|weight| <= {MAX_WEIGHT:g})")
    with_negative = guidance_scale > 1.0 or plan.composable
    texts = {positive: plan.positive_texts(), negative: plan.negative_texts()}
    parsed = {name: {text: prompt_chunks(tokenizer, name, text, embeddings) for text in items}
              for name, items in texts.items()}  # fmt: skip
    counts = {name: max(item.count for item in items.values()) for name, items in parsed.items()}
    chunks = {**parsed[positive], **(parsed[negative] if with_negative else {})}
    pieces = []
    for end in plan.boundaries():
        parts, negative = plan.at_call(end)
        pieces.append(CondPiece(
            end + 1, tuple(text for text, _ in parts), tuple(weight for _, weight in parts),
            negative if with_negative else None,
        ))  # fmt: skip
    padded = pad_conds and any(_lengths_differ(piece, chunks) for piece in pieces)
    if pad_conds:
        chunks.setdefault("", empty_chunks(1, tokenizer))  # the empty prompt is one empty chunk
    return tuple(pieces), chunks, padded, counts


def _lengths_differ(piece: CondPiece, chunks: dict[str, PromptChunks]) -> bool:
    """Whether this piece's AND parts (their longest) and negative prompt differ in chunk count."""
    if piece.uncond is None:
        return False
    return max(chunks[text].count for text in piece.conds) != chunks[piece.uncond].count


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


def combine_guidance(eps: np.ndarray, batch: int, scale: float, weights: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Classifier-free guidance on one UNet output holding the uncond half first (as diffusers):
    eps = uncond + scale * (cond - uncond). With AND parts after it, A1111's composable
    diffusion: eps = uncond + sum of weight * scale * (cond_part - uncond) (CFGDenoiser's
    combine_denoised, there on the denoised images: the same sum, as denoised = x - sigma * eps)."""
    eps_uncond = combined = eps[:batch]
    for index, weight in enumerate(weights, start=1):
        combined = combined + np.float32(weight * scale) * (eps[index * batch : (index + 1) * batch] - eps_uncond)
    return combined


class Planner:
    """A model folder's checks and planning, without ONNX sessions: the manifest, tokenizer,
    scheduler config and add-on folders (LoRAs checked against the model, embeddings matched in
    prompts). A Pipeline is one with sessions; a cluster's ingress is one alone (it checks every
    request once, its replicas' Pipelines run them)."""

    loras: LoraResolver

    def __init__(
        self,
        manifest: Manifest,
        tokenizer: ClipTokenizer,
        scheduler_config: dict,
        loras: LoraResolver,
        embeddings_dir: str | Path | None = None,
        vae: str | None = None,
    ) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.vae = resolve_vae(manifest, vae)  # requests that name no VAE use this one
        self.loras = loras
        self.embeddings = EmbeddingLibrary(embeddings_dir, tokenizer, manifest.text_width, text_vocab_size(manifest))

    @classmethod
    def from_folder(
        cls, folder: str | Path, lora_dir: str | Path | None = None, embeddings_dir: str | Path | None = None
    ) -> Planner:
        manifest = read_manifest(folder)
        tokenizer = ClipTokenizer.from_folder(manifest.folder / "tokenizer")
        loras = LoraResolver(manifest, LoraLibrary(lora_dir))
        return cls(manifest, tokenizer, read_scheduler_config(manifest.folder), loras, embeddings_dir)

    def prepare(self, **parameters: Any) -> Prepared:
        """Check and plan a generation (keywords of `Pipeline.__call__` but output_type and
        callbacks), including that every LoRA the prompt names exists and fits this model. The
        embeddings' vectors travel in the Prepared (a few KB each), to whichever Pipeline runs it."""
        matcher = self.embeddings.matcher()
        parameters.setdefault("vae", self.vae)
        prepared = prepare(self.manifest, self.scheduler_config, self.tokenizer, embeddings=matcher, **parameters)
        self.loras.resolve(list(prepared.loras))
        # The manifest lists the graph's inputs, and loading a session checks the graph against it.
        text_inputs = self.manifest.graphs["text_encoder"].inputs
        if prepared.extra is not None and prepared.extra.used and TEXT_EXTRA not in text_inputs:
            raise InvalidRequestError(
                "prompt", f"embedding {next(iter(prepared.extra.used))!r} needs a text encoder exported with "
                "embedding support; re-export the model with this version of `python -m export`"
            )  # fmt: skip
        return prepared


class Pipeline(Planner):
    """Exported SD1.x model on ONNX Runtime. Not thread-safe: serve one generation at a time."""

    loras: LoraSessions

    def __init__(
        self,
        manifest: Manifest,
        sessions: Sessions,
        tokenizer: ClipTokenizer,
        scheduler_config: dict,
        lora_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
        vae: str | None = None,
        lora_cache_mb: int = LORA_CACHE_MB,
    ) -> None:
        loras = LoraSessions(manifest, sessions, LoraLibrary(lora_dir), check_lora_cache_mb(lora_cache_mb) * 2**20)
        super().__init__(manifest, tokenizer, scheduler_config, loras, embeddings_dir, vae)
        self._vae_sessions = {None: (sessions.vae_decoder, sessions.vae_encoder)}  # loaded VAEs, by name
        self.sessions = sessions  # the running generation's (LoRA-patched or plain) sessions
        self._extra: np.ndarray | None = None  # the running generation's extra_embeddings rows
        self.tile_sizes = TileSizes.from_folder(manifest.folder, manifest.default_size, manifest.vae_scale_factor)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        cuda_graph: bool = False,
        optimized_cache: bool = False,
        cache_dir: str | Path | None = None,
        verify: bool = False,
        device: str = "CPU",
        inference_precision: str = "auto",
        lora_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
        vae: str | None = None,
        lora_cache_mb: int = LORA_CACHE_MB,
    ) -> Pipeline:
        """`optimized_cache` saves the graphs ONNX Runtime optimized at the first load (CPU, fp32
        graphs: the full-size UNet then loads in 1 s instead of 6 s, for 3.4 GB of disk under
        `cache_dir`, default ~/.cache/acertain-onnx/optimized). `verify` checks every graph file
        against the sha256 in the manifest first. `device` and `inference_precision`
        serve provider "openvino" (an export made with --target openvino): OpenVINO device name
        (CPU; GPU/NPU pass through) and "auto" (bf16 where the CPU has it, else f32), "bf16", "f16"
        or "f32". `vae` names the VAE requests use unless they name another (an added one, see
        `python -m export --add-vae`; default: the export's own). `lora_cache_mb` bounds the memory
        of LoRA-patched sessions kept for later requests (0: none; see runtime.lora.LoraSessions)."""
        manifest = read_manifest(folder)
        resolve_vae(manifest, vae)  # an unknown name fails before the sessions load
        check_lora_cache_mb(lora_cache_mb)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InvalidRequestError(
                "threads", f"must be a whole number >= 1 (or None for one per core), not {threads!r}"
            )
        if verify:
            verify_files(manifest)  # reads every graph file once: seconds for a full-size model
        config = SessionConfig(
            provider=provider,
            threads=threads,
            cuda_graph=cuda_graph,
            optimized_cache=optimized_cache,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            device=device,
            inference_precision=inference_precision,
        )
        sessions = load_sessions(manifest, config)
        tokenizer = ClipTokenizer.from_folder(manifest.folder / "tokenizer")
        scheduler_config = read_scheduler_config(manifest.folder)
        return cls(manifest, sessions, tokenizer, scheduler_config, lora_dir, embeddings_dir, vae, lora_cache_mb)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    def release_memory(self) -> None:
        """Give back what a large generation left in onnxruntime's arenas (see Sessions.release_memory)."""
        self.sessions.release_memory(self.manifest)

    # -- prepare and run ------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_inference_steps: int = 28,
        guidance_scale: float = 11.0,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = -1,
        num_images_per_prompt: int = 1,
        sampler: str = "euler_a",
        schedule: str = "model",
        rng: str = "cpu",
        eta_noise_seed_delta: int = 0,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        cancel_event: threading.Event | None = None,
        **options: Any,
    ) -> PipelineOutput:
        """Generate: prepare (every parameter checked once) then run. `options` are prepare's
        img2img, inpainting, hires-fix and VAE-tiling keywords."""
        check_output_type(output_type)
        prepared = self.prepare(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, width=width, height=height, seed=seed,
            num_images_per_prompt=num_images_per_prompt, sampler=sampler, schedule=schedule, rng=rng,
            eta_noise_seed_delta=eta_noise_seed_delta, **options,
        )  # fmt: skip
        return self.run(prepared, output_type, callback, cancel_event)

    def run(
        self,
        prepared: Prepared,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        cancel_event: threading.Event | None = None,
    ) -> PipelineOutput:
        """Sample, decode, write the infotexts. An interrupted run decodes the last prediction of
        the clean image, as the A1111 web UI shows on Interrupt."""
        check_output_type(output_type)
        request = prepared.request
        # At most one rebuild of the text-encoder and UNet sessions when the LoRA set changes. The
        # last run's set is let go first: if the cache evicts it (or keeps none), it is freed
        # before the new one is built, not held beside it.
        self.sessions = self.loras.base
        self.sessions = self.with_vae(self.loras.sessions_for(list(prepared.loras)).sessions, prepared.vae)
        self._extra = prepared.extra.matrix() if prepared.extra is not None else None
        latents, interrupted = self._sample(prepared, callback, cancel_event)
        pixels = self.decode(latents, prepared.vae_tiling)
        if prepared.init is not None and prepared.init.overlay is not None:
            pixels = np.stack([apply_overlay(image, prepared.init.overlay) for image in pixels])
        images = list(pixels) if output_type == "np" else [to_pil(image) for image in pixels]
        infotexts = [self.infotext(prepared, seed) for seed in request.seeds]
        return PipelineOutput(images, infotexts, request.seeds, interrupted, request.__dict__.copy())

    def with_vae(self, sessions: Sessions, name: str | None) -> Sessions:
        """`sessions` decoding (and encoding) with VAE `name`; its sessions load once and stay cached
        (small: the full-size decoder holds about 200 MB of fp32 weights)."""
        if name not in self._vae_sessions:
            choice = vae_choices(self.manifest)[name]
            make = partial(GraphSession, provider=self.sessions.provider, config=self.sessions.config)
            encoder = make(choice.encoder) if choice.encoder is not None else None
            self._vae_sessions[name] = (make(choice.decoder), encoder)
            log.info("loaded VAE %s", name)
        decoder, encoder = self._vae_sessions[name]
        return replace(sessions, vae_decoder=decoder, vae_encoder=encoder)

    # -- the stages -----------------------------------------------------------------------------

    def encode(self, chunks: dict[str, PromptChunks]) -> dict[str, np.ndarray]:
        """Hidden states of shape (77*k, width) of every text the generation's pieces name: all
        chunks through the text encoder in one batch (one run, also with prompt editing),
        A1111's emphasis applied per text, chunks joined on the token axis; the embeddings the
        prompts name ride along as extra_embeddings rows."""

        def run(ids: np.ndarray) -> np.ndarray:
            feed = {TEXT_INPUT: ids}
            if self._extra is not None:
                feed[TEXT_EXTRA] = self._extra
            return self.sessions.text_encoder.run(feed)

        return encode_chunks(run, chunks, self.tokenizer)

    def denoiser(
        self,
        schedule: Schedule,
        conditioning: tuple[CondPiece, ...],
        states: dict[str, np.ndarray],
        scale: float,
        latent_shape: tuple,
        pad_conds: bool = False,
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """The model as samplers see it: x in VE space and a step index -> predicted clean x.
        Call i (counted from 0, as A1111 counts denoiser calls) uses the first conditioning
        piece with i < until_step; the UNet is rebound only when the piece changes. With
        guidance one UNet call runs the uncond half first (as diffusers does), then one half per
        AND part; parts and uncond of different lengths run as two calls, as in A1111
        (conditioning.unet_contexts)."""
        batch = latent_shape[0]
        unet = self.sessions.unet
        bound: dict[str, Any] = {"calls": 0}

        def bind() -> CondPiece:
            call = bound["calls"]
            bound["calls"] += 1
            index = next((i for i, piece in enumerate(conditioning) if call < piece.until_step), 0)
            if bound.get("piece") != index:
                piece = conditioning[index]
                uncond = states[piece.uncond] if piece.uncond is not None else None
                contexts = unet_contexts([states[text] for text in piece.conds], uncond, pad_conds, states.get(""))
                bound["steps"] = []
                for context in contexts:
                    context = np.repeat(context, batch, axis=0)  # each half once per image
                    bound["steps"].append(
                        (unet.bind(context, (len(context), *latent_shape[1:])), len(context) // batch)
                    )
                bound["piece"] = index
            return conditioning[index]

        def denoise(x: np.ndarray, step: int) -> np.ndarray:
            piece = bind()
            sigma = np.float32(schedule.sigmas[step])
            scaled = x / np.sqrt(sigma * sigma + np.float32(1.0))
            outputs = []
            for unet_step, halves in bound["steps"]:
                timesteps = np.full((batch * halves,), schedule.timesteps[step], dtype=np.float32)
                outputs.append(unet_step(np.concatenate([scaled] * halves), timesteps))
            eps = np.concatenate(outputs)
            if piece.uncond is not None:
                eps = combine_guidance(eps, batch, scale, piece.weights)
            return x - sigma * eps

        return denoise

    def decode(self, latents: np.ndarray, tiling: str = "auto") -> np.ndarray:
        """Latents -> float32 images (N, H, W, 3) in [0, 1], one image at a time to bound memory;
        tiled (diffusers' tiled_decode) when `tiling` says so for this size."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        factor, sizes = self.manifest.vae_scale_factor, self.tile_sizes
        tiles = use_tiling(tiling, scaled.shape[3] * factor, scaled.shape[2] * factor, sizes)

        def run(tile: np.ndarray) -> np.ndarray:
            return self.sessions.vae_decoder.run({VAE_DECODER_INPUT: tile})

        images = [tiled(run, scaled[i : i + 1], sizes.latent, sizes.sample) if tiles else run(scaled[i : i + 1])
                  for i in range(len(scaled))]  # fmt: skip
        pixels = np.concatenate(images)
        check_finite(pixels, "the VAE decoder's image")
        return np.clip(pixels / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def infotext(self, prepared: Prepared, seed: int) -> str:
        request = prepared.request
        params = {
            "Steps": request.steps,
            "Sampler": registry.sampler(request.sampler).name,
            "Schedule type": registry.SCHEDULE_LABELS[request.schedule],
            "CFG scale": infotext_number(request.guidance_scale),
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",  # the first pass's, as A1111 writes it
            "Model hash": self.manifest.model_hash,
            "Model": self.manifest.model_name,
            "VAE hash": vae_label(self.manifest, prepared.vae)[1],
            "VAE": vae_label(self.manifest, prepared.vae)[0],
            "Clip skip": self.manifest.clip_skip if self.manifest.clip_skip >= 2 else None,
            "ENSD": request.eta_noise_seed_delta if uses_ensd(request) else None,
            "RNG": registry.RNG_LABELS[request.rng],
            "Pad conds": True if prepared.padded else None,
            **(prepared.init.infotext if prepared.init is not None else {}),
            **(prepared.hires.infotext if prepared.hires is not None else {}),
            "Lora hashes": self.loras.hashes(list(prepared.loras)),
            "TI hashes": ti_hashes(prepared.extra.used) if prepared.extra is not None else None,
            "Version": f"acertain-onnx {__version__}",
        }
        return format_infotext(request.prompt, request.negative_prompt, params)

    def _sample(
        self,
        prepared: Prepared,
        callback: StepCallback | None = None,
        cancel_event: threading.Event | None = None,
    ) -> tuple[np.ndarray, bool]:
        """(latents for the VAE, interrupted): the first pass, then the hires pass if asked."""
        request = prepared.request
        generators = [make_generator(request.rng, seed) for seed in request.seeds]
        x, after_step = self._initial(prepared, generators, self._latent_shape(request.width, request.height))
        pass_ = _Pass(request.sampler, prepared.schedule, prepared.conditioning, prepared.chunks, after_step)
        latents, interrupted = self._loop(request, pass_, x, generators, callback, cancel_event)
        if prepared.hires is None or interrupted:
            return latents, interrupted
        x0 = self._upscale(latents, prepared.hires, prepared.vae_tiling)
        # A1111: the second pass draws its noise from fresh generators of the same seeds.
        generators = [make_generator(request.rng, seed) for seed in request.seeds]
        noise = np.concatenate([g.randn((1, *x0.shape[1:])) for g in generators])
        x = (x0 + noise * np.float32(prepared.hires.schedule.sigmas[0])).astype(np.float32)
        hires = prepared.hires
        pass_ = _Pass(hires.sampler, hires.schedule, prepared.hires_conditioning, prepared.hires_chunks, None)
        return self._loop(request, pass_, x, generators, callback, cancel_event)

    def _latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        factor = self.manifest.vae_scale_factor
        return (1, self.manifest.latent_channels, height // factor, width // factor)

    def _loop(
        self,
        request: GenerationRequest,
        pass_: _Pass,
        x: np.ndarray,
        generators: list[NoiseGenerator],
        callback: StepCallback | None,
        cancel_event: threading.Event | None,
    ) -> tuple[np.ndarray, bool]:
        """One sampling pass from x. An interrupted pass returns the last prediction of the
        clean image, as the A1111 web UI shows on Interrupt."""
        schedule, shape = pass_.schedule, (1, *x.shape[1:])
        if uses_ensd(request, pass_.sampler):
            # A1111: the ancestral noise comes from generators re-seeded with seed + ENSD.
            generators = [make_generator(request.rng, seed + request.eta_noise_seed_delta) for seed in request.seeds]
        states = self.encode(pass_.chunks)
        denoise = self.denoiser(
            schedule, pass_.conditioning, states, request.guidance_scale, x.shape, request.pad_conds
        )
        last_denoised: dict[str, np.ndarray] = {}

        def tracked(x_in: np.ndarray, step: int) -> np.ndarray:
            last_denoised["x"] = denoise(x_in, step)
            return last_denoised["x"]

        def on_step(step: int, latents: np.ndarray) -> np.ndarray | None:
            latents = pass_.after_step(step, latents) if pass_.after_step is not None else latents
            stop = callback is not None and callback(step + 1, schedule.steps, latents) is False
            if stop or (cancel_event is not None and cancel_event.is_set()):
                raise _Stop
            return latents

        try:
            noise = per_image_noise(generators, shape)
            x = samplers.sample(pass_.sampler, tracked, x.astype(np.float32), schedule, noise, on_step)
        except _Stop:
            log.info("generation interrupted; decoding the last prediction")
            # A clean-image prediction sits at noise level 0: nothing to rescale.
            return last_denoised.get("x", x), True
        latents = final_latents(x, schedule)
        check_finite(latents, "the sampled latents")
        return latents, False

    def _upscale(self, latents: np.ndarray, plan: HiresPlan, tiling: str) -> np.ndarray:
        """The first pass at the hires size: latents resized (latent upscalers), or decoded,
        resized as an image and encoded again (the latent distribution's mean)."""
        factor = self.manifest.vae_scale_factor
        size = (plan.upscale_to[0] // factor, plan.upscale_to[1] // factor)
        if plan.upscaler.latent:
            upscaled = upscale_latents(latents, size, plan.upscaler)
        else:
            decoded = self.decode(latents, tiling)
            pixels = [upscale_image(image, plan.upscale_to, plan.upscaler) for image in decoded]
            moments = [self.encode_pixels((image * 2 - 1).transpose(2, 0, 1)[None], tiling) for image in pixels]
            upscaled = np.concatenate([np.split(m, 2, axis=1)[0] for m in moments])
            upscaled = upscaled * np.float32(self.manifest.vae_scaling_factor)
        return truncate(upscaled, *plan.truncate).astype(np.float32)

    def _initial(
        self, prepared: Prepared, generators: list[NoiseGenerator], shape: tuple[int, ...]
    ) -> tuple[np.ndarray, Callable[[int, np.ndarray], np.ndarray] | None]:
        """The first sample x (VE space) and what to do to x after each step. Each image's
        generator draws as diffusers' pipelines do: txt2img the noise; img2img the VAE sample,
        then the noise; inpainting also a (discarded) sample for the masked image."""
        schedule, init = prepared.schedule, prepared.init
        if init is None:
            return np.concatenate([g.randn(shape) for g in generators]) * np.float32(schedule.init_noise_sigma), None
        moments = self.encode_pixels(init.pixels, prepared.vae_tiling)
        x0 = encode_sample(moments, [g.randn(shape) for g in generators], self.manifest.vae_scaling_factor)
        noise = np.concatenate([g.randn(shape) for g in generators])
        if init.latent_mask is None:
            return (x0 + noise * np.float32(schedule.sigmas[0])).astype(np.float32), None
        for g in generators:
            g.randn(shape)  # diffusers encodes the masked image with each generator: same draws
        x0, mask = fill_latents(x0, noise, init), init.latent_mask
        if init.strength == 1.0:  # diffusers starts from pure noise at full strength
            x = noise * np.float32(schedule.init_noise_sigma)
        else:
            x = x0 + noise * np.float32(schedule.sigmas[0])

        def after_step(step: int, latents: np.ndarray) -> np.ndarray:
            return blend(latents, x0, noise, float(schedule.sigmas[step + 1]), mask)

        return x.astype(np.float32), after_step

    def encode_pixels(self, pixels: np.ndarray, tiling: str = "auto") -> np.ndarray:
        """(1, 3, H, W) pixels in [-1, 1] -> the latent distribution's (mean, logvar) stacked;
        tiled (diffusers' _tiled_encode) when `tiling` says so for this size."""
        encoder = self.sessions.vae_encoder
        if encoder is None:
            raise InvalidRequestError(
                "image", "this model folder has no vae_encoder graph (exported with --no-vae-encoder)"
            )

        def run(tile: np.ndarray) -> np.ndarray:
            return encoder.run({VAE_ENCODER_INPUT: tile})

        sizes = self.tile_sizes
        if use_tiling(tiling, pixels.shape[3], pixels.shape[2], sizes):
            return tiled(run, pixels, sizes.sample, sizes.latent)
        return run(pixels)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InvalidRequestError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")


class _Stop(Exception):
    """Raised inside the sampler loop to leave it at a step boundary."""


def uses_ensd(request: GenerationRequest, sampler: str | None = None) -> bool:
    """ENSD re-seeds the noise drawn after the initial latent; only ancestral samplers draw any,
    and A1111 writes ENSD into the infotext only for them."""
    return request.eta_noise_seed_delta > 0 and registry.sampler(sampler or request.sampler).ancestral


@dataclass(frozen=True, eq=False)
class _Pass:
    sampler: str
    schedule: Schedule
    conditioning: tuple[CondPiece, ...]
    chunks: dict[str, PromptChunks]
    after_step: Callable[[int, np.ndarray], np.ndarray] | None


def per_image_noise(generators: list[NoiseGenerator], shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """Each image draws from its own generator, so image i of a batch equals a single run with
    seed + i (A1111's batch rule; diffusers with a list of generators does the same)."""

    def draw() -> np.ndarray:
        return np.concatenate([generator.randn(shape) for generator in generators])

    return draw


def to_pil(image: np.ndarray) -> Image.Image:
    """As diffusers' numpy_to_pil: scale to 0..255 and round."""
    return Image.fromarray((image * 255).round().astype(np.uint8))
