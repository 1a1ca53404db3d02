"""Shared fixtures: the tiny random-weight SD1.x model (both layouts) and its exports, built once
per test session. Nothing is downloaded; the hub is kept offline for every test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SCHEDULER_CONFIG = REPO / "models" / "sd15" / "scheduler" / "scheduler_config.json"


@pytest.fixture(scope="session")
def raw_config() -> dict:
    """The shipped SD1.x scheduler_config.json as diffusers would read it."""
    return json.loads(SHIPPED_SCHEDULER_CONFIG.read_text())


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> dict[str, Path]:
    """{'diffusers': folder, 'single_file': LDM .safetensors} of the tiny model, seed 0."""
    pytest.importorskip("torch")
    from export.random_model import build_and_save

    return build_and_save("tiny", tmp_path_factory.mktemp("tiny-source"), seed=0)


def _export(source: Path, output: Path, precision: str) -> Path:
    from export.exporter import ExportOptions, run_export

    run_export(ExportOptions(model=str(source), output=output, precision=precision))
    return output


@pytest.fixture(scope="session")
def tiny_fp32(tiny_source, tmp_path_factory) -> Path:
    return _export(tiny_source["diffusers"], tmp_path_factory.mktemp("export") / "tiny-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_fp16(tiny_source, tmp_path_factory) -> Path:
    return _export(tiny_source["single_file"], tmp_path_factory.mktemp("export") / "tiny-fp16", "fp16")


TINY_CONTROLNET = "control_tiny"  # the name the tiny ControlNet is added under in the *_controlnet exports


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_source, tmp_path_factory) -> dict[str, Path]:
    """A random-weight ControlNet for the tiny model, seed 1, with nonzero residuals: {'diffusers':
    ControlNetModel folder, 'single_file': lllyasviel-layout .safetensors (`control_model.` keys)}."""
    pytest.importorskip("torch")
    from export.random_model import build_and_save_controlnet

    return build_and_save_controlnet(tiny_source["diffusers"] / "unet", tmp_path_factory.mktemp("tiny-controlnet"), 1)


def _with_controlnet(export: Path, source: Path, output: Path) -> Path:
    import shutil

    from export.add_controlnet import AddControlNetOptions, add_controlnet

    shutil.copytree(export, output)
    add_controlnet(AddControlNetOptions(str(source), output, TINY_CONTROLNET))
    return output


@pytest.fixture(scope="session")
def tiny_fp32_controlnet(tiny_fp32, tiny_controlnet, tmp_path_factory) -> Path:
    """A copy of tiny_fp32 with the tiny ControlNet added from its single file as TINY_CONTROLNET."""
    output = tmp_path_factory.mktemp("export") / "tiny-fp32-controlnet"
    return _with_controlnet(tiny_fp32, tiny_controlnet["single_file"], output)


@pytest.fixture(scope="session")
def tiny_fp16_controlnet(tiny_fp16, tiny_controlnet, tmp_path_factory) -> Path:
    """A copy of tiny_fp16 with the tiny ControlNet added from its single file as TINY_CONTROLNET."""
    output = tmp_path_factory.mktemp("export") / "tiny-fp16-controlnet"
    return _with_controlnet(tiny_fp16, tiny_controlnet["single_file"], output)
