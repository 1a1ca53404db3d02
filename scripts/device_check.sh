#!/usr/bin/env bash
# GPU check (issue 20): build the full-size random-weight SD1.5 model, export it fp16 for the CUDA
# target (validated on the CUDA provider at the working size), bench it at 512x512, 28 steps (IO
# binding and CUDA graphs on) against diffusers, then scripts/cuda_parity.py separates the causes of
# an image gap: UNet kernels, CUDA-graph replay, session optimizations, diffusers' own fp16; plus
# peak GPU memory, a LoRA image against the CPU target, hires fix / img2img / different chunk
# counts under CUDA graphs. One table at the end.
#
# The GPU box has torch, CUDA 13 libraries and a CPU `onnxruntime`, but no onnxruntime-gpu, no
# diffusers and no package registry, and each call to it carries at most 64 MiB of files. So the
# wheels are downloaded here, big ones split into parts, and the parts packed into batches (.whl/b1,
# .whl/b2, ...) that each travel with one call; the box keeps them in $STAGE while it stays warm
# (30 s between calls: make the calls back to back).
#
#   here, once:            bash scripts/device_check.sh wheels
#   box, once per batch:   bash scripts/device_check.sh stage     (carry: .whl/bN; b1 first)
#   box:                   bash scripts/device_check.sh run       (~4 min: install, build, export, bench)
#   box, last:             bash scripts/device_check.sh parity    (~4 min: CPU-target export, cuda_parity, table)
#
# `stage` installs the small wheels once they are there. `run` uninstalls the box's CPU onnxruntime
# (both own the `onnxruntime` module) and installs onnxruntime-gpu, then builds and exports the model
# so that the exporter validates the real CUDA graphs on the GPU, and runs the bench. `parity` needs
# the same warm box. Plan: 8 minutes of GPU time for run + parity; every file lands in $OUT.
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
PSNR_MIN=35 # issue 20: the CUDA image against diffusers fp16 and fp32

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
    # The image's CPU onnxruntime owns the same module: a second copy on the path could win the import.
    "$PY" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true
    "$PY" -m pip uninstall -y -q onnxruntime-gpu >/dev/null 2>&1 || true
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
    # $OUT is emptied before each call: keep what `parity` reads where the warm box keeps it.
    cp "$OUT/prepare.log" /tmp/acertain-prepare.log
    cp "$OUT/bench-cuda.json" /tmp/acertain-bench-cuda.json
    report_psnr "$OUT/bench-cuda.json" || true
}

parity() {
    mkdir -p "$OUT"
    site_env
    local prepare=${PREPARE_LOG:-$OUT/prepare.log} source export cpu_export
    [[ -f $prepare ]] || prepare=/tmp/acertain-prepare.log
    source=$(sed -n 's/^diffusers source: *//p' "$prepare" | tail -1)
    export=$(sed -n 's/^runtime export: *//p' "$prepare" | tail -1)
    [[ -n $source && -n $export ]] || { log "no model prepared: run 'run' first on this warm box"; exit 3; }
    log "CPU-target export (the LoRA image's reference)"
    cpu_export=$("$PY" -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path
from bench import export_model; print(export_model('sd15', Path(sys.argv[1]), 'fp16', 'cpu'))" "$source" | tail -1)
    "$PY" scripts/cuda_parity.py --export "$export" --source "$source" --cpu-export "$cpu_export" \
        --json "$OUT/cuda-parity.json" 2>&1 | tee "$OUT/cuda-parity.log" | grep -v '^\s' || true
    final_table "${BENCH_JSON:-/tmp/acertain-bench-cuda.json}" "$OUT/cuda-parity.json" | tee "$OUT/table.md"
}

final_table() {
    # One table: the bench's ratios, the parity figures, and the issue's pass marks.
    "$PY" - "$1" "$2" "$PSNR_MIN" <<'PY'
import json
import sys
from pathlib import Path

bench = json.loads(Path(sys.argv[1]).read_text()) if Path(sys.argv[1]).is_file() else {}
parity = json.loads(Path(sys.argv[2]).read_text()) if Path(sys.argv[2]).is_file() else {}
floor = float(sys.argv[3])
rows = [("bench", name, value) for name, value in bench.get("ratios", {}).items()]
for section, values in parity.items():
    for name, value in (values.items() if isinstance(values, dict) else [("", values)]):
        rows.append((section, name, value))
images = parity.get("images_psnr_db", {})
missing = "not measured"
marks = {
    f"PSNR >= {floor:g} dB, {a} vs {b}": images.get(f"{b} vs {a}", images.get(f"{a} vs {b}", missing))
    for a in ("runtime_graphs_on", "runtime_graphs_off")
    for b in ("diffusers_fp16", "diffusers_fp32")
}
print("| check | figure | value |\n| --- | --- | --- |")
for section, name, value in rows:
    print(f"| {section} | {name} | {json.dumps(value) if isinstance(value, (dict, list)) else value} |")
for name, value in marks.items():
    ok = value is None or value != missing and value >= floor  # None: identical images
    print(f"| pass mark | {name} | {value} {'PASS' if ok else 'FAIL'} |")
step = bench.get("ratios", {}).get("unet_step")
print(f"| pass mark | UNet step <= 0.2x diffusers fp16 | {step} {'PASS' if step is not None and step <= 0.2 else 'FAIL'} |")
PY
}

case ${1:-} in
wheels) download && pack ;;
pack) pack ;;
stage) stage ;;
run) run ;;
parity) parity ;;
table) final_table "$2" "$3" ;; # bench JSON, cuda_parity JSON: the table again
*)
    sed -n '2,23p' "$0"
    exit 2
    ;;
esac
