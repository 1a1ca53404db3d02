"""Single-file checkpoints as people have them, built here from the tiny model's LDM file: Lightning
training pickles, NAI-era text encoder names, EMA copies, files without a VAE, v-prediction models,
and files that are not checkpoints at all. Each one exports with the weights diffusers would load
from the plain file, or is refused in one line of our own words."""

from __future__ import annotations

import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

from export.__main__ import main as export_main  # noqa: E402
from export.checkpoint_file import read_checkpoint  # noqa: E402
from export.sources import SourceError, load_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."


@pytest.fixture(scope="module")
def ldm(tiny_source) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_source["single_file"]))


@pytest.fixture(scope="module")
def reference(tiny_source) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers loads from the plain LDM file: the weights every variant must export."""
    return _weights(load_source(str(tiny_source["single_file"])).pipe)


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def _assert_same_weights(pipe, reference: dict) -> None:
    for name, expected in reference.items():
        got = getattr(pipe, name).state_dict()
        assert set(got) == set(expected), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name


def _ema_key(key: str) -> str:
    return "model_ema." + key[len("model.") :].replace(".", "")


class _OldNumpyPickler(pickle._Pickler):  # the pure-Python pickler: lets us name globals as numpy 1.x did
    def save_global(self, obj, name=None) -> None:
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _lightning_checkpoint(state: dict, path: Path, zipped: bool = True) -> None:
    """A checkpoint as PyTorch Lightning 1.x saved SD training runs: the state dict plus training
    bookkeeping keyed by the ModelCheckpoint class, with numpy scalars pickled the numpy 1.x way
    (protocol 2, so their bytes go through _codecs.encode)."""
    modules = ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING)
    saved = {name: sys.modules.get(name) for name in modules}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
    for name in modules:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[LIGHTNING].ModelCheckpoint = model_checkpoint
    try:
        checkpoint = {
            "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "state_dict": state,
            "callbacks": {model_checkpoint: {
                "monitor": None, "best_model_score": None, "best_model_path": "",
                "current_score": np.float64(0.1234), "best_k_models": {"last.ckpt": np.float32(0.5)},
                "dirpath": "/fsx/stable-diffusion/logs/checkpoints",
            }},
            "optimizer_states": [], "lr_schedulers": [],
        }  # fmt: skip
        pickler = types.SimpleNamespace(
            __name__="pickle",
            Pickler=_OldNumpyPickler,
            dump=lambda obj, f, protocol: _OldNumpyPickler(f, protocol).dump(obj),
        )
        torch.save(checkpoint, str(path), pickle_module=pickler, _use_new_zipfile_serialization=zipped)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) if zipped else set()
    assert not zipped or {f"{LIGHTNING}.ModelCheckpoint", "numpy.core.multiarray.scalar"} <= unsafe


def test_lightning_ckpt_with_shared_ema_exports_and_validates(ldm, reference, tmp_path) -> None:
    # EMA tensors sharing storage with the model's, as an untrained EMA copy does.
    state = {**ldm, **{_ema_key(key): value for key, value in ldm.items() if key.startswith(UNET)}}
    state["model_ema.num_updates"] = torch.tensor(0)
    path = tmp_path / "ACertainThing.ckpt"
    _lightning_checkpoint(state, path)
    _assert_same_weights(load_source(str(path), allow_pickle=True).pipe, reference)
    output = tmp_path / "out"
    args = ["--model", str(path), "--allow-pickle", "--output", str(output), "--precision", "fp32"]
    assert export_main([*args, "--no-vae-encoder"]) == 0
    assert (output / "manifest.json").is_file()


def test_legacy_pickle_and_nai_text_encoder_names(ldm, reference, tmp_path) -> None:
    nai = {key.replace(TEXT, "cond_stage_model.transformer."): value for key, value in ldm.items()}
    legacy = tmp_path / "nai.ckpt"
    _lightning_checkpoint(nai, legacy, zipped=False)
    _assert_same_weights(load_source(str(legacy), allow_pickle=True).pipe, reference)
    safetensors = tmp_path / "nai.SAFETENSORS"  # suffixes are case-insensitive
    save_file(nai, str(safetensors))
    _assert_same_weights(load_source(str(safetensors)).pipe, reference)


def test_ema_weights_are_chosen_with_ema_only(ldm, reference, tmp_path) -> None:
    conv_in = UNET + "input_blocks.0.0.weight"
    ema = {_ema_key(key): value.clone() for key, value in ldm.items() if key.startswith(UNET)}
    ema[_ema_key(conv_in)] += 1.0
    path = tmp_path / "ema.safetensors"
    save_file({**ldm, **ema}, str(path))
    _assert_same_weights(load_source(str(path)).pipe, reference)  # non-EMA by default, as A1111
    chosen = load_source(str(path), ema=True).pipe
    assert torch.equal(chosen.unet.conv_in.weight, ldm[conv_in] + 1.0)
    with pytest.raises(SourceError, match="no EMA weights"):
        load_source(_plain(ldm, tmp_path), ema=True)


def _plain(ldm: dict, tmp_path: Path) -> str:
    path = tmp_path / "plain.safetensors"
    save_file(ldm, str(path))
    return str(path)


def _drop(prefix: str):
    return lambda ldm: {key: value for key, value in ldm.items() if not key.startswith(prefix)}


REFUSALS = {
    "no-vae": (_drop("first_stage_model."), {}, "a VAE is needed"),
    "no-text-encoder": (_drop("cond_stage_model."), {}, "no text encoder weights"),
    "missing-group": (_drop(UNET + "output_blocks.2."), {}, "UNet tensors are missing"),
    "kohya-v-prediction": (lambda ldm: ldm, {"modelspec.prediction_type": "v"}, "v-prediction"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unusable_files_are_refused_in_one_line(ldm, tmp_path, case) -> None:
    change, metadata, message = REFUSALS[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(change(ldm), str(path), metadata=metadata)
    _assert_one_line_exit_2(["--model", str(path), "--output", str(tmp_path / "out")], message)


def _assert_one_line_exit_2(args: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]  # besides progress logs
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in run.stderr, run.stderr


def test_files_that_are_no_checkpoints_and_code_in_pickles_are_refused(tmp_path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    _assert_one_line_exit_2(["--model", str(text), "--allow-pickle"], "not a PyTorch checkpoint")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Evil()}, str(evil))
    with pytest.raises(SourceError, match="an object of type print") as error:
        load_source(str(evil), allow_pickle=True)
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)


def test_config_runs_never_end_in_a_traceback(ldm, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_drop(UNET + "output_blocks.2.")(ldm), str(path))
    sd15 = REPO / "models" / "sd15"  # the full-size configs: shapes differ from the tiny weights
    args = ["--model", str(path), "--output", str(tmp_path / "o")]
    _assert_one_line_exit_2([*args, "--config", str(sd15)], "does not fit the configs")
    _assert_one_line_exit_2([*args, "--config", str(tmp_path)], "has no model_index.json")
    v_config = tmp_path / "v-config"
    subprocess.run(["cp", "-r", str(REPO / "models" / "tiny"), str(v_config)], check=True)
    scheduler = v_config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("{", '{"prediction_type": "v_prediction",', 1))
    _assert_one_line_exit_2([*args, "--config", str(v_config)], "prediction_type 'v_prediction'")


def test_reading_a_ckpt_touches_only_what_is_kept(ldm, tmp_path) -> None:
    """Peak RSS while reading a checkpoint whose EMA copy and optimizer state (256 MiB) are not kept."""
    path = tmp_path / "big.ckpt"
    bulk = {f"model_ema.junk{index}": torch.ones(16 * 2**20 // 4) for index in range(16)}
    _lightning_checkpoint({**ldm, **bulk}, path)
    probe = (
        "import resource, sys; from pathlib import Path; from export.checkpoint_file import read_checkpoint\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "weights = read_checkpoint(Path(sys.argv[1]), allow_pickle=True)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, len(weights.tensors))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True)
    grown_mib, kept = map(int, run.stdout.split())
    assert kept == len(ldm)
    assert grown_mib < 128, grown_mib  # the 256 MiB not kept are never read (measured: a few MiB)


def test_read_checkpoint_keeps_only_model_weights(ldm, tmp_path) -> None:
    path = tmp_path / "extra.safetensors"
    save_file({**ldm, "model_ema.decay": torch.tensor(0.9999), "lora_unet_x": torch.ones(1)}, str(path))
    weights = read_checkpoint(path, allow_pickle=False)
    assert set(weights.shapes) == set(ldm) and weights.tensors is None  # read by diffusers from the file itself


def test_upper_case_safetensors_suffix_exports(ldm, reference, tmp_path) -> None:
    """`X.SAFETENSORS` that needs no renaming reaches diffusers as it is: diffusers chooses its reader
    by the exact suffix, so the exporter must hand it a lower-case name."""
    path = tmp_path / "plain.SAFETENSORS"
    save_file(ldm, str(path))
    _assert_same_weights(load_source(str(path)).pipe, reference)
    output = tmp_path / "out"
    assert export_main(["--model", str(path), "--output", str(output), "--precision", "fp32"]) == 0
    assert (output / "unet" / "model.onnx").is_file()
