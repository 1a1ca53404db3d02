"""Reading single-file SD1.x checkpoints as people have them: .safetensors, and .ckpt pickles from
every era (PyTorch Lightning training runs, NAI-era text encoder names, EMA copies).

What is kept is the model's weights under the LDM names diffusers reads, and nothing else: EMA
copies (unless asked for), optimizer states and training bookkeeping are never copied. A pickle is
read with `torch.load(weights_only=True)`, which builds tensors and plain containers only, plus
the few harmless types Lightning-era files name (as A1111's modules/safe.py and ComfyUI allow
them); an object of any other type is refused, so no code in a checkpoint ever runs. Zip-format
pickles are memory-mapped, so only the kept tensors are ever read from disk.
"""

from __future__ import annotations

import _codecs
import json
import pickle
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.errors import UserError

SAFETENSORS = ".safetensors"
KEPT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
UNET_PREFIX, EMA_PREFIX = "model.diffusion_model.", "model_ema."
# NAI-era files name the CLIP text model without `text_model.`; A1111 renames them on load, so do we.
_OLD_TEXT_NAMES = tuple(
    (f"cond_stage_model.transformer.{part}", f"cond_stage_model.transformer.text_model.{part}")
    for part in ("embeddings.", "encoder.", "final_layer_norm.")
)
_ZIP_MAGIC, _PICKLE_PROTOCOL = b"PK\x03\x04", 0x80
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class CheckpointError(UserError):
    """A checkpoint file that cannot be read as SD1.x weights."""


class _Placeholder:
    """Stands in for a training-time class a Lightning checkpoint names (as a dict key or an
    object); never called with the file's data, never imported from the training library."""


def _safe_globals() -> list:
    """The types Lightning-era SD checkpoints name besides tensors, under the names they use."""
    scalar = np._core.multiarray.scalar
    return [
        (_Placeholder, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_Placeholder, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        *((type(np.dtype(name)), f"numpy.dtypes.{type(np.dtype(name)).__name__}") for name in ("f8", "f4", "i8")),
        (_codecs.encode, "_codecs.encode"),
    ]


@dataclass
class CheckpointWeights:
    """The kept tensors under the names diffusers reads, and what the file said about itself."""

    tensors: dict[str, torch.Tensor] | None  # None for a .safetensors file read as it is
    shapes: dict[str, tuple[int, ...]]  # of the kept tensors, under their kept names
    file_keys: list[str]  # every tensor name in the file: what it is (SDXL, SD2...) shows there
    metadata: dict[str, str]
    renamed: bool  # the names or the selection differ from the file's


def is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == SAFETENSORS


def _kept_name(key: str, ema: bool) -> str | None:
    """The diffusers-readable name of a file's key, or None if it is not kept."""
    for old, new in _OLD_TEXT_NAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    if ema and key.startswith(UNET_PREFIX):
        return None  # replaced by its EMA twin
    return key if key.startswith(KEPT_PREFIXES) else None


def _ema_names(keys: list[str]) -> dict[str, str]:
    """LitEma's buffer name -> the UNet key it averages: `model_ema.diffusion_modelinput_blocks00weight`
    is `model.diffusion_model.input_blocks.0.0.weight` without its dots (A1111 maps them the same way)."""
    by_flat = {key[len("model.") :].replace(".", ""): key for key in keys if key.startswith(UNET_PREFIX)}
    return {f"{EMA_PREFIX}{flat}": key for flat, key in by_flat.items()}


def select(keys: list[str], ema: bool, where: str) -> dict[str, str]:
    """file key -> kept name."""
    chosen = {key: name for key in keys if (name := _kept_name(key, ema)) is not None}
    if ema:
        twins = {ema_key: unet_key for ema_key, unet_key in _ema_names(keys).items() if ema_key in keys}
        if not twins:
            raise CheckpointError(f"{where} has no EMA weights (model_ema.*): export it without --ema")
        missing = [key for key in keys if key.startswith(UNET_PREFIX) and key not in twins.values()]
        if missing:
            raise CheckpointError(f"{where}: the EMA weights lack {len(missing)} UNet tensors, e.g. {missing[0]}")
        chosen.update(twins)
    return chosen


# -- reading ----------------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
            return shapes, dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path.name} is not a readable .safetensors file: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_pickle_file(path: Path) -> bool:
    """True for the zip format (memory-mappable); refuses what is no PyTorch checkpoint at all."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == _ZIP_MAGIC:
        return True
    if head[:1] == bytes([_PICKLE_PROTOCOL]):
        return False
    raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (neither a zip nor a pickle file)")


def _load_pickle(path: Path) -> object:
    zipped = _check_pickle_file(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise CheckpointError(
                f"{path.name} could not be read by weights-only loading: {_last_line(error)}"
            ) from None
        raise CheckpointError(
            f"{path.name} holds an object of type {found[1]}, which weights-only loading refuses (only weights and "
            "known-safe types are read; no code is run); convert it to .safetensors where you trust it"
        ) from None
    except Exception as error:  # a truncated or corrupt file: zip, pickle or storage errors
        raise CheckpointError(f"{path.name} could not be read as a PyTorch checkpoint: {_first_line(error)}") from None


def _last_line(error: BaseException) -> str:
    """torch's own text ends with the unpickler's reason, after lines of advice we do not give."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "WeightsUnpickler error" in line), lines[-1] if lines else "")
    return reason.removeprefix("WeightsUnpickler error:").strip() or type(error).__name__


def _state_dict(loaded: object, where: str) -> dict[str, torch.Tensor]:
    state = loaded
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds no state dict")
    return {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def read_checkpoint(path: Path, allow_pickle: bool, ema: bool = False) -> CheckpointWeights:
    """The kept weights of a single file. A .safetensors file that needs no renaming is left on disk."""
    if is_safetensors(path):
        shapes, metadata = _safetensors_header(path)
        chosen = select(list(shapes), ema, path.name)
        if not ema and all(key == name for key, name in chosen.items()):  # diffusers skips the other keys itself
            return CheckpointWeights(None, {key: shapes[key] for key in chosen}, list(shapes), metadata, renamed=False)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(key) for key, name in chosen.items()}
        return CheckpointWeights(tensors, _shapes(tensors), list(shapes), metadata, renamed=True)
    if not allow_pickle:
        raise CheckpointError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded; convert it "
            "to .safetensors, or pass --allow-pickle to load its weights only (no code is run)"
        )
    state = _state_dict(_load_pickle(path), path.name)
    tensors = {name: state[key] for key, name in select(list(state), ema, path.name).items()}
    return CheckpointWeights(tensors, _shapes(tensors), list(state), {}, renamed=True)


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tensors.items()}


# -- writing --------------------------------------------------------------------------------------


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A .safetensors file written one tensor at a time (safetensors' own writer builds the whole
    file in memory first). Tensors that share storage (EMA copies, tied weights) are each written
    in full, so nothing in the file aliases."""
    header: dict[str, dict] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which no SD1.x weight has")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().contiguous().reshape(-1)
            handle.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


@contextmanager
def as_safetensors(path: Path, weights: CheckpointWeights, scratch: Path) -> Iterator[Path]:
    """A .safetensors path holding the kept weights: the file itself when it needs no change."""
    if weights.tensors is None:
        if path.suffix == SAFETENSORS:
            yield path
            return
        # diffusers picks its reader by the exact suffix: `X.SAFETENSORS` would go to torch.load
        # ("Unable to load weights"). A link under the lower-case name reads the same bytes.
        linked = scratch / (path.stem + SAFETENSORS)
        linked.symlink_to(path.resolve())
        yield linked
        return
    converted = scratch / (path.stem + SAFETENSORS)
    write_safetensors(weights.tensors, converted)
    yield converted
