"""A1111 request semantics -> the library's GenerationRequests, checked against the server limits.

Everything here runs before a job is queued, so every mistake in a request is a 422 that names
the field, and nothing that reaches the GPU can fail for a reason the client could have avoided.

Mapping decisions (docs/server.md has the table):
- sampler_name: A1111's names and aliases, case-insensitive, plus the library's own names; a
  scheduler label at the end ("DPM++ 2M Karras") sets the scheduler, as A1111 1.9+ reads it.
- scheduler "Automatic": A1111's plain k-diffusion discretization ("a1111"), except that since
  A1111 1.9 "DPM++ 2M" defaults to Karras. "Uniform" is the plain one, "Karras" Karras. DDIM is a
  timestep sampler in A1111 and ignores the scheduler: it always gets A1111's uniform timesteps.
  "Diffusers" (not an A1111 name) selects the diffusers scheduler's own discretization.
- override_settings: a request's own settings; what it leaves out comes from the server's
  (POST /options, runtime.server.settings). sd_model_checkpoint is resolved by the routes.
- override_settings.randn_source: "GPU" (A1111's default) and "NV" -> "nv" (A1111's NV source
  reproduces torch's CUDA randn), "CPU" -> "cpu".
- ENSD re-seeds every noise drawn after the initial latent, so it reaches the samplers that draw
  any ("Euler a", "Restart"), as in A1111 1.10; the infotext names it for A1111's "uses_ensd" ones
  (runtime.pipeline.request.uses_ensd).
- n_iter batches continue the seeds: image i of the request uses seed + i.
- eta, s_churn, s_tmin, s_tmax, s_noise: A1111's request fields and settings, resolved as A1111
  1.10 does (sampler_parameters), reach the samplers A1111 gives them to (runtime.sampling.params).
- img2img and the hires pass take A1111's step rule (t_enc = int(min(strength, 0.999) * steps),
  the last t_enc + 1 levels; override_settings.img2img_fix_steps honoured), the library's
  step_rule="a1111"; the library's own default stays diffusers' rule. The same switch makes
  ControlNet units' guidance_start/end count steps as the ControlNet extension does.
- alwayson_scripts.controlnet: the ControlNet extension's units (runtime.server.controlnet); no
  other always-on script is run, so any other is "not found".
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidRequestError
from ..graphs.vaes import DEFAULT_NAMES as DEFAULT_VAE_NAMES
from ..images.model_upscale import check_upscale
from ..pipeline import MAX_GENERATOR_SEED, MAX_SEED, Prepared
from ..registry import (
    MODEL,
    RNG_SOURCES,
    TIMESTEP_SAMPLERS,
    SamplerInfo,
    SchedulerInfo,
    library_schedule,
)
from ..registry import sampler_and_scheduler as find_sampler
from ..registry import scheduler as find_scheduler_named
from ..text.styles import Style, styled
from .config import Limits
from .controlnet import api_field, request_units, script_key
from .images import decode_base64
from .schemas import GenerationFields, Img2ImgRequest, Txt2ImgRequest
from .settings import Defaults

if TYPE_CHECKING:
    from ..graphs.lora import LoraResolver
    from ..graphs.model_folder import Manifest
    from ..text.embeddings import EmbeddingLibrary

MAX_RANDOM_SEED = MAX_SEED - 1  # A1111 draws random seeds from [0, 4294967294]


class PlanModel(Protocol):
    """What checking a request needs of the model: a runtime.pipeline.Planner. A loaded Pipeline
    is one, and so is a cluster's ingress, which reads the model and add-on folders without
    loading any ONNX session."""

    manifest: Manifest
    loras: LoraResolver
    embeddings: EmbeddingLibrary

    def prepare(self, **parameters: Any) -> Prepared: ...


# The library's field names -> the API's, so that every 422 names what the client sent.
_FIELD_NAMES = {
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "rng": "override_settings.randn_source",
    "eta_noise_seed_delta": "override_settings.eta_noise_seed_delta",
    "image": "init_images",
    "mask_image": "mask",
    "strength": "denoising_strength",
    "vae": "override_settings.sd_vae",
    "pad_conds": "override_settings.pad_cond_uncond",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
}


@dataclass(frozen=True)
class Plan:
    """A validated txt2img job: one library request per n_iter batch, plus what the answer echoes."""

    batches: tuple[Prepared, ...]
    sampler: SamplerInfo
    scheduler: SchedulerInfo
    seed: int
    all_seeds: list[int]
    send_images: bool
    model: str | None = None  # the checkpoint's title (one box: the pipeline the worker runs it on)

    @property
    def steps(self) -> int:
        return self.batches[0].request.steps

    @property
    def denoising_strength(self) -> float | None:
        first = self.batches[0]
        plan = first.init or first.hires
        return plan.strength if plan is not None else None

    @property
    def extra_generation_params(self) -> dict[str, Any]:
        """A1111's Processed.extra_generation_params: the mode's infotext fields, and the ControlNet
        extension's."""
        first = self.batches[0]
        fields = {**(first.init.infotext if first.init else {}), **(first.hires.infotext if first.hires else {}),
                  **(first.control.infotext() if first.control else {})}  # fmt: skip
        return {key: value for key, value in fields.items() if value is not None and key != "Denoising strength"}

    @property
    def detected_maps(self) -> list:
        """The ControlNet units' detected maps (uint8 arrays), appended once after every batch's images."""
        control = self.batches[0].control
        return control.detected_maps if control is not None else []


# A1111's values of the hires "same as the first pass" fields (its web UI sends these words).
SAME_AS_FIRST_PASS = {
    "hr_sampler_name": ("", "Use same sampler"),
    "hr_scheduler": ("", "Use same scheduler"),
    "hr_checkpoint_name": ("", "Use same checkpoint"),
}
NO_REFINER = ("", "None", "none")  # A1111's process_images: these refiner_checkpoint values mean none


def _check_defaults_only(body: GenerationFields) -> None:
    """Refuse features that would silently change the image if they were ignored."""
    unsupported = {
        "restore_faces": (body.restore_faces, "face restoration is not supported"),
        "tiling": (body.tiling, "tiling is not supported"),
        "subseed_strength": (body.subseed_strength, "variation seeds are not supported"),
        "seed_resize_from_h": (body.seed_resize_from_h > 0, "seed resize is not supported"),
        "seed_resize_from_w": (body.seed_resize_from_w > 0, "seed resize is not supported"),
        "disable_extra_networks": (body.disable_extra_networks, "<lora:...> tags are always applied here"),
    }
    for name, (value, message) in unsupported.items():
        if value:
            raise InvalidRequestError(name, message)
    _check_scripts(body)


def _check_scripts(body: GenerationFields) -> None:
    """A1111's answer for scripts it does not have (api.py's script_name_to_index, a 422 there too):
    this server runs no selectable script and one always-on script, ControlNet (GET
    /sdapi/v1/scripts), so a script name, or any other entry of alwayson_scripts, is "not found";
    null, "" and {} ask for none."""
    if body.script_name:
        raise InvalidRequestError("script_name", f"Script {body.script_name!r} not found (GET /sdapi/v1/scripts)")
    for name in body.alwayson_scripts:
        if name != script_key(body):
            raise InvalidRequestError(f"alwayson_scripts.{name}", f"Script {name!r} not found (GET /sdapi/v1/scripts)")


def check_checkpoint_fields(body: GenerationFields, title: str, find: Callable[[str], Any]) -> None:
    """refiner_checkpoint and hr_checkpoint_name may only name the request's own checkpoint (A1111
    then switches nothing) or none: switching models mid-sampling is not implemented. `find`: a
    checkpoint by name (ModelSet.find), its `title` compared."""
    fields = {"refiner_checkpoint": (body.refiner_checkpoint, NO_REFINER)}
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        fields["hr_checkpoint_name"] = (body.hr_checkpoint_name, SAME_AS_FIRST_PASS["hr_checkpoint_name"])
    for field, (name, none) in fields.items():
        if name is None or name in none:
            continue
        found = find(name)
        if found is None:  # A1111's words (its refiner raises them as a 500)
            raise InvalidRequestError(field, f"Could not find checkpoint with name {name}")
        if found.title != title:
            raise InvalidRequestError(
                field, f"{found.title} is not this request's checkpoint ({title}); switching checkpoints "
                "during sampling is not supported",
            )  # fmt: skip


def _check_hires_scheduler(body: GenerationFields, scheduler: SchedulerInfo) -> None:
    """The second pass runs on the first pass's scheduler: another is refused, not ignored."""
    if not isinstance(body, Txt2ImgRequest) or not body.enable_hr:
        return
    name = body.hr_scheduler
    if name is None or name in SAME_AS_FIRST_PASS["hr_scheduler"]:
        return
    try:
        other = find_scheduler_named(name)
    except InvalidRequestError as error:
        raise InvalidRequestError("hr_scheduler", error.message) from None
    if other != scheduler:
        raise InvalidRequestError(
            "hr_scheduler", f"the second pass runs on the first pass's scheduler ({scheduler.label}), not {name!r}"
        )


def _check_overrides(body: GenerationFields, manifest: Manifest, defaults: Defaults) -> tuple[str, int]:
    """(library rng, ENSD) from override_settings, else the server's settings."""
    settings = body.override_settings
    rng = RNG_SOURCES[settings.randn_source or defaults.randn_source]
    ensd = settings.eta_noise_seed_delta if settings.eta_noise_seed_delta is not None else defaults.eta_noise_seed_delta
    return rng, ensd


def sampler_parameters(body: GenerationFields, defaults: Defaults, sampler: SamplerInfo) -> dict[str, Any]:
    """The library's eta, s_churn, s_tmin, s_tmax, s_noise as A1111 1.10 resolves them
    (Sampler.initialize): eta is the request's, else the setting of the sampler's kind (eta_ddim
    for the timestep samplers, eta_ancestral for the others; a default one leaves each sampler its
    own, also a hires sampler of the other kind); each s_* is the setting when that is not
    A1111's default (0, or 1 for s_noise), else the request's, else the setting."""
    setting = "eta_ddim" if sampler.key in TIMESTEP_SAMPLERS else "eta_ancestral"
    eta = body.eta
    if eta is None and _setting(body, defaults, setting) != getattr(Defaults(), setting):
        eta = _setting(body, defaults, setting)
    values: dict[str, Any] = {"eta": eta}
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        option, asked = _setting(body, defaults, name), getattr(body, name)
        values[name] = option if option != getattr(Defaults(), name) or asked is None else asked
    return values


def _check_limits(body: GenerationFields, limits: Limits) -> None:
    checks = (
        ("steps", body.steps, limits.max_steps, "steps"),
        ("batch_size", body.batch_size, limits.max_batch, "images per batch"),
        ("n_iter", body.batch_size * body.n_iter, limits.max_images, "images per request (batch_size * n_iter)"),
        ("width", body.width * body.height, limits.max_pixels, "pixels per image (width * height)"),
        ("cfg_scale", body.cfg_scale, limits.max_cfg_scale, "CFG scale"),
    )
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        checks += (("hr_second_pass_steps", body.hr_second_pass_steps, limits.max_steps, "steps"),)
    for name, value, limit, what in checks:
        if value > limit:
            raise InvalidRequestError(name, f"{value:g} {what} is over this server's limit of {limit:g}")


def _check_prompt_length(prepared: Prepared, limits: Limits) -> None:
    for name, count in prepared.chunk_counts.items():
        if count > limits.max_prompt_chunks:
            raise InvalidRequestError(
                name, f"{count} chunks of 75 tokens is over this server's limit of {limits.max_prompt_chunks}"
            )


def resolve_seed(seed: int, count: int) -> int:
    """-1 picks a random seed, low enough that all `count` seeds stay in A1111's range."""
    if seed == -1:
        return secrets.randbelow(MAX_RANDOM_SEED - count + 2)
    if seed < 0 or seed + count - 1 > MAX_SEED:
        raise InvalidRequestError(
            "seed", f"must be -1 (random) or a seed with seed + {count - 1} <= {MAX_SEED}, not {seed}"
        )
    return seed


@contextmanager
def _api_field_names(body: GenerationFields) -> Iterator[None]:
    """Re-raise the library's InvalidRequestError under the API's name for the field."""
    try:
        yield
    except InvalidRequestError as error:
        key = script_key(body)
        field = _FIELD_NAMES.get(error.field) or (api_field(error.field, key) if key is not None else None)
        if field is None:
            raise
        raise InvalidRequestError(field, error.message) from None


def _mode_options(body: GenerationFields, styles: list[Style]) -> dict[str, Any]:
    """The library keywords of the request's mode: hires fix for txt2img, the init image, mask and
    inpainting options for img2img. Styles reach the hires prompts as in A1111 (an empty one is the
    prompt, styled once: planning falls back to the styled first-pass prompt)."""
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise InvalidRequestError("init_images", "needs one image")
        options: dict[str, Any] = {
            "image": decode_base64("init_images", body.init_images[0]), "strength": body.denoising_strength,
            "resize_mode": body.resize_mode,
        }  # fmt: skip
        if body.mask is not None:
            options.update(
                mask_image=decode_base64("mask", body.mask), mask_blur=body.mask_blur,
                inpainting_fill=body.inpainting_fill, inpaint_full_res=body.inpaint_full_res,
                inpaint_full_res_padding=body.inpaint_full_res_padding,
                inpainting_mask_invert=bool(body.inpainting_mask_invert),
            )  # fmt: skip
        return options
    if not isinstance(body, Txt2ImgRequest) or not body.enable_hr:
        return {}
    hires = {
        "hr_scale": body.hr_scale, "hr_resize_x": body.hr_resize_x, "hr_resize_y": body.hr_resize_y,
        "hr_upscaler": body.hr_upscaler or "Latent", "hr_second_pass_steps": body.hr_second_pass_steps,
        "denoising_strength": 0.7 if body.denoising_strength is None else body.denoising_strength,
        "hr_prompt": body.hr_prompt, "hr_negative_prompt": body.hr_negative_prompt,
        "hr_sampler_name": None if body.hr_sampler_name in SAME_AS_FIRST_PASS["hr_sampler_name"]
        else body.hr_sampler_name,
    }  # fmt: skip
    if body.hr_prompt or body.hr_negative_prompt:
        hr_prompt, hr_negative = styled(body.hr_prompt or body.prompt, body.hr_negative_prompt or body.negative_prompt,
                                        styles)  # fmt: skip
        hires.update(hr_prompt=hr_prompt, hr_negative_prompt=hr_negative)
    return {"enable_hr": True, "hires_options": hires}


def _check_sizes(prepared: Prepared, limits: Limits) -> None:
    """The hires output and the init image count against the pixel limit too."""
    hires = prepared.hires
    if hires is not None and hires.width * hires.height > limits.max_pixels:
        raise InvalidRequestError(
            "hr_scale", f"the hires size {hires.width}x{hires.height} is over this server's limit of "
            f"{limits.max_pixels} pixels per image",
        )  # fmt: skip
    if hires is not None and hires.upscaler.mode == MODEL:
        request = prepared.request
        scale = max(hires.upscale_to[1] / request.width, hires.upscale_to[0] / request.height)
        check_upscale(request.width, request.height, scale, hires.upscaler, limits.max_pixels, "hr_upscaler")
    init = prepared.init
    if init is not None and init.overlay is not None:
        width, height = init.overlay.original.size
        if width * height > 4 * limits.max_pixels:
            raise InvalidRequestError("init_images", f"{width}x{height} is over 4x this server's pixel limit")


def _setting(body: GenerationFields, defaults: Defaults, name: str) -> Any:
    """A setting for this request: its override_settings value, else the server's."""
    value = getattr(body.override_settings, name)
    return getattr(defaults, name) if value is None else value


def _prepare_batch(
    pipe: PlanModel,
    body: GenerationFields,
    defaults: Defaults,
    sampler: SamplerInfo,
    schedule: str,
    rng: str,
    ensd: int,
    first_seed: int,
    styles: list[Style],
    limits: Limits,
) -> Prepared:
    vae = _setting(body, defaults, "sd_vae")
    prompt, negative_prompt = styled(body.prompt, body.negative_prompt, styles)
    return pipe.prepare(
        prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=body.steps,
        guidance_scale=body.cfg_scale, width=body.width, height=body.height, seed=first_seed,
        num_images_per_prompt=body.batch_size, sampler=sampler.key, schedule=schedule, rng=rng,
        eta_noise_seed_delta=ensd, max_pixels=None, **_mode_options(body, styles),  # the server's limit: checked
        **({"vae": vae} if vae not in DEFAULT_VAE_NAMES else {}),  # "Automatic": the server's --vae
        pad_conds=_setting(body, defaults, "pad_cond_uncond"),
        clip_skip=_setting(body, defaults, "CLIP_stop_at_last_layers"),  # None: the export's default
        prompt_comments=_setting(body, defaults, "enable_prompt_comments"),
        step_rule="a1111", img2img_fix_steps=_setting(body, defaults, "img2img_fix_steps"),
        controlnet=request_units(body), max_controlnet_units=limits.max_controlnet_units,
        **sampler_parameters(body, defaults, sampler),
    )  # fmt: skip


def build_plan(
    pipe: PlanModel,
    body: GenerationFields,
    limits: Limits,
    defaults: Defaults | None = None,
    model: str | None = None,
    styles: list[Style] | None = None,
) -> Plan:
    """Check a txt2img or img2img request completely; raises InvalidRequestError naming the field.
    `defaults`: the server's settings (POST /options); `model`: the checkpoint's title, for the
    worker; `styles`: the request's `styles`, found (runtime.text.styles), applied to its prompts."""
    defaults = defaults or Defaults()
    _check_defaults_only(body)
    rng, ensd = _check_overrides(body, pipe.manifest, defaults)
    # "" is A1111's Automatic too (its API: `if not populate.scheduler`).
    sampler, scheduler = find_sampler(body.sampler_name or body.sampler_index, body.scheduler or "Automatic")
    _check_hires_scheduler(body, scheduler)
    _check_limits(body, limits)
    schedule = library_schedule(sampler, scheduler)
    total = body.batch_size * body.n_iter
    seed = resolve_seed(body.seed, total)
    if seed + total - 1 + ensd > MAX_GENERATOR_SEED:  # prepare() checks the first batch's seeds only
        most = MAX_GENERATOR_SEED - (seed + total - 1)
        raise InvalidRequestError(_FIELD_NAMES["eta_noise_seed_delta"], f"seed + ENSD must stay below 2**64, "
                                  f"so at most {most}")  # fmt: skip
    with _api_field_names(body):
        first = _prepare_batch(pipe, body, defaults, sampler, schedule, rng, ensd, seed, styles or [], limits)
        _check_prompt_length(first, limits)
        _check_sizes(first, limits)
    batches = tuple(first.with_first_seed(seed + index * body.batch_size) for index in range(body.n_iter))
    return Plan(batches, sampler, scheduler, seed, list(range(seed, seed + total)), body.send_images, model)
