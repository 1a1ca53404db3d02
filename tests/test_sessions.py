"""Session options: the saved optimized graphs."""

from __future__ import annotations

import pytest


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


class DeferredCopies:
    """CUDA's ordering as the UNet's IO binding meets it: update_inplace (a cudaMemcpy on the
    default stream, from pageable memory) may return before its data lands, and ORT's non-blocking
    compute stream does not wait for it. Here a copy lands only when the device is synchronized
    (IOBinding.synchronize_inputs, the CUDA provider's cudaDeviceSynchronize): a run that is not
    ordered after its copies reads the previous call's inputs, as a stale CUDA-graph replay would."""

    def __init__(self, monkeypatch) -> None:
        import numpy as np
        import onnxruntime as ort

        self.pending: list = []
        update, synchronize = ort.OrtValue.update_inplace, ort.IOBinding.synchronize_inputs

        def deferred_update(value, data) -> None:
            self.pending.append((value, np.array(data)))

        def flush(binding) -> None:
            for value, data in self.pending:
                update(value, data)
            self.pending.clear()
            synchronize(binding)

        monkeypatch.setattr(ort.OrtValue, "update_inplace", deferred_update)
        monkeypatch.setattr(ort.IOBinding, "synchronize_inputs", flush)


def cpu_bound_unet(folder, monkeypatch, cuda_graph: bool = False):
    """The UNet session's CUDA path (IO binding, and graph ids per shape with `cuda_graph`) with its
    buffers in CPU memory, so that a machine without a GPU runs the code the CUDA provider runs."""
    import onnxruntime as ort

    from runtime.graphs import sessions
    from runtime.graphs.io_binding import BindingPool
    from runtime.graphs.model_folder import read_manifest

    from_numpy, from_shape = ort.OrtValue.ortvalue_from_numpy, ort.OrtValue.ortvalue_from_shape_and_type
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", lambda array, *_: from_numpy(array, "cpu", 0))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", lambda *args: from_shape(*args[:2], "cpu", 0))
    manifest = read_manifest(folder)
    unet = sessions.UNetSession(manifest.graphs["unet"], sessions.CPU, sessions.SessionConfig(provider="cpu"))
    unet.provider, unet.cuda_graph, unet._bindings = sessions.CUDA, cuda_graph, BindingPool(cuda_graph)
    return unet, manifest


def plain_run(unet, context, sample, timestep, residuals=None):
    """The reference: one plain session.run on the same inputs."""
    import numpy as np

    from runtime.graphs.model_folder import UNET_CONTEXT, UNET_SAMPLE, UNET_TIMESTEP

    feed = unet.feed({UNET_CONTEXT: context, UNET_SAMPLE: sample, UNET_TIMESTEP: timestep, **(residuals or {})})
    for residual in unet.residuals:  # no ControlNet: zeros
        feed.setdefault(residual.name, np.zeros(residual.shape(sample.shape), dtype=feed[UNET_SAMPLE].dtype))
    return unet.session.run(None, feed)[0].astype(np.float32)


def test_io_bound_unet_replays_changing_inputs_like_plain_runs(tiny_fp16, monkeypatch):
    """Six calls per conditioning with sample and timestep changing each call, then a new
    conditioning copied into the same buffers: every call equals a plain session.run on its own
    inputs, with copies that land only when ordered (DeferredCopies), and no output is overwritten
    by a later call."""
    import numpy as np

    copies = DeferredCopies(monkeypatch)
    unet, manifest = cpu_bound_unet(tiny_fp16, monkeypatch)
    rng = np.random.default_rng(0)
    shape = (2, manifest.latent_channels, 8, 8)
    kept = []
    for _ in range(2):
        context = rng.standard_normal((2, 77, manifest.text_width), dtype=np.float32)
        step = unet.bind(context, shape)
        for timestep in (999.0, 961.5, 500.0, 250.25, 21.0, 1.0):
            sample = rng.standard_normal(shape, dtype=np.float32)
            steps = np.full((2,), timestep, dtype=np.float32)
            out = step(sample, steps)
            expected = plain_run(unet, context, sample, steps)
            np.testing.assert_array_equal(out, expected)
            assert not copies.pending
            assert not kept or not np.array_equal(out, kept[-1][0])  # the inputs do change the output
            kept.append((out, expected))
    for out, expected in kept:
        np.testing.assert_array_equal(out, expected)
    assert len(unet._bindings.plain) == 1 and not unet._bindings.graphs


def test_io_bound_unet_takes_controlnet_residuals_and_puts_the_zeros_back(tiny_fp32, monkeypatch):
    """A ControlNet that stops before the last step: steps given residuals, then steps without, on
    the same bound buffers. Each equals a plain session.run with those residuals or with zeros;
    a new generation that binds the same shapes after a ControlNet's last step starts from zeros."""
    import numpy as np

    copies = DeferredCopies(monkeypatch)
    unet, manifest = cpu_bound_unet(tiny_fp32, monkeypatch)
    assert unet.takes_residuals and len(unet.residuals) == 9  # the tiny UNet: 8 skip connections + middle
    rng = np.random.default_rng(2)
    shape = (2, manifest.latent_channels, 8, 6)
    context = rng.standard_normal((2, 77, manifest.text_width), dtype=np.float32)
    residuals = [rng.standard_normal(item.shape(shape), dtype=np.float32) for item in unet.residuals]
    named = {item.name: value for item, value in zip(unet.residuals, residuals, strict=True)}
    sample, steps = rng.standard_normal(shape, dtype=np.float32), np.full((2,), 500.0, dtype=np.float32)
    step = unet.bind(context, shape)
    controlled = step(sample, steps, residuals)
    np.testing.assert_array_equal(controlled, plain_run(unet, context, sample, steps, named))
    plain = step(sample, steps)
    np.testing.assert_array_equal(plain, plain_run(unet, context, sample, steps))
    assert not np.allclose(controlled, plain, atol=1e-3)  # the residuals do reach the output
    step(sample, steps, residuals)
    np.testing.assert_array_equal(unet.bind(context, shape)(sample, steps), plain)
    assert not copies.pending
    with pytest.raises(ValueError, match="down_block_residual_0 has shape"):
        step(sample, steps, [residuals[-1], *residuals[1:]])


def test_cuda_graphs_get_one_binding_per_shape(tiny_fp32, monkeypatch):
    """With CUDA graphs on, prompt and negative prompt of different chunk counts (77 and 154
    tokens) and hires fix's second latent size each get their own buffers and graph id, kept for
    the session's life (a captured graph replays their addresses); past MAX_CUDA_GRAPHS a shape
    runs without a graph (id -1). Every call equals a plain session.run."""
    import numpy as np

    from runtime.graphs import io_binding
    from runtime.graphs.model_folder import UNET_SAMPLE

    DeferredCopies(monkeypatch)
    unet, manifest = cpu_bound_unet(tiny_fp32, monkeypatch, cuda_graph=True)
    graph_ids = []
    run = unet.session.run_with_iobinding

    def recording(binding, options):
        graph_ids.append(options.get_run_config_entry(io_binding.GRAPH_ID))
        return run(binding, options)

    monkeypatch.setattr(unet.session, "run_with_iobinding", recording)
    rng = np.random.default_rng(1)
    width, channels = manifest.text_width, manifest.latent_channels
    shapes = [((1, 77, width), (1, channels, 8, 8)), ((1, 154, width), (1, channels, 8, 8)),
              ((1, 77, width), (1, channels, 12, 12)), ((1, 154, width), (1, channels, 12, 12)),
              ((2, 77, width), (2, channels, 8, 8))]  # fmt: skip
    assert len(shapes) == io_binding.MAX_CUDA_GRAPHS + 1
    buffers = {}
    for _ in range(2):  # the second round reuses each shape's buffers and graph id
        for index, (context_shape, sample_shape) in enumerate(shapes):
            context = rng.standard_normal(context_shape, dtype=np.float32)
            step = unet.bind(context, sample_shape)
            for timestep in (800.0, 20.0):
                sample = rng.standard_normal(sample_shape, dtype=np.float32)
                steps = np.full(sample_shape[:1], timestep, dtype=np.float32)
                np.testing.assert_array_equal(step(sample, steps), plain_run(unet, context, sample, steps))
                expected_id = index if index < io_binding.MAX_CUDA_GRAPHS else io_binding.NO_GRAPH
                assert graph_ids.pop() == str(expected_id)
            address = step.args[0].values[UNET_SAMPLE].data_ptr()
            assert buffers.setdefault(index, address) == address or index >= io_binding.MAX_CUDA_GRAPHS
    assert len(unet._bindings.graphs) == io_binding.MAX_CUDA_GRAPHS
    unet.release_memory({})  # keeps the captured graphs' buffers
    assert len(unet._bindings.graphs) == io_binding.MAX_CUDA_GRAPHS and not unet._bindings.plain


def test_prompt_and_negative_of_different_chunk_counts_with_hires_fix_under_cuda_graphs(tiny_fp32, monkeypatch):
    """What was refused at bind time before: a two-chunk prompt with a one-chunk negative (two
    context lengths) and hires fix (two latent sizes) under CUDA graphs. Each of the four shapes
    gets its own binding and graph, and the image equals the plain CPU pipeline's."""
    import numpy as np

    from runtime import Pipeline

    prompt = ", ".join(["masterpiece, best quality, 1girl, smile"] * 12)  # past 75 tokens: two chunks
    request = {
        "negative_prompt": "lowres", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 7,
        "output_type": "np", "enable_hr": True,
        "hires_options": {"hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6},
    }  # fmt: skip
    expected = Pipeline.from_pretrained(tiny_fp32, provider="cpu")(prompt, **request).images[0]
    DeferredCopies(monkeypatch)
    pipe = Pipeline.from_pretrained(tiny_fp32, provider="cpu")
    pipe.loras.base.unet, _ = cpu_bound_unet(tiny_fp32, monkeypatch, cuda_graph=True)
    out = pipe(prompt, **request).images[0]
    width = pipe.manifest.text_width
    assert sorted(pipe.sessions.unet._bindings.graphs) == sorted(
        ((1, tokens, width), (1, 4, size, size)) for tokens in (77, 154) for size in (8, 12)
    )
    np.testing.assert_array_equal(out, expected)
