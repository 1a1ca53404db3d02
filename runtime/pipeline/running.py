"""Running a planned generation on the graphs: text encoder -> sampler loop with CFG -> VAE.

`Pipeline` is a Planner with sessions. The API follows diffusers' StableDiffusionPipeline
(`Pipeline.from_pretrained(folder)`, then call it with a prompt) and its defaults follow
ACertainThing's model card (28 steps, Euler a, CFG 11).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__, registry
from ..control.injection import PassControl
from ..errors import InvalidRequestError
from ..graphs.lora import LoraLibrary, LoraSessions
from ..graphs.model_folder import (
    TEXT_EXTRA,
    TEXT_INPUT,
    VAE_DECODER_INPUT,
    VAE_ENCODER_INPUT,
    Manifest,
    read_manifest,
    read_scheduler_config,
    verify_files,
)
from ..graphs.sessions import GraphSession, SessionConfig, Sessions, load_sessions
from ..graphs.upscalers import UpscalerSessions
from ..graphs.vaes import resolve_vae, vae_choices, vae_label
from ..images.hires import HiresPlan
from ..images.img2img import (
    DENOISER_MASK_SAMPLERS,
    apply_overlay,
    blend,
    encode_sample,
    fill_latents,
    keep_known,
    noised_init,
)
from ..images.metadata import format_infotext, infotext_number
from ..images.model_upscale import resize_with_model
from ..images.tiling import TileSizes, tiled, use_tiling
from ..images.upscale import ImageResize, truncate, upscale_image, upscale_latents
from ..limits import LORA_CACHE_MB
from ..sampling import ksamplers, samplers
from ..sampling.params import SamplerParams
from ..sampling.rng import NoiseGenerator, make_generator
from ..sampling.schedules import AUTOMATIC, Schedule, final_latents
from ..sampling.timestep_samplers import CFGPP_SAMPLERS, CFGPP_SCALE_DIVISOR
from ..text.conditioning import PromptChunks, encode_chunks
from ..text.embeddings import ti_hashes
from ..text.tokenizer import ClipTokenizer
from .control import ControlNets
from .denoising import Denoiser, brownian_noise, make_denoiser, per_image_noise
from .planning import Planner, positional_parameters
from .request import CondPiece, GenerationRequest, Prepared, check_finite, check_lora_cache_mb, uses_ensd

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np")
StepCallback = Callable[[int, int, np.ndarray], Any]  # (step, total, latents); returning False stops


@dataclass
class PipelineOutput:
    images: list  # PIL images, or float32 (H, W, 3) arrays in [0, 1] for output_type="np"
    infotexts: list[str]
    seeds: list[int]
    interrupted: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    # ControlNet units' detected maps, as the extension shows them after the images (PIL, or uint8
    # (H, W, 3) arrays for output_type="np"): per unit, the hires pass's then the first pass's
    detected_maps: list = field(default_factory=list)


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
        self.controlnets = ControlNets(manifest)
        self.sessions = sessions  # the running generation's (LoRA-patched or plain) sessions
        self._extra: np.ndarray | None = None  # the running generation's extra_embeddings rows
        self.upscaler_sessions = UpscalerSessions(manifest, sessions.provider, sessions.config)
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
        of LoRA-patched sessions kept for later requests (0: none; see runtime.graphs.lora.LoraSessions)."""
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

    @property
    def provider_choice(self) -> str:
        """What runs the graphs and why, in one line (e.g. OpenVINO's precision, an int8 UNet, and
        what "auto" saw); the CLI and server print it at start."""
        return self.sessions.choice

    def release_memory(self) -> None:
        """Give back what a large generation left in onnxruntime's arenas (see Sessions.release_memory),
        the loaded ControlNets' too (one small run each, with arena shrinkage on)."""
        self.sessions.release_memory(self.manifest)
        self.controlnets.release_memory()

    # -- prepare and run ------------------------------------------------------------------------

    def __call__(
        self,
        *args: Any,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        cancel_event: threading.Event | None = None,
        **parameters: Any,
    ) -> PipelineOutput:
        """Generate: prepare (every parameter checked once) then run. The parameters are prepare()'s
        (runtime.pipeline.planning.prepare: prompt, negative_prompt, num_inference_steps,
        guidance_scale, seed, sampler, img2img, inpainting, hires fix, ...), described there once;
        the first twelve may also be given by position, prompt first."""
        check_output_type(output_type)
        prepared = self.prepare(**positional_parameters(args, parameters))
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
        maps = prepared.control.detected_maps if prepared.control is not None else []
        maps = maps if output_type == "np" else [Image.fromarray(item) for item in maps]
        return PipelineOutput(images, infotexts, request.seeds, interrupted, request.__dict__.copy(), maps)

    def model_resize(self, name: str) -> ImageResize:
        """A1111's resize_image with the model upscaler `name` (hires fix: decode, this, encode)."""
        run, model = self.upscaler_sessions.runner(name), self.upscaler_sessions.models[name]
        return partial(resize_with_model, run, model)

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

    def encode(self, chunks: dict[str, PromptChunks], clip_skip: int) -> dict[str, np.ndarray]:
        """Hidden states of shape (77*k, width) of every text the generation's pieces name: all
        chunks through the text encoder in one batch (one run, also with prompt editing),
        A1111's emphasis applied per text, chunks joined on the token axis; the embeddings the
        prompts name ride along as extra_embeddings rows. `clip_skip` picks the text encoder's
        output (one of manifest.clip_skips)."""
        output = self.manifest.text_output(clip_skip)

        def run(ids: np.ndarray) -> np.ndarray:
            feed = {TEXT_INPUT: ids}
            if self._extra is not None:
                feed[TEXT_EXTRA] = self._extra
            return self.sessions.text_encoder.run(feed, output)

        return encode_chunks(run, chunks, self.tokenizer)

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
            "Schedule type": registry.schedule_label(request.sampler, request.schedule, AUTOMATIC),
            "CFG scale": infotext_number(request.guidance_scale),
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",  # the first pass's, as A1111 writes it
            "Model hash": self.manifest.model_hash,
            "Model": self.manifest.model_name,
            "VAE hash": vae_label(self.manifest, prepared.vae)[1],
            "VAE": vae_label(self.manifest, prepared.vae)[0],
            "Clip skip": request.clip_skip if request.clip_skip >= 2 else None,  # A1111 leaves 1 out
            "ENSD": request.eta_noise_seed_delta if uses_ensd(request) else None,
            "RNG": registry.RNG_LABELS[request.rng],
            "Pad conds": True if prepared.padded else None,
            **(prepared.init.infotext if prepared.init is not None else {}),
            **(prepared.hires.infotext if prepared.hires is not None else {}),
            **(prepared.control.infotext() if prepared.control is not None else {}),
            **request.sampler_params.infotext(request.sampler),
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
        x, after_step, masked = self._initial(prepared, generators, self._latent_shape(request.width, request.height))
        pass_ = _Pass(request.sampler, prepared.schedule, prepared.conditioning, prepared.chunks, after_step, masked)
        # A1111 counts a txt2img pass in requested steps, an img2img one in the steps that run.
        control = self.controlnets.for_pass(
            prepared.control, self.sessions, False, request.steps if prepared.init is None else None
        )
        latents, interrupted = self._loop(request, pass_, x, generators, callback, cancel_event, control)
        if prepared.hires is None or interrupted:
            return latents, interrupted
        x0 = self._upscale(latents, prepared.hires, prepared.vae_tiling)
        # A1111: the second pass draws its noise from fresh generators of the same seeds.
        generators = [make_generator(request.rng, seed) for seed in request.seeds]
        noise = np.concatenate([g.randn((1, *x0.shape[1:])) for g in generators])
        x = noised_init(x0, noise, prepared.hires.schedule)
        hires = prepared.hires
        pass_ = _Pass(hires.sampler, hires.schedule, prepared.hires_conditioning, prepared.hires_chunks)
        control = self.controlnets.for_pass(prepared.control, self.sessions, True, None)
        return self._loop(request, pass_, x, generators, callback, cancel_event, control)

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
        controls: Callable[[int], PassControl | None] | None = None,
    ) -> tuple[np.ndarray, bool]:
        """One sampling pass from x. An interrupted pass returns the last prediction of the
        clean image, as the A1111 web UI shows on Interrupt. `controls` gives the pass's ControlNet
        units for its step count."""
        schedule, shape = pass_.schedule, (1, *x.shape[1:])
        total = sampler_steps(pass_.sampler, schedule)
        control = controls(total) if controls is not None else None
        if request.eta_noise_seed_delta > 0:
            # A1111 1.10 (ImageRNG.first) re-seeds the generators with seed + ENSD once the initial
            # noise is drawn, whatever the sampler: every later draw (ancestral noise, Restart's
            # restarts) comes from them; the infotext names ENSD only for "uses_ensd" samplers.
            generators = [make_generator(request.rng, seed + request.eta_noise_seed_delta) for seed in request.seeds]
        states = self.encode(pass_.chunks, request.clip_skip)
        cfgpp = pass_.sampler in CFGPP_SAMPLERS
        scale = request.guidance_scale / CFGPP_SCALE_DIVISOR if cfgpp else request.guidance_scale
        denoise = make_denoiser(
            self.sessions.unet, pass_.conditioning, states, scale, x.shape, request.pad_conds, with_uncond=cfgpp,
            control=control,
        )  # fmt: skip
        last_denoised: dict[str, np.ndarray] = {}

        def tracked(x_in: np.ndarray, sigma: float, timestep: float) -> Any:
            out = denoise(x_in, sigma, timestep)
            if pass_.masked is not None:  # A1111's CFGDenoiser: the known latents outside the mask
                out = pass_.masked(out)
            last_denoised["x"] = out[0] if isinstance(out, tuple) else out
            return out

        def on_step(step: int, latents: np.ndarray) -> np.ndarray | None:
            latents = pass_.after_step(step, latents) if pass_.after_step is not None else latents
            if control is not None:
                control.step_done(step)
            # DPM adaptive picks its own steps: its total grows past the estimate if it must.
            stop = callback is not None and callback(step + 1, max(total, step + 1), latents) is False
            if stop or (cancel_event is not None and cancel_event.is_set()):
                raise _Stop
            return latents

        try:
            if registry.sampler(pass_.sampler).brownian:
                noise = brownian_noise(request.seeds, request.rng, shape[1:], schedule)
            else:
                noise = per_image_noise(generators, shape)
            x = run_sampler(
                pass_.sampler, tracked, x.astype(np.float32), schedule, noise, on_step, request.sampler_params
            )
        except _Stop:
            log.info("generation interrupted; decoding the last prediction")
            # A clean-image prediction sits at noise level 0: nothing to rescale.
            return last_denoised.get("x", x), True
        if pass_.masked is not None:  # and once more on the result, as A1111's img2img sample()
            x = pass_.masked(x)
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
            model = self.model_resize(plan.upscaler.name) if plan.upscaler.mode == registry.MODEL else None
            pixels = [upscale_image(image, plan.upscale_to, plan.upscaler, model) for image in decoded]
            moments = [self.encode_pixels((image * 2 - 1).transpose(2, 0, 1)[None], tiling) for image in pixels]
            upscaled = np.concatenate([np.split(m, 2, axis=1)[0] for m in moments])
            upscaled = upscaled * np.float32(self.manifest.vae_scaling_factor)
        return truncate(upscaled, *plan.truncate).astype(np.float32)

    def _initial(
        self, prepared: Prepared, generators: list[NoiseGenerator], shape: tuple[int, ...]
    ) -> tuple[np.ndarray, _Blend | None, _Blend | None]:
        """The first sample x (VE space), what to do to x after each step (diffusers' inpainting)
        and to each denoised prediction and the result (A1111's, for DPM adaptive). Each image's
        generator draws as diffusers' pipelines do: txt2img the noise; img2img the VAE sample,
        then the noise; inpainting also a (discarded) sample for the masked image."""
        schedule, init = prepared.schedule, prepared.init
        if init is None:
            x = np.concatenate([g.randn(shape) for g in generators]) * np.float32(schedule.init_noise_sigma)
            return x, None, None
        moments = self.encode_pixels(init.pixels, prepared.vae_tiling)
        x0 = encode_sample(moments, [g.randn(shape) for g in generators], self.manifest.vae_scaling_factor)
        noise = np.concatenate([g.randn(shape) for g in generators])
        if init.latent_mask is None:
            return noised_init(x0, noise, schedule), None, None
        for g in generators:
            g.randn(shape)  # diffusers encodes the masked image with each generator: same draws
        x0, mask = fill_latents(x0, noise, init), init.latent_mask
        if init.strength == 1.0:  # diffusers starts from pure noise at full strength
            x = (noise * np.float32(schedule.init_noise_sigma)).astype(np.float32)
        else:
            x = noised_init(x0, noise, schedule)
        if prepared.request.sampler in DENOISER_MASK_SAMPLERS:
            return x, None, partial(keep_known, x0=x0, mask=mask)
        ends = step_ends(prepared.request.sampler, schedule)

        def after_step(step: int, latents: np.ndarray) -> np.ndarray:
            return blend(latents, x0, noise, float(ends[step]), mask)

        return x, after_step, None

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


_Blend = Callable[..., np.ndarray]


@dataclass(frozen=True, eq=False)
class _Pass:
    sampler: str
    schedule: Schedule
    conditioning: tuple[CondPiece, ...]
    chunks: dict[str, PromptChunks]
    after_step: _Blend | None = None  # (step, x) -> x: diffusers' inpainting blend after each step
    masked: _Blend | None = None  # latents -> latents: A1111's, on each prediction and the result


def run_sampler(
    name: str,
    denoise: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    noise: Any,
    callback: Any,
    params: SamplerParams | None = None,
) -> np.ndarray:
    """k-diffusion samplers on A1111 schedules (the model asked at any level); diffusers' on
    diffusers' schedules and A1111's DDIM (the model asked at the schedule's steps)."""
    if schedule.log_sigmas is not None:
        return ksamplers.sample(name, denoise, x, schedule, noise, callback, params)

    def at_step(x_in: np.ndarray, step: int) -> np.ndarray:
        # PLMS's look-ahead on a run's last step asks at sigmas[-1], whose timestep ends the grid
        timestep = schedule.timesteps[step] if step < schedule.steps else schedule.end_timestep
        return denoise(x_in, float(schedule.sigmas[step]), float(timestep))

    return samplers.sample(name, at_step, x, schedule, noise, callback, params)


def step_ends(name: str, schedule: Schedule) -> np.ndarray:
    """The level x is at after each step of sampler `name` (Restart's jumps included)."""
    if schedule.log_sigmas is not None:
        return ksamplers.step_ends(name, schedule)
    return np.asarray(schedule.sigmas[1:], dtype=np.float32)


def sampler_steps(name: str, schedule: Schedule) -> int:
    """The steps sampler `name` reports progress for: the schedule's, or Restart's own plan."""
    return len(step_ends(name, schedule)) if schedule.log_sigmas is not None else schedule.steps


def to_pil(image: np.ndarray) -> Image.Image:
    """As diffusers' numpy_to_pil: scale to 0..255 and round."""
    return Image.fromarray((image * 255).round().astype(np.uint8))
