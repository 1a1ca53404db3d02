"""provider="openvino" and `python -m export --target openvino` on the tiny random-weight model:
the IR against diffusers' torch modules, the images against our fp32 onnxruntime image, and the
errors a user can run into (bad device, wrong provider for a folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from conftest import REPO  # noqa: E402
from runtime import InvalidRequestError, ModelFolderError, Pipeline  # noqa: E402
from runtime.graphs.model_folder import control_residuals, read_manifest  # noqa: E402

# fp16-compressed weights, f32 arithmetic: the same rounding as the CPU target's fp16 graphs
# (max abs difference / max(1, max |reference|)).
FP16_WEIGHTS_TOLERANCE = 3e-2
# PSNR (8-bit RGB) of an OpenVINO image against our fp32 onnxruntime image of the same seed:
# fp16 weights move pixels by a level or two at most (measured 61.7 dB, 128x128, 28 steps).
MIN_PSNR_DB = 40.0
GENERATION = dict(
    negative_prompt="lowres", num_inference_steps=8, guidance_scale=11.0, width=64, height=64, seed=114514,
    output_type="np",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_openvino(tiny_source, tmp_path_factory) -> Path:
    from export.exporter import ExportOptions, run_export

    output = tmp_path_factory.mktemp("export") / "tiny-openvino"
    run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=output, precision="fp16", target="openvino"))
    return output


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.round(a * 255) - np.round(b * 255)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_export_writes_validated_ir(tiny_openvino):
    manifest = read_manifest(tiny_openvino)
    assert manifest.raw["target"] == "openvino" and "openvino" in manifest.raw["library_versions"]
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        entry = manifest.raw["graphs"][name]
        assert entry["path"] == f"{name}/openvino_model.xml"
        assert set(entry["files"]) == {"openvino_model.xml", "openvino_model.bin"}
        assert entry["validation"]["provider"].startswith("OpenVINO")
        assert entry["validation"]["relative_error"] <= FP16_WEIGHTS_TOLERANCE
        assert not list((tiny_openvino / name).glob("*.onnx"))


def test_unet_ir_matches_diffusers(tiny_openvino, tiny_source):
    """The IR run by OpenVINO against diffusers' own UNet, on inputs the exporter never saw."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_source["diffusers"] / "unet")).eval()
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(2, unet.config.in_channels, 12, 10, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([999.0, 999.0])
    with torch.no_grad():
        reference = unet(sample, timestep, encoder_hidden_states=context).sample.numpy()
    # f32 inference, as export validates: this checks the IR; bf16 (OpenVINO's default on CPUs
    # with AMX) is a runtime choice that the image tests below cover.
    compiled = ov.Core().compile_model(
        str(tiny_openvino / "unet" / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    zeros = {item.name: np.zeros(item.shape(sample.shape), np.float32) for item in control_residuals(unet.config)}
    output = compiled({**{name: value.numpy() for name, value in inputs.items()}, **zeros})
    error = np.abs(output[0] - reference).max() / max(1.0, np.abs(reference).max())
    assert error <= FP16_WEIGHTS_TOLERANCE


@pytest.mark.parametrize("precision", ["auto", "f32"])
def test_openvino_image_is_close_to_our_fp32_image(tiny_openvino, tiny_fp32, tmp_path, precision):
    reference = Pipeline.from_pretrained(tiny_fp32, provider="cpu")("1girl, cherry blossoms", **GENERATION)
    pipe = Pipeline.from_pretrained(
        tiny_openvino, provider="openvino", inference_precision=precision, cache_dir=tmp_path
    )
    assert pipe.provider == "OpenVINO:CPU"
    out = pipe("1girl, cherry blossoms", **GENERATION)
    assert out.images[0].shape == reference.images[0].shape
    assert psnr(out.images[0], reference.images[0]) >= MIN_PSNR_DB
    assert out.infotexts[0] == reference.infotexts[0]  # same parameters, same seed: same infotext


def test_model_cache_is_written_and_reused(tiny_openvino, tmp_path):
    first = Pipeline.from_pretrained(tiny_openvino, provider="openvino", cache_dir=tmp_path)
    blobs = sorted((tmp_path / "openvino").glob("*.blob"))
    assert len(blobs) == 4  # text encoder, UNet, VAE decoder, VAE encoder
    again = Pipeline.from_pretrained(tiny_openvino, provider="openvino", cache_dir=tmp_path)
    assert sorted((tmp_path / "openvino").glob("*.blob")) == blobs
    ids = {"input_ids": np.full((1, 77), 49407, dtype=np.int64)}
    np.testing.assert_allclose(again.sessions.text_encoder.run(ids), first.sessions.text_encoder.run(ids), atol=1e-5)


def test_auto_provider_runs_an_openvino_export(tiny_openvino, tmp_path):
    assert Pipeline.from_pretrained(tiny_openvino, cache_dir=tmp_path).provider == "OpenVINO:CPU"


def test_bad_device_and_precision_are_one_clear_error(tiny_openvino):
    with pytest.raises(InvalidRequestError, match=r"no device 'XPU'.*available: CPU") as error:
        Pipeline.from_pretrained(tiny_openvino, provider="openvino", device="XPU")
    assert error.value.field == "device"
    with pytest.raises(InvalidRequestError) as error:
        Pipeline.from_pretrained(tiny_openvino, provider="openvino", inference_precision="int4")
    assert error.value.field == "inference_precision"
    done = subprocess.run(
        [sys.executable, "-m", "runtime", "--model", str(tiny_openvino), "--prompt", "x", "--provider", "openvino",
         "--device", "XPU", "--width", "64", "--height", "64", "--steps", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: device") and "Traceback" not in done.stderr


def test_providers_refuse_folders_of_the_other_target(tiny_openvino, tiny_fp32):
    with pytest.raises(ModelFolderError, match="use provider 'openvino'"):
        Pipeline.from_pretrained(tiny_openvino, provider="cpu")
    with pytest.raises(ModelFolderError, match="re-export it with --target openvino"):
        Pipeline.from_pretrained(tiny_fp32, provider="openvino")


def test_controlnet_ir_and_the_unet_with_its_residuals_match_diffusers(
    tiny_openvino, tiny_source, tiny_controlnet, tmp_path
):
    """--add-controlnet into an OpenVINO export writes IR; the runtime's OpenVINO ControlNet call
    and the UNet step given its residuals against diffusers' ControlNetModel and UNet (f32 inference,
    as the export validates)."""
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    from conftest import TINY_CONTROLNET
    from export.add_controlnet import AddControlNetOptions, add_controlnet
    from runtime.graphs.controlnets import load_controlnet
    from runtime.graphs.sessions import SessionConfig, load_sessions

    folder = shutil.copytree(tiny_openvino, tmp_path / "export")
    add_controlnet(AddControlNetOptions(str(tiny_controlnet["single_file"]), folder, TINY_CONTROLNET))
    manifest = read_manifest(folder)
    entry = manifest.raw["controlnets"][TINY_CONTROLNET]["graph"]
    assert entry["path"] == f"controlnets/{TINY_CONTROLNET}/openvino_model.xml"
    assert entry["validation"]["provider"].startswith("OpenVINO")
    config = SessionConfig(provider="openvino", inference_precision="f32", cache_dir=tmp_path / "cache")
    sessions = load_sessions(manifest, config)
    generator = torch.Generator().manual_seed(8)
    sample, timestep = torch.randn(2, 4, 8, 6, generator=generator), torch.tensor([700.0, 700.0])
    context, cond = torch.randn(2, 77, 32, generator=generator), torch.rand(2, 3, 64, 48, generator=generator)
    ours = load_controlnet(manifest, TINY_CONTROLNET, sessions).run(
        sample.numpy(), timestep.numpy(), context.numpy(), cond.numpy()
    )
    controlnet = ControlNetModel.from_pretrained(str(tiny_controlnet["diffusers"])).eval()
    unet = UNet2DConditionModel.from_pretrained(str(tiny_source["diffusers"] / "unet")).eval()
    with torch.no_grad():
        down, mid = controlnet(sample, timestep, context, cond, return_dict=False)
        noise = unet(sample, timestep, context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample.numpy()  # fmt: skip
    for output, reference in zip(ours, [*down, mid], strict=True):
        reference = reference.numpy()
        assert np.abs(output - reference).max() / max(1.0, np.abs(reference).max()) <= FP16_WEIGHTS_TOLERANCE
    step = sessions.unet.bind(context.numpy(), tuple(sample.shape))
    output = step(sample.numpy(), timestep.numpy(), ours)
    assert np.abs(output - noise).max() / max(1.0, np.abs(noise).max()) <= FP16_WEIGHTS_TOLERANCE
