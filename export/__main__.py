"""`python -m export`: turn an SD1.x checkpoint into validated ONNX graphs for the runtime."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from export.choices import DEFAULT_MODEL, PRECISIONS, TARGETS

if TYPE_CHECKING:
    from export.exporter import ExportReport

log = logging.getLogger("export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export an SD1.x checkpoint (diffusers folder, single .safetensors/.ckpt file or hub id) "
        "to validated ONNX graphs with clip skip built into the text encoder.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"source checkpoint (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--output",
        type=Path,
        help="folder to write, empty or new (default: ./<model name>-onnx, e.g. ACertainThing-onnx)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="graph precision (default: fp16)")
    parser.add_argument(
        "--clip-skip",
        type=clip_skips,
        default=(2, 1),
        help="A1111 counting (1 = last layer), one or several: 2,1 gives the text encoder one output each "
        "(shared layers; requests pick one); the first is the default. Default 2,1: 2 as ACertainThing's card asks",
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="cpu",
        help="cpu: fusions both providers run (default); cuda: adds GPU-only fusions (GroupNorm, packed attention); "
        "openvino: OpenVINO IR (plain graphs, fp16 = fp16-compressed weights) for --provider openvino",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="read .ckpt pickle files (weights only; no code is run)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="diffusers config folder for a single file whose architecture is not shipped",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export a single file's EMA UNet weights (model_ema.*); default: the non-EMA ones, as A1111 loads",
    )
    parser.add_argument(
        "--vae",
        help="separate VAE to use instead of the checkpoint's: A1111 .safetensors/.vae.pt/.ckpt (LDM layout; "
        "pickles need --allow-pickle) or a diffusers folder",
    )
    parser.add_argument(
        "--add-vae",
        metavar="FILE|FOLDER",
        help="add this VAE to the existing export in --output (nothing else is exported again), for the runtime's "
        "--vae NAME / sd_vae; stored under vaes/<name>/",
    )
    parser.add_argument("--vae-name", help="with --add-vae: the name to select it by (default: its file name)")
    parser.add_argument(
        "--add-upscaler",
        action="append",
        metavar="FILE",
        help="add this image upscaler (.pth/.safetensors: ESRGAN, Real-ESRGAN, SRVGGNetCompact, what spandrel "
        "loads; pickles need --allow-pickle) to the existing export in --output, for hires fix and Extras; "
        "repeatable; stored under upscalers/<name>/",
    )
    parser.add_argument(
        "--upscaler-name",
        help="with one --add-upscaler: the name to select it by (default: A1111's name for the file, else its stem)",
    )
    parser.add_argument(
        "--add-controlnet",
        metavar="FILE|FOLDER",
        help="add this SD1.x ControlNet (lllyasviel's .pth/.safetensors, e.g. control_v11p_sd15_canny; pickles need "
        "--allow-pickle; or a diffusers ControlNetModel folder) to the existing export in --output, for ControlNet "
        "units; stored under controlnets/<name>/",
    )
    parser.add_argument(
        "--controlnet-name", help="with --add-controlnet: the name to select it by (default: its file or folder name)"
    )
    parser.add_argument("--no-vae-encoder", action="store_true", help="skip the VAE encoder graph (img2img only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def clip_skips(text: str) -> tuple[int, ...]:
    """--clip-skip 2 or 2,1 (argparse turns the ValueError into a usage error)."""
    return tuple(int(part) for part in text.split(","))


def default_output(model: str) -> Path:
    """./ACertainThing-onnx for JosephusCheung/ACertainThing, ./model-onnx for model.safetensors."""
    name = Path(model.rstrip("/")).name
    return Path(f"{Path(name).stem if Path(model).is_file() else name}-onnx")


def summary_table(report: ExportReport) -> str:
    header = (
        f"{'graph':<13}{'precision':<11}{'export s':>9}{'optimize s':>11}{'validate s':>11}"
        f"{'rel. error':>12}{'tolerance':>11}"
    )
    lines = [header, "-" * len(header)]
    for graph in report.graphs:
        seconds = graph.seconds
        result = graph.validation
        lines.append(
            f"{graph.name:<13}{graph.precision:<11}{seconds.get('export', 0):>9.1f}{seconds.get('optimize', 0):>11.1f}"
            f"{seconds.get('validate', 0):>11.1f}{result.relative_error:>12.2e}{result.tolerance:>11.0e}"
            + (f"  ({graph.note})" if graph.note else "")
        )
    lines.append(f"wrote {report.output} in {report.seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.exporter import ExportOptions, run_export  # torch, diffusers, onnx: only once arguments are fine
    from runtime.errors import UserError

    # Our progress at INFO; the libraries' (onnxruntime's optimizer logs every fusion) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("export", "runtime"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.add_vae is not None:
        return add_vae_main(args)
    if args.add_upscaler:
        return add_upscaler_main(args)
    if args.add_controlnet is not None:
        return add_controlnet_main(args)
    if args.controlnet_name is not None:
        print("error: --controlnet-name goes with --add-controlnet", file=sys.stderr)
        return 2
    if args.upscaler_name is not None:
        print("error: --upscaler-name goes with --add-upscaler", file=sys.stderr)
        return 2
    if args.vae_name is not None:
        print("error: --vae-name goes with --add-vae", file=sys.stderr)
        return 2
    options = ExportOptions(
        model=args.model,
        output=args.output or default_output(args.model),
        precision=args.precision,
        clip_skips=args.clip_skip,
        target=args.target,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        config=args.config,
        vae_encoder=not args.no_vae_encoder,
        ema=args.ema,
        vae=args.vae,
    )

    def progress(name: str, index: int, total: int) -> None:
        log.info("[%d/%d] %s", index + 1, total, name)

    try:
        report = run_export(options, progress)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the output folder was not changed", file=sys.stderr)
        return 130
    print(summary_table(report))
    return 0


def add_vae_main(args: argparse.Namespace) -> int:
    from export.add_vae import AddVaeOptions, add_vae
    from runtime.errors import UserError

    if args.output is None:
        print("error: --add-vae needs --output, the existing export folder", file=sys.stderr)
        return 2
    options = AddVaeOptions(args.add_vae, args.output, args.vae_name, args.overwrite, args.allow_pickle)
    try:
        reports = add_vae(options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        log.info("%s: relative error %.2e (tolerance %.0e)", report.name, report.validation.relative_error,
                 report.validation.tolerance)  # fmt: skip
    print(f"added VAE {options.name or Path(args.add_vae.rstrip('/')).name} to {args.output}")
    return 0


def add_upscaler_main(args: argparse.Namespace) -> int:
    from export.add_upscaler import AddUpscalerOptions, add_upscalers
    from runtime.errors import UserError

    if args.output is None:
        print("error: --add-upscaler needs --output, the existing export folder", file=sys.stderr)
        return 2
    options = AddUpscalerOptions(args.add_upscaler, args.output, args.upscaler_name, args.overwrite, args.allow_pickle)
    try:
        reports = add_upscalers(options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(f"added upscaler {report.name} to {args.output} ({report.precision}, relative error "
              f"{report.validation.relative_error:.2e}, tolerance {report.validation.tolerance:.0e})")  # fmt: skip
    return 0


def add_controlnet_main(args: argparse.Namespace) -> int:
    from export.add_controlnet import AddControlNetOptions, add_controlnet, default_name
    from runtime.errors import UserError

    if args.output is None:
        print("error: --add-controlnet needs --output, the existing export folder", file=sys.stderr)
        return 2
    options = AddControlNetOptions(
        args.add_controlnet, args.output, args.controlnet_name, args.overwrite, args.allow_pickle
    )
    try:
        report = add_controlnet(options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name, result = options.name or default_name(args.add_controlnet), report.validation
    print(f"added ControlNet {name} to {args.output} ({report.precision}, relative error "
          f"{result.relative_error:.2e}, tolerance {result.tolerance:.0e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
