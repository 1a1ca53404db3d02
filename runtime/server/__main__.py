"""`python -m runtime.server --model DIR` (or `--model-dir DIR`): load the model, then serve the API with uvicorn.

Bad arguments or a bad model folder get one line on stderr and exit code 2, before the port opens.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..options import (
    Parser,
    add_addon_options,
    add_session_options,
    load_options,
    non_negative,
    positive,
    positive_number,
)
from ..text.styles import StyleLibrary
from .config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServerConfig, Traffic, parse_credentials
from .models import ModelSet, PipelinePool, pipeline_loader, planner_maker, scan_folder

log = logging.getLogger("runtime.server")
AUTH_ENV = "ACERTAIN_API_AUTH"
DEFAULTS = Limits()
TRAFFIC = Traffic()


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_api_options(parser: argparse.ArgumentParser) -> None:
    """The options of the HTTP API and its add-on folders, shared with `python -m runtime.cluster`."""
    add = parser.add_argument
    add("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    add_addon_options(parser, on_every_node=parser.prog.endswith("cluster"))  # cluster: the LoRA cache per replica
    add(
        "--api-auth",
        default=os.environ.get(AUTH_ENV),
        help=f"user:password[,user2:password2]: HTTP Basic auth on every endpoint (default: ${AUTH_ENV}, "
        "which keeps the password out of the process list)",
    )
    add("--queue-size", type=positive, default=8, help="requests waiting behind the running one (default %(default)s)")
    add("--max-pixels", type=positive, default=DEFAULTS.max_pixels, help="width*height per image (%(default)s)")
    add("--max-steps", type=positive, default=DEFAULTS.max_steps, help="sampling steps (default %(default)s)")
    add("--max-batch", type=positive, default=DEFAULTS.max_batch, help="batch_size: images per UNet call (%(default)s)")
    add("--max-images", type=positive, default=DEFAULTS.max_images, help="batch_size * n_iter (%(default)s)")
    add("--max-body-bytes", type=positive, default=DEFAULTS.max_body_bytes, help="request body (%(default)s)")
    add("--max-cfg-scale", type=positive_number, default=DEFAULTS.max_cfg_scale, help="cfg_scale (%(default)s)")
    add(
        "--max-controlnet-units", type=positive, default=DEFAULTS.max_controlnet_units,
        help="enabled ControlNet units per request (%(default)s, the extension's unit count)",
    )  # fmt: skip
    add(
        "--allowed-hosts", default="", type=_names,
        help="extra Host names this server answers for, comma-separated ('*': any); it always answers for "
        "its --host, localhost and IP addresses (the rest is refused against DNS rebinding)",
    )  # fmt: skip
    add(
        "--max-active-requests", type=positive, default=TRAFFIC.max_active_requests,
        help="requests handled at once besides /health and /progress; more get 503 (%(default)s)",
    )  # fmt: skip
    add("--body-timeout", type=positive_number, default=TRAFFIC.body_timeout, help="seconds (%(default)s)")
    add(
        "--styles-file", help="A1111's styles.csv (name, prompt, negative_prompt): the prompt styles requests may "
        "name in `styles` (GET /sdapi/v1/prompt-styles); read again when it changes",
    )  # fmt: skip
    add("-v", "--verbose", action="store_true", help="debug logging")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m runtime.server", description="A1111-compatible txt2img API, no torch.")
    add = parser.add_argument
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="folder written by `python -m export`")
    which.add_argument(
        "--model-dir", type=Path, help="serve every exported folder in DIR (GET /sdapi/v1/sd-models; switch with "
        "POST /sdapi/v1/options sd_model_checkpoint, or per request with override_settings)",
    )  # fmt: skip
    add(
        "--models-cache-mb", type=non_negative, default=0,
        help="MiB of memory for loaded checkpoints kept besides the current one, charged what loading each took "
        "(default 0: one checkpoint in memory, as A1111's default)",
    )  # fmt: skip
    add_session_options(parser)
    # uvicorn's sockets: only this server has them (a cluster's belong to Serve's proxy).
    add("--header-timeout", type=positive_number, default=TRAFFIC.header_timeout, help="seconds (%(default)s)")
    add_api_options(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> ServerConfig:
    StyleLibrary(args.styles_file)  # a bad styles file stops the command before anything starts
    limits = Limits(
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
        max_images=args.max_images, max_body_bytes=args.max_body_bytes, max_cfg_scale=args.max_cfg_scale,
        max_controlnet_units=args.max_controlnet_units,
    )  # fmt: skip
    traffic = Traffic(
        header_timeout=getattr(args, "header_timeout", TRAFFIC.header_timeout), body_timeout=args.body_timeout,
        max_active_requests=args.max_active_requests, allowed_hosts=args.allowed_hosts,
    )  # fmt: skip
    return ServerConfig(
        model=str(args.model) if getattr(args, "model", None) else "", host=args.host, port=args.port,
        provider=getattr(args, "provider", "auto"),
        threads=getattr(args, "threads", None), device=getattr(args, "device", "CPU"),
        inference_precision=getattr(args, "inference_precision", "auto"), queue_size=args.queue_size,
        credentials=parse_credentials(args.api_auth), limits=limits, traffic=traffic,
        lora_dir=args.lora_dir, lora_cache_mb=args.lora_cache_mb, embeddings_dir=args.embeddings_dir,
        vae=getattr(args, "vae", None), model_dir=str(args.model_dir) if getattr(args, "model_dir", None) else None,
        models_cache_mb=getattr(args, "models_cache_mb", 0), styles_file=args.styles_file,
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_models(config: ServerConfig) -> ModelSet:
    """The checkpoints to serve, the current one (--model, or the first of --model-dir by title)
    loaded before the port opens, as A1111 loads its checkpoint at start."""
    if config.model_dir is None:
        from ..pipeline import Pipeline

        return ModelSet.around(Pipeline.from_pretrained(config.model, **load_options(config)), config)
    folder = Path(config.model_dir)
    pool = PipelinePool(pipeline_loader(config), config.models_cache_mb * 2**20)
    models = ModelSet(scan_folder(folder), planner_maker(config), pool, folder)
    models.reload()
    log.info("serving %d checkpoints from %s", len(models.checkpoints()), folder)
    return models


def serve(config: ServerConfig) -> None:
    import uvicorn

    from .app import create_app
    from .protocol import protocol_with_timeout

    models = load_models(config)
    log.info("loaded %s; running on %s", models.current, models.provider_choice())
    if not _is_loopback(config.host) and not config.credentials:
        log.warning("listening on %s without --api-auth: anyone who reaches this port can use the GPU", config.host)
    # No limit_concurrency: uvicorn counts open connections against it, so idle sockets would lock
    # everyone out with its plain-text 503. The job queue bounds generations (429), the guard bounds
    # requests in progress (JSON 503), and the protocol closes connections that send no request.
    uvicorn.run(
        create_app(None, config, models), host=config.host, port=config.port, log_config=None,
        http=protocol_with_timeout(config.traffic.header_timeout), timeout_keep_alive=config.traffic.keep_alive,
        timeout_graceful_shutdown=10,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(build_config(args))
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"error: {error.name or error}: install the server extra: pip install '.[server]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
