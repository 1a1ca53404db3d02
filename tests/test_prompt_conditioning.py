"""Prompt editing, alternation and AND in generated images, against diffusers.

- `[cat:dog:0.5]`: diffusers' own StableDiffusionPipeline, whose prompt embeddings are swapped by
  a step-end callback right after the step at which A1111 switches (CFGDenoiser counts calls from
  0 and uses the first text while call <= when, so with 8 steps `0.5` means calls 0-4 "cat").
  The test also shows that switching one step earlier or later gives another image, so an
  off-by-one here cannot pass.
- `a AND b:w`: diffusers' UNet and scheduler in a hand-written loop with A1111's composable
  combination eps = uncond + sum w_i * cfg * (cond_i - uncond). The loop is first checked to give
  diffusers' pipeline image for a single prompt, so it is diffusers' arithmetic with only the
  combination changed.

Tolerance as in test_pipeline_parity: fp32 graphs, max pixel difference <= 1 of 255.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from diffusers import EulerAncestralDiscreteScheduler

import diffusers_reference as reference
from runtime import Pipeline
from runtime.graphs.model_folder import TEXT_INPUT
from runtime.text.prompt_schedule import prompt_schedule

NEGATIVE = "lowres"
STEPS = 8
SEED = 31337


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source):
    pipe = reference.load(tiny_source["diffusers"])
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def ours(pipe: Pipeline, prompt: str, negative: str = NEGATIVE, **kwargs) -> np.ndarray:
    out = pipe(prompt, negative_prompt=negative, seed=SEED, num_inference_steps=STEPS, width=64, height=64,
               output_type="np", **kwargs)  # fmt: skip
    return out.images[0]


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() * 255)


def switching_reference(pipe, first: str, second: str, last_call_of_first: int) -> np.ndarray:
    """diffusers' pipeline conditioned on `first` for steps 0..last_call_of_first, then `second`."""
    embeds = {text: reference.clip_skip_embeddings(pipe, text) for text in (first, second)}
    negative = reference.clip_skip_embeddings(pipe, NEGATIVE)

    def swap(_pipe, step, _timestep, tensors):
        if step == last_call_of_first:
            tensors["prompt_embeds"] = torch.cat([negative, embeds[second]])
        return tensors

    result = pipe(
        prompt_embeds=embeds[first], negative_prompt_embeds=negative, num_inference_steps=STEPS,
        guidance_scale=11.0, width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np", callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )  # fmt: skip
    return result.images[0]


FIRST, SECOND = "masterpiece, 1girl, solo, red hair, smile", "landscape, mountains, lake, night sky, stars"


def test_prompt_editing_switches_conditioning_where_a1111_does(diffusers_pipe, runtime_fp32):
    prompt = f"[{FIRST}:{SECOND}:0.5]"
    assert prompt_schedule(prompt, STEPS) == [(4, FIRST), (8, SECOND)]  # A1111: int(0.5 * 8)
    expected = switching_reference(diffusers_pipe, FIRST, SECOND, last_call_of_first=4)
    got = ours(runtime_fp32, prompt)
    error = worst(got, expected)
    assert error <= 1.0
    # The test can tell the switch step: one step off, or no switch, is farther from our image
    # than diffusers' is (by 10x; measured: ~0.002 levels from diffusers, >= ~0.5 from these).
    others = [switching_reference(diffusers_pipe, FIRST, SECOND, other) for other in (3, 5)]
    others.append(ours(runtime_fp32, FIRST))
    assert min(worst(got, other) for other in others) > 10 * max(error, 0.01), [worst(got, o) for o in others]


def test_alternation_and_negative_editing(diffusers_pipe, runtime_fp32):
    """`[cat|dog]` alternates per call (cat, cat, dog, cat, ... as A1111's lookup gives); checked
    here through the negative prompt too, which can be edited like the prompt."""
    got = ours(runtime_fp32, "masterpiece, cat", negative="[lowres:blurry:0.5]")
    embeds = {t: reference.clip_skip_embeddings(diffusers_pipe, t) for t in ("masterpiece, cat", "lowres", "blurry")}

    def swap(_pipe, step, _timestep, tensors):
        if step == 4:
            tensors["prompt_embeds"] = torch.cat([embeds["blurry"], embeds["masterpiece, cat"]])
        return tensors

    expected = diffusers_pipe(
        prompt_embeds=embeds["masterpiece, cat"], negative_prompt_embeds=embeds["lowres"], num_inference_steps=STEPS,
        guidance_scale=11.0, width=64, height=64, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np", callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images[0]  # fmt: skip
    assert worst(got, expected) <= 1.0


def composable_reference(pipe, parts: list[tuple[str, float]], scale: float = 11.0) -> np.ndarray:
    """diffusers' Euler a loop (as StableDiffusionPipeline runs it) with A1111's AND combination."""
    embeds = [(reference.clip_skip_embeddings(pipe, text), weight) for text, weight in parts]
    return cfg_denoiser_reference(pipe, embeds, reference.clip_skip_embeddings(pipe, NEGATIVE), scale=scale)


def encode_chunks_reference(pipe, chunk_texts: list[str]) -> torch.Tensor:
    """A1111's encoding of a prompt whose 75-token chunks hold these texts (BREAK-separated, no
    emphasis): each chunk through CLIP on its own, joined on the token axis."""
    return torch.cat([reference.clip_skip_embeddings(pipe, text) for text in chunk_texts], dim=1)


def cfg_denoiser_reference(
    pipe, parts: list[tuple[torch.Tensor, float]], uncond: torch.Tensor, scale: float = 11.0, pad: bool = False
) -> np.ndarray:
    """diffusers' Euler a loop with A1111 CFGDenoiser's UNet calls (modules/sd_samplers_cfg_denoiser.py):
    AND parts stacked with shorter ones repeating their last vector (prompt_parser.stack_conds);
    parts and uncond of different lengths as two UNet calls, or with `pad` (pad_cond_uncond) the
    shorter side padded with the empty prompt's states; then combine_denoised."""
    length = max(part.shape[1] for part, _ in parts)
    conds = torch.cat(
        [torch.cat([part, part[:, -1:].repeat(1, length - part.shape[1], 1)], dim=1) for part, _ in parts]
    )
    if pad and uncond.shape[1] != length:
        empty = reference.clip_skip_embeddings(pipe, "")
        if uncond.shape[1] < length:
            uncond = torch.cat([uncond, empty.repeat(1, (length - uncond.shape[1]) // 77, 1)], dim=1)
        else:
            conds = torch.cat([conds, empty.repeat(len(conds), (uncond.shape[1] - length) // 77, 1)], dim=1)
    scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            if uncond.shape[1] == conds.shape[1]:
                context = torch.cat([uncond, conds])
                eps = pipe.unet(model_input.repeat(len(context), 1, 1, 1), t, encoder_hidden_states=context).sample
            else:
                eps = torch.cat([
                    pipe.unet(model_input, t, encoder_hidden_states=uncond).sample,
                    pipe.unet(model_input.repeat(len(conds), 1, 1, 1), t, encoder_hidden_states=conds).sample,
                ])  # fmt: skip
            combined = eps[:1]
            for index, (_, weight) in enumerate(parts, start=1):
                combined = combined + weight * scale * (eps[index : index + 1] - eps[:1])
            latents = scheduler.step(combined, t, latents, generator=generator).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].numpy()


def test_composable_reference_loop_is_diffusers_pipeline(diffusers_pipe):
    loop = composable_reference(diffusers_pipe, [("masterpiece, cat", 1.0)])
    pipeline = reference.generate(diffusers_pipe, "masterpiece, cat", NEGATIVE, "euler_a", [SEED], steps=STEPS, size=64)
    assert worst(loop, pipeline[0]) <= 0.05


def test_and_is_composable_diffusion(diffusers_pipe, runtime_fp32):
    expected = composable_reference(diffusers_pipe, [(FIRST, 1.0), (" " + SECOND, 0.5)])
    got = ours(runtime_fp32, f"{FIRST} AND {SECOND}:0.5")
    error = worst(got, expected)
    assert error <= 1.0
    assert worst(got, ours(runtime_fp32, FIRST)) > 10 * max(error, 0.01)


def test_single_part_weight_is_composable_at_cfg_one(diffusers_pipe, runtime_fp32):
    """`a cat:1.5` is uncond + 1.5 * cfg * (cond - uncond) even at CFG 1 (A1111 always runs the
    uncond), unlike a plain prompt at CFG 1, which skips it as diffusers does."""
    expected = composable_reference(diffusers_pipe, [("a cat", 1.5)], scale=1.0)
    assert worst(ours(runtime_fp32, "a cat:1.5", guidance_scale=1.0), expected) <= 1.0


def test_each_distinct_text_is_encoded_once_in_one_run(runtime_fp32, monkeypatch):
    calls = []
    run = runtime_fp32.sessions.text_encoder.run
    encoder = runtime_fp32.sessions.text_encoder
    monkeypatch.setattr(encoder, "run", lambda feed, *output: calls.append(feed) or run(feed, *output))
    ours(runtime_fp32, "masterpiece, (cat:1.2), [dog]")
    ours(runtime_fp32, "[cat|dog] AND [a:b:3]")
    assert len(calls) == 2  # one text-encoder run per generation
    # plain: prompt + negative; edited: "cat", "dog", " a", " b" and "lowres", one chunk each
    assert [feed[TEXT_INPUT].shape[0] for feed in calls] == [2, 5]


def test_hires_pass_uses_the_hires_timeline(runtime_fp32):
    """A1111: the second pass's schedule is over its own steps, fractions above 1 reaching into
    it and step numbers counting on from the first pass (20 + 10 steps here)."""
    prepared = runtime_fp32.prepare(
        prompt="[a:b:1.5] [c:d:25]", negative_prompt="[x:y:0.5]", num_inference_steps=20, width=64, height=64,
        enable_hr=True, hires_options={"hr_scale": 2, "hr_second_pass_steps": 10, "denoising_strength": 0.5},
    )  # fmt: skip
    first = [(piece.until_step, piece.conds, piece.uncond) for piece in prepared.conditioning]
    assert first == [(11, ("a c",), "x"), (21, ("a c",), "y")]  # 1.5 * 20 caps at 20; 25 is past the pass
    second = [(piece.until_step, piece.conds, piece.uncond) for piece in prepared.hires_conditioning]
    assert second == [(6, ("a c",), "y"), (11, ("b d",), "y")]  # (1.5 - 1) * 10 = 5 and 25 - 20 = 5


def test_prompt_and_negative_of_different_lengths_run_as_two_unet_calls(diffusers_pipe, runtime_fp32):
    """A1111's default: a one-chunk prompt against a two-chunk negative prompt is not padded; the
    cond and the uncond each attend over their own tokens. With pad_conds (A1111's "Pad
    prompt/negative prompt") the prompt is padded with empty chunks and the image changes."""
    negative, negative_chunks = "lowres BREAK blurry", ["lowres", "blurry"]
    uncond = encode_chunks_reference(diffusers_pipe, negative_chunks)
    cond = [(reference.clip_skip_embeddings(diffusers_pipe, FIRST), 1.0)]
    out = runtime_fp32(FIRST, negative_prompt=negative, seed=SEED, num_inference_steps=STEPS, width=64, height=64,
                       output_type="np")  # fmt: skip
    error = worst(out.images[0], cfg_denoiser_reference(diffusers_pipe, cond, uncond))
    assert error <= 1.0 and "Pad conds" not in out.infotexts[0]
    padded = runtime_fp32(FIRST, negative_prompt=negative, seed=SEED, num_inference_steps=STEPS, width=64,
                          height=64, output_type="np", pad_conds=True)  # fmt: skip
    padded_error = worst(padded.images[0], cfg_denoiser_reference(diffusers_pipe, cond, uncond, pad=True))
    assert padded_error <= 1.0 and "Pad conds: True" in padded.infotexts[0]
    assert worst(out.images[0], padded.images[0]) > 10 * max(error, padded_error, 0.01)


def test_and_parts_of_different_lengths_repeat_the_last_vector(diffusers_pipe, runtime_fp32):
    """A1111's stack_conds: the shorter AND part is extended with its last token vector (not with
    empty chunks); the two-chunk parts then meet a one-chunk negative in two UNet calls."""
    parts = [(reference.clip_skip_embeddings(diffusers_pipe, FIRST), 1.0),
             (encode_chunks_reference(diffusers_pipe, ["night sky", "stars"]), 0.5)]  # fmt: skip
    expected = cfg_denoiser_reference(diffusers_pipe, parts, reference.clip_skip_embeddings(diffusers_pipe, NEGATIVE))
    got = ours(runtime_fp32, f"{FIRST} AND night sky BREAK stars:0.5")
    assert worst(got, expected) <= 1.0
