"""The model a replica serves must be the ingress's, byte for byte: checked at replica start.

Replicas read the model from a path every node can read (a shared filesystem, or a copy per node).
A copy that differs would give different images for the same seed, so a replica refuses to start
when a graph file's sha256 differs from its manifest, or when its manifest, tokenizer or scheduler
config differ from the reference copy (the fingerprint computed where the app was built).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelFolderError
from ..model_folder import MANIFEST_FILE, SCHEDULER_CONFIG, TOKENIZER_DIR, Manifest, read_manifest

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(folder: str | Path) -> str:
    """sha256 over the small files that define the model: the manifest (which holds every graph's
    sha256), the tokenizer and the scheduler config."""
    folder = Path(folder)
    files = [folder / MANIFEST_FILE, folder / SCHEDULER_CONFIG, *sorted((folder / TOKENIZER_DIR).rglob("*"))]
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(f"{path.relative_to(folder).as_posix()}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def verify_graphs(manifest: Manifest) -> None:
    """Every graph file (and its external weights) against the sha256 the exporter wrote."""
    for name, graph in manifest.graphs.items():
        entry = manifest.raw["graphs"][name]
        files = entry.get("files") if isinstance(entry.get("files"), dict) else {graph.path.name: graph.sha256}
        for file, expected in files.items():
            path = graph.path.parent / file
            if not path.is_file():
                raise ModelFolderError(f"{path} is missing: the model folder is incomplete")
            if _sha256(path) != expected:
                raise ModelFolderError(
                    f"{path} does not match its sha256 in {manifest.folder / MANIFEST_FILE}: this copy of the "
                    "model is damaged or was changed; copy the exported folder again"
                )


def check_model(folder: str | Path, expected_fingerprint: str | None) -> Manifest:
    """The manifest of a model folder whose files match their hashes and the reference copy."""
    manifest = read_manifest(folder)
    verify_graphs(manifest)
    if expected_fingerprint is not None and fingerprint(folder) != expected_fingerprint:
        raise ModelFolderError(
            f"{folder}: this node's copy of the model differs from the one the app was deployed with "
            "(manifest, tokenizer or scheduler config); give every node the same exported folder"
        )
    return manifest
