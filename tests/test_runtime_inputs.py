"""The runtime's own inputs: manifests that are valid JSON but not what the exporter writes,
weights corrupted on disk, sizes that would exhaust memory, bad thread counts and output paths,
and tools whose --help must answer before any heavy import. Each is one clear error: an exception
naming the field in the library, one line and exit code 2 in the CLIs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InvalidRequestError, ModelFolderError, NonFiniteError
from runtime.graphs.model_folder import read_manifest, verify_files
from runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, module: str = "runtime", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip


def _one_line_exit_2(run: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]  # besides progress bars
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


@pytest.fixture
def model_copy(tiny_fp32: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_fp32, tmp_path / "model"))


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda manifest: [1, 2], ("JSON list, not an object",)),
        (lambda manifest: None, ("JSON NoneType, not an object",)),
        (lambda manifest: {**manifest, "precision": "fp8"}, ("'precision' must be one of fp16, fp32", "'fp8'")),
        (lambda manifest: {**manifest, "clip_skip": "2"}, ("'clip_skip' must be a whole number",)),
        (lambda manifest: {**manifest, "vae_scaling_factor": -1}, ("'vae_scaling_factor' must be a positive",)),
        (lambda manifest: {**manifest, "graphs": {**manifest["graphs"], "unet": [1]}}, ("'unet' is not an object",)),
    ],
)
def test_manifests_of_the_wrong_shape_are_one_clear_error(model_copy: Path, change, words) -> None:
    _edit_manifest(model_copy, change)
    with pytest.raises(ModelFolderError):
        read_manifest(model_copy)
    _one_line_exit_2(_cli("--model", str(model_copy), "--prompt", "x", "--output", str(model_copy / "o.png")), *words)
    server = _cli("--model", str(model_copy), "--port", "1", module="runtime.server")
    _one_line_exit_2(server, *words)


def _corrupt_unet(folder: Path) -> None:
    """NaN over one UNet weight, keeping the file's size: what bit rot or a bad copy does."""
    onnx = pytest.importorskip("onnx")
    path = folder / "unet" / "model.onnx"
    size = path.stat().st_size
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda tensor: len(tensor.raw_data))
    weight.raw_data = np.full(len(weight.raw_data) // 4, np.nan, np.float32).tobytes()
    onnx.save(model, str(path))
    assert path.stat().st_size == size


def test_corrupt_weights_fail_loudly_and_verify_finds_them(model_copy: Path) -> None:
    _corrupt_unet(model_copy)
    pipe = Pipeline.from_pretrained(model_copy, provider="cpu", threads=1)
    with pytest.raises(NonFiniteError, match="corrupt"):
        pipe("a cat", num_inference_steps=2, width=64, height=64, seed=1)
    with pytest.raises(ModelFolderError, match="does not match its sha256"):
        verify_files(read_manifest(model_copy))
    output = model_copy / "out.png"
    args = ["--model", str(model_copy), "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64"]
    _one_line_exit_2(_cli(*args, "--output", str(output), "--threads", "1"), "NaN", "--verify", "fp32")
    _one_line_exit_2(_cli(*args, "--output", str(output), "--verify"), "unet/model.onnx", "sha256")
    assert not output.exists()


def test_verify_passes_on_an_intact_export(tiny_fp32: Path) -> None:
    Pipeline.from_pretrained(tiny_fp32, provider="cpu", threads=1, verify=True)


def test_sizes_past_the_pixel_limit_are_refused_before_loading(tiny_fp32: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_fp32), "--prompt", "x", "--output", str(tmp_path / "o.png")]
    line = _one_line_exit_2(_cli(*args, "--width", "100000", "--height", "100000", timeout=60), "--max-pixels")
    assert "10000000000 pixels" in line
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", threads=1)
    with pytest.raises(InvalidRequestError) as error:
        pipe.prepare(prompt="x", width=2048, height=1024)
    assert error.value.field == "width"
    assert pipe.prepare(prompt="x", width=2048, height=1024, max_pixels=None).request.width == 2048


def test_running_out_of_memory_is_one_line_without_gpu_on_the_cpu(tiny_fp32: Path, tmp_path: Path) -> None:
    # Address space capped at 3 GiB: a 1024x1024 tiny-model UNet needs far more (attention over 16384 tokens).
    probe = (
        "import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
        "sys.argv = ['runtime'] + sys.argv[1:]; runpy.run_module('runtime', run_name='__main__')"
    )
    args = ["--model", str(tiny_fp32), "--prompt", "x", "--steps", "1", "--width", "1024", "--height", "1024"]
    run = subprocess.run(
        [sys.executable, "-c", probe, *args, "--output", str(tmp_path / "o.png"), "--provider", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = _one_line_exit_2(run, "memory")
    assert "GPU" not in line


@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_must_be_at_least_one(tiny_fp32: Path, threads: str) -> None:
    _one_line_exit_2(_cli("--model", str(tiny_fp32), "--prompt", "x", "--threads", threads), "--threads")
    with pytest.raises(InvalidRequestError) as error:
        Pipeline.from_pretrained(tiny_fp32, provider="cpu", threads=int(threads))
    assert error.value.field == "threads"


def test_an_unwritable_output_folder_is_named_before_generating(tiny_fp32: Path) -> None:
    target = "/proc/acertain-out.png"  # not writable, even for root (os.access says otherwise)
    line = _one_line_exit_2(_cli("--model", str(tiny_fp32), "--prompt", "x", "--output", target, timeout=60))
    assert target in line and "not writable" in line


@pytest.mark.parametrize(
    "command",
    [
        "import export.__main__ as m; m.parse_args(['--help'])",
        "import runpy; sys.argv = ['build_random_model.py', '--help']; "
        "runpy.run_path('scripts/build_random_model.py', run_name='__main__')",
    ],
)
def test_help_answers_before_any_heavy_import(command: str) -> None:
    heavy = "{'torch', 'diffusers', 'onnx', 'transformers'}"
    probe = f"import sys\ntry:\n    {command}\nexcept SystemExit:\n    pass\nprint(sorted(set(sys.modules) & {heavy}))"
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "usage:" in run.stdout and run.stdout.strip().endswith("[]"), run.stdout + run.stderr
