"""Smoke run of scripts/bench.py on the tiny architecture: the script keeps working and writes the
JSON it promises. Speed is never asserted here (that is what the committed benchmarks are for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
RATIOS = ("unet_step", "text_encode", "vae_decode", "total", "cold_start", "peak_rss", "env_size")
FIGURES = ("unet_step_s", "text_encode_s", "vae_decode_s", "total_s", "cold_start_s", "peak_rss_mb")


def without_openvino(work: Path) -> dict[str, str]:
    """The environment of an install without the openvino extra: a package of that name on the path
    that fails to import, as a missing one does."""
    stub = work / "no-openvino" / "openvino"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    path = os.pathsep.join(filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def bench(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "--arch", "tiny", *args]
    env = {**env, "ACERTAIN_BENCH_CACHE": str(work / "cache")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """As documented, in an install without the openvino extra: the OpenVINO peer is skipped with a
    note, and everything else is measured."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "out.json"
    args = ["--steps", "2", "--height", "64", "--width", "64", "--repeats", "1", "--retries", "0", "--json", str(out)]
    done = bench(work, without_openvino(work), *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "UNet step" in done.stdout  # the table was printed
    assert "OpenVINO peer is skipped" in done.stdout
    return json.loads(out.read_text())


def test_openvino_peer_is_skipped_with_a_note_without_the_extra(report):
    assert "openvino" in report["skipped"]
    assert report["openvino"]["details"] == {} and report["parity_openvino"] is None


def test_openvino_provider_without_the_extra_fails_before_any_export(tmp_path):
    done = bench(tmp_path, without_openvino(tmp_path), "--provider", "openvino")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "--provider openvino: OpenVINO is not installed" in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built or exported


def test_json_has_every_ratio_as_a_positive_number(report):
    for name in RATIOS:
        assert report["ratios"][name] > 0, name


def test_both_systems_have_every_figure(report):
    for system in ("runtime", "diffusers"):
        for key in FIGURES:
            assert report[system][key] > 0, (system, key)
        assert set(report[system]["details"]) == {"cold_start", "text_encode", "unet_step", "vae_decode", "total",
                                                  "peak_rss"}  # fmt: skip


def test_runtime_workers_never_import_torch(report):
    assert not any(item["torch_imported"] for item in report["runtime"]["details"].values())
    assert all(item["torch_imported"] for item in report["diffusers"]["details"].values())


def test_environment_sizes_and_machine_are_recorded(report):
    env = report["env_mb"]
    assert env["runtime"] > 0 and env["diffusers"] > 0
    assert "torch" in env["diffusers_packages"] and "torch" not in env["runtime_packages"]
    machine = report["machine"]
    assert machine["threads"] >= 1 and len(machine["loadavg_start"]) == 3
    assert report["settings"]["steps"] == 2 and report["settings"]["unet_batch"] == 2


def test_int8_export_is_a_column_beside_the_unquantized_one(tmp_path):
    """--provider openvino --quantize int8: the runtime_int8 system runs the int8 export beside the
    runtime's own, and its image is compared with diffusers fp32 and with ours at f32."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = tmp_path / "out.json"
    args = ["--provider", "openvino", "--quantize", "int8", "--calibration-samples", "8", "--calibration-size", "64",
            "--steps", "2", "--height", "64", "--width", "64", "--repeats", "1", "--retries", "0", "--figures",
            "total,peak_rss", "--systems", "runtime,runtime_int8,diffusers", "--json", str(out)]  # fmt: skip
    done = bench(tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"}, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["runtime_int8"]["total_s"] > 0 and report["runtime_int8"]["peak_rss_mb"] > 0
    assert report["ratios_int8"]["total"] > 0 and "int8 ratio" in done.stdout
    for reference in ("diffusers_fp32", "runtime_f32"):
        assert report["parity_int8"][reference]["psnr_db"] > 0, reference


def test_quantize_without_the_openvino_provider_is_one_line(tmp_path):
    done = bench(tmp_path, dict(os.environ), "--quantize", "int8")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--quantize int8 goes with --provider openvino" in done.stderr
