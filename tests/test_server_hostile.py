"""The server under hostile traffic, on loopback: idle and slow sockets, bursts, echoed fields that
cannot be echoed, cross-site requests, foreign Host headers, and memory after a large request.

Every loop here is bounded and every socket has a timeout. One server process serves the module.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from test_server import SMALL, Server, start_server  # noqa: E402, F401  (start_server is a fixture)

ALLOWED_EXTRA_HOST = "sd.example.test"
QUEUE = 8
HEADER_TIMEOUT = 3
BODY_TIMEOUT = 2
ENSD = "override_settings.eta_noise_seed_delta"
QUICK = {"prompt": "a cat", "steps": 1, "sampler_name": "Euler", **SMALL}


@pytest.fixture(scope="module")
def hostile(start_server) -> Server:  # noqa: F811
    return start_server(
        "--queue-size", str(QUEUE), "--max-active-requests", "40", "--max-pixels", str(384 * 384),
        "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
        "--allowed-hosts", ALLOWED_EXTRA_HOST,
    )  # fmt: skip


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _idle_socket(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=HEADER_TIMEOUT + 10)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def _is_json_refusal(answer: httpx.Response) -> bool:
    return (
        answer.status_code in (429, 503)
        and answer.headers["content-type"].startswith("application/json")
        and int(answer.headers["Retry-After"]) >= 1
        and set(answer.json()) >= {"error", "detail", "field"}
    )


# -- sockets ----------------------------------------------------------------------------------------


def test_idle_sockets_beyond_any_limit_do_not_lock_out_anyone(hostile: Server) -> None:
    # 100 sockets that send nothing: more than uvicorn's old 64-connection limit, far more than 40.
    idle = [_idle_socket(hostile) for _ in range(100)]
    try:
        with hostile.client(timeout=30) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/sdapi/v1/progress").status_code == 200
            assert client.post("/sdapi/v1/txt2img", json=QUICK).status_code == 200
        time.sleep(HEADER_TIMEOUT + 1)
        assert all(_closed_by_server(sock) for sock in idle)  # each was closed: none holds a socket
    finally:
        for sock in idle:
            sock.close()


def test_slow_heads_and_slow_bodies_time_out(hostile: Server) -> None:
    slow_head = _idle_socket(hostile)
    slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes the head
    slow_body = _idle_socket(hostile)
    slow_body.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": '
    )
    started = time.monotonic()
    answer = b""
    while chunk := slow_body.recv(65536):  # the server answers, then closes
        answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and '"RequestTimeout"' in answer
    assert time.monotonic() - started < BODY_TIMEOUT + 5
    assert _closed_by_server(slow_head)
    for sock in (slow_head, slow_body):
        sock.close()


def test_a_burst_fills_the_queue_and_every_refusal_is_json_with_retry_after(hostile: Server) -> None:
    def one(index: int) -> httpx.Response:
        with hostile.client(timeout=120) as client:
            return client.post("/sdapi/v1/txt2img", json={**QUICK, "steps": 4, "seed": index})

    with ThreadPoolExecutor(max_workers=80) as pool:
        answers = list(pool.map(one, range(80)))
    refused = [answer for answer in answers if answer.status_code != 200]
    assert all(_is_json_refusal(answer) for answer in refused), {a.status_code: a.text for a in refused}
    served = [answer for answer in answers if answer.status_code == 200]
    assert len(served) >= QUEUE + 1  # the running job and a full queue, before anything was refused
    assert all(len(answer.json()["images"]) == 1 for answer in served)
    with hostile.client() as client:
        assert client.get("/health").json()["status"] == "ok"


# -- request contents ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"prompt": "a cat \\ud800"}', "prompt"),
        ('{"override_settings": {"my_extension_option": "\\udfff"}}', "override_settings.my_extension_option"),
        ('{"script_args": [1, "\\ud800"]}', "script_args.1"),
        ('{"override_settings": {"\\ud800": 1}}', "override_settings"),
        ('{"script_args": ' + "[" * 255 + "]" * 255 + "}", "script_args"),
        ('{"override_settings": {"x": ' + '{"a": ' * 200 + "1" + "}" * 200 + "}}", "override_settings.x"),
    ],
)
def test_echoed_fields_that_cannot_be_echoed_are_refused_up_front(hostile: Server, body: str, field: str) -> None:
    with hostile.client() as client:
        before = client.get("/health").json()["jobs"]
        answer = client.post("/sdapi/v1/txt2img", content=body.encode(), headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["field"].startswith(field)
        assert client.get("/health").json()["jobs"] == before  # nothing was queued


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": 5, "override_settings": {"eta_noise_seed_delta": 2**64 - 5}}, ENSD),
        ({"cfg_scale": 1e308}, "cfg_scale"),
        ({"cfg_scale": 30.5}, "cfg_scale"),
    ],
)
def test_limits_are_checked_before_queueing(hostile: Server, change: dict, field: str) -> None:
    with hostile.client() as client:
        before = client.get("/health").json()["jobs"]
        answer = client.post("/sdapi/v1/txt2img", json={**QUICK, "sampler_name": "Euler a", **change})
        assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
        assert client.get("/health").json()["jobs"] == before
        assert client.post("/sdapi/v1/txt2img", json={**QUICK, "cfg_scale": 30}).status_code == 200


# -- cross-site requests and Host ---------------------------------------------------------------


def test_cross_site_posts_and_foreign_hosts_are_refused(hostile: Server) -> None:
    port = _port(hostile)
    with hostile.client() as client:
        interrupt = "/sdapi/v1/interrupt"
        # What a web page can send cross-site without a preflight: none of it is acted on.
        assert client.post(interrupt, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        form = client.post(interrupt, data={"a": "b"})
        assert form.status_code == 415 and form.json()["error"] == "UnsupportedMediaType"
        typeless = client.post(interrupt, content=b"{}")  # a Blob body: no Content-Type at all
        assert "content-type" not in typeless.request.headers and typeless.status_code == 415
        evil = client.post(interrupt, json={}, headers={"origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["field"] == "Origin"
        assert client.post(interrupt, headers={"origin": "null"}).status_code == 403
        # DNS rebinding: the attacker's name resolving to 127.0.0.1.
        rebound = client.get("/sdapi/v1/options", headers={"host": f"evil.example:{port}"})
        assert rebound.status_code == 421 and rebound.json()["field"] == "Host"
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 421
        # What the server's own users send.
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"{ALLOWED_EXTRA_HOST}:{port}", f"[::1]:{port}"):
            assert client.get("/sdapi/v1/options", headers={"host": host}).status_code == 200, host
        assert client.post(interrupt).status_code == 200  # python clients: no body, no Content-Type
        assert client.post(interrupt, json={}, headers={"origin": f"http://localhost:{port}"}).status_code == 200


def test_sd_models_shows_no_absolute_path(hostile: Server) -> None:
    with hostile.client() as client:
        (model,) = client.get("/sdapi/v1/sd-models").json()
    assert not Path(model["filename"]).is_absolute() and "/" not in model["filename"]


# -- memory -------------------------------------------------------------------------------------


def test_memory_is_given_back_after_a_large_request(hostile: Server) -> None:
    process = psutil.Process(hostile.process.pid)
    with hostile.client(timeout=300) as client:
        assert client.post("/sdapi/v1/txt2img", json={**QUICK, "width": 128, "height": 128}).status_code == 200
        before = process.memory_info().rss
        large = client.post("/sdapi/v1/txt2img", json={**QUICK, "steps": 2, "width": 384, "height": 384})
        assert large.status_code == 200
        after = process.memory_info().rss
    # Measured on the tiny model: +215 MiB after a 384x384 request without the release, -20 MiB with it.
    assert after - before < 64 * 2**20, (before / 2**20, after / 2**20)


# -- the app's own answers (in-process) -----------------------------------------------------------


def test_a_bug_is_one_logged_traceback_and_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from runtime.server.app import build_app
    from runtime.server.config import ServerConfig
    from runtime.server.tasks import TaskBoard

    class Idle:  # no model, no jobs: only the app's own error handling is under test
        board = TaskBoard()

        async def start(self) -> None: ...

        async def stop(self) -> None: ...

    app = build_app(None, ServerConfig(model="unused"), Idle())  # type: ignore[arg-type]

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    # raise_server_exceptions: had the error left the app, uvicorn would log it a second time.
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=True) as client:
        answer = client.get("/boom", headers={"host": "127.0.0.1"})
    assert answer.status_code == 500 and answer.json()["error"] == "InternalError"
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1 and "a bug" in str(tracebacks[0].exc_info[1])


def test_openapi_error_shapes_match_what_is_sent(hostile: Server) -> None:
    with hostile.client() as client:
        schema = client.get("/openapi.json").json()
        sent = client.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"})
    error_schema = schema["components"]["schemas"]["ErrorResponse"]
    assert sent.status_code == 422 and set(sent.json()) == set(error_schema["properties"])
    assert set(error_schema.get("required", [])) <= set(sent.json())
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    ref = json.dumps(answer["content"]["application/json"]["schema"])
                    expected = "HealthResponse" if path == "/health" and status == "503" else "ErrorResponse"
                    assert expected in ref, (method, path, status, ref)
