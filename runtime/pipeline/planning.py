"""Planning a generation without ONNX sessions: every parameter checked (one InvalidRequestError
naming the field) and the prompts, schedule, seeds, init image and hires pass planned once.
`Planner` holds what planning needs of a model folder; a cluster's ingress is one alone, and a
`Pipeline` (runtime.pipeline.running) is one with sessions."""

from __future__ import annotations

import inspect
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import registry
from ..control.planning import plan_control
from ..control.request import CheckedUnit, check_unit, enabled_units
from ..errors import InvalidRequestError
from ..graphs.controlnets import controlnet_models
from ..graphs.lora import LoraLibrary, LoraResolver
from ..graphs.model_folder import (
    CONTROL_MID_RESIDUAL,
    TEXT_EXTRA,
    Manifest,
    read_manifest,
    read_scheduler_config,
    text_vocab_size,
)
from ..graphs.residuals import no_controlnet_error
from ..graphs.upscalers import upscaler_models
from ..graphs.vaes import resolve_vae
from ..images.hires import HiresPlan, plan_hires
from ..images.img2img import STEP_RULES, default_size, plan_denoise, plan_init
from ..images.inputs import check_strength, load_image
from ..images.tiling import VAE_TILING
from ..limits import MAX_CONTROLNET_UNITS, MAX_PIXELS
from ..registry import UpscalerInfo
from ..sampling.params import check_for_sampler, check_params
from ..sampling.schedules import make_schedule
from ..sampling.timestep_samplers import CFGPP_SAMPLERS
from ..text.comments import strip_comments
from ..text.conditioning import PromptChunks, empty_chunks, prompt_to_chunks
from ..text.embeddings import EmbeddingLibrary, EmbeddingMatcher
from ..text.extra_networks import parse_prompt
from ..text.prompt_schedule import ConditioningPlan
from ..text.tokenizer import ClipTokenizer
from .request import (
    MAX_AND_PARTS,
    MAX_GENERATOR_SEED,
    MAX_WEIGHT,
    MIN_SIZE,
    CondPiece,
    GenerationRequest,
    Prepared,
    check_guidance,
    check_pixels,
    check_size,
    require_int,
    resolve_seeds,
)

INIT_OPTIONS = (  # prepare()'s img2img / inpainting keywords beyond image, strength, mask_image
    "resize_mode", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
    "inpainting_mask_invert",
)  # fmt: skip


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
    step_rule: str = "diffusers",
    img2img_fix_steps: bool = False,
    upscalers: tuple[UpscalerInfo, ...] = (),
    prompt_comments: bool = True,
    clip_skip: int | None = None,
    controlnet: Any = None,
    max_controlnet_units: int | None = MAX_CONTROLNET_UNITS,
    eta: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 0.0,
    s_noise: float = 1.0,
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
    hr_sampler_name (see runtime.images.hires.plan_hires).

    `pad_conds` is A1111's "Pad prompt/negative prompt" option: prompt and negative prompt of
    different 75-token chunk counts share one UNet call, the shorter padded with empty chunks
    (faster; another image). Off, as in the web UI: they run as two UNet calls.

    `step_rule` says how `strength` (and the hires pass's denoising_strength) picks the steps that
    run: "diffusers" (int(steps * strength) from the end of the schedule, diffusers' pipelines) or
    "a1111" (A1111's t_enc + 1 steps from one level noisier; `img2img_fix_steps` is A1111's
    option that runs exactly `steps` steps over a longer schedule). The infotext says "Strength
    rule: diffusers" where the rule changes the image.

    `prompt_comments` is A1111's "Enable comments" (on there by default): `#` hides the rest of its
    line in the prompts, negative prompts and hires prompts (runtime.text.comments), before LoRA
    tags, embeddings and token counts are read; the infotext carries the prompts without them.

    `clip_skip` is A1111's CLIP_stop_at_last_layers (1 = last layer): one the text encoder was
    exported with (manifest.clip_skips); None is the export's default (its first).

    `controlnet`: ControlNet units (runtime.control.request.ControlUnit, or the extension's API dicts)
    of the export's ControlNets, in txt2img, img2img, inpainting and hires fix; at most
    `max_controlnet_units` enabled (None: no bound). `step_rule` also says how their guidance_start
    and guidance_end count steps (runtime.control.injection).
    `eta`, `s_churn`, `s_tmin`, `s_tmax` (0: no bound) and `s_noise` are A1111's sampler
    parameters, each given to the samplers A1111 gives it to (runtime.sampling.params; eta None:
    the sampler's own, 1 for the ancestral and SDE samplers, 0 for DDIM); the infotext names the
    values that differ from the defaults.

    `max_pixels` bounds width * height (and the hires size): a huge size would otherwise run for
    minutes and end in an allocation failure (100000x100000 asks for terabytes); None lifts it.

    `<lora:...>` tags are taken out of the prompt (runtime.text.extra_networks) before its editing
    schedule is planned, as A1111 does; `embeddings` (the pipeline's EmbeddingMatcher) places
    textual-inversion embeddings named in any prompt. `upscalers` are the export's model upscalers
    hr_upscaler may name (Planner passes them)."""
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
    if not isinstance(prompt_comments, bool):
        raise InvalidRequestError("prompt_comments", f"must be true or false, not {prompt_comments!r}")
    if prompt_comments:
        prompt, negative_prompt = strip_comments(prompt), strip_comments(negative_prompt)
        hires_options = _without_comments(hires_options)
    text_prompt, loras = parse_prompt(prompt)
    steps = require_int("steps", num_inference_steps)
    if steps < 1:
        raise InvalidRequestError("steps", f"must be at least 1, not {steps}")
    check_guidance(guidance_scale)
    multiple = manifest.vae_scale_factor
    width = check_size("width", manifest.default_size if width is None else width, multiple)
    height = check_size("height", manifest.default_size if height is None else height, multiple)
    check_pixels("width", width, height, max_pixels)
    count = require_int("batch_size", num_images_per_prompt)
    if count < 1:
        raise InvalidRequestError("batch_size", f"must be at least 1, not {count}")
    sampler = registry.sampler(sampler).key
    schedule = registry.schedule(schedule)
    rng = registry.rng(rng)
    delta = require_int("eta_noise_seed_delta", eta_noise_seed_delta)
    if delta < 0:
        raise InvalidRequestError("eta_noise_seed_delta", f"must not be negative, not {delta}")
    if not isinstance(pad_conds, bool):
        raise InvalidRequestError("pad_conds", f"must be true or false, not {pad_conds!r}")
    seeds = resolve_seeds(seed, count)
    if seeds[-1] + delta > MAX_GENERATOR_SEED:
        most = MAX_GENERATOR_SEED - seeds[-1]
        raise InvalidRequestError("eta_noise_seed_delta", f"seed + ENSD must stay below 2**64, so at most {most}")
    if step_rule not in STEP_RULES:
        raise InvalidRequestError("step_rule", f"must be one of {', '.join(STEP_RULES)}, not {step_rule!r}")
    units = check_controlnet(manifest, controlnet, max_controlnet_units, image is not None)
    sampler_params = check_params(eta, s_churn, s_tmin, s_tmax, s_noise)
    check_for_sampler(sampler_params, sampler, schedule)
    plan = make_schedule(scheduler_config, sampler, schedule, steps)
    init = None
    if image is not None:
        init = plan_init(loaded, mask_image, width, height, strength=strength, latent_factor=multiple, **init_options)

        def make(n: int, t_enc: int | None = None) -> Any:
            return make_schedule(scheduler_config, sampler, schedule, n, t_enc)

        plan = plan_denoise(make, steps, strength, step_rule, bool(img2img_fix_steps))
        if step_rule == "diffusers" and plan.a1111_grid:
            init = replace(init, infotext={**init.infotext, "Strength rule": "diffusers"})
    request = GenerationRequest(
        prompt, negative_prompt, steps, float(guidance_scale), width, height,
        seeds, sampler, schedule, rng, delta, pad_conds, check_clip_skip(manifest, clip_skip), sampler_params,
    )  # fmt: skip
    cond_plan = ConditioningPlan.build(text_prompt, negative_prompt, steps)
    pieces, chunks, padded, counts = plan_conditioning(
        tokenizer, cond_plan, guidance_scale, embeddings=embeddings, pad_conds=pad_conds,
        need_uncond=sampler in CFGPP_SAMPLERS,
    )  # fmt: skip
    vae = resolve_vae(manifest, vae)
    if vae_tiling not in VAE_TILING:
        raise InvalidRequestError("vae_tiling", f"must be one of {', '.join(VAE_TILING)}, not {vae_tiling!r}")
    hires, hires_conditioning, hires_chunks = None, (), {}
    if enable_hr:
        if image is not None:
            raise InvalidRequestError("enable_hr", "hires fix is for txt2img; img2img has no second pass")
        hires = plan_hires(
            width, height, multiple, partial(_schedule_of, scheduler_config, schedule),
            sampler, prompt, negative_prompt, steps, **(hires_options or {}), step_rule=step_rule,
            max_pixels=max_pixels, upscalers=upscalers,
        )  # fmt: skip
        check_pixels("hr_scale", hires.width, hires.height, max_pixels)
        check_for_sampler(sampler_params, hires.sampler, schedule)
        hires_conditioning, hires_chunks, padded_hr, hr_counts = _hires_conditioning(
            tokenizer, hires, request, embeddings
        )
        padded = padded or padded_hr
        counts = {name: max(count, counts.get(name, 0)) for name, count in {**counts, **hr_counts}.items()}
    rows = embeddings.rows if embeddings is not None else None
    hires_size = (hires.width, hires.height) if hires is not None else None
    control = plan_control(
        units, width, height, hires_size, init, image, init_options.get("resize_mode", 0), seeds[0], step_rule
    )
    return Prepared(
        request, plan, pieces, chunks, padded, counts, init, hires, hires_conditioning, hires_chunks, vae_tiling,
        tuple(loras), rows, vae, control,
    )  # fmt: skip


# The leading keywords of prepare() that Pipeline.__call__ also takes by position, in this order
# (prompt, negative_prompt, num_inference_steps, ... eta_noise_seed_delta), read off its signature
# so that the list of parameters lives in one place.
POSITIONAL = tuple(inspect.signature(prepare).parameters)[3:15]


def positional_parameters(args: tuple[Any, ...], keywords: dict[str, Any]) -> dict[str, Any]:
    """prepare()'s keywords from a call's positional arguments (see POSITIONAL) and keywords."""
    if len(args) > len(POSITIONAL):
        raise TypeError(f"takes at most {len(POSITIONAL)} positional arguments ({', '.join(POSITIONAL)})")
    named = dict(zip(POSITIONAL, args, strict=False))
    twice = set(named) & set(keywords)
    if twice:
        raise TypeError(f"got multiple values for {', '.join(sorted(twice))}")
    return {**named, **keywords}


def check_controlnet(
    manifest: Manifest, controlnet: Any, max_units: int | None, init_image: bool
) -> tuple[CheckedUnit, ...]:
    """The enabled ControlNet units, checked. An export whose UNet takes no ControlNet residuals
    (made before ControlNet support) is one error saying how to export it again."""
    enabled = enabled_units(controlnet, max_units)
    if not enabled:
        return ()
    if CONTROL_MID_RESIDUAL not in manifest.graphs["unet"].inputs:
        raise InvalidRequestError("controlnet", str(no_controlnet_error(manifest.folder)))
    models = {name: model.hash for name, model in controlnet_models(manifest).items()}
    return tuple(check_unit(unit, models, field, init_image) for field, unit in enabled)


def check_clip_skip(manifest: Manifest, clip_skip: Any) -> int:
    """The request's clip skip, one the text encoder has an output for; another is one clear error
    saying how to export it (the clip skips are graph outputs, chosen at export)."""
    if clip_skip is None:
        return manifest.clip_skip
    value = require_int("clip_skip", clip_skip)
    if value not in manifest.clip_skips:
        have = ", ".join(str(item) for item in manifest.clip_skips)
        wanted = ",".join(str(item) for item in (*manifest.clip_skips, value))
        raise InvalidRequestError(
            "clip_skip", f"this model was exported with clip skip {have}; {value} needs another export: "
            f"`python -m export --clip-skip {wanted}`",
        )  # fmt: skip
    return value


def _schedule_of(config: dict[str, Any], schedule: str, sampler: str, n: int, t_enc: int | None = None) -> Any:
    """A sampler's schedule by name (plan_hires picks the sampler): make_schedule's order."""
    return make_schedule(config, sampler, schedule, n, t_enc)


def _without_comments(hires_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The hires prompts without comments (plan_hires refuses what is not a string)."""
    if not hires_options:
        return hires_options
    stripped = {name: strip_comments(hires_options[name]) for name in ("hr_prompt", "hr_negative_prompt")
                if isinstance(hires_options.get(name), str)}  # fmt: skip
    return {**hires_options, **stripped}


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
    return plan_conditioning(
        tokenizer, cond_plan, request.guidance_scale, fields, embeddings, request.pad_conds,
        need_uncond=hires.sampler in CFGPP_SAMPLERS,
    )  # fmt: skip


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
    need_uncond: bool = False,
) -> tuple[tuple[CondPiece, ...], dict[str, PromptChunks], bool, dict[str, int]]:
    """The conditioning pieces of one pass from the prompts' editing/alternation/AND plan (made for
    that pass's step count), and every text they name parsed and chunked once (its weights
    checked as prompt_chunks does; a hires second pass builds its plan with hires_steps).

    Each text keeps its own chunk count; how parts and negative of different lengths meet in the
    UNet is conditioning.unet_contexts (A1111's CFGDenoiser). With `pad_conds` the empty text's
    chunk comes along (what the shorter side is padded with), and the bool returned says whether
    any step pads (infotext `Pad conds: True`). Guidance at most 1 drops the negative prompt,
    except with AND or a part weight: A1111 combines those around the uncond always, and for a
    sampler that `need_uncond` (DDIM CFG++ steers along the uncond prediction)."""
    positive, negative = fields
    if len(plan.parts) > MAX_AND_PARTS:
        raise InvalidRequestError(positive, f"{len(plan.parts)} AND parts is more than {MAX_AND_PARTS}")
    for _, weight in plan.parts:
        if not np.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise InvalidRequestError(positive, f"AND weight {weight:g} is out of range (|weight| <= {MAX_WEIGHT:g})")
    with_negative = guidance_scale > 1.0 or plan.composable or need_uncond
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
        self.upscalers = tuple(model.info for model in upscaler_models(manifest).values())

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        lora_dir: str | Path | None = None,
        embeddings_dir: str | Path | None = None,
        vae: str | None = None,
    ) -> Planner:
        manifest = read_manifest(folder)
        tokenizer = ClipTokenizer.from_folder(manifest.folder / "tokenizer")
        loras = LoraResolver(manifest, LoraLibrary(lora_dir))
        return cls(manifest, tokenizer, read_scheduler_config(manifest.folder), loras, embeddings_dir, vae)

    def prepare(self, **parameters: Any) -> Prepared:
        """Check and plan a generation (keywords of `Pipeline.__call__` but output_type and
        callbacks), including that every LoRA the prompt names exists and fits this model. The
        embeddings' vectors travel in the Prepared (a few KB each), to whichever Pipeline runs it."""
        matcher = self.embeddings.matcher()
        parameters.setdefault("vae", self.vae)
        prepared = prepare(
            self.manifest,
            self.scheduler_config,
            self.tokenizer,
            embeddings=matcher,
            upscalers=self.upscalers,
            **parameters,
        )
        self.loras.resolve(list(prepared.loras))
        # The manifest lists the graph's inputs, and loading a session checks the graph against it.
        text_inputs = self.manifest.graphs["text_encoder"].inputs
        if prepared.extra is not None and prepared.extra.used and TEXT_EXTRA not in text_inputs:
            raise InvalidRequestError(
                "prompt", f"embedding {next(iter(prepared.extra.used))!r} needs a text encoder exported with "
                "embedding support; re-export the model with this version of `python -m export`"
            )  # fmt: skip
        return prepared
