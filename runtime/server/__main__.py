"""`python -m runtime.server --model DIR`: load the model once, then serve the API with uvicorn.

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
from ..sessions import PROVIDERS
from .config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServerConfig, parse_credentials

log = logging.getLogger("runtime.server")
AUTH_ENV = "ACERTAIN_API_AUTH"
DEFAULTS = Limits()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m runtime.server", description="A1111-compatible txt2img API, no torch.")
    add = parser.add_argument
    add("--model", required=True, type=Path, help="folder written by `python -m export`")
    add("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    add("--provider", default="auto", choices=PROVIDERS, help="onnxruntime provider (default auto: CUDA if usable)")
    add("--threads", type=_positive, help="CPU threads for onnxruntime (default: physical cores)")
    add("--lora-dir", type=Path, help="folder of kohya/A1111 .safetensors LoRAs for <lora:name:weight> in prompts")
    add("--embeddings-dir", type=Path, help="folder of textual-inversion .safetensors embeddings, used by name")
    add(
        "--api-auth",
        default=os.environ.get(AUTH_ENV),
        help=f"user:password[,user2:password2]: HTTP Basic auth on every endpoint (default: ${AUTH_ENV}, "
        "which keeps the password out of the process list)",
    )
    add("--queue-size", type=_positive, default=8, help="requests waiting behind the running one (default %(default)s)")
    add("--max-pixels", type=_positive, default=DEFAULTS.max_pixels, help="width*height per image (%(default)s)")
    add("--max-steps", type=_positive, default=DEFAULTS.max_steps, help="sampling steps (default %(default)s)")
    add(
        "--max-batch", type=_positive, default=DEFAULTS.max_batch, help="batch_size: images per UNet call (%(default)s)"
    )
    add("--max-images", type=_positive, default=DEFAULTS.max_images, help="batch_size * n_iter (%(default)s)")
    add("--max-body-bytes", type=_positive, default=DEFAULTS.max_body_bytes, help="request body (%(default)s)")
    add("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> ServerConfig:
    limits = Limits(
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
        max_images=args.max_images, max_body_bytes=args.max_body_bytes,
    )  # fmt: skip
    return ServerConfig(
        model=str(args.model), host=args.host, port=args.port, provider=args.provider, threads=args.threads,
        queue_size=args.queue_size, credentials=parse_credentials(args.api_auth), limits=limits,
        lora_dir=str(args.lora_dir) if args.lora_dir else None,
        embeddings_dir=str(args.embeddings_dir) if args.embeddings_dir else None,
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServerConfig) -> None:
    import uvicorn

    from ..pipeline import Pipeline
    from .app import create_app

    pipe = Pipeline.from_pretrained(
        config.model, provider=config.provider, threads=config.threads, lora_dir=config.lora_dir,
        embeddings_dir=config.embeddings_dir,
    )  # fmt: skip
    log.info("loaded %s on %s", pipe.manifest.model_name, pipe.provider)
    if not _is_loopback(config.host) and not config.credentials:
        log.warning("listening on %s without --api-auth: anyone who reaches this port can use the GPU", config.host)
    uvicorn.run(
        create_app(pipe, config), host=config.host, port=config.port, log_config=None,
        # Connections past this get a 503 from uvicorn: the queue bounds jobs, this bounds sockets.
        limit_concurrency=max(64, 4 * config.queue_size + 16), timeout_graceful_shutdown=10,
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
