"""A small, strict `.safetensors` reader on numpy (LoRA and embedding files; no torch, no pickle).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus `__metadata__`), then the tensor bytes. Every offset and size is checked against the file so
a malformed or truncated file is one clear error, never a crash or a read past the end.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 2**20
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsError(ValueError):
    """The file is not a readable .safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsError("too short to be a .safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise SafetensorsError("the header length is out of range (not a .safetensors file, or truncated)")
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SafetensorsError("the header is not valid JSON") from None
        if not isinstance(header, dict):
            raise SafetensorsError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + length
        tensors = {name: cls._entry(name, raw, data_start, size) for name, raw in header.items()}
        return cls(path, tensors, metadata if isinstance(metadata, dict) else {}, data_start)

    @staticmethod
    def _entry(name: str, raw: object, data_start: int, size: int) -> TensorEntry:
        try:
            dtype, shape, (begin, end) = raw["dtype"], tuple(int(d) for d in raw["shape"]), raw["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != expected or data_start + end > size:
            raise SafetensorsError(f"tensor {name!r}: its offsets do not match its shape or the file size")
        return TensorEntry(dtype, shape, data_start + begin, data_start + end)

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32."""
        entry = self.tensors[name]
        with self.path.open("rb") as handle:
            handle.seek(entry.start)
            raw = np.frombuffer(handle.read(entry.end - entry.start), dtype=DTYPES[entry.dtype])
        if entry.dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32).reshape(entry.shape)

    def addnet_hash(self) -> str:
        """sha256 of the tensor bytes (after the header): the hash A1111 (and sd-scripts' `ss_`
        metadata) use for LoRA files, so renaming or re-saving metadata keeps it."""
        digest = hashlib.sha256()
        with self.path.open("rb") as handle:
            handle.seek(self.data_start)
            while block := handle.read(2**20):
                digest.update(block)
        return digest.hexdigest()
