"""The reference the runtime is measured against: diffusers' StableDiffusionPipeline with the
scheduler a diffusers user would pick for each sampler, the CPU generator, and clip skip 2.

diffusers' own `clip_skip=` argument raises with transformers 5 (it looks for
`text_encoder.text_model`), so the clip-skip embeddings are computed here exactly as diffusers
computes them (hidden_states[-(clip_skip + 1)] through the final layer norm, clip_skip=1 meaning
A1111's "Clip skip: 2") and passed as prompt_embeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

SCHEDULERS = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}


def scheduler_like_users_switch(sampler: str, raw_config: dict, **overrides: object):
    """As users switch samplers: ``X.from_config(pipe.scheduler.config)`` on the shipped PNDM one."""
    return SCHEDULERS[sampler].from_config(PNDMScheduler.from_config(raw_config).config, **overrides)


def load(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


def clip_skip_embeddings(pipe: StableDiffusionPipeline, text: str, a1111_clip_skip: int = 2) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-a1111_clip_skip]
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def generate(
    pipe: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    sampler: str,
    seeds: list[int],
    steps: int = 28,
    guidance_scale: float = 11.0,
    size: int = 64,
    a1111_clip_skip: int | None = 2,
) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1]; image i from its own generator seeded seeds[i].
    `a1111_clip_skip` None: diffusers encodes the prompts itself (its clip_skip=None, the last layer)."""
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    count = len(seeds)
    if a1111_clip_skip is None:
        texts = {"prompt": [prompt] * count, "negative_prompt": [negative_prompt] * count}
    else:
        texts = {
            "prompt_embeds": clip_skip_embeddings(pipe, prompt, a1111_clip_skip).repeat(count, 1, 1),
            "negative_prompt_embeds": clip_skip_embeddings(pipe, negative_prompt, a1111_clip_skip).repeat(count, 1, 1),
        }
    result = pipe(
        **texts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        width=size,
        height=size,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="np",
    )
    return result.images.astype(np.float32)
