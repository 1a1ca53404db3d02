"""`python -m export --add-vae FILE|FOLDER --output EXISTING_DIR`: put another VAE into an export
without exporting the rest again, for the runtime to switch to by name (A1111's "SD VAE").

Layout: `vaes/<name>/vae_decoder/model.onnx` (and `vae_encoder/` when the export has an
encoder), validated against torch like every graph, recorded in manifest.json under `vaes`:
name -> {hash (A1111's VAE hash), source, graphs: {vae_decoder: <graph entry>, ...}}.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from export.exporter import (
    ExportError,
    ExportOptions,
    GraphReport,
    finish_graph,
    graph_entry,
    plan_graph,
    validates_working_size,
    write_json,
)
from export.vae import load_vae
from export.validate import available_provider
from runtime.graphs import model_folder as layout
from runtime.graphs.vaes import VAES_DIR, check_vae_name

from . import graphs

log = logging.getLogger(__name__)


@dataclass
class AddVaeOptions:
    source: str
    output: Path
    name: str | None = None  # default: the file (or folder) name, as A1111 lists VAEs
    overwrite: bool = False
    allow_pickle: bool = False


def _template(folder: Path):
    """A VAE of the export's architecture (its vae_decoder config), for load_vae to fill."""
    from diffusers import AutoencoderKL

    config = json.loads((folder / "vae_decoder" / "config.json").read_text(encoding="utf-8"))
    return AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def add_vae(options: AddVaeOptions) -> list[GraphReport]:
    folder = options.output.resolve()
    manifest = layout.read_manifest(folder)
    target = manifest.raw.get("target", "cpu")
    if target == layout.OPENVINO_TARGET:
        raise ExportError("--add-vae serves ONNX exports; an OpenVINO export holds the VAE it was exported with")
    name = options.name or Path(options.source.rstrip("/")).name
    try:
        check_vae_name(name)
    except ValueError as error:
        raise ExportError(f"--vae-name {name!r}: {error}") from None
    entries = dict(manifest.raw.get("vaes") or {})
    final = folder / VAES_DIR / name
    if (name in entries or final.exists()) and not options.overwrite:
        raise ExportError(
            f"{folder} already has a VAE named {name!r}; nothing was changed. Pass --overwrite to replace it"
        )
    with_encoder = "vae_encoder" in manifest.graphs  # a decoder-only VAE fits an export without one
    separate = load_vae(options.source, _template(folder), options.allow_pickle, with_encoder)
    pipe = SimpleNamespace(vae=separate.vae)
    working = None
    if validates_working_size(target, available_provider(target)):
        working = manifest.default_size // manifest.vae_scale_factor
    specs = [graphs.vae_decoder_spec(pipe, working)]
    if with_encoder:
        specs.append(graphs.vae_encoder_spec(pipe, working))
    staging = folder / VAES_DIR / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    export_options = ExportOptions(model=options.source, output=folder, target=target)
    reports, recorded = [], {}
    try:
        for spec in specs:
            log.info("tracing %s of VAE %s", spec.name, name)
            report = GraphReport(spec.name, manifest.precision)
            job = plan_graph(spec, staging, export_options, report)
            graphs.export_fp32(spec, job.fp32_path)
            files, result, note, disabled = finish_graph(job, manifest.precision)
            entry = graph_entry(staging, spec.name, files, result, note, target, disabled)
            entry["path"] = str(Path(VAES_DIR) / name / entry["path"])
            recorded[spec.name] = entry
            reports.append(report)
        shutil.rmtree(staging / "_work")
        write_json(staging / "vae_decoder" / "config.json", dict(separate.vae.config))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entries[name] = {"hash": separate.hash, "source": options.source, "graphs": recorded}
    raw = {**manifest.raw, "vaes": entries}
    scratch = folder / f".{layout.MANIFEST_FILE}.{os.getpid()}"
    write_json(scratch, raw)
    scratch.replace(folder / layout.MANIFEST_FILE)  # atomic: the manifest is whole, old or new
    return reports
