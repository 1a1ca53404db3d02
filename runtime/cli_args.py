"""What the three command lines (`python -m runtime`, `runtime.server`, `runtime.cluster`) share
in argparse: the parser whose errors follow their rule, and the argument types."""

from __future__ import annotations

import argparse
import sys

from .limits import LORA_CACHE_MB


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


def add_lora_cache_option(parser: argparse.ArgumentParser) -> None:
    """--lora-cache-mb, the bound of Pipeline.from_pretrained(lora_cache_mb=...), for all three."""
    parser.add_argument(
        "--lora-cache-mb", type=non_negative, default=LORA_CACHE_MB,
        help="MiB of memory for LoRA-patched sessions kept for the next request, charged what building each "
        "set took (default %(default)s; 0 keeps none, the plain sessions stay)",
    )  # fmt: skip


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value
