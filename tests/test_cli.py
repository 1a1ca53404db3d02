"""`python -m runtime` as a user runs it: a PNG with A1111's parameters text, and for every bad
input one line on stderr, exit code 2, and no file written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from runtime.images.metadata import read_infotext

PROMPT = "masterpiece, best quality, 1girl"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_card_recipe_writes_a_png_with_its_parameters(tiny_fp32, tmp_path):
    out = tmp_path / "out.png"
    result = run_cli(
        "--model", str(tiny_fp32), "--prompt", PROMPT, "--negative-prompt", "lowres",
        "--seed", "114514", "--width", "64", "--height", "64", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{out}  (seed 114514)" in result.stdout
    text = read_infotext(out)
    assert text.startswith(f"{PROMPT}\nNegative prompt: lowres\n")
    assert "Steps: 28, Sampler: Euler a, " in text
    assert "CFG scale: 11, Seed: 114514, Size: 64x64, " in text
    assert "Clip skip: 2" in text
    assert "sampling" in result.stderr  # the tqdm progress bar


def test_batch_writes_one_file_per_seed(tiny_fp32, tmp_path):
    out = tmp_path / "img.png"
    result = run_cli(
        "--model", str(tiny_fp32), "--prompt", PROMPT, "--seed", "7", "--steps", "3",
        "--width", "64", "--height", "64", "--batch-size", "2", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Seed: 7," in read_infotext(tmp_path / "img-0.png")
    assert "Seed: 8," in read_infotext(tmp_path / "img-1.png")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _without_unet(folder: Path, tmp_path: Path) -> Path:
    copy = _copy(folder, tmp_path)
    (copy / "unet" / "model.onnx").unlink()
    return copy


def _future_format(folder: Path, tmp_path: Path) -> Path:
    copy = _copy(folder, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _not_a_model(folder: Path, tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


MODEL_PROBLEMS = {
    "missing folder": (lambda folder, tmp: tmp / "nope", "does not exist"),
    "not an export": (_not_a_model, "manifest.json is missing"),
    "incomplete export": (_without_unet, "incomplete"),
    "unknown manifest format": (_future_format, "format version 99"),
}


@pytest.mark.parametrize("problem", list(MODEL_PROBLEMS))
def test_bad_model_folders(tiny_fp32, tmp_path, problem):
    make, message = MODEL_PROBLEMS[problem]
    out = tmp_path / "out.png"
    result = run_cli("--model", str(make(tiny_fp32, tmp_path)), "--prompt", "x", "--output", str(out))
    assert_clean_refusal(result, message, out)


def test_graph_of_the_wrong_precision(tiny_fp16, tiny_fp32, tmp_path):
    mixed = _copy(tiny_fp16, tmp_path)
    shutil.copy(tiny_fp32 / "unet" / "model.onnx", mixed / "unet" / "model.onnx")
    out = tmp_path / "out.png"
    result = run_cli("--model", str(mixed), "--prompt", "x", "--width", "64", "--height", "64", "--output", str(out))
    assert_clean_refusal(result, "is an fp32 graph but the manifest says fp16", out)


BAD_ARGUMENTS = {
    "width not a multiple of 8": (["--width", "65"], "width: must be a multiple of 8"),
    "height too small": (["--height", "56"], "height: must be a multiple of 8 and at least 64"),
    "zero steps": (["--steps", "0"], "steps: must be at least 1"),
    "negative cfg": (["--cfg-scale", "-1"], "cfg_scale: must not be negative"),
    "unknown sampler": (["--sampler", "warp"], "unknown sampler 'warp'"),
    "unknown schedule": (["--schedule", "weird"], "unknown schedule"),
    "unknown rng": (["--rng", "gpu"], "unknown rng 'gpu'"),
    "seed out of range": (["--seed", str(2**40)], "seed: must be -1"),
    "not a number": (["--steps", "many"], "invalid int value"),
    "unknown provider": (["--provider", "tpu"], "--provider: invalid choice: 'tpu'"),
    "negative lora cache": (["--lora-cache-mb", "-1"], "--lora-cache-mb: -1 must not be negative"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments(tiny_fp32, tmp_path, case):
    extra, message = BAD_ARGUMENTS[case]
    out = tmp_path / "out.png"
    result = run_cli("--model", str(tiny_fp32), "--prompt", "x", "--output", str(out), *extra)
    assert_clean_refusal(result, message, out)


@pytest.mark.parametrize(("name", "message"), [("missing/out.png", "does not exist"), ("out.jpg", "must end in .png")])
def test_output_paths_that_cannot_be_written(tiny_fp32, tmp_path, name, message):
    out = tmp_path / name
    result = run_cli(
        "--model", str(tiny_fp32), "--prompt", "x", "--width", "64", "--height", "64", "--output", str(out)
    )
    assert_clean_refusal(result, message, out)


def assert_clean_refusal(result: subprocess.CompletedProcess, message: str, out: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not out.exists() and not list(out.parent.glob("*.png")) if out.parent.exists() else True


def _image(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Path:
    from PIL import Image

    Image.new(mode, size, 200 if mode == "L" else (40, 120, 200)).save(path)
    return path


def test_hires_and_inpainting_from_the_command_line(tiny_fp32, tmp_path):
    hires = tmp_path / "hires.png"
    result = run_cli(
        "--model", str(tiny_fp32), "--prompt", PROMPT, "--seed", "3", "--steps", "2", "--width", "64",
        "--height", "64", "--hires-scale", "2", "--hires-upscaler", "Latent (nearest)", "--vae-tiling", "on",
        "--output", str(hires),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Hires upscale: 2, Hires upscaler: Latent (nearest)" in read_infotext(hires)
    out = tmp_path / "inpaint.png"
    result = run_cli(
        "--model", str(tiny_fp32), "--prompt", PROMPT, "--steps", "2", "--init-image", str(hires),
        "--strength", "0.6", "--mask", str(_image(tmp_path / "mask.png", (128, 128), "L")), "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Denoising strength: 0.6" in read_infotext(out) and "Mask blur: 4" in read_infotext(out)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--init-image", "{tmp}/broken.png"], "image"),
        (["--init-image", "{tmp}/init.png", "--strength", "1.5"], "strength"),
        (["--init-image", "{tmp}/init.png", "--mask", "{tmp}/small.png"], "mask_image"),
        (["--hires-scale", "2", "--hires-upscaler", "SwinIR"], "hr_upscaler"),
        (["--vae-tiling", "maybe"], "vae_tiling"),
    ],
)
def test_bad_image_options_are_one_line_and_exit_2(tiny_fp32, tmp_path, extra, field):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _image(tmp_path / "init.png")
    _image(tmp_path / "small.png", (32, 32), "L")
    out = tmp_path / "out.png"
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    result = run_cli("--model", str(tiny_fp32), "--prompt", PROMPT, "--steps", "2", *args, "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(f"error: {field}: ")
    assert not out.exists()


def test_loras_and_embeddings_from_the_command_line(tiny_fp32, tmp_path):
    """The CLI checks a request as the server does (one Planner): a LoRA made for another model is
    refused before any graph loads, a fitting one and an embedding run and are recorded."""
    from addon_files import tiny_embedding, tiny_lora, write_safetensors

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    tiny_lora(loras / "style.safetensors", seed=1)
    write_safetensors(  # conv_in of a model with 7 latent channels
        loras / "other.safetensors",
        {
            "lora_unet_conv_in.lora_down.weight": np.zeros((2, 7, 3, 3)),
            "lora_unet_conv_in.lora_up.weight": np.zeros((32, 2, 1, 1)),
        },
    )
    tiny_embedding(embeddings / "badhands.safetensors", seed=2)
    folders = ["--lora-dir", str(loras), "--embeddings-dir", str(embeddings)]
    common = ["--model", str(tiny_fp32), "--steps", "2", "--width", "64", "--height", "64", *folders]
    out = tmp_path / "out.png"
    refused = run_cli(*common, "--prompt", "a cat <lora:other:1>", "--output", str(out))
    assert_clean_refusal(refused, "another architecture", out)
    result = run_cli(
        *common, "--prompt", "a cat <lora:style:0.8>", "--negative-prompt", "badhands", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    text = read_infotext(out)
    assert "Lora hashes: " in text and "style: " in text and "TI hashes: " in text and "badhands: " in text
