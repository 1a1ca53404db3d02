"""The server's settings: where it listens, who may call it, and the limits that protect the box.

Every limit is checked before a request is queued, so a request that could exhaust GPU memory or
hold the GPU for too long is refused with a 4xx instead of being run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..limits import LORA_CACHE_MB, MAX_CONTROLNET_UNITS, MAX_PIXELS

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the GPU to a network is an explicit choice
DEFAULT_PORT = 7861  # A1111's API-only port (`--nowebui`), so clients find us where they expect
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Defaults suit one GPU with 8-24 GB running an SD 1.x model."""

    max_pixels: int = MAX_PIXELS  # width * height of one image: 1024x1024, or 512x2048 (as the library's)
    max_steps: int = 150  # A1111's UI slider stops at 150 too
    max_batch: int = 8  # batch_size: images in one UNet call, the memory that grows with it
    max_images: int = 16  # batch_size * n_iter: bounds the run time and the response size
    max_prompt_chunks: int = 32  # 75-token chunks per prompt (2400 tokens), after A1111 parsing
    max_prompt_chars: int = 32_000  # checked first, so parsing a prompt stays cheap
    max_body_bytes: int = MiB  # a txt2img body is a few kB; anything near this is abuse
    max_cfg_scale: float = 30.0  # A1111's UI slider stops at 30; far above it the image turns to noise or black
    max_controlnet_units: int = MAX_CONTROLNET_UNITS  # enabled ControlNet units per request (the extension's 3)


@dataclass(frozen=True)
class Traffic:
    """What protects the server from its connections, separate from what protects the GPU (Limits).

    Generations are bounded by the job queue only; these bound sockets and requests that are slow
    or many, so that neither can lock out other clients or /health and /progress.
    """

    header_timeout: float = 10.0  # seconds from connecting (or from the last answer) to a complete request head
    body_timeout: float = 30.0  # seconds to send the whole body once the head arrived
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open between requests (uvicorn's default)
    max_active_requests: int = 64  # requests in progress at once, past the exempt ones; more get 503
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted besides this machine's; "*" accepts any


@dataclass(frozen=True)
class ServerConfig:
    model: str  # --model; "" with --model-dir
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    provider: str = "auto"
    device: str = "CPU"  # provider openvino only
    inference_precision: str = "auto"
    threads: int | None = None
    queue_size: int = 8  # jobs waiting behind the running one; more get 429
    credentials: dict[str, str] = field(default_factory=dict)  # user -> password; empty: no auth
    limits: Limits = field(default_factory=Limits)
    traffic: Traffic = field(default_factory=Traffic)
    lora_dir: str | None = None  # kohya/A1111 LoRA files, used by <lora:name:m> in prompts
    lora_cache_mb: int = LORA_CACHE_MB  # LoRA-patched sessions kept (runtime.graphs.lora.LoraSessions)
    embeddings_dir: str | None = None  # textual-inversion embeddings, used by name in prompts
    vae: str | None = None  # the exported VAE requests use by default (runtime.graphs.vaes)
    model_dir: str | None = None  # --model-dir: every export folder in it (runtime.server.models)
    models_cache_mb: int = 0  # loaded checkpoints kept besides the current one (A1111 keeps one)
    styles_file: str | None = None  # A1111's styles.csv: the styles requests may name (runtime.text.styles)


def parse_credentials(value: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` as A1111's --api-auth takes it. The password may hold ':'."""
    if not value:
        return {}
    credentials = {}
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth wants user:password pairs separated by commas, not {item.strip()!r}")
        credentials[user] = password
    return credentials
