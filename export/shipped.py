"""Where the configs and tokenizer files that the project ships (top-level `models/`) live.

In a checkout they sit beside the packages; an installed exporter carries them as `export/configs`.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("sd15", "tiny")


def models_dir() -> Path:
    checkout = Path(__file__).resolve().parents[1] / "models"
    if (checkout / "tokenizer").is_dir():
        return checkout
    return Path(__file__).resolve().parent / "configs"


def config_dir(arch: str) -> Path:
    """The diffusers-layout config folder of one shipped architecture (no weights)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; shipped: {', '.join(ARCHITECTURES)}")
    return models_dir() / arch


def tokenizer_dir() -> Path:
    return models_dir() / "tokenizer"
