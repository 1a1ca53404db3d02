"""Text-to-image on ONNX Runtime: prompt -> text conditioning -> sampler loop with CFG -> VAE.

The API follows diffusers' StableDiffusionPipeline (`Pipeline.from_pretrained(folder)`, then call
it with a prompt) and its defaults follow ACertainThing's model card (28 steps, Euler a, CFG 11).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, samplers
from .conditioning import PromptChunks, apply_emphasis, pad_to_chunk_count, prompt_to_chunks
from .embeddings import EmbeddingLibrary, ExtraRows, ti_hashes
from .errors import InvalidRequestError
from .extra_networks import LoraUse, parse_prompt
from .lora import LoraLibrary, LoraSessions
from .metadata import format_infotext
from .model_folder import (
    TEXT_EXTRA,
    TEXT_INPUT,
    VAE_DECODER_INPUT,
    Manifest,
    read_manifest,
    read_scheduler_config,
    text_vocab_size,
)
from .prompt_parser import BREAK_WEIGHT, parse_prompt_attention
from .rng import NoiseGenerator, make_generator
from .schedules import SAMPLERS, SCHEDULES, Schedule, final_latents, make_schedule
from .sessions import SessionConfig, Sessions, load_sessions
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

SAMPLER_LABELS = {"euler_a": "Euler a", "euler": "Euler", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM"}
SCHEDULE_LABELS = {"model": "Diffusers", "karras": "Karras", "a1111": None}  # None: A1111's "Automatic"
RNG_LABELS = {"cpu": "CPU", "nv": "NV"}
MIN_SIZE = 64
MAX_WEIGHT = 1000.0  # far above any useful emphasis; bounds what one weight can do to the embeddings
ANCESTRAL_SAMPLERS = ("euler_a",)
MAX_SEED = 2**32 - 1  # A1111's range; random seeds come from [0, 2**32 - 2] as in the web UI
OUTPUT_TYPES = ("pil", "np")

StepCallback = Callable[[int, int, np.ndarray], Any]  # (step, total, latents); returning False stops


@dataclass
class PipelineOutput:
    images: list  # PIL images, or float32 (H, W, 3) arrays in [0, 1] for output_type="np"
    infotexts: list[str]
    seeds: list[int]
    interrupted: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedPrompt:
    cond: np.ndarray
    uncond: np.ndarray | None
    padded: bool  # the prompt pair had different chunk counts and the shorter was padded


@dataclass
class SampleResult:
    latents: np.ndarray  # VP latents ready for the VAE
    interrupted: bool
    pad_conds: bool


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
    loras: tuple[LoraUse, ...] = ()  # from the prompt's <lora:...> tags
    text_prompt: str | None = None  # the prompt without those tags (what the text encoder reads)

    @property
    def encoder_prompt(self) -> str:
        return self.prompt if self.text_prompt is None else self.text_prompt


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


def build_request(
    manifest: Manifest,
    scheduler_config: dict[str, Any],
    *,
    prompt: str,
    negative_prompt: str = "",
    steps: int = 28,
    guidance_scale: float = 11.0,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = -1,
    batch_size: int = 1,
    sampler: str = "euler_a",
    schedule: str = "model",
    rng: str = "cpu",
    eta_noise_seed_delta: int = 0,
) -> GenerationRequest:
    """Every parameter checked (one InvalidRequestError naming the field) before any work runs,
    including the schedule the model's scheduler config gives and the prompts' weights."""
    check_prompt("prompt", prompt)
    text_prompt, loras = parse_prompt(prompt)
    for name, text in (("prompt", text_prompt), ("negative_prompt", negative_prompt)):
        check_prompt(name, text)
    steps = _require_int("steps", steps)
    if steps < 1:
        raise InvalidRequestError("steps", f"must be at least 1, not {steps}")
    check_guidance(guidance_scale)
    multiple = manifest.vae_scale_factor
    width = check_size("width", manifest.default_size if width is None else width, multiple)
    height = check_size("height", manifest.default_size if height is None else height, multiple)
    count = _require_int("batch_size", batch_size)
    if count < 1:
        raise InvalidRequestError("batch_size", f"must be at least 1, not {count}")
    if sampler not in SAMPLERS:
        raise InvalidRequestError("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise InvalidRequestError("schedule", f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if rng not in RNG_LABELS:
        raise InvalidRequestError("rng", f"unknown rng {rng!r}; choose one of {', '.join(RNG_LABELS)}")
    delta = _require_int("eta_noise_seed_delta", eta_noise_seed_delta)
    if delta < 0:
        raise InvalidRequestError("eta_noise_seed_delta", f"must not be negative, not {delta}")
    make_schedule(scheduler_config, sampler, schedule, steps)  # configs or step counts it cannot serve
    return GenerationRequest(
        prompt, negative_prompt, steps, float(guidance_scale), width, height,
        resolve_seeds(seed, count), sampler, schedule, rng, delta, tuple(loras), text_prompt,
    )  # fmt: skip


def check_prompt(field_name: str, text: Any) -> None:
    """A string whose attention weights are finite: `(x:1e400)` or thousands of nested brackets
    would turn the embeddings into NaN (a black image in A1111)."""
    if not isinstance(text, str):
        raise InvalidRequestError(field_name, f"must be a string, not {type(text).__name__}")
    for piece, weight in parse_prompt_attention(text):
        if not np.isfinite(weight) or (weight != BREAK_WEIGHT and abs(weight) > MAX_WEIGHT):
            raise InvalidRequestError(
                field_name, f"weight {weight:g} of {piece!r} is out of range (|weight| <= {MAX_WEIGHT:g})"
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


class Pipeline:
    """Exported SD1.x model on ONNX Runtime. Not thread-safe: serve one generation at a time."""

    def __init__(
        self,
        manifest: Manifest,
        sessions: Sessions,
        tokenizer: ClipTokenizer,
        scheduler_config: dict,
        lora_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
    ) -> None:
        self.manifest = manifest
        self.sessions = sessions  # the current request's (LoRA-patched or plain) sessions
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.loras = LoraSessions(manifest, sessions, LoraLibrary(lora_dir))
        self.embeddings = EmbeddingLibrary(embeddings_dir, tokenizer, manifest.text_width, text_vocab_size(manifest))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        cuda_graph: bool = False,
        optimized_cache: bool = False,
        cache_dir: str | Path | None = None,
        lora_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
    ) -> Pipeline:
        """`optimized_cache` saves the graphs ONNX Runtime optimized at the first load (CPU, fp32
        graphs: the full-size UNet then loads in 1 s instead of 6 s, for 3.4 GB of disk under
        `cache_dir`, default ~/.cache/acertain-onnx/optimized)."""
        manifest = read_manifest(folder)
        config = SessionConfig(
            provider=provider,
            threads=threads,
            cuda_graph=cuda_graph,
            optimized_cache=optimized_cache,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
        )
        sessions = load_sessions(manifest, config)
        tokenizer = ClipTokenizer.from_folder(manifest.folder / "tokenizer")
        scheduler_config = read_scheduler_config(manifest.folder)
        return cls(manifest, sessions, tokenizer, scheduler_config, lora_dir, embeddings_dir)

    @property
    def provider(self) -> str:
        return self.sessions.provider

    # -- request checking ---------------------------------------------------------------------

    def make_request(self, **parameters: Any) -> GenerationRequest:
        """Check generation parameters against this model (keywords of build_request), including
        that every LoRA the prompt names exists and fits the model."""
        request = build_request(self.manifest, self.scheduler_config, **parameters)
        self.loras.resolve(list(request.loras))
        return request

    # -- the stages -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, negative_prompt: str, with_negative: bool) -> EncodedPrompt:
        """Hidden states of shape (77*k, width) for the prompt (and negative prompt): every chunk
        through the text encoder in one batch, A1111's emphasis applied per prompt, chunks joined
        on the token axis. The shorter prompt is padded with empty chunks so one UNet call serves
        both halves. That is A1111's "Pad prompt/negative prompt" option (off by default there: the
        web UI then runs two UNet calls, each attending over its own tokens), so the infotext says
        `Pad conds: True` whenever the chunk counts differed."""
        prompts = [prompt, negative_prompt] if with_negative else [prompt]
        chunks, extra = self.prompt_chunks(prompts)
        count = max(item.count for item in chunks)
        padded = any(item.count != count for item in chunks)
        chunks = [pad_to_chunk_count(item, count, self.tokenizer) for item in chunks]
        feed = {TEXT_INPUT: np.concatenate([item.token_ids for item in chunks])}
        if extra.matrix() is not None:
            feed[TEXT_EXTRA] = extra.matrix()
        hidden = self.sessions.text_encoder.run(feed)
        states = []
        for index, item in enumerate(chunks):
            emphasized = apply_emphasis(hidden[index * count : (index + 1) * count], item.weights)
            states.append(emphasized.reshape(-1, emphasized.shape[-1]))
        return EncodedPrompt(cond=states[0], uncond=states[1] if with_negative else None, padded=padded)

    def prompt_chunks(self, prompts: list[str]) -> tuple[list[PromptChunks], ExtraRows]:
        """Each prompt's chunks, with the embeddings named in them as rows of one ExtraRows."""
        matcher = self.embeddings.matcher()
        chunks = [prompt_to_chunks(self.tokenizer, text, embeddings=matcher) for text in prompts]
        rows = matcher.rows if matcher is not None else ExtraRows(0)
        if rows.used and TEXT_EXTRA not in self.sessions.text_encoder.input_types:
            raise InvalidRequestError(
                "prompt", f"embedding {next(iter(rows.used))!r} needs a text encoder exported with embedding "
                "support; re-export the model with this version of `python -m export`"
            )  # fmt: skip
        return chunks, rows

    def denoiser(
        self,
        schedule: Schedule,
        cond: np.ndarray,
        uncond: np.ndarray | None,
        scale: float,
        latent_shape: tuple,
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """The model as samplers see it: x in VE space and a step index -> predicted clean x.
        With guidance one UNet call runs the uncond and cond halves together (as diffusers does:
        uncond first), and eps = uncond + scale * (cond - uncond); scale <= 1 skips uncond."""
        batch = latent_shape[0]
        halves = [uncond, cond] if uncond is not None else [cond]
        context = np.stack([half for half in halves for _ in range(batch)])
        unet = self.sessions.unet
        unet.begin(context, (len(context), *latent_shape[1:]))

        def denoise(x: np.ndarray, step: int) -> np.ndarray:
            sigma = np.float32(schedule.sigmas[step])
            scaled = x / np.sqrt(sigma * sigma + np.float32(1.0))
            model_input = np.concatenate([scaled] * len(halves))
            timesteps = np.full((len(context),), schedule.timesteps[step], dtype=np.float32)
            eps = unet(model_input, timesteps)
            if uncond is not None:
                eps_uncond, eps_cond = eps[:batch], eps[batch:]
                eps = eps_uncond + np.float32(scale) * (eps_cond - eps_uncond)
            return x - sigma * eps

        return denoise

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 images (N, H, W, 3) in [0, 1], one image at a time to bound memory."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        images = [self.sessions.vae_decoder.run({VAE_DECODER_INPUT: scaled[i : i + 1]}) for i in range(len(scaled))]
        pixels = np.concatenate(images)
        return np.clip(pixels / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def infotext(self, request: GenerationRequest, seed: int, pad_conds: bool = False) -> str:
        params = {
            "Steps": request.steps,
            "Sampler": SAMPLER_LABELS[request.sampler],
            "Schedule type": SCHEDULE_LABELS[request.schedule],
            "CFG scale": _number(request.guidance_scale),
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": self.manifest.model_hash,
            "Model": self.manifest.model_name,
            "VAE hash": (self.manifest.raw.get("vae") or {}).get("hash"),
            "VAE": (self.manifest.raw.get("vae") or {}).get("name"),
            "Clip skip": self.manifest.clip_skip if self.manifest.clip_skip >= 2 else None,
            "ENSD": request.eta_noise_seed_delta if uses_ensd(request) else None,
            "RNG": RNG_LABELS[request.rng],
            "Pad conds": True if pad_conds else None,
            "Lora hashes": self.loras.hashes(list(request.loras)),
            "TI hashes": ti_hashes(self.prompt_chunks([request.encoder_prompt, request.negative_prompt])[1].used),
            "Version": f"acertain-onnx {__version__}",
        }
        return format_infotext(request.prompt, request.negative_prompt, params)

    # -- the whole run --------------------------------------------------------------------------

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
    ) -> PipelineOutput:
        if output_type not in OUTPUT_TYPES:
            raise InvalidRequestError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
        request = self.make_request(
            prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps, guidance_scale=guidance_scale,
            width=width, height=height, seed=seed, batch_size=num_images_per_prompt, sampler=sampler,
            schedule=schedule, rng=rng, eta_noise_seed_delta=eta_noise_seed_delta,
        )  # fmt: skip
        result = self.sample(request, callback, cancel_event)
        pixels = self.decode(result.latents)
        images = list(pixels) if output_type == "np" else [to_pil(image) for image in pixels]
        infotexts = [self.infotext(request, seed, result.pad_conds) for seed in request.seeds]
        return PipelineOutput(images, infotexts, request.seeds, result.interrupted, request.__dict__.copy())

    def sample(
        self,
        request: GenerationRequest,
        callback: StepCallback | None = None,
        cancel_event: threading.Event | None = None,
    ) -> SampleResult:
        """Run the sampler. An interrupted run returns the last prediction of the clean image, as
        the A1111 web UI shows on Interrupt."""
        schedule = make_schedule(self.scheduler_config, request.sampler, request.schedule, request.steps)
        with_negative = request.guidance_scale > 1.0
        self.sessions = self.loras.sessions_for(list(request.loras)).sessions
        encoded = self.encode_prompt(request.encoder_prompt, request.negative_prompt, with_negative)
        generators = [make_generator(request.rng, seed) for seed in request.seeds]
        shape = (1, self.manifest.latent_channels, request.height // self.manifest.vae_scale_factor,
                 request.width // self.manifest.vae_scale_factor)  # fmt: skip
        x = np.concatenate([g.randn(shape) for g in generators]) * np.float32(schedule.init_noise_sigma)
        if uses_ensd(request):
            # A1111: the ancestral noise comes from generators re-seeded with seed + ENSD.
            generators = [make_generator(request.rng, seed + request.eta_noise_seed_delta) for seed in request.seeds]
        denoise = self.denoiser(schedule, encoded.cond, encoded.uncond, request.guidance_scale, x.shape)
        last_denoised: dict[str, np.ndarray] = {}

        def tracked(x_in: np.ndarray, step: int) -> np.ndarray:
            last_denoised["x"] = denoise(x_in, step)
            return last_denoised["x"]

        def on_step(step: int, latents: np.ndarray) -> None:
            stop = callback is not None and callback(step + 1, schedule.steps, latents) is False
            if stop or (cancel_event is not None and cancel_event.is_set()):
                raise _Stop

        try:
            noise = per_image_noise(generators, shape)
            x = samplers.sample(request.sampler, tracked, x.astype(np.float32), schedule, noise, on_step)
        except _Stop:
            log.info("generation interrupted; decoding the last prediction")
            # A clean-image prediction sits at noise level 0: nothing to rescale.
            return SampleResult(last_denoised.get("x", x), True, encoded.padded)
        return SampleResult(final_latents(x, schedule), False, encoded.padded)


class _Stop(Exception):
    """Raised inside the sampler loop to leave it at a step boundary."""


def uses_ensd(request: GenerationRequest) -> bool:
    """ENSD re-seeds the noise drawn after the initial latent; only ancestral samplers draw any,
    and A1111 writes ENSD into the infotext only for them."""
    return request.eta_noise_seed_delta > 0 and request.sampler in ANCESTRAL_SAMPLERS


def _number(value: float) -> int | float:
    """11.0 -> 11: A1111 writes whole CFG scales without a decimal point."""
    return int(value) if float(value).is_integer() else value


def per_image_noise(generators: list[NoiseGenerator], shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """Each image draws from its own generator, so image i of a batch equals a single run with
    seed + i (A1111's batch rule; diffusers with a list of generators does the same)."""

    def draw() -> np.ndarray:
        return np.concatenate([generator.randn(shape) for generator in generators])

    return draw


def to_pil(image: np.ndarray) -> Image.Image:
    """As diffusers' numpy_to_pil: scale to 0..255 and round."""
    return Image.fromarray((image * 255).round().astype(np.uint8))
