"""The server's API on a local Ray Serve cluster: 2 CPU replicas of the tiny model, one cluster for
the whole module (Ray takes tens of seconds to start here).

What must hold (issue 14): concurrent requests are all answered with an image or the server's JSON
429/503 with Retry-After, both replicas work, and each image equals the one-box server's PNG for the
same request; a replica killed mid-job ends its request in a 503 (never a hang) and Serve brings the
endpoint back; a replica whose model copy differs refuses, and the deployment fails in one line.
The cluster and the one-box reference both serve a LoRA and an embeddings folder: a LoRA tag or an
embedding name gives the one-box server's PNG, the listing routes answer as on one box, and an
unknown LoRA is a 422 from the ingress (the job is never queued). A second application serves a
`--model-dir` of two exports with different weights through Serve's model multiplexing: a request
naming either checkpoint gives the one-box `--model-dir` server's PNG for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

from addon_files import tiny_embedding, tiny_lora  # noqa: E402

from runtime.server.config import Limits, ServerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY_DASHBOARD_PORT = 8265  # ray.init's default dashboard port
TORCH_STACK = ("torch", "transformers", "diffusers", "optimum")
SMALL = {"width": 64, "height": 64}
RECIPE = {
    "prompt": "masterpiece, best quality, 1girl", "negative_prompt": "lowres", "steps": 8,
    "sampler_name": "Euler a", "cfg_scale": 11, "seed": 114514, **SMALL,
}  # fmt: skip
LONG_JOB = {"prompt": "a long job", "steps": 1000, "sampler_name": "Euler", "n_iter": 4, **SMALL}
LIMITS = Limits(max_steps=1000)
QUEUE_PER_REPLICA = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    url: str
    app_name: str

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def replica_pids(self) -> set[int]:
        marker = f"ServeReplica:{self.app_name}:Generator"
        found = set()
        for process in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in process.info["cmdline"] or ()):
                found.add(process.pid)
        return found


@dataclass
class Addons:
    loras: Path
    embeddings: Path

    def server(self, model: Path, **options) -> ServerConfig:
        return ServerConfig(model=str(model), limits=LIMITS, lora_dir=str(self.loras),
                            embeddings_dir=str(self.embeddings), **options)  # fmt: skip


@pytest.fixture(scope="module")
def addons(tmp_path_factory) -> Addons:
    """The add-on folders both servers read (a folder every node reads: one machine here)."""
    loras, embeddings = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("embeddings")
    tiny_lora(loras / "style.safetensors", seed=1)
    tiny_embedding(embeddings / "clusteremb.safetensors", seed=2)
    return Addons(loras, embeddings)


@pytest.fixture(scope="module")
def cluster(tiny_fp32: Path, addons: Addons) -> Iterator[Cluster]:
    import ray
    from ray import serve

    from runtime.cluster.__main__ import start_ray
    from runtime.cluster.app import deploy
    from runtime.cluster.model_check import reference_models
    from runtime.cluster.settings import ClusterSettings

    # 2 CPUs for the replicas, 1 for the deployment that must fail, 1 for the --model-dir application;
    # the ingresses take none.
    start_ray(None, num_cpus=4, log_to_driver=False)
    port = _free_port()
    server = addons.server(tiny_fp32, port=port, queue_size=QUEUE_PER_REPLICA)
    settings = ClusterSettings(server=server, replicas=2, cpus_per_replica=1, models=reference_models(server))
    try:
        deploy(settings, timeout_s=240)
        yield Cluster(f"http://127.0.0.1:{port}", settings.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def one_box(tiny_fp32: Path, addons: Addons) -> Iterator[httpx.Client]:
    """The one-box server's app in this process, for reference answers."""
    from starlette.testclient import TestClient

    from runtime import Pipeline
    from runtime.server.app import create_app

    pipe = Pipeline.from_pretrained(
        tiny_fp32, provider="cpu", threads=1, lora_dir=addons.loras, embeddings_dir=addons.embeddings
    )
    app = create_app(pipe, addons.server(tiny_fp32))
    with TestClient(app, base_url="http://localhost") as client:  # a Host the server answers for
        yield client


def _png(answer: httpx.Response) -> bytes:
    return base64.b64decode(answer.json()["images"][0])


def _is_refusal(answer: httpx.Response) -> bool:
    body = answer.json()
    return answer.status_code in (429, 503) and "detail" in body and int(answer.headers["Retry-After"]) >= 1


def test_cluster_package_never_imports_the_torch_stack() -> None:
    code = (
        f"import sys\nfor name in {TORCH_STACK!r}: sys.modules[name] = None\n"
        "import runtime.cluster.app, runtime.cluster.generator, runtime.cluster.__main__\n"
        f"assert not any(sys.modules.get(name) for name in {TORCH_STACK!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_a_local_cluster_serves_no_dashboard(cluster: Cluster) -> None:
    """start_ray's local Ray opens no dashboard UI: nothing listens on Ray's dashboard port."""
    import psutil

    listening = {conn.laddr.port for conn in psutil.net_connections("tcp") if conn.status == psutil.CONN_LISTEN}
    assert RAY_DASHBOARD_PORT not in listening
    assert httpx.get(cluster.url + "/sdapi/v1/samplers").status_code == 200  # while the cluster serves


def test_a_bad_model_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "runtime.cluster", "--model", str(tmp_path / "nope"), "--cpus-per-replica", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: model folder {tmp_path / 'nope'} does not exist"]


def test_copies_that_differ_are_refused(tiny_fp32: Path, tmp_path: Path) -> None:
    from runtime.cluster.model_check import check_model, fingerprint
    from runtime.errors import ModelFolderError

    reference = fingerprint(tiny_fp32)
    check_model(tiny_fp32, reference)
    with pytest.raises(ModelFolderError, match="differs from the one the app was deployed with"):
        check_model(tiny_fp32, "0" * 64)
    damaged = _damaged_copy(tiny_fp32, tmp_path)
    with pytest.raises(ModelFolderError, match="does not match its sha256"):
        check_model(damaged, reference)


def _damaged_copy(source: Path, tmp_path: Path) -> Path:
    """A copy whose VAE decoder has one byte changed (same size): what a bad copy on a node looks like."""
    copy = tmp_path / "damaged"
    shutil.copytree(source, copy)
    _damage(copy / "vae_decoder" / "model.onnx")
    return copy


def _damage(graph: Path) -> None:
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))


def test_concurrent_requests_use_both_replicas_and_match_the_one_box_server(
    cluster: Cluster, one_box: httpx.Client
) -> None:
    with cluster.client() as client:
        health = client.get("/health").json()
    assert health["status"] == "ok" and health["replicas"] == {"target": 2, "ready": 2, "starting": 0, "dead": 0}

    def one(index: int) -> httpx.Response:
        return httpx.post(f"{cluster.url}/sdapi/v1/txt2img", json={**RECIPE, "seed": 114514 + index}, timeout=300)

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(one, range(20)))
    images = {index: answer for index, answer in enumerate(answers) if answer.status_code == 200}
    assert all(answer.status_code == 200 or _is_refusal(answer) for answer in answers), [
        (answer.status_code, answer.text[:200]) for answer in answers
    ]
    assert 0 in images and len(images) >= 10  # 2 running + 16 waiting fit; only a few may be refused
    made_by = {json.loads(answer.json()["info"])["replica"] for answer in images.values()}
    assert len(made_by) == 2, made_by
    for index, answer in images.items():
        reference = one_box.post("/sdapi/v1/txt2img", json={**RECIPE, "seed": 114514 + index})
        assert reference.status_code == 200, reference.text
        assert _png(answer) == _png(reference), f"seed {114514 + index}: the PNG differs from the one-box server's"
        info = json.loads(answer.json()["info"])
        assert info["node"] and all("Generator" not in text for text in info["infotexts"])


def test_img2img_runs_on_a_replica_like_on_one_box(cluster: Cluster, one_box: httpx.Client) -> None:
    with cluster.client() as client:
        init = client.post("/sdapi/v1/txt2img", json=RECIPE).json()["images"][0]
        body = {**RECIPE, "init_images": [init], "denoising_strength": 0.5, "force_task_id": "task(img2img)"}
        answer = client.post("/sdapi/v1/img2img", json=body)
        assert answer.status_code == 200, answer.text
        assert client.post("/internal/progress", json={"id_task": "task(img2img)"}).json()["completed"]
    reference = one_box.post("/sdapi/v1/img2img", json=body)
    assert reference.status_code == 200, reference.text
    assert _png(answer) == _png(reference)


def _same_png(cluster: httpx.Client, one_box: httpx.Client, body: dict) -> bytes:
    answer, reference = cluster.post("/sdapi/v1/txt2img", json=body), one_box.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200 and reference.status_code == 200, (answer.text, reference.text)
    assert _png(answer) == _png(reference), f"{body['prompt']!r}: the PNG differs from the one-box server's"
    return _png(answer)


def _lora_hash(path: Path) -> str:
    """A1111's LoRA shorthash: sha256 of the bytes after the header (addnet hash), 12 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_loras_and_embeddings_through_the_cluster_give_the_one_box_png(
    cluster: Cluster, one_box: httpx.Client, addons: Addons
) -> None:
    plain = _png(one_box.post("/sdapi/v1/txt2img", json=RECIPE))
    with_lora = {**RECIPE, "prompt": RECIPE["prompt"] + " <lora:style:0.8>"}
    with_embedding = {**RECIPE, "negative_prompt": "lowres, clusteremb"}
    with cluster.client() as client:
        for route in ("/sdapi/v1/loras", "/sdapi/v1/embeddings"):
            assert client.get(route).json() == one_box.get(route).json(), route
        assert [item["name"] for item in client.get("/sdapi/v1/loras").json()] == ["style"]
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["clusteremb"]["vectors"] == 2
        lora_png = _same_png(client, one_box, with_lora)
        embedding_png = _same_png(client, one_box, with_embedding)
        info = json.loads(client.post("/sdapi/v1/txt2img", json=with_lora).json()["info"])
    assert len({plain, lora_png, embedding_png}) == 3  # each add-on changes the image
    assert f'Lora hashes: "style: {_lora_hash(addons.loras / "style.safetensors")}"' in info["infotexts"][0]


def test_an_unknown_lora_is_a_422_from_the_ingress_as_on_one_box(cluster: Cluster, one_box: httpx.Client) -> None:
    body = {**RECIPE, "prompt": "a <lora:missing:1>", "force_task_id": "task(missing-lora)"}
    with cluster.client() as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        never_queued = _progress(client, "task(missing-lora)")
    reference = one_box.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 422 and answer.json() == reference.json()
    assert "unknown LoRA 'missing'" in answer.json()["detail"]
    assert not never_queued["completed"] and not never_queued["queued"]  # a replica's 422 would be "completed"


def test_add_ons_added_while_serving_are_found(cluster: Cluster, one_box: httpx.Client, addons: Addons) -> None:
    """A new LoRA works at once (ingress and replica list the folder again for an unknown name, as
    A1111 does); a new embedding after /refresh-embeddings on the ingress (replicas never read it)."""
    tiny_lora(addons.loras / "later.safetensors", seed=3)
    tiny_embedding(addons.embeddings / "lateremb.safetensors", seed=4, vectors=1)
    with cluster.client() as client:
        _same_png(client, one_box, {**RECIPE, "prompt": RECIPE["prompt"] + " <lora:later:1>"})
        assert client.post("/sdapi/v1/refresh-loras").json() == {}
        assert [item["name"] for item in client.get("/sdapi/v1/loras").json()] == ["later", "style"]
        for server in (client, one_box):
            assert server.post("/sdapi/v1/refresh-embeddings").json() == {}
        assert "lateremb" in client.get("/sdapi/v1/embeddings").json()["loaded"]
        _same_png(client, one_box, {**RECIPE, "prompt": RECIPE["prompt"] + ", lateremb"})


def _start(cluster: Cluster, task_id: str, answers: dict) -> threading.Thread:
    def run() -> None:
        answers[task_id] = httpx.post(
            f"{cluster.url}/sdapi/v1/txt2img", json={**LONG_JOB, "force_task_id": task_id}, timeout=300
        )

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _progress(client: httpx.Client, task_id: str) -> dict:
    return client.post("/internal/progress", json={"id_task": task_id, "live_preview": False}).json()


def _wait(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"not within {seconds} s: {what}")


def test_killed_replica_ends_its_job_in_503_and_serve_brings_it_back(cluster: Cluster) -> None:
    answers: dict[str, httpx.Response] = {}
    tasks = ("task(first)", "task(second)")
    threads = [_start(cluster, task, answers) for task in tasks]
    with cluster.client(timeout=30) as client:
        _wait(lambda: all((_progress(client, t)["progress"] or 0) > 0 for t in tasks), 60, "both jobs running")
        everything = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert everything["state"]["job_count"] == 4 and everything["textinfo"].endswith("2 running, 0 waiting")
        before = cluster.replica_pids()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # One job lost its replica: a 503 naming that, soon. The other goes on until interrupted.
        lost = _wait(lambda: next((answers[t] for t in tasks if t in answers), None), 30, "an answer after the kill")
        assert lost.status_code == 503 and lost.json()["error"] == "ReplicaLost" and _is_refusal(lost)
        survivor = next(t for t in tasks if t not in answers)
        assert _progress(client, survivor)["active"]
        client.post("/sdapi/v1/interrupt", params={"id_task": survivor})
        for thread in threads:
            thread.join(60)
        assert answers[survivor].status_code == 200 and json.loads(answers[survivor].json()["info"])["interrupted"]
        assert _progress(client, survivor)["completed"]

        def back() -> bool:
            pids = cluster.replica_pids()
            ready = client.get("/health").json()["replicas"]["ready"] == 2
            return len(pids) == 2 and victim not in pids and ready

        _wait(back, 60, "a new replica in place of the killed one")
        again = client.post("/sdapi/v1/txt2img", json=RECIPE)
        assert again.status_code == 200
        assert time.monotonic() - killed < 60
        assert client.get("/health").json()["jobs"]["failed"] == 1


def test_a_replica_with_a_damaged_copy_fails_the_deployment_in_one_line(
    cluster: Cluster, tiny_fp32: Path, tmp_path: Path
) -> None:
    from ray import serve

    from runtime.cluster.app import DeploymentFailed, deploy
    from runtime.cluster.model_check import fingerprint, reference_models
    from runtime.cluster.settings import ClusterSettings

    damaged = _damaged_copy(tiny_fp32, tmp_path)
    server = ServerConfig(model=str(damaged), port=int(cluster.url.rsplit(":", 1)[1]))
    # The reference copy is the intact one: the damaged copy's graph hash fails first anyway.
    models = {
        title: replace(copy, fingerprint=fingerprint(tiny_fp32)) for title, copy in reference_models(server).items()
    }
    settings = ClusterSettings(server=server, replicas=1, models=models, app_name="damaged")
    try:
        with pytest.raises(DeploymentFailed) as failure:
            deploy(settings, route_prefix="/damaged", timeout_s=120)
    finally:
        serve.delete("damaged")
    message = str(failure.value)
    assert "\n" not in message and "does not match its sha256" in message, message
    assert message.startswith("replica on ") and "vae_decoder" in message


def test_the_serve_config_file_builds_the_application(tiny_fp32: Path) -> None:
    import yaml
    from ray.serve import Application

    from runtime.cluster.__main__ import settings_from_args
    from runtime.cluster.app import _arguments, build

    config = yaml.safe_load((REPO / "docs" / "cluster-serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "runtime.cluster.app:build" and config["http_options"]["port"] == 7861
    args = {**app["args"], "model": str(tiny_fp32)}
    settings = settings_from_args(_arguments(args))
    assert (settings.replicas, settings.gpus_per_replica, settings.max_queued_requests) == (2, 1.0, 16)
    options = settings.generator_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and options["max_ongoing_requests"] == 1
    assert isinstance(build(args), Application)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-replicas", "2"], "--min-replicas needs --max-replicas"),
        (["--max-replicas", "4", "--replicas", "6"], "--replicas must lie between"),
        (["--gpus-per-replica", "1", "--cpus-per-replica", "2"], "not allowed with argument"),
        (["--gpus-per-replica", "0"], "must be a positive number"),
        (["--lora-cache-mb", "-5"], "-5 must not be negative"),
        (["--model-dir", "models"], "not allowed with argument --model"),
        (["--models-per-replica", "0"], "0 must be at least 1"),
    ],
)
def test_cluster_options_are_checked(args: list[str], message: str, capsys) -> None:
    from runtime.cluster.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_code:
        parse_args(["--model", "m", *args])
    assert exit_code.value.code == 2 and message in capsys.readouterr().err


def test_autoscaling_settings_pass_through(tiny_fp32: Path) -> None:
    from runtime.cluster.__main__ import settings_from_args

    settings = settings_from_args(
        ["--model", str(tiny_fp32), "--replicas", "2", "--min-replicas", "1", "--max-replicas", "8",
         "--target-ongoing-requests", "3"]
    )  # fmt: skip
    scaling = settings.generator_options()["autoscaling_config"]
    assert scaling == {
        "min_replicas": 1, "max_replicas": 8, "initial_replicas": 2, "target_ongoing_requests": 3.0,
        "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
    }  # fmt: skip
    assert "num_replicas" not in settings.generator_options() and settings.max_queued_requests == 8 * 8
    assert settings.server.traffic.max_active_requests >= 8 * (8 + 1)


def test_add_on_folders_reach_the_settings(tiny_fp32: Path) -> None:
    from runtime.cluster.__main__ import settings_from_args

    argv = ["--model", str(tiny_fp32), "--lora-dir", "/shared/loras", "--embeddings-dir", "/shared/embeddings",
            "--lora-cache-mb", "512"]  # fmt: skip
    server = settings_from_args(argv).server
    assert (server.lora_dir, server.embeddings_dir) == ("/shared/loras", "/shared/embeddings")
    assert server.lora_cache_mb == 512 and settings_from_args(argv[:2]).server.lora_cache_mb == 4096


def test_replicas_load_with_the_lora_cache_bound(tiny_fp32: Path, monkeypatch) -> None:
    from runtime.cluster import generator
    from runtime.cluster.__main__ import settings_from_args
    from runtime.errors import InvalidRequestError

    options = {}

    def from_pretrained(folder: str, **given: object) -> None:
        options.update(given)
        raise InvalidRequestError("model", "stop here: no Serve replica context in this test")

    monkeypatch.setattr(generator.Pipeline, "from_pretrained", from_pretrained)
    with pytest.raises(generator.ReplicaRefused, match="stop here"):
        generator.Generator(settings_from_args(["--model", str(tiny_fp32), "--lora-cache-mb", "0"]))
    assert options["lora_cache_mb"] == 0


@pytest.fixture(scope="module")
def model_dir(tiny_fp32: Path, tmp_path_factory) -> Path:
    """Two exports with different weights (seeds 0 and 1), as tests/test_server_models.py makes them."""
    from export.exporter import ExportOptions, run_export
    from export.random_model import build_and_save

    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_fp32, folder / "tiny-a")
    other = build_and_save("tiny", tmp_path_factory.mktemp("tiny-seed1"), seed=1)["single_file"]
    run_export(ExportOptions(model=str(other), output=folder / "tiny-b", precision="fp32"))
    return folder


def test_a_model_dir_is_multiplexed_and_each_checkpoint_gives_the_one_box_png(
    cluster: Cluster, model_dir: Path
) -> None:
    """One replica keeping one model: the non-current checkpoint by override_settings, the current
    one, then a switch by POST /options, each the one-box --model-dir server's PNG."""
    from ray import serve
    from starlette.testclient import TestClient

    from runtime.cluster.__main__ import settings_from_args
    from runtime.cluster.app import deploy
    from runtime.server.__main__ import load_models
    from runtime.server.app import create_app

    port = cluster.url.rsplit(":", 1)[1]
    argv = ["--model-dir", str(model_dir), "--cpus-per-replica", "1", "--port", port, "--models-per-replica", "1"]
    settings = replace(settings_from_args(argv), app_name="multi")
    assert settings.preload is None and len(settings.models) == 2
    one_box_config = ServerConfig(model="", model_dir=str(model_dir), provider="cpu", threads=1)
    try:
        deploy(settings, route_prefix="/multi", timeout_s=120)
        with (
            httpx.Client(base_url=cluster.url + "/multi", timeout=120) as client,
            TestClient(
                create_app(None, one_box_config, load_models(one_box_config)), base_url="http://localhost"
            ) as one_box,
        ):
            listing = client.get("/sdapi/v1/sd-models").json()
            assert listing == one_box.get("/sdapi/v1/sd-models").json()
            titles = {item["filename"]: item["title"] for item in listing}
            assert set(titles) == {"tiny-a", "tiny-b"}
            current = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
            other = next(title for title in titles.values() if title != current)
            override = {**RECIPE, "override_settings": {"sd_model_checkpoint": other}}
            pngs = {other: _same_png(client, one_box, override), current: _same_png(client, one_box, RECIPE)}
            assert pngs[other] != pngs[current]  # the two checkpoints differ, and each request got its own
            for server in (client, one_box):
                assert server.post("/sdapi/v1/options", json={"sd_model_checkpoint": other}).status_code == 200
            assert _same_png(client, one_box, RECIPE) == pngs[other]
            # The replica now holds only `other`; a copy of `current` damaged since deployment is refused
            # when a job makes the replica load it: that job's 503, in one line naming the file.
            damaged = next(name for name, title in titles.items() if title == current)
            _damage(model_dir / damaged / "vae_decoder" / "model.onnx")
            refused = client.post(
                "/sdapi/v1/txt2img", json={**RECIPE, "override_settings": {"sd_model_checkpoint": current}}
            )
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
            assert refused.json()["error"] == "ModelUnavailable" and "does not match its sha256" in refused.text
            assert "vae_decoder" in refused.json()["detail"] and "\n" not in refused.json()["detail"]
    finally:
        serve.delete("multi")
