#!/usr/bin/env bash
# GPU check: build the full-size random-weight SD1.5 model, export it fp16 for the CUDA target, and
# run scripts/bench.py --provider cuda at 512x512, 28 steps (IO binding and CUDA graphs on), which
# also compares our CUDA image with diffusers' torch fp16 image of the same seed (PSNR).
#
# The GPU box has torch and CUDA 13 libraries but no onnxruntime-gpu, no diffusers and no package
# registry, and each call to it carries at most 64 MiB of files. So the wheels are downloaded here,
# big ones split into parts, and the parts packed into batches (.whl/b1, .whl/b2, ...) that each
# travel with one call; the box keeps them in $STAGE while it stays warm (30 s between calls).
#
#   here, once:            bash scripts/device_check.sh wheels
#   box, once per batch:   bash scripts/device_check.sh stage     (carry: .whl/bN; b1 first)
#   box, last:             bash scripts/device_check.sh run       (writes $OUT/bench-cuda.json)
#
# `stage` installs the small wheels once they are there. `run` installs onnxruntime-gpu, then builds
# and exports the model, so that the exporter validates the real CUDA graphs on the GPU (without the
# CUDA provider it can only validate a CPU twin without the CUDA-only fusions), runs the bench, and
# scripts/cuda_parity.py (each stage and whole images against diffusers fp16 and fp32).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS="$REPO/.whl"
STAGE=${STAGE:-/tmp/acertain-wheels}
SITE=${SITE:-/tmp/acertain-site}
OUT=${OUT:-$REPO/out}
PY=${PYTHON:-python3}
PART_MIB=14  # parts stay under 16 MiB
BATCH_MIB=56 # plus the ~6 MiB working tree: under the 64 MiB one call carries
# The CUDA 13 build: its `cuda` extra names nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13.
ORT_GPU=onnxruntime-gpu==1.31.1
# diffusers (its importlib_metadata requirement is for Python < 3.8 only) and numpy < 2.4 (see
# pyproject.toml: the box has numpy 2.5, which breaks onnxruntime's attention fusion in the exporter).
# ftfy (+ wcwidth): the runtime tokenizes as A1111 does, with ftfy; the box has neither.
SMALL=(diffusers==0.42.1 numpy==2.3.5 ftfy==6.3.1 wcwidth==0.9.4)
BENCH_ARGS=(--arch sd15 --provider cuda --precision fp16 --height 512 --width 512 --steps 28)
PSNR_MIN=30

log() { printf '[device_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---- here: download, split, pack -----------------------------------------------------------------

download() {
    local dl=$WHEELS/download
    mkdir -p "$dl"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dl" "$ORT_GPU" "${SMALL[@]}"
    (cd "$dl" && sha256sum -- *.whl >SHA256SUMS)
}

pack() {
    # Split wheels over PART_MIB into NAME.whl.part-00, -01, ...; pack the pieces into batches of at
    # most BATCH_MIB in install order: the small wheels (and numpy's parts) first, so that b1 alone
    # lets the box start the model build and export.
    rm -rf "$WHEELS"/b[0-9]*
    "$PY" - "$WHEELS" "$PART_MIB" "$BATCH_MIB" <<'PY'
import shutil
import sys
from pathlib import Path

wheels, part, batch = Path(sys.argv[1]), int(sys.argv[2]) << 20, int(sys.argv[3]) << 20
pieces = []
for wheel in sorted((wheels / "download").glob("*.whl"), key=lambda p: (p.name.startswith("onnxruntime"), p.name)):
    data = wheel.read_bytes()
    chunks = [data] if len(data) <= part else [data[i : i + part] for i in range(0, len(data), part)]
    for index, chunk in enumerate(chunks):
        pieces.append((wheel.name if len(chunks) == 1 else f"{wheel.name}.part-{index:02d}", chunk))
number, used = 1, 0
(wheels / "b1").mkdir()
shutil.copy(wheels / "download" / "SHA256SUMS", wheels / "b1")
for name, chunk in pieces:
    if used + len(chunk) > batch:
        number, used = number + 1, 0
        (wheels / f"b{number}").mkdir()
    (wheels / f"b{number}" / name).write_bytes(chunk)
    used += len(chunk)
for folder in sorted(wheels.glob("b*"), key=lambda p: int(p.name[1:])):
    files = list(folder.iterdir())
    print(f"{folder.name}: {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB, {len(files)} files")
PY
    log "then, on the GPU box, one call per batch in order (b1 first): command" \
        "'bash scripts/device_check.sh stage' carrying ['.whl/bN']; last: 'bash scripts/device_check.sh run'"
}

# ---- box: stage batches, install, prepare, run -------------------------------------------------------

site_env() {
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    # onnxruntime-gpu loads the CUDA 13 / cuDNN 9 libraries of the nvidia-* wheels torch came with.
    local libs
    libs=$("$PY" -c 'import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})))')
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

install_wheels() {
    mkdir -p "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"
}

join_parts() {
    # Re-join each wheel whose parts have all arrived (its SHA256SUMS line must match).
    local first wheel name
    for first in "$STAGE"/*.whl.part-00; do
        [[ -f $first ]] || continue
        wheel=${first%.part-00}
        name=$(basename "$wheel")
        [[ -f $wheel ]] && continue
        cat "$wheel".part-* >"$wheel.tmp"
        if [[ $(sha256sum <"$wheel.tmp" | cut -d' ' -f1) == $(grep -F "$name" "$STAGE/SHA256SUMS" | cut -d' ' -f1) ]]; then
            mv "$wheel.tmp" "$wheel"
            log "joined $name"
        else
            rm -f "$wheel.tmp"
        fi
    done
}

staged_wheel() { find "$STAGE" -maxdepth 1 -name "$1-*.whl" | head -1; }

stage() {
    mkdir -p "$STAGE"
    local dir moved=0
    for dir in "$WHEELS"/b*; do
        [[ -d $dir ]] || continue
        cp "$dir"/* "$STAGE/"
        moved=$((moved + $(find "$dir" -type f | wc -l)))
    done
    join_parts
    log "staged $moved files; $STAGE holds $(du -sm "$STAGE" | cut -f1) MiB"
    local small=() name file
    for name in "${SMALL[@]}"; do
        file=$(staged_wheel "${name%%==*}")
        if [[ -n $file ]]; then small+=("$file"); fi
    done
    if ((${#small[@]} == ${#SMALL[@]})) && [[ ! -f $STAGE/small.installed ]]; then
        install_wheels "${small[@]}"
        touch "$STAGE/small.installed"
        log "installed ${#small[@]} small wheels into $SITE"
    fi
}

report_psnr() {
    "$PY" - "$1" "$PSNR_MIN" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
parity = report.get("parity") or {}
psnr, floor = parity.get("psnr_db"), float(sys.argv[2])
graphs = sorted({str(item.get("cuda_graph")) for item in report["runtime"]["details"].values()})
print(f"PSNR, runtime (CUDA EP, fp16) vs diffusers (torch fp16), same seed: {psnr} dB ({parity})")
print(f"CUDA graphs used by the runtime: {', '.join(graphs)}; ratios: {report['ratios']}")
ok = psnr is None and parity.get("identical") or psnr is not None and psnr >= floor
print("PSNR check:", "PASS" if ok else f"FAIL (under {floor} dB)")
sys.exit(0 if ok else 5)
PY
}

run() {
    mkdir -p "$OUT"
    stage
    local ort
    ort=$(staged_wheel onnxruntime_gpu)
    [[ -n $ort ]] || { log "onnxruntime-gpu is not complete in $STAGE: stage every batch first"; exit 3; }
    [[ -f $STAGE/small.installed ]] || { log "the small wheels (b1) were never staged"; exit 3; }
    install_wheels "$ort"
    site_env
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    "$PY" -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())" |
        tee -a "$OUT/gpu.txt"
    "$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"
    log "building and exporting the model (validated on the CUDA provider)"
    if ! "$PY" scripts/bench.py "${BENCH_ARGS[@]}" --figures none --systems none >"$OUT/prepare.log" 2>&1; then
        log "model build/export failed:"
        tail -40 "$OUT/prepare.log"
        exit 4
    fi
    grep -v 'fusion:' "$OUT/prepare.log" | grep -E 'vs torch|validated|wrote' || true
    "$PY" scripts/bench.py "${BENCH_ARGS[@]}" --repeats 2 --retries 0 --json "$OUT/bench-cuda.json" 2>&1 |
        tee "$OUT/bench.log"
    local source export
    source=$(sed -n 's/^diffusers source: *//p' "$OUT/prepare.log" | tail -1)
    export=$(sed -n 's/^runtime export: *//p' "$OUT/prepare.log" | tail -1)
    "$PY" scripts/cuda_parity.py --export "$export" --source "$source" --json "$OUT/cuda-parity.json" \
        >"$OUT/cuda-parity.log" 2>&1 || log "cuda_parity failed: $(tail -3 "$OUT/cuda-parity.log")"
    [[ -f $OUT/cuda-parity.json ]] && cat "$OUT/cuda-parity.json"
    report_psnr "$OUT/bench-cuda.json"
}

case ${1:-} in
wheels) download && pack ;;
pack) pack ;;
stage) stage ;;
run) run ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
