"""k-diffusion's own sampling code (the `k-diffusion` package) as A1111 drives it, for the parity
tests: its CompVisDenoiser over the tiny model's diffusers UNet, A1111's CFGDenoiser (uncond
first as the runtime batches it; the sum is the same), A1111's per-image noise (TorchHijack),
and A1111's schedule-type functions written out from modules/sd_schedulers.py (1.10).

The package's __init__ imports its training code (torchvision, kornia, clip ...), which is not
installed here: `sampling.py` and `external.py` are loaded on their own, with a stand-in
`k_diffusion.utils` that has the one helper they call (`append_dims`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchsde")
pytest.importorskip("scipy")


def _load_kdiffusion() -> tuple[types.ModuleType, types.ModuleType]:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("k-diffusion is not installed (pip install -e .[test])")
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    loaded = []
    for name in ("sampling", "external"):
        full = f"k_diffusion.{name}"
        if full not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            setattr(package, name, module)
            module_spec.loader.exec_module(module)
        loaded.append(sys.modules[full])
    return loaded[0], loaded[1]


sampling, external = _load_kdiffusion()


def ldm_alphas_cumprod(raw_config: dict) -> torch.Tensor:
    """LDM's register_schedule: float64 betas (scaled_linear: a squared float64 ramp), cumprod in
    float64, stored as float32 (what A1111's CompVisDenoiser reads)."""
    start, end, n = raw_config["beta_start"], raw_config["beta_end"], raw_config["num_train_timesteps"]
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


class _Wrapped(torch.nn.Module):
    """What CompVisDenoiser needs of an LDM model: apply_model and alphas_cumprod."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


def compvis_denoiser(unet, raw_config: dict):
    return external.CompVisDenoiser(_Wrapped(unet, ldm_alphas_cumprod(raw_config)), quantize=False)


def cfg_model(denoiser, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
    """A1111's CFGDenoiser for one prompt part: uncond + scale * (cond - uncond), on denoised."""

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        batch = x.shape[0]
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond]))
        return out[:batch] + (out[batch:] - out[:batch]) * scale

    return model


class A1111Noise:
    """A1111's TorchHijack: k-diffusion's torch.randn_like draws from each image's generator."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __getattr__(self, item: str):
        return getattr(torch, item)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators])
