"""kohya-format LoRAs applied at serving time, against diffusers' `load_lora_weights`.

The LoRA files are built here as kohya-ss writes them for SD1: `lora_unet_<diffusers module path
with '_'>` and `lora_te_text_model_<...>`, with `.lora_down.weight`, `.lora_up.weight` and
`.alpha`; conv layers as LyCORIS LoCon stores them (k x k down, 1 x 1 up). diffusers converts that
format itself (its kohya converter) and applies it with peft, unmerged.

Tolerances on pixels in [0, 255], as test_pipeline_parity: fp32 max <= 1; fp16 max <= 3, mean <= 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from safetensors.torch import save_file

import diffusers_reference as reference
from runtime import Pipeline
from runtime.errors import InvalidRequestError
from runtime.graphs import lora as lora_module
from runtime.graphs.lora import LORA_GRAPHS, LoraLibrary
from runtime.graphs.model_folder import TEXT_INPUT
from runtime.text.extra_networks import LoraUse, parse_prompt

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"
STEPS = 8


def kohya_lora(pipe, seed: int, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A random LoRA over every Linear/Conv2d of the UNet and text encoder."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    parts = [("lora_unet_", "", pipe.unet), ("lora_te_", "text_model_", pipe.text_encoder)]
    for prefix, extra, model in parts:
        modules = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
        for name, module in modules:
            key = prefix + (extra if not name.startswith("text_model") else "") + name.replace(".", "_")
            out_features, in_features = module.weight.shape[:2]
            if isinstance(module, torch.nn.Conv2d):
                kernel = module.weight.shape[2:]
                down = torch.randn(rank, in_features, *kernel, generator=generator)
                up = torch.randn(out_features, rank, 1, 1, generator=generator)
            else:
                down = torch.randn(rank, in_features, generator=generator)
                up = torch.randn(out_features, rank, generator=generator)
            scale = 0.3 / (in_features * np.prod(down.shape[2:])) ** 0.5
            tensors[f"{key}.lora_down.weight"] = down * scale
            tensors[f"{key}.lora_up.weight"] = up * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.fixture(scope="module")
def lora_dir(tiny_source, tmp_path_factory) -> Path:
    pipe = reference.load(tiny_source["diffusers"])
    folder = tmp_path_factory.mktemp("loras")
    save_file(kohya_lora(pipe, 1, rank=4, alpha=2.0), str(folder / "style_a.safetensors"))
    # Every module: diffusers' kohya converter drops text-encoder q/k/v keys of a LoRA that covers
    # only some of them ("UNEXPECTED ... to_q_lora"), which would make it no reference.
    save_file(kohya_lora(pipe, 2, rank=2, alpha=1.0), str(folder / "b.safetensors"))
    return folder


@pytest.fixture(scope="module")
def diffusers_with_loras(tiny_source, lora_dir):
    pipe = reference.load(tiny_source["diffusers"])
    pipe.load_lora_weights(str(lora_dir), weight_name="style_a.safetensors", adapter_name="style_a")
    pipe.load_lora_weights(str(lora_dir), weight_name="b.safetensors", adapter_name="b")
    return pipe


def expected(pipe, adapters: dict[str, float], seed: int) -> np.ndarray:
    pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [seed], steps=STEPS)


def ours(pipe: Pipeline, tags: str, seed: int) -> np.ndarray:
    out = pipe(
        f"{PROMPT} {tags}", negative_prompt=NEGATIVE, seed=seed, width=64, height=64,
        num_inference_steps=STEPS, output_type="np",
    )  # fmt: skip
    return np.stack(out.images)


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() * 255)


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32, lora_dir):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=lora_dir)


def test_lora_at_0_8_equals_diffusers_and_switching_gives_each_request_its_image(
    runtime_fp32, diffusers_with_loras, tiny_fp32
):
    plain = Pipeline.from_pretrained(tiny_fp32, provider="cpu")
    without = ours(plain, "", 7)
    one = expected(diffusers_with_loras, {"style_a": 0.8}, 7)
    both = expected(diffusers_with_loras, {"style_a": 0.8, "b": 0.5}, 7)
    assert worst(one, without) > 10  # the LoRA changes the image a lot
    assert worst(ours(runtime_fp32, "<lora:style_a:0.8>", 7), one) <= 1.0
    assert worst(ours(runtime_fp32, "<lora:style_a:0.8> <lora:b:0.5>", 7), both) <= 1.0
    assert worst(ours(runtime_fp32, "", 7), without) <= 1e-6  # back to the plain sessions
    assert worst(ours(runtime_fp32, "<lora:style_a:0.8>", 7), one) <= 1.0  # from the cache


def test_separate_text_encoder_and_unet_multipliers(runtime_fp32, diffusers_with_loras):
    """<lora:name:0:0.8>: UNet only; diffusers' per-component adapter weights give the same."""
    diffusers_with_loras.set_adapters(["style_a"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.0}])
    reference_image = reference.generate(diffusers_with_loras, PROMPT, NEGATIVE, "euler_a", [3], steps=STEPS)
    assert worst(ours(runtime_fp32, "<lora:style_a:0:0.8>", 3), reference_image) <= 1.0


def test_graphs_with_external_weights_map_and_patch_loras(
    tiny_source, lora_dir, diffusers_with_loras, tmp_path, monkeypatch
):
    """Full-size graphs keep their weights in model.onnx_data: the exporter maps LoRA targets
    through that file and the runtime patches them with add_external_initializers."""
    import export.graphs
    from export.exporter import ExportOptions, run_export

    monkeypatch.setattr(export.graphs, "EXTERNAL_DATA_THRESHOLD", 0)  # every graph as a full-size one
    folder = tmp_path / "external"
    run_export(ExportOptions(model=str(tiny_source["diffusers"]), output=folder, precision="fp32"))
    targets = json.loads((folder / "unet" / "lora_targets.json").read_text())
    assert {entry["file"] for entry in targets["initializers"].values()} == {"model.onnx_data"}
    pipe = Pipeline.from_pretrained(folder, provider="cpu", lora_dir=lora_dir)
    assert worst(ours(pipe, "<lora:style_a:0.8>", 7), expected(diffusers_with_loras, {"style_a": 0.8}, 7)) <= 1.0


def test_fp16_graphs_with_lora_stay_close_to_diffusers(tiny_fp16, lora_dir, diffusers_with_loras):
    pipe = Pipeline.from_pretrained(tiny_fp16, provider="cpu", lora_dir=lora_dir)
    difference = np.abs(ours(pipe, "<lora:style_a:0.8>", 7) - expected(diffusers_with_loras, {"style_a": 0.8}, 7))
    assert difference.max() * 255 <= 3.0 and difference.mean() * 255 <= 0.5


def test_library_keeps_read_files_within_its_bound(lora_dir, monkeypatch):
    """Read LoRA files are kept most recently used first while their weights fit the bound; the
    newest one always stays, and a changed file is read again."""
    reads = []
    real_read = lora_module.read_lora
    monkeypatch.setattr(lora_module, "read_lora", lambda name, *rest: reads.append(name) or real_read(name, *rest))
    one_file = LoraLibrary(lora_dir).get("b").nbytes
    library = LoraLibrary(lora_dir, cache_bytes=one_file)
    reads.clear()
    for name in ("b", "b", "style_a", "style_a", "b"):
        library.get(name)
    assert reads == ["b", "style_a", "b"]  # style_a (larger than the bound) pushed b out, then b it
    roomy = LoraLibrary(lora_dir, cache_bytes=10 * 2**30)
    reads.clear()
    for name in ("b", "style_a", "b", "style_a"):
        roomy.get(name)
    assert reads == ["b", "style_a"]


def test_infotext_keeps_the_tag_and_writes_lora_hashes(runtime_fp32, lora_dir):
    import hashlib

    data = (lora_dir / "style_a.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    shorthash = hashlib.sha256(data[header:]).hexdigest()[:12]  # A1111's addnet hash
    out = runtime_fp32("a cat <lora:style_a:0.8>", seed=1, width=64, height=64, num_inference_steps=1)
    assert out.infotexts[0].startswith("a cat <lora:style_a:0.8>\n")
    assert f'Lora hashes: "style_a: {shorthash}"' in out.infotexts[0]


@pytest.mark.parametrize(
    ("prompt", "text", "uses"),
    [
        ("a <lora:x>", "a ", [LoraUse("x", 1.0, 1.0)]),
        ("a <lora:x:0.8>, b", "a , b", [LoraUse("x", 0.8, 0.8)]),
        ("<lora:x:0.5:1.5>", "", [LoraUse("x", 0.5, 1.5)]),
        ("<lora:x:te=0.2:unet=0.3>", "", [LoraUse("x", 0.2, 0.3)]),
        ("<lora:x:1:unet=0>", "", [LoraUse("x", 1.0, 0.0)]),
        ("<lora:x:0.5> <lora:y:-1>", " ", [LoraUse("x", 0.5, 0.5), LoraUse("y", -1.0, -1.0)]),
        ("<lyco:x:0.7>", "", [LoraUse("x", 0.7, 0.7)]),  # A1111 registers lyco as an alias of lora
        ("a <lora x> <b>", "a <lora x> <b>", []),  # not the `<word:args>` form: text, as in A1111
    ],
)
def test_extra_network_tags_follow_a1111(prompt, text, uses):
    assert parse_prompt(prompt) == (text, uses)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<hypernet:x:1>", "not a supported extra network"),
        ("<lora:x:abc>", "not a number"),
        ("<lora:x:1e9>", "out of range"),
        ("<lora:x:dyn=4>", "does not take dyn="),
    ],
)
def test_bad_tags_are_one_clear_error(prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_prompt(prompt)


def test_unknown_pickled_malformed_and_foreign_loras_are_refused(runtime_fp32, lora_dir, tmp_path, tiny_fp32):
    with pytest.raises(InvalidRequestError, match=r"unknown LoRA 'nope'.*available: b, style_a"):
        runtime_fp32.prepare(prompt="<lora:nope:1>")
    with pytest.raises(InvalidRequestError, match=r"unknown LoRA '\.\./b'"):
        runtime_fp32.prepare(prompt="<lora:../b:1>")
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "pickled.pt").write_bytes(b"\x80\x04not really")
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)
    save_file(
        {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320)}, str(folder / "sdx.safetensors")
    )
    bad_shape = {
        "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 7, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
    }
    save_file(bad_shape, str(folder / "other_arch.safetensors"))
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=folder)
    cases = {
        "pickled": "convert it once with torch",
        "broken": "header length is out of range",
        "sdx": "lacks lora_down or lora_up|does not have",
        "other_arch": "another architecture",
    }
    for name, message in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            pipe.prepare(prompt=f"<lora:{name}:1>")


# -- the patched-set cache --------------------------------------------------------------------------


def graph_file_bytes(model: Path) -> int:
    """What a set of rebuilt text encoder and UNet sessions is expected to hold: their graph files."""
    return sum(item.stat().st_size for graph in LORA_GRAPHS for item in (model / graph).glob("model.onnx*"))


def held(pipe: Pipeline) -> list[int]:
    return [item.bytes for item in pipe.loras._cache.values()]


@pytest.mark.parametrize("proc", [True, False], ids=["measured", "no-proc"])
def test_patched_sets_are_evicted_before_a_build_and_stay_within_the_bound(tiny_fp32, lora_dir, monkeypatch, proc):
    """Room for a new set is made before it is built (what is kept plus the new set's graph files
    fit the bound), and what stays after it fits too; three multipliers of one LoRA are three sets.
    Without /proc each set is charged its graph files: two of them fit, the oldest went first."""
    if not proc:
        monkeypatch.setattr(lora_module, "resident_bytes", lambda: None)
    estimate = graph_file_bytes(tiny_fp32)
    bound = -(-2 * estimate // 2**20) * 2**20  # room for two sets by their graph files, not three
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=lora_dir, lora_cache_mb=bound // 2**20)
    at_build = []
    real_patch = lora_module.GraphTargets.patch
    monkeypatch.setattr(
        lora_module.GraphTargets,
        "patch",
        lambda targets, uses: at_build.append(sum(held(pipe))) or real_patch(targets, uses),
    )
    for multiplier in (0.3, 0.6, 0.9):
        pipe.loras.sessions_for([LoraUse("b", multiplier, multiplier)])
        assert sum(held(pipe)) <= bound
    assert len(at_build) == 6  # text encoder and UNet of each set
    assert all(kept + estimate <= bound for kept in at_build)
    if not proc:
        assert held(pipe) == [estimate, estimate]


def test_a_cache_of_0_keeps_no_set_and_gives_the_cached_image(runtime_fp32, tiny_fp32, lora_dir):
    """lora_cache_mb=0: every LoRA request builds its set, uses it and lets it go; the images are
    the default cache's. A set evicted while a caller still holds it keeps working (it is only a
    reference the cache dropped)."""
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=lora_dir, lora_cache_mb=0)
    kept = pipe.loras.sessions_for([LoraUse("style_a", 0.8, 0.8)])
    tokens = {TEXT_INPUT: np.zeros((1, 77), dtype=np.int64)}
    before = kept.sessions.text_encoder.run(tokens)
    for tags in ("<lora:style_a:0.8>", "<lora:b:0.5>", "<lora:style_a:0.8> <lora:b:0.5>", "<lora:style_a:0.8>"):
        assert worst(ours(pipe, tags, 5), ours(runtime_fp32, tags, 5)) <= 1e-6
        assert held(pipe) == []
    assert len(held(runtime_fp32)) >= 3
    np.testing.assert_array_equal(kept.sessions.text_encoder.run(tokens), before)


def test_sets_are_charged_the_resident_memory_their_build_took(tiny_fp32, lora_dir, monkeypatch):
    """With a made-up resident-memory reader: a set whose build took almost the whole bound pushes
    out the next build, two cheap ones stay together, though by their graph files all three fit."""
    estimate = graph_file_bytes(tiny_fp32)
    bound = 3 * estimate + 2**20
    growths = [bound - estimate // 2, estimate // 4, estimate // 4]
    readings = iter([value for growth in growths for value in (10 * 2**30, 10 * 2**30 + growth)])
    monkeypatch.setattr(lora_module, "resident_bytes", lambda: next(readings))
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_dir=lora_dir, lora_cache_mb=1)
    pipe.loras.cache_bytes = bound
    for multiplier, growth in zip((0.3, 0.6, 0.9), growths, strict=True):
        assert pipe.loras.sessions_for([LoraUse("b", multiplier, multiplier)]).bytes == growth
    assert held(pipe) == growths[1:]  # the first went before the second was built


def test_the_charge_falls_back_to_the_graph_files_and_is_never_negative(monkeypatch):
    assert lora_module.resident_bytes() > 0  # Linux: /proc/self/statm
    monkeypatch.setattr(lora_module, "resident_bytes", lambda: None)  # no /proc
    assert lora_module.resident_growth(lambda: "sessions", 1234) == ("sessions", 1234)
    readings = iter([5000, 3000])  # another thread freed more than the build took
    monkeypatch.setattr(lora_module, "resident_bytes", lambda: next(readings))
    assert lora_module.resident_growth(lambda: "sessions", 1234) == ("sessions", 0)


@pytest.mark.parametrize("value", [-1, 1.5, True, "4096"])
def test_a_bad_lora_cache_size_is_refused_before_loading(tiny_fp32, value):
    with pytest.raises(InvalidRequestError, match="lora_cache_mb: must be a whole number of MiB >= 0"):
        Pipeline.from_pretrained(tiny_fp32, provider="cpu", lora_cache_mb=value)
