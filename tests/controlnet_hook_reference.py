"""References for the ControlNet parity tests (tests/test_controlnet.py).

- diffusers: StableDiffusionControlNetPipeline / StableDiffusionControlNetImg2ImgPipeline made from
  the tiny model's pipeline (`from_pipe`), prompts encoded at clip skip 2 as diffusers_reference does,
  one CPU generator per image.
- The ControlNet extension in A1111: the extension's UnetHook.forward and guidance_schedule_handler
  (Mikubill/sd-webui-controlnet v1.1.455, scripts/hook.py, the ControlNet branch: soft injection,
  cfg injection, guidance windows over A1111's state.sampling_step / sampling_steps), written out on
  diffusers' UNet and ControlNetModel (the extension's ControlNet and LDM UNet compute the same
  residuals and sums), under k-diffusion driven as A1111 drives it (kdiffusion_reference): A1111's
  callback_state sets sampling_step to the step k-diffusion reports after each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
)

import diffusers_reference as reference
import kdiffusion_reference as kd

SCHEDULERS = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler}


def hint_tensor(image: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) map as the extension's get_pytorch_control makes it: float / 255, 1 c h w."""
    return torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)[None]


def diffusers_controlnet(
    base,
    controlnets: list,
    images: list[np.ndarray],
    scales: list[float],
    prompt: str,
    negative_prompt: str,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    sampler: str = "euler_a",
    start: list[float] | None = None,
    end: list[float] | None = None,
    init_image: np.ndarray | None = None,
    strength: float = 0.75,
) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] from diffusers' ControlNet pipeline (img2img with init_image)."""
    single = len(controlnets) == 1
    kind = StableDiffusionControlNetPipeline if init_image is None else StableDiffusionControlNetImg2ImgPipeline
    pipe = kind.from_pipe(base, controlnet=controlnets[0] if single else controlnets)
    pipe.scheduler = SCHEDULERS[sampler].from_config(base.scheduler.config)
    count = len(seeds)
    control = [torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)[None] for image in images]
    size = images[0].shape[:2]
    arguments = {
        "prompt_embeds": reference.clip_skip_embeddings(base, prompt).repeat(count, 1, 1),
        "negative_prompt_embeds": reference.clip_skip_embeddings(base, negative_prompt).repeat(count, 1, 1),
        "num_inference_steps": steps, "guidance_scale": guidance_scale, "height": size[0], "width": size[1],
        "controlnet_conditioning_scale": scales[0] if single else scales,
        "control_guidance_start": (start or [0.0] * len(images))[0] if single else (start or [0.0] * len(images)),
        "control_guidance_end": (end or [1.0] * len(images))[0] if single else (end or [1.0] * len(images)),
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds], "output_type": "np",
    }  # fmt: skip
    if init_image is None:
        arguments["image"] = control[0] if single else control
    else:
        arguments.update(image=[_pil(init_image)] * count, control_image=control[0] if single else control,
                         strength=strength)  # fmt: skip
    with torch.no_grad():
        return pipe(**arguments).images.astype(np.float32)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


@dataclass
class ControlParams:
    """The extension's ControlParams, as far as a ControlNet unit uses them."""

    control_model: torch.nn.Module  # diffusers' ControlNetModel
    hint_cond: torch.Tensor  # (1, 3, H, W)
    weight: float
    start_guidance_percent: float
    stop_guidance_percent: float
    soft_injection: bool
    cfg_injection: bool
    guidance_stopped: bool = False


class HookedUNet(torch.nn.Module):
    """UnetHook.forward's ControlNet part around diffusers' UNet. `cond_mark` (rows,) is 1 for the
    rows of conditional prompts (the extension reads it from its prompt marks)."""

    def __init__(self, unet, params: list[ControlParams], state: dict, cond_mark: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.params = params
        self.state = state
        self.cond_mark = cond_mark[:, None, None, None]

    def guidance_schedule_handler(self) -> None:
        """hook.py: run by A1111's cfg_denoiser_callback before each model call."""
        for param in self.params:
            current_sampling_percent = self.state["sampling_step"] / self.state["sampling_steps"]
            param.guidance_stopped = (
                current_sampling_percent < param.start_guidance_percent
                or current_sampling_percent > param.stop_guidance_percent
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        self.guidance_schedule_handler()
        cond_mark = self.cond_mark
        total = None
        for param in self.params:
            if param.guidance_stopped:
                continue
            hint = param.hint_cond.repeat(x.shape[0], 1, 1, 1)
            down, mid = param.control_model(
                x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=hint, return_dict=False
            )
            control = [*down, mid]
            control_scales = [param.weight] * 13
            if param.cfg_injection:
                control = [c * cond_mark for c in control]
            if param.soft_injection:
                control_scales = [param.weight * (0.825 ** float(12 - i)) for i in range(13)]
            control = [c * scale for c, scale in zip(control, control_scales, strict=False)]
            total = control if total is None else [item + target for item, target in zip(control, total, strict=True)]
        residuals = {}
        if total is not None:
            residuals = {"down_block_additional_residuals": total[:-1], "mid_block_additional_residual": total[-1]}
        return SimpleNamespace(sample=self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **residuals).sample)


def a1111_controlnet_image(
    base, raw_config: dict, params: list[ControlParams], prompt: str, negative_prompt: str, seed: int, steps: int,
    guidance_scale: float, size: int, sampler: str, monkeypatch,
) -> np.ndarray:  # fmt: skip
    """One image as A1111 with the extension makes it: k-diffusion's sample_euler / sample_euler_ancestral
    on A1111's plain schedule, CFG on the denoised images, the image generator's noise."""
    state = {"sampling_step": 0, "sampling_steps": steps}  # launch_sampling
    cond_mark = torch.tensor([0.0, 1.0])  # kdiffusion_reference.cfg_model batches uncond, then cond
    hooked = HookedUNet(base.unet, params, state, cond_mark)
    denoiser = kd.compvis_denoiser(hooked, raw_config)
    cond = reference.clip_skip_embeddings(base, prompt)
    uncond = reference.clip_skip_embeddings(base, negative_prompt)
    model = kd.cfg_model(denoiser, cond, uncond, guidance_scale)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 4, size // 8, size // 8), generator=generator)
    monkeypatch.setattr(kd.sampling, "torch", kd.A1111Noise([generator]))
    sigmas = denoiser.get_sigmas(steps)
    function = {"euler": kd.sampling.sample_euler, "euler_a": kd.sampling.sample_euler_ancestral}[sampler]

    def callback_state(d: dict) -> None:  # A1111's KDiffusionSampler.callback_state
        state["sampling_step"] = d["i"]

    with torch.no_grad():
        latents = function(model, noise * sigmas[0], sigmas, disable=True, callback=callback_state)
        image = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
