#!/usr/bin/env bash
# Every test and the linter, on a fresh machine too (sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
