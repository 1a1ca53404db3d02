"""The ControlNet extension's preprocessor modules, in one table: the ones this runtime runs (names,
display labels, sliders, list order) and the ones it recognises but refuses, with why.

Read from Mikubill/sd-webui-controlnet (v1.1.455, commit 56cec5b): scripts/supported_preprocessor.py
(PreprocessorParameter, get_sorted_preprocessors), scripts/preprocessor/model_free_preprocessors.py,
scripts/preprocessor/legacy/preprocessor_compiled.py + legacy_preprocessors.py, and
internal_controlnet/args.py (bound_check_params). A module is found by its name or its label, as the
extension's Preprocessor.get_preprocessor does; we also ignore case and repeated spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Slider:
    """The extension's PreprocessorParameter; its defaults are the extension's (a hidden slider keeps
    them: range 0..1, value 0.5)."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = True

    def api_json(self) -> dict:
        """As /controlnet/module_list's module_detail lists it."""
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def resolve(self, value: float) -> float:
        """The extension's bound_check_params: a value outside the slider's range (-1, the API's
        "unset", included) becomes the slider's default; it is not clamped."""
        return self.value if value < self.minimum or value > self.maximum else value


HIDDEN = Slider(visible=False)
# Preprocessor.slider_resolution's class default. The legacy modules (threshold, tile_resample,
# lineart_standard) set `self.resolution` instead, so the extension lists and checks this one for
# them even where their legacy entry says "no resolution" (tile_resample).
RESOLUTION = Slider("Resolution", 64, 2048, 8, 512)


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # the extension's name (module_list)
    label: str  # its display name (module_list?alias_names=true)
    priority: int  # sorting_priority: the list's order
    resolution: Slider = RESOLUTION  # processor_res
    slider_1: Slider = HIDDEN  # threshold_a
    slider_2: Slider = HIDDEN  # threshold_b

    @property
    def sliders(self) -> tuple[Slider, ...]:
        return self.resolution, self.slider_1, self.slider_2


MODULES = (
    ModuleInfo("none", "none", 10),
    ModuleInfo(
        "canny",
        "canny",
        100,
        slider_1=Slider("Low Threshold", 1, 255, 1, 100),
        slider_2=Slider("High Threshold", 1, 255, 1, 200),
    ),
    ModuleInfo("invert", "invert (from white bg & black line)", 20, resolution=HIDDEN),
    ModuleInfo("blur_gaussian", "blur_gaussian", 0, slider_1=Slider("Sigma", 0.01, 64.0, 0.01, 9.0)),
    ModuleInfo("scribble_xdog", "scribble_xdog", 0, slider_1=Slider("XDoG Threshold", 1, 64, 0.01, 32)),
    # "Fix res to 512": hidden, so any processor_res outside 0..1 is 512 (pixel_perfect still sets it).
    ModuleInfo("shuffle", "shuffle", 0, resolution=Slider(value=512, visible=False)),
    ModuleInfo("threshold", "threshold", 0, slider_1=Slider("Binarization Threshold", 0, 255, 0.01, 127)),
    ModuleInfo("tile_resample", "tile_resample", 100, slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 0.01, 1.0)),
    ModuleInfo("lineart_standard", "lineart_standard (from white bg & black line)", 100),
)

_DETECTOR = (
    "runs a neural-network detector that this runtime does not ship: detect the map elsewhere (for "
    'example the extension\'s /controlnet/detect) and send it as the image with module "none"'
)
_NOT_CONTROLNET = "feeds {kind}, which this runtime does not run (it runs ControlNet models only)"
_SAMPLING = "changes {what} in the extension's sampling, which this runtime does not do"

# The extension's other modules, name -> label, by why we refuse them.
_REFUSED_DETECTORS = {
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
    "instant_id_face_keypoints": "instant_id_face_keypoints",
    "lineart_anime": "lineart_anime",
    "lineart_anime_denoise": "lineart_anime_denoise",
    "lineart_coarse": "lineart_coarse",
    "lineart": "lineart_realistic",
    "mediapipe_face": "mediapipe_face",
    "mlsd": "mlsd",
    "mobile_sam": "mobile_sam",
    "normal_bae": "normal_bae",
    "normal_dsine": "normal_dsine",
    "normal_map": "normal_midas",
    "openpose": "openpose",
    "openpose_face": "openpose_face",
    "openpose_faceonly": "openpose_faceonly",
    "openpose_full": "openpose_full",
    "openpose_hand": "openpose_hand",
    "scribble_hed": "scribble_hed",
    "pidinet_scribble": "scribble_pidinet",
    "anime_face_segment": "seg_anime_face",
    "oneformer_ade20k": "seg_ofade20k",
    "oneformer_coco": "seg_ofcoco",
    "segmentation": "seg_ufade20k",
    "softedge_anyline": "softedge_anyline",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "pidinet": "softedge_pidinet",
    "pidinet_safe": "softedge_pidisafe",
    "softedge_teed": "softedge_teed",
    "te_hed": "softedge_teed",  # the extension's older name (global_state.preprocessor_aliases)
    "pidinet_sketch": "t2ia_sketch_pidi",
    "inpaint_only+lama": "inpaint_only+lama",
}
_REFUSED_OTHER = {
    **dict.fromkeys(
        (
            "ip-adapter_clip_sd15",
            "ip-adapter_clip_h",
            "ip-adapter_clip_sdxl",
            "ip-adapter_clip_g",
            "ip-adapter_clip_sdxl_plus_vith",
            "ip-adapter_face_id",
            "ip-adapter_face_id_plus",
            "ip-adapter_pulid",
            "ip-adapter-auto",
            "facexlib",
            "instant_id_face_embedding",
        ),
        _NOT_CONTROLNET.format(kind="an IP-Adapter or InstantID model"),
    ),
    **dict.fromkeys(("revision_clipvision", "revision_ignore_prompt"), _NOT_CONTROLNET.format(kind="SDXL's Revision")),
    **dict.fromkeys(
        ("clip_vision", "t2ia_style_clipvision", "color", "t2ia_color_grid"),
        _NOT_CONTROLNET.format(kind="a T2I-Adapter"),
    ),
    **dict.fromkeys(
        ("reference_only", "reference_adain", "reference_adain+attn"), _SAMPLING.format(what="the UNet's attention")
    ),
    **dict.fromkeys(("inpaint", "inpaint_global_harmonious", "inpaint_only"), _SAMPLING.format(what="the masked area")),
    **dict.fromkeys(("tile_colorfix", "tile_colorfix+sharp"), _SAMPLING.format(what="the latent's colours")),
    **dict.fromkeys(("recolor_luminance", "recolor_intensity"), _SAMPLING.format(what="the result's colours")),
}


def _key(name: str) -> str:
    return " ".join(str(name).lower().split())


_BY_KEY = {_key(n): m for m in MODULES for n in (m.name, m.label)}
_REFUSED = {
    **{_key(n): _DETECTOR for name, label in _REFUSED_DETECTORS.items() for n in (name, label)},
    **{_key(n): why for n, why in _REFUSED_OTHER.items()},
}


def sorted_modules() -> list[ModuleInfo]:
    """The extension's get_sorted_preprocessors: "none" first, then by priority and label, descending."""
    rest = [m for m in MODULES if m.name != "none"]
    rest.sort(key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)
    return [_BY_KEY["none"], *rest]


def find_module(name: str, field: str = "module") -> ModuleInfo:
    """The module a unit names (its name or label); a refused or unknown one is one InvalidRequestError."""
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    if key in _REFUSED:
        raise InvalidRequestError(field, f"module {name!r} is not supported here: it {_REFUSED[key]}")
    choices = ", ".join(m.name for m in sorted_modules())
    raise InvalidRequestError(field, f"unknown module {name!r}; choose one of {choices}")


def module_list(alias_names: bool = False) -> dict:
    """The body of the extension's GET /controlnet/module_list: the modules this runtime runs, by
    name (or by label with alias_names), each with model_free (False: every one needs a ControlNet
    model) and the visible sliders (resolution, threshold_a, threshold_b)."""
    modules = sorted_modules()
    names = [m.label if alias_names else m.name for m in modules]
    detail = {
        name: {"model_free": False, "sliders": [s.api_json() for s in m.sliders if s.visible]}
        for name, m in zip(names, modules, strict=True)
    }
    return {"module_list": names, "module_detail": detail}


@dataclass(frozen=True)
class ModuleParams:
    """A unit's processor_res, threshold_a and threshold_b after the extension's bound check; the
    values the module runs with and the infotext names."""

    processor_res: float
    threshold_a: float
    threshold_b: float


def resolve_params(
    module: ModuleInfo, processor_res: float = -1, threshold_a: float = -1, threshold_b: float = -1
) -> ModuleParams:
    """A value outside its slider's range (-1, unset, included) becomes the slider's default."""
    return ModuleParams(
        module.resolution.resolve(processor_res),
        module.slider_1.resolve(threshold_a),
        module.slider_2.resolve(threshold_b),
    )
