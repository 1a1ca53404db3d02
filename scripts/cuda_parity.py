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
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import Pipeline

PROMPT = "masterpiece, best quality, 1girl, looking at viewer, cherry blossoms"
NEGATIVE = "lowres, bad anatomy, bad hands, text, error, missing fingers, worst quality"
SEED, CFG = 114514, 11.0


def relative_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    expected = reference.detach().float().cpu().numpy()
    return float(np.abs(ours.astype(np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return round(10 * math.log10(255**2 / mse), 2) if mse else None


class Diffusers:
    """diffusers' pipeline in one dtype, with clip skip 2 computed as bench.py does."""

    def __init__(self, source: Path, dtype: torch.dtype, device: str) -> None:
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(source), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.dtype, self.device = pipe.to(device), dtype, device

    @torch.no_grad()
    def embeddings(self, text: str) -> torch.Tensor:
        tokens = self.pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        encoder = self.pipe.text_encoder
        hidden = encoder(tokens.input_ids.to(self.device), output_hidden_states=True).hidden_states[-2]
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)

    @torch.no_grad()
    def unet(self, sample: np.ndarray, timestep: float, context: np.ndarray) -> torch.Tensor:
        to = {"device": self.device, "dtype": self.dtype}
        return self.pipe.unet(
            torch.from_numpy(sample).to(**to), torch.tensor(timestep, device=self.device),
            encoder_hidden_states=torch.from_numpy(context).to(**to), return_dict=False,
        )[0]  # fmt: skip

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode(torch.from_numpy(latents).to(self.device, self.dtype) / vae.config.scaling_factor)[0]
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def image(self, size: int, steps: int) -> np.ndarray:
        out = self.pipe(
            prompt_embeds=self.embeddings(PROMPT), negative_prompt_embeds=self.embeddings(NEGATIVE),
            num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
            generator=torch.Generator().manual_seed(SEED), output_type="np",
        ).images[0]  # fmt: skip
        return (out * 255).round().astype(np.uint8)


def runtime_image(pipe: Pipeline, size: int, steps: int) -> np.ndarray:
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
        seed=SEED, sampler="euler_a", output_type="np",
    )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def stages(pipe: Pipeline, references: dict[str, Diffusers], size: int) -> dict[str, dict[str, float]]:
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
            "unet": relative_error(unet_out, ref.unet(sample, 500.0, context)),
            "vae_decoder": relative_error(np.asarray(decoded).reshape(1, size, size, 3), ref.decode(latents)),
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
    device = "cuda" if args.provider == "cuda" else "cpu"
    references = {"diffusers_fp32": Diffusers(args.source, torch.float32, device)}
    if device == "cuda":
        references["diffusers_fp16"] = Diffusers(args.source, torch.float16, device)
    report: dict[str, Any] = {"size": args.size, "steps": args.steps}
    images = {name: ref.image(args.size, args.steps) for name, ref in references.items()}
    for cuda_graph in (False, True) if device == "cuda" else (False,):
        pipe = Pipeline.from_pretrained(args.export, provider=args.provider, cuda_graph=cuda_graph)
        label = f"runtime_cuda_graph_{'on' if cuda_graph else 'off'}"
        report[f"stages_{label}"] = stages(pipe, references, args.size)
        images[label] = runtime_image(pipe, args.size, args.steps)
        del pipe
    report["image_psnr_db"] = {f"{a} vs {b}": psnr(images[a], images[b]) for a, b in itertools.combinations(images, 2)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
