"""Session options: the saved optimized graphs."""

from __future__ import annotations


def test_saved_optimized_graphs_are_read_back_and_give_the_same_output(tiny_fp32, tmp_path, monkeypatch):
    """The opt-in cold-start lever (Pipeline.from_pretrained(optimized_cache=True)): the first load saves each
    ORT-optimized graph, the next load reads it back, and the graph computes the same thing."""
    import numpy as np

    from runtime import sessions
    from runtime.model_folder import read_manifest

    monkeypatch.setattr(sessions, "CACHE_MIN_BYTES", 0)  # the tiny graphs are far under 64 MiB
    manifest = read_manifest(tiny_fp32)
    config = sessions.SessionConfig(provider="cpu", optimized_cache=True, cache_dir=tmp_path)
    ids = {"input_ids": np.full((1, 77), 49407, dtype=np.int64)}
    first = sessions.load_sessions(manifest, config).text_encoder.run(ids)
    saved = sorted(path.name.split("-")[0] for path in tmp_path.iterdir())
    assert saved == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]  # i10 loads the encoder too
    assert not any(".partial-" in path.name for path in tmp_path.iterdir())
    again = sessions.load_sessions(manifest, config).text_encoder
    assert again.session._model_path.startswith(str(tmp_path))
    np.testing.assert_allclose(again.run(ids), first, rtol=1e-5, atol=1e-5)
    plain = sessions.load_sessions(manifest, sessions.SessionConfig(provider="cpu", optimized_cache=False))
    np.testing.assert_allclose(plain.text_encoder.run(ids), first, rtol=1e-5, atol=1e-5)
