"""Model upscalers: `--add-upscaler` (spandrel) -> ONNX, compared with spandrel's torch model on the
same files, run as A1111 runs them (BGR, 8 bits, split_grid / combine_grid tiles); hires fix and the
Extras API with them; bad files refused with nothing half-written."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
if importlib.util.find_spec("spandrel") is None:
    pytest.skip("spandrel (the export extra) is not installed", allow_module_level=True)

from export.add_upscaler import AddUpscalerOptions, UpscalerError, add_upscalers, import_spandrel, load_upscaler  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402
from runtime.graphs.model_folder import read_manifest  # noqa: E402
from runtime.graphs.upscalers import UpscalerSessions, upscaler_models  # noqa: E402
from runtime.images import model_upscale  # noqa: E402

ANIME6B, ESRGAN_4X, COMPACT = "R-ESRGAN 4x+ Anime6B", "ESRGAN_4x", "R-ESRGAN AnimeVideo"
LEVEL = 1 / 255


def _new_rrdb_layout(state: dict) -> dict:
    """spandrel's (old ESRGAN) RRDBNet keys -> Real-ESRGAN's (BasicSR) names, as its .pth files hold them."""
    tail = {"0": "conv_first", "3": "conv_up1", "6": "conv_up2", "8": "conv_hr", "10": "conv_last"}
    renamed = {}
    for key, value in state.items():
        block = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        if block:
            renamed[f"body.{block[1]}.rdb{block[2]}.conv{block[3]}.{block[4]}"] = value
        elif key.startswith("model.1.sub."):
            renamed[f"conv_body.{key.rsplit('.', 1)[1]}"] = value
        else:
            index, kind = key.split(".")[1:]
            renamed[f"{tail[index]}.{kind}"] = value
    return renamed


def _rrdb(blocks: int) -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    model = ESRGAN(num_blocks=blocks, num_filters=64, scale=4).eval()
    probe = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(blocks))
    with torch.no_grad():  # random weights give outputs of any scale: bring them to 0.5 +- 0.25
        last = model.model[-1]
        gain = 0.25 / model(probe).std()
        last.weight.mul_(gain)
        last.bias.mul_(gain)
        last.bias.add_(0.5 - model(probe).mean(dim=(0, 2, 3)))
    return model


@pytest.fixture(scope="module")
def upscaler_files(tmp_path_factory) -> dict[str, Path]:
    """Random-weight files in the layouts users download: Real-ESRGAN's Anime6B (.pth, params_ema,
    BasicSR names), KAIR's ESRGAN_4x (23 blocks, old names) and realesr-animevideov3 (SRVGGNetCompact,
    as .safetensors)."""
    import_spandrel()
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    folder = tmp_path_factory.mktemp("upscalers")
    torch.manual_seed(0)
    torch.save({"params_ema": _new_rrdb_layout(_rrdb(6).state_dict())}, folder / "RealESRGAN_x4plus_anime_6B.pth")
    torch.save(_rrdb(23).state_dict(), folder / "ESRGAN_4x.pth")
    compact = Compact(num_conv=4, num_feat=16, upscale=4)
    save_file({k: v.contiguous() for k, v in compact.state_dict().items()}, folder / "realesr-animevideov3.safetensors")
    return {
        ANIME6B: folder / "RealESRGAN_x4plus_anime_6B.pth",
        ESRGAN_4X: folder / "ESRGAN_4x.pth",
        COMPACT: folder / "realesr-animevideov3.safetensors",
    }


@pytest.fixture(scope="module")
def upscaled_export(tiny_fp32, upscaler_files, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("with-upscalers") / "tiny"
    shutil.copytree(tiny_fp32, folder)
    add_upscalers(AddUpscalerOptions([str(path) for path in upscaler_files.values()], folder, allow_pickle=True))
    return folder


@pytest.fixture(scope="module")
def sessions(upscaled_export) -> UpscalerSessions:
    return UpscalerSessions.from_folder(upscaled_export, "cpu")


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _spandrel_a1111(descriptor, tile: Image.Image) -> np.ndarray:
    """A1111's upscale_without_tiling with spandrel's model: BGR in [0, 1], clamp, truncate to 8 bits."""
    bgr = np.asarray(tile)[:, :, ::-1].transpose(2, 0, 1)[None] / 255
    with torch.no_grad():
        out = descriptor(torch.from_numpy(np.ascontiguousarray(bgr)).float())[0]
    return (255.0 * out.clamp(0, 1).numpy().transpose(1, 2, 0)).astype(np.uint8)[:, :, ::-1]


def _spandrel_one_tile(descriptor, image: Image.Image, tile: int = 192) -> np.ndarray:
    """A1111's split_grid on an image smaller than a tile: one tile, black above and to the left."""
    padded = image.crop((image.width - tile, image.height - tile, image.width, image.height))
    out = _spandrel_a1111(descriptor, padded)
    scale = descriptor.scale
    return out[(tile - image.height) * scale :, (tile - image.width) * scale :]


def test_manifest_records_each_upscaler(upscaled_export, upscaler_files):
    models = upscaler_models(read_manifest(upscaled_export))
    assert set(models) == set(upscaler_files)
    anime = models[ANIME6B]
    assert (anime.architecture, anime.scale, anime.tile_size, anime.tile_overlap) == ("ESRGAN", 4, 192, 8)
    assert anime.file == "RealESRGAN_x4plus_anime_6B.pth" and models[COMPACT].architecture == "Compact"
    raw = json.loads((upscaled_export / "manifest.json").read_text())["upscalers"][ESRGAN_4X]
    assert raw["graph"]["validation"]["relative_error"] <= 1e-4
    assert (upscaled_export / "upscalers" / ANIME6B / "model.onnx").is_file()
    assert not [p for p in (upscaled_export / "upscalers").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", [ANIME6B, ESRGAN_4X, COMPACT])
def test_untiled_output_equals_spandrel(sessions, upscaler_files, name):
    descriptor = load_upscaler(str(upscaler_files[name]), allow_pickle=True).descriptor
    image = _image(20, 13, seed=1)
    bgr = np.asarray(image)[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255
    with torch.no_grad():
        expected = descriptor(torch.from_numpy(np.ascontiguousarray(bgr)))[0].numpy()
    ours = sessions.runner(name)(model_upscale.pad_to_requirements(bgr, sessions.models[name]))[0]
    assert ours.shape == expected.shape == (3, 52, 80)
    assert float(((expected > 0) & (expected < 1)).mean()) > 0.05  # not a saturated comparison
    assert np.abs(ours - expected).max() <= LEVEL
    untiled = replace(sessions.models[name], tile_size=0)
    eight_bit = np.asarray(model_upscale.run_tile(sessions.runner(name), untiled, image))
    difference = np.abs(eight_bit.astype(int) - _spandrel_a1111(descriptor, image).astype(int))
    assert difference.max() <= 1


def _edges(size: int, tile: int, overlap: int) -> list[int]:
    starts = model_upscale._starts(size, tile, overlap)
    return sorted({edge for start in starts for edge in (start, start + tile) if 0 < edge < size})


def test_tiled_equals_untiled_away_from_seams(sessions):
    """SRVGGNetCompact with 4 convolutions sees 6 pixels around each output pixel: away from every
    tile edge by more than that, a tile sees what the whole image shows, so A1111's tiled result must
    equal the untiled one there (up to one 8-bit level), whatever the blending does at the seams."""
    model = replace(sessions.models[COMPACT], tile_size=40, tile_overlap=8)
    image = _image(100, 90, seed=2)
    run = sessions.runner(COMPACT)
    tiled = np.asarray(model_upscale.upscale_once(run, model, image)).astype(int)
    untiled = np.asarray(model_upscale.upscale_once(run, replace(model, tile_size=0), image)).astype(int)
    assert tiled.shape == untiled.shape == (360, 400, 3)
    reach = 7
    keep_x = np.ones(100, bool)
    keep_y = np.ones(90, bool)
    for edge in _edges(100, 40, 8):
        keep_x[max(0, edge - reach) : edge + reach] = False
    for edge in _edges(90, 40, 8):
        keep_y[max(0, edge - reach) : edge + reach] = False
    mask = np.repeat(keep_y, 4)[:, None] & np.repeat(keep_x, 4)[None, :]
    assert mask.mean() > 0.2 and len(model_upscale.split_grid(image, 40, 8).rows) == 3
    assert np.abs(tiled - untiled)[mask].max() <= 1


def test_a1111_scale_passes_and_final_size(sessions):
    model = sessions.models[ANIME6B]
    assert model_upscale.pass_sizes(100, 60, 2.0, 4) == ([(400, 240)], (200, 120))
    assert model_upscale.pass_sizes(100, 60, 8.0, 4) == ([(400, 240), (1600, 960)], (800, 480))
    with pytest.raises(InvalidRequestError, match="over the limit"):
        model_upscale.check_upscale(1024, 1024, 2.0, model.info, 1024 * 1024, "upscaling_resize")


def test_hires_fix_decodes_upscales_and_encodes(upscaled_export, upscaler_files):
    from runtime import Pipeline

    pipe = Pipeline.from_pretrained(upscaled_export, provider="cpu")
    out = pipe("a cat", num_inference_steps=2, width=64, height=64, seed=3, enable_hr=True, output_type="np",
               hires_options={"hr_upscaler": ANIME6B, "hr_scale": 2, "denoising_strength": 0.5})  # fmt: skip
    assert out.images[0].shape == (128, 128, 3)
    assert f"Hires upscaler: {ANIME6B}" in out.infotexts[0]
    # The hires pass's start: the first pass decoded, upscaled by spandrel's model as A1111 does (one
    # 192 tile, then Lanczos to 128), encoded again.
    prepared = pipe.prepare(prompt="a cat", num_inference_steps=2, width=64, height=64, seed=3, enable_hr=True,
                            hires_options={"hr_upscaler": "RealESRGAN_x4plus_anime_6B", "hr_scale": 2})  # fmt: skip
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours = pipe._upscale(latents, prepared.hires, "off")
    decoded = Image.fromarray((pipe.decode(latents, "off")[0] * 255).astype(np.uint8))
    descriptor = load_upscaler(str(upscaler_files[ANIME6B]), allow_pickle=True).descriptor
    upscaled = Image.fromarray(_spandrel_one_tile(descriptor, decoded)).resize((128, 128), Image.Resampling.LANCZOS)
    pixels = np.asarray(upscaled, np.float32).transpose(2, 0, 1)[None] / 255 * 2 - 1
    expected = np.split(pipe.encode_pixels(pixels, "off"), 2, axis=1)[0] * pipe.manifest.vae_scaling_factor
    assert np.abs(ours - expected).max() < 0.02


def test_extra_single_image_over_http_equals_spandrel(upscaled_export, upscaler_files):
    from fastapi.testclient import TestClient

    from runtime import Pipeline
    from runtime.server.app import create_app
    from runtime.server.config import ServerConfig

    pipe = Pipeline.from_pretrained(upscaled_export, provider="cpu")
    image = _image(32, 24, seed=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_app(pipe, ServerConfig(model=str(upscaled_export))), base_url="http://localhost") as client:
        listed = client.get("/sdapi/v1/upscalers").json()
        answer = client.post("/sdapi/v1/extra-single-image", json={
            "image": encoded, "upscaler_1": ANIME6B, "upscaling_resize": 4})  # fmt: skip
        items = [{"data": encoded, "name": "a.png"}]
        batch = client.post("/sdapi/v1/extra-batch-images", json={
            "imageList": items, "upscaler_1": "Lanczos", "upscaling_resize": 2})  # fmt: skip
        unknown = client.post("/sdapi/v1/extra-single-image", json={"image": encoded, "upscaler_1": "4x-Nothing"})
        large = io.BytesIO()
        _image(256, 256, seed=7).save(large, format="PNG")
        large_image = base64.b64encode(large.getvalue()).decode()
        too_big = client.post("/sdapi/v1/extra-single-image", json={
            "image": large_image, "upscaler_1": ANIME6B, "upscaling_resize": 8})  # fmt: skip
        realesrgan = client.get("/sdapi/v1/realesrgan-models").json()
    assert {item["name"] for item in listed} >= {"None", "Lanczos", ANIME6B, ESRGAN_4X, COMPACT}
    assert {item["name"] for item in realesrgan} == {ANIME6B, COMPACT}
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["html_info"] == f"<p>Postprocess upscale by: 4.0, Postprocess upscaler: {ANIME6B}</p>"
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")).astype(int)
    descriptor = load_upscaler(str(upscaler_files[ANIME6B]), allow_pickle=True).descriptor
    expected = _spandrel_one_tile(descriptor, image).astype(int)
    assert result.shape == expected.shape == (96, 128, 3)
    assert np.abs(result - expected).max() <= 1
    assert batch.status_code == 200 and len(batch.json()["images"]) == 1
    assert unknown.status_code == 422 and unknown.json()["field"] == "upscaler_1"
    assert too_big.status_code == 422 and "over the limit" in too_big.json()["detail"]


def test_cli_upscale_writes_the_image(upscaled_export, tmp_path):
    from runtime.__main__ import main

    source = tmp_path / "in.png"
    _image(16, 16, seed=6).save(source)
    assert main(["upscale", str(source), "--model", str(upscaled_export), "--upscaler", COMPACT,
                 "--output", str(tmp_path / "out.png"), "--provider", "cpu"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    assert main(["upscale", str(source), "--model", str(upscaled_export), "--upscaler", "nope",
                 "--output", str(tmp_path / "bad.png")]) == 2  # fmt: skip
    assert not (tmp_path / "bad.png").exists()


def test_bad_files_are_one_error_and_change_nothing(upscaled_export, upscaler_files, tiny_source, tmp_path):
    before = (upscaled_export / "manifest.json").read_bytes()
    not_upscaler = tiny_source["single_file"]  # an SD checkpoint: no upscaler layout matches
    with pytest.raises(UpscalerError, match="not an upscaler of any architecture spandrel knows"):
        add_upscalers(AddUpscalerOptions([str(upscaler_files[COMPACT]), str(not_upscaler)], upscaled_export,
                                         overwrite=True))  # fmt: skip
    with pytest.raises(UpscalerError, match="--allow-pickle"):
        add_upscalers(AddUpscalerOptions([str(upscaler_files[ANIME6B])], upscaled_export, name="other"))
    with pytest.raises(UpscalerError, match="already has an upscaler"):
        add_upscalers(AddUpscalerOptions([str(upscaler_files[COMPACT])], upscaled_export))
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UpscalerError, match="not a PyTorch checkpoint"):
        add_upscalers(AddUpscalerOptions([str(garbage)], upscaled_export, allow_pickle=True))
    assert (upscaled_export / "manifest.json").read_bytes() == before
    assert not [p for p in (upscaled_export / "upscalers").iterdir() if p.name.startswith(".")]


def test_export_cli_error_is_one_line(upscaled_export, tmp_path, capsys):
    from export.__main__ import main

    other = tmp_path / "x.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["--add-upscaler", str(other), "--output", str(upscaled_export)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_runtime_upscaling_imports_no_torch():
    code = (
        "import sys\n"
        "for name in ('torch', 'spandrel', 'torchvision'): sys.modules[name] = None\n"
        "import runtime.images.extras, runtime.images.model_upscale, runtime.graphs.upscalers, runtime.upscale_cli\n"
        "import runtime.server.routes\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
