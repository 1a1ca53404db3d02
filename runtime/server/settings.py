"""A1111's settings (`GET`/`POST /sdapi/v1/options`): the ones this runtime acts on, and the rest.

A1111 sets each posted key with `opts.set(key, value, is_api=True)`: an unchanged value is a
no-op, so a client may post back the whole dict GET gave it (Open WebUI does, with only the
checkpoint changed). Here, as there, every key of that dict is accepted. The keys this runtime
acts on (`ACTED`) are checked and become the defaults of every request that does not override
them; other A1111 settings (`KNOWN`) are kept, echoed by GET and logged as unused; a key A1111
does not know is refused unless its value is null (A1111 compares it with a missing value).

Differences, on purpose: a bad value is a 422 naming the key, and nothing of a refused POST is
applied (A1111 answers 500 with the keys before the bad one already set). Settings live in
memory for the server's life: a restart begins from the defaults again (A1111 writes config.json).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..graphs.vaes import resolve_vae
from ..pipeline.planning import check_clip_skip
from ..registry import RNG_SOURCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    """What requests get unless their override_settings say otherwise."""

    sd_vae: str = "Automatic"
    eta_noise_seed_delta: int = 0
    randn_source: str = "GPU"
    pad_cond_uncond: bool = False
    enable_prompt_comments: bool = True
    img2img_fix_steps: bool = False
    eta_ancestral: float = 1.0
    eta_ddim: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    CLIP_stop_at_last_layers: int | None = None  # None: the checkpoint's default (its export's first clip skip)


# The sampler parameters' settings (runtime.server.mapping.sampler_parameters reads them).
SAMPLER_SETTINGS = ("eta_ancestral", "eta_ddim", "s_churn", "s_tmin", "s_tmax", "s_noise")

# Settings shown by GET that follow the checkpoint: posting them back is a no-op.
DERIVED = ("sd_model_checkpoint", "sd_checkpoint_hash")

# A1111 settings this runtime does not use, with A1111's defaults (modules/shared_options.py).
KNOWN: dict[str, Any] = {
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "grid_save": True, "grid_format": "png", "enable_pnginfo": True, "save_txt": False, "jpeg_quality": 80,
    "webp_lossless": False, "export_for_4chan": True, "img_max_size_mp": 200, "save_init_img": False,
    "save_incomplete_images": False, "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
    "save_to_dirs": True, "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8,
    "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"], "upscaler_for_img2img": None,
    "face_restoration": False, "face_restoration_model": "CodeFormer", "code_former_weight": 0.5,
    "face_restoration_unload": False, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0, "sd_unet": "Automatic", "enable_quantization": False, "enable_emphasis": True,
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "upcast_attn": False, "tiling": False,
    "sd_vae_checkpoint_cache": 0, "sd_vae_overrides_per_model_preferences": True, "auto_vae_precision": True,
    "sd_vae_encode_method": "Full", "sd_vae_decode_method": "Full", "inpainting_mask_weight": 1.0,
    "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0, "img2img_color_correction": False,
    "img2img_background_color": "#ffffff", "cross_attention_optimization": "Automatic",
    "s_min_uncond": 0.0, "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0, "pad_cond_uncond_v0": False, "persistent_cond_cache": True,
    "batch_cond_uncond": True, "fp8_storage": "Disable", "cache_fp16_weight": False,
    "hires_fix_use_firstpass_conds": False, "use_old_emphasis_implementation": False,
    "use_old_karras_scheduler_sigmas": False, "use_old_hires_fix_width_height": False,
    "use_old_scheduling": False, "use_downcasted_alpha_bar": False, "emphasis": "Original",
    "sd_hypernetwork": "None", "sd_lora": "None", "extra_networks_default_multiplier": 1.0,
    "add_model_hash_to_info": True, "add_model_name_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "show_progressbar": True, "live_previews_enable": True,
    "live_previews_image_format": "png", "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN",
    "live_preview_content": "Prompt", "live_preview_refresh_period": 1000, "ddim_discretize": "uniform",
    "k_sched_type": "Automatic", "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False, "uni_pc_variant": "bh1",
    "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default", "skip_early_cond": 0.0, "hide_samplers": [],
    "interrogate_keep_models_in_memory": False, "interrogate_return_ranks": False,
    "interrogate_clip_num_beams": 1, "interrogate_clip_min_length": 24, "interrogate_clip_max_length": 48,
    "interrogate_deepbooru_score_threshold": 0.5, "deepbooru_sort_alpha": True, "deepbooru_use_spaces": True,
    "deepbooru_escape": True, "deepbooru_filter_tags": "", "postprocessing_enable_in_main_ui": [],
    "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5, "infotext_styles": "Apply if any",
    "disable_weights_auto_swap": True, "sd_checkpoint_dropdown_use_short": False, "return_grid": True,
    "do_not_show_images": False, "js_modal_lightbox": True, "samplers_in_dropdown": True,
    "dimensions_and_batch_together": True, "quicksettings_list": ["sd_model_checkpoint"], "ui_reorder_list": [],
    "localization": "None", "show_warnings": False, "memmon_poll_rate": 8, "multiple_tqdm": True,
    "unload_models_when_training": False, "training_xattention_optimizations": False,
    "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0, "hires_fix_refiner_pass": "second pass",
    "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True, "lora_functional": False,
    "auto_backcompat": True, "api_enable_requests": True, "api_forbid_local_requests": True, "api_useragent": "",
}  # fmt: skip


class OptionError(InvalidRequestError):
    """A posted setting refused; `kind` is the exception A1111 would raise for it."""

    def __init__(self, field: str, message: str, kind: str = "RuntimeError") -> None:
        super().__init__(field, message)
        self.kind = kind


def _check_acted(key: str, value: Any) -> Any:
    """A value of a setting this runtime acts on, checked (422 naming the key)."""
    if key in ("pad_cond_uncond", "enable_prompt_comments", "img2img_fix_steps"):
        if not isinstance(value, bool):
            raise OptionError(key, f"must be true or false, not {value!r}")
    elif key == "eta_noise_seed_delta":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OptionError(key, f"must be a whole number >= 0, not {value!r}")
    elif key == "randn_source":
        if value not in RNG_SOURCES:
            raise OptionError(key, f"must be one of {', '.join(RNG_SOURCES)}, not {value!r}")
    elif key in SAMPLER_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise OptionError(key, f"must be a finite number >= 0, not {value!r}")
    elif key == "sd_vae" and not isinstance(value, str):
        raise OptionError(key, f'must be a VAE name (GET /sdapi/v1/sd-vae) or "Automatic", not {value!r}')
    return value


def _check_clip_skip(manifest: Any, value: Any) -> None:
    """A clip skip the checkpoint's text encoder has an output for (planning's check, under the key)."""
    try:
        check_clip_skip(manifest, value)
    except InvalidRequestError as error:
        raise OptionError("CLIP_stop_at_last_layers", error.message) from None


class Settings:
    """The server's A1111 settings, in memory for its life."""

    def __init__(self, defaults: Defaults | None = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {**KNOWN, **(defaults or Defaults()).__dict__}

    @property
    def defaults(self) -> Defaults:
        with self._lock:
            return Defaults(**{name: self._values[name] for name in Defaults.__dataclass_fields__})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def shown(self, manifest: Any) -> dict[str, Any]:
        """The settings as GET shows them with `manifest` the current checkpoint's: a clip skip
        never set is that checkpoint's default."""
        values = self.snapshot()
        if values["CLIP_stop_at_last_layers"] is None:
            values["CLIP_stop_at_last_layers"] = manifest.clip_skip
        return values

    def check(self, changes: dict[str, Any], shown: dict[str, Any], manifest: Any) -> dict[str, Any]:
        """The settings a POST changes, all checked before any is applied. `shown`: what GET shows
        now (posting a value back is a no-op; a changed checkpoint is the caller's, checked before
        this). `manifest`: the checkpoint the settings will apply to (its VAEs and clip skips)."""
        accepted: dict[str, Any] = {}
        for key, value in changes.items():
            if key in DERIVED:
                continue
            if key not in shown:
                if value is not None:
                    raise OptionError(key, f"{key!r} is not an A1111 setting", kind="KeyError")
                continue
            if value == shown[key]:
                continue
            if key in Defaults.__dataclass_fields__:
                accepted[key] = _check_acted(key, value)
                if key == "sd_vae":
                    resolve_vae(manifest, value, key)
            else:
                log.info("setting %s = %r accepted; this runtime does not use it", key, value)
                accepted[key] = value
        # Also when only the checkpoint changes: the clip skip set must be one the new one has.
        clip_skip = accepted.get("CLIP_stop_at_last_layers", self.snapshot()["CLIP_stop_at_last_layers"])
        if clip_skip is not None:
            _check_clip_skip(manifest, clip_skip)
        return accepted

    def apply(self, accepted: dict[str, Any]) -> None:
        with self._lock:
            self._values.update(accepted)
