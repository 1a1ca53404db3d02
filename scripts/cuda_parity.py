"""Where does the runtime's CUDA image leave diffusers'? One run that separates the suspects (issue 20).

    python scripts/cuda_parity.py --export EXPORT --source DIFFUSERS_FOLDER [--provider cuda|cpu]
        [--cpu-export CPU_TARGET_EXPORT] [--json FILE]

Checks (each in its own guard, so that one failure does not cost the others on a lent GPU):
- unet_kernels: one UNet call at the working size (size/8 latents, batch 2) against diffusers fp32,
  as exported (default kernels), with ORT's attention restricted to its unfused kernel (CUDA
  provider option sdpa_kernel=16: no flash / memory-efficient / TRT kernels) and at ORT_ENABLE_BASIC
  (no session-time CUDA fusions on top of the export's). diffusers fp16 on the same call is the scale.
- replay: six successive calls with changing sample and timestep through the runtime's UNet session
  (CUDA graphs on where the provider is CUDA) against a plain session.run of a separate session.
- images: whole images (Euler a, CFG 11, seed 114514) with CUDA graphs on and off, diffusers fp16 and
  fp32, PSNR between each pair (diffusers fp16 vs fp32 is the floor to read the others against).
- memory: peak GPU memory of one generation, the runtime (NVML, in a child process) against torch's
  max_memory_allocated for diffusers fp16.
- modes: hires fix (two UNet shapes), img2img, and a two-chunk prompt with a one-chunk negative,
  CUDA graphs on against off.
- lora: an image with a random LoRA on this export against the same on a CPU-target export.
On a CPU (`--provider cpu`, a CPU export) the same code runs with CUDA graphs off and fp32 references.
Prints one table at the end; scripts/device_check.sh runs it on the GPU box.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import CFG, IMAGE_SEED, NEGATIVE, PROMPT, DiffusersSystem, Job

SDPA_UNFUSED = "16"  # onnxruntime AttentionBackend::MATH: every fused attention kernel off
REPLAY_TIMESTEPS = (999.0, 961.5, 500.0, 250.25, 21.0, 1.0)
LONG_PROMPT = ", ".join([PROMPT] * 6)  # past 75 tokens: two chunks against the one-chunk negative


def relative_error(ours: np.ndarray, reference: np.ndarray | torch.Tensor) -> float:
    if isinstance(reference, torch.Tensor):
        reference = reference.detach().float().cpu().numpy()
    expected = np.asarray(reference, dtype=np.float32)
    return float(np.abs(ours.astype(np.float32) - expected).max() / max(1.0, np.abs(expected).max()))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """None: identical images."""
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return round(10 * math.log10(255**2 / mse), 2) if mse else None


def guarded(report: dict[str, Any], name: str, check: Callable[[], Any]) -> None:
    try:
        report[name] = check()
    except Exception as error:  # a lent GPU runs this once: record the failure and go on
        traceback.print_exc()
        report[name] = {"error": f"{type(error).__name__}: {error}"[:400]}


def pipeline(export: Path, provider: str, cuda_graph: bool) -> Any:
    from runtime import Pipeline

    return Pipeline.from_pretrained(export, provider=provider, cuda_graph=cuda_graph)


def image(pipe: Any, args: argparse.Namespace, prompt: str = PROMPT, **extra: Any) -> np.ndarray:
    request = {
        "negative_prompt": NEGATIVE, "num_inference_steps": args.steps, "guidance_scale": CFG, "width": args.size,
        "height": args.size, "seed": IMAGE_SEED, "sampler": "euler_a", "output_type": "pil", **extra,
    }  # fmt: skip
    return np.asarray(pipe(prompt, **request).images[0])


def unet_inputs(pipe: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    prepared = pipe.prepare(prompt=PROMPT, negative_prompt=NEGATIVE)
    states, piece = pipe.encode(prepared.chunks, prepared.request.clip_skip), prepared.conditioning[0]
    context = np.stack([states[piece.uncond], states[piece.conds[0]]]).astype(np.float32)
    sample = np.random.default_rng(0).standard_normal((2, 4, size // 8, size // 8), dtype=np.float32)
    return context, sample


@torch.no_grad()
def diffusers_unet(ref: DiffusersSystem, sample: np.ndarray, timestep: float, context: np.ndarray) -> torch.Tensor:
    to = {"device": ref.device, "dtype": ref.dtype}
    return ref.pipe.unet(
        torch.from_numpy(sample).to(**to), torch.tensor(timestep, device=ref.device),
        encoder_hidden_states=torch.from_numpy(context).to(**to), return_dict=False,
    )[0]  # fmt: skip


def raw_unet_session(export: Path, provider: str, level: str = "all", cuda_options: dict | None = None) -> Any:
    """A bare onnxruntime session of the exported UNet: the kernels and optimizations alone."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    providers: list = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": 0, **(cuda_options or {})}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(export / "unet" / "model.onnx"), options, providers=providers)


def run_raw(session: Any, export: Path, sample: np.ndarray, timestep: float, context: np.ndarray) -> np.ndarray:
    """One run without a ControlNet: its residual inputs (exports since ControlNet support) zeros."""
    from runtime.graphs.model_folder import control_residuals

    types = {item.name: item.type for item in session.get_inputs()}
    half = {name: np.float16 if "float16" in kind else np.float32 for name, kind in types.items()}
    feed = {
        "sample": sample.astype(half["sample"]),
        "timestep": np.full((len(sample),), timestep, dtype=half["timestep"]),
        "encoder_hidden_states": context.astype(half["encoder_hidden_states"]),
    }
    config = json.loads((export / "unet" / "config.json").read_text())
    for residual in control_residuals(config):
        if residual.name in types:
            feed[residual.name] = np.zeros(residual.shape(sample.shape), dtype=half[residual.name])
    return session.run(None, feed)[0].astype(np.float32)


def unet_kernels(args: argparse.Namespace, refs: dict[str, DiffusersSystem], pipe: Any) -> dict[str, Any]:
    context, sample = unet_inputs(pipe, args.size)
    reference = diffusers_unet(refs["diffusers_fp32"], sample, 500.0, context)
    variants = {"default": ("all", None), "ort_enable_basic": ("basic", None)}
    if args.provider == "cuda":
        variants["attention_unfused"] = ("all", {"sdpa_kernel": SDPA_UNFUSED})
    result: dict[str, Any] = {}
    for name, (level, cuda_options) in variants.items():
        session = raw_unet_session(args.export, args.provider, level, cuda_options)
        ours = run_raw(session, args.export, sample, 500.0, context)
        result[f"{name}_vs_diffusers_fp32"] = relative_error(ours, reference)
        del session
    if "diffusers_fp16" in refs:
        fp16 = diffusers_unet(refs["diffusers_fp16"], sample, 500.0, context)
        result["diffusers_fp16_vs_fp32"] = relative_error(fp16.float().cpu().numpy(), reference)
    return result


def replay(args: argparse.Namespace, graphs: Any, plain: Any) -> dict[str, Any]:
    """Each call through the (graph-capturing) bound session against plain session.run."""
    context, _ = unet_inputs(plain, args.size)
    shape = (2, 4, args.size // 8, args.size // 8)
    step = graphs.sessions.unet.bind(context, shape)
    reference = plain.sessions.unet
    rng = np.random.default_rng(1)
    errors = []
    for timestep in REPLAY_TIMESTEPS:
        sample = rng.standard_normal(shape, dtype=np.float32)
        steps = np.full((2,), timestep, dtype=np.float32)
        feed = reference.feed({"sample": sample, "timestep": steps, "encoder_hidden_states": context})
        feed.update(reference.residual_inputs.zeros(shape))  # no ControlNet
        expected = reference.session.run(None, feed)[0].astype(np.float32)
        errors.append(relative_error(step(sample, steps), expected))
    return {"per_call_relative_error": errors, "worst": max(errors)}


MEMORY_CHILD = """
import json, sys
import pynvml
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
from runtime import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1], provider="cuda", cuda_graph=True)
pipe(sys.argv[2], negative_prompt=sys.argv[3], num_inference_steps=int(sys.argv[4]), width=int(sys.argv[5]),
     height=int(sys.argv[5]), seed=1)
print(json.dumps({"runtime_gpu_mib": (pynvml.nvmlDeviceGetMemoryInfo(handle).used - before) / 2**20}))
"""


def memory(args: argparse.Namespace, refs: dict[str, DiffusersSystem]) -> dict[str, Any]:
    """The runtime's GPU memory (device memory used after a generation, less before: ORT's arena
    keeps its peak) in a child process, against torch's max_memory_allocated for diffusers fp16
    (allocations only: torch's caching allocator reserves more)."""
    if args.provider != "cuda":
        return {"skipped": "CPU provider"}
    command = [sys.executable, "-c", MEMORY_CHILD, str(args.export), PROMPT, NEGATIVE, str(args.steps), str(args.size)]
    child = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    torch.cuda.reset_peak_memory_stats()
    refs["diffusers_fp16"].generate()()
    return {**child, "diffusers_fp16_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}


def modes(args: argparse.Namespace, graphs: Any, plain: Any) -> dict[str, Any]:
    """Hires fix, img2img and chunk counts that differ: CUDA graphs on against off (PSNR)."""
    hires = {"enable_hr": True, "hires_options": {"hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}}
    init = np.random.default_rng(2).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    cases = {
        "hires_fix": (PROMPT, hires),
        "img2img": (PROMPT, {"image": init, "strength": 0.6}),
        "prompt_2_chunks_negative_1": (LONG_PROMPT, {}),
    }
    result = {}
    for name, (prompt, extra) in cases.items():
        if name == "img2img" and plain.sessions.vae_encoder is None:
            result[name] = "skipped: the export has no VAE encoder"
            continue
        on, off = image(graphs, args, prompt, **extra), image(plain, args, prompt, **extra)
        difference = int(np.abs(on.astype(int) - off.astype(int)).max())
        result[name] = {"psnr_db_graphs_on_vs_off": psnr(on, off), "max_difference": difference}
    return result


def random_lora(export: Path, path: Path, modules: int = 24, rank: int = 4) -> None:
    """Random kohya-style LoRA on the first `modules` UNet modules the export can patch."""
    from safetensors.numpy import save_file

    targets = json.loads((export / "unet" / "lora_targets.json").read_text())["modules"]
    rng = np.random.default_rng(3)
    tensors = {}
    for module, slots in itertools.islice(targets.items(), modules):
        out, inner, *kernel = slots[0]["shape"]
        down = (rank, inner, *kernel)
        up = (out, rank, *([1] * len(kernel)))
        tensors[f"{module}.lora_down.weight"] = (rng.standard_normal(down) * 0.05).astype(np.float32)
        tensors[f"{module}.lora_up.weight"] = (rng.standard_normal(up) * 0.05).astype(np.float32)
        tensors[f"{module}.alpha"] = np.array(float(rank), dtype=np.float32)
    save_file(tensors, str(path))


def lora(args: argparse.Namespace) -> dict[str, Any]:
    """The same LoRA image on this export (provider as asked) and on a CPU-target export (CPU)."""
    from runtime import Pipeline

    if args.cpu_export is None:
        return {"skipped": "no --cpu-export"}
    with tempfile.TemporaryDirectory() as folder:
        random_lora(args.export, Path(folder) / "random.safetensors")
        small = argparse.Namespace(**{**vars(args), "size": args.lora_size, "steps": args.lora_steps})
        prompt = f"{PROMPT} <lora:random:1>"
        images = {
            target: image(Pipeline.from_pretrained(export, provider=provider, lora_dir=folder), small, prompt)
            for target, export, provider in (("this", args.export, args.provider), ("cpu", args.cpu_export, "cpu"))
        }
    return {"psnr_db_vs_cpu_target": psnr(images["this"], images["cpu"]), "size": args.lora_size}


def table(report: dict[str, Any]) -> str:
    """One line per figure: section, figure, value."""
    lines = ["| check | figure | value |", "| --- | --- | --- |"]

    def walk(prefix: list[str], value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk([*prefix, key], item)
            return
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = ", ".join(f"{item:.3g}" if isinstance(item, float) else str(item) for item in value)
        lines.append(f"| {prefix[0]} | {'.'.join(prefix[1:])} | {value} |")

    for section, value in report.items():
        walk([section], value)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="the diffusers folder the export came from")
    parser.add_argument("--cpu-export", type=Path, help="a --target cpu export of the same source (LoRA check)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--lora-size", type=int, default=256, help="the LoRA check runs the CPU target too: kept small")
    parser.add_argument("--lora-steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = args.provider == "cuda"
    threads = os.cpu_count() or 1
    refs = {}
    for precision in ("fp32", "fp16") if cuda else ("fp32",):
        job = Job("diffusers", "parity", str(args.source), args.size, args.size, args.steps, threads, args.provider,
                  precision, repeats=1, warmup=0)  # fmt: skip
        refs[f"diffusers_{precision}"] = DiffusersSystem(job)
        refs[f"diffusers_{precision}"].load()
    graphs, plain = pipeline(args.export, args.provider, cuda), pipeline(args.export, args.provider, False)
    report: dict[str, Any] = {"setup": {"provider": args.provider, "size": args.size, "steps": args.steps}}
    guarded(report, "unet_kernels", lambda: unet_kernels(args, refs, plain))
    guarded(report, "replay", lambda: replay(args, graphs, plain))

    def images() -> dict[str, Any]:
        found = {name: np.asarray(ref.generate()()[0]) for name, ref in refs.items()}
        found["runtime_graphs_on" if cuda else "runtime"] = image(graphs, args)
        if cuda:
            found["runtime_graphs_off"] = image(plain, args)
        return {f"{a} vs {b}": psnr(found[a], found[b]) for a, b in itertools.combinations(found, 2)}

    guarded(report, "images_psnr_db", images)
    guarded(report, "memory", lambda: memory(args, refs))
    guarded(report, "modes", lambda: modes(args, graphs, plain))
    guarded(report, "lora", lambda: lora(args))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
