"""Turn what the user points at (diffusers folder, single checkpoint file, hub id) into a loaded
torch pipeline, and refuse anything that is not an SD1.x text-to-image model with a clear reason."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.checkpoint_file import CheckpointError, CheckpointWeights, as_safetensors, read_checkpoint
from export.shipped import ARCHITECTURES, config_dir, tokenizer_dir
from runtime.errors import UserError
from runtime.graphs.model_folder import sha256_of_file

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(UserError):
    """The model source is missing, unreadable, or not an SD1.x text-to-image checkpoint."""


@dataclass
class LoadedSource:
    pipe: Any  # diffusers StableDiffusionPipeline, fp32, eval mode
    kind: str  # "diffusers" | "single_file" | "hub"
    name: str  # shown as "Model:" in A1111 infotexts
    model_hash: str | None  # A1111's short hash (sha256[:10]) of a single-file checkpoint
    scheduler_config: dict[str, Any]  # as shipped, not re-serialised (see _read_scheduler_config)
    tokenizer_dir: Path
    arch: str | None  # shipped architecture a single file was matched to
    model_sha256: str | None = None  # the whole sha256 A1111 lists (/sdapi/v1/sd-models `sha256`)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} is missing") from None
    except json.JSONDecodeError as error:
        raise SourceError(f"{path} is not valid JSON: {error}") from None


def _read_scheduler_config(folder: Path) -> dict[str, Any]:
    """The scheduler config exactly as the source has it. Re-saving it through diffusers would add
    every default of the original class (e.g. PNDM's timestep_spacing="leading"), which Euler then
    would inherit; users who call `EulerAncestralDiscreteScheduler.from_config` get Euler's own
    defaults for keys the file lacks, and so must we."""
    return _read_json(folder / "scheduler" / "scheduler_config.json")


# ---------------------------------------------------------------------------------------------
# diffusers folders


def check_diffusers_folder(folder: Path) -> None:
    """Refuse SDXL, SD2, inpainting and v-prediction models before loading gigabytes."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        weights = [p.name for p in folder.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES]
        hint = f"; it holds {', '.join(weights[:3])}: pass that file instead" if weights else ""
        config = folder / "config.json"
        if config.is_file():
            found = _read_json(config).get("_class_name") or _read_json(config).get("architectures")
            hint = f"; it holds a single {found} model, not a Stable Diffusion pipeline" + hint
        raise SourceError(f"{folder} is not a diffusers pipeline folder (no model_index.json){hint}")
    pipeline_class = _read_json(index_path).get("_class_name", "?")
    if "XL" in pipeline_class:
        raise SourceError(f"{folder} is an SDXL pipeline ({pipeline_class}); only SD1.x models are supported")
    if pipeline_class.startswith(("OnnxStableDiffusion", "ORTStableDiffusion")):
        raise SourceError(f"{folder} is already an ONNX pipeline ({pipeline_class}); export needs the torch weights")
    if pipeline_class != "StableDiffusionPipeline":
        raise SourceError(f"{folder} holds a {pipeline_class}, not an SD1.x StableDiffusionPipeline")
    unet = _read_json(folder / "unet" / "config.json")
    _check_unet_config(unet, str(folder))
    scheduler = _read_scheduler_config(folder)
    _check_prediction_type(scheduler, str(folder))


def _check_unet_config(unet: dict[str, Any], where: str) -> None:
    width = unet.get("cross_attention_dim")
    if unet.get("in_channels", 4) != 4:
        raise SourceError(
            f"{where}: the UNet takes {unet['in_channels']} input channels (an inpainting or "
            "depth model); only SD1.x text-to-image models (4 channels) are supported"
        )
    if width == 1024:
        raise SourceError(f"{where} is an SD2.x model (text width 1024); only SD1.x models are supported")
    if isinstance(width, list | tuple) or unet.get("addition_embed_type"):
        raise SourceError(f"{where} is an SDXL-style UNet; only SD1.x models are supported")


def _check_prediction_type(scheduler: dict[str, Any], where: str) -> None:
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise SourceError(f"{where}: prediction_type {prediction!r} (SD2-v style) is not supported; SD1.x uses epsilon")


@contextmanager
def _quiet_dtype_deprecation() -> Iterator[None]:
    # Newer diffusers renamed `torch_dtype` to `dtype` and warn on the old name; older releases
    # in our supported range (>= 0.35) know only `torch_dtype`, so keep it and drop the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        yield


def load_diffusers_folder(folder: Path, kind: str, name: str) -> LoadedSource:
    from diffusers import StableDiffusionPipeline

    check_diffusers_folder(folder)
    log.info("loading diffusers pipeline from %s", folder)
    with _quiet_dtype_deprecation():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder),
            torch_dtype=torch.float32,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    return LoadedSource(
        pipe=pipe,
        kind=kind,
        name=name,
        model_hash=None,
        scheduler_config=_read_scheduler_config(folder),
        tokenizer_dir=folder / "tokenizer",
        arch=None,
    )


# ---------------------------------------------------------------------------------------------
# single files (LDM layout, as the A1111 web UI keeps them)


def classify_ldm_checkpoint(shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Say what a single file is when it is not an SD1.x text-to-image checkpoint."""
    if any(key.startswith("conditioner.embedders") for key in shapes):
        raise SourceError(f"{where} is an SDXL checkpoint; only SD1.x models are supported")
    if any(key.startswith("cond_stage_model.model.") for key in shapes):
        raise SourceError(f"{where} is an SD2.x checkpoint (OpenCLIP text encoder); only SD1.x models are supported")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None:
        sample = ", ".join(list(shapes)[:3])
        raise SourceError(
            f"{where} is not a Stable Diffusion checkpoint: {len(shapes)} tensors and no LDM UNet "
            f"(model.diffusion_model.*); first keys: {sample}"
        )
    if conv_in[1] != 4:
        raise SourceError(
            f"{where}: the UNet takes {conv_in[1]} input channels (an inpainting or depth model); "
            "only SD1.x text-to-image models are supported"
        )


def expected_ldm_shapes(arch: str | Path) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of a shipped architecture (or of a --config folder), from its configs on the
    meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from export.ldm_layout import to_ldm_state_dict

    configs = arch if isinstance(arch, Path) else config_dir(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read_json(configs / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(configs / "vae" / "config.json"))
        text = CLIPTextModel(CLIPTextConfig(**_read_json(configs / "text_encoder" / "config.json")))
    return {key: tuple(value.shape) for key, value in to_ldm_state_dict(unet, vae, text).items()}


_PARTS = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.", "text encoder": "cond_stage_model."}


def _check_parts_present(shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """A file without a VAE (or text encoder) is missing a whole model, not a few tensors: say so."""
    if not any(key.startswith(_PARTS["VAE"]) for key in shapes):
        raise SourceError(
            f"{where} has no VAE weights (first_stage_model.*): a VAE is needed; export it with a separate VAE "
            "file (`--vae FILE`)"
        )
    if not any(key.startswith(_PARTS["text encoder"]) for key in shapes):
        raise SourceError(f"{where} has no text encoder weights (cond_stage_model.*); it cannot be exported alone")


# What --no-vae-encoder leaves unused: the VAE's encoder half (quant_conv belongs to it).
_VAE_ENCODER = ("first_stage_model.encoder.", "first_stage_model.quant_conv.")


def fill_pruned_vae_encoder(weights: CheckpointWeights, path: Path, config: Path | None) -> None:
    """--no-vae-encoder: a file whose VAE encoder was pruned (decoder-only VAEs are shared that way)
    converts with zeros in its place. diffusers' converter reads every VAE key, but no encoder graph
    is exported, so the zeros never reach an image. A file with encoder weights, without any VAE, or
    that fits no architecture apart from its encoder is left for the usual checks to name."""
    if any(key.startswith(_VAE_ENCODER) for key in weights.shapes):
        return
    if not any(key.startswith(_PARTS["VAE"]) for key in weights.shapes):
        return
    for expected in [expected_ldm_shapes(config)] if config else map(expected_ldm_shapes, ARCHITECTURES):
        encoder = {key: shape for key, shape in expected.items() if key.startswith(_VAE_ENCODER)}
        if all(weights.shapes.get(key) == shape for key, shape in expected.items() if key not in encoder):
            break
    else:
        return
    if weights.tensors is None:  # a .safetensors read as it is: its kept tensors, to write a converted copy
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            weights.tensors = {key: handle.get_tensor(key) for key in weights.shapes}
    weights.tensors.update({key: torch.zeros(shape) for key, shape in encoder.items()})
    weights.shapes.update(encoder)
    log.info("%s has no VAE encoder weights: exporting without one (--no-vae-encoder)", path.name)


def _check_prediction_metadata(metadata: dict[str, str], where: str) -> None:
    """kohya's trainers write the prediction type into .safetensors metadata; the runtime's SD1.x
    samplers predict epsilon, so a v-prediction model would export and then give wrong images."""
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if prediction in ("v", "v_prediction") or metadata.get("ss_v_parameterization", "").lower() == "true":
        raise SourceError(f"{where} is a v-prediction model; only epsilon-prediction SD1.x models are supported")


def _mismatch(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    """What keeps a checkpoint from matching an architecture, in words: a missing group or a shape."""
    wrong = [key for key, shape in expected.items() if shapes.get(key, shape) != shape]
    missing = [key for key in expected if key not in shapes]
    if missing and not wrong:
        part = next((name for name, prefix in _PARTS.items() if missing[0].startswith(prefix)), "model")
        of_part = sum(key.startswith(_PARTS.get(part, "")) for key in expected)
        return f"{len(missing)} of its {of_part} {part} tensors are missing, e.g. {missing[0]}"
    key = wrong[0]
    return f"{key} has shape {list(shapes[key])}, expected {list(expected[key])}"


def match_architecture(shapes: dict[str, tuple[int, ...]], where: str) -> str:
    """The shipped architecture whose every tensor the checkpoint has with the same shape."""
    mismatches, other_shapes = {}, []
    for arch in ARCHITECTURES:
        expected = expected_ldm_shapes(arch)
        if all(shapes.get(key) == shape for key, shape in expected.items()):
            return arch
        mismatches[arch] = _mismatch(shapes, expected)
        other_shapes.append(any(shapes.get(key, shape) != shape for key, shape in expected.items()))
    detail = "; ".join(f"{arch}: {problem}" for arch, problem in mismatches.items())
    fitting = [arch for arch, wrong_shape in zip(mismatches, other_shapes, strict=True) if not wrong_shape]
    if fitting:  # every tensor it has fits an architecture: it lacks the rest
        _check_parts_present(shapes, where)
        raise SourceError(f"{where} is incomplete ({'; '.join(f'{a}: {mismatches[a]}' for a in fitting)})")
    raise SourceError(
        f"{where} does not match a shipped SD1.x architecture ({detail}); pass --config with a "
        "diffusers config folder (model_index.json, unet/, vae/, text_encoder/ configs) for this model"
    )


def _check_config_folder(config: Path) -> None:
    for relative in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"):
        if not (config / relative).is_file():
            raise SourceError(f"--config {config} has no {relative}: give a diffusers config folder")
    scheduler = config / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise SourceError(f"--config {config} has no scheduler/scheduler_config.json")
    _check_unet_config(_read_json(config / "unet" / "config.json"), f"--config {config}")
    _check_prediction_type(_read_json(scheduler), f"--config {config}")


def _from_single_file(weights: Path, config: Path, tokenizer_folder: Path, where: str) -> Any:
    """diffusers' conversion, with any failure (keys or shapes the configs do not expect) in one line."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    try:
        with _quiet_dtype_deprecation():
            return StableDiffusionPipeline.from_single_file(
                str(weights),
                config=str(config),
                tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_folder)),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                torch_dtype=torch.float32,
                local_files_only=True,
            )
    except Exception as error:  # diffusers raises ValueError, KeyError, RuntimeError (shapes)... here
        text = " ".join(str(error).split()).split(". ")[0][:300] or type(error).__name__  # the first sentence
        raise SourceError(f"{where} does not fit the configs in {config}: {text}") from None


def load_single_file(
    path: Path, allow_pickle: bool, config: Path | None, ema: bool = False, vae_encoder: bool = True
) -> LoadedSource:
    model_sha256 = sha256_of_file(path)
    try:
        weights = read_checkpoint(path, allow_pickle, ema)
    except CheckpointError as error:
        raise SourceError(str(error)) from None
    classify_ldm_checkpoint({**dict.fromkeys(weights.file_keys, ()), **weights.shapes}, path.name)
    if not vae_encoder:
        fill_pruned_vae_encoder(weights, path, config)
    _check_prediction_metadata(weights.metadata, path.name)
    arch = None
    if config is None:
        arch = match_architecture(weights.shapes, path.name)
        config = config_dir(arch)
    else:
        _check_config_folder(config)
        _check_parts_present(weights.shapes, path.name)
    tokenizer_folder = config / "tokenizer" if (config / "tokenizer").is_dir() else tokenizer_dir()
    log.info("converting %s with the %s configs (offline)", path.name, arch or config)
    with (
        tempfile.TemporaryDirectory(prefix="acertain-ckpt-") as scratch,
        as_safetensors(path, weights, Path(scratch)) as converted,
    ):
        weights.tensors = None  # the converted file has them now: let the originals go
        pipe = _from_single_file(converted, config, tokenizer_folder, path.name)
    return LoadedSource(
        pipe=pipe,
        kind="single_file",
        name=path.stem,
        model_hash=model_sha256[:10],
        scheduler_config=_read_scheduler_config(config),
        tokenizer_dir=tokenizer_folder,
        arch=arch,
        model_sha256=model_sha256,
    )


# ---------------------------------------------------------------------------------------------
# hub ids


def download_from_hub(repo_id: str) -> Path:
    """The repository's pipeline files in the local hub cache (downloading them if the hub answers)."""
    from diffusers import StableDiffusionPipeline

    try:
        return Path(StableDiffusionPipeline.download(repo_id))
    except Exception as error:  # huggingface_hub raises several unrelated types when offline
        raise SourceError(
            f"could not get {repo_id} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). If this machine is offline, "
            f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`), copy DIR "
            "here and run `python -m export --model DIR`, or pass a single .safetensors file"
        ) from None


def load_source(
    model: str, allow_pickle: bool = False, config: Path | None = None, ema: bool = False, vae_encoder: bool = True
) -> LoadedSource:
    """The torch pipeline of a diffusers folder, single checkpoint file or hub id. `vae_encoder`
    False (--no-vae-encoder) accepts a single file whose VAE encoder was pruned."""
    path = Path(model).expanduser()
    if path.is_dir():
        if ema:
            raise SourceError("--ema picks the EMA weights of a single checkpoint file; a diffusers folder has none")
        return load_diffusers_folder(path, "diffusers", path.resolve().name)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise SourceError(f"{path} is not a checkpoint file (expected {', '.join(SINGLE_FILE_SUFFIXES)})")
        return load_single_file(path, allow_pickle, config, ema, vae_encoder)
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        folder = download_from_hub(model)
        return load_diffusers_folder(folder, "hub", model.split("/")[-1])
    raise SourceError(f"{model} does not exist (expected a diffusers folder, a checkpoint file or a hub id)")
