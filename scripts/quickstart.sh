#!/usr/bin/env bash
# The main job end to end, offline: build a tiny random-weight SD1.x model, export it to ONNX,
# and generate a PNG with the torch-free runtime (ACertainThing's recipe, seed 114514).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export HF_HUB_OFFLINE=1
.venv/bin/python scripts/build_random_model.py --arch tiny --out build/models
.venv/bin/python -m export --model build/models/tiny-diffusers --output build/tiny-onnx --overwrite
.venv/bin/python -m runtime --model build/tiny-onnx \
    --prompt "masterpiece, best quality, 1girl" --negative-prompt "lowres" \
    --steps 28 --cfg-scale 11 --seed 114514 --width 64 --height 64 --output build/quickstart.png
