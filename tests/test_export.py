"""`python -m export` on the tiny random-weight model: every graph against torch/transformers, the
clip-skip graph against CLIPTextModel's hidden states, both source layouts, fp32 and fp16, and
every bad input the issue lists."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from export.exporter import ExportError, ExportOptions, run_export  # noqa: E402
from export.sources import SourceError  # noqa: E402
from runtime.graphs.model_folder import (  # noqa: E402
    CONTROL_MID_RESIDUAL,
    control_down_residual,
    control_residuals,
    read_manifest,
)

# Tolerances of this test file (max abs difference / max(1, max |reference|)):
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 3e-2


def session(folder: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / graph / "model.onnx"), providers=["CPUExecutionProvider"])


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float32) - reference).max() / max(1.0, np.abs(reference).max()))


def graph_weights(folder: Path, graph: str) -> dict[str, int]:
    """Bytes of initializers per dtype name."""
    import onnx

    totals: dict[str, int] = {}
    for tensor in onnx.load(str(folder / graph / "model.onnx")).graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        totals[array.dtype.name] = totals.get(array.dtype.name, 0) + array.nbytes
    return totals


def prompt_ids(text_encoder_folder: Path, prompts: list[str]) -> torch.Tensor:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(REPO / "models" / "tokenizer"))
    return tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids


def clip_reference(source: Path, ids: torch.Tensor, clip_skip: int) -> np.ndarray:
    """transformers' CLIPTextModel: hidden_states[-clip_skip] + final layer norm (A1111 counting)."""
    model = transformers.CLIPTextModel.from_pretrained(str(source / "text_encoder")).eval()
    with torch.no_grad():
        output = model(input_ids=ids, output_hidden_states=True)
        if clip_skip == 1:
            return output.last_hidden_state.numpy()
        norm = getattr(model, "text_model", model).final_layer_norm
        return norm(output.hidden_states[-clip_skip]).numpy()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_text_encoder_outputs_equal_clip_skip_references(request, tiny_source, precision):
    """The default export has clip skips 2 (the default, first output) and 1 in one graph."""
    folder = request.getfixturevalue(f"tiny_{precision}")
    manifest = read_manifest(folder)
    assert (manifest.clip_skip, manifest.clip_skips) == (2, (2, 1))
    ids = prompt_ids(tiny_source["diffusers"], ["masterpiece, best quality, 1girl", "", "a photo of a cat"])
    graph = session(folder, "text_encoder")
    assert [item.name for item in graph.get_outputs()] == [manifest.text_output(2), manifest.text_output(1)]
    tolerance = FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE
    outputs = {}
    for clip_skip in (2, 1):
        ours = graph.run([manifest.text_output(clip_skip)], {"input_ids": ids.numpy()})[0]
        assert ours.dtype == np.float32  # CPU-target graphs keep float32 inputs and outputs
        assert ours.shape == (3, 77, 32)
        assert relative_error(ours, clip_reference(tiny_source["diffusers"], ids, clip_skip)) <= tolerance
        outputs[clip_skip] = ours
    # Two different layers' states, not one output twice.
    assert relative_error(outputs[2], outputs[1]) > 10 * tolerance


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_unet_and_vae_graphs_match_diffusers(request, tiny_source, precision):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = request.getfixturevalue(f"tiny_{precision}")
    dtype, tolerance = np.float32, (FP16_TOLERANCE if precision == "fp16" else FP32_TOLERANCE)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_source["diffusers"] / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(tiny_source["diffusers"] / "vae")).eval()
    generator = torch.Generator().manual_seed(7)
    # Sizes the export never traced: batch 3, a non-square latent, a 3-chunk (231-token) context.
    sample = torch.randn(3, 4, 10, 6, generator=generator)
    timestep = torch.tensor([999.0, 500.25, 1.0])
    context = torch.randn(3, 231, 32, generator=generator)
    with torch.no_grad():
        noise = unet(sample, timestep, context).sample.numpy()
    # No ControlNet: its residual inputs are zeros (the UNet's skip connections as they are).
    zeros = {item.name: np.zeros(item.shape(tuple(sample.shape)), dtype) for item in control_residuals(unet.config)}
    inputs = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    ours = session(folder, "unet").run(None, {**inputs, **zeros})[0]
    assert relative_error(ours, noise) <= tolerance

    latents = torch.randn(2, 4, 10, 6, generator=generator) / 0.18215
    with torch.no_grad():
        decoded = vae.decode(latents).sample.numpy()
    ours = session(folder, "vae_decoder").run(None, {"latent_sample": latents.numpy().astype(dtype)})[0]
    assert ours.shape == (2, 3, 80, 48)
    assert relative_error(ours, decoded) <= tolerance

    image = torch.rand(1, 3, 80, 48, generator=generator) * 2 - 1
    with torch.no_grad():
        moments = vae.encode(image).latent_dist.parameters.numpy()
    ours = session(folder, "vae_encoder").run(None, {"sample": image.numpy().astype(dtype)})[0]
    assert relative_error(ours, moments) <= tolerance


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_manifest_describes_the_export(request, precision):
    folder = request.getfixturevalue(f"tiny_{precision}")
    manifest = read_manifest(folder)
    raw = manifest.raw
    assert raw["precision"] == precision and raw["clip_skip"] == 2 and raw["opset"] == 17
    assert (raw["vae_scale_factor"], raw["vae_scaling_factor"], raw["latent_channels"], raw["text_width"]) == (
        8, 0.18215, 4, 32,
    )  # fmt: skip
    assert {"torch", "diffusers", "transformers", "onnx", "onnxruntime"} <= set(raw["library_versions"])
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        entry = raw["graphs"][name]
        assert entry["precision"] == precision
        assert entry["validation"]["relative_error"] <= entry["validation"]["tolerance"]
        assert len(entry["sha256"]) == 64
    unet_inputs = {item["name"]: item for item in raw["graphs"]["unet"]["inputs"]}
    assert unet_inputs["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert unet_inputs["encoder_hidden_states"]["shape"] == ["batch", "sequence", 32]
    assert unet_inputs["timestep"]["dtype"] == "float32"
    assert unet_inputs["sample"]["dtype"] == "float32"
    # CPU target: fp16 means fp16 weights with fp32 arithmetic (ORT's CPU provider has no fp16 kernels).
    assert all(entry["compute_dtype"] == "float32" for entry in raw["graphs"].values())
    weights = graph_weights(folder, "unet")
    if precision == "fp16":
        assert weights["float16"] > 5 * weights.get("float32", 0)  # norms and biases stay fp32
    else:
        assert "float16" not in weights
    text_output = raw["graphs"]["text_encoder"]["outputs"][0]
    assert text_output["shape"] == ["batch", 77, 32]
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in scheduler  # copied as shipped, not re-serialised


def test_one_clip_skip_drops_the_later_layers(tiny_source, tiny_fp32, tmp_path):
    """--clip-skip 2 alone: one output, and the last layer is not in the graph at all."""
    out = tmp_path / "skip2"
    source = tiny_source["diffusers"]
    run_export(ExportOptions(model=str(source), output=out, precision="fp32", clip_skips=(2,), vae_encoder=False))
    ids = prompt_ids(source, ["masterpiece, best quality, 1girl"])
    graph = session(out, "text_encoder")
    assert len(graph.get_outputs()) == 1
    ours = graph.run(None, {"input_ids": ids.numpy()})[0]
    assert relative_error(ours, clip_reference(source, ids, clip_skip=2)) <= FP32_TOLERANCE
    assert (read_manifest(out).clip_skip, read_manifest(out).clip_skips) == (2, (2,))
    # The 2,1 export holds exactly one layer more: attention, MLP (32 -> 64 -> 32) and two layer norms.
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    extra = graph_weights(tiny_fp32, "text_encoder")["float32"] - graph_weights(out, "text_encoder")["float32"]
    assert abs(extra - 4 * layer) <= 0.05 * 4 * layer  # the optimizer merges a few identical small constants
    assert not (out / "vae_encoder").exists()


def test_tokenizer_json_is_built_from_vocab_and_merges(tiny_source, tmp_path):
    """ACertainThing's repository has only vocab.json + merges.txt."""
    source = tmp_path / "vocab-only"
    shutil.copytree(tiny_source["diffusers"], source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / "tokenizer" / name).unlink()
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(source), output=out, precision="fp32", vae_encoder=False))
    built = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    shipped = json.loads((REPO / "models" / "tokenizer" / "tokenizer.json").read_text())
    assert built["model"]["vocab"] == shipped["model"]["vocab"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_export_into_the_same_folder_is_refused_and_changes_nothing(tiny_source, tiny_fp32, tmp_path):
    before = _tree(tiny_fp32)
    with pytest.raises(ExportError, match="not empty"):
        run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=tiny_fp32, precision="fp32"))
    assert _tree(tiny_fp32) == before


def test_overwrite_replaces_a_folder(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("user data")
    run_export(
        ExportOptions(
            model=str(tiny_source["diffusers"]),
            output=out,
            precision="fp32",
            overwrite=True,
            vae_encoder=False,
        )
    )
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no staging or old copy left beside it


def test_full_disk_leaves_nothing_behind(tiny_source, tmp_path, monkeypatch):
    from export import graphs

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(graphs, "save_graph", no_space)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="no space left"):
        run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=out, precision="fp32"))
    assert list(tmp_path.iterdir()) == []


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _fake_pipeline_folder(root: Path, pipeline_class: str, unet: dict, scheduler: dict | None = None) -> Path:
    _write_json(root / "model_index.json", {"_class_name": pipeline_class})
    _write_json(root / "unet" / "config.json", unet)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler or {"_class_name": "PNDMScheduler"})
    return root


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: _fake_pipeline_folder(root, "StableDiffusionXLPipeline", {}), "SDXL"),
        (
            lambda root: _fake_pipeline_folder(root, "StableDiffusionPipeline", {"cross_attention_dim": 1024}),
            "SD2",
        ),
        (
            lambda root: _fake_pipeline_folder(root, "StableDiffusionPipeline", {"in_channels": 9}),
            "inpainting",
        ),
        (
            lambda root: _fake_pipeline_folder(
                root,
                "StableDiffusionPipeline",
                {"cross_attention_dim": 768},
                {"prediction_type": "v_prediction"},
            ),
            "v_prediction",
        ),
        (lambda root: _fake_pipeline_folder(root, "KandinskyPipeline", {}), "not an SD1.x"),
        (
            lambda root: (_write_json(root / "config.json", {"architectures": ["BertModel"]}), root)[1],
            "BertModel",
        ),
    ],
)
def test_bad_sources_are_refused_with_what_was_found(tmp_path, make, message):
    source = make(tmp_path / "src")
    with pytest.raises(SourceError, match=message):
        run_export(ExportOptions(model=str(source), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 4)},
            "SDXL",
        ),
        ({"cond_stage_model.model.token_embedding.weight": (4, 4)}, "SD2"),
        ({"bert.embeddings.word_embeddings.weight": (4, 4)}, "not a Stable Diffusion checkpoint"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "9 input channels"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (48, 4, 3, 3)}, "does not match a shipped"),
    ],
)
def test_bad_single_files_are_refused(tmp_path, keys, message):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    with pytest.raises(SourceError, match=message):
        run_export(ExportOptions(model=str(path), output=tmp_path / "out"))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_checkpoints_need_allow_pickle_and_never_run_code(tiny_source, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_source["single_file"]))}, str(ckpt))
    with pytest.raises(SourceError, match="--allow-pickle"):
        run_export(ExportOptions(model=str(ckpt), output=tmp_path / "out"))
    run_export(
        ExportOptions(model=str(ckpt), output=tmp_path / "out", precision="fp32", allow_pickle=True, vae_encoder=False)
    )
    assert read_manifest(tmp_path / "out").raw["source"]["architecture"] == "tiny"

    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    with pytest.raises(SourceError, match="weights-only"):
        run_export(ExportOptions(model=str(evil), output=tmp_path / "out2", allow_pickle=True))
    assert not marker.exists()


def test_hub_id_offline_says_how_to_export_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(SourceError, match="--model DIR"):
        run_export(ExportOptions(model="JosephusCheung/ACertainThing", output=tmp_path / "out"))


def test_hub_id_exports_from_the_local_hub_cache(tiny_source, tmp_path):
    """The hub path is real: a repository already in the hub cache exports with the hub offline."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acertain--tiny-test"
    shutil.copytree(tiny_source["diffusers"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "out"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = _run_cli(
        ["--model", "acertain/tiny-test", "--output", str(out), "--precision", "fp32", "--no-vae-encoder"],
        env,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out).raw
    assert manifest["source"]["kind"] == "hub" and manifest["model_name"] == "tiny-test"


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    result = _run_cli(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_non_empty_output(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run_cli(["--model", str(tiny_source["diffusers"]), "--output", str(out)])
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_graph_that_overflows_in_fp16_is_kept_in_fp32(tmp_path):
    """Values past float16's 65504 make the fp16 VAE decoder return inf; export keeps that graph
    in fp32, says so in the manifest, and the runtime serves the mixed folder."""
    from export.random_model import build_random_pipeline, save_diffusers_folder
    from runtime import Pipeline

    pipe = build_random_pipeline("tiny", seed=3)
    with torch.no_grad():
        pipe.vae.decoder.up_blocks[0].resnets[0].conv1.weight.mul_(1e7)
    source = save_diffusers_folder(pipe, tmp_path / "src", "tiny")
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(source), output=out, precision="fp16", vae_encoder=False))
    graphs = read_manifest(out).raw["graphs"]
    assert graphs["vae_decoder"]["precision"] == "fp32" and "kept fp32" in graphs["vae_decoder"]["validation"]["note"]
    assert graphs["unet"]["precision"] == graphs["text_encoder"]["precision"] == "fp16"
    image = Pipeline.from_pretrained(out, provider="cpu")("1girl", seed=1, width=64, height=64, num_inference_steps=2)
    assert image.images[0].size == (64, 64)


def plant_tiny_values(source: Path, folder: Path) -> Path:
    """A copy of a diffusers folder whose every UNet / text-encoder matrix holds one value under
    fp16's smallest subnormal, as real and full-size random weights do (about one per matrix)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    for weights in (
        folder / "unet" / "diffusion_pytorch_model.safetensors",
        folder / "text_encoder" / "model.safetensors",
    ):
        tensors = load_file(str(weights))
        for name, tensor in tensors.items():
            if name.endswith(".weight") and tensor.ndim >= 2:
                tensor.view(tensor.shape[0], -1)[0, 0] = 1e-9
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def check_channels_last_conv_patch(export: Path, folder: Path) -> None:
    """A LoRA on a conv the CUDA target stores channels-last (NhwcConv: (out, kh, kw, in)) changes
    that weight by multiplier * (alpha / rank) * up @ down, in the graph's layout."""
    from addon_files import write_safetensors

    from runtime.graphs.lora import GraphTargets, read_lora

    targets = GraphTargets.read(export / "unet" / "model.onnx")
    module, slot = next((m, s) for m, slots in targets.modules.items() for s in slots if s.get("channels_last"))
    out_channels, in_channels, kh, kw = slot["shape"]
    rng = np.random.default_rng(3)
    down, up = rng.standard_normal((2, in_channels, kh, kw)), rng.standard_normal((out_channels, 2, 1, 1))
    tensors = {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": np.array(1.0)}
    write_safetensors(folder / "conv.safetensors", tensors)
    overrides = targets.patch([(read_lora("conv", folder / "conv.safetensors"), 0.8)])
    name = slot["initializer"]
    patched = {**overrides.inline, **overrides.external}[name].astype(np.float32)
    change = (patched - targets.base(name).astype(np.float32)).transpose(0, 3, 1, 2)
    expected = 0.8 * (1.0 / 2) * (up.reshape(out_channels, 2) @ down.reshape(2, -1))
    np.testing.assert_allclose(change, expected.reshape(change.shape), rtol=1e-2, atol=2e-3)


def check_time_projection_in_float32(path: Path) -> None:
    """Everything between the timestep input and the time embedding's first matrix product
    computes in float32, as diffusers does in fp16: no Cast on that path, and its Sin and Cos."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    frontier, reached = {"timestep"}, []
    while frontier:
        nodes = [node for node in graph.node if frontier & set(node.input) and node.op_type not in ("MatMul", "Gemm")]
        reached += nodes
        frontier = {output for node in nodes for output in node.output}
    ops = [node.op_type for node in reached]
    assert "Sin" in ops and "Cos" in ops
    assert "Cast" not in ops[: ops.index("Sin")], ops


def test_cuda_target_fp16_computes_in_fp16_and_is_validated_on_a_twin(tiny_source, tiny_fp16, tmp_path):
    """Without a GPU the CUDA graphs (GroupNorm and other CUDA-only fusions) cannot run here: the
    export validates a CPU-runnable twin in fp16 arithmetic, and the runtime refuses the folder
    on the CPU provider with a clear message. Its LoRA map finds every weight the CPU target's
    does, also where onnxruntime's float16 converter rounds tiny values its own way and where
    NhwcConv stores conv weights channels-last, and a LoRA patches those in their layout."""
    import onnx

    from runtime import ModelFolderError, Pipeline

    out = tmp_path / "cuda"
    source = plant_tiny_values(tiny_source["diffusers"], tmp_path / "source")
    run_export(ExportOptions(model=str(source), output=out, target="cuda", vae_encoder=False))
    for graph in ("text_encoder", "unet"):
        absent = json.loads((out / graph / "lora_targets.json").read_text())["absent"]
        assert absent == json.loads((tiny_fp16 / graph / "lora_targets.json").read_text())["absent"], graph
    check_channels_last_conv_patch(out, tmp_path)
    check_time_projection_in_float32(out / "unet" / "model.onnx")
    raw = read_manifest(out).raw
    assert raw["target"] == "cuda"
    for name in ("text_encoder", "unet", "vae_decoder"):
        entry = raw["graphs"][name]
        assert entry["compute_dtype"] == "float16" and "twin" in entry["validation"]["note"]
        assert entry["validation"]["relative_error"] <= FP16_TOLERANCE
    unet_inputs = {item["name"]: item["dtype"] for item in raw["graphs"]["unet"]["inputs"]}
    residuals = {name: "float16" for name in [*map(control_down_residual, range(8)), CONTROL_MID_RESIDUAL]}
    assert unet_inputs == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", **residuals}
    ops = {node.op_type for node in onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupNorm" in ops
    with pytest.raises(ModelFolderError, match="--target cpu"):
        Pipeline.from_pretrained(out, provider="cpu")


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_optimizer_reads_external_weights_only_where_needed(tiny_source, tmp_path, target):
    """Graphs over 2 GB come out of torch with their weights in files beside model.onnx; the
    optimizer works on the graph without them (to bound memory) and must produce the same model,
    for both targets (cuda: fp16 arithmetic by onnxruntime's converter)."""
    import onnx
    from onnx import numpy_helper

    from export import graphs
    from export.exporter import ExportOptions, build_specs
    from export.sources import load_source
    from runtime.text.tokenizer import ClipTokenizer

    source = load_source(str(tiny_source["diffusers"]))
    tokenizer = ClipTokenizer.from_folder(tiny_source["diffusers"] / "tokenizer")
    spec = build_specs(source, ExportOptions(model="", output=tmp_path), tokenizer)[1]
    inline = tmp_path / "inline" / "model.onnx"
    graphs.export_fp32(spec, inline)
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(
        onnx.load(str(inline)),
        str(external),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(external.parent.iterdir())) > 100  # one file per weight, as torch writes them

    models = [graphs.optimize(path, spec, target, "fp16") for path in (inline, external)]
    weights = [{item.name: numpy_helper.to_array(item) for item in model.graph.initializer} for model in models]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert value.dtype == weights[1][name].dtype and np.array_equal(value, weights[1][name]), name
    assert [node.SerializeToString() for node in models[0].graph.node] == [
        node.SerializeToString() for node in models[1].graph.node
    ]


def test_fusion_fallbacks_follow_the_measurement():
    """The fallback decision on fake measurements: a CUDA fp16 UNet that misses its tolerance loses
    packed Q/K/V first, then attention fusion, then nothing is left (fp32 comes next); a passing or
    overflowing graph keeps its fusions. fp32 CUDA graphs never pack Q/K/V (onnxruntime's SD recipe)."""
    from dataclasses import replace

    from export import graphs
    from export.validate import ValidationResult, fallback_attributes, next_fallback

    def enabled(target: str, precision: str) -> list[str]:
        options = graphs.fusion_options("unet", target, precision)
        names = ("enable_packed_qkv", "enable_packed_kv", "enable_attention")
        return [name for name in names if getattr(options, name)]

    missed = ValidationResult("unet", "fp16", 0.5, 0.05, 3e-2, True, "CUDAExecutionProvider", 0.05)
    fusions = enabled("cuda", "fp16")
    assert fusions == ["enable_packed_qkv", "enable_packed_kv", "enable_attention"]
    assert next_fallback(missed, (), fusions) == "packed_qkv"
    assert next_fallback(missed, fallback_attributes("packed_qkv"), fusions) == "attention"
    assert next_fallback(missed, ("enable_packed_qkv", "enable_packed_kv", "enable_attention"), fusions) is None
    assert next_fallback(replace(missed, relative_error=0.01), (), fusions) is None
    assert next_fallback(replace(missed, finite=False), (), fusions) is None
    assert enabled("cuda", "fp32") == enabled("cpu", "fp16") == ["enable_attention"]
    assert next_fallback(replace(missed, precision="fp32"), (), enabled("cuda", "fp32")) == "attention"


def test_working_size_validation_turns_off_a_fusion_that_misses_it(tiny_source, tmp_path, monkeypatch):
    """The working-size path on the CPU provider (on a GPU it runs for CUDA-target graphs): the UNet
    and VAE graphs are validated at the UNet's sample_size too, and a fused-attention UNet made to
    miss the tolerance there (a fake measurement standing for a bad kernel) is rebuilt without
    attention fusion, validated again and recorded as such in the manifest."""
    import dataclasses

    import onnx

    from export import exporter

    real = exporter.validate_graph
    fused = {"Attention", "MultiHeadAttention"}

    def measured(path, spec, precision, provider, working=False):
        result = real(path, spec, precision, provider, working)
        ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
        if spec.name == "unet" and ops & fused:
            return dataclasses.replace(result, relative_error=1.0, working_relative_error=1.0)
        return result

    monkeypatch.setattr(exporter, "validates_working_size", lambda target, provider: True)
    monkeypatch.setattr(exporter, "validate_graph", measured)
    out = tmp_path / "out"
    run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=out, precision="fp32"))
    graphs = read_manifest(out).raw["graphs"]
    unet = graphs["unet"]["validation"]
    assert unet["disabled_fusions"] == ["enable_attention"] and "attention fusion off" in unet["note"]
    assert unet["working_size_relative_error"] <= unet["relative_error"] <= 1e-4
    ops = {node.op_type for node in onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph.node}
    assert not ops & fused
    for name in ("vae_decoder", "vae_encoder"):
        validation = graphs[name]["validation"]
        assert validation["disabled_fusions"] == [] and validation["working_size_relative_error"] <= 1e-4
    assert graphs["text_encoder"]["validation"]["working_size_relative_error"] is None  # 77 tokens is its only size
