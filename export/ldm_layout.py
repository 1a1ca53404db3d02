"""Key names of the original (LDM / CompVis) single-file layout, from diffusers' names.

diffusers reads single files (LDM layout -> diffusers) but does not write them. The tests and the
benchmark need single files of models they build, so this module maps the other way. It follows
the SD1.x layout: UNet `input_blocks`/`middle_block`/`output_blocks`, VAE `encoder.down`/
`decoder.up` (decoder levels in reverse order), VAE attention as 1x1 convolutions, and the CLIP text
model under `cond_stage_model.transformer.text_model`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
CONTROLNET_PREFIX = "control_model."  # lllyasviel's ControlNet files (ControlNet 1.0 files hold the whole model too)
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_parts(rest: str, parts: Mapping[str, str]) -> str:
    for old, new in parts.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers UNet2DConditionModel key to its LDM name (without the prefix)."""
    per_level = layers_per_block + 1
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = 1 + level * per_level + index
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_parts(rest, _RESNET_PARTS)}"
        return f"input_blocks.{block}.1.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_parts(match[2], _RESNET_PARTS)}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = level * per_level + index
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_parts(rest, _RESNET_PARTS)}"
        return f"output_blocks.{block}.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        level = int(match[1])
        slot = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{slot}.{match[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key to its LDM name (without the prefix)."""
    for old, new in {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        rest = _rename_parts(match[3], {"conv_shortcut": "nin_shortcut"})
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{rest}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{match[1]}.mid.attn_1.{_rename_parts(match[2], _VAE_ATTENTION_PARTS)}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
        return f"encoder.down.{match[1]}.{_vae_block_rest(match[2], 'downsamplers', 'downsample')}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", key):
        level = num_levels - 1 - int(match[1])  # LDM counts decoder levels from the bottom
        return f"decoder.up.{level}.{_vae_block_rest(match[2], 'upsamplers', 'upsample')}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_block_rest(rest: str, sampler: str, ldm_sampler: str) -> str:
    if rest.startswith(f"{sampler}.0."):
        return ldm_sampler + "." + rest[len(sampler) + 3 :]
    if match := re.match(r"resnets\.(\d+)\.(.*)", rest):
        return f"block.{match[1]}.{_rename_parts(match[2], {'conv_shortcut': 'nin_shortcut'})}"
    raise KeyError(f"no LDM name for VAE block key {rest}")


def text_key(key: str) -> str:
    """transformers 4 prefixes CLIPTextModel keys with `text_model.`; transformers 5 does not."""
    return key.removeprefix("text_model.")


def to_ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict:
    """The whole pipeline's weights under LDM single-file names."""
    unet_config = unet.config
    up_with_attention = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}
    state = {}
    for key, value in unet.state_dict().items():
        name = unet_key(key, unet_config.layers_per_block, up_with_attention)
        state[UNET_PREFIX + name] = value
    num_levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = vae_key(key, num_levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state[VAE_PREFIX + name] = value
    for key, value in text_encoder.state_dict().items():
        state[TEXT_PREFIX + text_key(key)] = value
    return {name: tensor.contiguous() for name, tensor in state.items()}


def controlnet_key(key: str, layers_per_block: int, hint_blocks: int) -> str:
    """One diffusers ControlNetModel key to its name in lllyasviel's layout (without the prefix): the
    UNet's encoder half as in unet_key, the zero convolutions `zero_convs.i.0`, the middle block's
    `middle_block_out.0`, and the control image embedding `input_hint_block` (convolutions at even
    positions, SiLUs between them; `hint_blocks` of diffusers' blocks between its first and last)."""
    if match := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{match[1]}.0.{match[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key.removeprefix("controlnet_mid_block.")
    if key.startswith("controlnet_cond_embedding.conv_in."):
        return "input_hint_block.0." + key.removeprefix("controlnet_cond_embedding.conv_in.")
    if match := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return f"input_hint_block.{2 * (hint_blocks + 1)}." + key.removeprefix("controlnet_cond_embedding.conv_out.")
    return unet_key(key, layers_per_block, set())


def to_ldm_controlnet_state_dict(controlnet: torch.nn.Module, prefix: str = CONTROLNET_PREFIX) -> dict:
    """A ControlNetModel's weights as lllyasviel's files hold them (control_v11p_sd15_canny.pth)."""
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    layers = controlnet.config.layers_per_block
    return {
        prefix + controlnet_key(key, layers, hint_blocks): value.contiguous()
        for key, value in controlnet.state_dict().items()
    }
