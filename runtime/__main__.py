"""`python -m runtime`: generate images from an exported model folder (`python -m runtime upscale ...`:
upscale image files, runtime.upscale_cli).

Bad input gets one line on stderr and exit code 2, and no file is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .control.request import ControlUnit
from .errors import InvalidRequestError, UserError
from .images.metadata import save_png
from .limits import MAX_CONTROLNET_UNITS, MAX_PIXELS
from .options import Parser, add_addon_options, add_session_options, load_options, positive
from .registry import RNG_LABELS, SAMPLERS, SCHEDULE_LABELS

# ControlUnit's fields that --controlnet takes: all but the server's (enabled, save_detected_map, low_vram).
UNIT_KEYS = tuple(item.name for item in fields(ControlUnit) if item.name not in ("enabled", "save_detected_map",
                                                                                 "low_vram"))  # fmt: skip

if TYPE_CHECKING:
    from .pipeline import Planner, Prepared

log = logging.getLogger("runtime")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m runtime", description="Text-to-image with an exported SD1.x model, no torch.")
    parser.add_argument("--model", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--prompt", required=True, help="A1111 prompt syntax: (word:1.2), [word], BREAK")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg-scale", type=float, default=11.0)
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
    parser.add_argument("--width", type=int, help="default: the model's native size (512 for SD1.x)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--batch-size", type=int, default=1, help="images of seeds seed, seed+1, ...")
    parser.add_argument(
        "--sampler", default="euler_a", help=f"one of {', '.join(s.key for s in SAMPLERS)} or an A1111 name"
    )
    parser.add_argument("--schedule", default="model", help=f"one of {', '.join(SCHEDULE_LABELS)}")
    parser.add_argument("--rng", default="cpu", help=f"{' or '.join(RNG_LABELS)}: torch CPU or A1111 'NV' noise")
    parser.add_argument("--eta-noise-seed-delta", type=int, default=0, help="A1111's ENSD")
    parser.add_argument(
        "--clip-skip", type=int,
        help="A1111's CLIP_stop_at_last_layers (1 = last layer): one the model was exported with (its manifest's "
        "clip_skips); default: the export's first",
    )  # fmt: skip
    parser.add_argument(
        "--pad-conds", action="store_true",
        help="A1111's 'Pad prompt/negative prompt': prompt and negative prompt of different 75-token chunk counts "
        "share one UNet call (faster, another image; off as in the web UI)",
    )  # fmt: skip
    parser.add_argument(
        "--no-prompt-comments", dest="prompt_comments", action="store_false",
        help="keep '#' in prompts as text (default, as A1111 1.8+: '#' hides the rest of its line)",
    )  # fmt: skip
    image = parser.add_argument_group("img2img and inpainting")
    image.add_argument("--init-image", type=Path, help="img2img: start from this image")
    image.add_argument("--strength", type=float, help="img2img denoising strength in [0, 1] (default 0.75)")
    image.add_argument("--resize-mode", type=int, default=0, help="0 just resize, 1 crop and resize, 2 resize and fill")
    image.add_argument("--mask", type=Path, help="inpainting: white is repainted (needs --init-image)")
    image.add_argument("--mask-blur", type=int, default=4)
    image.add_argument(
        "--inpainting-fill", default="original", help="masked content: original, fill, latent noise, latent nothing"
    )
    image.add_argument("--inpaint-full-res", action="store_true", help="inpaint only the masked area, then paste")
    image.add_argument("--inpaint-padding", type=int, default=32, help="pixels around the masked area")
    image.add_argument("--mask-invert", action="store_true", help="repaint what the mask leaves black")
    hires = parser.add_argument_group("hires fix (txt2img)")
    hires.add_argument("--hires-scale", type=float, help="turn hires fix on and upscale by this factor")
    hires.add_argument("--hires-resize", help="turn hires fix on with a target size WxH instead of a factor")
    hires.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (0: as --steps)")
    hires.add_argument(
        "--hires-upscaler", default="Latent", help="Latent (...), Lanczos, Nearest, None or an added model upscaler"
    )
    hires.add_argument("--hires-prompt", default="")
    hires.add_argument("--hires-negative-prompt", default="")
    hires.add_argument("--hires-sampler", help="second-pass sampler (default: --sampler)")
    parser.add_argument(
        "--denoising-strength",
        type=float,
        help="hires denoising strength (0.7); img2img strength if no --strength",
    )
    parser.add_argument("--vae-tiling", default="auto", help="auto, on or off: tiled VAE decode/encode")
    control = parser.add_argument_group("ControlNet")
    control.add_argument(
        "--controlnet", action="append", default=[], metavar="KEY=VALUE,...",
        help="a ControlNet unit (repeat for several), e.g. model=control_canny,image=edges.png,module=canny,"
        f"weight=0.8; keys: {', '.join(UNIT_KEYS)}",
    )  # fmt: skip
    control.add_argument(
        "--max-controlnet-units", type=positive, default=MAX_CONTROLNET_UNITS,
        help="enabled ControlNet units per run (%(default)s)",
    )  # fmt: skip
    add_session_options(parser)
    parser.add_argument(
        "--max-pixels", type=positive, default=MAX_PIXELS,
        help="refuse width*height above this (default %(default)s, as the server); raise it knowingly",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action="store_true", help="check the graph files against the manifest's sha256 before loading"
    )
    parser.add_argument(
        "--optimized-cache",
        action="store_true",
        help="save ORT's optimized graphs at the first load and reuse them (fp32 on CPU: faster start, more disk)",
    )
    add_addon_options(parser)
    parser.add_argument("--output", type=Path, default=Path("out.png"), help="PNG path; batches add -1, -2, ...")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def output_paths(output: Path, count: int) -> list[Path]:
    if output.suffix.lower() != ".png":
        raise InvalidRequestError("output", f"{output} must end in .png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def check_writable(paths: list[Path]) -> None:
    """Refuse before the long run, not after it. Writing a scratch file is the only test that also
    holds for root, read-only mounts and /proc (os.access says yes to root everywhere)."""
    for path in paths:
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise InvalidRequestError("output", f"{path} is a folder")
        if not folder.is_dir():
            raise InvalidRequestError("output", f"cannot write {path}: folder {folder} does not exist")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".acertain-write-test-"):
                pass
        except OSError as error:
            raise InvalidRequestError(
                "output", f"cannot write {path}: folder {folder} is not writable ({error.strerror or error})"
            ) from None


def prepare_from_args(args: argparse.Namespace, planner: Planner) -> Prepared:
    """The generation the arguments ask for, checked and planned as the server plans it, before any
    graph loads."""
    units = [parse_unit(text, f"controlnet[{index}]") for index, text in enumerate(args.controlnet)]
    return planner.prepare(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.cfg_scale, width=args.width, height=args.height, seed=args.seed,
        num_images_per_prompt=args.batch_size, sampler=args.sampler, schedule=args.schedule, rng=args.rng,
        eta_noise_seed_delta=args.eta_noise_seed_delta, pad_conds=args.pad_conds, vae_tiling=args.vae_tiling,
        max_pixels=args.max_pixels, prompt_comments=args.prompt_comments, clip_skip=args.clip_skip,
        controlnet=units, max_controlnet_units=args.max_controlnet_units,
        **mode_options(args),
    )  # fmt: skip


def mode_options(args: argparse.Namespace) -> dict[str, Any]:
    """prepare()'s img2img / inpainting / hires keywords from the arguments."""
    if args.init_image is not None:
        strength = args.strength if args.strength is not None else args.denoising_strength
        options: dict[str, Any] = {"image": args.init_image, "strength": 0.75 if strength is None else strength,
                                   "resize_mode": args.resize_mode}  # fmt: skip
        if args.mask is not None:
            options.update(
                mask_image=args.mask, mask_blur=args.mask_blur, inpainting_fill=args.inpainting_fill,
                inpaint_full_res=args.inpaint_full_res, inpaint_full_res_padding=args.inpaint_padding,
                inpainting_mask_invert=args.mask_invert,
            )  # fmt: skip
        return options
    if args.mask is not None or args.strength is not None:
        raise InvalidRequestError("init_image", "--mask and --strength need --init-image")
    if args.hires_scale is None and args.hires_resize is None:
        return {}
    resize_x, resize_y = parse_size(args.hires_resize) if args.hires_resize else (0, 0)
    hires = {
        "hr_scale": 2.0 if args.hires_scale is None else args.hires_scale, "hr_resize_x": resize_x,
        "hr_resize_y": resize_y, "hr_upscaler": args.hires_upscaler, "hr_second_pass_steps": args.hires_steps,
        "denoising_strength": 0.7 if args.denoising_strength is None else args.denoising_strength,
        "hr_prompt": args.hires_prompt, "hr_negative_prompt": args.hires_negative_prompt,
        "hr_sampler_name": args.hires_sampler,
    }  # fmt: skip
    return {"enable_hr": True, "hires_options": hires}


def parse_unit(text: str, field: str = "controlnet") -> ControlUnit:
    """--controlnet's KEY=VALUE,KEY=VALUE: ControlUnit's fields, each value typed as the field wants
    (numbers, true/false, an index or a word for the modes; image and mask are paths)."""
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in UNIT_KEYS:
            keys = ", ".join(UNIT_KEYS)
            raise InvalidRequestError(field, f"{item.strip()!r} is not KEY=VALUE with a key of {keys}")
        values[key] = _unit_value(key, value.strip(), f"{field}.{key}")
    return ControlUnit(**values)


def _unit_value(key: str, value: str, field: str) -> Any:
    if key == "pixel_perfect":
        if value.lower() not in ("true", "false"):
            raise InvalidRequestError(field, f"must be true or false, not {value!r}")
        return value.lower() == "true"
    if key in ("weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b"):
        try:
            return float(value)
        except ValueError:
            raise InvalidRequestError(field, f"must be a number, not {value!r}") from None
    if key in ("control_mode", "resize_mode", "hr_option") and value.isdigit():
        return int(value)
    return Path(value) if key in ("image", "mask") else value


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise InvalidRequestError("hires_resize", f"must be WIDTHxHEIGHT, e.g. 1024x768, not {text!r}")
    return int(width), int(height)


def run(args: argparse.Namespace) -> list[tuple[Path, int]]:
    """Check everything cheap first (manifest, parameters, output paths), then load and run."""
    from .graphs.sessions import resolve_provider
    from .pipeline import Pipeline, Planner

    # LoRA names and files, embeddings and the VAE are checked here, before the model loads
    prepared = prepare_from_args(args, Planner.from_folder(args.model, args.lora_dir, args.embeddings_dir, args.vae))
    resolve_provider(args.provider)
    paths = output_paths(args.output, len(prepared.seeds))
    check_writable(paths)
    pipe = Pipeline.from_pretrained(
        args.model, optimized_cache=args.optimized_cache, verify=args.verify, **load_options(args)
    )
    print(f"running on {pipe.provider_choice}", file=sys.stderr)
    with tqdm(desc="sampling", unit="step") as bar:

        def progress(step: int, total: int, latents: object) -> None:
            if step == 1:  # a new pass (hires fix runs two); the schedule's count, not --steps
                bar.reset(total)
            bar.update(1)

        out = pipe.run(prepared, callback=progress)
    for path, image, text in zip(paths, out.images, out.infotexts, strict=True):
        save_png(image, path, text)
    return list(zip(paths, out.seeds, strict=True))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upscale"]:
        from .upscale_cli import main as upscale_main

        return upscale_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        saved = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of system memory; use a smaller size or batch", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: could not write the image: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    for path, seed in saved:
        print(f"{path}  (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
