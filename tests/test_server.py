"""The A1111-compatible server (`python -m runtime.server`), driven over HTTP on loopback.

Real server processes serve the tiny exported model with torch, transformers and diffusers made
unimportable in them, so these tests also show that serving needs none of the torch stack.
Two servers run for the whole module: `main` (HTTP Basic auth, room for long jobs, a queue of one)
and `tight` (no auth, small limits, so fuzzed and bursty requests stay cheap).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from runtime.errors import InvalidRequestError, OutOfMemoryError  # noqa: E402
from runtime.images.metadata import read_infotext  # noqa: E402
from runtime.pipeline import GenerationRequest, PipelineOutput, Prepared  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCH_STACK = ("torch", "transformers", "diffusers", "optimum")
# Start the server with the torch stack blocked: `import torch` anywhere in it raises ImportError.
LAUNCHER = (
    "import runpy, sys\n"
    f"for name in {TORCH_STACK!r}: sys.modules[name] = None\n"
    "runpy.run_module('runtime.server', run_name='__main__', alter_sys=True)\n"
)
AUTH = ("tester", "s3cret:with-colon")
CLEAN_ENV = {name: value for name, value in os.environ.items() if name != "ACERTAIN_API_AUTH"}
SMALL = {"width": 64, "height": 64}
RECIPE = {
    "prompt": "masterpiece, best quality, 1girl, (cat ears:1.2)",
    "negative_prompt": "lowres, bad anatomy",
    "steps": 28,
    "sampler_name": "Euler a",
    "cfg_scale": 11,
    "seed": 114514,
    "batch_size": 2,
    **SMALL,
    "override_settings": {"CLIP_stop_at_last_layers": 2},
}
# About 5 s per batch here; every test that starts it interrupts it within a few seconds.
LONG_JOB = {"prompt": "a long job", "steps": 1000, "sampler_name": "Euler", "n_iter": 4, **SMALL}
ANSWERS_WITHOUT_BUGS = {200, 400, 413, 422, 429, 503}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, auth: tuple[str, str] | None = None, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=auth, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(server: Server, auth: tuple[str, str] | None, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", auth=auth, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not healthy after {seconds} s:\n{server.log.read_text()}")


@pytest.fixture(scope="module")
def start_server(tiny_fp32: Path, tmp_path_factory) -> Iterator:
    started: list[Server] = []

    def start(*args: str, auth: tuple[str, str] | None = None) -> Server:
        port = _free_port()
        log = tmp_path_factory.mktemp("server") / "server.log"
        command = [sys.executable, "-c", LAUNCHER, "--model", str(tiny_fp32), "--port", str(port)]
        command += ["--provider", "cpu", "--threads", "1", *args]
        with open(log, "wb") as sink:
            process = subprocess.Popen(command, cwd=REPO, env=CLEAN_ENV, stdout=sink, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", process, log)
        started.append(server)
        _wait_healthy(server, auth)
        return server

    yield start
    for server in started:
        server.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def main(start_server) -> Server:
    return start_server(
        "--api-auth", f"{AUTH[0]}:{AUTH[1]}", "--queue-size", "1", "--max-steps", "1000", auth=AUTH
    )  # fmt: skip


@pytest.fixture(scope="module")
def tight(start_server) -> Server:
    return start_server(
        "--queue-size", "2", "--max-steps", "8", "--max-pixels", "16384", "--max-batch", "2", "--max-images", "4",
        "--max-body-bytes", "65536",
    )  # fmt: skip


def decode_png(data: str) -> tuple[np.ndarray, str | None]:
    raw = base64.b64decode(data)
    with Image.open(io.BytesIO(raw)) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    return pixels, read_infotext(raw)


def post(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/sdapi/v1/txt2img", json=body)


# -- the server process and its package -----------------------------------------------------------


def test_server_package_never_imports_the_torch_stack() -> None:
    code = (
        "import sys, runtime.server.app, runtime.server.__main__\n"
        f"loaded = [m for m in {TORCH_STACK!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", ".", "--api-auth", "nopassword"], "--api-auth"),
        (["--model", ".", "--max-steps", "0"], "must be at least 1"),
        (["--model", ".", "--lora-cache-mb", "-1"], "--lora-cache-mb: -1 must not be negative"),
    ],
)
def test_cli_refuses_bad_arguments_in_one_line(args: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "runtime.server", *args],
        cwd=REPO,
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1


# -- the recipe: same pixels as the library ---------------------------------------------------------


def test_recipe_request_matches_the_library(main: Server, tiny_fp32: Path) -> None:
    from runtime import Pipeline

    with main.client(AUTH) as client:
        answer = post(client, RECIPE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert info["seed"] == 114514 and info["all_seeds"] == [114514, 114515]
    assert info["sampler_name"] == "Euler a" and info["clip_skip"] == 2 and info["steps"] == 28
    assert body["parameters"]["cfg_scale"] == 11 and body["parameters"]["steps"] == 28
    assert len(body["images"]) == 2 and len(info["infotexts"]) == 2

    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", threads=1)
    expected = pipe(
        RECIPE["prompt"], RECIPE["negative_prompt"], num_inference_steps=28, guidance_scale=11.0, width=64, height=64,
        seed=114514, num_images_per_prompt=2, sampler="euler_a", schedule="a1111", rng="nv",
    )  # fmt: skip
    assert expected.seeds == [114514, 114515]
    for data, image, infotext in zip(body["images"], expected.images, expected.infotexts, strict=True):
        pixels, parameters = decode_png(data)
        assert pixels.shape == (64, 64, 3)
        np.testing.assert_array_equal(pixels, np.asarray(image))
        assert parameters == infotext
    assert info["infotexts"] == expected.infotexts
    assert "Seed: 114515" in info["infotexts"][1]


# -- the other endpoints --------------------------------------------------------------------------


def test_listing_endpoints_answer_a1111_shapes(main: Server) -> None:
    with main.client(AUTH) as client:
        models = client.get("/sdapi/v1/sd-models").json()
        samplers = client.get("/sdapi/v1/samplers").json()
        schedulers = client.get("/sdapi/v1/schedulers").json()
        options = client.get("/sdapi/v1/options").json()
        health = client.get("/health").json()
        progress = client.get("/sdapi/v1/progress").json()
        schema = client.get("/openapi.json").json()
    assert models[0]["model_name"] == "tiny-diffusers" and {"title", "hash", "filename"} <= set(models[0])
    assert [s["name"] for s in samplers] == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS",
        "UniPC", "LCM",
    ]  # fmt: skip  # A1111 1.10's samplers_k_diffusion, samplers_timesteps, samplers_lcm in its order
    assert samplers[14]["options"] == {"scheduler": "karras", "second_order": True}  # Restart
    assert "k_euler_a" in samplers[6]["aliases"] and samplers[0]["options"] == {"scheduler": "karras"}
    assert samplers[3]["options"] == {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}
    assert [s["label"] for s in schedulers][:12] == [
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
        "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
    ]  # fmt: skip
    assert schedulers[5]["aliases"] == ["SGMUniform"] and schedulers[4]["default_rho"] == 1.0
    assert options["CLIP_stop_at_last_layers"] == 2 and options["sd_model_checkpoint"] == models[0]["title"]
    assert health["status"] == "ok" and health["provider"] == "CPUExecutionProvider"
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/health"} <= set(schema["paths"])


@pytest.mark.parametrize(
    ("extra", "sampler", "schedule_type"),
    [
        ({"sampler_name": "Euler a"}, "Euler a", None),
        ({"sampler_name": "k_euler"}, "Euler", None),
        ({"sampler_name": "DPM++ 2M"}, "DPM++ 2M", "Karras"),  # A1111 1.9+: Automatic means Karras here
        ({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"}, "DPM++ 2M", None),
        ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),
        ({"sampler_name": "euler a", "scheduler": "karras"}, "Euler a", "Karras"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "DDIM", None),  # A1111's DDIM ignores it
        ({"sampler_name": "DPM2 a"}, "DPM2 a", "Karras"),
        ({"sampler_name": "Heun", "scheduler": "beta"}, "Heun", "Beta"),
        ({"sampler_name": "DPM++ 2M SDE", "scheduler": "karras"}, "DPM++ 2M SDE", "Karras"),
        ({"sampler_name": "DPM++ 2M SDE"}, "DPM++ 2M SDE", "Exponential"),  # A1111 1.10's Automatic
        ({"sampler_name": "DPM++ SDE Karras"}, "DPM++ SDE", "Karras"),
        ({"sampler_name": "k_dpmpp_2m_sde_heun"}, "DPM++ 2M SDE Heun", "Exponential"),
        ({"sampler_name": "DPM++ 3M SDE", "scheduler": "Uniform"}, "DPM++ 3M SDE", None),
        ({}, "Euler", None),  # A1111's default sampler
        ({"sampler_name": None, "seed": None, "prompt": None}, "Euler", None),  # null = omitted
    ],
)
def test_samplers_and_schedulers_map_like_a1111(tight: Server, extra: dict, sampler: str, schedule_type) -> None:
    with tight.client() as client:
        answer = post(client, {"steps": 4, **SMALL, **extra})
    assert answer.status_code == 200, answer.text
    infotext = json.loads(answer.json()["info"])["infotexts"][0]
    assert f"Sampler: {sampler}," in infotext
    assert (f"Schedule type: {schedule_type}" in infotext) if schedule_type else "Schedule type" not in infotext


def test_n_iter_continues_the_seeds_and_rng_source_maps(tight: Server) -> None:
    request = {"steps": 2, **SMALL, "seed": 7, "batch_size": 2, "n_iter": 2, "override_settings": {}}
    with tight.client() as client:
        gpu = post(client, {**request, "override_settings": {"randn_source": "GPU"}}).json()
        nv = post(client, {**request, "override_settings": {"randn_source": "NV"}}).json()
        cpu = post(client, {**request, "override_settings": {"randn_source": "CPU"}}).json()
        random_seed = post(client, {"steps": 1, **SMALL, "seed": -1, "send_images": False}).json()
    info = json.loads(gpu["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and len(gpu["images"]) == 4
    assert [decode_png(i)[0].tobytes() for i in gpu["images"]] == [decode_png(i)[0].tobytes() for i in nv["images"]]
    assert decode_png(gpu["images"][0])[0].tobytes() != decode_png(cpu["images"][0])[0].tobytes()
    assert "RNG: CPU" in json.loads(cpu["info"])["infotexts"][0]
    assert random_seed["images"] == [] and 0 <= json.loads(random_seed["info"])["seed"] <= 4294967294


# -- bad input: 4xx naming the field --------------------------------------------------------------

VALID = {"steps": 4, **SMALL}
BAD_BODIES = [
    ({"steps": "4"}, 422, "steps"),
    ({"steps": True}, 422, "steps"),
    ({"steps": 4.0}, 422, "steps"),
    ({"prompt": 5}, 422, "prompt"),
    ({"width": 65}, 422, "width"),
    ({"height": 100}, 422, "height"),
    ({"width": 0}, 422, "width"),
    ({"width": 256, "height": 256}, 422, "width"),  # over --max-pixels
    ({"steps": 9}, 422, "steps"),  # over --max-steps
    ({"steps": 0}, 422, "steps"),
    ({"batch_size": 3}, 422, "batch_size"),  # over --max-batch
    ({"batch_size": 2, "n_iter": 3}, 422, "n_iter"),  # over --max-images
    ({"cfg_scale": -1}, 422, "cfg_scale"),
    ({"cfg_scale": "high"}, 422, "cfg_scale"),
    ({"sampler_name": "Warp 9"}, 422, "sampler_name"),
    ({"sampler_name": "DPM++ 4M"}, 422, "sampler_name"),  # not an A1111 sampler
    ({"sampler_name": 3}, 422, "sampler_name"),
    ({"scheduler": "Sideways"}, 422, "scheduler"),
    ({"seed": -2}, 422, "seed"),
    ({"seed": 2**32}, 422, "seed"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 3}}, 422, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"randn_source": "TPU"}}, 422, "override_settings.randn_source"),
    ({"override_settings": {"sd_model_checkpoint": "other-model"}}, 422, "override_settings.sd_model_checkpoint"),
    ({"override_settings": []}, 422, "override_settings"),
    ({"enable_hr": True, "hr_scale": 4}, 422, "hr_scale"),  # 256x256 hires output: over the pixel limit
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, 422, "alwayson_scripts.ADetailer"),
    ({"eta": -0.5, "sampler_name": "Euler a"}, 422, "eta"),
    ({"eta": 1.5, "sampler_name": "DDIM"}, 422, "eta"),  # DDIM's noise term has no real root above 1
    ({"s_noise": -1}, 422, "s_noise"),
    ({"override_settings": {"s_churn": -1}}, 422, "override_settings.s_churn"),
    ({"prompt": "word " * 3000}, 422, "prompt"),  # 40 chunks of 75 tokens: over the chunk limit
    ({"prompt": "[cat:" + "word " * 3000 + ":0.5]"}, 422, "prompt"),  # the edited-in text is over it
    ({"negative_prompt": "[a|" + "word " * 3000 + "]"}, 422, "negative_prompt"),
    ({"prompt": "a AND b:" + "9" * 400}, 422, "prompt"),  # an AND weight of inf
    ({"prompt": " AND ".join("x" * 17)}, 422, "prompt"),  # more AND parts than MAX_AND_PARTS
    ({"prompt": "[(a:" + "9" * 400 + "):b:2]"}, 422, "prompt"),  # weights are checked in every edited text
]


def test_sampler_parameters_are_a1111s(tight: Server) -> None:
    """webuiapi sends eta 1, s_churn 0, s_tmax 0, s_tmin 0, s_noise 1 with every request: DDIM then
    runs with eta 1, as in A1111 (infotext "Eta DDIM: 1.0"), Euler a with its default (no field);
    a non-default override_settings.s_noise wins over the request's, as A1111's options do."""
    webuiapi = {**VALID, "seed": 5, "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1}
    with tight.client() as client:
        ddim = post(client, {**webuiapi, "sampler_name": "DDIM"})
        euler_a = post(client, {**webuiapi, "sampler_name": "Euler a"})
        plain = post(client, {**VALID, "seed": 5, "sampler_name": "Euler a"})
        churned = post(client, {**webuiapi, "sampler_name": "Euler", "s_churn": 1, "s_noise": 0.5,
                                "override_settings": {"s_noise": 0.9}})  # fmt: skip
    assert ddim.status_code == euler_a.status_code == churned.status_code == 200, ddim.text
    assert "Eta DDIM: 1.0," in json.loads(ddim.json()["info"])["infotexts"][0]
    assert "Eta" not in json.loads(euler_a.json()["info"])["infotexts"][0]
    assert euler_a.json()["images"] == plain.json()["images"]
    assert "Sigma churn: 1.0, Sigma noise: 0.9" in json.loads(churned.json()["info"])["infotexts"][0]


def test_edited_prompts_are_served_and_written_as_given(tight: Server) -> None:
    """Prompt editing, alternation and AND are plain strings to the API; the infotext keeps them."""
    prompt, negative = "masterpiece, [cat:dog:0.5], [red|blue] hair AND sky:0.5", "[lowres::2]"
    with tight.client() as client:
        answer = post(client, {**VALID, "prompt": prompt, "negative_prompt": negative})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["prompt"] == prompt and info["negative_prompt"] == negative
    assert info["infotexts"][0].startswith(f"{prompt}\nNegative prompt: {negative}\nSteps: 4,")


def test_pad_cond_uncond_is_a1111s_padding_option(tight: Server) -> None:
    """A two-chunk negative prompt against a one-chunk prompt: two UNet calls by default (no infotext
    field), padded into one with override_settings.pad_cond_uncond, as the library's pad_conds (whose
    images test_prompt_conditioning checks; on this 4-step fp16 model both give the same PNG)."""
    request = {**VALID, "seed": 3, "negative_prompt": "lowres BREAK blurry"}
    with tight.client() as client:
        plain = post(client, request).json()
        padded = post(client, {**request, "override_settings": {"pad_cond_uncond": True}}).json()
        wrong = post(client, {**request, "override_settings": {"pad_cond_uncond": "yes"}})
    assert "Pad conds" not in json.loads(plain["info"])["infotexts"][0]
    assert "Pad conds: True" in json.loads(padded["info"])["infotexts"][0]
    assert wrong.status_code == 422 and "pad_cond_uncond" in wrong.text


@pytest.mark.parametrize(("change", "status", "field"), BAD_BODIES, ids=[str(case[0])[:40] for case in BAD_BODIES])
def test_bad_fields_get_4xx_naming_the_field(tight: Server, change: dict, status: int, field: str) -> None:
    with tight.client() as client:
        answer = post(client, {**VALID, **change})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["field"] == field and field.split(".")[-1] in error["detail"]


def test_clip_skip_mismatch_says_what_to_do(tight: Server) -> None:
    with tight.client() as client:
        answer = post(client, {**VALID, "override_settings": {"CLIP_stop_at_last_layers": 3}})
    assert answer.status_code == 422 and answer.json()["field"] == "override_settings.CLIP_stop_at_last_layers"
    assert "clip skip 2, 1" in answer.json()["detail"] and "--clip-skip 2,1,3" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("content", "status", "field"),
    [
        (b'{"steps": 4,', 400, "body"),
        (b"not json", 400, "body"),
        (b"", 422, "body"),
        (b"[1, 2]", 422, "body"),
        (b'"text"', 422, "body"),
        (b"null", 422, "body"),
        # Python's json module reads these non-JSON literals: they must not reach the sampler.
        (b'{"steps": 4, "width": 64, "height": 64, "cfg_scale": NaN}', 422, "cfg_scale"),
        (b'{"steps": 4, "width": 64, "height": 64, "cfg_scale": -Infinity}', 422, "cfg_scale"),
        (b'{"steps": 4, "width": 64, "height": 64, "eta": Infinity}', 422, "eta"),
    ],
)
def test_malformed_bodies_get_4xx(tight: Server, content: bytes, status: int, field: str) -> None:
    with tight.client() as client:
        answer = client.post("/sdapi/v1/txt2img", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field


def test_a_body_without_json_content_type_is_told_so(tight: Server) -> None:
    with tight.client() as client:
        answer = client.post("/sdapi/v1/txt2img", content=b'{"steps": 4}', headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and "Content-Type: application/json" in answer.json()["detail"]


def test_oversized_bodies_get_413(tight: Server) -> None:
    big = json.dumps({**VALID, "prompt": "x" * 70_000}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    with tight.client() as client:
        declared = client.post("/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
        streamed = client.post("/sdapi/v1/txt2img", content=chunked(), headers={"content-type": "application/json"})
        assert client.get("/health").status_code == 200
    assert declared.status_code == 413 and streamed.status_code == 413
    assert declared.json()["field"] == "body"


# -- load, queue, interrupt, disconnects ----------------------------------------------------------


def test_burst_of_24_concurrent_requests_gets_200_or_429(tight: Server) -> None:
    def one(index: int) -> httpx.Response:
        with tight.client(timeout=120) as client:
            return post(client, {"steps": 8, "batch_size": 2, **SMALL, "seed": index})

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(one, range(24)))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert 200 in statuses
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1 and answer.json()["error"] == "QueueFull"
        if answer.status_code == 200:
            assert len(answer.json()["images"]) == 2
    with tight.client() as client:
        assert client.get("/health").json()["status"] == "ok"
        assert post(client, VALID).status_code == 200


def _start_long_job(server: Server, **extra: Any) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        with server.client(AUTH, timeout=120) as client:
            outcome["answer"] = post(client, {**LONG_JOB, **extra})
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_until(client: httpx.Client, check, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = check(client)
        if state:
            return state
        time.sleep(0.05)
    pytest.fail("condition not reached")


def _sampling(client: httpx.Client) -> dict | None:
    progress = client.get("/sdapi/v1/progress").json()
    return progress if progress["state"]["sampling_step"] > 5 else None


def test_progress_and_interrupt(main: Server) -> None:
    thread, outcome = _start_long_job(main)
    with main.client(AUTH) as client:
        progress = _wait_until(client, _sampling)
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 1000
        assert progress["state"]["job_count"] == 4
        preview, _ = decode_png(progress["current_image"])
        assert preview.shape == (8, 8, 3)  # latent resolution
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/interrupt").json() == {}
        thread.join(60)
        after = client.get("/sdapi/v1/progress").json()
    answer = outcome["answer"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    # Stopped at the next step: one image (the second batch never ran), last clean prediction.
    assert info["interrupted"] is True and len(answer.json()["images"]) == 1
    assert decode_png(answer.json()["images"][0])[0].shape == (64, 64, 3)
    assert after["state"]["job_count"] == 0


def _task(client: httpx.Client, task_id: str) -> dict:
    return client.post("/internal/progress", json={"id_task": task_id}).json()


def test_task_ids_progress_and_interrupt_one_task(main: Server) -> None:
    """A1111's per-task API: force_task_id, POST /internal/progress, and interrupt with ?id_task=."""
    first, first_outcome = _start_long_job(main, force_task_id="task(first)")
    with main.client(AUTH) as client:
        _wait_until(client, lambda c: (_task(c, "task(first)")["progress"] or 0) > 0)
        second, second_outcome = _start_long_job(main, force_task_id="task(second)")
        waiting = _wait_until(client, lambda c: _task(c, "task(second)")["queued"] and _task(c, "task(second)"))
        assert waiting["textinfo"] == "In queue: 1/1" and not waiting["active"] and waiting["progress"] is None
        running = _task(client, "task(first)")
        assert running["active"] and 0 < running["progress"] < 1 and running["eta"] > 0
        assert running["live_preview"].startswith("data:image/png;base64,") and running["id_live_preview"] >= 0
        again = client.post("/internal/progress", json={"id_task": "task(first)", "live_preview": False}).json()
        assert again["live_preview"] is None
        assert client.post("/sdapi/v1/interrupt", params={"id_task": "task(second)"}).json() == {}  # waits: no-op
        assert _task(client, "task(first)")["active"]
        client.post("/sdapi/v1/interrupt", params={"id_task": "task(first)"})
        first.join(60)
        _wait_until(client, lambda c: _task(c, "task(second)")["active"])
        client.post("/sdapi/v1/interrupt", params={"id_task": "task(second)"})
        second.join(60)
        assert _task(client, "task(first)")["completed"] and not _task(client, "task(first)")["active"]
        assert _task(client, "task(unknown)") | {"textinfo": None} == {
            "active": False, "queued": False, "completed": False, "progress": None, "eta": None,
            "live_preview": None, "id_live_preview": -1, "textinfo": None,
        }  # fmt: skip
    for outcome in (first_outcome, second_outcome):
        assert outcome["answer"].status_code == 200
        assert json.loads(outcome["answer"].json()["info"])["interrupted"] is True


def _one_waiting(client: httpx.Client) -> bool:
    return client.get("/health").json()["queue"]["waiting"] == 1


def _dropped_more_than(count: int):
    def check(client: httpx.Client) -> dict | None:
        health = client.get("/health").json()
        return health if health["jobs"]["dropped"] > count else None

    return check


def test_full_queue_gets_429_and_a_client_that_leaves_is_dropped(main: Server) -> None:
    left: dict = {}

    def leave_early() -> None:  # queued behind the long job (the queue holds one); gives up after 3 s
        try:
            with main.client(AUTH, timeout=3) as impatient:
                left["answer"] = post(impatient, {"prompt": "never computed", "steps": 3, **SMALL})
        except httpx.ReadTimeout:
            left["timed_out"] = True

    with main.client(AUTH) as client:
        before = client.get("/health").json()["jobs"]
        thread, outcome = _start_long_job(main)
        _wait_until(client, _sampling)
        leaver = threading.Thread(target=leave_early)
        leaver.start()
        _wait_until(client, _one_waiting)
        full = post(client, {"steps": 3, **SMALL})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        leaver.join(30)
        health = _wait_until(client, _dropped_more_than(before["dropped"]))
        assert health["queue"]["waiting"] == 0 and health["queue"]["running"]
        client.post("/sdapi/v1/interrupt")
        thread.join(60)
        after = client.get("/health").json()["jobs"]
    assert left == {"timed_out": True}
    assert outcome["answer"].status_code == 200
    assert after["dropped"] == before["dropped"] + 1 and after["rejected"] == before["rejected"] + 1
    assert after["completed"] == before["completed"]  # the dropped job was never computed


def test_every_endpoint_needs_basic_auth(main: Server) -> None:
    paths = ["/health", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/openapi.json", "/docs"]
    with main.client() as anonymous, main.client(("tester", "wrong")) as wrong, main.client(AUTH) as right:
        for path in paths:
            for client in (anonymous, wrong):
                answer = client.get(path)
                assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
            assert right.get(path).status_code == 200
        assert anonymous.post("/sdapi/v1/txt2img", json=RECIPE).status_code == 401
        assert anonymous.post("/sdapi/v1/interrupt").status_code == 401


# -- schema-driven fuzzing: no 5xx, ever ------------------------------------------------------------


def _from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """Values that mostly fit one property of the OpenAPI schema, near its bounds."""
    if "$ref" in schema:
        target = components[schema["$ref"].rsplit("/", 1)[-1]]
        return st.fixed_dictionaries(
            {}, optional={k: _from_schema(v, components) for k, v in target["properties"].items()}
        )
    if "anyOf" in schema:
        return st.one_of([_from_schema(option, components) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    low = int(schema.get("minimum", -(2**33)))
    if kind == "integer":
        return st.one_of(st.integers(low - 2, low + 140), st.integers(-(2**40), 2**40), st.sampled_from([64, 128]))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    if kind == "string":
        return st.one_of(st.text(max_size=30), st.sampled_from(["Euler a", "DPM++ 2M Karras", "Karras", "NV"]))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**34), 2**34)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def txt2img_bodies(tight: Server) -> st.SearchStrategy:
    with tight.client() as client:
        schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    request_ref = schema["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    properties = components[request_ref["$ref"].rsplit("/", 1)[-1]]["properties"]
    fields = {name: st.one_of(_from_schema(spec, components), JSON_VALUES) for name, spec in properties.items()}
    # Small valid sizes and steps most of the time, so that many bodies get through to the worker.
    cheap = st.fixed_dictionaries({"width": st.just(64), "height": st.just(64), "steps": st.integers(1, 8)})
    return st.tuples(cheap, st.fixed_dictionaries({}, optional=fields)).map(lambda pair: {**pair[0], **pair[1]})


FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)  # fmt: skip


def test_fuzzed_requests_never_get_a_5xx(tight: Server, txt2img_bodies: st.SearchStrategy) -> None:
    with tight.client() as client:

        @FUZZ
        @given(body=txt2img_bodies)
        def fuzz(body: dict) -> None:
            answer = post(client, body)
            assert answer.status_code in ANSWERS_WITHOUT_BUGS, (body, answer.text)
            if answer.status_code >= 400:
                assert answer.json()["detail"]

        @FUZZ
        @given(raw=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
        def fuzz_raw(raw: bytes) -> None:
            answer = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
            assert answer.status_code in ANSWERS_WITHOUT_BUGS, (raw, answer.text)

        fuzz()
        fuzz_raw()
        assert client.get("/health").json()["jobs"]["failed"] == 0
    assert "Traceback" not in tight.log.read_text()


# -- the worker survives whatever a job raises (no server needed) ---------------------------------


class _FlakyPipe:
    """Fails the jobs whose prompt says so, succeeds otherwise; the worker's only checkpoint."""

    def provider(self) -> str:
        return "CPUExecutionProvider"

    def pipeline(self, _title: str | None) -> _FlakyPipe:
        return self

    def run(self, prepared: Prepared, output_type: str = "np", callback=None, cancel_event=None) -> PipelineOutput:
        request = prepared.request
        failures = {"bug": RuntimeError("boom"), "oom": OutOfMemoryError("the unet ran out of system memory")}
        if request.prompt in failures:
            raise failures[request.prompt]
        if request.prompt == "user":
            raise InvalidRequestError("steps", "too many for this model")
        callback(1, 1, np.zeros((1, 4, 8, 8), np.float32))
        images = [np.zeros((64, 64, 3), np.float32) for _ in request.seeds]
        return PipelineOutput(images, [f"{request.prompt}\nSeed: {seed}" for seed in request.seeds], request.seeds)


def test_worker_survives_failing_jobs_and_maps_them_to_statuses() -> None:
    from runtime.registry import SAMPLERS, SCHEDULERS
    from runtime.sampling.schedules import Schedule
    from runtime.server.jobs import JobFailure, JobResult, Worker
    from runtime.server.mapping import Plan

    def plan(prompt: str) -> Plan:
        request = GenerationRequest(prompt, "", 1, 7.0, 64, 64, [1], "euler", "a1111", "nv", 0)
        schedule = Schedule(np.ones(2, np.float32), np.ones(1, np.float32), 1.0)
        prepared = Prepared(request, schedule, conditioning=(), chunks={}, padded=False, chunk_counts={})
        return Plan((prepared,), SAMPLERS[1], SCHEDULERS[0], 1, [1], True)

    async def run() -> list:
        worker = Worker(_FlakyPipe(), queue_size=8)
        await worker.start()
        jobs = [worker.generate(f"task-{prompt}", plan(prompt)) for prompt in ("bug", "oom", "user", "fine")]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        await worker.stop()
        return outcomes, worker.board.job_counts()

    (bug, oom, user, fine), counts = asyncio.run(run())
    assert isinstance(bug, JobFailure) and bug.status == 500
    assert isinstance(oom, JobFailure) and oom.status == 503 and "GPU" not in oom.message
    assert isinstance(user, JobFailure) and user.status == 422 and user.field == "steps"
    assert isinstance(fine, JobResult) and len(fine.images) == 1
    assert counts == {"completed": 1, "interrupted": 0, "rejected": 0, "dropped": 0, "failed": 2}


def test_mapping_rules() -> None:
    from runtime.server.mapping import find_sampler, library_schedule

    def resolve(name: str, scheduler: str = "Automatic") -> tuple[str, str]:
        sampler, found = find_sampler(name, scheduler)
        return sampler.key, library_schedule(sampler, found)

    assert resolve("Euler a") == ("euler_a", "automatic")
    assert resolve("k_euler_ancestral") == ("euler_a", "automatic")
    assert resolve("euler_ancestral", "Karras") == ("euler_a", "karras")
    assert resolve("DPM++ 2M") == ("dpmpp_2m", "automatic")  # Karras: runtime.sampling.schedules.AUTOMATIC
    assert resolve("DPM++ 2M SGM Uniform") == ("dpmpp_2m", "sgm_uniform")
    assert resolve("k_dpm_2_a", "Align Your Steps") == ("dpm2_a", "align_your_steps")
    assert resolve("dpm++ 2m", "uniform") == ("dpmpp_2m", "a1111")
    assert resolve("DPM++ 2M Karras", "Uniform") == ("dpmpp_2m", "karras")  # the suffix wins, as in A1111
    assert resolve("DDIM", "Karras") == ("ddim", "a1111")
    assert resolve("Euler", "Diffusers") == ("euler", "model")
    with pytest.raises(InvalidRequestError) as error:
        resolve("DPM++ 2M", "Karras Exponential")
    assert error.value.field == "scheduler" and "'Beta'" in error.value.message
    assert resolve("DPM++ 2M SDE Karras") == ("dpmpp_2m_sde", "karras")
    assert resolve("Restart Karras") == ("restart", "karras")
    assert resolve("DPM adaptive Karras") == ("dpm_adaptive", "karras")
    assert resolve("UniPC", "Karras") == ("unipc", "a1111")  # a timestep sampler: its own grid
    with pytest.raises(InvalidRequestError) as error:
        resolve("DPM++ 4M Karras")
    assert error.value.field == "sampler_name" and "'LCM'" in error.value.message


# -- img2img, inpainting, hires fix and their endpoints ---------------------------------------------


def _png_base64(size: tuple[int, int] = (64, 64), mode: str = "RGB", box: tuple | None = None) -> str:
    if mode == "L":
        image = Image.new("L", size, 0)
        if box:
            image.paste(255, box)
    else:
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        image = Image.fromarray(np.stack([x * 3, y * 3, (x + y) * 2], -1).astype(np.uint8) % 255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMG2IMG = {
    "prompt": "1girl", "steps": 4, "sampler_name": "Euler a", "seed": 114514, "cfg_scale": 7, **SMALL,
    "denoising_strength": 0.6,
}  # fmt: skip


@pytest.mark.parametrize("with_mask", [False, True])
def test_img2img_matches_the_library(main: Server, tiny_fp32: Path, with_mask: bool) -> None:
    from runtime import Pipeline

    body = {**IMG2IMG, "init_images": [_png_base64()]}
    options = {}
    if with_mask:
        body.update(mask="data:image/png;base64," + _png_base64(mode="L", box=(16, 16, 48, 40)), inpainting_fill=1)
        options = {"mask_image": base64.b64decode(_png_base64(mode="L", box=(16, 16, 48, 40))), "inpainting_fill": 1,
                   "inpaint_full_res": True, "inpaint_full_res_padding": 0, "mask_blur": 4}  # fmt: skip
    with main.client(AUTH) as client:
        answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    info = json.loads(result["info"])
    assert info["denoising_strength"] == 0.6 and result["parameters"]["init_images"] is None
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", threads=1)
    expected = pipe(
        "1girl", "", num_inference_steps=4, guidance_scale=7.0, width=64, height=64, seed=114514,
        num_images_per_prompt=1, sampler="euler_a", schedule="automatic", rng="nv",
        image=base64.b64decode(_png_base64()), strength=0.6, step_rule="a1111", **options,
    )  # fmt: skip
    pixels, text = decode_png(result["images"][0])
    np.testing.assert_array_equal(pixels, np.asarray(expected.images[0]))
    assert text == expected.infotexts[0] and "Denoising strength: 0.6" in text
    if with_mask:
        assert "Mask blur: 4" in text and info["extra_generation_params"]["Inpaint area"] == "Only masked"


def test_txt2img_hires_fix(main: Server) -> None:
    body = {"prompt": "1girl", "steps": 3, **SMALL, "seed": 5, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "Latent", "denoising_strength": 0.7}  # fmt: skip
    with main.client(AUTH) as client:
        answer = post(client, body)
    assert answer.status_code == 200, answer.text
    pixels, text = decode_png(answer.json()["images"][0])
    assert pixels.shape == (128, 128, 3)
    assert "Hires upscale: 2, Hires upscaler: Latent" in text and "Denoising strength: 0.7" in text
    assert json.loads(answer.json()["info"])["denoising_strength"] == 0.7


def test_upscaler_lists_and_png_info(main: Server) -> None:
    with main.client(AUTH) as client:
        upscalers = client.get("/sdapi/v1/upscalers").json()
        modes = client.get("/sdapi/v1/latent-upscale-modes").json()
        generated = post(client, {"prompt": "a (cat:1.2), b", "steps": 1, **SMALL, "seed": 9}).json()["images"][0]
        info = client.post("/sdapi/v1/png-info", json={"image": generated}).json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in modes][:2] == ["Latent", "Latent (antialiased)"]
    assert info["parameters"]["Prompt"] == "a (cat:1.2), b" and info["parameters"]["Seed"] == "9"
    assert info["parameters"]["Size-1"] == "64" and info["info"].startswith("a (cat:1.2), b\n")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("img2img", {"init_images": ["not base64!"]}, "init_images"),
        ("img2img", {"init_images": [base64.b64encode(b"GIF89a broken").decode()]}, "init_images"),
        ("img2img", {"init_images": [_png_base64()], "denoising_strength": 1.5}, "denoising_strength"),
        ("img2img", {"init_images": [_png_base64()], "mask": _png_base64((32, 32), "L")}, "mask"),
        ("img2img", {"init_images": []}, "init_images"),
        ("txt2img", {"enable_hr": True, "hr_scale": 3}, "hr_scale"),
        ("txt2img", {"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, "hr_upscaler"),
        ("png-info", {"image": base64.b64encode(b"nope").decode()}, "image"),
    ],
)
def test_bad_image_requests_are_422_naming_the_field(tight: Server, path: str, body: dict, field: str) -> None:
    with tight.client() as client:
        answer = client.post(f"/sdapi/v1/{path}", json={"prompt": "x", "steps": 2, **SMALL, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
