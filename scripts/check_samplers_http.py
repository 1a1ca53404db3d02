"""Every A1111 sampler over HTTP against A1111's own image, on a random SD1.x model no test has seen.

Builds a random-weight model with other widths and seed than models/tiny (MODEL below), exports it
fp32, starts the server with the torch stack blocked (as tests/test_server.py does: the runtime
runs without torch), and requests every A1111 1.10 sampler by its A1111 label with the Automatic
and Karras schedulers (`"sampler_name": "DPM++ 2M SDE", "scheduler": "karras"`), 20 steps, seed
114514, then `/sdapi/v1/img2img` at denoising strength 0.6 (Automatic) for each. The reference is
the tests' (tests/sampler_references.py): k-diffusion's and A1111's own sampling code driven as
A1111 1.10 drives it, on the diffusers pipeline of the same weights, with torch's CPU generator
(the requests ask for A1111's "CPU" randn source); img2img with A1111's step rule.
Prints one table: the max |PNG - reference| in levels of 255 (the PNG's own rounding, up to 0.5,
included) and whether it is within 1. Needs the dev install (torch, diffusers, k-diffusion, httpx).

    nice -n 10 python scripts/check_samplers_http.py [--work /tmp/samplers-http] [--size 128]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from sampler_references import Reference, Setup, init_image  # noqa: E402

import diffusers_reference as reference  # noqa: E402
from export.exporter import ExportOptions, run_export  # noqa: E402
from export.random_model import build_and_save  # noqa: E402
from runtime.registry import SAMPLERS  # noqa: E402

# Other widths, depths and seed than models/tiny (UNet 32/32/64/64, text width 32, 3 layers, seed 0).
MODEL_SEED = 2024
MODEL = {
    "unet": {
        "block_out_channels": [32, 48, 64, 96], "norm_num_groups": 16, "layers_per_block": 2,
        "attention_head_dim": 8, "cross_attention_dim": 48,
    },
    "text_encoder": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4, "projection_dim": 48},
    "vae": {"block_out_channels": [16, 32, 32, 48]},
}  # fmt: skip
STEPS, SEED, CFG, STRENGTH = 20, 114514, 7.0, 0.6
SCHEDULERS = ("automatic", "karras")
TORCH_STACK = ("torch", "transformers", "diffusers", "optimum")
LAUNCHER = (
    "import runpy, sys\n"
    f"for name in {TORCH_STACK!r}: sys.modules[name] = None\n"
    "runpy.run_module('runtime.server', run_name='__main__', alter_sys=True)\n"
)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-c", LAUNCHER, "--model", str(model), "--port", str(port), "--provider", "cpu"]
    env = {key: value for key, value in os.environ.items() if key != "ACERTAIN_API_AUTH"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise SystemExit(f"server not healthy after 120 s:\n{log.read_text()}")


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(client: httpx.Client, path: str, body: dict) -> np.ndarray:
    answer = client.post(path, json=body)
    if answer.status_code != 200:
        raise RuntimeError(f"{path} {body['sampler_name']} / {body['scheduler']}: {answer.status_code} {answer.text}")
    data = base64.b64decode(answer.json()["images"][0])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/samplers-http"))
    parser.add_argument("--size", type=int, default=128, help="image width and height (default %(default)s)")
    parser.add_argument("--samplers", default="", help="comma-separated A1111 labels (default: all)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.samplers.split(",") if name.strip()]
    samplers = [info for info in SAMPLERS if not chosen or info.name in chosen]
    warnings.filterwarnings("ignore")  # torchsde's "Should have ..." clamps of the rounded tree ends
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "source" / "tiny-diffusers"
    if not source.exists():
        build_and_save("tiny", args.work / "source", seed=MODEL_SEED, single_file=False, overrides=MODEL)
    exported = args.work / "onnx-fp32"
    if not exported.exists():
        run_export(ExportOptions(model=str(source), output=exported, precision="fp32"))
    setup = Setup(seed=SEED, cfg=CFG, size=args.size)
    raw_config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    a1111 = Reference(reference.load(source), raw_config, setup)
    image = init_image(args.size)
    settings = {"CLIP_stop_at_last_layers": 2, "randn_source": "CPU"}
    common = {
        "prompt": setup.prompt, "negative_prompt": setup.negative, "seed": SEED, "steps": STEPS, "cfg_scale": CFG,
        "width": args.size, "height": args.size, "override_settings": settings,
    }  # fmt: skip
    process, url = start_server(exported, args.work / "server.log")
    rows = []
    started = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for info in samplers:
                for scheduler in SCHEDULERS:
                    body = {**common, "sampler_name": info.name, "scheduler": scheduler}
                    got = request(client, "/sdapi/v1/txt2img", body)
                    expected = a1111.txt2img(info.key, scheduler, STEPS)[0] * 255
                    rows.append((info.name, scheduler.capitalize(), "txt2img", np.abs(got - expected).max()))
                body = {**common, "sampler_name": info.name, "scheduler": "automatic"}
                body.update(init_images=[png_base64(image)], denoising_strength=STRENGTH)
                got = request(client, "/sdapi/v1/img2img", body)
                expected = a1111.img2img(info.key, "automatic", STEPS, STRENGTH, image)[0] * 255
                rows.append((info.name, "Automatic", f"img2img {STRENGTH}", np.abs(got - expected).max()))
                print(f"  {info.name} done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(30)
    print(f"Machine: {cpu_name()}; model: random SD1.x (seed {MODEL_SEED}, {json.dumps(MODEL)}), fp32 export,")
    print(f"{args.size}x{args.size}, {STEPS} steps, seed {SEED}, CFG {CFG:g}; {time.monotonic() - started:.0f} s.\n")
    print("| sampler | scheduler | mode | max abs diff /255 | pass |")
    print("|---|---|---|---|---|")
    for name, scheduler, mode, diff in rows:
        print(f"| {name} | {scheduler} | {mode} | {diff:.3f} | {'yes' if diff <= 1.0 else 'NO'} |")
    failed = sum(diff > 1.0 for *_, diff in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} within 1/255")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
