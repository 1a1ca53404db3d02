"""`python -m export --vae`: a separate VAE (A1111 single file in LDM layout, or a diffusers folder)
exported instead of the checkpoint's, against diffusers' pipeline built with that VAE.

Tolerance on pixels in [0, 255], as test_pipeline_parity: fp32 max <= 1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import diffusers_reference as reference
from export.exporter import ExportOptions, run_export
from export.ldm_layout import vae_key
from export.vae import VaeError, load_vae
from runtime import Pipeline

PROMPT, NEGATIVE = "masterpiece, best quality, 1girl", "lowres"


@pytest.fixture(scope="module")
def other_vae(tiny_source) -> AutoencoderKL:
    base = AutoencoderKL.from_pretrained(str(tiny_source["diffusers"] / "vae"))
    torch.manual_seed(3)
    vae = AutoencoderKL.from_config(base.config)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return vae.eval()


def ldm_file(vae: AutoencoderKL, path: Path, prefix: str = "") -> Path:
    """The VAE as A1111 users keep it: LDM key names, attention weights as 1x1 convolutions."""
    levels = len(vae.config.block_out_channels)
    state = {}
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        state[prefix + name] = value.contiguous()
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def vae_file(other_vae, tmp_path_factory) -> Path:
    return ldm_file(other_vae, tmp_path_factory.mktemp("vae") / "anime.vae.safetensors")


@pytest.fixture(scope="module")
def checkpoint_without_vae(tiny_source, tmp_path_factory) -> Path:
    """The tiny single file with its first_stage_model.* weights removed."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_source["single_file"]))
    path = tmp_path_factory.mktemp("no-vae") / "novae.safetensors"
    save_file({key: value for key, value in state.items() if not key.startswith("first_stage_model.")}, str(path))
    return path


@pytest.fixture(scope="module")
def exported_with_vae(checkpoint_without_vae, vae_file, tmp_path_factory) -> Path:
    """A checkpoint without VAE weights, exported with a separate VAE file."""
    output = tmp_path_factory.mktemp("export") / "tiny-vae"
    run_export(ExportOptions(model=str(checkpoint_without_vae), output=output, precision="fp32", vae=str(vae_file)))
    return output


def test_separate_vae_matches_diffusers_with_that_vae(
    exported_with_vae, tiny_source, other_vae, vae_file, checkpoint_without_vae
):
    pipe = reference.load(tiny_source["diffusers"])
    plain = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=6)
    pipe.vae = other_vae
    expected = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=6)
    ours = Pipeline.from_pretrained(exported_with_vae, provider="cpu")
    out = ours(PROMPT, negative_prompt=NEGATIVE, seed=9, width=64, height=64, num_inference_steps=6, output_type="np")
    assert np.abs(expected - plain).max() * 255 > 5  # the VAE matters
    assert np.abs(np.stack(out.images) - expected).max() * 255 <= 1.0
    digest = hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: anime.vae.safetensors," in out.infotexts[0]
    model_hash = hashlib.sha256(checkpoint_without_vae.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {model_hash}, Model: novae," in out.infotexts[0]  # the user's file, not the merged copy


def test_vae_sources_in_every_layout_load_the_same_weights(other_vae, tmp_path):
    template = other_vae
    prefixed = ldm_file(other_vae, tmp_path / "full.safetensors", prefix="first_stage_model.")
    other_vae.save_pretrained(str(tmp_path / "folder"))
    torch.save({"state_dict": dict(AutoencoderKL.state_dict(load_vae(str(prefixed), template, False).vae))},
               tmp_path / "x.vae.pt")  # fmt: skip
    for source in (prefixed, tmp_path / "folder"):
        loaded = load_vae(str(source), template, allow_pickle=False).vae
        for key, value in other_vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (source, key)
    with pytest.raises(VaeError, match="--allow-pickle"):
        load_vae(str(tmp_path / "x.vae.pt"), template, allow_pickle=False)


def test_broken_vae_files_are_one_clear_error(other_vae, tmp_path):
    save_file({"decoder.conv_out.weight": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(VaeError, match="lacks"):
        load_vae(str(tmp_path / "partial.safetensors"), other_vae, False)
    with pytest.raises(VaeError, match="not a readable"):
        load_vae(str(tmp_path / "junk.safetensors"), other_vae, False)
    with pytest.raises(VaeError, match="does not exist"):
        load_vae(str(tmp_path / "none.safetensors"), other_vae, False)


def _without_encoder(path: Path, prefix: str, out: Path) -> Path:
    """`path` with its VAE encoder half pruned, as decoder-only VAEs are shared."""
    from safetensors.torch import load_file

    encoder = (prefix + "encoder.", prefix + "quant_conv.")
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith(encoder)}, str(out))
    return out


def test_decoder_only_vae_exports_with_no_vae_encoder(tiny_source, other_vae, vae_file, tmp_path):
    """A decoder-only VAE, as a --vae file or inside the checkpoint, exports with --no-vae-encoder
    (the user asked for no encoder) and decodes as diffusers does; without the flag it is refused
    in one line that names it."""
    from export.__main__ import main as export_main

    decoder_only = _without_encoder(vae_file, "", tmp_path / "decoder-only.safetensors")
    pruned = _without_encoder(tiny_source["single_file"], "first_stage_model.", tmp_path / "pruned.safetensors")
    with pytest.raises(VaeError, match="--no-vae-encoder"):
        load_vae(str(decoder_only), other_vae, allow_pickle=False)
    pipe = reference.load(tiny_source["diffusers"])
    expected_plain = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=4)
    pipe.vae = other_vae
    expected_other = reference.generate(pipe, PROMPT, NEGATIVE, "euler_a", [9], steps=4)
    cases = {
        "vae-file": (["--model", str(tiny_source["single_file"]), "--vae", str(decoder_only)], expected_other),
        "checkpoint": (["--model", str(pruned)], expected_plain),
    }
    for name, (args, expected) in cases.items():
        output = tmp_path / name
        assert export_main([*args, "--output", str(output), "--precision", "fp32", "--no-vae-encoder"]) == 0, name
        assert not (output / "vae_encoder").exists()
        ours = Pipeline.from_pretrained(output, provider="cpu")
        out = ours(PROMPT, negative_prompt=NEGATIVE, seed=9, width=64, height=64, num_inference_steps=4,
                   output_type="np")  # fmt: skip
        assert np.abs(np.stack(out.images) - expected).max() * 255 <= 1.0, name
    assert export_main(["--model", str(pruned), "--output", str(tmp_path / "refused"), "--precision", "fp32"]) == 2
