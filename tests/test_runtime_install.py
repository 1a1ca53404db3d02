"""The runtime installed alone (`pip install .`) in a fresh virtual environment: no torch stack in
`pip freeze`, and it generates an image there, from the CLI and from the API."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from conftest import REPO

FORBIDDEN = ("torch", "transformers", "diffusers", "optimum")


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    """A fresh venv with only `pip install .` (packages come from the package index)."""
    root = tmp_path_factory.mktemp("runtime-env")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        check=True,
        timeout=900,
        cwd=root,
    )
    return python


def installed_names(python: Path) -> set[str]:
    frozen = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    return {line.split("==")[0].split(" @ ")[0].lower() for line in frozen.stdout.splitlines()}


def run_torch_free(python: Path, script: str, cwd: Path) -> str:
    """Run `script` in that environment; it must succeed with no torch-stack module loaded. Its stdout."""
    check = f"loaded = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\nassert not loaded, loaded\n"
    code = "import sys\n" + script + check
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pip_freeze_has_no_torch_stack(runtime_env):
    names = installed_names(runtime_env)
    assert not {name for name in names if name.startswith(FORBIDDEN)}, names
    assert {"onnxruntime", "numpy", "tokenizers", "ftfy", "pillow"} <= names


def test_cli_generates_an_image_without_torch(runtime_env, tiny_fp32, tmp_path):
    out = tmp_path / "out.png"
    result = subprocess.run(
        [str(runtime_env), "-m", "runtime", "--model", str(tiny_fp32), "--prompt", "1girl", "--seed", "114514",
         "--width", "64", "--height", "64", "--steps", "4", "--output", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "Seed: 114514" in out.read_bytes().decode("latin-1")
    refused = subprocess.run(
        [str(runtime_env), "-m", "runtime", "--model", str(tiny_fp32), "--prompt", "x", "--width", "65"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.startswith("error: width")


def test_api_never_imports_the_torch_stack(runtime_env, tiny_fp32, tmp_path):
    script = (
        "from runtime import Pipeline\n"
        f"pipe = Pipeline.from_pretrained({str(tiny_fp32)!r})\n"
        "out = pipe('1girl', seed=1, width=64, height=64, num_inference_steps=2)\n"
        "from PIL import Image\n"
        "mask = Image.new('L', (64, 64))\n"
        "mask.paste(255, (16, 16, 48, 48))\n"
        "pipe('1girl', seed=1, num_inference_steps=2, image=out.images[0], strength=0.6)\n"
        "pipe('1girl', seed=1, num_inference_steps=2, image=out.images[0], mask_image=mask)\n"
        "hires = pipe('1girl', seed=1, width=64, height=64, num_inference_steps=2, enable_hr=True,"
        " hires_options={'hr_scale': 2, 'hr_upscaler': 'Lanczos'}, vae_tiling='on')\n"
        "assert 'runtime' in sys.modules and sys.modules['runtime'].__file__.find('site-packages') > 0\n"
        "print(out.images[0].size, hires.images[0].size)\n"
    )
    stdout = run_torch_free(runtime_env, script, tmp_path)
    assert stdout.strip() == "(64, 64) (128, 128)"


def test_lora_and_negative_embedding_without_torch_equal_diffusers(runtime_env, tiny_source, tiny_fp32, tmp_path):
    """The add-ons in the runtime-only install: `<lora:x:0.8>` in the prompt and a 2-vector
    embedding in the negative prompt (EasyNegative-style) give diffusers' image (load_lora_weights
    at 0.8 + load_textual_inversion) within 1/255 at fp32, with no torch module loaded."""
    pytest.importorskip("diffusers")
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from test_lora import kohya_lora

    import diffusers_reference as reference

    pipe = reference.load(tiny_source["diffusers"])
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    save_file(kohya_lora(pipe, 3, rank=4, alpha=2.0), str(tmp_path / "loras" / "x.safetensors"))
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(9)) * 0.5
    save_file({"emb_params": vectors}, str(tmp_path / "embeddings" / "easyneg.safetensors"))
    prompt, negative = "masterpiece, best quality, 1girl", "lowres, easyneg"
    pipe.load_lora_weights(str(tmp_path / "loras"), weight_name="x.safetensors", adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    pipe.load_textual_inversion(str(tmp_path / "embeddings" / "easyneg.safetensors"), token="easyneg")
    converted = pipe.maybe_convert_prompt(negative, pipe.tokenizer)
    expected = reference.generate(pipe, prompt, converted, "euler_a", [114514], steps=8)[0]
    script = (
        "import numpy as np\n"
        "from runtime import Pipeline\n"
        f"pipe = Pipeline.from_pretrained({str(tiny_fp32)!r}, lora_dir='loras', embeddings_dir='embeddings')\n"
        f"out = pipe({prompt + ' <lora:x:0.8>'!r}, negative_prompt={negative!r}, seed=114514, width=64, height=64,"
        " num_inference_steps=8, output_type='np')\n"
        "np.save('ours.npy', out.images[0])\n"
        "print(out.infotexts[0])\n"
    )
    stdout = run_torch_free(runtime_env, script, tmp_path)
    assert "Lora hashes" in stdout and "TI hashes" in stdout
    assert np.abs(np.load(tmp_path / "ours.npy") - expected).max() * 255 <= 1.0


def test_openvino_extra_stays_torch_free(runtime_env, tiny_source, tmp_path):
    """`pip install '.[openvino]'` adds OpenVINO beside onnxruntime (never replacing it) and still no
    torch stack; provider openvino generates there from an OpenVINO export. Runs last: it adds to
    the shared environment."""
    pytest.importorskip("openvino")  # the export side needs it in the test environment
    from export.exporter import ExportOptions, run_export

    subprocess.run(
        [str(runtime_env), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{REPO}[openvino]"],
        check=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    names = installed_names(runtime_env)
    assert not {name for name in names if name.startswith(FORBIDDEN)}, names
    assert {"openvino", "onnxruntime"} <= names and "onnxruntime-openvino" not in names
    folder = tmp_path / "tiny-openvino"
    run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=folder, target="openvino"))
    script = (
        "from runtime import Pipeline\n"
        f"out = Pipeline.from_pretrained({str(folder)!r}, provider='openvino')('1girl', seed=1, width=64, height=64,"
        " num_inference_steps=2)\n"
        "print(out.images[0].size)\n"
    )
    stdout = run_torch_free(runtime_env, script, tmp_path)
    assert stdout.strip() == "(64, 64)"
