"""The ControlNet extension's endpoints (Mikubill/sd-webui-controlnet v1.1.455, scripts/api.py):
/controlnet/version, model_list, module_list, settings and detect. Requests' units are read in
runtime.server.controlnet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..control.modules import module_list
from ..control.request import decoded_image
from ..control.units import detect, plan_unit
from ..errors import InvalidRequestError
from ..graphs.controlnets import controlnet_models
from .images import decode_base64, map_base64
from .routes import Context

API_VERSION = 3  # external_code.get_api_version()

router = APIRouter(tags=["controlnet"])


class DetectRequest(BaseModel):
    """POST /controlnet/detect, with the extension's field names and defaults."""

    model_config = ConfigDict(strict=True, extra="ignore")

    controlnet_module: str = Field("none", description="A module of GET /controlnet/module_list")
    controlnet_input_images: list[str] = Field(default_factory=list, description="Base64 images (or data URLs)")
    controlnet_images: list[str] = Field(
        default_factory=list, description="webuiapi's name for controlnet_input_images (read when that is empty)"
    )
    controlnet_processor_res: float = Field(-1, allow_inf_nan=False, description="-1: the module's default")
    controlnet_threshold_a: float = Field(-1, allow_inf_nan=False)
    controlnet_threshold_b: float = Field(-1, allow_inf_nan=False)
    controlnet_masks: list[str] = Field(default_factory=list, description="Ignored: no module here takes a mask")
    low_vram: bool = False


class DetectResponse(BaseModel):
    info: str
    images: list[str]


@router.get("/controlnet/version")
async def version() -> dict[str, int]:
    return {"version": API_VERSION}


@router.get("/controlnet/model_list")
async def model_list(ctx: Context, update: bool = True) -> dict[str, list[str]]:
    """The current checkpoint's exported ControlNets as the extension lists models, "name [hash]"
    sorted by name (`update` is accepted: the export's list is read each time)."""
    manifest = ctx.models.checkpoint().manifest
    return {"model_list": [model.title for _, model in sorted(controlnet_models(manifest).items())]}


@router.get("/controlnet/module_list")
async def modules(alias_names: bool = False) -> dict[str, Any]:
    return module_list(alias_names)


@router.get("/controlnet/settings")
async def settings(ctx: Context) -> dict[str, int]:
    """The unit count (--max-controlnet-units); also under the extension's older name, which
    openOutpaint reads."""
    count = ctx.config.limits.max_controlnet_units
    return {"control_net_unit_count": count, "control_net_max_models_num": count}


@router.post("/controlnet/detect", response_model=DetectResponse)
async def detect_maps(body: DetectRequest, ctx: Context) -> Any:
    """The module's detected map of each image, at the processor resolution, as base64 PNGs."""
    limits = ctx.config.limits
    field, images = "controlnet_input_images", body.controlnet_input_images
    if not images:
        field, images = "controlnet_images", body.controlnet_images
    if not images:
        raise InvalidRequestError("controlnet_input_images", "No image selected")
    if len(images) > limits.max_images:
        raise InvalidRequestError(field, f"{len(images)} images is over this server's limit of {limits.max_images}")
    with _detect_fields():
        plan = plan_unit(
            body.controlnet_module, processor_res=int(body.controlnet_processor_res),
            threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b,
        )  # fmt: skip

    def run() -> list[str]:
        pixels = []
        for index, text in enumerate(images):
            name = f"{field}.{index}"
            image = decoded_image(decode_base64(name, text), name)
            if image.shape[0] * image.shape[1] > limits.max_pixels:
                raise InvalidRequestError(name, f"{image.shape[1]}x{image.shape[0]} is over this server's limit of "
                                          f"{limits.max_pixels} pixels per image")  # fmt: skip
            pixels.append((name, image))
        return [map_base64(detect(plan, image, prefix=f"{name}.").image) for name, image in pixels]

    return DetectResponse(info="Success", images=await anyio.to_thread.run_sync(run))


@contextmanager
def _detect_fields() -> Iterator[None]:
    """The unit's field names as /controlnet/detect's body names them."""
    try:
        yield
    except InvalidRequestError as error:
        raise InvalidRequestError(f"controlnet_{error.field}", error.message) from None
