"""The server's LoRA and embedding endpoints (A1111's shapes), in process: listing, refresh, and
4xx answers for LoRAs that are unknown, malformed or named by a path."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import numpy as np
from addon_files import tiny_lora, write_safetensors
from fastapi.testclient import TestClient

from runtime import Pipeline
from runtime.server.app import create_app
from runtime.server.config import ServerConfig


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    loras, embeddings = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    write_safetensors(
        loras / "tiny.safetensors",
        {
            "lora_unet_conv_in.lora_down.weight": rng.standard_normal((2, 4, 3, 3)) * 0.1,
            "lora_unet_conv_in.lora_up.weight": rng.standard_normal((32, 2, 1, 1)) * 0.1,
            "lora_unet_conv_in.alpha": np.array(1.0),
        },
    )
    (loras / "broken.safetensors").write_bytes(b"\x00" * 8)
    write_safetensors(embeddings / "emb.safetensors", {"emb_params": rng.standard_normal((2, 32))})
    return loras, embeddings


@pytest.fixture(scope="module")
def client(tiny_fp32, folders):
    loras, embeddings = folders
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=loras, embeddings_dir=embeddings)
    app = create_app(pipe, ServerConfig(model=str(tiny_fp32)))
    with TestClient(app, base_url="http://localhost") as test_client:  # a Host the server answers for
        yield test_client


def test_loras_are_listed_by_name_without_absolute_paths(client):
    answer = client.get("/sdapi/v1/loras").json()
    assert [item["name"] for item in answer] == ["broken", "tiny"]
    assert all(not item["path"].startswith("/") for item in answer)


def test_refresh_finds_new_files(client, folders):
    loras, embeddings = folders
    write_safetensors(loras / "later.safetensors", {"lora_unet_conv_in.lora_down.weight": np.zeros((1, 4, 3, 3))})
    write_safetensors(embeddings / "later_emb.safetensors", {"emb_params": np.zeros((1, 32))})
    assert "later" not in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    assert "later" in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert "later_emb" in client.get("/sdapi/v1/embeddings").json()["loaded"]


def test_embeddings_listing_has_a1111_shape(client):
    answer = client.get("/sdapi/v1/embeddings").json()
    assert answer["loaded"]["emb"] == {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2, "reason": None,
    }  # fmt: skip
    assert answer["skipped"] == {}


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:missing:1>", "unknown LoRA 'missing'"),
        ("a <lora:../../etc/passwd:1>", "unknown LoRA"),
        ("a <lora:broken:1>", "not valid JSON"),
        ("a <hypernet:x:1>", "not a supported extra network"),
    ],
)
def test_bad_loras_are_a_422_naming_the_field(client, prompt, message):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "width": 64, "height": 64, "steps": 1})
    assert answer.status_code == 422
    assert message in answer.text


def test_a_lora_request_generates_and_writes_hashes(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:tiny:0.5> emb", "width": 64, "height": 64,
                                                       "steps": 2})  # fmt: skip
    assert answer.status_code == 200, answer.text
    info = answer.json()["info"]
    assert "Lora hashes" in info and "TI hashes" in info


def test_a_lora_added_or_removed_since_the_last_refresh_is_found_without_one(client, folders):
    """A1111 lists the folder again when a prompt names a LoRA it does not know (networks.load_networks);
    a cluster's replicas, which no refresh reaches, rely on it."""
    loras, _ = folders
    tiny_lora(loras / "unlisted.safetensors", seed=3)
    body = {"prompt": "a <lora:unlisted:1>", "width": 64, "height": 64, "steps": 1}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    (loras / "unlisted.safetensors").unlink()
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 422 and "unknown LoRA 'unlisted'" in answer.text
