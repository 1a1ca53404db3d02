"""`python -m runtime`: generate images from an exported model folder.

Bad input gets one line on stderr and exit code 2, and no file is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import InvalidRequestError, UserError
from .metadata import save_png
from .rng import RNG_KINDS
from .schedules import SAMPLERS, SCHEDULES
from .sessions import PROVIDERS

log = logging.getLogger("runtime")


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors follow the CLI's rule: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="python -m runtime", description="Text-to-image with an exported SD1.x model, no torch.")
    parser.add_argument("--model", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--prompt", required=True, help="A1111 prompt syntax: (word:1.2), [word], BREAK")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg-scale", type=float, default=11.0)
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
    parser.add_argument("--width", type=int, help="default: the model's native size (512 for SD1.x)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--batch-size", type=int, default=1, help="images of seeds seed, seed+1, ...")
    parser.add_argument("--sampler", default="euler_a", help=f"one of {', '.join(SAMPLERS)}")
    parser.add_argument("--schedule", default="model", help=f"one of {', '.join(SCHEDULES)}")
    parser.add_argument("--rng", default="cpu", help=f"{' or '.join(RNG_KINDS)}: torch CPU or A1111 'NV' noise")
    parser.add_argument("--eta-noise-seed-delta", type=int, default=0, help="A1111's ENSD")
    parser.add_argument("--provider", default="auto", help=f"one of {', '.join(PROVIDERS)}")
    parser.add_argument("--threads", type=int, help="CPU threads for onnxruntime (default: physical cores)")
    parser.add_argument(
        "--optimized-cache",
        action="store_true",
        help="save ORT's optimized graphs at the first load and reuse them (fp32 on CPU: faster start, more disk)",
    )
    parser.add_argument("--lora-dir", type=Path, help="folder of kohya/A1111 .safetensors LoRAs for <lora:name:weight>")
    parser.add_argument("--embeddings-dir", type=Path, help="folder of textual-inversion .safetensors embeddings")
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
    """Refuse before the long run, not after it."""
    for path in paths:
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise InvalidRequestError("output", f"{path} is a folder")
        if not folder.is_dir():
            raise InvalidRequestError("output", f"folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise InvalidRequestError("output", f"folder {folder} is not writable")


def run(args: argparse.Namespace) -> list[tuple[Path, int]]:
    """Check everything cheap first (manifest, parameters, output paths), then load and run."""
    from .lora import LoraLibrary
    from .model_folder import read_manifest, read_scheduler_config
    from .pipeline import Pipeline, build_request
    from .sessions import resolve_provider

    manifest = read_manifest(args.model)
    request = build_request(
        manifest, read_scheduler_config(manifest.folder), prompt=args.prompt, negative_prompt=args.negative_prompt,
        steps=args.steps, guidance_scale=args.cfg_scale, width=args.width, height=args.height, seed=args.seed,
        batch_size=args.batch_size, sampler=args.sampler, schedule=args.schedule, rng=args.rng,
        eta_noise_seed_delta=args.eta_noise_seed_delta,
    )  # fmt: skip
    resolve_provider(args.provider)
    library = LoraLibrary(args.lora_dir)
    for use in request.loras:  # names and files checked before the model loads
        library.get(use.name)
    paths = output_paths(args.output, len(request.seeds))
    check_writable(paths)
    pipe = Pipeline.from_pretrained(
        args.model, provider=args.provider, threads=args.threads, optimized_cache=args.optimized_cache,
        lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
    )  # fmt: skip
    with tqdm(desc="sampling", unit="step") as bar:

        def progress(step: int, total: int, latents: object) -> None:
            bar.total = total  # the schedule's count (A1111's DDIM runs one step fewer than asked)
            bar.update(1)

        out = pipe(
            args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=args.cfg_scale, width=args.width, height=args.height, seed=request.seeds[0],
            num_images_per_prompt=args.batch_size, sampler=args.sampler, schedule=args.schedule, rng=args.rng,
            eta_noise_seed_delta=args.eta_noise_seed_delta, callback=progress,
        )  # fmt: skip
    for path, image, text in zip(paths, out.images, out.infotexts, strict=True):
        save_png(image, path, text)
    return list(zip(paths, out.seeds, strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        saved = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
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
