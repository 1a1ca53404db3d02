"""Session options: the saved optimized graphs."""

from __future__ import annotations


def test_saved_optimized_graphs_are_read_back_and_give_the_same_output(tiny_fp32, tmp_path, monkeypatch):
    """The opt-in cold-start lever (Pipeline.from_pretrained(optimized_cache=True)): the first load saves each
    ORT-optimized graph, the next load reads it back, and the graph computes the same thing."""
    import numpy as np

    from runtime.graphs import sessions
    from runtime.graphs.model_folder import read_manifest

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


def test_io_bound_unet_step_equals_the_plain_call(tiny_fp16, monkeypatch):
    """The UNet's IO-binding path (CUDA only in use, so no CI machine runs it otherwise), on CPU
    memory: bound buffers updated in place for each step and for a new conditioning give exactly
    what the plain session call gives."""
    import numpy as np
    import onnxruntime as ort

    from runtime.graphs import sessions
    from runtime.graphs.model_folder import read_manifest

    from_numpy, from_shape = ort.OrtValue.ortvalue_from_numpy, ort.OrtValue.ortvalue_from_shape_and_type
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", lambda array, *_: from_numpy(array, "cpu", 0))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", lambda *args: from_shape(*args[:2], "cpu", 0))
    manifest = read_manifest(tiny_fp16)
    unet = sessions.load_sessions(manifest, sessions.SessionConfig(provider="cpu")).unet
    rng = np.random.default_rng(0)
    shape = (2, manifest.latent_channels, 8, 8)
    for _ in range(2):  # the second conditioning reuses the first one's buffers
        context = rng.standard_normal((2, 77, manifest.text_width), dtype=np.float32)
        plain = unet.bind(context, shape)
        monkeypatch.setattr(unet, "provider", sessions.CUDA)
        bound = unet.bind(context, shape)
        monkeypatch.setattr(unet, "provider", "CPUExecutionProvider")
        for timestep in (999.0, 500.0, 1.0):
            sample = rng.standard_normal(shape, dtype=np.float32)
            steps = np.full((2,), timestep, dtype=np.float32)
            np.testing.assert_array_equal(bound(sample, steps), plain(sample, steps))
    assert len(unet._bindings) == 1
