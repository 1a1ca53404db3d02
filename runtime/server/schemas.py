"""Request and response bodies, with AUTOMATIC1111's field names, defaults and shapes.

A1111 builds its txt2img model from `StableDiffusionProcessingTxt2Img`'s constructor: every field
is optional and an omitted one takes the processing default (steps 50, cfg_scale 7, 512x512,
sampler "Euler"). The same defaults are used here. Differences, all on purpose:

- Types are strict: `"steps": "28"`, `28.0` or `true` is a 422 naming the field, not a guess.
  A JSON null counts as "omitted" (some clients send null for every field they do not set).
- Fields that would change the image in ways this runtime cannot reproduce (hires fix, face
  restoration, scripts, variation seeds...) are declared so that a non-default value is refused
  with a 422 instead of being silently ignored. Other unknown fields are ignored, as A1111 does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import Limits
from .validation import check_json_value

_LIMITS = Limits()


def _drop_nulls(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


class OverrideSettings(BaseModel):
    """A1111 settings a request may override. Other keys are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    CLIP_stop_at_last_layers: int | None = Field(
        None, ge=1, description="Clip skip: one the model was exported with (`python -m export --clip-skip 2,1`)."
    )
    randn_source: Literal["GPU", "CPU", "NV"] | None = Field(
        None, description='Noise source. "GPU" (default) and "NV" give the same noise: torch CUDA randn.'
    )
    eta_noise_seed_delta: int | None = Field(None, ge=0, description="ENSD; only ancestral samplers use it.")
    sd_model_checkpoint: str | None = Field(
        None, description="A checkpoint of GET /sdapi/v1/sd-models (title, name or hash) for this request only"
    )
    sd_vae: str | None = Field(
        None, description='An exported VAE by name (GET /sdapi/v1/sd-vae); "Automatic"/"None": the model\'s own.'
    )
    pad_cond_uncond: bool | None = Field(
        None, description="Pad prompt/negative prompt of different chunk counts to one UNet call (A1111: off)."
    )
    img2img_fix_steps: bool | None = Field(
        None, description="img2img runs exactly `steps` steps over a longer schedule (A1111: off)."
    )
    enable_prompt_comments: bool | None = Field(None, description="'#' hides the rest of its line (A1111: on).")
    eta_ancestral: float | None = Field(None, ge=0, allow_inf_nan=False, description="k-diffusion samplers' eta (1)")
    eta_ddim: float | None = Field(None, ge=0, allow_inf_nan=False, description="Eta of DDIM and DDIM CFG++ (0)")
    s_churn: float | None = Field(None, ge=0, allow_inf_nan=False, description="Non-zero: wins over the request's")
    s_tmin: float | None = Field(None, ge=0, allow_inf_nan=False, description="Non-zero: wins over the request's")
    s_tmax: float | None = Field(None, ge=0, allow_inf_nan=False, description="Non-zero: wins over the request's")
    s_noise: float | None = Field(None, ge=0, allow_inf_nan=False, description="Not 1: wins over the request's")

    @model_validator(mode="before")
    @classmethod
    def omit_nulls(cls, data: Any) -> Any:
        return _drop_nulls(data)


class GenerationFields(BaseModel):
    """The fields txt2img and img2img share. Field names and defaults follow A1111's API."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str = Field("", max_length=_LIMITS.max_prompt_chars, description="A1111 syntax: (word:1.2), [word], BREAK")
    negative_prompt: str = Field("", max_length=_LIMITS.max_prompt_chars)
    seed: int = Field(-1, description="-1 picks a random seed; image i of the request uses seed + i")
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, allow_inf_nan=False)
    width: int = Field(512, ge=64, multiple_of=8)
    height: int = Field(512, ge=64, multiple_of=8)
    batch_size: int = Field(1, ge=1, description="Images per UNet call")
    n_iter: int = Field(1, ge=1, description="Batches run one after another; seeds continue")
    sampler_name: str | None = Field(None, description='"Euler a", "Euler", "DPM++ 2M", "DDIM" or an alias')
    sampler_index: str = Field("Euler", description="A1111's legacy name for sampler_name")
    scheduler: str = Field("Automatic", description='"Automatic", "Uniform", "Karras" or "Diffusers"')
    override_settings: OverrideSettings = Field(default_factory=OverrideSettings)
    override_settings_restore_afterwards: bool = Field(
        True, description="false: override_settings become the server's settings after this request, as in A1111"
    )
    send_images: bool = True
    force_task_id: str | None = Field(
        None, max_length=200, description="A1111's task id for POST /internal/progress (default: a new one)"
    )
    save_images: bool = Field(False, description="Accepted and ignored: this server never writes files")
    eta: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Samplers that take eta (default: eta_ancestral 1, eta_ddim 0)"
    )
    s_churn: float | None = Field(None, ge=0, allow_inf_nan=False, description="Euler, Heun, DPM2 (default 0)")
    s_tmin: float | None = Field(None, ge=0, allow_inf_nan=False, description="Euler, Heun, DPM2 (default 0)")
    s_tmax: float | None = Field(None, ge=0, allow_inf_nan=False, description="Euler, Heun, DPM2 (default 0: no bound)")
    s_noise: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Euler, Heun, DPM2, DPM fast, the ancestral and SDE samplers (1)"
    )
    styles: list[str] = Field(
        default_factory=list, description="Prompt styles of GET /sdapi/v1/prompt-styles, applied in order as A1111"
    )
    # Accepted only at their defaults (see the module docstring).
    subseed: int = -1
    subseed_strength: float = Field(0.0, allow_inf_nan=False)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    restore_faces: bool = False
    tiling: bool = False
    disable_extra_networks: bool = False
    script_name: str | None = Field(None, description='A1111\'s selectable script: none here, so only null or ""')
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="None here, so only {}")
    refiner_checkpoint: str | None = Field(
        None, description='A1111\'s refiner: null, "", "None" or the request\'s own checkpoint (a no-op, as in A1111)'
    )
    refiner_switch_at: float | None = Field(None, allow_inf_nan=False, description="Used only with a refiner")

    @model_validator(mode="before")
    @classmethod
    def omit_nulls(cls, data: Any) -> Any:
        check_json_value(data)  # echoed in the answer: refuse what could not be sent back (422)
        return _drop_nulls(data)


class Txt2ImgRequest(GenerationFields):
    """POST /sdapi/v1/txt2img, with A1111's hires-fix fields."""

    enable_hr: bool = False
    hr_scale: float = Field(2.0, allow_inf_nan=False, description="Second pass size factor (unless hr_resize_*)")
    hr_upscaler: str | None = Field(None, description='"Latent" (default), a latent mode, "Lanczos", "Nearest", "None"')
    hr_second_pass_steps: int = Field(0, ge=0, description="0: the first pass's steps")
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    denoising_strength: float | None = Field(None, allow_inf_nan=False, description="Hires denoising; default 0.7")
    hr_prompt: str = Field("", max_length=_LIMITS.max_prompt_chars)
    hr_negative_prompt: str = Field("", max_length=_LIMITS.max_prompt_chars)
    hr_sampler_name: str | None = Field(None, description='null, "" or "Use same sampler": the first pass\'s')
    hr_scheduler: str | None = Field(None, description='null, "", "Use same scheduler" or the first pass\'s only')
    hr_checkpoint_name: str | None = Field(
        None, description='null, "", "Use same checkpoint" or the request\'s own checkpoint only'
    )
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(GenerationFields):
    """POST /sdapi/v1/img2img: A1111's img2img and inpainting fields and their API defaults."""

    init_images: list[str] = Field(description="Base64 images (a data: URL prefix is accepted); the first is used")
    resize_mode: int = Field(0, ge=0, le=2, description="0 just resize, 1 crop and resize, 2 resize and fill")
    denoising_strength: float = Field(0.75, allow_inf_nan=False)
    mask: str | None = Field(None, description="Base64 mask: white is repainted")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="True: only the masked area (A1111's API default)")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False
    image_cfg_scale: float | None = None
    initial_noise_multiplier: float | None = None


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class RealesrganItem(BaseModel):
    """A1111's /sdapi/v1/realesrgan-models entry; `path` is the graph relative to the model folder."""

    name: str
    path: str | None = None
    scale: int | None = None


class ExtrasFields(BaseModel):
    """A1111's ExtrasBaseRequest: the upscaling fields; face restoration only at its defaults."""

    model_config = ConfigDict(strict=True, extra="ignore")

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w/h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0, le=0, description="Face restoration is not supported: 0 only")
    codeformer_visibility: float = Field(0.0, ge=0, le=0, description="Face restoration is not supported: 0 only")
    codeformer_weight: float = Field(0.0, allow_inf_nan=False)
    upscaling_resize: float = Field(2.0, allow_inf_nan=False, description="Scale factor, 1 to 8")
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = Field(True, description="resize_mode 1: centre the result on a canvas of that size")
    upscaler_1: str = Field("None", description="GET /sdapi/v1/upscalers: a model upscaler, Lanczos, Nearest, None")
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False

    @model_validator(mode="before")
    @classmethod
    def omit_nulls(cls, data: Any) -> Any:
        return _drop_nulls(data)


class ExtrasSingleImageRequest(ExtrasFields):
    image: str = Field(description="Base64 image (a data: URL prefix is accepted)")


class ExtrasImageItem(BaseModel):
    model_config = ConfigDict(strict=True)

    data: str = Field(description="Base64 image (a data: URL prefix is accepted)")
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasFields):
    imageList: list[ExtrasImageItem] = Field(description="The images, each upscaled the same way")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="A1111's postprocessing infotext as HTML")
    image: str | None = Field(None, description="Base64 PNG")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class PromptStyleItem(BaseModel):
    """A1111's /sdapi/v1/prompt-styles entry: a row of --styles-file."""

    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class LatentUpscaleModeItem(BaseModel):
    name: str


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    image: str = Field(description="Base64 image (a data: URL prefix is accepted)")


class PngInfoResponse(BaseModel):
    info: str = Field(description="The image's parameters text, empty if it has none")
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict, description="The text parsed as A1111 does")


class Txt2ImgResponse(BaseModel):
    images: list[str] | None = Field(None, description="Base64 PNGs carrying the A1111 'parameters' text")
    parameters: dict[str, Any] = Field(description="The request with defaults filled in")
    info: str = Field(description="JSON string: seed, all_seeds, infotexts, ... as A1111's Processed.js()")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 over all batches of the current job")
    eta_relative: float = Field(description="Estimated seconds left")
    state: ProgressState
    current_image: str | None = Field(None, description="Base64 PNG preview (cheap latent approximation)")
    textinfo: str | None = None


class InternalProgressRequest(BaseModel):
    """POST /internal/progress, as A1111's web UI polls it for one task."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id_task: str | None = Field(None, description="force_task_id of a txt2img request")
    id_live_preview: int = Field(-1, description="The id of the preview the client already has")
    live_preview: bool = True


class InternalProgressResponse(BaseModel):
    active: bool = Field(description="The task is running now")
    queued: bool = Field(description="The task waits for a worker")
    completed: bool = Field(description="The task is one of the last 16 that ended")
    progress: float | None = None
    eta: float | None = Field(None, description="Seconds left")
    live_preview: str | None = Field(None, description="data: URI of a PNG preview, when it changed")
    id_live_preview: int | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    """A1111's /sdapi/v1/sd-vae entry; `filename` is relative to the model folder."""

    model_name: str
    filename: str


class LoraItem(BaseModel):
    """A1111's /sdapi/v1/loras entry; `path` is the file name within --lora-dir, never an absolute path."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int | None = None
    vectors: int
    reason: str | None = None  # skipped ones only: why (ours; A1111 does not say)


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class QueueInfo(BaseModel):
    running: int = Field(description="Jobs running now (one box: 0 or 1)")
    waiting: int
    capacity: int


class ReplicaCounts(BaseModel):
    """Cluster only: the generation replicas, as Ray Serve reports them."""

    target: int
    ready: int
    starting: int = Field(description="Placed, loading the model and checking its hashes")
    dead: int = Field(description="Target replicas not running or starting: died, or cannot be placed")


class JobCounts(BaseModel):
    completed: int = 0
    interrupted: int = 0
    rejected: int = 0  # 429: queue full
    dropped: int = 0  # client left while queued, or while running
    failed: int = 0  # 5xx


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    provider: str
    queue: QueueInfo
    jobs: JobCounts
    replicas: ReplicaCounts | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="Kind of error, e.g. InvalidRequest, QueueFull")
    detail: str = Field(description="What went wrong, naming the field")
    field: str | None = Field(description="The offending request field, dotted for nested ones; null if none")
    errors: list[dict[str, Any]] = Field(description="Every validation problem found: {field, message, type}")
