"""Several exported VAEs, switched by name at run time (A1111's "SD VAE" setting / `sd_vae`).

The export's own VAE (the checkpoint's, or the one `python -m export --vae` baked in) is the
default; `python -m export --add-vae` adds others under `vaes/<name>/` and lists them in the
manifest's `vaes` section. "Automatic" and "None" select the default, as A1111's choices that
keep the checkpoint's VAE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelFolderError
from .model_folder import GraphInfo, Manifest, graph_info

VAES_DIR = "vaes"
DEFAULT_NAMES = ("Automatic", "None")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. +()-]{0,127}$")


def check_vae_name(name: str) -> None:
    """A name is also a folder name under vaes/: no separators, no `..`, not A1111's keywords."""
    if not _NAME.match(name) or ".." in name:
        raise ValueError("use letters, digits and . _ - + ( ) space, starting with a letter, digit or _")
    if name in DEFAULT_NAMES:
        raise ValueError(f"{name!r} is A1111's name for the model's own VAE")


@dataclass(frozen=True)
class VaeChoice:
    name: str | None  # None: the export's own VAE
    hash: str | None
    decoder: GraphInfo
    encoder: GraphInfo | None
    filename: str  # the decoder graph, relative to the model folder


def _added(folder: Path, name: str, entry: Any) -> VaeChoice:
    where = f"manifest: vaes[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("graphs"), dict):
        raise ModelFolderError(f"{where} is not an object with 'graphs'")
    if not isinstance(entry.get("hash", ""), str) or not isinstance(entry.get("source", ""), str):
        raise ModelFolderError(f"{where}: 'hash' and 'source' must be strings")
    try:
        check_vae_name(name)
    except ValueError as error:
        raise ModelFolderError(f"{where}: bad name ({error})") from None
    parts = {key: graph_info(folder, key, value) for key, value in entry["graphs"].items()}
    if "vae_decoder" not in parts or set(parts) - {"vae_decoder", "vae_encoder"}:
        raise ModelFolderError(f"{where} must list a vae_decoder graph (and optionally vae_encoder), nothing else")
    for info in parts.values():
        if not info.path.resolve().is_relative_to(folder.resolve()):
            raise ModelFolderError(f"{where}: {info.path} lies outside the model folder")
        if not info.path.is_file():
            raise ModelFolderError(f"{info.path} is missing: the model folder is incomplete")
    decoder = parts["vae_decoder"]
    return VaeChoice(
        name, entry.get("hash") or None, decoder, parts.get("vae_encoder"), decoder.path.relative_to(folder).as_posix()
    )


def vae_choices(manifest: Manifest) -> dict[str | None, VaeChoice]:
    """None -> the export's own VAE, then every added one by name (the manifest checked on the way)."""
    own = manifest.raw.get("vae") or {}
    decoder = manifest.graphs["vae_decoder"]
    choices: dict[str | None, VaeChoice] = {
        None: VaeChoice(
            None,
            own.get("hash"),
            decoder,
            manifest.graphs.get("vae_encoder"),
            decoder.path.relative_to(manifest.folder).as_posix(),
        )
    }
    added = manifest.raw.get("vaes") or {}
    if not isinstance(added, dict):
        raise ModelFolderError("manifest: 'vaes' must be an object (name -> VAE)")
    for name, entry in added.items():
        choices[name] = _added(manifest.folder, name, entry)
    return choices


def resolve_vae(manifest: Manifest, name: Any, field: str = "vae") -> str | None:
    """The added VAE's name, or None for the export's own (None, "Automatic", "None", its own name)."""
    if name is None or name in DEFAULT_NAMES:
        return None
    own = (manifest.raw.get("vae") or {}).get("name")
    if isinstance(name, str) and name == own:
        return None
    added = manifest.raw.get("vaes") or {}
    if not isinstance(name, str) or name not in added:
        available = ", ".join(["Automatic", *([own] if own else []), *added]) or "none"
        raise InvalidRequestError(field, f"unknown VAE {name!r}; available: {available}")
    return name


def vae_label(manifest: Manifest, name: str | None) -> tuple[str | None, str | None]:
    """(VAE, VAE hash) for the infotext, as A1111 writes them; (None, None) for a checkpoint's own VAE."""
    if name is None:
        own = manifest.raw.get("vae") or {}
        return own.get("name"), own.get("hash")
    return name, (manifest.raw["vaes"][name].get("hash") or None)
