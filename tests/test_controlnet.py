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

import numpy as np
import pytest

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
