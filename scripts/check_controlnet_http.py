"""A ControlNet canny unit over HTTP (webuiapi) against diffusers, on a random SD1.x model no test has seen.

Builds the random-weight model of scripts/check_samplers_http.py (other widths, depths and seed than
models/tiny), exports it fp32, builds a random ControlNet for its UNet and saves it as one
lllyasviel-layout .safetensors file, adds that with `python -m export --add-controlnet FILE
--output EXPORT`, and starts the server on the export with the torch stack blocked. Then, with
webuiapi 0.9.17 as a user would call it:

- `/controlnet/model_list` lists the added ControlNet;
- `/controlnet/detect` with module canny returns OpenCV's canny map, exactly;
- txt2img with `ControlNetUnit(image, module="canny", model=<its model_list title>)`, Euler a with
  the Diffusers scheduler (the library's default step rule), 20 steps, seed 114514, CFG 7, randn
  source CPU, the export's default clip skip, gives diffusers' StableDiffusionControlNetPipeline
  image given OpenCV's canny map (tests/controlnet_hook_reference.py) within 1/255, and returns the
  map after it, as the extension does; without the unit the image differs (the ControlNet acts).

Prints one table: max |ours - reference| in levels of 255 (a PNG's own rounding, up to 0.5,
included) and whether it passes. Needs the dev install (torch, diffusers, opencv, webuiapi, httpx).

    nice -n 10 python scripts/check_controlnet_http.py [--work /tmp/controlnet-http] [--size 128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webuiapi
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]

import controlnet_hook_reference as hook  # noqa: E402
from check_samplers_http import MODEL, MODEL_SEED, cpu_name, start_server  # noqa: E402
from test_controlnet import NEGATIVE, PROMPT, control_image, opencv_canny  # noqa: E402

from export.exporter import ExportOptions, run_export  # noqa: E402
from export.random_model import build_and_save, build_and_save_controlnet  # noqa: E402
from runtime.graphs.model_folder import read_manifest  # noqa: E402

STEPS, SEED, CFG, CONTROLNET_SEED = 20, 114514, 7.0, 7
LOW, HIGH = 100, 200  # canny thresholds (the unit's threshold_a / threshold_b)
REFERENCE_CLIP_SKIP = 2  # diffusers_reference.clip_skip_embeddings' clip skip


def build(work: Path) -> tuple[Path, Path, Path]:
    """(diffusers source, export with the ControlNet added, the ControlNet's diffusers folder)."""
    source = work / "source" / "tiny-diffusers"
    if not source.exists():
        build_and_save("tiny", work / "source", seed=MODEL_SEED, single_file=False, overrides=MODEL)
    exported = work / "onnx-fp32"
    controlnet = work / "controlnet"
    if not exported.exists():
        # from_unet draws the hint encoder's first layers from torch's global generator: seeded, and
        # built with the export only, so that the reference always loads the ControlNet exported.
        torch.manual_seed(CONTROLNET_SEED)
        single_file = build_and_save_controlnet(source / "unet", controlnet, CONTROLNET_SEED)["single_file"]
        run_export(ExportOptions(model=str(source), output=exported, precision="fp32"))
        command = [sys.executable, "-m", "export", "--add-controlnet", str(single_file), "--output", str(exported)]
        subprocess.run(command, cwd=REPO, check=True, stdout=sys.stderr)
    return source, exported, controlnet / "control_tiny-diffusers"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/controlnet-http"))
    parser.add_argument("--size", type=int, default=128, help="image width and height (default %(default)s)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source, exported, controlnet_folder = build(args.work)
    clip_skip = read_manifest(exported).clip_skip
    if clip_skip != REFERENCE_CLIP_SKIP:
        raise SystemExit(f"the export's clip skip is {clip_skip}; the reference encodes at {REFERENCE_CLIP_SKIP}")
    from diffusers import ControlNetModel

    base = hook.reference.load(source)
    controlnet = ControlNetModel.from_pretrained(str(controlnet_folder)).eval()
    image = control_image(13, args.size)
    canny = opencv_canny(image, LOW, HIGH)
    rows: list[tuple[str, float | None, bool]] = []
    started = time.monotonic()
    process, url = start_server(exported, args.work / "server.log")
    try:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        titles = api.controlnet_model_list()
        listed = [title for title in titles if title.split(" [")[0] == "control_tiny"]
        rows.append((f"/controlnet/model_list lists the model ({', '.join(titles)})", None, len(listed) == 1))
        title = listed[0] if listed else "control_tiny"
        detected = api.controlnet_detect([Image.fromarray(image)], "canny", args.size, LOW, HIGH).images[0]
        diff = float(np.abs(pixels(detected) - canny).max())
        rows.append(("/controlnet/detect canny == OpenCV's Canny (exact)", diff, diff == 0))
        unit = webuiapi.ControlNetUnit(image=Image.fromarray(image), module="canny", model=title,
                                       processor_res=args.size, threshold_a=LOW, threshold_b=HIGH)  # fmt: skip
        result = api.txt2img(
            prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG, width=args.size,
            height=args.size, sampler_name="Euler a", scheduler="Diffusers", controlnet_units=[unit],
            override_settings={"randn_source": "CPU"}, alwayson_scripts={},
        )  # fmt: skip
        plain = api.txt2img(
            prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG, width=args.size,
            height=args.size, sampler_name="Euler a", scheduler="Diffusers", override_settings={"randn_source": "CPU"},
            alwayson_scripts={},  # webuiapi 0.9.17 fills its default dict in place: the unit would stay
        )  # fmt: skip
    finally:
        process.terminate()
        process.wait(30)
    expected = hook.diffusers_controlnet(base, [controlnet], [canny], [1.0], PROMPT, NEGATIVE, [SEED], STEPS, CFG)
    diff = float(np.abs(pixels(result.images[0]) - expected[0] * 255).max())
    rows.append((f"txt2img {title}, canny unit == diffusers' ControlNet pipeline", diff, diff <= 1.0))
    diff = float(np.abs(pixels(result.images[1]) - canny).max()) if len(result.images) == 2 else float("inf")
    rows.append(("txt2img returns OpenCV's canny map after the image (exact)", diff, diff == 0))
    # A ControlNet whose residuals were ~0 would pass the comparison above without being run at all.
    diff = float(np.abs(pixels(plain.image) - expected[0] * 255).max())
    rows.append(("the same txt2img without the unit differs (needs > 5)", diff, diff > 5.0))
    print(f"Machine: {cpu_name()}; model: random SD1.x (seed {MODEL_SEED}, scripts/check_samplers_http.py's MODEL),")
    print(f"fp32 export, random ControlNet (seed {CONTROLNET_SEED}) added from one lllyasviel-layout file;")
    print(f"{args.size}x{args.size}, Euler a, {STEPS} steps, seed {SEED}, CFG {CFG:g}, clip skip {clip_skip}, canny")
    print(f"{LOW}/{HIGH}; {time.monotonic() - started:.0f} s.\n")
    print("| check | max abs diff /255 | pass |")
    print("|---|---|---|")
    for check, diff, passed in rows:
        print(f"| {check} | {'-' if diff is None else f'{diff:.3f}'} | {'yes' if passed else 'NO'} |")
    failed = sum(not passed for *_, passed in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} checks pass")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
