"""The ControlNet extension's own image code, for tests/test_control_preprocessors.py: copied from
Mikubill/sd-webui-controlnet at commit 56cec5b2958edf3b1807b7e7b2b1b5186dbd2f81 (v1.1.455 + "fix
version parsing", 2024-07-26), file and function named on each. Unchanged but for what ruff asks
(unused names, lambdas), the torch tensor conversions left out, and the preprocessor classes' __call__
bodies written as functions of (image, resolution, slider_1, slider_2)."""

from __future__ import annotations

import cv2
import numpy as np


# annotator/util.py
def HWC3(x):
    assert x.dtype == np.uint8
    if x.ndim == 2:
        x = x[:, :, None]
    assert x.ndim == 3
    _H, _W, C = x.shape
    assert C == 1 or C == 3 or C == 4
    if C == 3:
        return x
    if C == 1:
        return np.concatenate([x, x, x], axis=2)
    if C == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        y = color * alpha + 255.0 * (1.0 - alpha)
        y = y.clip(0, 255).astype(np.uint8)
        return y


# annotator/util.py
def make_noise_disk(H, W, C, F):
    noise = np.random.uniform(low=0, high=1, size=((H // F) + 2, (W // F) + 2, C))
    noise = cv2.resize(noise, (W + 2 * F, H + 2 * F), interpolation=cv2.INTER_CUBIC)
    noise = noise[F : F + H, F : F + W]
    noise -= np.min(noise)
    noise /= np.max(noise)
    if C == 1:
        noise = noise[:, :, None]
    return noise


# annotator/shuffle/__init__.py ContentShuffleDetector.__call__
def content_shuffle(img, h=None, w=None, f=None):
    H, W, _C = img.shape
    if h is None:
        h = H
    if w is None:
        w = W
    if f is None:
        f = 256
    x = make_noise_disk(h, w, 1, f) * float(W - 1)
    y = make_noise_disk(h, w, 1, f) * float(H - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


# scripts/utils.py
def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


# scripts/utils.py
def safer_memory(x):
    return np.ascontiguousarray(x.copy()).copy()


# scripts/utils.py (the model-free modules' resize; legacy/processor.py's differs only by HWC3 first)
def resize_image_with_pad(img: np.ndarray, resolution: int):
    if img.ndim == 2:
        img = img[:, :, None]
        img = np.concatenate([img, img, img], axis=2)

    H_raw, W_raw, _ = img.shape
    k = float(resolution) / float(min(H_raw, W_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    H_target = int(np.round(float(H_raw) * k))
    W_target = int(np.round(float(W_raw) * k))
    img = cv2.resize(img, (W_target, H_target), interpolation=interpolation)
    H_pad, W_pad = pad64(H_target), pad64(W_target)
    img_padded = np.pad(img, [[0, H_pad], [0, W_pad], [0, 0]], mode="edge")

    def remove_pad(x):
        return safer_memory(x[:H_target, :W_target])

    return safer_memory(img_padded), remove_pad


# scripts/preprocessor/legacy/processor.py
def resize_image_with_pad_legacy(input_image, resolution, skip_hwc3=False):
    img = input_image if skip_hwc3 else HWC3(input_image)
    return resize_image_with_pad(img, resolution)


# scripts/preprocessor/model_free_preprocessors.py, PreprocessorNone / Canny / Invert / BlurGaussian /
# ScribbleXdog / Shuffle .__call__
def module_none(input_image, resolution, slider_1=None, slider_2=None):
    return input_image


def module_canny(input_image, resolution, slider_1=None, slider_2=None):
    input_image, remove_pad = resize_image_with_pad(input_image, resolution)
    canny_image = cv2.cvtColor(cv2.Canny(input_image, int(slider_1), int(slider_2)), cv2.COLOR_GRAY2RGB)
    return remove_pad(canny_image)


def module_invert(input_image, resolution, slider_1=None, slider_2=None):
    return 255 - HWC3(input_image)


def module_blur_gaussian(input_image, resolution, slider_1=None, slider_2=None):
    img, remove_pad = resize_image_with_pad(input_image, resolution)
    img = remove_pad(img)
    result = cv2.GaussianBlur(img, (0, 0), float(slider_1))
    return result


def module_scribble_xdog(input_image, resolution, slider_1=None, slider_2=None):
    img, remove_pad = resize_image_with_pad(input_image, resolution)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > slider_1] = 255
    return remove_pad(result)


def module_shuffle(input_image, resolution, slider_1=None, slider_2=None):
    img, remove_pad = resize_image_with_pad(input_image, resolution)
    img = remove_pad(img)
    return content_shuffle(img)


# scripts/preprocessor/legacy/processor.py; LegacyPreprocessor.__call__ wraps each as
# HWC3(call_function(img=..., res=resolution, thr_a=slider_1, thr_b=slider_2)[0]).
def tile_resample(img, res=512, thr_a=1.0, **kwargs):
    img = HWC3(img)
    if thr_a < 1.1:
        return img, True
    H, W, _C = img.shape
    H = int(float(H) / float(thr_a))
    W = int(float(W) / float(thr_a))
    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    return img, True


def threshold(img, res=512, thr_a=127, **kwargs):
    img, remove_pad = resize_image_with_pad_legacy(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return remove_pad(result), True


def lineart_standard(img, res=512, **kwargs):
    img, remove_pad = resize_image_with_pad_legacy(img, res)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    result = intensity.clip(0, 255).astype(np.uint8)
    return remove_pad(result), True


def legacy_module(function):
    def call(input_image, resolution, slider_1=None, slider_2=None):
        result, _ = function(img=input_image, res=resolution, thr_a=slider_1, thr_b=slider_2)
        return HWC3(result)

    return call


MODULES = {
    "none": module_none,
    "canny": module_canny,
    "invert": module_invert,
    "blur_gaussian": module_blur_gaussian,
    "scribble_xdog": module_scribble_xdog,
    "shuffle": module_shuffle,
    "threshold": legacy_module(threshold),
    "tile_resample": legacy_module(tile_resample),
    "lineart_standard": legacy_module(lineart_standard),
}


# scripts/controlnet.py set_numpy_seed, with p's fields as arguments
def set_numpy_seed(seed, subseed, all_seeds):
    tmp_seed = int(all_seeds[0] if seed == -1 else max(int(seed), 0))
    tmp_subseed = int(all_seeds[0] if subseed == -1 else max(int(subseed), 0))
    seed = (tmp_seed + tmp_subseed) & 0xFFFFFFFF
    np.random.seed(seed)
    return seed


# scripts/utils.py
def get_unique_axis0(data):
    arr = np.asanyarray(data)
    idxs = np.lexsort(arr.T)
    arr = arr[idxs]
    unique_idxs = np.empty(len(arr), dtype=np.bool_)
    unique_idxs[:1] = True
    unique_idxs[1:] = np.any(arr[:-1, :] != arr[1:, :], axis=-1)
    return arr[unique_idxs]


# scripts/lvminthin.py
lvmin_kernels_raw = [
    np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
    np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32),
]

lvmin_kernels = []
lvmin_kernels += [np.rot90(x, k=0, axes=(0, 1)) for x in lvmin_kernels_raw]
lvmin_kernels += [np.rot90(x, k=1, axes=(0, 1)) for x in lvmin_kernels_raw]
lvmin_kernels += [np.rot90(x, k=2, axes=(0, 1)) for x in lvmin_kernels_raw]
lvmin_kernels += [np.rot90(x, k=3, axes=(0, 1)) for x in lvmin_kernels_raw]

lvmin_prunings_raw = [
    np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
    np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32),
]

lvmin_prunings = []
lvmin_prunings += [np.rot90(x, k=0, axes=(0, 1)) for x in lvmin_prunings_raw]
lvmin_prunings += [np.rot90(x, k=1, axes=(0, 1)) for x in lvmin_prunings_raw]
lvmin_prunings += [np.rot90(x, k=2, axes=(0, 1)) for x in lvmin_prunings_raw]
lvmin_prunings += [np.rot90(x, k=3, axes=(0, 1)) for x in lvmin_prunings_raw]


def remove_pattern(x, kernel):
    objects = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel)
    objects = np.where(objects > 127)
    x[objects] = 0
    return x, objects[0].shape[0] > 0


def thin_one_time(x, kernels):
    y = x
    is_done = True
    for k in kernels:
        y, has_update = remove_pattern(y, k)
        if has_update:
            is_done = False
    return y, is_done


def lvmin_thin(x, prunings=True):
    y = x
    for _i in range(32):
        y, is_done = thin_one_time(y, lvmin_kernels)
        if is_done:
            break
    if prunings:
        y, _ = thin_one_time(y, lvmin_prunings)
    return y


def nake_nms(x):
    f1 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    f2 = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8)
    f3 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)
    f4 = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    y = np.zeros_like(x)
    for f in [f1, f2, f3, f4]:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    return y


# scripts/enums.py ResizeMode values
RESIZE = "Just Resize"
INNER_FIT = "Crop and Resize"
OUTER_FIT = "Resize and Fill"


# scripts/controlnet.py Script.detectmap_proc, returning its detected_map (the hint is that / 255)
def detectmap_proc(detected_map, module, resize_mode, h, w):
    detected_map = detected_map.astype(np.float32) if "inpaint" in module else HWC3(detected_map)

    def safe_numpy(x):
        y = x
        y = y.copy()
        y = np.ascontiguousarray(y)
        y = y.copy()
        return y

    def high_quality_resize(x, size):
        inpaint_mask = None
        if x.ndim == 3 and x.shape[2] == 4:
            inpaint_mask = x[:, :, 3]
            x = x[:, :, 0:3]

        if x.shape[0] != size[1] or x.shape[1] != size[0]:
            new_size_is_smaller = (size[0] * size[1]) < (x.shape[0] * x.shape[1])
            new_size_is_bigger = (size[0] * size[1]) > (x.shape[0] * x.shape[1])
            unique_color_count = len(get_unique_axis0(x.reshape(-1, x.shape[2])))
            is_one_pixel_edge = False
            is_binary = False
            if unique_color_count == 2:
                is_binary = np.min(x) < 16 and np.max(x) > 240
                if is_binary:
                    xc = x
                    xc = cv2.erode(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                    xc = cv2.dilate(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                    one_pixel_edge_count = np.where(xc < x)[0].shape[0]
                    all_edge_count = np.where(x > 127)[0].shape[0]
                    is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count

            if 2 < unique_color_count < 200:
                interpolation = cv2.INTER_NEAREST
            elif new_size_is_smaller:
                interpolation = cv2.INTER_AREA
            else:
                interpolation = cv2.INTER_CUBIC

            y = cv2.resize(x, size, interpolation=interpolation)
            if inpaint_mask is not None:
                inpaint_mask = cv2.resize(inpaint_mask, size, interpolation=interpolation)

            if is_binary:
                y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
                if is_one_pixel_edge:
                    y = nake_nms(y)
                    _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                    y = lvmin_thin(y, prunings=new_size_is_bigger)
                else:
                    _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = np.stack([y] * 3, axis=2)
        else:
            y = x

        if inpaint_mask is not None:
            inpaint_mask = (inpaint_mask > 127).astype(np.float32) * 255.0
            inpaint_mask = inpaint_mask[:, :, None].clip(0, 255).astype(np.uint8)
            y = np.concatenate([y, inpaint_mask], axis=2)

        return y

    if resize_mode == RESIZE:
        detected_map = high_quality_resize(detected_map, (w, h))
        detected_map = safe_numpy(detected_map)
        return detected_map

    old_h, old_w, _ = detected_map.shape
    old_w = float(old_w)
    old_h = float(old_h)
    k0 = float(h) / old_h
    k1 = float(w) / old_w

    def safeint(x):
        return int(np.round(x))

    if resize_mode == OUTER_FIT:
        k = min(k0, k1)
        borders = np.concatenate(
            [detected_map[0, :, :], detected_map[-1, :, :], detected_map[:, 0, :], detected_map[:, -1, :]], axis=0
        )
        high_quality_border_color = np.median(borders, axis=0).astype(detected_map.dtype)
        if len(high_quality_border_color) == 4:
            high_quality_border_color[3] = 255
        high_quality_background = np.tile(high_quality_border_color[None, None], [h, w, 1])
        detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)))
        new_h, new_w, _ = detected_map.shape
        pad_h = max(0, (h - new_h) // 2)
        pad_w = max(0, (w - new_w) // 2)
        high_quality_background[pad_h : pad_h + new_h, pad_w : pad_w + new_w] = detected_map
        detected_map = high_quality_background
        detected_map = safe_numpy(detected_map)
        return detected_map
    else:
        k = max(k0, k1)
        detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)))
        new_h, new_w, _ = detected_map.shape
        pad_h = max(0, (new_h - h) // 2)
        pad_w = max(0, (new_w - w) // 2)
        detected_map = detected_map[pad_h : pad_h + h, pad_w : pad_w + w]
        detected_map = safe_numpy(detected_map)
        return detected_map


# internal_controlnet/external_code.py
resize_mode_aliases = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}


def resize_mode_from_value(value):
    modes = [RESIZE, INNER_FIT, OUTER_FIT]
    if isinstance(value, str):
        value = resize_mode_aliases.get(value, value)
        assert value in modes
        return value
    elif isinstance(value, int):
        assert value >= 0
        if value == 3:
            return RESIZE
        if value >= len(modes):
            return RESIZE
        return modes[value]


# internal_controlnet/external_code.py (the logging left out)
def pixel_perfect_resolution(image, target_H, target_W, resize_mode):
    raw_H, raw_W, _ = image.shape

    k0 = float(target_H) / float(raw_H)
    k1 = float(target_W) / float(raw_W)

    if resize_mode == OUTER_FIT:
        estimation = min(k0, k1) * float(min(raw_H, raw_W))
    else:
        estimation = max(k0, k1) * float(min(raw_H, raw_W))

    return int(np.round(estimation))


# internal_controlnet/args.py ControlNetUnit.parse_image (the array branch) + combine_image_and_mask,
# then scripts/controlnet.py Script.choose_input_image's from_rgba_to_input (the option
# controlnet_ignore_noninpaint_mask at its default, False)
def unit_input(image, mask=None):
    np_image = HWC3(image)
    np_mask = HWC3(mask) if mask is not None else None
    np_mask = (np.zeros_like(np_image) if np_mask is None else np_mask)[:, :, 0:1]
    img = np.concatenate([np_image, np_mask], axis=2)
    if (img[:, :, 3] <= 5).all() or (img[:, :, 3] >= 250).all():
        return img[:, :, :3]
    return HWC3(img[:, :, 3])
