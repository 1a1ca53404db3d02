"""Where does the runtime's image leave diffusers'? Each stage on the same inputs, then whole images.

    python scripts/cuda_parity.py --export EXPORT --source DIFFUSERS_FOLDER [--provider cuda] [--json FILE]

Stages: text encoder (clip skip 2), one UNet call at batch 2, VAE decode, each against diffusers'
module in fp32 and in the runtime's precision on the same inputs (relative max error). Images
(Euler a, CFG 11, seed 114514): the runtime with and without CUDA graphs, diffusers fp16 and fp32,
PSNR between each pair, so the runtime's distance to diffusers reads against diffusers' own
fp16-vs-fp32 distance. scripts/device_check.sh runs it on the GPU box after the bench; on a CPU
(`--provider cpu`, a CPU export) it runs the same comparisons in fp32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import NEGATIVE, PROMPT, DiffusersSystem, Job, RuntimeSystem  # the bench's systems and settings


def relative_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    expected = reference.detach().float().cpu().numpy()
    return float(np.abs(ours.astype(np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return round(10 * math.log10(255**2 / mse), 2) if mse else None


def make_job(system: str, model: Path, provider: str, precision: str, args: argparse.Namespace) -> Job:
    return Job(
        system, "parity", str(model), args.size, args.size, args.steps, os.cpu_count() or 1, provider, precision,
        repeats=1, warmup=0,
    )  # fmt: skip


@torch.no_grad()
def diffusers_unet(ref: DiffusersSystem, sample: np.ndarray, timestep: float, context: np.ndarray) -> torch.Tensor:
    to = {"device": ref.device, "dtype": ref.dtype}
    return ref.pipe.unet(
        torch.from_numpy(sample).to(**to), torch.tensor(timestep, device=ref.device),
        encoder_hidden_states=torch.from_numpy(context).to(**to), return_dict=False,
    )[0]  # fmt: skip


@torch.no_grad()
def diffusers_decode(ref: DiffusersSystem, latents: np.ndarray) -> torch.Tensor:
    vae = ref.pipe.vae
    image = vae.decode(torch.from_numpy(latents).to(ref.device, ref.dtype) / vae.config.scaling_factor)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def first_image(system: DiffusersSystem | RuntimeSystem) -> np.ndarray:
    return np.asarray(system.generate()()[0])


def stages(pipe: Any, references: dict[str, DiffusersSystem], size: int) -> dict[str, dict[str, float]]:
    prepared = pipe.prepare(prompt=PROMPT, negative_prompt=NEGATIVE)
    states = pipe.encode(prepared.chunks)
    piece = prepared.conditioning[0]
    cond, uncond = states[piece.conds[0]], states[piece.uncond]
    rng = np.random.default_rng(0)
    latent = size // 8
    sample = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
    context = np.stack([uncond, cond]).astype(np.float32)
    unet_out = pipe.sessions.unet.bind(context, sample.shape)(sample, np.full((2,), 500.0, dtype=np.float32))
    latents = rng.standard_normal((1, 4, latent, latent), dtype=np.float32)
    decoded = pipe.decode(latents)
    result: dict[str, dict[str, float]] = {}
    for name, ref in references.items():
        result[name] = {
            "text_encoder": relative_error(cond, ref.embeddings(PROMPT)[0]),
            "unet": relative_error(unet_out, diffusers_unet(ref, sample, 500.0, context)),
            "vae_decoder": relative_error(
                np.asarray(decoded).reshape(1, size, size, 3), diffusers_decode(ref, latents)
            ),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="the diffusers folder the export came from")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    precisions = ("fp32", "fp16") if args.provider == "cuda" else ("fp32",)
    references = {}
    for precision in precisions:
        references[f"diffusers_{precision}"] = DiffusersSystem(
            make_job("diffusers", args.source, args.provider, precision, args)
        )
        references[f"diffusers_{precision}"].load()
    report: dict[str, Any] = {"size": args.size, "steps": args.steps}
    images = {name: first_image(ref) for name, ref in references.items()}
    for cuda_graph in (False, True) if args.provider == "cuda" else (False,):
        runtime = RuntimeSystem(make_job("runtime", args.export, args.provider, "fp16", args))
        runtime.cuda_graph = cuda_graph
        runtime.pipe = runtime.load_pipeline()
        label = f"runtime_cuda_graph_{'on' if cuda_graph else 'off'}"
        report[f"stages_{label}"] = stages(runtime.pipe, references, args.size)
        images[label] = first_image(runtime)
        del runtime
    report["image_psnr_db"] = {f"{a} vs {b}": psnr(images[a], images[b]) for a, b in itertools.combinations(images, 2)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
