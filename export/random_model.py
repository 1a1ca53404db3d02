"""Random-weight SD1.x pipelines built from the shipped configs, for tests and benchmarks.

Nothing can be downloaded on the machines this project is tested on, so every test model is made
here: the same architecture as the real checkpoints (tiny or full-size), seeded random weights,
saved in diffusers layout and/or as one LDM-layout `.safetensors` file as A1111 users keep them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from export.ldm_layout import to_ldm_controlnet_state_dict, to_ldm_state_dict
from export.shipped import config_dir, tokenizer_dir

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _perturb_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Default initialisation leaves every norm at weight 1 / bias 0, which would hide a graph
    that drops or reorders an affine parameter; give them distinct values."""
    for child in module.modules():
        if isinstance(child, torch.nn.GroupNorm | torch.nn.LayerNorm) and child.weight is not None:
            child.weight.copy_(1 + 0.1 * torch.randn(child.weight.shape, generator=generator))
            child.bias.copy_(0.1 * torch.randn(child.bias.shape, generator=generator))


@torch.no_grad()
def build_random_pipeline(
    arch: str = "tiny", seed: int = 0, overrides: dict[str, dict] | None = None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of the shipped architecture `arch` with seeded random weights.
    `overrides` changes config keys per component ({"unet": {"block_out_channels": [...]}, "vae":
    ..., "text_encoder": ...}): another model of the same family, one no test has seen."""
    configs = config_dir(arch)
    overrides = overrides or {}
    unknown = set(overrides) - {"unet", "vae", "text_encoder"}
    if unknown:
        raise ValueError(f"overrides for unknown components: {', '.join(sorted(unknown))}")

    def config(component: str, file: str = "config.json") -> dict:
        return {**_read_json(configs / component / file), **overrides.get(component, {})}

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config("unet"))
    vae = AutoencoderKL.from_config(config("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    for module in (unet, vae, text_encoder):
        _perturb_norms(module, generator)
        module.eval()
    scheduler = PNDMScheduler.from_config(_read_json(configs / "scheduler" / "scheduler_config.json"))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir()))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_diffusers_folder(pipe: StableDiffusionPipeline, out: Path, arch: str) -> Path:
    """diffusers layout, with the scheduler and tokenizer files copied as shipped (as a hub
    repository has them) rather than re-serialised."""
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.copy(config_dir(arch) / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tokenizer_dir(), out / "tokenizer")
    return out


def save_single_file(pipe: StableDiffusionPipeline, path: Path) -> Path:
    """One LDM-layout `.safetensors` file, as A1111 users have checkpoints."""
    state = to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def build_and_save(
    arch: str, out_dir: Path, seed: int = 0, single_file: bool = True, overrides: dict[str, dict] | None = None
) -> dict[str, Path]:
    """Build once, save both layouts under out_dir: {'diffusers': folder, 'single_file': file}."""
    log.info("building random-weight %s pipeline (seed %d%s)", arch, seed, ", with overrides" if overrides else "")
    pipe = build_random_pipeline(arch, seed, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"diffusers": save_diffusers_folder(pipe, out_dir / f"{arch}-diffusers", arch)}
    if single_file:
        paths["single_file"] = save_single_file(pipe, out_dir / f"{arch}.safetensors")
    return paths


# The parts of a ControlNet that training starts at zero: its residuals are zero until they learn.
CONTROLNET_ZERO_PARTS = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


@torch.no_grad()
def build_random_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet for `unet` (diffusers' from_unet: the UNet's encoder weights copied). Its
    zero-initialised parts get seeded random values of unit gain, so that its residuals are not
    zero, and every other weight a little noise, so that it is not the UNet's copy."""
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in controlnet.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if name.startswith(CONTROLNET_ZERO_PARTS):
            fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
            parameter.copy_(noise / fan_in**0.5)
        else:
            parameter.add_(0.05 * parameter.abs().mean() * noise)
    return controlnet.eval()


def build_and_save_controlnet(unet_folder: Path, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """A random ControlNet for the diffusers UNet in `unet_folder`, saved as a diffusers folder and as
    one lllyasviel-layout `.safetensors` file (`control_model.` keys, as control_v11p_sd15_canny has):
    {'diffusers': folder, 'single_file': file}."""
    controlnet = build_random_controlnet(UNet2DConditionModel.from_pretrained(str(unet_folder)), seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / "control_tiny-diffusers"
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    single = out_dir / "control_tiny.safetensors"
    save_file(to_ldm_controlnet_state_dict(controlnet), str(single), metadata={"format": "pt"})
    return {"diffusers": folder, "single_file": single}
