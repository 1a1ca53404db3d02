"""`python -m runtime upscale`: A1111's Extras upscaling of image files with an export's upscalers,
without loading its Stable Diffusion graphs. One line on stderr and exit code 2 for bad input;
nothing is written unless every image upscaled."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import InvalidRequestError, UserError
from .images.metadata import save_png
from .limits import MAX_PIXELS
from .options import Parser, positive


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(
        prog="python -m runtime upscale",
        description="Upscale images with an exported model upscaler (python -m export --add-upscaler), as A1111's "
        "Extras tab does.",
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--model", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--upscaler", required=True, help="an added upscaler (A1111 or file name), Lanczos, Nearest")
    parser.add_argument("--scale", type=float, default=2.0, help="upscale by this factor (default 2, at most 8)")
    parser.add_argument("--resize", help="upscale to WxH instead of by --scale")
    parser.add_argument("--no-crop", action="store_true", help="with --resize: keep the aspect ratio, do not crop")
    parser.add_argument("--upscaler-2", default="None", help="blended with the first upscaler's result")
    parser.add_argument("--upscaler-2-visibility", type=float, default=0.0, help="0..1 weight of --upscaler-2")
    parser.add_argument("--provider", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--threads", type=positive, help="onnxruntime intra-op threads")
    parser.add_argument("--max-pixels", type=positive, default=MAX_PIXELS, help="refuse results above this size")
    parser.add_argument("--output", type=Path, required=True, help="PNG path, or a folder for several images")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def output_paths(images: list[Path], output: Path) -> list[Path]:
    if len(images) == 1 and not output.is_dir():
        if output.suffix.lower() != ".png":
            raise InvalidRequestError("output", f"{output} must end in .png")
        return [output]
    if not output.is_dir():
        raise InvalidRequestError("output", f"{output} must be an existing folder for several images")
    return [output / f"{image.stem}.png" for image in images]


def run(args: argparse.Namespace) -> list[Path]:
    from .graphs.upscalers import UpscalerSessions
    from .images.extras import ExtrasOptions, check_options, infotext, run_extras
    from .images.inputs import load_image

    width = height = 0
    if args.resize:
        text_w, _, text_h = args.resize.lower().partition("x")
        if not (text_w.isdigit() and text_h.isdigit()):
            raise InvalidRequestError("resize", f"must be WIDTHxHEIGHT, e.g. 2048x2048, not {args.resize!r}")
        width, height = int(text_w), int(text_h)
    options = ExtrasOptions(
        1 if args.resize else 0, args.scale, width, height, not args.no_crop, args.upscaler, args.upscaler_2,
        args.upscaler_2_visibility,
    )  # fmt: skip
    sessions = UpscalerSessions.from_folder(args.model, args.provider, args.threads)
    check_options(options, sessions)
    paths = output_paths(args.images, args.output)
    images = [load_image(path, "images") for path in args.images]
    results = [run_extras(image, options, sessions, args.max_pixels) for image in images]
    for path, (image, info) in zip(paths, results, strict=True):
        save_png(image, path, infotext(info))
    return paths


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        paths = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: could not write the image: {error.strerror or error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
