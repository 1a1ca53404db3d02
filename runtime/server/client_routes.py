"""The rest of A1111's API that clients call on their way (AIYA, openOutpaint, the Photoshop
plugin): the prompt styles of --styles-file; what this runtime has not (face restorers,
hypernetworks, scripts) answers A1111's empty shapes, so that the client goes on; what would need
a model it does not have (interrogate) is a clear 501."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..graphs.lora import resident_bytes
from .controlnet import SCRIPT as CONTROLNET_SCRIPT
from .responses import error_response
from .routes import Context
from .schemas import PromptStyleItem

router = APIRouter(tags=["sdapi"])


def _total_ram() -> int | None:
    """MemTotal of /proc/meminfo, in bytes; None without /proc."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@router.post("/sdapi/v1/skip")
async def skip(ctx: Context) -> None:
    """A1111's Skip. One job here is one request, so skipping stops the running job at its next
    step, as interrupt does (A1111 would go on with the next batch of an n_iter job)."""
    ctx.backend.interrupt(None)


@router.get("/sdapi/v1/memory")
async def memory(ctx: Context) -> dict[str, Any]:
    """A1111's {ram: {free, used, total}, cuda}: `used` is this process's resident memory, as
    A1111 reports it. GPU memory is onnxruntime's and not reported: `cuda` says so."""
    used, total = resident_bytes(), _total_ram()
    ram: dict[str, Any] = (
        {"free": total - used, "used": used, "total": total} if used is not None and total is not None
        else {"error": "no /proc on this system"}
    )  # fmt: skip
    provider = ctx.models.provider()
    cuda = {"error": "unavailable" if "CUDA" not in provider else "onnxruntime does not report GPU memory"}
    return {"ram": ram, "cuda": cuda}


@router.get("/sdapi/v1/scripts")
async def scripts() -> dict[str, list[str]]:
    """A1111's lower-case script titles: the one always-on script, ControlNet (no selectable scripts:
    script_name is refused)."""
    return {"txt2img": [CONTROLNET_SCRIPT], "img2img": [CONTROLNET_SCRIPT]}


@router.get("/sdapi/v1/script-info")
async def script_info() -> list[dict[str, Any]]:
    """ControlNet's entries; its `args` are the units of alwayson_scripts.controlnet.args, described
    by the extension's API rather than as UI components."""
    return [{"name": CONTROLNET_SCRIPT, "is_alwayson": True, "is_img2img": img2img, "args": []}
            for img2img in (False, True)]  # fmt: skip


@router.get("/sdapi/v1/prompt-styles", response_model=list[PromptStyleItem])
async def prompt_styles(ctx: Context) -> Any:
    """The styles of --styles-file (none without one), as A1111 lists them; `styles` names them."""
    return [PromptStyleItem(**style.__dict__) for style in ctx.styles.styles().values()]


@router.get("/sdapi/v1/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    return []


@router.get("/sdapi/v1/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    return []


@router.get("/sdapi/v1/cmd-flags")
async def cmd_flags(ctx: Context) -> dict[str, Any]:
    """A1111's command-line flags that mean something here; folders say whether they are set,
    never where they are (paths tell a caller about the box)."""
    config = ctx.config
    return {
        "api": True, "nowebui": True, "port": config.port, "listen": config.host not in ("127.0.0.1", "localhost"),
        "api_auth": "***" if config.credentials else None,  # never the password
        "lora_dir": bool(config.lora_dir), "embeddings_dir": bool(config.embeddings_dir),
        "ckpt_dir": bool(config.model_dir), "lowvram": False, "medvram": False,
    }  # fmt: skip


@router.post("/sdapi/v1/interrogate")
async def interrogate(_request: Request) -> Any:
    """CLIP / DeepBooru interrogation needs models this runtime does not ship."""
    return error_response(
        501, "NotImplemented", "interrogate (CLIP/DeepBooru captions) is not supported by this server"
    )
