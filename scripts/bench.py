#!/usr/bin/env python
"""Benchmark the ONNX Runtime pipeline against diffusers' torch StableDiffusionPipeline.

(One file on purpose, over 500 lines: it is both the orchestrator and, with --worker, the fresh
process each figure is measured in, and it must run from a checkout with nothing but the venv.)

    python scripts/bench.py --arch sd15|tiny [--height 512 --width 512] [--steps 28]
                            [--precision fp32|fp16] [--provider cpu|cuda|openvino] [--quantize int8]
                            [--json FILE]

Both systems run the same random weights (built from the shipped configs in `models/`, exported
once with `python -m export` and cached by config hash under ~/.cache/acertain-onnx/bench) and the
same settings: Euler a, CFG 11, clip skip 2, one image. Every figure is measured in its own fresh
process per system (warm-up excluded, median of repeats):

    cold_start   process start until the pipeline can run a step (imports + session/model load)
    text_encode  prompt + negative prompt through the text encoder (clip skip 2)
    unet_step    one UNet call at batch 2 (CFG)
    vae_decode   latents to pixels
    total        a whole generation of --steps steps, PIL image out
    peak_rss     high-water resident memory of a process that loads and runs one generation

plus the installed size of a runtime-only environment against a torch + diffusers one. Ratios are
runtime / diffusers: below 1 is better. Speed is measured here and never asserted in tests.

This file imports only the standard library at module level: the runtime's worker processes must
never import torch, and the orchestrating process stays small.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("ACERTAIN_BENCH_CACHE", Path.home() / ".cache" / "acertain-onnx" / "bench"))
WEIGHT_SEED = 0
PROMPT = "masterpiece, best quality, 1girl, looking at viewer, cherry blossoms"
NEGATIVE = "lowres, bad anatomy, bad hands, text, error, missing fingers, worst quality"
IMAGE_SEED = 114514
CFG = 11.0
# "openvino": the CPU peer, OpenVINO's runtime on the same weights (IR from `--target openvino`) with
# OpenVINO's own defaults (device CPU, its default precision, no model cache), driven by the same
# Python loop (under 5 ms a generation) so that its figures are OpenVINO's.
# "runtime_int8" (--provider openvino --quantize int8): the runtime on the `--quantize int8` export of
# the same weights, measured beside "runtime" (the unquantized export: bf16 arithmetic where the CPU
# has it), so one run gives both rows against the same peers.
SYSTEMS = ("runtime", "runtime_int8", "diffusers", "openvino")
PEERS = ("diffusers", "openvino")
OURS = ("runtime", "runtime_int8")
FIGURES = ("text_encode", "unet_step", "vae_decode", "total", "peak_rss", "cold_start")
RATIO_KEYS = {
    "unet_step": "unet_step_s",
    "text_encode": "text_encode_s",
    "vae_decode": "vae_decode_s",
    "total": "total_s",
    "cold_start": "cold_start_s",
    "peak_rss": "peak_rss_mb",
}
RESULT_MARK = "BENCH_RESULT "
OPTIMIZED_CACHE = CACHE_ROOT / "ort-optimized"  # the runtime's saved optimized graphs (ACERTAIN_ONNX_CACHE)
# Packages a user installs for each system (their dependency closures are summed).
RUNTIME_ROOTS = ("numpy", "onnxruntime", "tokenizers", "ftfy", "pillow", "tqdm")
RUNTIME_ROOTS_OPENVINO = (*RUNTIME_ROOTS, "openvino")
# onnxruntime-gpu with the CUDA 13 / cuDNN libraries its extras name (torch brings its own).
RUNTIME_ROOTS_GPU = ("numpy", "onnxruntime-gpu[cuda,cudnn]", "tokenizers", "ftfy", "pillow", "tqdm")
DIFFUSERS_ROOTS = ("torch", "diffusers", "transformers")
CONTENDED_CPUS = 0.25  # other processes' average CPU use above which a figure counts as disturbed


# ---------------------------------------------------------------------------------------------
# model preparation (cached by config hash)


def _hash_files(digest: Any, root: Path, pattern: str) -> None:
    for path in sorted(root.glob(pattern)):
        if path.is_file():
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())


def source_key(arch: str) -> str:
    """The random-weight model depends on the shipped configs, the tokenizer and the seed."""
    digest = hashlib.sha256(f"weights-seed={WEIGHT_SEED}".encode())
    _hash_files(digest, REPO / "models" / arch, "**/*.json")
    _hash_files(digest, REPO / "models" / "tokenizer", "*")
    return digest.hexdigest()[:16]


def export_key(arch: str, precision: str, target: str, quantize: tuple[str, ...] = ()) -> str:
    """An export also depends on the exporter's code and the libraries that ran it. `quantize`: the
    export's --quantize arguments (none: not quantized)."""
    digest = hashlib.sha256(f"{source_key(arch)} {precision} {target}{' '.join(('', *quantize))}".encode())
    libraries = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "openvino", "nncf")
    for name in libraries if quantize else libraries[:-1] if target == "openvino" else libraries[:-2]:
        digest.update(f"{name}={_version(name)}".encode())
    _hash_files(digest, REPO / "export", "*.py")
    return digest.hexdigest()[:16]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def child_env() -> dict[str, str]:
    """Children import the project from the checkout and never reach the hub; the runtime keeps its
    saved optimized graphs beside the bench's models (so that cold starts can warm exactly them)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path,
        "ACERTAIN_ONNX_CACHE": str(OPTIMIZED_CACHE),
    }  # fmt: skip


def warm_page_cache(*folders: Path) -> None:
    """Read every file of the folders once: each cold start then begins with the model files in the
    OS page cache, for both systems alike (this machine's proactive reclaim evicts idle pages within
    minutes, which would otherwise make a cold start a disk benchmark)."""
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                with path.open("rb") as handle:
                    while handle.read(1 << 24):
                        pass


def run_checked(command: list[str]) -> None:
    print("+", " ".join(command)[:300], flush=True)
    subprocess.run(command, check=True, cwd=REPO, env=child_env())


def build_source(arch: str) -> Path:
    """The random-weight diffusers folder both systems load (built once per config hash)."""
    folder = CACHE_ROOT / f"{arch}-{source_key(arch)}"
    done = folder / f"{arch}-diffusers"
    if (done / "model_index.json").is_file():
        return done
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    code = (
        "import sys; from pathlib import Path; from export.random_model import build_and_save; "
        f"build_and_save({arch!r}, Path(sys.argv[1]), seed={WEIGHT_SEED}, single_file=False)"
    )
    run_checked([sys.executable, "-c", code, str(staging)])
    folder.mkdir(parents=True, exist_ok=True)
    (staging / f"{arch}-diffusers").rename(done)
    shutil.rmtree(staging, ignore_errors=True)
    return done


def export_model(arch: str, source: Path, precision: str, target: str, quantize: tuple[str, ...] = ()) -> Path:
    """`python -m export` of the source (staged and moved into place by the exporter). CUDA exports
    keep the VAE encoder: scripts/cuda_parity.py runs img2img on the GPU from the same export.
    `quantize`: --quantize and --calibration-* arguments for the exporter."""
    encoder = target == "cuda"
    key = export_key(arch, precision, target, quantize)
    folder = source.parent / f"onnx-{precision}-{target}{'-int8' if quantize else ''}-{key}{'-enc' if encoder else ''}"
    if (folder / "manifest.json").is_file():
        return folder
    argv = [
        "--model", str(source), "--output", str(folder), "--precision", precision, "--target", target,
        *([] if encoder else ["--no-vae-encoder"]), *quantize, "--overwrite",
    ]  # fmt: skip
    run_checked([sys.executable, "-m", "export", *argv])
    return folder


# ---------------------------------------------------------------------------------------------
# the two systems, as their worker processes see them


@dataclass
class Job:
    system: str
    figure: str
    model: str  # runtime: exported folder; diffusers: diffusers folder
    height: int
    width: int
    steps: int
    threads: int
    provider: str
    precision: str
    repeats: int
    warmup: int
    image_out: str = ""  # total: where to write the last image's raw RGB bytes
    optimized_cache: bool = False  # runtime: Pipeline.from_pretrained(optimized_cache=...)
    inference_precision: str = "auto"  # provider openvino


class RuntimeSystem:
    """The torch-free runtime through its public Pipeline."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def load(self) -> None:
        from runtime import ModelFolderError

        self.cuda_graph = self.job.provider == "cuda"
        try:
            self.pipe = self.load_pipeline()
        except ModelFolderError as error:
            if not self.cuda_graph or "graph" not in str(error).lower():
                raise
            print(f"CUDA graphs refused ({error}); running without them", file=sys.stderr)
            self.cuda_graph = False
            self.pipe = self.load_pipeline()

    def load_pipeline(self) -> Any:
        from runtime import Pipeline

        job = self.job
        if job.system == "openvino":  # the peer: OpenVINO's defaults (see SYSTEMS)
            os.environ["ACERTAIN_ONNX_OPTIMIZED_CACHE"] = "0"
            return Pipeline.from_pretrained(job.model, provider="openvino", threads=job.threads)
        return Pipeline.from_pretrained(
            job.model,
            provider=job.provider,
            threads=job.threads,
            cuda_graph=self.cuda_graph,
            optimized_cache=job.optimized_cache,
            inference_precision=job.inference_precision,
        )

    def encode(self) -> Callable[[], Any]:
        prepared = self.pipe.prepare(prompt=PROMPT, negative_prompt=NEGATIVE)
        return lambda: self.pipe.encode(prepared.chunks, prepared.request.clip_skip)

    def unet_step(self) -> Callable[[], Any]:
        import numpy as np

        prepared = self.pipe.prepare(prompt=PROMPT, negative_prompt=NEGATIVE)
        states, piece = self.pipe.encode(prepared.chunks, prepared.request.clip_skip), prepared.conditioning[0]
        cond, uncond = states[piece.conds[0]], states[piece.uncond]
        shape = latent_shape(self.job, batch=2)
        unet = self.pipe.sessions.unet
        step = unet.bind(np.stack([uncond, cond]), shape)
        sample = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        timestep = np.full((2,), 500.0, dtype=np.float32)
        return lambda: step(sample, timestep)

    def decode(self) -> Callable[[], Any]:
        import numpy as np

        latents = np.random.default_rng(0).standard_normal(latent_shape(self.job, 1), dtype=np.float32)
        return lambda: self.pipe.decode(latents)

    def generate(self) -> Callable[[], Any]:
        job = self.job
        return lambda: self.pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=job.steps, guidance_scale=CFG,
            width=job.width, height=job.height, seed=IMAGE_SEED, sampler="euler_a", output_type="pil",
        ).images  # fmt: skip

    def warm_generation(self) -> Callable[[], Any]:
        job = self.job
        return lambda: self.pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=CFG, width=job.width,
            height=job.height, seed=IMAGE_SEED, output_type="pil",
        )  # fmt: skip

    def sync(self) -> None:
        """Every runtime call returns numpy arrays: already synchronous."""


class DiffusersSystem:
    """diffusers' StableDiffusionPipeline as users run it: Euler a, CFG 11, and clip skip 2 from
    hidden_states[-2] through the final layer norm (diffusers' `clip_skip=1`; its own argument
    raises with transformers 5, so the embeddings are computed here and passed in, timed)."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def load(self) -> None:
        import torch
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

        self.torch = torch
        torch.set_num_threads(self.job.threads)
        self.device = "cuda" if self.job.provider == "cuda" else "cpu"
        self.dtype = torch.float16 if self.job.precision == "fp16" and self.device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(
            self.job.model, torch_dtype=self.dtype, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    def embeddings(self, text: str) -> Any:
        pipe = self.pipe
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        encoder = pipe.text_encoder
        with self.torch.no_grad():
            hidden = encoder(ids.input_ids.to(self.device), output_hidden_states=True).hidden_states[-2]
            return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)

    def encode(self) -> Callable[[], Any]:
        return lambda: (self.embeddings(PROMPT), self.embeddings(NEGATIVE))

    def unet_step(self) -> Callable[[], Any]:
        torch = self.torch
        cond, uncond = self.embeddings(PROMPT), self.embeddings(NEGATIVE)
        context = torch.cat([uncond, cond])
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(latent_shape(self.job, 2), generator=generator).to(self.device, self.dtype)
        timestep = torch.tensor(500.0, device=self.device)

        def step() -> Any:
            with torch.no_grad():
                return self.pipe.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

        return step

    def decode(self) -> Callable[[], Any]:
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(latent_shape(self.job, 1), generator=generator).to(self.device, self.dtype)
        vae = self.pipe.vae

        def decode() -> Any:
            with torch.no_grad():
                image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
                return self.pipe.image_processor.postprocess(image, output_type="np")

        return decode

    def generate(self, steps: int | None = None) -> Callable[[], Any]:
        job = self.job

        def generate() -> Any:
            cond, uncond = self.embeddings(PROMPT), self.embeddings(NEGATIVE)
            return self.pipe(
                prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps or job.steps,
                guidance_scale=CFG, width=job.width, height=job.height,
                generator=self.torch.Generator().manual_seed(IMAGE_SEED), output_type="pil",
            ).images  # fmt: skip

        return generate

    def warm_generation(self) -> Callable[[], Any]:
        return self.generate(steps=1)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def latent_shape(job: Job, batch: int) -> tuple[int, int, int, int]:
    return (batch, 4, job.height // 8, job.width // 8)


# ---------------------------------------------------------------------------------------------
# the worker: one figure of one system in this fresh process


def peak_rss_bytes() -> int:
    """High-water resident set of this process (VmHWM: since exec, not inherited from the parent),
    anonymous and file-backed (mapped weights) pages together."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_parts() -> dict[str, float]:
    """Resident MB now, by kind (RssAnon, RssFile): Linux keeps no high-water mark per kind, so
    the peak_rss worker reads these right after its generation, when the weights are all loaded."""
    parts = {}
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith(("RssAnon:", "RssFile:")):
            parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts


def time_calls(call: Callable[[], Any], sync: Callable[[], None], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each call, and the last call's result."""
    times, output = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        output = call()
        sync()
        times.append(time.perf_counter() - start)
    return times, output


def save_image(images: list, path: str) -> None:
    """Raw RGB bytes of the first image (the orchestrator compares them without numpy)."""
    image = images[0].convert("RGB")
    Path(path).write_bytes(image.tobytes())


def run_worker(job: Job) -> dict[str, Any]:
    system = DiffusersSystem(job) if job.system == "diffusers" else RuntimeSystem(job)
    load_start = time.perf_counter()
    system.load()
    ready = time.time()
    result: dict[str, Any] = {"ready_at": ready, "load_s": time.perf_counter() - load_start}
    if job.figure in ("cold_start", "peak_rss"):
        if job.figure == "peak_rss":
            system.generate()()
            result["resident_mb"] = resident_parts()
        result["peak_rss_bytes"] = peak_rss_bytes()
    else:
        call = {"text_encode": system.encode, "unet_step": system.unet_step, "vae_decode": system.decode}.get(
            job.figure, system.generate
        )()
        warm = system.warm_generation() if job.figure == "total" else call
        time_calls(warm, system.sync, job.warmup)
        result["times"], output = time_calls(call, system.sync, job.repeats)
        result["peak_rss_bytes"] = peak_rss_bytes()
        if job.figure == "total" and job.image_out:
            save_image(output, job.image_out)
    result["torch_imported"] = "torch" in sys.modules
    result["cuda_graph"] = getattr(system, "cuda_graph", None)
    return result


def worker_main(payload: str) -> int:
    job = Job(**json.loads(payload))
    result = run_worker(job)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# the orchestrator


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine, in seconds (Linux /proc/stat; 0 elsewhere)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0
    fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Measurement:
    figure: str
    system: str
    value: float  # seconds, or MB for peak_rss
    samples: list[float]
    load_s: float
    others_cpus: float  # average CPUs other processes used while this ran
    loadavg: list[float]
    torch_imported: bool
    attempts: int = 1
    cuda_graph: bool | None = None
    resident_mb: dict[str, float] | None = None


def spawn(job: Job) -> tuple[dict[str, Any], float, float]:
    """Run one worker; return its result, the spawn time and the other processes' CPU use."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))]
    env = child_env()
    busy, ours = cpu_busy_seconds(), children_cpu_seconds()
    spawned = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - spawned
    others = max(0.0, (cpu_busy_seconds() - busy) - (children_cpu_seconds() - ours)) / max(wall, 1e-6)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"{job.system} worker for {job.figure} failed (exit {done.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK) :]), spawned, others


def measure_once(job: Job) -> Measurement:
    if job.figure != "cold_start":
        result, _, others = spawn(job)
        samples = result.get("times") or [result["peak_rss_bytes"] / 2**20]
        return Measurement(
            job.figure, job.system, statistics.median(samples), samples, result["load_s"], others,
            list(os.getloadavg()), result["torch_imported"], cuda_graph=result["cuda_graph"],
            resident_mb=result.get("resident_mb"),
        )  # fmt: skip
    samples, others_all, loads, torch_seen = [], [], [], False
    for _ in range(job.repeats):
        warm_page_cache(Path(job.model), *([OPTIMIZED_CACHE] if job.system != "diffusers" else []))
        result, spawned, others = spawn(job)
        samples.append(result["ready_at"] - spawned)
        others_all.append(others)
        loads.append(result["load_s"])
        torch_seen = torch_seen or result["torch_imported"]
    return Measurement(
        job.figure, job.system, statistics.median(samples), samples, statistics.median(loads), max(others_all),
        list(os.getloadavg()), torch_seen, cuda_graph=result["cuda_graph"],
    )  # fmt: skip


def measure(job: Job, retries: int) -> Measurement:
    """Measure; when other processes used the CPUs meanwhile, measure again (up to `retries` more
    times) and keep the least disturbed attempt."""
    best = measure_once(job)
    attempts = 1
    while best.others_cpus > CONTENDED_CPUS and attempts <= retries and job.figure != "peak_rss":
        print(f"  busy machine ({best.others_cpus:.2f} CPUs used by others): measuring again", flush=True)
        again = measure_once(job)
        attempts += 1
        best = again if again.others_cpus < best.others_cpus else best
    best.attempts = attempts
    return best


# ---------------------------------------------------------------------------------------------
# installed sizes


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in {"", *extras}):
            names.append(str(requirement.name) + (f"[{','.join(requirement.extras)}]" if requirement.extras else ""))
    return names


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def dependency_closure(roots: tuple[str, ...]) -> dict[str, int]:
    """Installed bytes of each distribution in the closure of `roots` (as pip would install them;
    a root may name extras, e.g. "onnxruntime-gpu[cuda]")."""
    from packaging.requirements import Requirement

    sizes: dict[str, int] = {}
    pending = list(roots)
    while pending:
        requirement = Requirement(pending.pop())
        name = _canonical(requirement.name)
        if name in sizes:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sizes[name] = 0
            continue
        sizes[name] = sum(path.stat().st_size for path in map(dist.locate_file, dist.files or []) if path.is_file())
        pending.extend(_requirements(dist, set(requirement.extras)))
    return sizes


def environment_sizes(provider: str) -> dict[str, Any]:
    roots = {"cuda": RUNTIME_ROOTS_GPU, "openvino": RUNTIME_ROOTS_OPENVINO}.get(provider, RUNTIME_ROOTS)
    runtime = dependency_closure(roots)
    diffusers = dependency_closure(DIFFUSERS_ROOTS)
    runtime_source = sum(path.stat().st_size for path in (REPO / "runtime").glob("*.py"))

    def megabytes(sizes: dict[str, int]) -> dict[str, float]:
        return {name: round(size / 2**20, 1) for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])}

    return {
        "runtime": round((sum(runtime.values()) + runtime_source) / 2**20, 1),
        "diffusers": round(sum(diffusers.values()) / 2**20, 1),
        "runtime_packages": megabytes(runtime),
        "diffusers_packages": megabytes(diffusers),
        "note": "site-packages bytes of each dependency closure in this environment (torch: "
        f"{_version('torch')}); the runtime side adds the project's runtime/ package",
    }


# ---------------------------------------------------------------------------------------------
# report


def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "versions": {name: _version(name) for name in ("onnxruntime", "onnxruntime-gpu", "openvino", "torch",
                                                       "diffusers", "transformers", "numpy")},
    }  # fmt: skip
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        info["cpu"] = names[0] if names else info["cpu"]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        info["memory_gb"] = round(int(meminfo.read_text().split()[1]) / 2**20, 1)
    return info


def system_summary(measurements: list[Measurement], system: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    details = {}
    for item in measurements:
        if item.system != system:
            continue
        key = RATIO_KEYS[item.figure]
        summary[key] = round(item.value, 4 if key.endswith("_s") else 1)
        details[item.figure] = {
            "samples": [round(value, 4) for value in item.samples],
            "load_s": round(item.load_s, 3),
            "others_cpus": round(item.others_cpus, 3),
            "loadavg": [round(value, 2) for value in item.loadavg],
            "attempts": item.attempts,
            "torch_imported": item.torch_imported,
            **({} if item.cuda_graph is None else {"cuda_graph": item.cuda_graph}),
            **({} if item.resident_mb is None else {"resident_after_generation_mb": item.resident_mb}),
        }
        if item.resident_mb and "RssAnon" in item.resident_mb:
            summary["anon_rss_mb"] = round(item.resident_mb["RssAnon"], 1)
    summary["details"] = details
    return summary


def ratios(runtime: dict[str, Any], diffusers: dict[str, Any], env: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for name, key in RATIO_KEYS.items():
        if runtime.get(key) and diffusers.get(key):
            out[name] = round(runtime[key] / diffusers[key], 3)
    if env:
        out["env_size"] = round(env["runtime"] / env["diffusers"], 3)
    return out


def best_peer_ratios(report: dict[str, Any], ours: str = "runtime") -> dict[str, dict[str, Any]]:
    """`ours` / the best (lowest) peer of each figure among diffusers and OpenVINO."""
    out = {}
    for name, key in RATIO_KEYS.items():
        value = report.get(ours, {}).get(key)
        peers = {peer: report[peer][key] for peer in PEERS if report.get(peer, {}).get(key)}
        if value and peers:
            best = min(peers, key=peers.get)
            out[name] = {"ratio": round(value / peers[best], 3), "peer": best}
    return out


def table(report: dict[str, Any]) -> str:
    """One row per figure, one column per system; ratios of ours (and of the int8 export, when it
    ran) against diffusers and against the best peer."""
    measured_int8 = bool(report.get("runtime_int8", {}).get("details"))
    systems = [system for system in SYSTEMS if system != "runtime_int8" or measured_int8]
    int8 = "runtime_int8" in systems
    heads = {"runtime_int8": "int8"}
    rows = [
        ("figure", *(heads.get(system, system) for system in systems), "ratio", "vs best",
         *(("int8 ratio", "int8 vs best") if int8 else ())),
        ("-" * 22, *("-" * 10 for _ in systems), "-" * 6, "-" * 16, *(("-" * 10, "-" * 16) if int8 else ())),
    ]  # fmt: skip
    labels = {
        "cold_start": "cold start (s)", "text_encode": "text encode (s)", "unet_step": "UNet step, batch 2 (s)",
        "vae_decode": "VAE decode (s)", "total": f"total, {report['settings']['steps']} steps (s)",
        "peak_rss": "peak RSS (MB)",
    }  # fmt: skip

    def ratio_cells(ratios: dict[str, float], best: dict[str, dict[str, Any]], name: str) -> tuple[str, str]:
        ratio, peer = ratios.get(name), best.get(name)
        return "" if ratio is None else f"{ratio:.2f}", "" if peer is None else f"{peer['ratio']:.2f} ({peer['peer']})"

    for name, key in RATIO_KEYS.items():
        values = [report.get(system, {}).get(key) for system in systems]
        if all(value is None for value in values):
            continue
        cells = ratio_cells(report["ratios"], report["ratios_vs_best_peer"], name)
        if int8:
            cells += ratio_cells(report["ratios_int8"], report["ratios_int8_vs_best_peer"], name)
        rows.append((labels[name], *map(_fmt, values), *cells))
    if report["runtime"].get("anon_rss_mb"):
        anon = [report.get(system, {}).get("anon_rss_mb") for system in systems]
        rows.append(("anonymous RSS after (MB)", *map(_fmt, anon), "", "", *(("", "") if int8 else ())))
    env = report.get("env_mb")
    if env:
        sizes = {"runtime": env["runtime"], "runtime_int8": env["runtime"], "diffusers": env["diffusers"]}
        ratio = f"{report['ratios']['env_size']:.2f}"
        row = ("installed env (MB)", *(_fmt(sizes[system]) if system in sizes else "-" for system in systems))
        rows.append((*row, ratio, "", *(("", "") if int8 else ())))
    return "\n".join(_table_line(row, len(systems)) for row in rows)


def _table_line(row: tuple[str, ...], systems: int) -> str:
    """The label, one cell per system, then (ratio, vs best) pairs."""
    ratios = row[systems + 1 :]
    pairs = "".join(f"{ratios[i]:>8}  {ratios[i + 1]:<18}" for i in range(0, len(ratios), 2))
    return f"{row[0]:<25}" + "".join(f"{cell:>11}" for cell in row[1 : systems + 1]) + pairs.rstrip()


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


# ---------------------------------------------------------------------------------------------
# command line


def default_repeats(arch: str, override: int | None) -> dict[str, int]:
    if override:
        return dict.fromkeys(FIGURES, override)
    if arch == "tiny":
        return {"text_encode": 5, "unet_step": 5, "vae_decode": 5, "total": 3, "peak_rss": 1, "cold_start": 3}
    return {"text_encode": 5, "unet_step": 5, "vae_decode": 3, "total": 3, "peak_rss": 1, "cold_start": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default="fp16",
        help="runtime graphs, as `python -m export` (default fp16)",
    )
    parser.add_argument(
        "--optimized-cache", action="store_true", help="runtime: save/read ORT's optimized graphs (fp32 on CPU)"
    )
    parser.add_argument("--provider", choices=("cpu", "cuda", "openvino"), default="cpu")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="with --provider openvino: also run the `python -m export --quantize int8` export (system runtime_int8)",
    )
    parser.add_argument(
        "--calibration-samples", type=int, help="--quantize: the export's --calibration-samples (default: its own)"
    )
    parser.add_argument("--calibration-size", type=int, help="--quantize: the export's --calibration-size")
    parser.add_argument(
        "--inference-precision", default="auto", help="provider openvino: auto (bf16 where the CPU has it), f32, bf16"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op and torch threads")
    parser.add_argument("--repeats", type=int, help="repeats of every figure (default: per figure)")
    parser.add_argument("--retries", type=int, default=2, help="re-measure a figure disturbed by other processes")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the systems this many times per figure")
    parser.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset of " + ",".join(FIGURES))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--export-dir", type=Path, help="use this exported folder instead of the cached export")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, systems: list[str]) -> tuple[Path, Path, Path | None, Path | None]:
    """The diffusers source, the runtime's export, (when the OpenVINO peer runs) the IR export and
    (--quantize int8) the quantized IR export."""
    source = build_source(args.arch)
    target = {"cuda": "cuda", "openvino": "openvino"}.get(args.provider, "cpu")
    exported = args.export_dir or export_model(args.arch, source, args.precision, target)
    int8 = None
    if "runtime_int8" in systems:
        int8 = export_model(args.arch, source, args.precision, "openvino", quantize_arguments(args))
    if "openvino" not in systems or args.provider == "cuda":
        return source, exported, None, int8
    openvino = exported if target == "openvino" else export_model(args.arch, source, args.precision, "openvino")
    return source, exported, openvino, int8


def quantize_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    calibration = {"--calibration-samples": args.calibration_samples, "--calibration-size": args.calibration_size}
    extra = [item for flag, value in calibration.items() if value is not None for item in (flag, str(value))]
    return ("--quantize", args.quantize, *extra)


def make_job(args: argparse.Namespace, system: str, figure: str, model: Path, images: Path) -> Job:
    return Job(
        system=system, figure=figure, model=str(model), height=args.height, width=args.width, steps=args.steps,
        threads=args.threads, provider=args.provider,
        precision=args.precision if system == "runtime" else _torch_precision(args),
        repeats=default_repeats(args.arch, args.repeats)[figure], warmup=1,
        image_out=str(images / f"{system}.rgb") if figure == "total" else "",
        optimized_cache=args.optimized_cache, inference_precision=args.inference_precision,
    )  # fmt: skip


def first_loads(args: argparse.Namespace, models: dict[str, Path], images: Path) -> dict[str, float]:
    """One unmeasured load per system before any figure: it fills the page cache and lets the
    runtime save its optimized graphs (when there are none yet: its 'first load')."""
    loads = {}
    for system, model in models.items():
        result, _, _ = spawn(Job(**{**asdict(make_job(args, system, "cold_start", model, images)), "repeats": 1}))
        loads[system] = round(result["load_s"], 3)
        print(f"  {system:<10}first load  {loads[system]:>10.3f} s", flush=True)
    return loads


def merge(items: list[Measurement]) -> Measurement:
    """Rounds of one figure and system: all samples together (peak RSS: the highest)."""
    first = items[0]
    samples = [value for item in items for value in item.samples]
    value = max(samples) if first.figure == "peak_rss" else statistics.median(samples)
    return Measurement(
        first.figure, first.system, value, samples, statistics.median(item.load_s for item in items),
        max(item.others_cpus for item in items), first.loadavg, any(item.torch_imported for item in items),
        sum(item.attempts for item in items), first.cuda_graph,
    )  # fmt: skip


def run_plan(args: argparse.Namespace, models: dict[str, Path], images: Path) -> list[Measurement]:
    """Figure by figure, the systems alternate (--rounds times), so that a slow spell of the
    machine falls on both rather than on one."""
    figures = [name for name in FIGURES if name in args.figures.split(",")]
    measurements = []
    for figure in figures:
        rounds: dict[str, list[Measurement]] = {system: [] for system in models}
        for _ in range(args.rounds):
            for system, model in models.items():
                item = measure(make_job(args, system, figure, model, images), args.retries)
                unit = "MB" if figure == "peak_rss" else "s"
                print(f"  {system:<10}{figure:<12}{item.value:>10.3f} {unit}  (others {item.others_cpus:.2f} CPUs)")
                rounds[system].append(item)
        measurements += [merge(items) for items in rounds.values()]
    return measurements


def image_parity(images: Path, system: str = "runtime", reference: str = "diffusers") -> dict[str, Any] | None:
    """PSNR (dB, 8-bit RGB) between a system's image of the timed generation and diffusers' one
    (fp32 on the CPU, which our fp32 graphs reproduce at 87 dB; fp16 on CUDA): same seed, same
    weights, so a large difference would mean the two are not doing the same work. `reference`:
    another image of the run (runtime_f32: ours at f32 arithmetic)."""
    ours, theirs = images / f"{system}.rgb", images / f"{reference}.rgb"
    if not (ours.is_file() and theirs.is_file()):
        return None
    a, b = ours.read_bytes(), theirs.read_bytes()
    if len(a) != len(b):
        return {"psnr_db": None, "note": "image sizes differ"}
    squared = sum((x - y) * (x - y) for x, y in zip(a, b, strict=True))
    mse = squared / len(a)
    psnr = 10 * math.log10(255**2 / mse) if mse else None
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return {"psnr_db": None if psnr is None else round(psnr, 2), "max_abs_diff": worst, "identical": mse == 0}


def _torch_precision(args: argparse.Namespace) -> str:
    """diffusers on the CPU runs fp32 (torch's CPU fp16 kernels are far slower); fp16 on CUDA."""
    return "fp16" if args.provider == "cuda" else "fp32"


def settings(args: argparse.Namespace, source: Path, exported: Path) -> dict[str, Any]:
    return {
        "arch": args.arch, "height": args.height, "width": args.width, "steps": args.steps,
        "precision": args.precision, "diffusers_precision": _torch_precision(args), "provider": args.provider,
        "inference_precision": args.inference_precision,
        "sampler": "Euler a", "cfg": CFG, "clip_skip": 2, "unet_batch": 2, "threads": args.threads,
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": IMAGE_SEED, "export": str(exported),
        "source": str(source),
    }  # fmt: skip


def module_missing(name: str) -> str | None:
    """Why `name` does not import here (None: it does)."""
    try:
        __import__(name)
    except ImportError as error:
        return str(error)
    return None


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None: it can). Checked before anything is exported: the IR
    export would otherwise fail after the runtime's export, minutes in."""
    error = module_missing("openvino")
    return None if error is None else f"OpenVINO is not installed ({error}); pip install '.[openvino]' adds it"


def int8_parity(args: argparse.Namespace, exported: Path, images: Path) -> dict[str, Any]:
    """The int8 image against diffusers fp32 and against ours at f32 arithmetic (the unquantized
    export run with inference precision f32, one untimed generation): the first is the bar the
    issue sets, the second what quantization alone costs."""
    job = make_job(args, "runtime", "total", exported, images)
    job = Job(**{**asdict(job), "repeats": 1, "warmup": 0, "inference_precision": "f32",
                 "image_out": str(images / "runtime_f32.rgb")})  # fmt: skip
    spawn(job)
    return {
        "diffusers_fp32": image_parity(images, "runtime_int8"),
        "runtime_f32": image_parity(images, "runtime_int8", "runtime_f32"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    started = time.time()
    machine = machine_info(args.threads)
    systems = [name for name in SYSTEMS if name in args.systems.split(",")]
    skipped = {}
    if args.quantize == "none":
        systems = [name for name in systems if name != "runtime_int8"]
    elif args.provider != "openvino":
        print("error: --quantize int8 goes with --provider openvino (NNCF quantizes OpenVINO IR)", file=sys.stderr)
        return 2
    elif (missing_nncf := module_missing("nncf")) is not None:
        print(f"error: --quantize int8: the exporter needs NNCF ({missing_nncf})", file=sys.stderr)
        return 2
    if args.provider == "openvino" or "openvino" in systems:
        missing = openvino_missing()
        if missing and args.provider == "openvino":
            print(f"error: --provider openvino: {missing}", file=sys.stderr)
            return 2
        if missing and "openvino" in systems:
            systems.remove("openvino")
            skipped["openvino"] = missing
            print(f"note: the OpenVINO peer is skipped: {missing}", flush=True)
    source, exported, openvino, int8 = prepare(args, systems)
    print(f"diffusers source: {source}\nruntime export:   {exported}\nOpenVINO IR:      {openvino}", flush=True)
    if int8 is not None:
        print(f"int8 export:      {int8}", flush=True)
    if openvino is None and "openvino" in systems:
        systems.remove("openvino")  # a GPU bench has no CPU peer
    models = {"runtime": exported, "runtime_int8": int8, "diffusers": source, "openvino": openvino}
    models = {system: models[system] for system in systems}
    with tempfile.TemporaryDirectory(prefix="acertain-bench-") as images:
        loads = first_loads(args, models, Path(images)) if args.figures != "none" else {}
        measurements = run_plan(args, models, Path(images))
        parity = image_parity(Path(images))
        parity_openvino = image_parity(Path(images), "openvino")
        parity_int8 = int8_parity(args, exported, Path(images)) if int8 is not None else None
    summaries = {system: system_summary(measurements, system) for system in SYSTEMS}
    runtime_int8 = summaries["runtime_int8"]
    for system, summary in summaries.items():
        if system in loads:
            summary["first_load_s"] = loads[system]
    runtime, diffusers = summaries["runtime"], summaries["diffusers"]
    env = environment_sizes(args.provider)
    machine["loadavg_end"] = list(os.getloadavg())
    report = {
        "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings(args, source, exported),
        "ratios": ratios(runtime, diffusers, env),
        "runtime": runtime,
        "diffusers": diffusers,
        "openvino": summaries["openvino"],
        "runtime_int8": runtime_int8,
        "ratios_int8": ratios(runtime_int8, diffusers, None),
        "env_mb": env,
        "parity": parity,
        "parity_openvino": parity_openvino,
        "parity_int8": parity_int8,
        "skipped": skipped,  # peers that could not run here, and why
        "machine": machine,
        "seconds": round(time.time() - started, 1),
    }
    report["ratios_vs_best_peer"] = best_peer_ratios(report)
    report["ratios_int8_vs_best_peer"] = best_peer_ratios(report, "runtime_int8")
    print(table(report))
    for name, item in (("runtime", parity), ("openvino", parity_openvino)):
        if item:
            print(f"{name} image vs diffusers {_torch_precision(args)}: PSNR {item.get('psnr_db')} dB")
    for reference, item in (parity_int8 or {}).items():
        if item:
            print(f"int8 image vs {reference}: PSNR {item.get('psnr_db')} dB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
