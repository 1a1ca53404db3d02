"""A1111 textual-inversion embeddings: files in an embeddings folder, used by name in prompts.

As the web UI (modules/textual_inversion, sd_hijack_clip): an embedding's name is its file name
without the suffix; prompts are matched on tokens, so the name's token ids must appear in a
prompt piece's ids (longest name first where several start with the same token); the match is
replaced by the embedding's vectors, one token position each, and a multi-vector embedding that
does not fit in what is left of the 75-token chunk starts the next chunk (never split).

Files: `.safetensors` holding one tensor (A1111's `emb_params`, shape (vectors, width)). Pickled
`.pt`/`.bin` embeddings are listed as skipped with how to convert them (`python -m
export.embedding FILE.pt`, which has torch). Embeddings of another width (SD2, SDXL) are skipped,
as A1111 skips them, and shown under `skipped` in GET /sdapi/v1/embeddings.

The text encoder graph takes the vectors through its `extra_embeddings` input: a request's
embeddings become rows of that input and their positions get ids vocab_size + row (ExtraRows).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..graphs.safetensors_io import SafetensorsError, SafetensorsFile
from .conditioning import CHUNK_LENGTH
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin")
MAX_EMBEDDING_BYTES = 16 * 2**20  # a 75-vector SD1 embedding is 230 KB


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: np.ndarray  # (n, width) float32
    shorthash: str  # A1111's: first 12 hex digits of the file's sha256

    def info(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/embeddings entry."""
        return {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": int(self.vectors.shape[1]),
            "vectors": int(self.vectors.shape[0]),
        }


def read_embedding(path: Path, width: int) -> Embedding:
    """One `.safetensors` embedding; ValueError says why it cannot be used."""
    if path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise ValueError(f"over the {MAX_EMBEDDING_BYTES // 2**20} MiB limit for an embedding")
    try:
        handle = SafetensorsFile.open(path)
    except SafetensorsError as error:
        raise ValueError(str(error)) from None
    if len(handle.tensors) != 1:
        raise ValueError(f"holds {len(handle.tensors)} tensors ({', '.join(sorted(handle.tensors)[:3])}): "
                         "not an SD1 embedding (SDXL ones hold clip_l and clip_g)")  # fmt: skip
    vectors = handle.read(next(iter(handle.tensors)))
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(f"has shape {vectors.shape}; this model's text encoder takes vectors of {width}")
    if not 1 <= len(vectors) <= CHUNK_LENGTH or not np.isfinite(vectors).all():
        raise ValueError(f"has {len(vectors)} vectors or non-finite values (1 to {CHUNK_LENGTH} finite vectors)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Embedding(path.stem, vectors.astype(np.float32), digest[:12])


@dataclass
class ExtraRows:
    """The rows of a request's `extra_embeddings` input and the ids that select them."""

    vocab_size: int
    rows: list[np.ndarray] = field(default_factory=list)
    used: dict[str, Embedding] = field(default_factory=dict)
    _start: dict[str, int] = field(default_factory=dict)

    def ids(self, embedding: Embedding) -> list[int]:
        if embedding.name not in self._start:
            self._start[embedding.name] = sum(len(item) for item in self.rows)
            self.rows.append(embedding.vectors)
            self.used[embedding.name] = embedding
        start = self.vocab_size + self._start[embedding.name]
        return list(range(start, start + len(embedding.vectors)))

    def matrix(self) -> np.ndarray | None:
        return np.concatenate(self.rows) if self.rows else None


class EmbeddingMatcher:
    """find(tokens, position) for one request: the embedding whose name's ids start there."""

    def __init__(self, lookup: dict[int, list[tuple[list[int], Embedding]]], rows: ExtraRows) -> None:
        self.lookup = lookup
        self.rows = rows

    def find(self, tokens: list[int], position: int) -> tuple[list[int], int] | None:
        """(ids to place, prompt tokens consumed), or None."""
        for ids, embedding in self.lookup.get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return self.rows.ids(embedding), len(ids)
        return None


class EmbeddingLibrary:
    """The embeddings folder, read at construction and at refresh()."""

    def __init__(self, folder: str | Path | None, tokenizer: ClipTokenizer, width: int, vocab_size: int) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.tokenizer = tokenizer
        self.width = width
        self.vocab_size = vocab_size
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, str] = {}
        self._lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                suffix = path.suffix.lower()
                if not path.is_file() or path.stem in loaded or suffix not in (".safetensors", *PICKLE_SUFFIXES):
                    continue
                if suffix in PICKLE_SUFFIXES:
                    skipped[path.stem] = f"pickled; convert it with `python -m export.embedding {path.name}`"
                    continue
                try:
                    loaded[path.stem] = read_embedding(path, self.width)
                except (ValueError, OSError) as error:
                    skipped[path.stem] = str(error)
        lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        names = list(loaded)
        for name, ids in zip(names, self.tokenizer.tokenize(names) if names else [], strict=True):
            if ids:
                lookup.setdefault(ids[0], []).append((ids, loaded[name]))
        for candidates in lookup.values():
            candidates.sort(key=lambda item: len(item[0]), reverse=True)
        with self._lock:
            self.loaded, self.skipped, self._lookup = loaded, skipped, lookup
        for name, reason in skipped.items():
            log.warning("embedding %s skipped: %s", name, reason)

    def matcher(self) -> EmbeddingMatcher | None:
        """A matcher with fresh rows for one request; None when there are no embeddings."""
        with self._lock:
            lookup = self._lookup
        return EmbeddingMatcher(lookup, ExtraRows(self.vocab_size)) if lookup else None

    def listing(self) -> dict[str, Any]:
        """GET /sdapi/v1/embeddings: A1111's {loaded: {name: info}, skipped: {name: info}}."""
        skipped = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                          "vectors": 0, "reason": reason} for name, reason in self.skipped.items()}  # fmt: skip
        return {"loaded": {name: item.info() for name, item in self.loaded.items()}, "skipped": skipped}


def ti_hashes(used: dict[str, Embedding]) -> str | None:
    """Infotext `TI hashes` as A1111 writes it: "name: shorthash, ..." (':' and ',' dropped from names)."""
    parts = [f"{name.replace(':', '').replace(',', '')}: {item.shorthash}" for name, item in used.items()]
    return ", ".join(parts) or None
