"""img2img and inpainting against diffusers on a random tiny SD1.x model the tests never saw
(default seed 7): strength 0.6, 20 steps, Euler a, seed 114514, exported fp32; prints the max
pixel difference in levels of 255 (the issue's bar: <= 1). Needs torch + diffusers (dev install).

    python scripts/check_img2img_parity.py [--model-seed 7] [--work /tmp/img2img-check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_img2img import NEGATIVE, PROMPT, init_image, rect_mask  # noqa: E402

import diffusers_reference as reference  # noqa: E402
from export.exporter import ExportOptions, run_export  # noqa: E402
from export.random_model import build_and_save  # noqa: E402
from runtime import Pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("/tmp/img2img-check"))
    args = parser.parse_args()
    source = build_and_save("tiny", args.work / "src", seed=args.model_seed)["diffusers"]
    exported = args.work / "onnx"
    if not exported.exists():
        run_export(ExportOptions(model=str(source), output=exported, precision="fp32"))
    base, ours = reference.load(Path(source)), Pipeline.from_pretrained(exported, provider="cpu")
    inside = (np.asarray(rect_mask()) > 0)[..., None]
    original = np.asarray(init_image(), np.float32) / 255
    cases = [
        (StableDiffusionImg2ImgPipeline, {}, {}),
        (StableDiffusionInpaintPipeline, {"mask_image": rect_mask()}, {"mask_image": rect_mask(), "mask_blur": 0}),
    ]
    for pipe_class, theirs_kw, ours_kw in cases:
        pipe = pipe_class(**base.components)
        pipe.scheduler = reference.SCHEDULERS["euler_a"].from_config(base.scheduler.config)
        expected = pipe(
            prompt_embeds=reference.clip_skip_embeddings(base, PROMPT),
            negative_prompt_embeds=reference.clip_skip_embeddings(base, NEGATIVE), image=init_image(),
            strength=0.6, num_inference_steps=20, guidance_scale=11.0,
            generator=[torch.Generator("cpu").manual_seed(114514)], output_type="np", **theirs_kw,
        ).images[0]  # fmt: skip
        if theirs_kw:  # A1111 pastes the original back outside the mask; diffusers does not
            expected = np.where(inside, expected, original)
        got = ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=20, seed=114514, image=init_image(),
                   strength=0.6, output_type="np", **ours_kw).images[0]  # fmt: skip
        print(f"{pipe_class.__name__}: max difference {np.abs(got - expected).max() * 255:.2e} / 255")


if __name__ == "__main__":
    main()
