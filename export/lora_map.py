"""Where each weight a LoRA can change ended up in an exported graph (runtime/graphs/lora.py applies it).

A kohya / A1111 LoRA names torch modules (`lora_unet_down_blocks_0_attentions_0_..._to_q`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). After `torch.onnx.export` and ORT's
transformer optimizer those weights are initializers with generated names (`onnx::MatMul_310`),
transposed for MatMul, or packed into one Q/K/V tensor by the attention fusions (stacked
`(in, 3, out)` on CPU, interleaved per head `(in, heads, 3, head_size)` with CUDA's packed QKV/KV),
and in fp16 graphs converted to float16. Names are not kept through all that, values are: every
Linear/Conv2d weight is found in the final graph by the hash of its exact values (in the graph's
dtype), as is, transposed, or as a slice of a packed tensor. The result is one side file per graph
(`<graph>/lora_targets.json`) listing, per kohya module name, the slots to patch and, per
initializer, where its bytes are in the graph's files, so the torch-free runtime can read the base
weight, add the LoRA delta and hand the patched tensor to onnxruntime at session creation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

log = logging.getLogger(__name__)

LORA_TARGETS_FILE = "lora_targets.json"
PREFIXES = {"text_encoder": "lora_te_", "unet": "lora_unet_"}
PACK_COUNTS = (3, 2)  # fused Q/K/V, fused K/V


@dataclass(frozen=True)
class Weight:
    module: str  # kohya name, e.g. lora_unet_mid_block_attentions_0_proj_in
    shape: tuple[int, ...]  # the torch weight's shape


def kohya_name(graph: str, module_name: str) -> str:
    """kohya-ss names modules by their diffusers/transformers path with '_' for '.'; transformers 5
    dropped CLIPTextModel's `text_model` level, which the names still carry."""
    if graph == "text_encoder" and not module_name.startswith("text_model."):
        module_name = f"text_model.{module_name}"
    return PREFIXES[graph] + module_name.replace(".", "_")


def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return hashlib.blake2b(f"{array.dtype}{array.shape}".encode() + array.tobytes(), digest_size=16).digest()


def stored_forms(weight: np.ndarray) -> list[np.ndarray]:
    """The values a graph may hold for a float32 weight: itself; fp16 as the CPU target stores it (a
    plain cast); fp16 as onnxruntime's float16 converter writes it for the CUDA target, which moves
    magnitudes under fp16's smallest subnormal to that subnormal instead of 0 (a full-size SD1.5
    matrix has about one such value, so without this form most weights went unmapped there)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return [weight, weight.astype(np.float16), convert_np_to_float16(weight)]


def fingerprints(graph: str, module: torch.nn.Module) -> dict[bytes, Weight]:
    """Hash of every Linear/Conv2d weight, as (out, in*k*k), in each form a graph may store.
    Kept instead of the weights so the torch model can be released before the ONNX stage."""
    table: dict[bytes, Weight] = {}
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
            continue
        weight = child.weight.detach().float().numpy()
        entry = Weight(kohya_name(graph, name), tuple(weight.shape))
        for form in stored_forms(weight.reshape(weight.shape[0], -1)):
            table[_digest(form)] = entry
    return table


def _slot(view: list[int], index: list[int | None], transposed: bool, channels_last: bool = False) -> dict[str, Any]:
    return {"view": view, "index": index, "transposed": transposed, "channels_last": channels_last}


def _direct(value: np.ndarray, table: dict[bytes, Weight]) -> list[tuple[Weight, dict]]:
    """As is, transposed (MatMul), or channels-last (the CUDA target's NhwcConv keeps a conv
    weight as (out, kh, kw, in))."""
    flat = value.reshape(value.shape[0], -1)
    if (weight := table.get(_digest(flat))) is not None:
        return [(weight, _slot(list(value.shape), [None] * value.ndim, False))]
    if value.ndim == 2 and (weight := table.get(_digest(value.T))) is not None:
        return [(weight, _slot(list(value.shape), [None, None], True))]
    if value.ndim == 4:
        channels_first = value.transpose(0, 3, 1, 2).reshape(value.shape[0], -1)
        if (weight := table.get(_digest(channels_first))) is not None:
            return [(weight, _slot(list(value.shape), [None] * 4, False, channels_last=True))]
    return []


def _packed(value: np.ndarray, table: dict[bytes, Weight]) -> list[tuple[Weight, dict]]:
    """A fused (in, k*out) MatMul weight: stacked (in, k, out) or interleaved (in, heads, k, head)."""
    rows, columns = value.shape
    for count in PACK_COUNTS:
        if columns % count:
            continue
        out = columns // count
        views = [[rows, count, out]] + [
            [rows, heads, count, out // heads] for heads in range(2, out + 1) if out % heads == 0
        ]
        for view in views:
            shaped = value.reshape(view)
            found = []
            for part in range(count):
                index: list[int | None] = [None] * len(view)
                index[len(view) - 2] = part
                piece = shaped[tuple(slice(None) if i is None else i for i in index)].reshape(rows, out)
                weight = table.get(_digest(piece.T))
                if weight is None:
                    break
                found.append((weight, _slot(view, index, True)))
            if len(found) == count:
                return found
    return []


def map_graph(
    graph: str, model: onnx.ModelProto, table: dict[bytes, Weight], folder: Path | None = None
) -> dict[str, list[dict]]:
    """{kohya module: [slot, ...]} with each slot naming its initializer. Modules not found are
    listed as `absent` in the side file so a LoRA that targets them is still of the right model.
    `folder` holds the external data file of a saved graph (onnx's save moves big weights out of
    the in-memory model too, leaving references relative to that folder)."""
    modules: dict[str, list[dict]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(tensor.dims) < 2:
            continue
        value = numpy_helper.to_array(tensor, base_dir=str(folder) if folder is not None else "")
        found = _direct(value, table) or (_packed(value, table) if value.ndim == 2 else [])
        for weight, slot in found:
            modules.setdefault(weight.module, []).append(
                {"initializer": tensor.name, "shape": list(weight.shape), **slot}
            )
    missing = {weight.module for weight in table.values()} - set(modules)
    if missing:  # e.g. the text encoder's last layers, which clip skip leaves out of the graph
        log.info("%s: %d LoRA-targetable weights are not in the graph (LoRAs skip them): %s",
                    graph, len(missing), ", ".join(sorted(missing)[:5]))  # fmt: skip
    return modules


def initializer_locations(path: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """Where each named initializer's bytes are: file (beside model.onnx), offset, length, dtype,
    shape. Inline tensors are found in model.onnx itself (graphs under 64 MiB)."""
    model = onnx.load(str(path), load_external_data=False)
    inline = None
    found = {}
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            continue
        entry = {
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name,
            "shape": list(tensor.dims),
        }
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {item.key: item.value for item in tensor.external_data}
            entry.update(file=info["location"], offset=int(info.get("offset", 0)), length=int(info["length"]))
        else:
            inline = path.read_bytes() if inline is None else inline
            offset = inline.find(tensor.raw_data)
            if not tensor.raw_data or offset < 0 or inline.find(tensor.raw_data, offset + 1) >= 0:
                raise RuntimeError(f"cannot locate initializer {tensor.name} in {path} for LoRA patching")
            entry.update(file=path.name, offset=offset, length=len(tensor.raw_data))
        found[tensor.name] = entry
    return found


def lora_targets(graph: str, path: Path, model: onnx.ModelProto, table: dict[bytes, Weight]) -> dict[str, Any]:
    """The side file's content for one saved graph."""
    modules = map_graph(graph, model, table, path.parent)
    names = {slot["initializer"] for slots in modules.values() for slot in slots}
    absent = sorted({weight.module for weight in table.values()} - set(modules))
    return {"modules": modules, "absent": absent, "initializers": initializer_locations(path, names)}
