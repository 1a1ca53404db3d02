"""Build a random-weight SD1.x pipeline from the shipped configs (no download), in diffusers layout
and as one LDM-layout .safetensors file.

    python scripts/build_random_model.py --arch tiny --out build/models
    python scripts/build_random_model.py --seed 7 --overrides '{"unet": {"block_out_channels": [32, 48, 64, 96]}}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.shipped import ARCHITECTURES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="tiny")
    parser.add_argument("--out", type=Path, default=Path("build/models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-single-file", action="store_true", help="skip the LDM .safetensors file")
    parser.add_argument(
        "--overrides", type=json.loads, default=None,
        help='JSON {"unet"|"vae"|"text_encoder": {config key: value}}: another model of the same family',
    )  # fmt: skip
    args = parser.parse_args()
    from export.random_model import build_and_save  # torch and diffusers: only once arguments are fine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    single = not args.no_single_file
    built = build_and_save(args.arch, args.out, args.seed, single_file=single, overrides=args.overrides)
    for layout, path in built.items():
        print(f"{layout}: {path}")


if __name__ == "__main__":
    main()
