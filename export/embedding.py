"""`python -m export.embedding FILE.pt [...]`: turn A1111 `.pt` textual-inversion embeddings into
`.safetensors` (`emb_params`) that the torch-free runtime reads. The pickle is loaded with
torch's weights-only loader (no code runs); the output goes beside the input, never over a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    target = path.with_suffix(".safetensors")
    if target.exists():
        raise ValueError(f"{target} exists; nothing was changed")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign pickles
        raise ValueError(f"{path} is not a weights-only embedding file ({type(error).__name__})") from None
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else None
    elif isinstance(data, dict) and len(data) == 1:
        vectors = next(iter(data.values()))
    else:
        vectors = None
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"{path} holds no embedding (expected A1111's string_to_param or one tensor)")
    save_file({"emb_params": vectors.detach().float().reshape(-1, vectors.shape[-1]).contiguous()}, str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.embedding", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="A1111 .pt / .bin embeddings")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print(convert(path))
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
