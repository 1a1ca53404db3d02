"""The endpoints: A1111's /sdapi/v1 subset for txt2img, /internal/progress, plus /health.

The same routes serve one box (`runtime.server`: a Worker thread runs the jobs) and a cluster
(`runtime.cluster`: Ray Serve replicas run them): a `Backend` runs validated jobs and keeps the
task board; everything a request means is decided here and in `mapping`, once, for both.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import json
import logging
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from .. import __version__
from ..errors import InvalidRequestError
from ..graphs.model_folder import Manifest
from ..graphs.upscalers import UpscalerModel, UpscalerSessions, upscaler_models
from ..graphs.vaes import vae_choices, vae_label
from ..images.extras import ExtrasOptions, run_extras
from ..images.extras import check_options as check_extras
from ..images.extras import infotext as extras_infotext
from ..images.inputs import load_image
from ..images.metadata import parse_infotext, read_infotext
from ..registry import A1111_UPSCALER_FILES, SAMPLERS, SCHEDULERS, UPSCALERS
from ..text.styles import StyleLibrary
from .config import ServerConfig
from .images import decode_base64
from .jobs import JobResult
from .mapping import Plan, build_plan, check_checkpoint_fields
from .models import Checkpoint, ModelSet
from .schemas import (
    EmbeddingsResponse,
    ErrorResponse,
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasFields,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    GenerationFields,
    HealthResponse,
    Img2ImgRequest,
    InternalProgressRequest,
    InternalProgressResponse,
    LatentUpscaleModeItem,
    LoraItem,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    RealesrganItem,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    Txt2ImgResponse,
    UpscalerItem,
)
from .settings import DERIVED, OptionError, Settings
from .tasks import TaskBoard, new_task_id

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25  # how soon a client that left is noticed while its job waits
CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, it only shows in the access log

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed JSON"),
        (401, "Missing or wrong HTTP Basic credentials (with --api-auth)"),
        (413, "Body over the size limit"),
        (422, "Invalid field; `field` names it"),
        (429, "Queue full; see Retry-After"),
        (503, "No worker or replica can run it now, or the GPU ran out of memory; see Retry-After"),
    )
}


class Backend(Protocol):
    """What runs the jobs: the one-box Worker, or the cluster's Serve replicas."""

    board: TaskBoard

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def generate(self, task_id: str, plan: Plan) -> JobResult:
        """Run one job; raises QueueFull (429), Unavailable or JobFailure. Cancelling the call (the
        client left) drops or stops the job."""
        ...

    def interrupt(self, task_id: str | None) -> int: ...

    async def call(self, action: Callable[[], Any]) -> Any:
        """Run `action` between jobs (loading a checkpoint); its exception raises here."""
        ...

    def health(self) -> dict[str, Any]:
        """{"ok", "provider", "queue"} and, for a cluster, "replicas"."""
        ...


@dataclass(frozen=True)
class ServerContext:
    models: ModelSet  # the checkpoints, the current one, their planners (and, one box, pipelines)
    config: ServerConfig
    backend: Backend
    settings: Settings  # A1111's settings (POST /sdapi/v1/options), in memory
    styles: StyleLibrary  # --styles-file: the prompt styles requests may name


def context(request: Request) -> ServerContext:
    return request.app.state.context


Context = Annotated[ServerContext, Depends(context)]
router = APIRouter()


@router.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse, responses=_ERRORS, tags=["sdapi"])
async def txt2img(body: Txt2ImgRequest, request: Request, ctx: Context) -> Any:
    return await _generate(body, request, ctx)


@router.post("/sdapi/v1/img2img", response_model=Txt2ImgResponse, responses=_ERRORS, tags=["sdapi"])
async def img2img(body: Img2ImgRequest, request: Request, ctx: Context) -> Any:
    """A1111's img2img: an init image, and with `mask` inpainting."""
    return await _generate(body, request, ctx)


async def _generate(body: GenerationFields, request: Request, ctx: Context) -> Any:
    checkpoint = ctx.models.checkpoint(body.override_settings.sd_model_checkpoint)
    check_checkpoint_fields(body, checkpoint.title, ctx.models.find)
    defaults, styles = ctx.settings.defaults, ctx.styles.find(body.styles)
    # Parsing prompts and decoding init images cost ms: keep them off the event loop that serves /progress.
    plan = await anyio.to_thread.run_sync(
        build_plan, ctx.models.planner(checkpoint), body, ctx.config.limits, defaults, checkpoint.title, styles
    )
    result = await _unless_disconnected(ctx.backend.generate(body.force_task_id or new_task_id(), plan), request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if not body.override_settings_restore_afterwards:
        await _set_options(body.override_settings.model_dump(exclude_none=True), ctx)
    info = _info(checkpoint, body, plan, result)
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)  # A1111 does not echo the images back
    return Txt2ImgResponse(images=result.images, parameters=parameters, info=json.dumps(info))


async def _unless_disconnected(work: Coroutine[Any, Any, JobResult], request: Request) -> JobResult | None:
    """The job's result, or None if the client disconnected (the job is then cancelled: dropped or stopped)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()  # QueueFull, JobFailure... raise here and become their answers
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    finally:
        task.cancel()  # our own cancellation (shutdown): no-op when the task is done


def _info(checkpoint: Checkpoint, body: GenerationFields, plan: Plan, result: JobResult) -> dict[str, Any]:
    """A1111's Processed.js() fields, plus `scheduler`, `interrupted` and, from a cluster, the
    `replica` and `node` that made the images (never in the PNG text: the same seed gives the same
    PNG wherever it ran)."""
    manifest, count, request = checkpoint.manifest, len(plan.all_seeds), plan.batches[0].request
    return {
        "prompt": body.prompt,
        "all_prompts": [request.prompt] * count,  # as generated: styles applied, comments stripped (A1111's)
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": plan.seed,
        "all_seeds": plan.all_seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": body.width,
        "height": body.height,
        "sampler_name": plan.sampler.name,
        "scheduler": plan.scheduler.label,
        "cfg_scale": body.cfg_scale,
        "steps": body.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": manifest.model_name,
        "sd_model_hash": manifest.model_hash,
        "sd_vae_name": vae_label(manifest, plan.batches[0].vae)[0],
        "sd_vae_hash": vae_label(manifest, plan.batches[0].vae)[1],
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": plan.denoising_strength,
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": body.styles,
        "job_timestamp": result.job_timestamp,
        "clip_skip": plan.batches[0].request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "extra_generation_params": plan.extra_generation_params,
        "version": f"acertain-onnx {__version__}",
        "interrupted": result.interrupted,
        **result.where,
    }


@router.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["sdapi"])
async def progress(ctx: Context, skip_current_image: bool = False) -> Any:
    """The running job that started first (with many running, textinfo counts the others); one
    task's progress is POST /internal/progress with its id."""
    return ctx.backend.board.global_progress(with_preview=not skip_current_image)


@router.post("/internal/progress", response_model=InternalProgressResponse, tags=["sdapi"])
async def internal_progress(body: InternalProgressRequest, ctx: Context) -> Any:
    """A1111's per-task progress: queued (with its place), active, or completed (the last 16)."""
    return ctx.backend.board.task_progress(body.id_task, body.live_preview, body.id_live_preview)


@router.post("/sdapi/v1/interrupt", tags=["sdapi"])
async def interrupt(ctx: Context, id_task: str | None = None) -> dict:
    """Without `id_task` (A1111's form): every running job. With it: only that task."""
    ctx.backend.interrupt(id_task)
    return {}


@router.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["sdapi"])
async def sd_models(ctx: Context) -> Any:
    """Every checkpoint, as A1111 lists them; `filename` is relative to --model-dir."""
    return [checkpoint.listing() for checkpoint in ctx.models.checkpoints()]


@router.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
async def refresh_checkpoints(ctx: Context) -> None:
    """List --model-dir again (A1111 answers null)."""
    await anyio.to_thread.run_sync(ctx.models.refresh)


@router.post("/sdapi/v1/unload-checkpoint", tags=["sdapi"])
async def unload_checkpoint(ctx: Context) -> dict:
    """Free every loaded checkpoint's memory once the jobs before this call ran; the next job (or
    /reload-checkpoint) loads the current one again, as in A1111."""
    await ctx.backend.call(ctx.models.unload)
    return {}


@router.post("/sdapi/v1/reload-checkpoint", tags=["sdapi"])
async def reload_checkpoint(ctx: Context) -> dict:
    """Load the current checkpoint again if it was unloaded (A1111's; the body is ignored)."""
    await ctx.backend.call(ctx.models.reload)
    return {}


@router.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem], tags=["sdapi"])
async def sd_vae(ctx: Context) -> Any:
    """The exported VAEs override_settings.sd_vae can name (A1111's shape; "Automatic" is implied).
    `filename` is the decoder graph relative to the model folder, never an absolute path."""
    manifest = ctx.models.checkpoint().manifest
    choices = vae_choices(manifest)
    own = vae_label(manifest, None)[0]
    return [
        SDVaeItem(model_name=name if name is not None else own, filename=choice.filename)
        for name, choice in choices.items()
        if name is not None or own is not None  # a checkpoint's own VAE has no name of its own: "Automatic"
    ]


@router.get("/sdapi/v1/loras", response_model=list[LoraItem], tags=["sdapi"])
async def loras(ctx: Context) -> Any:
    """The LoRAs in --lora-dir, by the names <lora:name:weight> takes (A1111's shape)."""
    return ctx.models.planner().loras.library.entries()


@router.post("/sdapi/v1/refresh-loras", tags=["sdapi"])
async def refresh_loras(ctx: Context) -> dict:
    """Rescan --lora-dir for the listing. A cluster's replicas need no refresh: a LoRA library
    lists its folder again when a request names a LoRA it does not know (as A1111 does)."""
    await anyio.to_thread.run_sync(ctx.models.planner().loras.library.refresh)
    return {}


@router.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse, tags=["sdapi"])
async def embeddings(ctx: Context) -> Any:
    """A1111's {loaded: {name: info}, skipped: {name: info}}; skipped entries add a `reason`."""
    return ctx.models.planner().embeddings.listing()


@router.post("/sdapi/v1/refresh-embeddings", tags=["sdapi"])
async def refresh_embeddings(ctx: Context) -> dict:
    """Rescan --embeddings-dir. Prompts are matched where requests are checked (a cluster's
    ingress), and the vectors travel with the job: a cluster's replicas never read the folder."""
    await anyio.to_thread.run_sync(ctx.models.planner().embeddings.refresh)
    return {}


@router.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["sdapi"])
async def samplers() -> Any:
    return [SamplerItem(name=s.name, aliases=list(s.aliases), options=s.options) for s in SAMPLERS]


@router.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], tags=["sdapi"])
async def schedulers() -> Any:
    return [
        SchedulerItem(
            name=s.name,
            label=s.label,
            aliases=list(s.aliases) or None,
            default_rho=s.default_rho,
            need_inner_model=s.need_inner_model,
        )
        for s in SCHEDULERS
    ]


@router.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
async def upscalers(ctx: Context) -> Any:
    """The image upscalers (hr_upscaler, upscaler_1/2): the filters, then the export's model upscalers
    (`model_path`: the graph relative to the model folder). A1111 lists the latent modes separately."""
    builtin = [UpscalerItem(name=u.name, scale=4 if u.name != "None" else None) for u in UPSCALERS if not u.latent]
    manifest = ctx.models.checkpoint().manifest
    return builtin + [
        UpscalerItem(name=m.name, model_name=Path(m.file).stem, model_path=_relative(manifest, m), scale=m.scale)
        for m in upscaler_models(manifest).values()
    ]


@router.get("/sdapi/v1/realesrgan-models", response_model=list[RealesrganItem], tags=["sdapi"])
async def realesrgan_models(ctx: Context) -> Any:
    """The exported upscalers made from A1111's Real-ESRGAN files (RealESRGAN_x4plus_anime_6B.pth...)."""
    manifest = ctx.models.checkpoint().manifest
    return [RealesrganItem(name=m.name, path=_relative(manifest, m), scale=m.scale)
            for m in upscaler_models(manifest).values() if Path(m.file).stem in A1111_UPSCALER_FILES]  # fmt: skip


def _relative(manifest: Manifest, model: UpscalerModel) -> str:
    return model.graph.path.relative_to(manifest.folder).as_posix()


@router.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse, responses=_ERRORS,
             tags=["sdapi"])  # fmt: skip
async def extra_single_image(body: ExtrasSingleImageRequest, ctx: Context) -> Any:
    """A1111's Extras upscaling of one image (face restoration is not supported)."""
    sessions = await _upscaler_sessions(ctx)
    images, info = await anyio.to_thread.run_sync(_run_extras, ctx, body, [("image", body.image)], sessions)
    return ExtrasSingleImageResponse(html_info=info, image=images[0])


@router.post("/sdapi/v1/extra-batch-images", response_model=ExtrasBatchImagesResponse, responses=_ERRORS,
             tags=["sdapi"])  # fmt: skip
async def extra_batch_images(body: ExtrasBatchImagesRequest, ctx: Context) -> Any:
    """A1111's Extras upscaling of several images, each the same way."""
    if len(body.imageList) > ctx.config.limits.max_images:
        raise InvalidRequestError("imageList", f"{len(body.imageList)} images is over this server's limit of "
                                  f"{ctx.config.limits.max_images}")  # fmt: skip
    named = [(f"imageList.{index}.data", item.data) for index, item in enumerate(body.imageList)]
    sessions = await _upscaler_sessions(ctx)
    images, info = await anyio.to_thread.run_sync(_run_extras, ctx, body, named, sessions)
    return ExtrasBatchImagesResponse(html_info=info, images=images)


async def _upscaler_sessions(ctx: ServerContext) -> UpscalerSessions:
    """The current checkpoint's upscalers, its pipeline loaded on the worker thread if it is not (after
    the jobs queued before, as A1111 runs Extras under its queue lock). A cluster's ingress loads no
    pipeline: Extras run on a one-box server."""
    if ctx.models.pool is None:
        raise InvalidRequestError("upscaler_1", "Extras run on a one-box server; this cluster's ingress holds no "
                                  "upscaler sessions")  # fmt: skip
    pipe = await ctx.backend.call(lambda: ctx.models.pipeline(None))
    return pipe.upscaler_sessions


def _run_extras(
    ctx: ServerContext, body: ExtrasFields, images: list[tuple[str, str]], sessions: UpscalerSessions
) -> tuple[list[str], str]:
    """Every image checked (base64, pixel limit), then each upscaled; A1111's html_info of the last."""
    options = ExtrasOptions(
        body.resize_mode, body.upscaling_resize, body.upscaling_resize_w, body.upscaling_resize_h,
        body.upscaling_crop, body.upscaler_1, body.upscaler_2, body.extras_upscaler_2_visibility,
    )  # fmt: skip
    check_extras(options, sessions)
    limit = ctx.config.limits.max_pixels
    loaded = []
    for field, text in images:
        image = load_image(decode_base64(field, text), field)
        if image.width * image.height > limit:
            raise InvalidRequestError(field, f"{image.width}x{image.height} is over this server's limit of "
                                      f"{limit} pixels per image")  # fmt: skip
        loaded.append((field, image))
    answers, info = [], {}
    for field, image in loaded:
        with _extras_field(field):
            result, info = run_extras(image, options, sessions, limit)
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        answers.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return answers, plaintext_to_html(extras_infotext(info))


@contextmanager
def _extras_field(field: str) -> Iterator[None]:
    """A size error about one image of a batch names that image."""
    try:
        yield
    except InvalidRequestError as error:
        if error.field in ("upscaler_1", "upscaler_2", "upscaling_resize_w"):
            raise InvalidRequestError(error.field, f"{field}: {error.message}") from None
        raise


def plaintext_to_html(text: str) -> str:
    """A1111's ui_common.plaintext_to_html: escaped lines joined by <br>, in a paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


@router.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscaleModeItem], tags=["sdapi"])
async def latent_upscale_modes() -> Any:
    return [LatentUpscaleModeItem(name=u.name) for u in UPSCALERS if u.latent]


@router.post("/sdapi/v1/png-info", response_model=PngInfoResponse, responses=_ERRORS, tags=["sdapi"])
async def png_info(body: PngInfoRequest) -> Any:
    """An image's "parameters" text, parsed as A1111's parse_generation_parameters."""
    data = decode_base64("image", body.image)
    try:
        text = read_infotext(data) or ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidRequestError("image", "is not a readable image") from None
    items = {"parameters": text} if text else {}
    return PngInfoResponse(info=text, items=items, parameters=parse_infotext(text) if text else {})


@router.get("/sdapi/v1/options", response_model=dict[str, Any], tags=["sdapi"])
async def options(ctx: Context) -> Any:
    """A1111's settings: those this runtime acts on, the current checkpoint's, and A1111's others
    (kept and echoed, unused). See runtime.server.settings."""
    checkpoint = ctx.models.checkpoint()
    return {**ctx.settings.shown(checkpoint.manifest), **_derived(checkpoint)}


@router.post("/sdapi/v1/options", responses=_ERRORS, tags=["sdapi"])
async def set_options(ctx: Context, body: dict[str, Any] | None = None) -> None:
    """A1111's POST /options: any part of the GET dict, unchanged values no-ops. A new
    sd_model_checkpoint answers once that checkpoint is loaded (after the jobs queued before)."""
    await _set_options(body or {}, ctx)


def _derived(checkpoint: Checkpoint) -> dict[str, Any]:
    """The settings that follow the checkpoint (DERIVED)."""
    values = (checkpoint.title, checkpoint.sha256)
    return dict(zip(DERIVED, values, strict=True))


async def _set_options(changes: dict[str, Any], ctx: ServerContext) -> None:
    name = changes.get("sd_model_checkpoint")
    target = ctx.models.checkpoint() if name is None else ctx.models.find(name) if isinstance(name, str) else None
    if target is None:
        raise OptionError("sd_model_checkpoint", f"model {name!r} not found")
    current = ctx.models.checkpoint()
    shown = {**ctx.settings.shown(current.manifest), **_derived(current)}
    accepted = ctx.settings.check(changes, shown, target.manifest)
    if target.title != ctx.models.current:
        await ctx.backend.call(lambda: ctx.models.switch(target.title))
        log.info("current checkpoint: %s", target.title)
    ctx.settings.apply(accepted)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["server"])
async def health(ctx: Context) -> Any:
    state = await anyio.to_thread.run_sync(ctx.backend.health)  # a cluster asks Serve's controller
    body = HealthResponse(
        status="ok" if state["ok"] else "unavailable", model=ctx.models.current,
        provider=state["provider"], queue=state["queue"], jobs=ctx.backend.board.job_counts(),
        replicas=state.get("replicas"),
    )  # fmt: skip
    return body if state["ok"] else JSONResponse(body.model_dump(), status_code=503)
