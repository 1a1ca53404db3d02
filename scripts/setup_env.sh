#!/usr/bin/env bash
# Create .venv (if missing) with everything the project's jobs and tests need, offline-safe:
# torch is pinned to the 2.13.0 CPU build first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[export,server,cluster,openvino,quantize,controlnet,test]"
# The samplers' reference: k-diffusion's sampling code only (tests/kdiffusion_reference.py). Its
# declared requirements (torchvision, clip, wandb...) are never used by that code and would replace
# the CPU torch, hence --no-deps; what the code does need is in the test extra.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "k-diffusion==0.1.1.post1"
# --add-upscaler's loader, without the torchvision it declares and never needs here (pyproject.toml).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "spandrel>=0.4,<0.5"
