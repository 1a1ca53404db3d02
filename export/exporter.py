"""The export job: source -> validated ONNX graphs + tokenizer + scheduler config + manifest.

Everything is written into a staging folder beside the output and moved into place only when
every graph has passed validation, so a failure (bad graph, full disk, Ctrl-C) never leaves a
half-written folder that looks finished, and an existing output is replaced only when asked to.

Over 500 lines on purpose: staging, each graph's fallbacks (fp16 to fp32, fusions turned off at
the working size) and the manifest that records them are one transaction, read top to bottom;
the graphs' own export, optimization and validation live in graphs.py and validate.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from export.choices import PRECISIONS, TARGETS
from export.sources import LoadedSource, load_source
from export.vae import load_vae, with_vae_weights
from export.validate import (
    FUSION_FALLBACKS,
    ValidationResult,
    available_provider,
    fallback_attributes,
    next_fallback,
    validate_graph,
)
from runtime.errors import UserError
from runtime.graphs import model_folder as layout
from runtime.text.tokenizer import ClipTokenizer, load_tokenizer_files

from . import graphs, lora_map, openvino_ir

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TOKENIZER_CHECK_PROMPTS = ("a photo of a cat", "masterpiece, best quality, 1girl, (sky:1.2), Café 😀")


class ExportError(UserError):
    """The export cannot be done as asked (bad option, failed validation, no disk space)."""


@dataclass
class ExportOptions:
    model: str
    output: Path
    precision: str = "fp16"
    # A1111 counting; the first is the default a request gets when it names none. 2 as ACertainThing's
    # card asks, and 1 beside it: A1111's users switch between the two (README: the cost is one layer).
    clip_skips: tuple[int, ...] = (2, 1)
    target: str = "cpu"
    overwrite: bool = False
    allow_pickle: bool = False
    config: Path | None = None
    vae_encoder: bool = True
    ema: bool = False  # a single file's EMA UNet weights (model_ema.*) instead of its trained ones
    vae: str | None = None  # a separate VAE (file or diffusers folder) used instead of the checkpoint's


@dataclass
class GraphReport:
    name: str
    precision: str
    seconds: dict[str, float] = field(default_factory=dict)
    validation: ValidationResult | None = None
    note: str = ""


@dataclass
class ExportReport:
    output: Path
    graphs: list[GraphReport]
    seconds: float


ProgressCallback = Callable[[str, int, int], None]  # (graph name, index, total)


def check_options(options: ExportOptions) -> None:
    if options.precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, not {options.precision!r}")
    if options.target not in TARGETS:
        raise ExportError(f"--target must be one of {', '.join(TARGETS)}, not {options.target!r}")
    if not options.clip_skips or min(options.clip_skips) < 1:
        raise ExportError(f"--clip-skip counts as A1111 does (1 = last layer): {clip_skip_text(options)} is below 1")
    if len(set(options.clip_skips)) != len(options.clip_skips):
        raise ExportError(f"--clip-skip {clip_skip_text(options)} names a clip skip twice")
    if options.target == layout.OPENVINO_TARGET and importlib.util.find_spec("openvino") is None:
        raise ExportError("--target openvino needs OpenVINO: pip install 'acertain-onnx[openvino]'")
    output = options.output
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not options.overwrite:
        raise ExportError(f"--output {output} is not empty; nothing was changed. Pass --overwrite to replace it")


def clip_skip_text(options: ExportOptions) -> str:
    return ",".join(str(clip_skip) for clip_skip in options.clip_skips)


def _timed(report: GraphReport, stage: str, work: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = work()
    report.seconds[stage] = report.seconds.get(stage, 0.0) + time.perf_counter() - start
    return result


def describe_values(values) -> list[dict[str, Any]]:
    """name, dtype and shape (ints, or axis names for dynamic axes) of graph inputs or outputs."""
    described = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        described.append({"name": value.name, "dtype": dtype, "shape": dims})
    return described


def graph_entry(
    folder: Path,
    name: str,
    files: list[str],
    result: ValidationResult,
    note: str,
    target: str = "cpu",
    disabled: tuple[str, ...] = (),
) -> dict[str, Any]:
    graph_file = folder / layout.graph_path(name, target)
    if target == layout.OPENVINO_TARGET:
        inputs, outputs, metadata = openvino_ir.describe(graph_file)
        compute = metadata["compute"]
    else:
        model = onnx.load(str(graph_file), load_external_data=False)
        inputs, outputs = describe_values(model.graph.input), describe_values(model.graph.output)
        compute = {entry.key: entry.value for entry in model.metadata_props}[f"{layout.METADATA_PREFIX}compute"]
    hashes = {file: layout.sha256_of_file(graph_file.parent / file) for file in files}  # the graph file is one of them
    return {
        "path": str(layout.graph_path(name, target)),
        "precision": result.precision,
        "compute_dtype": compute,
        "inputs": inputs,
        "outputs": outputs,
        "sha256": hashes[graph_file.name],
        "files": hashes,
        "validation": {
            "max_abs_error": result.max_abs_error,
            "relative_error": result.relative_error,
            "tolerance": result.tolerance,
            "provider": result.provider,
            "working_size_relative_error": result.working_relative_error,
            "disabled_fusions": list(disabled),
            "note": note,
        },
    }


def write_tokenizer(source: LoadedSource, folder: Path) -> ClipTokenizer:
    """Copy the tokenizer files; build tokenizer.json when the source has only vocab + merges (as
    ACertainThing's repository does). The result must tokenize like the pipeline's own tokenizer."""
    target = folder / layout.TOKENIZER_DIR
    target.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source.tokenizer_dir / name).is_file():
            shutil.copy(source.tokenizer_dir / name, target / name)
    if not (target / "tokenizer.json").is_file():
        load_tokenizer_files(target).save(str(target / "tokenizer.json"))
    tokenizer = ClipTokenizer.from_folder(target)
    for prompt in TOKENIZER_CHECK_PROMPTS:
        ours = tokenizer.encode_padded(prompt)
        theirs = source.pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        if ours != list(theirs):
            raise ExportError(
                f"the exported tokenizer disagrees with the model's own on {prompt!r}: {ours} != {theirs}"
            )
    return tokenizer


def validates_working_size(target: str, provider: str) -> bool:
    """Graphs are validated at the runtime's working size too where they run on their target's
    provider: the CUDA graphs on a GPU, where ORT picks kernels by size (flash attention from 513
    tokens up, 4096 at 512 px). Elsewhere the trace sizes stand for every size (same kernels)."""
    return target == "cuda" and provider == "CUDAExecutionProvider"


def build_specs(
    source: LoadedSource, options: ExportOptions, tokenizer: ClipTokenizer, working: int | None = None
) -> list[graphs.GraphSpec]:
    """`working`: a latent size (the UNet's sample_size, 64 for SD1.x's 512 px) to validate at too."""
    pipe = source.pipe
    prompt_ids = torch.tensor([tokenizer.encode_padded(p) for p in TOKENIZER_CHECK_PROMPTS], dtype=torch.int64)
    try:
        specs = [graphs.text_encoder_spec(pipe, options.clip_skips, prompt_ids)]
    except ValueError as error:
        raise ExportError(f"--clip-skip {clip_skip_text(options)}: {error}") from None
    # Realistic UNet conditioning: the text encoder's own output for real prompts.
    context = torch.from_numpy(specs[0].cases[0].reference)
    try:
        specs.append(graphs.unet_spec(pipe, context, working))
    except ValueError as error:  # a UNet whose skip connections a ControlNet's residuals could not fill
        raise ExportError(f"unet: {error}") from None
    specs.append(graphs.vae_decoder_spec(pipe, working))
    if options.vae_encoder:
        specs.append(graphs.vae_encoder_spec(pipe, working))
    return specs


@dataclass
class _GraphJob:
    spec: graphs.GraphSpec
    fp32_path: Path
    final_path: Path
    target: str
    provider: str
    twin_path: Path | None  # where the CPU-runnable twin of a CUDA graph is validated, if needed
    report: GraphReport
    lora_weights: dict[bytes, lora_map.Weight] | None = None  # fingerprints of the LoRA-targetable weights
    working: bool = False  # validate the spec's working-size cases too

    def build(self, precision: str, disabled: tuple[str, ...] = ()) -> tuple[list[str], ValidationResult]:
        """Optimize at `precision` without the `disabled` fusions, save, and validate (the twin when
        the target's provider is missing)."""
        if self.target == layout.OPENVINO_TARGET:
            return self.build_openvino(precision)
        model = _timed(
            self.report,
            "optimize",
            lambda: graphs.optimize(self.fp32_path, self.spec, self.target, precision, disabled=disabled),
        )
        files = graphs.save_graph(model, self.final_path)
        if self.lora_weights is not None:
            targets = lora_map.lora_targets(self.spec.name, self.final_path, model, self.lora_weights)
            write_json(self.final_path.parent / lora_map.LORA_TARGETS_FILE, targets)
            files.append(lora_map.LORA_TARGETS_FILE)
        del model
        checked = self.final_path
        if self.twin_path is not None:
            checked = self.twin_path
            twin = graphs.optimize(self.fp32_path, self.spec, "cpu", precision, fp16_compute=True, disabled=disabled)
            graphs.save_graph(twin, checked)
        result = _timed(
            self.report, "validate", lambda: validate_graph(checked, self.spec, precision, self.provider, self.working)
        )
        return files, result

    def enabled_fusions(self, precision: str) -> list[str]:
        """The FUSION_FALLBACKS attributes on in the graph that is validated (a twin has the CPU target's)."""
        if self.target == layout.OPENVINO_TARGET:
            return []
        target = "cpu" if self.twin_path is not None else self.target
        options = graphs.fusion_options(self.spec.optimizer_type, target, precision)
        return [name for _, names in FUSION_FALLBACKS for name in names if getattr(options, name, False)]

    def build_with_fallbacks(
        self, precision: str, notes: list[str]
    ) -> tuple[list[str], ValidationResult, tuple[str, ...]]:
        """build(); while the graph misses its tolerance (finite but inaccurate), rebuild it without
        the next FUSION_FALLBACKS fusion. Returns the files, the last result and the fusions off."""
        disabled: tuple[str, ...] = ()
        files, result = self.build(precision, disabled)
        while (step := next_fallback(result, disabled, self.enabled_fusions(precision))) is not None:
            log.warning(
                "%s (%s): relative error %.3g misses the tolerance; rebuilding it without the %s fusion",
                self.spec.name, precision, result.relative_error, step,
            )  # fmt: skip
            notes.append(f"{precision}: {step} fusion off (relative error {result.relative_error:.3g} with it)")
            disabled += fallback_attributes(step)
            shutil.rmtree(self.final_path.parent)
            files, result = self.build(precision, disabled)
        return files, result, disabled

    def build_openvino(self, precision: str) -> tuple[list[str], ValidationResult]:
        """The plain exported graph as IR (no onnxruntime fusions: OpenVINO fuses at compile time);
        the compute precision is the runtime's choice, so the graph records float32."""
        files = _timed(
            self.report,
            "optimize",
            lambda: openvino_ir.convert(self.fp32_path, self.spec, precision, self.final_path, "float32"),
        )
        result = _timed(self.report, "validate", lambda: openvino_ir.validate(self.final_path, self.spec, precision))
        return files, result


def plan_graph(spec: graphs.GraphSpec, staging: Path, options: ExportOptions, report: GraphReport) -> _GraphJob:
    work = staging / "_work" / spec.name
    provider = available_provider(options.target)
    # CUDA-only fusions cannot run on the CPU provider: without a GPU, validate a twin graph made
    # from the same weights and precision with the CPU-runnable fusions only.
    twin = options.target == "cuda" and provider != "CUDAExecutionProvider"
    return _GraphJob(
        working=bool(spec.working_cases),
        spec=spec,
        fp32_path=work / "fp32" / "model.onnx",
        final_path=staging / layout.graph_path(spec.name, options.target),
        target=options.target,
        provider=provider,
        twin_path=work / "twin" / "model.onnx" if twin else None,
        report=report,
    )


def finish_graph(job: _GraphJob, precision: str) -> tuple[list[str], ValidationResult, str, tuple[str, ...]]:
    """Optimize, save and validate one exported graph. A graph that misses the tolerance is rebuilt
    without the fusions that pick its kernels (FUSION_FALLBACKS), then fp16 graphs that overflow or
    still miss it are kept in fp32; the manifest records both rather than a wrong graph shipping.
    Returns the files, the result, the note and the fusions turned off."""
    spec, report = job.spec, job.report
    notes = (
        ["validated on a CPU-runnable twin (same weights and precision, no CUDA-only fusions)"] if job.twin_path else []
    )
    files, result, disabled = job.build_with_fallbacks(precision, notes)
    if precision == "fp16" and not result.passed:
        problem = "overflows" if not result.finite else "is not accurate enough"
        log.warning(
            "%s: the fp16 graph %s (relative error %.3g); keeping it in fp32", spec.name, problem, result.relative_error
        )
        notes.append(f"kept fp32: fp16 relative error {result.relative_error:.3g}")
        shutil.rmtree(job.final_path.parent)
        precision = "fp32"
        files, result, disabled = job.build_with_fallbacks(precision, notes)
    if not result.passed:
        raise ExportError(
            f"graph {spec.name} failed validation against torch: relative error {result.relative_error:.3g} "
            f"exceeds the tolerance {result.tolerance:.0e}{'' if result.finite else ' (non-finite output)'}"
        )
    note = "; ".join(notes)
    report.precision, report.validation, report.note = precision, result, note
    return files, result, note, disabled


@dataclass(frozen=True)
class ModelFacts:
    """What the manifest and the component configs need from the torch pipeline, kept so that the
    pipeline's weights can be released before the memory-hungry ONNX stage."""

    configs: dict[str, dict[str, Any]]
    vae_scale_factor: int
    vae_scaling_factor: float
    latent_channels: int
    text_width: int
    text_max_length: int
    default_image_size: int

    @classmethod
    def of(cls, pipe) -> ModelFacts:
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return cls(
            configs={
                "text_encoder": pipe.text_encoder.config.to_dict(),
                "unet": dict(pipe.unet.config),
                "vae_decoder": dict(pipe.vae.config),
                "vae_encoder": dict(pipe.vae.config),
            },
            vae_scale_factor=vae_scale,
            vae_scaling_factor=float(pipe.vae.config.scaling_factor),
            latent_channels=int(pipe.unet.config.in_channels),
            text_width=int(pipe.text_encoder.config.hidden_size),
            text_max_length=int(pipe.text_encoder.config.max_position_embeddings),
            default_image_size=int(pipe.unet.config.sample_size) * vae_scale,
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda item: list(item) if isinstance(item, tuple) else str(item)))


def library_versions(target: str = "cpu") -> dict[str, str]:
    import diffusers
    import numpy
    import onnxruntime
    import transformers

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    if target == layout.OPENVINO_TARGET:
        import openvino

        versions["openvino"] = openvino.__version__
    return versions


def manifest(source: LoadedSource, facts: ModelFacts, options: ExportOptions, entries: dict[str, dict]) -> dict:
    return {
        "format": layout.FORMAT_NAME,
        "format_version": layout.FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_name": source.name,
        "model_hash": source.model_hash,
        "model_sha256": source.model_sha256,
        "source": {"kind": source.kind, "model": options.model, "architecture": source.arch},
        "precision": options.precision,
        "target": options.target,
        "clip_skip": options.clip_skips[0],
        "clip_skips": list(options.clip_skips),
        "opset": graphs.OPSET,
        "vae_scale_factor": facts.vae_scale_factor,
        "vae_scaling_factor": facts.vae_scaling_factor,
        "latent_channels": facts.latent_channels,
        "text_width": facts.text_width,
        "text_max_length": facts.text_max_length,
        "default_image_size": facts.default_image_size,
        "graphs": entries,
        "library_versions": library_versions(options.target),
    }


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(value), indent=2) + "\n", encoding="utf-8")


def move_into_place(staging: Path, output: Path) -> None:
    """Swap the finished staging folder in; an old output is removed only after the swap."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_torch_graphs(
    source: LoadedSource, options: ExportOptions, tokenizer: ClipTokenizer, staging: Path, reports: list[GraphReport]
) -> list[_GraphJob]:
    """The torch stage: validation references and fp32 ONNX files for every graph. Then the torch
    weights are released: the ONNX stage (optimizer, float16 conversion, validation sessions) holds
    copies of the full-size UNet of its own, and the two stages together would not fit in 24 GB."""
    working = None
    if validates_working_size(options.target, available_provider(options.target)):
        working = int(source.pipe.unet.config.sample_size)
        log.info("validating at the working size too: %dx%d latents", working, working)
    specs = build_specs(source, options, tokenizer, working)
    lora_modules = {"text_encoder": source.pipe.text_encoder, "unet": source.pipe.unet}
    jobs = []
    for spec in specs:
        log.info("tracing %s", spec.name)
        report = GraphReport(spec.name, options.precision)
        reports.append(report)
        job = plan_graph(spec, staging, options, report)
        if spec.name in lora_modules:
            job.lora_weights = lora_map.fingerprints(spec.name, lora_modules[spec.name])
        _timed(report, "export", lambda job=job: graphs.export_fp32(job.spec, job.fp32_path))
        jobs.append(job)
    for spec in specs:
        spec.module = None
    source.pipe = None
    release_memory()
    return jobs


def release_memory() -> None:
    """Collect, then hand freed heap back to the system: glibc keeps it otherwise, and the next
    stage's peak would stack on top of this one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_export(options: ExportOptions, progress: ProgressCallback | None = None) -> ExportReport:
    started = time.perf_counter()
    check_options(options)
    with with_vae_weights(options.model, options.vae, options.allow_pickle) as model:
        source = load_source(model, options.allow_pickle, options.config, options.ema, options.vae_encoder)
    if model != options.model:  # a checkpoint given the --vae weights: A1111 hashes the user's file
        source.model_sha256 = layout.sha256_of_file(Path(options.model))
        source.model_hash = source.model_sha256[:10]
    vae_info = None
    if options.vae is not None:
        separate = load_vae(options.vae, source.pipe.vae, options.allow_pickle, options.vae_encoder)
        source.pipe.vae = separate.vae
        vae_info = {"name": separate.name, "hash": separate.hash, "source": options.vae}
    output = options.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    reports: list[GraphReport] = []
    try:
        tokenizer = write_tokenizer(source, staging)
        facts = ModelFacts.of(source.pipe)
        jobs = export_torch_graphs(source, options, tokenizer, staging, reports)
        entries = {}
        for index, job in enumerate(jobs):
            if progress:
                progress(job.spec.name, index, len(jobs))
            files, result, note, disabled = finish_graph(job, options.precision)
            entries[job.spec.name] = graph_entry(staging, job.spec.name, files, result, note, options.target, disabled)
            release_memory()
            log.info("%s done in %.1f s", job.spec.name, sum(job.report.seconds.values()))
        shutil.rmtree(staging / "_work")
        write_json(staging / layout.SCHEDULER_CONFIG, source.scheduler_config)
        for name, config in facts.configs.items():
            if name in entries:
                write_json(staging / name / "config.json", config)
        write_json(staging / "model_index.json", model_index(options))
        write_json(
            staging / layout.MANIFEST_FILE,
            {**manifest(source, facts, options, entries), **({"vae": vae_info} if vae_info else {})},
        )
        move_into_place(staging, output)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ExportError(
                f"no space left on the device while writing the export; {output} was not changed"
            ) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(output, reports, time.perf_counter() - started)


def model_index(options: ExportOptions) -> dict[str, Any]:
    """optimum's pipeline layout, so the folder reads like an `ORTStableDiffusionPipeline` (or, for
    OpenVINO, optimum-intel's `OVStableDiffusionPipeline`)."""
    openvino = options.target == layout.OPENVINO_TARGET
    graph = ["optimum", "OVModel"] if openvino else ["onnxruntime", "ORTModel"]
    return {
        "_class_name": "OVStableDiffusionPipeline" if openvino else "ORTStableDiffusionPipeline",
        "_acertain_onnx_format": layout.FORMAT_VERSION,
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": graph,
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": graph,
        "vae_decoder": graph,
        **({"vae_encoder": graph} if options.vae_encoder else {}),
    }
