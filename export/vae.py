"""`--vae`: a separate VAE used instead of the checkpoint's (kl-f8-anime2, the NAI VAE,
vae-ft-mse-840000...), as A1111's "SD VAE" setting swaps it in.

Accepted: a diffusers folder (`config.json` + weights, or a pipeline folder with `vae/`), or an
A1111 single file in LDM key layout (`.safetensors`, or `.vae.pt`/`.ckpt` with --allow-pickle,
weights only), bare or under `first_stage_model.`. The file's weights must fill the checkpoint's
VAE architecture exactly; anything missing or of another shape is named in one line.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from export.ldm_layout import VAE_PREFIX, vae_key
from runtime.errors import UserError
from runtime.graphs.model_folder import sha256_of_file

PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


class VaeError(UserError):
    """The --vae source cannot be used."""


@dataclass(frozen=True)
class VaeSource:
    vae: torch.nn.Module
    name: str  # what A1111 writes as `VAE:` (the file name)
    hash: str  # A1111's `VAE hash`: first 10 hex digits of the file's sha256


def _file_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own types for corrupt files
            raise VaeError(f"--vae {path.name} is not a readable .safetensors file: {error}") from None
    if suffix not in PICKLE_SUFFIXES:
        raise VaeError(f"--vae {path.name}: expected .safetensors, .pt, .ckpt or a diffusers folder")
    if not allow_pickle:
        raise VaeError(f"--vae {path.name} is a pickle; pass --allow-pickle to read its weights only (no code runs)")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise VaeError(f"--vae {path.name} could not be read as a weights-only file ({type(error).__name__})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise VaeError(f"--vae {path.name} holds no state dict")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


# The LDM VAE's encoder half: what a decoder-only file lacks and --no-vae-encoder never exports.
LDM_VAE_ENCODER = ("encoder.", "quant_conv.")


def _from_ldm(
    state: dict[str, torch.Tensor], template: torch.nn.Module, where: str, encoder: bool = True
) -> torch.nn.Module:
    """Fill a VAE of `template`'s architecture from LDM-named weights. Without `encoder` (an export
    made with --no-vae-encoder) a decoder-only file is accepted: the encoder half, which no graph
    will hold, is zeros."""
    from diffusers import AutoencoderKL

    state = {key.removeprefix(VAE_PREFIX): value for key, value in state.items()}
    vae = AutoencoderKL.from_config(template.config)
    levels = len(vae.config.block_out_channels)
    pruned = not encoder and not any(key.startswith(LDM_VAE_ENCODER) for key in state)
    converted = {}
    for key, expected in vae.state_dict().items():
        name = vae_key(key, levels)
        if pruned and name.startswith(LDM_VAE_ENCODER):
            converted[key] = torch.zeros_like(expected)
            continue
        if name not in state:
            hint = "; a decoder-only VAE needs --no-vae-encoder" if name.startswith(LDM_VAE_ENCODER) else ""
            raise VaeError(f"--vae {where} lacks {name} (not an SD1 VAE in LDM layout?{hint})")
        value = state[name]
        if value.ndim == 4 and expected.ndim == 2:
            value = value[:, :, 0, 0]  # LDM's VAE attention is 1x1 convolutions
        if tuple(value.shape) != tuple(expected.shape):
            raise VaeError(f"--vae {where}: {name} is {tuple(value.shape)}, the model needs {tuple(expected.shape)}")
        converted[key] = value.float()
    vae.load_state_dict(converted)
    return vae.eval()


LDM_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def ldm_vae_state(source: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The --vae weights under LDM names (no prefix), from a single file or a diffusers folder."""
    path = Path(source)
    if path.is_dir():
        from diffusers import AutoencoderKL

        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
        levels = len(vae.config.block_out_channels)
        state = {}
        for key, value in vae.state_dict().items():
            name = vae_key(key, levels)
            state[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
        return state
    state = {key.removeprefix(VAE_PREFIX): value for key, value in _file_state(path, allow_pickle).items()}
    return {key: value for key, value in state.items() if key.startswith(LDM_VAE_PARTS)}


@contextmanager
def with_vae_weights(model: str, vae: str | None, allow_pickle: bool) -> Iterator[str]:
    """A `.safetensors` checkpoint without VAE weights (first_stage_model.*) is given the --vae
    weights in a temporary copy, so it converts like a whole checkpoint; anything else is used as is."""
    path = Path(model)
    if vae is None or not path.is_file() or path.suffix.lower() != ".safetensors":
        yield model
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        has_vae = any(key.startswith(VAE_PREFIX) for key in handle.keys())  # noqa: SIM118
    if has_vae:
        yield model
        return
    state = load_file(str(path))
    state.update({VAE_PREFIX + key: value.contiguous() for key, value in ldm_vae_state(vae, allow_pickle).items()})
    with tempfile.TemporaryDirectory(prefix="acertain-vae-") as scratch:
        merged = Path(scratch) / path.name
        save_file(state, str(merged))
        del state
        yield str(merged)


def load_vae(source: str, template: torch.nn.Module, allow_pickle: bool, encoder: bool = True) -> VaeSource:
    """The VAE at `source`, checked against the checkpoint's VAE architecture `template` (`encoder`
    False: its encoder half may be missing, see _from_ldm)."""
    path = Path(source)
    if not path.exists():
        raise VaeError(f"--vae {source} does not exist")
    if path.is_dir():
        from diffusers import AutoencoderKL

        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise VaeError(f"--vae {source} is a folder without a diffusers VAE (config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
        except (OSError, ValueError) as error:
            raise VaeError(f"--vae {source} could not be loaded: {error}") from None
        if vae.config.latent_channels != template.config.latent_channels:
            raise VaeError(f"--vae {source} has {vae.config.latent_channels} latent channels, the model uses "
                           f"{template.config.latent_channels}")  # fmt: skip
        weights = sorted(folder.glob("diffusion_pytorch_model*"))
        return VaeSource(vae, path.name, sha256_of_file(weights[0])[:10] if weights else "")
    vae = _from_ldm(_file_state(path, allow_pickle), template, path.name, encoder)
    return VaeSource(vae, path.name, sha256_of_file(path)[:10])
