"""LoRA and embedding files for the server and cluster tests, written without torch: kohya-format
keys (`lora_unet_*` / `lora_te_*` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`) and A1111's
one-tensor `emb_params` embeddings, for the tiny test model (text width 32, UNet conv_in 4 -> 32)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

TINY_TEXT_WIDTH = 32


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal .safetensors writer (float32)."""
    header, offset, blobs = {}, 0, []
    for name, value in tensors.items():
        data = np.ascontiguousarray(value, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def tiny_lora(path: Path, seed: int) -> None:
    """A random rank-2 LoRA on the tiny model: UNet conv_in as LoCon (3x3 down, 1x1 up), a UNet
    attention projection and a text-encoder one, so both patched graphs are exercised."""
    rng = np.random.default_rng(seed)
    shapes = {  # module -> (down, up)
        "lora_unet_conv_in": ((2, 4, 3, 3), (32, 2, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((2, 32), (32, 2)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((2, 32), (32, 2)),
    }
    tensors = {}
    for module, (down, up) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = rng.standard_normal(down) * 0.3
        tensors[f"{module}.lora_up.weight"] = rng.standard_normal(up) * 0.3
        tensors[f"{module}.alpha"] = np.array(1.0)
    write_safetensors(path, tensors)


def tiny_embedding(path: Path, seed: int, vectors: int = 2) -> None:
    write_safetensors(path, {"emb_params": np.random.default_rng(seed).standard_normal((vectors, TINY_TEXT_WIDTH))})
