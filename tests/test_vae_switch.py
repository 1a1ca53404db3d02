"""Switching among exported VAEs at run time: `python -m export --add-vae` puts a second VAE into
an existing export; the library (`vae=`), the CLI (`--vae`) and the server
(`override_settings.sd_vae`, `GET /sdapi/v1/sd-vae`) select it by name.

Tolerance on pixels in [0, 255], as test_pipeline_parity: fp32 max <= 1 against diffusers'
pipeline built with that VAE, same seed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

import diffusers_reference as reference
from export.add_vae import AddVaeOptions, add_vae
from export.exporter import ExportError
from export.ldm_layout import vae_key
from runtime import Pipeline
from runtime.errors import InvalidRequestError

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"
NAME = "anime.vae.safetensors"
GENERATE = {"negative_prompt": NEGATIVE, "seed": 9, "width": 64, "height": 64, "num_inference_steps": 6}


@pytest.fixture(scope="module")
def other_vae(tiny_source) -> AutoencoderKL:
    base = AutoencoderKL.from_pretrained(str(tiny_source["diffusers"] / "vae"))
    torch.manual_seed(5)
    vae = AutoencoderKL.from_config(base.config)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return vae.eval()


@pytest.fixture(scope="module")
def vae_file(other_vae, tmp_path_factory) -> Path:
    """The VAE as A1111 users keep it: one .safetensors file in LDM key layout."""
    levels = len(other_vae.config.block_out_channels)
    state = {}
    for key, value in other_vae.state_dict().items():
        name = vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        state[name] = value.contiguous()
    path = tmp_path_factory.mktemp("vae") / NAME
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def two_vaes(tiny_fp32, vae_file, tmp_path_factory) -> Path:
    """A copy of the tiny fp32 export with a second VAE added."""
    folder = tmp_path_factory.mktemp("two-vaes") / "tiny"
    shutil.copytree(tiny_fp32, folder)
    add_vae(AddVaeOptions(str(vae_file), folder))
    return folder


@pytest.fixture(scope="module")
def expected(tiny_source, other_vae) -> dict[str, np.ndarray]:
    pipe = reference.load(tiny_source["diffusers"])
    own = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=6)
    pipe.vae = other_vae
    return {"own": own, "other": reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=6)}


def test_added_vae_is_recorded_and_refuses_to_overwrite(two_vaes, vae_file):
    entry = json.loads((two_vaes / "manifest.json").read_text())["vaes"][NAME]
    assert entry["hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]  # A1111's VAE hash
    assert entry["graphs"]["vae_decoder"]["path"] == f"vaes/{NAME}/vae_decoder/model.onnx"
    assert (two_vaes / entry["graphs"]["vae_encoder"]["path"]).is_file()
    assert entry["graphs"]["vae_decoder"]["validation"]["relative_error"] <= entry["graphs"]["vae_decoder"][
        "validation"]["tolerance"]  # fmt: skip
    with pytest.raises(ExportError, match="--overwrite"):
        add_vae(AddVaeOptions(str(vae_file), two_vaes))
    with pytest.raises(ExportError, match="--vae-name"):
        add_vae(AddVaeOptions(str(vae_file), two_vaes, name="../escape"))


def test_switching_vaes_matches_diffusers_with_each_vae(two_vaes, expected, vae_file):
    pipe = Pipeline.from_pretrained(two_vaes, provider="cpu")
    assert np.abs(expected["other"] - expected["own"]).max() * 255 > 5  # the VAE matters
    other = pipe(PROMPT, vae=NAME, output_type="np", **GENERATE)
    assert np.abs(np.stack(other.images) - expected["other"]).max() * 255 <= 1.0
    digest = hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: {NAME}," in other.infotexts[0]
    own = pipe(PROMPT, output_type="np", **GENERATE)  # back to the default
    assert np.abs(np.stack(own.images) - expected["own"]).max() * 255 <= 1.0
    assert "VAE" not in own.infotexts[0].replace("VAE tiling", "")
    started = Pipeline.from_pretrained(two_vaes, provider="cpu", vae=NAME)
    again = started(PROMPT, output_type="np", **GENERATE)
    assert np.array_equal(np.stack(again.images), np.stack(other.images))
    automatic = started(PROMPT, vae="Automatic", output_type="np", **GENERATE)
    assert np.array_equal(np.stack(automatic.images), np.stack(own.images))
    with pytest.raises(InvalidRequestError, match=f"unknown VAE 'nope'; available: Automatic, {NAME}") as error:
        pipe.prepare(prompt=PROMPT, vae="nope")
    assert error.value.field == "vae"


def test_server_lists_and_switches_vaes(two_vaes, vae_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.config import ServerConfig

    pipe = Pipeline.from_pretrained(two_vaes, provider="cpu")
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 9, "width": 64, "height": 64, "steps": 6,
            "sampler_name": "Euler a", "cfg_scale": 11.0,
            "override_settings": {"sd_vae": NAME, "randn_source": "CPU"}}  # fmt: skip
    library = pipe(PROMPT, vae=NAME, schedule="a1111", **GENERATE).images[0]  # the server's "Euler a"
    with TestClient(create_app(pipe, ServerConfig(model=str(two_vaes))), base_url="http://localhost") as client:
        listed = client.get("/sdapi/v1/sd-vae").json()
        assert listed == [{"model_name": NAME, "filename": f"vaes/{NAME}/vae_decoder/model.onnx"}]
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        served = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        difference = np.abs(np.asarray(served.convert("RGB"), np.int16) - np.asarray(library, np.int16))
        assert difference.max() == 0, (difference.max(), (difference > 0).sum())
        info = json.loads(answer.json()["info"])
        assert info["sd_vae_name"] == NAME
        assert info["sd_vae_hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
        bad = client.post(
            "/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "nope", "randn_source": "CPU"}}
        )
        assert bad.status_code == 422
        assert "override_settings.sd_vae" in bad.text and NAME in bad.text


def test_cli_unknown_vae_is_one_line_and_exit_2(two_vaes, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "--model", str(two_vaes), "--prompt", "x", "--vae", "nope",
         "--output", str(tmp_path / "x.png")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and NAME in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_export_cli_add_vae_errors_are_one_line(two_vaes, vae_file, capsys):
    from export.__main__ import main

    assert main(["--add-vae", str(vae_file)]) == 2  # no --output
    assert main(["--vae-name", "x"]) == 2  # --vae-name without --add-vae
    assert main(["--add-vae", str(vae_file), "--output", str(two_vaes)]) == 2  # the name exists
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 3 and "--overwrite" in lines[2]


def outside(vaes: dict) -> dict:
    return {**vaes[NAME]["graphs"]["vae_decoder"], "path": "../outside.onnx"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda vaes: "x", "'vaes' must be an object"),
        (lambda vaes: {NAME: {**vaes[NAME], "graphs": []}}, "not an object with 'graphs'"),
        (lambda vaes: {NAME: {**vaes[NAME], "hash": 5}}, "must be strings"),
        (lambda vaes: {"../x": vaes[NAME]}, "bad name"),
        (lambda vaes: {NAME: {**vaes[NAME], "graphs": {"unet": vaes[NAME]["graphs"]["vae_decoder"]}}}, "vae_decoder"),
        (lambda vaes: {NAME: {**vaes[NAME], "graphs": {"vae_decoder": outside(vaes)}}}, "outside the model folder"),
    ],
)
def test_malformed_vaes_section_is_one_clear_error(two_vaes, tmp_path, change, message):
    from runtime.errors import ModelFolderError
    from runtime.graphs.model_folder import read_manifest

    folder = tmp_path / "copy"
    shutil.copytree(two_vaes, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["vaes"] = change(raw["vaes"])
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match=message):
        read_manifest(folder)
