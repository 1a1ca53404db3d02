"""`python -m export --add-controlnet` on the tiny random-weight model: the ControlNet graph (from a
diffusers folder and from lllyasviel's single-file layout) against diffusers' ControlNetModel, the
UNet graph with residuals against diffusers' UNet2DConditionModel, the runtime's ControlNet and UNet
calls, exports from before ControlNet support, and every refusal."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import REPO, TINY_CONTROLNET  # noqa: E402
from export.add_controlnet import AddControlNetOptions, ControlNetError, add_controlnet  # noqa: E402
from runtime import ModelFolderError  # noqa: E402
from runtime.graphs.controlnets import controlnet_graphs, controlnet_models, load_controlnet  # noqa: E402
from runtime.graphs.model_folder import read_manifest  # noqa: E402
from runtime.graphs.sessions import SessionConfig, load_sessions  # noqa: E402

# max abs difference / max(1, max |reference|), as the exporter measures every graph:
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 3e-2  # fp16 weights (CPU target): 11-bit rounding of every weight


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float32) - reference).max() / max(1.0, np.abs(reference).max()))


def a1111_model_hash(filename: Path) -> str:
    """A1111's modules/sd_models.py model_hash (the "old hash" its ControlNet list shows), copied."""
    with open(filename, "rb") as file:
        m = hashlib.sha256()
        file.seek(0x100000)
        m.update(file.read(0x10000))
        return m.hexdigest()[0:8]


def inputs(seed: int, batch: int = 3, height: int = 10, width: int = 6, tokens: int = 231) -> dict[str, torch.Tensor]:
    """Sizes the export never traced: batch 3, non-square latents, a 3-chunk text."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor([999.0, 500.25, 1.0][:batch]),
        "context": torch.randn(batch, tokens, 32, generator=generator),
        "cond": torch.rand(batch, 3, height * 8, width * 8, generator=generator),
    }


def diffusers_residuals(folder: Path, values: dict[str, torch.Tensor], pooled: bool = False) -> list[np.ndarray]:
    controlnet = diffusers.ControlNetModel.from_pretrained(str(folder), global_pool_conditions=pooled).eval()
    with torch.no_grad():
        down, mid = controlnet(
            values["sample"], values["timestep"], values["context"], values["cond"], return_dict=False
        )
    return [item.numpy() for item in (*down, mid)]


def numpy_inputs(values: dict[str, torch.Tensor]) -> tuple[np.ndarray, ...]:
    return tuple(values[key].numpy() for key in ("sample", "timestep", "context", "cond"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_controlnet_from_single_file_matches_diffusers(request, tiny_controlnet, precision):
    """The runtime's ControlNet call (added from the lllyasviel-layout file) against diffusers'
    ControlNetModel of the same weights: every residual, in the UNet's input order."""
    folder = request.getfixturevalue(f"tiny_{precision}_controlnet")
    manifest = read_manifest(folder)
    sessions = load_sessions(manifest, SessionConfig(provider="cpu"))
    controlnet = load_controlnet(manifest, TINY_CONTROLNET, sessions)
    values = inputs(seed=3)
    ours = controlnet.run(*numpy_inputs(values))
    reference = diffusers_residuals(tiny_controlnet["diffusers"], values)
    assert [item.shape for item in ours] == [item.shape for item in reference]
    assert [item.name for item in sessions.unet.residuals] == list(controlnet.order)
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    for output, expected in zip(ours, reference, strict=True):
        assert np.abs(expected).max() > 0.1  # the random ControlNet's residuals are not zero
        assert relative_error(output, expected) <= tolerance


def test_manifest_lists_the_controlnet(tiny_fp32_controlnet, tiny_controlnet):
    manifest = read_manifest(tiny_fp32_controlnet)
    model = controlnet_models(manifest)[TINY_CONTROLNET]
    source = tiny_controlnet["single_file"]
    assert model.hash == a1111_model_hash(source) and model.title == f"{TINY_CONTROLNET} [{model.hash}]"
    assert not model.global_average_pooling
    entry = manifest.raw["controlnets"][TINY_CONTROLNET]
    assert entry["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert entry["conditioning_channels"] == 3 and entry["file"] == source.name
    assert entry["graph"]["path"] == f"controlnets/{TINY_CONTROLNET}/model.onnx"
    assert entry["graph"]["validation"]["relative_error"] <= FP32_TOLERANCE
    graph = controlnet_graphs(manifest)[TINY_CONTROLNET]
    assert graph == model.graph and graph.path.is_file()
    assert set(graph.outputs) == {item.name for item in load_sessions(manifest, SessionConfig("cpu")).unet.residuals}


def test_unet_with_residuals_matches_diffusers(tiny_source, tiny_fp32_controlnet, tiny_controlnet):
    """The UNet step given our ControlNet graph's residuals, against diffusers' UNet given diffusers'
    ControlNet's (down_block_additional_residuals / mid_block_additional_residual), as diffusers'
    ControlNet pipeline calls them; without residuals the step is the plain UNet."""
    manifest = read_manifest(tiny_fp32_controlnet)
    sessions = load_sessions(manifest, SessionConfig(provider="cpu"))
    values = inputs(seed=4, batch=2, height=8, width=12, tokens=77)
    residuals = load_controlnet(manifest, TINY_CONTROLNET, sessions).run(*numpy_inputs(values))
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(tiny_source["diffusers"] / "unet")).eval()
    reference = [torch.from_numpy(item) for item in diffusers_residuals(tiny_controlnet["diffusers"], values)]
    with torch.no_grad():
        controlled = unet(values["sample"], values["timestep"], values["context"],
                          down_block_additional_residuals=reference[:-1],
                          mid_block_additional_residual=reference[-1]).sample.numpy()  # fmt: skip
        plain = unet(values["sample"], values["timestep"], values["context"]).sample.numpy()
    step = sessions.unet.bind(values["context"].numpy(), tuple(values["sample"].shape))
    sample, timestep = values["sample"].numpy(), values["timestep"].numpy()
    assert relative_error(step(sample, timestep, residuals), controlled) <= FP32_TOLERANCE
    assert relative_error(step(sample, timestep), plain) <= FP32_TOLERANCE
    assert relative_error(controlled, plain) > 100 * FP32_TOLERANCE


def test_controlnet_from_a_diffusers_folder_and_an_unprefixed_pickle(tiny_fp32, tiny_controlnet, tmp_path):
    """Both other source kinds give the same ControlNet: a diffusers folder (default name: the
    folder's) and a .pth without `control_model.` (read weights-only, with --allow-pickle)."""
    from export.ldm_layout import to_ldm_controlnet_state_dict

    folder = shutil.copytree(tiny_fp32, tmp_path / "export")
    add_controlnet(AddControlNetOptions(str(tiny_controlnet["diffusers"]), folder))
    module = diffusers.ControlNetModel.from_pretrained(str(tiny_controlnet["diffusers"]))
    pickle = tmp_path / "control_v11p_sd15_tiny.pth"
    torch.save(to_ldm_controlnet_state_dict(module, prefix=""), pickle)
    with pytest.raises(ControlNetError, match="--allow-pickle"):
        add_controlnet(AddControlNetOptions(str(pickle), folder))
    add_controlnet(AddControlNetOptions(str(pickle), folder, allow_pickle=True))
    manifest = read_manifest(folder)
    assert set(controlnet_models(manifest)) == {"control_tiny-diffusers", "control_v11p_sd15_tiny"}
    sessions = load_sessions(manifest, SessionConfig(provider="cpu"))
    values = inputs(seed=5)
    reference = diffusers_residuals(tiny_controlnet["diffusers"], values)
    for name in controlnet_models(manifest):
        ours = load_controlnet(manifest, name, sessions).run(*numpy_inputs(values))
        assert max(relative_error(a, b) for a, b in zip(ours, reference, strict=True)) <= FP32_TOLERANCE


def test_shuffle_controlnet_pools_as_a1111(tiny_fp32, tiny_controlnet, tmp_path):
    """A file named like the shuffle model gets A1111's global_average_pooling: each residual its
    spatial mean, broadcast to full size (diffusers' global_pool_conditions, added with broadcasting)."""
    folder = shutil.copytree(tiny_fp32, tmp_path / "export")
    shuffle = shutil.copy(tiny_controlnet["single_file"], tmp_path / "control_v11e_sd15_shuffle.safetensors")
    add_controlnet(AddControlNetOptions(str(shuffle), folder))
    manifest = read_manifest(folder)
    model = controlnet_models(manifest)["control_v11e_sd15_shuffle"]
    assert model.global_average_pooling
    values = inputs(seed=6)
    ours = load_controlnet(manifest, model.name, load_sessions(manifest, SessionConfig("cpu"))).run(
        *numpy_inputs(values)
    )
    for output, pooled in zip(ours, diffusers_residuals(tiny_controlnet["diffusers"], values, True), strict=True):
        assert pooled.shape[2:] == (1, 1)
        assert relative_error(output, np.broadcast_to(pooled, output.shape)) <= FP32_TOLERANCE


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_overwrite_is_refused_unless_asked(tiny_fp32_controlnet, tiny_controlnet, tmp_path):
    folder = shutil.copytree(tiny_fp32_controlnet, tmp_path / "export")
    before = _tree(folder)
    with pytest.raises(ControlNetError, match=f"already has a ControlNet named '{TINY_CONTROLNET}'.*--overwrite"):
        add_controlnet(AddControlNetOptions(str(tiny_controlnet["diffusers"]), folder, TINY_CONTROLNET))
    assert _tree(folder) == before
    add_controlnet(AddControlNetOptions(str(tiny_controlnet["diffusers"]), folder, TINY_CONTROLNET, overwrite=True))
    entry = read_manifest(folder).raw["controlnets"][TINY_CONTROLNET]
    assert entry["source"] == str(tiny_controlnet["diffusers"])
    assert not list((folder / "controlnets").glob(".partial-*"))


def _other_controlnet(unet_folder: Path, out: Path, **changes) -> Path:
    """A random ControlNet for a UNet of the tiny config with `changes` (another architecture)."""
    from safetensors.torch import save_file

    from export.ldm_layout import to_ldm_controlnet_state_dict
    from export.random_model import build_random_controlnet

    config = {**diffusers.UNet2DConditionModel.load_config(str(unet_folder)), **changes}
    controlnet = build_random_controlnet(diffusers.UNet2DConditionModel.from_config(config), 2)
    controlnet.save_pretrained(str(out / "folder"))
    save_file(to_ldm_controlnet_state_dict(controlnet), str(out / "file.safetensors"))
    return out


@pytest.mark.parametrize(
    ("changes", "file_message", "folder_message"),
    [
        ({"cross_attention_dim": 64}, "cross-attention width 64; this export's UNet has 32", "cross_attention_dim 64"),
        ({"block_out_channels": [64, 64, 64, 64]}, "64 channels over 4 latent channels", "block_out_channels"),
    ],
)
def test_controlnets_of_other_architectures_are_refused(
    tiny_source, tiny_fp32, tmp_path, changes, file_message, folder_message
):
    sources = _other_controlnet(tiny_source["diffusers"] / "unet", tmp_path, **changes)
    before = _tree(tiny_fp32)
    with pytest.raises(ControlNetError, match=file_message):
        add_controlnet(AddControlNetOptions(str(sources / "file.safetensors"), tiny_fp32))
    with pytest.raises(ControlNetError, match=f"another architecture: {folder_message}"):
        add_controlnet(AddControlNetOptions(str(sources / "folder"), tiny_fp32))
    assert _tree(tiny_fp32) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"control_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "SDXL ControlNet"),
        ({"control_model.lora_controlnet": torch.zeros(1)}, "Control-LoRA"),
        ({"control_model.difference": torch.zeros(1)}, "'difference' ControlNet"),
    ],
)
def test_single_files_that_are_not_plain_sd1_controlnets_are_refused(
    tiny_fp32, tiny_controlnet, tmp_path, extra, message
):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "control.safetensors"
    save_file({**load_file(str(tiny_controlnet["single_file"])), **extra}, str(path))
    with pytest.raises(ControlNetError, match=message):
        add_controlnet(AddControlNetOptions(str(path), tiny_fp32))


def test_files_that_are_no_controlnet_are_refused(tiny_source, tiny_fp32, tmp_path):
    with pytest.raises(ControlNetError, match="not a ControlNet"):
        add_controlnet(AddControlNetOptions(str(tiny_source["single_file"]), tiny_fp32))  # a whole SD checkpoint
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ControlNetError, match=r"not a readable \.safetensors file"):
        add_controlnet(AddControlNetOptions(str(broken), tiny_fp32))
    with pytest.raises(ControlNetError, match="does not exist"):
        add_controlnet(AddControlNetOptions(str(tmp_path / "missing.pth"), tiny_fp32))


def test_cli_refusal_is_one_line_and_exit_code_2(tiny_fp32, tmp_path):
    pickle = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, pickle)
    result = subprocess.run(
        [sys.executable, "-m", "export", "--add-controlnet", str(pickle), "--output", str(tiny_fp32)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--allow-pickle" in result.stderr


def strip_residual_inputs(folder: Path) -> None:
    """Make `folder` an export from before ControlNet support: its UNet graph without residual
    inputs (each becomes a zero constant of broadcastable shape, added as the old graph's skip
    connections were: unchanged), the manifest's entry to match."""
    import onnx
    from onnx import numpy_helper

    from runtime.graphs.model_folder import sha256_of_file

    path = folder / "unet" / "model.onnx"
    model = onnx.load(str(path))
    residuals = [item for item in model.graph.input if "residual" in item.name]
    for item in residuals:
        channels = item.type.tensor_type.shape.dim[1].dim_value
        zeros = np.zeros(
            (1, channels, 1, 1), dtype=onnx.helper.tensor_dtype_to_np_dtype(item.type.tensor_type.elem_type)
        )
        model.graph.initializer.append(numpy_helper.from_array(zeros, item.name))
        model.graph.input.remove(item)
    onnx.save(model, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["graphs"]["unet"]
    entry["inputs"] = [item for item in entry["inputs"] if "residual" not in item["name"]]
    entry["sha256"] = entry["files"]["model.onnx"] = sha256_of_file(path)
    manifest.pop("controlnets", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_exports_from_before_controlnet_support_run_and_refuse_controlnets(
    tiny_fp32_controlnet, tiny_controlnet, tmp_path
):
    from runtime import Pipeline

    folder = shutil.copytree(tiny_fp32_controlnet, tmp_path / "old")
    strip_residual_inputs(folder)
    manifest = read_manifest(folder)
    sessions = load_sessions(manifest, SessionConfig(provider="cpu"))
    assert not sessions.unet.takes_residuals and sessions.unet.residuals == ()
    out = Pipeline.from_pretrained(folder, provider="cpu")("1girl", num_inference_steps=2, width=64, height=64,
                                                           seed=1, output_type="np")  # fmt: skip
    reference = Pipeline.from_pretrained(tiny_fp32_controlnet, provider="cpu")(
        "1girl", num_inference_steps=2, width=64, height=64, seed=1, output_type="np"
    )
    np.testing.assert_allclose(out.images[0], reference.images[0], atol=1e-4)  # zeros in the graph or fed: same image
    step = sessions.unet.bind(np.zeros((1, 77, 32), np.float32), (1, 4, 8, 8))
    with pytest.raises(ModelFolderError, match=r"before ControlNet support.*--add-controlnet"):
        step(np.zeros((1, 4, 8, 8), np.float32), np.ones(1, np.float32), [np.zeros(1)])
    raw = json.loads((folder / "manifest.json").read_text())
    raw["controlnets"] = json.loads((tiny_fp32_controlnet / "manifest.json").read_text())["controlnets"]
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match=r"before ControlNet support.*--add-controlnet"):
        load_controlnet(read_manifest(folder), TINY_CONTROLNET, sessions)
    with pytest.raises(ControlNetError, match=r"before ControlNet support.*--overwrite"):
        add_controlnet(AddControlNetOptions(str(tiny_controlnet["single_file"]), folder, "another"))


def test_verify_checks_the_controlnet_files(tiny_fp32_controlnet, tmp_path):
    from runtime.graphs.model_folder import verify_files

    folder = shutil.copytree(tiny_fp32_controlnet, tmp_path / "export")
    verify_files(read_manifest(folder))
    graph = folder / "controlnets" / TINY_CONTROLNET / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="does not match its sha256"):
        verify_files(read_manifest(folder))
