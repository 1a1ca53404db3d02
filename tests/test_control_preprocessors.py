"""runtime/control against the ControlNet extension's own code (tests/controlnet_reference.py, copied
from Mikubill/sd-webui-controlnet at commit 56cec5b) and against OpenCV: every module, the resize
modes with the high-quality resize, pixel perfect, the unit's image and mask, the module table and
/controlnet/module_list, the refusals, and an install without OpenCV. Exact equality unless said."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

import controlnet_reference as ref  # noqa: E402
from runtime.control import (  # noqa: E402
    detect,
    find_module,
    fit_detected_map,
    hint_from_map,
    module_list,
    numpy_seed,
    pixel_perfect_resolution,
    plan_unit,
    resize_mode_from_value,
    resolve_params,
    run_module,
)
from runtime.control.hints import high_quality_resize, image_array, unit_input  # noqa: E402
from runtime.control.modules import ModuleParams  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A drawing with edges, flat areas, gradients, thin dark lines on white and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=2)
    img = img.astype(np.uint8)
    img[: height // 3, : width // 2] = 255
    for _ in range(6):
        p = tuple(int(v) for v in rng.integers(0, [width, height]))
        q = tuple(int(v) for v in rng.integers(0, [width, height]))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, p, q, (0, 0, 0), 1)
        cv2.circle(img, q, int(rng.integers(3, max(4, min(height, width) // 3))), colour, -1)
    noise = rng.integers(-6, 7, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def rgba(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    return np.concatenate([picture(height, width, seed), alpha], axis=2)


# (image, what it is): odd sizes, portrait and landscape, grey, grey with a channel axis, RGBA.
IMAGES = {
    "odd_rgb": picture(97, 131, 1),
    "tall_rgb": picture(203, 88, 2),
    "square_rgb": picture(160, 160, 3),
    "grey": picture(121, 75, 4)[:, :, 1],
    "grey_1ch": picture(64, 90, 5)[:, :, :1],
    "rgba": rgba(111, 149, 6),
}

# Per module: (processor_res, threshold_a, threshold_b) cases, defaults among them.
CASES = {
    "none": [(512, 0.5, 0.5)],
    "invert": [(0.5, 0.5, 0.5)],
    "canny": [(512, 100, 200), (160, 50.7, 120.2), (97, 1, 255)],
    "threshold": [(512, 127, 0.5), (200, 40.5, 0.5)],
    "blur_gaussian": [(512, 9.0, 0.5), (128, 0.7, 0.5)],
    "tile_resample": [(512, 1.0, 0.5), (512, 1.1, 0.5), (512, 3.3, 0.5)],
    "scribble_xdog": [(512, 32, 0.5), (150, 5.5, 0.5), (256, 64, 0.5)],
    "lineart_standard": [(512, 0.5, 0.5), (144, 0.5, 0.5)],
}


@pytest.mark.parametrize("image_name", IMAGES)
@pytest.mark.parametrize(("module", "params"), [(m, p) for m, cases in CASES.items() for p in cases])
def test_module_equals_the_extensions(module, params, image_name):
    image = IMAGES[image_name]
    # The extension hands its preprocessors the unit image made RGB (ControlNetUnit.parse_image).
    expected = ref.MODULES[module](ref.HWC3(image), *params)
    got = run_module(find_module(module), image, ModuleParams(*params))
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
    np.testing.assert_array_equal(got, ref.HWC3(expected))


@pytest.mark.parametrize("image_name", ["odd_rgb", "grey", "rgba"])
def test_canny_is_opencvs_canny_on_the_padded_resized_image(image_name):
    rgb = ref.HWC3(IMAGES[image_name])
    h, w = rgb.shape[:2]
    k = 300 / min(h, w)
    th, tw = round(h * k), round(w * k)
    resized = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC)
    padded = np.pad(resized, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")
    edges = cv2.Canny(padded, 80, 160)[:th, :tw]
    got = run_module(find_module("canny"), IMAGES[image_name], ModuleParams(300, 80.9, 160.2))
    np.testing.assert_array_equal(got, np.repeat(edges[:, :, None], 3, axis=2))


@pytest.mark.parametrize(("seed", "subseed", "first_seed"), [(42, -1, 42), (-1, -1, 1234), (7, 99, 7), (-1, 5, 3)])
def test_shuffle_follows_the_extensions_numpy_seed(seed, subseed, first_seed):
    image = IMAGES["odd_rgb"]
    expected_seed = ref.set_numpy_seed(seed, subseed, [first_seed])
    expected = ref.module_shuffle(ref.HWC3(image), 512)
    ours = numpy_seed(seed, subseed, first_seed)
    assert ours == expected_seed
    got = run_module(find_module("shuffle"), image, ModuleParams(512, 0.5, 0.5), seed=ours)
    np.testing.assert_array_equal(got, expected)
    again = run_module(find_module("shuffle"), image, ModuleParams(512, 0.5, 0.5), seed=ours)
    np.testing.assert_array_equal(again, got)


def test_shuffle_differs_by_seed_and_leaves_numpys_global_state():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    image = IMAGES["square_rgb"]
    one = run_module(find_module("shuffle"), image, ModuleParams(512, 0.5, 0.5), seed=1)
    two = run_module(find_module("shuffle"), image, ModuleParams(512, 0.5, 0.5), seed=2)
    assert not np.array_equal(one, two)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def maps() -> dict[str, np.ndarray]:
    """Detected maps of each kind the high-quality resize tells apart."""
    edges = ref.module_canny(IMAGES["odd_rgb"], 200, 100, 200)  # binary, one-pixel lines
    blobs = ref.MODULES["threshold"](IMAGES["tall_rgb"], 150, 127)  # binary, solid areas
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [20, 30, 200], [250, 250, 250]], dtype=np.uint8)
    segments = palette[(picture(90, 70, 8)[:, :, 0] // 52) % 5]  # 5 colours: nearest
    return {
        "edges": edges,
        "blobs": blobs,
        "segments": segments,
        "continuous": IMAGES["square_rgb"],
        "grey_line_art": ref.MODULES["lineart_standard"](IMAGES["odd_rgb"], 128),
    }


MAPS = maps()
SIZES = [(512, 512), (256, 384), (384, 256), (64, 96)]  # (height, width): up, down, both ways


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("map_name", MAPS)
def test_fit_detected_map_equals_detectmap_proc(map_name, mode, size):
    detected = MAPS[map_name]
    expected = ref.detectmap_proc(detected, "canny", mode, *size)
    got = fit_detected_map(detected, mode, *size)
    assert got.shape == (*size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    hint = hint_from_map(got)
    assert hint.shape == (3, *size) and hint.dtype == np.float32
    np.testing.assert_array_equal(hint, expected.transpose(2, 0, 1).astype(np.float32) / np.float32(255))


def test_fit_detected_map_aligns_the_size_to_8_as_the_extension():
    # get_target_dimensions aligns the generation's size before detectmap_proc.
    got = fit_detected_map(MAPS["edges"], "Crop and Resize", 517, 301)
    np.testing.assert_array_equal(got, ref.detectmap_proc(MAPS["edges"], "canny", "Crop and Resize", 512, 296))


@pytest.mark.parametrize("target", [(40, 300), (300, 41), (200, 200)])
def test_high_quality_resize_of_each_kind(target):
    for detected in MAPS.values():
        expected = ref.detectmap_proc(detected, "canny", "Just Resize", *target)
        np.testing.assert_array_equal(high_quality_resize(detected, target[1], target[0]), expected)


def test_thinning_kicks_in_for_one_pixel_edges():
    """The edge map is the case where the extension thins (not just Otsu): make sure the test
    exercises it, i.e. that a plain resize + threshold would differ."""
    detected = MAPS["edges"]
    plain = cv2.resize(detected, (400, 304), interpolation=cv2.INTER_CUBIC).mean(axis=2)
    _, plain = cv2.threshold(plain.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    got = fit_detected_map(detected, "Just Resize", 304, 400)[:, :, 0]
    assert set(np.unique(got)) <= {0, 255}
    assert not np.array_equal(got, plain)
    np.testing.assert_array_equal(got, ref.detectmap_proc(detected, "canny", "Just Resize", 304, 400)[:, :, 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("image_shape", "target"), [((97, 131), (512, 512)), ((600, 200), (512, 768)), ((50, 70), (64, 64))]
)
def test_pixel_perfect_resolution_equals_the_extensions(image_shape, target, mode):
    image = np.zeros((*image_shape, 3), np.uint8)
    assert pixel_perfect_resolution(image, *target, mode) == ref.pixel_perfect_resolution(image, *target, mode)


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        2,
        3,
        "Just Resize",
        "Crop and Resize",
        "Resize and Fill",
        "Inner Fit (Scale to Fit)",
        "Outer Fit (Shrink to Fit)",
        "Scale to Fit (Inner Fit)",
        "Envelope (Outer Fit)",
    ],
)
def test_resize_modes_as_the_extension_reads_them(value):
    assert resize_mode_from_value(value) == ref.resize_mode_from_value(value)


@pytest.mark.parametrize("value", [4, -1, True, "Stretch", 1.0, None])
def test_bad_resize_modes_are_refused(value):
    with pytest.raises(InvalidRequestError) as error:
        resize_mode_from_value(value, "controlnet[0].resize_mode")
    assert error.value.field == "controlnet[0].resize_mode"


def scribble_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.line(mask, (3, 3), (width - 5, height - 9), 255, 3)
    return mask


@pytest.mark.parametrize("mask_name", ["none", "blank", "full", "faint", "scribble", "scribble_rgba", "scribble_rgb"])
def test_unit_input_and_mask_as_the_extension(mask_name):
    image = IMAGES["rgba"]
    h, w = image.shape[:2]
    masks = {
        "none": None,
        "blank": np.zeros((h, w), np.uint8),
        "full": np.full((h, w), 255, np.uint8),
        "faint": np.full((h, w), 5, np.uint8),
        "scribble": scribble_mask(h, w),
        "scribble_rgba": np.dstack([np.repeat(scribble_mask(h, w)[:, :, None], 3, 2), np.full((h, w), 128, np.uint8)]),
        "scribble_rgb": np.repeat(scribble_mask(h, w)[:, :, None], 3, 2),
    }
    mask = masks[mask_name]
    np.testing.assert_array_equal(unit_input(image, mask), ref.unit_input(image, mask))


def test_image_array_keeps_what_the_extension_reads_and_repairs_the_rest():
    from PIL import Image

    for mode in ("RGB", "RGBA", "L"):
        image = Image.fromarray(IMAGES["rgba"]).convert(mode)
        np.testing.assert_array_equal(image_array(image), np.array(image))  # to_base64_nparray
    la = Image.fromarray(IMAGES["rgba"]).convert("LA")
    np.testing.assert_array_equal(image_array(la), np.array(la.convert("RGBA")))
    palette = Image.fromarray(IMAGES["odd_rgb"]).convert("P")
    np.testing.assert_array_equal(image_array(palette), np.array(palette.convert("RGB")))


def test_a_mask_of_another_size_is_refused():
    with pytest.raises(InvalidRequestError) as error:
        unit_input(IMAGES["odd_rgb"], scribble_mask(10, 10), "unit.")
    assert error.value.field == "unit.mask"


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)]
)
def test_bad_images_are_refused(bad):
    plan = plan_unit("canny")
    with pytest.raises(InvalidRequestError) as error:
        detect(plan, bad, prefix="u.")
    assert error.value.field == "u.image"


def test_a_thin_image_at_a_high_resolution_is_refused_before_the_resize():
    plan = plan_unit("canny", processor_res=2048)
    with pytest.raises(InvalidRequestError, match="would be") as error:
        detect(plan, np.zeros((1, 9000, 3), np.uint8), prefix="controlnet[2].")
    assert error.value.field == "controlnet[2].image"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("module", ["canny", "lineart_standard", "shuffle", "invert"])
def test_detect_with_pixel_perfect_equals_get_control(module, mode):
    """The extension's get_control: pixel perfect's resolution from the unit's input and the
    generation's size, the module, then detectmap_proc (for the first pass and a hires pass)."""
    image, mask = IMAGES["tall_rgb"], None
    size, hires = (256, 320), (512, 640)
    rgb = ref.unit_input(image, mask)
    resolution = ref.pixel_perfect_resolution(rgb, *size, mode)
    ref.set_numpy_seed(11, -1, [11])
    params = resolve_params(find_module(module))
    detected = ref.MODULES[module](rgb, resolution, params.threshold_a, params.threshold_b)
    plan = plan_unit(module, mode)
    got = detect(plan, image, mask, pixel_perfect_size=size, seed=numpy_seed(11, -1, 11))
    assert got.plan.params.processor_res == resolution
    np.testing.assert_array_equal(got.image, ref.HWC3(detected))
    for target in (size, hires):
        hint, shown = got.control(*target)
        expected = ref.detectmap_proc(detected, module, mode, *target)
        np.testing.assert_array_equal(shown, expected)
        np.testing.assert_array_equal(hint, expected.transpose(2, 0, 1) / np.float32(255))


# Every name and label the extension registers (supported_preprocessor.Preprocessor.all_processors
# at 56cec5b: model_free_preprocessors.py, legacy/preprocessor_compiled.py and the other
# scripts/preprocessor/*.py), name -> label.
EXTENSION_MODULES = {
    "none": "none",
    "canny": "canny",
    "invert": "invert (from white bg & black line)",
    "blur_gaussian": "blur_gaussian",
    "scribble_xdog": "scribble_xdog",
    "shuffle": "shuffle",
    "threshold": "threshold",
    "tile_resample": "tile_resample",
    "lineart_standard": "lineart_standard (from white bg & black line)",
    "animal_openpose": "animal_openpose",
    "densepose": "densepose (pruple bg & purple torso)",
    "densepose_parula": "densepose_parula (black bg & blue torso)",
    "depth_anything": "depth_anything",
    "depth_anything_v2": "depth_anything_v2",
    "depth_hand_refiner": "depth_hand_refiner",
    "depth_leres": "depth_leres",
    "depth_leres++": "depth_leres++",
    "depth": "depth_midas",
    "depth_zoe": "depth_zoe",
    "dw_openpose_full": "dw_openpose_full",
    "instant_id_face_embedding": "instant_id_face_embedding",
    "instant_id_face_keypoints": "instant_id_face_keypoints",
    "ip-adapter_clip_sd15": "ip-adapter_clip_h",
    "ip-adapter_clip_sdxl": "ip-adapter_clip_g",
    "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_sdxl_plus_vith",
    "ip-adapter_face_id": "ip-adapter_face_id",
    "ip-adapter_face_id_plus": "ip-adapter_face_id_plus",
    "lineart_anime": "lineart_anime",
    "lineart_anime_denoise": "lineart_anime_denoise",
    "lineart_coarse": "lineart_coarse",
    "lineart": "lineart_realistic",
    "mediapipe_face": "mediapipe_face",
    "mlsd": "mlsd",
    "normal_bae": "normal_bae",
    "normal_map": "normal_midas",
    "openpose": "openpose",
    "openpose_face": "openpose_face",
    "openpose_faceonly": "openpose_faceonly",
    "openpose_full": "openpose_full",
    "openpose_hand": "openpose_hand",
    "recolor_intensity": "recolor_intensity",
    "recolor_luminance": "recolor_luminance",
    "reference_adain": "reference_adain",
    "reference_adain+attn": "reference_adain+attn",
    "reference_only": "reference_only",
    "revision_clipvision": "revision_clipvision",
    "revision_ignore_prompt": "revision_ignore_prompt",
    "scribble_hed": "scribble_hed",
    "pidinet_scribble": "scribble_pidinet",
    "anime_face_segment": "seg_anime_face",
    "oneformer_ade20k": "seg_ofade20k",
    "oneformer_coco": "seg_ofcoco",
    "segmentation": "seg_ufade20k",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "pidinet": "softedge_pidinet",
    "pidinet_safe": "softedge_pidisafe",
    "color": "t2ia_color_grid",
    "pidinet_sketch": "t2ia_sketch_pidi",
    "clip_vision": "t2ia_style_clipvision",
    "tile_colorfix": "tile_colorfix",
    "tile_colorfix+sharp": "tile_colorfix+sharp",
    "softedge_teed": "softedge_teed",
    "softedge_anyline": "softedge_anyline",
    "facexlib": "facexlib",
    "ip-adapter_pulid": "ip-adapter_pulid",
    "inpaint": "inpaint_global_harmonious",
    "inpaint_only": "inpaint_only",
    "inpaint_only+lama": "inpaint_only+lama",
    "ip-adapter-auto": "ip-adapter-auto",
    "normal_dsine": "normal_dsine",
    "mobile_sam": "mobile_sam",
}
SUPPORTED = list(EXTENSION_MODULES)[:9]
DETECTORS = ["openpose_full", "depth_midas", "depth", "normal_bae", "lineart_anime", "lineart_realistic", "mlsd"]
DETECTORS += ["softedge_hed", "seg_ofade20k", "inpaint_only+lama", "dw_openpose_full", "scribble_hed"]


def test_every_extension_module_is_run_or_refused_by_name_and_label():
    for name, label in EXTENSION_MODULES.items():
        for key in (name, label):
            if name in SUPPORTED:
                assert find_module(key).name == name
            else:
                with pytest.raises(InvalidRequestError, match="is not supported here"):
                    find_module(key)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_modules_say_to_send_a_detected_map(name):
    with pytest.raises(InvalidRequestError) as error:
        plan_unit(name, prefix="controlnet[1].")
    assert error.value.field == "controlnet[1].module"
    assert 'module "none"' in str(error.value) and repr(name) in str(error.value)


@pytest.mark.parametrize("name", ["ip-adapter_clip_h", "reference_only", "inpaint_global_harmonious", "tile_colorfix"])
def test_non_controlnet_modules_say_why(name):
    with pytest.raises(InvalidRequestError, match="this runtime does not"):
        find_module(name)


def test_unknown_module_lists_the_choices():
    with pytest.raises(InvalidRequestError) as error:
        find_module("cany", "unit.module")
    assert error.value.field == "unit.module"
    for name in SUPPORTED:
        assert name in str(error.value)


def test_lookup_ignores_case_and_spacing():
    assert find_module("Lineart_Standard  (from white bg & black line)").name == "lineart_standard"
    assert find_module("CANNY").name == "canny"


def test_resolve_params_as_bound_check_params():
    """internal_controlnet/args.py bound_check_params: out-of-range values (the API's -1 included)
    become the slider's default; the defaults and ranges are the extension's (canny 100/200 on
    1..255, resolution 512 on 64..2048, shuffle's hidden resolution 512 on 0..1)."""
    canny = find_module("canny")
    assert resolve_params(canny) == ModuleParams(512, 100, 200)
    assert resolve_params(canny, 300, 50.5, 300) == ModuleParams(300, 50.5, 200)
    assert resolve_params(canny, 32, 0, 255) == ModuleParams(512, 100, 255)
    assert resolve_params(find_module("shuffle"), 1024).processor_res == 512
    assert resolve_params(find_module("threshold"), 2048, 255.5).threshold_a == 127
    assert resolve_params(find_module("blur_gaussian"), 64, 0.01).threshold_a == 0.01
    assert resolve_params(find_module("tile_resample"), -1, 8.0) == ModuleParams(512, 8.0, 0.5)


def extension_sliders(name: str) -> list[dict]:
    """module_detail's sliders as the extension's classes define them (the Resolution slider is
    Preprocessor.slider_resolution's class default unless the class replaces it)."""
    resolution = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    return {
        "none": [resolution],
        "canny": [
            resolution,
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
        ],
        "invert": [],
        "blur_gaussian": [resolution, {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0, "step": 0.01}],
        "scribble_xdog": [resolution, {"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64, "step": 0.01}],
        "shuffle": [],
        "threshold": [resolution, {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255, "step": 0.01}],
        "tile_resample": [
            resolution,
            {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01},
        ],
        "lineart_standard": [resolution],
    }[name]


@pytest.mark.parametrize("alias_names", [False, True])
def test_module_list_as_the_extension_returns_it(alias_names):
    priorities = {"none": 10, "canny": 100, "invert": 20, "tile_resample": 100, "lineart_standard": 100}
    # get_sorted_preprocessors: "none" first, the rest by zero-filled priority + label, descending.
    rest = sorted(
        (n for n in SUPPORTED if n != "none"),
        key=lambda n: str(priorities.get(n, 0)).zfill(8) + EXTENSION_MODULES[n],
        reverse=True,
    )
    order = ["none", *rest]
    names = [EXTENSION_MODULES[n] if alias_names else n for n in order]
    body = module_list(alias_names)
    assert body["module_list"] == names
    assert body["module_detail"] == {
        key: {"model_free": False, "sliders": extension_sliders(n)} for key, n in zip(names, order, strict=True)
    }


def test_without_opencv_the_runtime_imports_and_controlnet_is_one_error(tmp_path):
    """As in an install without the controlnet extra: a cv2 on the path that fails to import."""
    stub = tmp_path / "no-cv2" / "cv2"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'cv2'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(REPO)])}
    script = (
        "import runtime.control as c, numpy as np\n"
        "from runtime.errors import InvalidRequestError\n"
        "print(len(c.module_list()['module_list']))\n"
        "try:\n"
        "    c.plan_unit('canny', prefix='controlnet[0].')\n"
        "except InvalidRequestError as e:\n"
        "    print(e.field, '|', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.strip().splitlines()
    assert count == "9"
    assert message.startswith("controlnet[0].module |")
    assert "pip install 'acertain-onnx[controlnet]'" in message
