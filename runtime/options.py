"""What the three command lines (`python -m runtime`, `runtime.server`, `runtime.cluster`) share:
the parser whose errors follow their rule, the argument types, and one description of each
option that loads a model (sessions, add-on folders), so that all three load it the same way."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .limits import LORA_CACHE_MB

# Pipeline.from_pretrained's keywords that the command lines set: CLI arguments, the server's
# ServerConfig and a cluster replica's settings carry them under these names (load_options).
LOAD_OPTIONS = (
    "provider", "threads", "device", "inference_precision", "lora_dir", "lora_cache_mb", "embeddings_dir", "vae",
)  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse, but its errors follow the CLIs' rule: one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Where the graphs run: --provider, --threads and OpenVINO's --device / --inference-precision
    (the CLI and the server; a cluster replica's come from its Ray resources)."""
    # Imported here: the provider list lives with the sessions, which import onnxruntime.
    from .graphs.openvino_sessions import PRECISIONS
    from .graphs.sessions import PROVIDERS

    add = parser.add_argument
    add("--provider", default="auto", choices=PROVIDERS, help="auto: CUDA if usable; OpenVINO exports: openvino")
    add("--threads", type=positive, help="CPU threads for onnxruntime (default: physical cores)")
    add("--device", default="CPU", help="provider openvino: OpenVINO device (CPU, GPU, NPU)")
    add(
        "--inference-precision", default="auto", choices=PRECISIONS,
        help="provider openvino: auto (bf16 where the CPU has it, else f32)",
    )  # fmt: skip


def add_addon_options(parser: argparse.ArgumentParser, on_every_node: bool = False) -> None:
    """The add-on folders and choices every command line takes: LoRAs (and the memory of their
    patched sessions), textual-inversion embeddings, the VAE."""
    where = " (on every node)" if on_every_node else ""
    add = parser.add_argument
    add("--lora-dir", help=f"folder of kohya/A1111 .safetensors LoRAs for <lora:name:weight>{where}")
    add(
        "--lora-cache-mb", type=non_negative, default=LORA_CACHE_MB,
        help="MiB of memory for LoRA-patched sessions kept for the next request, charged what building each "
        "set took (default %(default)s; 0 keeps none, the plain sessions stay)",
    )  # fmt: skip
    add("--embeddings-dir", help=f"folder of textual-inversion .safetensors embeddings{where}")
    add(
        "--vae", help="an exported VAE by name (python -m export --add-vae) that requests use unless they name "
        "another (override_settings.sd_vae); default: the model's own",
    )  # fmt: skip


def load_options(source: Any) -> dict[str, Any]:
    """Pipeline.from_pretrained's keywords from parsed arguments or a config object: the LOAD_OPTIONS
    it has (a cluster replica has no OpenVINO device, say)."""
    return {name: getattr(source, name) for name in LOAD_OPTIONS if hasattr(source, name)}


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value
