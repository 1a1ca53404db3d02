"""ControlNet units at run time (runtime.control.request, .planning, .injection; the pipeline, CLI
and server around them) against their references:

- diffusers' StableDiffusionControlNetPipeline / ...Img2ImgPipeline (one unit, two units, a partial
  guidance window, img2img) at fp32, within 1/255, with the library's default step rule;
- the ControlNet extension's hook math under k-diffusion driven as A1111 drives it
  (tests/controlnet_hook_reference.py) for its other control modes and its guidance rule;
- the extension's own functions (copied below, source named) for model names, infotext and windows;
- a webuiapi ControlNetUnit call against a server, equal to diffusers given OpenCV's canny map.

The tiny model exported fp32 with a random tiny ControlNet added; 64 px, a few steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONTROLNET
from runtime import Pipeline
from runtime.control.injection import PassControl, PassUnit, control_scales, in_window
from runtime.control.request import ControlUnit, check_unit, enabled_units, find_model
from runtime.errors import InvalidRequestError

# -- the extension's own functions, copied (Mikubill/sd-webui-controlnet v1.1.455) ---------------------


def extension_find_closest(search: str, cn_models: dict, cn_models_names: dict):
    """scripts/controlnet.py find_closest_lora_model_name (global_state's dicts as arguments)."""
    if not search:
        return None
    if search in cn_models:
        return search
    search = search.lower()
    if search in cn_models_names:
        return cn_models_names.get(search)
    applicable = [name for name in cn_models_names if search in name.lower()]
    if not applicable:
        return None
    applicable = sorted(applicable, key=lambda name: len(name))
    return cn_models_names[applicable[0]]


def extension_serialize(values: dict) -> str:
    """internal_controlnet/args.py ControlNetUnit.serialize with field_to_displaytext and
    serialize_value (enum values given as their strings)."""
    fields = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
              "guidance_start", "guidance_end", "pixel_perfect", "control_mode")  # fmt: skip
    infotext_dict = {" ".join(word.capitalize() for word in field.split("_")): str(values[field]) for field in fields}
    if not all("," not in str(v) and ":" not in str(v) for v in infotext_dict.values()):
        return ""
    return ", ".join(f"{field}: {value}" for field, value in infotext_dict.items())


class A1111Window:
    """When the extension's guidance_schedule_handler lets a unit run: A1111's launch_sampling sets
    state.sampling_step 0 and sampling_steps, callback_state sets sampling_step = i after step i."""

    def __init__(self, steps: int) -> None:
        self.sampling_step, self.sampling_steps = 0, steps

    def runs(self, start: float, end: float) -> bool:
        current_sampling_percent = self.sampling_step / self.sampling_steps
        return not (current_sampling_percent < start or current_sampling_percent > end)


def diffusers_keep(i: int, steps: int, s: float, e: float) -> float:
    """StableDiffusionControlNetPipeline.__call__'s controlnet_keep entry (diffusers 0.42)."""
    return 1.0 - float(i / steps < s or (i + 1) / steps > e)


# -- units, names, infotext, windows: no model needed ---------------------------------------------------

IMAGE = np.zeros((32, 48, 3), np.uint8)
IMAGE[8:20, 10:30] = 255
MODELS = {"control_v11p_sd15_canny": "d14c016b", "control_v11f1p_sd15_depth": "cfd03158", "control_sd15_canny": None}


def test_unit_dicts_are_read_as_the_extension_reads_them():
    unit = ControlUnit.from_dict(
        {"enabled": True, "model": "x", "input_image": "data", "lowvram": True, "guidance": 0.5, "mask_image": None,
         "unknown": 1, "weight": None},
    )  # fmt: skip
    assert (unit.image, unit.low_vram, unit.guidance_end, unit.weight) == ("data", True, 0.5, 1.0)
    with pytest.raises(InvalidRequestError) as error:
        ControlUnit.from_dict({"image": "a", "input_image": "b"}, "controlnet[0]")
    assert error.value.field == "controlnet[0].input_image"
    units = [ControlUnit(model="x"), {"model": "y", "enabled": False}, ControlUnit(enabled=False)]
    assert [field for field, _ in enabled_units(units, 3)] == ["controlnet[0]"]
    with pytest.raises(InvalidRequestError, match="limit of 1") as error:
        enabled_units([{"model": "a"}, {"model": "b"}], 1)
    assert error.value.field == "controlnet"


@pytest.mark.parametrize("name", ["control_v11p_sd15_canny [d14c016b]", "CONTROL_V11P_SD15_CANNY", "canny", "depth",
                                  "sd15_canny", "control_sd15_canny", "v11"])  # fmt: skip
def test_models_are_found_as_the_extension_finds_them(name):
    titles = {f"{model} [{digest}]" if digest else model: model for model, digest in MODELS.items()}
    names = {model.lower(): title for title, model in titles.items()}
    expected = extension_find_closest(name, titles, names)
    assert titles[expected] == find_model(name, MODELS, "model")


@pytest.mark.parametrize("name", ["control_v11p_sd15_canny [00000000]", "openpose", "None", ""])
def test_unknown_models_are_one_error(name):
    with pytest.raises(InvalidRequestError) as error:
        find_model(name, MODELS, "controlnet[0].model")
    assert error.value.field == "controlnet[0].model"


def test_infotext_is_the_extensions_serialize():
    """The values as the extension's pydantic unit holds them: float weight, guidance and thresholds;
    an int resolution; a slider default as the module table wrote it (canny's 200)."""
    unit = ControlUnit(model="canny", image=IMAGE, module="canny", weight=1, threshold_a=64, guidance_end=1,
                       control_mode=1, resize_mode=2)  # fmt: skip
    checked = check_unit(unit, MODELS, "controlnet[0]", False)
    assert checked.infotext == extension_serialize({
        "module": "canny", "model": "canny", "weight": 1.0, "resize_mode": "Resize and Fill", "processor_res": 512,
        "threshold_a": 64.0, "threshold_b": 200, "guidance_start": 0.0, "guidance_end": 1.0,
        "pixel_perfect": False, "control_mode": "My prompt is more important",
    })  # fmt: skip
    assert "Threshold A: 64.0, Threshold B: 200" in checked.infotext


def test_soft_injection_scales_are_hooks():
    """hook.py: [weight * 0.825 ** float(12 - i) for i in range(13)], zip()-ed with the residuals."""
    assert control_scales(0.7, 13, True) == [0.7 * (0.825 ** float(12 - i)) for i in range(13)]
    assert control_scales(0.7, 5, True) == [0.7 * (0.825 ** float(12 - i)) for i in range(13)][:5]
    assert control_scales(0.7, 13, False) == [0.7] * 13


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.2, 0.5), (0.25, 0.75), (0.0, 0.3), (0.6, 1.0), (0.5, 0.5)])
@pytest.mark.parametrize("steps", [1, 4, 10, 13])
def test_guidance_windows_count_steps_as_each_reference(start, end, steps):
    state = A1111Window(steps)
    for i in range(steps):
        assert in_window("a1111", i, steps, start, end) == state.runs(start, end)
        state.sampling_step = i  # callback_state after step i
        assert in_window("diffusers", i, steps, start, end) == bool(diffusers_keep(i, steps, start, end))


def test_cfg_injection_runs_the_controlnet_on_the_conditional_rows_only():
    calls = []

    def run(sample, timestep, context, cond):
        calls.append((len(sample), float(context[0, 0, 0]), cond.shape))
        return [np.ones((len(sample), 2, 4, 4), np.float32), np.ones((len(sample), 3, 2, 2), np.float32)]

    hint = np.zeros((1, 3, 32, 32), np.float32)
    units = [PassUnit(run, hint, 0.5, False, True, 0.0, 1.0), PassUnit(run, hint, 2.0, True, False, 0.0, 1.0)]
    control = PassControl(units, "diffusers", 4)
    context = np.concatenate([np.zeros((2, 77, 8), np.float32), np.ones((2, 77, 8), np.float32)])  # uncond, cond
    sample, timestep = np.zeros((4, 4, 4, 4), np.float32), np.zeros(4, np.float32)
    down, mid = control.residuals(sample, timestep, context, 2)
    assert calls == [(2, 1.0, (2, 3, 32, 32)), (4, 0.0, (4, 3, 32, 32))]
    soft = control_scales(2.0, 2, True)
    np.testing.assert_allclose(down[:, 0, 0, 0], [soft[0]] * 2 + [0.5 + soft[0]] * 2, rtol=1e-6)
    np.testing.assert_allclose(mid[:, 0, 0, 0], [soft[1]] * 2 + [0.5 + soft[1]] * 2, rtol=1e-6)
    calls.clear()
    only_uncond = control.residuals(sample[:2], timestep[:2], context[:2], 2)  # A1111's separate uncond call
    assert [rows for rows, _, _ in calls] == [2]  # the soft unit alone
    np.testing.assert_allclose(only_uncond[0][:, 0, 0, 0], [soft[0]] * 2, rtol=1e-6)
    windowed = PassControl([PassUnit(run, hint, 1.0, False, False, 0.0, 0.5)], "diffusers", 4)
    windowed.step_done(1)  # step 2 of 4: (2 + 1) / 4 > 0.5, off
    assert windowed.residuals(sample, timestep, context, 0) is None


def test_the_hires_pass_softens_canny_units_as_the_extension_does():
    """hook.py: in the hires pass a unit of a canny (or mlsd) module gets soft injection."""
    from runtime.control.injection import pass_unit

    canny = check_unit(ControlUnit(model="canny", image=IMAGE, module="canny"), MODELS, "controlnet[0]", False)
    plain = check_unit(ControlUnit(model="canny", image=IMAGE), MODELS, "controlnet[0]", False)
    maps = np.zeros((8, 8, 3), np.uint8)
    assert pass_unit(canny, maps, None, hires_pass=True).soft and not pass_unit(canny, maps, None, False).soft
    assert not pass_unit(plain, maps, None, hires_pass=True).soft
    assert pass_unit(plain, maps, None, False, pooled=True).cond_only


# -- the exported ControlNet: the library against diffusers and the extension ----------------------------

PROMPT, NEGATIVE, SIZE, CFG = "masterpiece, best quality, 1girl", "lowres", 64, 7.0
SECOND = "control_tiny_b"


def control_image(seed: int = 3, size: int = SIZE) -> np.ndarray:
    """A structured control map (shapes on a dark ground), uint8 (H, W, 3)."""
    y, x = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(4):
        (cx, cy), r = rng.integers(8, size - 8, 2).tolist(), int(rng.integers(5, 14))
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(80, 256, 3)
    image[size // 4 : size // 4 + 3, :] = 255
    return image


def pixels(out) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in out.images])


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() * 255)


@pytest.fixture(scope="module")
def second_controlnet(tiny_source, tmp_path_factory) -> Path:
    """Another random tiny ControlNet (seed 2), as a diffusers folder, for two-unit runs."""
    from export.random_model import build_and_save_controlnet

    return build_and_save_controlnet(tiny_source["diffusers"] / "unet", tmp_path_factory.mktemp("cn2"), 2)["diffusers"]


@pytest.fixture(scope="module")
def export_two(tiny_fp32_controlnet, second_controlnet, tmp_path_factory) -> Path:
    """tiny_fp32_controlnet with the second ControlNet added as control_tiny_b."""
    from export.add_controlnet import AddControlNetOptions, add_controlnet

    output = tmp_path_factory.mktemp("export") / "tiny-fp32-two"
    shutil.copytree(tiny_fp32_controlnet, output)
    add_controlnet(AddControlNetOptions(str(second_controlnet), output, SECOND))
    return output


@pytest.fixture(scope="module")
def pipe(export_two) -> Pipeline:
    return Pipeline.from_pretrained(export_two, provider="cpu")


@pytest.fixture(scope="module")
def hook():
    """The references (tests/controlnet_hook_reference.py), which need torch and diffusers."""
    pytest.importorskip("diffusers")
    import controlnet_hook_reference

    return controlnet_hook_reference


@pytest.fixture(scope="module")
def base(hook, tiny_source):
    return hook.reference.load(tiny_source["diffusers"])


@pytest.fixture(scope="module")
def controlnets(tiny_controlnet, second_controlnet) -> dict:
    from diffusers import ControlNetModel

    folders = {TINY_CONTROLNET: tiny_controlnet["diffusers"], SECOND: second_controlnet}
    return {name: ControlNetModel.from_pretrained(str(folder)).eval() for name, folder in folders.items()}


def ours(pipe: Pipeline, units: list, seed: int = 11, steps: int = 6, sampler: str = "euler_a", **kwargs):
    return pipe(PROMPT, NEGATIVE, steps, CFG, width=SIZE, height=SIZE, seed=seed, sampler=sampler, output_type="np",
                controlnet=units, **kwargs)  # fmt: skip


def test_one_unit_equals_diffusers(hook, pipe, base, controlnets):
    image = control_image()
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET]], [image], [0.8], PROMPT, NEGATIVE, [11],
                                         6, CFG)  # fmt: skip
    out = ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, weight=0.8)])
    assert worst(pixels(out), expected) <= 1.0
    assert worst(pixels(ours(pipe, [])), expected) > 5  # the ControlNet does change the image
    entry = 'ControlNet 0: "Module: none, Model: control_tiny, Weight: 0.8, Resize Mode: Crop and Resize'
    assert entry in out.infotexts[0]
    assert len(out.detected_maps) == 1 and np.array_equal(out.detected_maps[0], image)
    pipe.release_memory()  # the loaded ControlNet's arena too; it stays loaded and gives the same image
    assert np.array_equal(
        pixels(ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, weight=0.8)])), pixels(out)
    )


def test_fp16_graphs_stay_close_to_diffusers(hook, tiny_fp16_controlnet, base, controlnets):
    """fp16 UNet and ControlNet graphs: the tolerance of the other fp16 tests (max 3/255, mean 0.5/255)."""
    image = control_image()
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET]], [image], [0.8], PROMPT, NEGATIVE, [11],
                                         6, CFG)  # fmt: skip
    out = ours(Pipeline.from_pretrained(tiny_fp16_controlnet, provider="cpu"),
               [ControlUnit(model=TINY_CONTROLNET, image=image, weight=0.8)])  # fmt: skip
    difference = np.abs(pixels(out) - expected) * 255
    assert difference.max() <= 3.0 and difference.mean() <= 0.5


def test_two_units_equal_multicontrolnet(hook, pipe, base, controlnets):
    images, scales = [control_image(3), control_image(4)], [0.6, 1.3]
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET], controlnets[SECOND]], images, scales,
                                         PROMPT, NEGATIVE, [21, 22], 5, CFG, sampler="euler")  # fmt: skip
    units = [ControlUnit(model=TINY_CONTROLNET, image=images[0], weight=0.6),
             {"model": SECOND, "image": images[1], "weight": 1.3}]  # fmt: skip
    out = ours(pipe, units, seed=21, steps=5, sampler="euler", num_images_per_prompt=2)
    assert worst(pixels(out), expected) <= 1.0
    assert "ControlNet 1: " in out.infotexts[1]


def test_a_partial_guidance_window_equals_diffusers(hook, pipe, base, controlnets):
    image = control_image(5)
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET]], [image], [1.5], PROMPT, NEGATIVE, [31],
                                         8, CFG, start=[0.25], end=[0.6])  # fmt: skip
    out = ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, weight=1.5, guidance_start=0.25,
                                  guidance_end=0.6)], seed=31, steps=8)  # fmt: skip
    assert worst(pixels(out), expected) <= 1.0
    assert "ControlNet rule: diffusers" in out.infotexts[0]
    full = ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, weight=1.5)], seed=31, steps=8)
    assert worst(pixels(full), expected) > 1.0  # the window matters


def test_img2img_equals_diffusers_controlnet_img2img(hook, pipe, base, controlnets):
    init, image = control_image(8), control_image(9)
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET]], [image], [0.9], PROMPT, NEGATIVE, [41],
                                         10, CFG, init_image=init, strength=0.6)  # fmt: skip
    out = ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, weight=0.9)], seed=41, steps=10, image=init,
               strength=0.6)  # fmt: skip
    assert worst(pixels(out), expected) <= 1.0


MODES = [("Balanced", 1.0, 0.25, 0.75), ("My prompt is more important", 1.2, 0.0, 1.0),
         (2, 1.3, 0.0, 1.0), ("ControlNet is more important", 0.7, 0.2, 0.9)]  # fmt: skip


@pytest.mark.parametrize(("mode", "weight", "start", "end"), MODES)
def test_control_modes_and_windows_equal_the_extension(
    hook, pipe, base, controlnets, raw_config, monkeypatch, mode, weight, start, end
):
    """The extension's soft and cfg injection and its guidance rule (step_rule "a1111"), under
    k-diffusion's Euler on A1111's schedule, against its hook math on diffusers' modules."""
    image, steps = control_image(6), 7
    soft, cfg = mode != "Balanced", mode in (2, "ControlNet is more important")
    params = [hook.ControlParams(controlnets[TINY_CONTROLNET], hook.hint_tensor(image), weight, start, end, soft, cfg)]
    expected = hook.a1111_controlnet_image(base, raw_config, params, PROMPT, NEGATIVE, 51, steps, CFG, SIZE, "euler",
                                           monkeypatch)  # fmt: skip
    unit = ControlUnit(model=TINY_CONTROLNET, image=image, weight=weight, guidance_start=start, guidance_end=end,
                       control_mode=mode)  # fmt: skip
    out = ours(pipe, [unit], seed=51, steps=steps, sampler="euler", schedule="a1111", step_rule="a1111")
    assert worst(pixels(out), expected) <= 1.0
    assert "ControlNet rule" not in out.infotexts[0]


def first_and_last(pipe: Pipeline, units: list, **kwargs) -> tuple[np.ndarray, np.ndarray, list]:
    """(the first pass's last latents, the final image, the detected maps) of a hires run."""
    first = {}

    def callback(step: int, total: int, latents: np.ndarray) -> None:
        if latents.shape[-1] == SIZE // 8:
            first["latents"] = latents.copy()

    hires = {"hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 3}
    out = ours(pipe, units, steps=4, enable_hr=True, hires_options=hires, callback=callback, **kwargs)
    return first["latents"], pixels(out), out.detected_maps


def test_hires_options_pick_the_passes_and_the_maps_fit_each_size(pipe):
    image = control_image(7)
    runs = {option: first_and_last(pipe, [ControlUnit(model=TINY_CONTROLNET, image=image, hr_option=option)])
            for option in ("Both", "Low res only", 2)}  # fmt: skip
    plain = first_and_last(pipe, [])
    assert np.array_equal(runs["Low res only"][0], runs["Both"][0])
    assert not np.array_equal(runs["Both"][0], plain[0])
    assert np.array_equal(runs[2][0], plain[0])  # "High res only": the first pass is unguided
    # The first passes being equal, any difference is the second pass's guidance.
    assert not np.array_equal(runs["Low res only"][1], runs["Both"][1])
    assert not np.array_equal(runs[2][1], plain[1])
    assert [item.shape for item in runs["Both"][2]] == [(96, 96, 3), (64, 64, 3)]  # the hires pass's map first


def test_img2img_takes_the_init_image_and_only_masked_crops_it(pipe):
    """No unit image in img2img: the init image, fitted by the extension's detectmap_proc in img2img's
    resize mode. Inpainting "only masked": the control input cut to the inpainted box as the
    extension's try_crop_image_with_a1111_mask does (A1111's resize_image per channel: the unit's mode
    to the mask's size, the box, then mode 2), then fitted (here: already the size)."""
    from PIL import Image

    from controlnet_reference import detectmap_proc, resize_mode_from_value
    from runtime.images.inputs import resize_image

    init = control_image(10, 80)
    out = ours(pipe, [ControlUnit(model=TINY_CONTROLNET)], image=init, strength=0.5, resize_mode=1)
    expected = detectmap_proc(init, "none", resize_mode_from_value(1), SIZE, SIZE)
    assert np.array_equal(out.detected_maps[0], expected)
    mask = np.zeros((80, 80), np.uint8)
    mask[20:44, 30:60] = 255
    control = control_image(11, 96)
    inpaint = {"image": init, "mask_image": mask, "strength": 0.7, "inpaint_full_res": True,
               "inpaint_full_res_padding": 4, "mask_blur": 0}  # fmt: skip
    out = ours(pipe, [ControlUnit(model=TINY_CONTROLNET, image=control, resize_mode="Just Resize")], **inpaint)
    box = pipe.prepare(prompt=PROMPT, width=SIZE, height=SIZE, **inpaint).init.overlay.paste_box  # A1111's crop region
    assert box == (26, 13, 64, 51)  # the mask's box plus 4 px, grown to the output's aspect
    channels = [resize_image(0, Image.fromarray(control[:, :, c]), 80, 80).crop(box) for c in range(3)]
    expected = np.stack([np.asarray(resize_image(2, channel, SIZE, SIZE)) for channel in channels], axis=2)
    assert np.array_equal(out.detected_maps[0], expected)


IMG = control_image(12)


@pytest.mark.parametrize(
    ("controlnet", "field"),
    [
        ("control_tiny", "controlnet"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, weight=2.5)], "controlnet[0].weight"),
        ([{"model": TINY_CONTROLNET, "image": IMG, "guidance_start": 0.9, "guidance_end": 0.1}],
         "controlnet[0].guidance_start"),
        ([{"model": TINY_CONTROLNET, "image": IMG, "guidance_end": 1.5}], "controlnet[0].guidance_end"),
        ([ControlUnit(enabled=False), ControlUnit(model="control_nothing", image=IMG)], "controlnet[1].model"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, module="openpose")], "controlnet[0].module"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, control_mode="Balance")], "controlnet[0].control_mode"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, hr_option=3)], "controlnet[0].hr_option"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, resize_mode=7)], "controlnet[0].resize_mode"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, processor_res="512")], "controlnet[0].processor_res"),
        ([ControlUnit(model=TINY_CONTROLNET, image=b"not an image")], "controlnet[0].image"),
        ([ControlUnit(model=TINY_CONTROLNET)], "controlnet[0].image"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG, mask=np.zeros((8, 8), np.uint8))], "controlnet[0].mask"),
        ([ControlUnit(model=TINY_CONTROLNET, image=IMG)] * 4, "controlnet"),
        ([{"model": TINY_CONTROLNET, "image": IMG, "input_image": IMG}], "controlnet[0].input_image"),
    ],
)  # fmt: skip
def test_bad_units_are_one_error_naming_the_field_before_any_work(pipe, controlnet, field):
    with pytest.raises(InvalidRequestError) as error:
        pipe.prepare(prompt=PROMPT, width=SIZE, height=SIZE, controlnet=controlnet)
    assert error.value.field == field, error.value


def test_an_export_without_residual_inputs_names_the_re_export(export_two, tmp_path):
    """Exports from before ControlNet support: their UNet takes no residuals (checked without sessions,
    as a cluster's ingress plans)."""
    from runtime.pipeline import Planner

    old = tmp_path / "old"
    shutil.copytree(export_two, old)
    manifest = json.loads((old / "manifest.json").read_text())
    unet = manifest["graphs"]["unet"]
    unet["inputs"] = [item for item in unet["inputs"] if "residual" not in item["name"]]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequestError) as error:
        Planner.from_folder(old).prepare(prompt=PROMPT, controlnet=[ControlUnit(model=TINY_CONTROLNET, image=IMG)])
    assert error.value.field == "controlnet"
    assert f"python -m export --model SOURCE --output {old} --overwrite" in error.value.message
    Planner.from_folder(old).prepare(prompt=PROMPT)  # without units it still serves


def test_cli_runs_units_and_refuses_bad_ones_in_one_line(export_two, tmp_path):
    from PIL import Image
    from test_cli import assert_clean_refusal, run_cli

    from runtime.images.metadata import read_infotext

    control = tmp_path / "control.png"
    Image.fromarray(IMG).save(control)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.png"
    common = ("--model", str(export_two), "--prompt", PROMPT, "--steps", "2", "--width", "64", "--height", "64")
    unit = f"model={TINY_CONTROLNET},image={control},module=canny,weight=0.8,guidance_end=0.5,control_mode=1"
    result = run_cli(*common, "--controlnet", unit, "--controlnet", f"model={SECOND},image={control}",
                     "--output", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = read_infotext(out)
    assert 'ControlNet 0: "Module: canny, Model: control_tiny, Weight: 0.8' in text and "ControlNet 1: " in text
    out.unlink()
    for args, message in (
        (("--controlnet", f"model={TINY_CONTROLNET},image={control},weight=heavy"), "controlnet[0].weight"),
        (("--controlnet", f"model={TINY_CONTROLNET},picture={control}"), "is not KEY=VALUE"),
        (("--controlnet", f"model={TINY_CONTROLNET}"), "controlnet[0].image"),
        (("--controlnet", f"model={TINY_CONTROLNET},image={control}", "--controlnet",
          f"model={TINY_CONTROLNET},image={control}", "--max-controlnet-units", "1"), "limit of 1"),
    ):  # fmt: skip
        assert_clean_refusal(run_cli(*common, *args, "--output", str(out)), message, out)


# -- over HTTP: the extension's API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(export_two, tmp_path_factory):
    import subprocess
    import sys

    pytest.importorskip("fastapi")
    from test_server import CLEAN_ENV, LAUNCHER, REPO, Server, _free_port, _wait_healthy

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-c", LAUNCHER, "--model", str(export_two), "--port", str(port), "--provider", "cpu",
               "--threads", "1", "--max-controlnet-units", "2"]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=CLEAN_ENV, stdout=sink, stderr=subprocess.STDOUT)
    started = Server(f"http://127.0.0.1:{port}", process, log)
    _wait_healthy(started, None)
    yield started
    process.terminate()
    process.wait(20)


def b64(image: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def opencv_canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.Canny(image, low, high), cv2.COLOR_GRAY2RGB)


JOB = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 4, "width": SIZE, "height": SIZE, "seed": 71,
       "sampler_name": "Euler", "cfg_scale": CFG}  # fmt: skip


def job(*units: dict, **extra) -> dict:
    return {**JOB, "alwayson_scripts": {"controlnet": {"args": list(units)}}, **extra}


def test_webuiapi_canny_unit_equals_diffusers_on_opencvs_map(hook, server, base, controlnets):
    """webuiapi 0.9.17's ControlNetUnit through txt2img: the generated image equals diffusers given
    OpenCV's canny map of the image (processor_res 64: the image's own size), and the map comes back
    after it, as the extension appends it."""
    webuiapi = pytest.importorskip("webuiapi")
    from PIL import Image

    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    source = control_image(13)
    unit = webuiapi.ControlNetUnit(image=Image.fromarray(source), module="canny", model=TINY_CONTROLNET,
                                   processor_res=64, threshold_a=100, threshold_b=200)  # fmt: skip
    result = api.txt2img(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=61, steps=6, cfg_scale=CFG, width=SIZE, height=SIZE,
        sampler_name="Euler a", scheduler="Diffusers", controlnet_units=[unit],
        override_settings={"randn_source": "CPU", "CLIP_stop_at_last_layers": 2},
        # webuiapi 0.9.17 adds the units to its shared mutable default `alwayson_scripts={}`, so
        # every later txt2img in this process (other tests' too) would send this unit again
        alwayson_scripts={},
    )  # fmt: skip
    canny = opencv_canny(source, 100, 200)
    expected = hook.diffusers_controlnet(base, [controlnets[TINY_CONTROLNET]], [canny], [1.0], PROMPT, NEGATIVE, [61],
                                         6, CFG)  # fmt: skip
    assert len(result.images) == 2
    assert worst(np.asarray(result.images[0], dtype=np.float32)[None] / 255, expected) <= 1.0
    assert np.array_equal(np.asarray(result.images[1].convert("RGB")), canny)
    assert (
        "Module: canny, Model: control_tiny, Weight: 1.0, Resize Mode: Resize and Fill" in result.info["infotexts"][0]
    )
    assert api.controlnet_version() == 3


def test_the_extensions_endpoints_answer(server, export_two):
    from test_server import decode_png

    from runtime.control.modules import module_list
    from runtime.graphs.controlnets import controlnet_models
    from runtime.graphs.model_folder import read_manifest

    titles = sorted(model.title for model in controlnet_models(read_manifest(export_two)).values())
    assert len(titles) == 2 and all(title.count("[") == 1 for title in titles)
    source = control_image(14)
    with server.client() as client:
        assert client.get("/controlnet/version").json() == {"version": 3}
        assert client.get("/controlnet/model_list", params={"update": True}).json() == {"model_list": titles}
        assert client.get("/controlnet/module_list").json() == module_list()
        assert client.get("/controlnet/module_list", params={"alias_names": True}).json() == module_list(True)
        assert client.get("/controlnet/settings").json()["control_net_unit_count"] == 2
        for key, image in (
            ("controlnet_input_images", b64(source)),
            ("controlnet_images", "data:image/png;base64," + b64(source)),
        ):
            answer = client.post(
                "/controlnet/detect",
                json={
                    "controlnet_module": "canny",
                    key: [image, image],
                    "controlnet_processor_res": 64,
                    "controlnet_threshold_a": 50,
                },
            )
            assert answer.status_code == 200 and answer.json()["info"] == "Success", answer.text
            maps = [decode_png(item)[0] for item in answer.json()["images"]]
            assert len(maps) == 2 and np.array_equal(maps[0], opencv_canny(source, 50, 200))  # threshold_b: default
        for body, field in (
            ({"controlnet_module": "openpose", "controlnet_input_images": [b64(source)]}, "controlnet_module"),
            ({"controlnet_module": "canny"}, "controlnet_input_images"),
            ({"controlnet_input_images": ["!!"]}, "controlnet_input_images.0"),
        ):
            answer = client.post("/controlnet/detect", json=body)
            assert answer.status_code == 422 and answer.json()["field"] == field, answer.text


def test_units_over_http_as_the_extension_reads_them(server):
    from test_server import decode_png

    image = b64(control_image(15))
    unit = {"enabled": True, "model": TINY_CONTROLNET, "image": image, "weight": 1.2}
    with server.client() as client:
        plain = client.post("/sdapi/v1/txt2img", json=JOB).json()["images"]
        off = client.post("/sdapi/v1/txt2img", json=job({**unit, "enabled": False}, {"model": "whatever"})).json()
        assert off["images"] == plain  # off units (and units without "enabled": true) are skipped unread
        on = client.post("/sdapi/v1/txt2img", json=job(unit, n_iter=2)).json()
        assert len(on["images"]) == 3 and on["images"][0] != plain[0]  # two images, then the one map
        assert decode_png(on["images"][2])[1] is None and "ControlNet 0" in decode_png(on["images"][0])[1]
        assert json.loads(on["info"])["extra_generation_params"]["ControlNet 0"].startswith("Module: none")
        legacy = {key: value for key, value in unit.items() if key != "image"} | {"input_image": image, "lowvram": 1}
        again = client.post("/sdapi/v1/txt2img", json=job({**legacy, "save_detected_map": False})).json()
        assert again["images"] == on["images"][:1]  # the legacy names read; no map kept
        pair = client.post("/sdapi/v1/txt2img", json=job({**unit, "image": {"image": image, "mask": None}})).json()
        assert pair["images"][0] == on["images"][0]
        img2img = client.post("/sdapi/v1/img2img", json=job({"enabled": True, "model": "tiny"}, init_images=[image]))
        assert img2img.status_code == 200 and len(img2img.json()["images"]) == 2  # the init image as control
        prefix = "alwayson_scripts.controlnet.args"
        for units, field in (
            ([{**unit, "weight": 3}], f"{prefix}.0.weight"),
            ([unit, unit, unit], prefix),
            ([{**unit, "image": "not base64!"}], f"{prefix}.0.image"),
            ([{**unit, "image": 7}], f"{prefix}.0.image"),
            ([{**unit, "model": "control_v11p_sd15_canny"}], f"{prefix}.0.model"),
            ([{**unit, "module": "depth_midas"}], f"{prefix}.0.module"),
            ([{**unit, "control_mode": "Strong"}], f"{prefix}.0.control_mode"),
            ([{**unit, "image": ""}], f"{prefix}.0.image"),
            (["unit"], f"{prefix}.0"),
        ):
            answer = client.post("/sdapi/v1/txt2img", json=job(*units))
            assert answer.status_code == 422 and answer.json()["field"] == field, (units, answer.text)
