"""`python -m export --target openvino --quantize int8` on the tiny random-weight model: the
manifest says what was quantized and how far each graph is from torch, the int8 UNet against
diffusers' own UNet, the int8 image against our fp32 one, the runtime without NNCF, and what
provider "auto" picks with and without OpenVINO installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
torch = pytest.importorskip("torch")

from conftest import REPO  # noqa: E402
from export.quantize import HYBRID, TOLERANCE, WEIGHTS_ONLY, Calibration  # noqa: E402
from runtime import ModelFolderError, Pipeline  # noqa: E402
from runtime.graphs.model_folder import read_manifest  # noqa: E402

CALIBRATION = Calibration(samples=32, steps=8, size=64)  # the tiny model's own size; seconds, not minutes
# PSNR (8-bit RGB) of the int8 export's image against our fp32 export's image of the same seed:
# measured 28.2 to 28.9 dB on three prompts (64x64, 8 steps, f32 arithmetic). The tiny random
# model is a hard case for int8 (its activations spread far wider than a trained model's).
MIN_PSNR_DB = 25.0
GENERATION = dict(
    negative_prompt="lowres", num_inference_steps=8, guidance_scale=11.0, width=64, height=64, seed=114514,
    output_type="np",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_int8(tiny_source, tmp_path_factory) -> Path:
    from export.exporter import ExportOptions, run_export

    output = tmp_path_factory.mktemp("export") / "tiny-int8"
    options = ExportOptions(
        model=str(tiny_source["diffusers"]), output=output, precision="fp32", target="openvino", quantize="int8",
        calibration=CALIBRATION,
    )  # fmt: skip
    run_export(options)
    return output


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.round(a * 255) - np.round(b * 255)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def without_openvino(work: Path) -> dict[str, str]:
    """An install without the openvino extra: a package of that name that fails to import (as
    tests/test_bench.py does)."""
    stub = work / "no-openvino" / "openvino"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    path = os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_cli(model: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runtime", "--model", str(model), "--prompt", "1girl", "--steps", "1",
               "--width", "64", "--height", "64", "--output", str(out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_manifest_says_what_was_quantized_and_how_far_from_torch(tiny_int8):
    manifest = read_manifest(tiny_int8)
    assert manifest.raw["quantize"] == "int8" and "nncf" in manifest.raw["library_versions"]
    for name, entry in manifest.raw["graphs"].items():
        quantization, validation = entry["quantization"], entry["validation"]
        mode = HYBRID if name == "unet" else WEIGHTS_ONLY
        assert quantization["mode"] == mode and manifest.graphs[name].quantization == mode
        assert quantization["int8_weight_tensors"] > 0
        assert validation["provider"].startswith("OpenVINO") and validation["tolerance"] == TOLERANCE[mode]
        assert 0 < validation["relative_error"] <= TOLERANCE[mode]  # int8 rounds: some error, within the bound
        if mode == HYBRID:
            assert quantization["activation_quantizers"] > 0
            assert quantization["calibration"] == {**asdict(CALIBRATION), "sampler": "Euler a", "cfg": 11.0}
        else:
            assert quantization["activation_quantizers"] == 0


def test_int8_unet_matches_diffusers_within_the_stated_tolerance(tiny_int8, tiny_source):
    """The int8 IR run by OpenVINO against diffusers' own UNet, on inputs the exporter never saw."""
    from diffusers import UNet2DConditionModel

    from runtime.graphs.model_folder import control_residuals

    unet = UNet2DConditionModel.from_pretrained(str(tiny_source["diffusers"] / "unet")).eval()
    generator = torch.Generator().manual_seed(11)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        reference = unet(sample, timestep, encoder_hidden_states=context).sample.numpy()
    compiled = ov.Core().compile_model(
        str(tiny_int8 / "unet" / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    inputs = {
        name: value.numpy()
        for name, value in (("sample", sample), ("timestep", timestep), ("encoder_hidden_states", context))
    }
    # the ControlNet residual inputs, zeros as txt2img without ControlNet feeds them
    for residual in control_residuals(dict(unet.config)):
        inputs[residual.name] = np.zeros(residual.shape(tuple(sample.shape)), np.float32)
    output = compiled(inputs)[0]
    error = np.abs(output - reference).max() / max(1.0, np.abs(reference).max())
    assert error <= TOLERANCE[HYBRID]


def test_int8_image_is_close_to_our_fp32_image(tiny_int8, tiny_fp32, tmp_path):
    reference = Pipeline.from_pretrained(tiny_fp32, provider="cpu")("1girl, cherry blossoms", **GENERATION)
    pipe = Pipeline.from_pretrained(tiny_int8, cache_dir=tmp_path)
    out = pipe("1girl, cherry blossoms", **GENERATION)
    assert psnr(out.images[0], reference.images[0]) >= MIN_PSNR_DB
    assert out.infotexts[0] == reference.infotexts[0]


def test_the_runtime_runs_the_int8_export_without_nncf_or_torch(tiny_int8, tmp_path):
    code = (
        "import sys; from runtime import Pipeline; "
        f"pipe = Pipeline.from_pretrained({str(tiny_int8)!r}, cache_dir={str(tmp_path)!r}); "
        "pipe('1girl', num_inference_steps=1, width=64, height=64); "
        "print(sorted(name for name in ('nncf', 'torch') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_auto_picks_openvino_for_an_ir_export_and_onnxruntime_otherwise(tiny_int8, tiny_fp32, tmp_path):
    int8 = Pipeline.from_pretrained(tiny_int8, cache_dir=tmp_path)
    assert int8.provider == "OpenVINO:CPU"
    assert "UNet int8-hybrid" in int8.provider_choice and "auto: an OpenVINO export" in int8.provider_choice
    onnx = Pipeline.from_pretrained(tiny_fp32)
    assert onnx.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    done = run_cli(tiny_int8, tmp_path / "int8.png")
    assert done.returncode == 0, done.stderr
    assert "running on OpenVINO on CPU" in done.stderr.splitlines()[0]


def test_without_openvino_auto_runs_onnx_exports_and_names_the_fix_for_ir(tiny_int8, tiny_fp32, tmp_path):
    env = without_openvino(tmp_path)
    done = run_cli(tiny_fp32, tmp_path / "onnx.png", env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0].startswith("running on onnxruntime ")
    done = run_cli(tiny_int8, tmp_path / "ir.png", env)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "OpenVINO is not installed: pip install 'acertain-onnx[openvino]'" in done.stderr
    assert not (tmp_path / "ir.png").exists()


def test_a_graph_the_manifest_calls_unquantized_is_refused(tiny_int8, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_int8, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]["unet"]["quantization"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="is int8-hybrid but the manifest says unquantized"):
        Pipeline.from_pretrained(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--quantize int8 needs --target openvino"),
        (["--target", "openvino", "--calibration-samples", "0"], "--calibration-samples and --calibration-steps"),
        (["--target", "openvino", "--calibration-size", "100"], "--calibration-size must be a multiple of 8"),
    ],
)
def test_bad_quantize_options_are_one_line_before_any_work(tiny_source, tmp_path, extra, message):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "export", "--model", str(tiny_source["diffusers"]), "--output", str(out),
               "--quantize", "int8", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert message in done.stderr
    assert not out.exists()
