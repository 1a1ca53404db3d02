"""The model a replica serves must be the ingress's, byte for byte: checked at replica start.

Replicas read the model from a path every node can read (a shared filesystem, or a copy per node).
A copy that differs would give different images for the same seed, so a replica refuses to start
when a graph file's sha256 differs from its manifest, or when its manifest, tokenizer or scheduler
config differ from the reference copy (the fingerprint computed where the app was built). With
`--model-dir` each checkpoint has its own fingerprint, checked when a replica first loads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelFolderError
from ..graphs.model_folder import (
    MANIFEST_FILE,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    Manifest,
    read_manifest,
    sha256_of_file,
    verify_files,
)
from ..server.config import ServerConfig
from ..server.models import scan_folder, single
from .settings import ModelCopy


def fingerprint(folder: str | Path) -> str:
    """sha256 over the small files that define the model: the manifest (which holds every graph's
    sha256), the tokenizer and the scheduler config."""
    folder = Path(folder)
    files = [folder / MANIFEST_FILE, folder / SCHEDULER_CONFIG, *sorted((folder / TOKENIZER_DIR).rglob("*"))]
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_of_file(path)}\n".encode())
    return digest.hexdigest()


def check_model(folder: str | Path, expected_fingerprint: str | None) -> Manifest:
    """The manifest of a model folder whose files match their hashes and the reference copy."""
    manifest = read_manifest(folder)
    verify_files(manifest)
    if expected_fingerprint is not None and fingerprint(folder) != expected_fingerprint:
        raise ModelFolderError(
            f"{folder}: this node's copy of the model differs from the one the app was deployed with "
            "(manifest, tokenizer or scheduler config); give every node the same exported folder"
        )
    return manifest


def reference_models(server: ServerConfig) -> dict[str, ModelCopy]:
    """The checkpoints to serve, by title, fingerprinted here (the reference copy): the one `--model`
    (one clear line if it is not a model), or every export in `--model-dir`, as one box lists them."""
    if server.model_dir:
        checkpoints = scan_folder(Path(server.model_dir))
        if not checkpoints:
            raise ModelFolderError(f"no exported model folder (with a {MANIFEST_FILE}) in {server.model_dir}")
    else:
        checkpoints = single(read_manifest(server.model))
    return {
        checkpoint.title: ModelCopy(str(checkpoint.folder), checkpoint.filename, fingerprint(checkpoint.folder))
        for checkpoint in checkpoints
    }
