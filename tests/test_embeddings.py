"""Textual-inversion embeddings (A1111 `.safetensors` with `emb_params`) against diffusers'
`load_textual_inversion`, and their token positions against A1111's chunking rules
(modules/sd_hijack_clip.py tokenize_line: a name is matched on its token ids, the embedding takes
one position per vector and starts the next 75-token chunk when it does not fit in this one).

Tolerance on pixels in [0, 255], as test_pipeline_parity: fp32 max <= 1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from safetensors.torch import save_file

import diffusers_reference as reference
from runtime import Pipeline
from runtime.text.conditioning import prompt_to_chunks
from runtime.text.embeddings import EmbeddingLibrary

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres, negemb"
VOCAB = 49408


@pytest.fixture(scope="module")
def embeddings_dir(tiny_source, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, 32, generator=generator) * 0.5}, str(folder / "negemb.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=generator)}, str(folder / "sd15wide.safetensors"))
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(folder / "xl.safetensors"))
    (folder / "pickled.pt").write_bytes(b"\x80\x04")
    return folder


@pytest.fixture(scope="module")
def runtime_fp32(tiny_fp32, embeddings_dir):
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu", embeddings_dir=embeddings_dir)


def test_two_vector_embedding_in_the_negative_prompt_equals_diffusers(runtime_fp32, tiny_source, embeddings_dir):
    pipe = reference.load(tiny_source["diffusers"])
    plain = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [11], steps=8)
    pipe.load_textual_inversion(str(embeddings_dir / "negemb.safetensors"), token="negemb")
    negative = pipe.maybe_convert_prompt(NEGATIVE, pipe.tokenizer)  # "lowres, negemb negemb_1"
    expected = reference.generate(pipe, PROMPT, negative, "euler_a", [11], steps=8)
    out = runtime_fp32(PROMPT, negative_prompt=NEGATIVE, seed=11, width=64, height=64, num_inference_steps=8,
                       output_type="np")  # fmt: skip
    got = np.stack(out.images)
    assert np.abs(expected - plain).max() * 255 > 5  # the embedding matters
    assert np.abs(got - expected).max() * 255 <= 1.0
    digest = hashlib.sha256((embeddings_dir / "negemb.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "negemb: {digest}"' in out.infotexts[0]


def chunks(pipe: Pipeline, prompt: str):
    return prompt_to_chunks(pipe.tokenizer, prompt, embeddings=pipe.embeddings.matcher())


def test_token_positions_follow_a1111(runtime_fp32):
    bos, eos = runtime_fp32.tokenizer.bos_id, runtime_fp32.tokenizer.eos_id
    a, cat = runtime_fp32.tokenizer.tokenize(["a", "cat"])
    tokens = chunks(runtime_fp32, "a negemb cat").token_ids[0]
    assert list(tokens[:6]) == [bos, *a, VOCAB, VOCAB + 1, *cat, eos]
    weighted = chunks(runtime_fp32, "(negemb:1.5)")
    assert list(weighted.weights[0][1:3]) == [1.5, 1.5]
    # 74 tokens leave one position: the 2-vector embedding starts the next chunk, whole.
    full = chunks(runtime_fp32, "cat " * 74 + "negemb")
    assert full.count == 2
    assert list(full.token_ids[0][74:77]) == [*cat, eos, eos]
    assert list(full.token_ids[1][:4]) == [bos, VOCAB, VOCAB + 1, eos]
    # 73 tokens: it fits in the first chunk.
    assert chunks(runtime_fp32, "cat " * 73 + "negemb").count == 1


def test_listing_has_a1111_shape_with_skipped_files(runtime_fp32):
    listing = runtime_fp32.embeddings.listing()
    assert listing["loaded"] == {
        "negemb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2}
    }
    assert set(listing["skipped"]) == {"sd15wide", "xl", "pickled"}
    assert "python -m export.embedding" in listing["skipped"]["pickled"]["reason"]


def test_a_new_file_appears_after_refresh(runtime_fp32, embeddings_dir, tmp_path):
    library = EmbeddingLibrary(tmp_path, runtime_fp32.tokenizer, 32, VOCAB)
    assert library.listing()["loaded"] == {}
    save_file({"emb_params": torch.zeros(3, 32)}, str(tmp_path / "three.safetensors"))
    library.refresh()
    assert library.listing()["loaded"]["three"]["vectors"] == 3


def test_pt_embeddings_convert_with_the_exporter(tmp_path, embeddings_dir):
    from export.embedding import convert
    from runtime.text.embeddings import read_embedding

    vectors = torch.randn(2, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "old", "step": 100}, tmp_path / "old.pt")
    converted = convert(tmp_path / "old.pt")
    assert np.array_equal(read_embedding(converted, 32).vectors, vectors.numpy())
    with pytest.raises(ValueError, match="exists"):
        convert(tmp_path / "old.pt")
