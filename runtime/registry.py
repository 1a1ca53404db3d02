"""Every name a request can use, in one place: samplers, schedules, A1111 schedulers, RNG sources
and hires-fix upscalers, with their A1111 labels and aliases. Lookups are case-insensitive and
raise InvalidRequestError naming the field, listing the choices."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError


def _key(name: str) -> str:
    return " ".join(str(name).lower().split())


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # A1111's label (infotext "Sampler", /sdapi/v1/samplers)
    key: str  # the library's sampler
    aliases: tuple[str, ...]  # A1111's aliases
    options: dict  # A1111's sampler options, as /sdapi/v1/samplers lists them
    eta: float | None = None  # the only eta the library's sampler implements, if it takes one
    ancestral: bool = False  # A1111's "uses_ensd": the infotext names ENSD (which re-seeds all later noise)

    @property
    def brownian(self) -> bool:
        """Draws its noise from A1111's Brownian tree, seeded with the image seeds (no ENSD)."""
        return bool(self.options.get("brownian_noise"))


# A1111 1.10's samplers_k_diffusion / samplers_timesteps entries this runtime implements, in its
# order. "Automatic" per sampler (options["scheduler"]) lives in runtime.sampling.schedules.AUTOMATIC.
SAMPLERS = (
    SamplerInfo("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), {"scheduler": "karras"}),
    SamplerInfo("DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",),
                {"scheduler": "karras", "second_order": True, "brownian_noise": True}, 1.0),
    SamplerInfo("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",),
                {"scheduler": "exponential", "brownian_noise": True}, 1.0),
    SamplerInfo("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", ("k_dpmpp_2m_sde_heun",),
                {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}, 1.0),
    SamplerInfo("DPM++ 2S a", "dpmpp_2s_a", ("k_dpmpp_2s_a",),
                {"scheduler": "karras", "uses_ensd": True, "second_order": True}, 1.0, True),
    SamplerInfo("DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",),
                {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True}, 1.0),
    SamplerInfo("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": True}, 1.0, True),
    SamplerInfo("Euler", "euler", ("k_euler",), {}),
    SamplerInfo("LMS", "lms", ("k_lms",), {}),
    SamplerInfo("Heun", "heun", ("k_heun",), {"second_order": True}),
    SamplerInfo("DPM2", "dpm2", ("k_dpm_2",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    SamplerInfo("DPM2 a", "dpm2_a", ("k_dpm_2_a",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True},
                1.0, True),
    SamplerInfo("DPM fast", "dpm_fast", ("k_dpm_fast",), {"uses_ensd": True}, 1.0, True),
    SamplerInfo("DPM adaptive", "dpm_adaptive", ("k_dpm_ad",), {"uses_ensd": True}, 1.0, True),
    SamplerInfo("Restart", "restart", ("restart",), {"scheduler": "karras", "second_order": True}),
    SamplerInfo("DDIM", "ddim", ("ddim",), {}, eta=0.0),
    SamplerInfo("DDIM CFG++", "ddim_cfgpp", ("ddim_cfgpp",), {}, eta=0.0),
    SamplerInfo("PLMS", "plms", ("plms",), {}),
    SamplerInfo("UniPC", "unipc", ("unipc",), {}),
    SamplerInfo("LCM", "lcm", ("k_lcm",), {}),
)  # fmt: skip
_EXTRA_SAMPLER_NAMES = {"euler_ancestral": "euler_a"}  # diffusers' spelling
# A1111's timestep samplers: their own timestep grids, whatever the schedule type.
TIMESTEP_SAMPLERS = ("ddim", "ddim_cfgpp", "plms", "unipc")


@dataclass(frozen=True)
class SchedulerInfo:
    """A1111's `scheduler` field (sd_schedulers.py; /sdapi/v1/schedulers lists these fields)."""

    name: str
    label: str
    schedule: str  # the library schedule (runtime.sampling.schedules.SCHEDULES)
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None
    need_inner_model: bool | None = None


SCHEDULERS = (
    SchedulerInfo("automatic", "Automatic", "automatic"),
    SchedulerInfo("uniform", "Uniform", "a1111", need_inner_model=True),
    SchedulerInfo("karras", "Karras", "karras", default_rho=7.0),
    SchedulerInfo("exponential", "Exponential", "exponential"),
    SchedulerInfo("polyexponential", "Polyexponential", "polyexponential", default_rho=1.0),
    SchedulerInfo("sgm_uniform", "SGM Uniform", "sgm_uniform", ("SGMUniform",), need_inner_model=True),
    SchedulerInfo("kl_optimal", "KL Optimal", "kl_optimal"),
    SchedulerInfo("align_your_steps", "Align Your Steps", "align_your_steps"),
    SchedulerInfo("simple", "Simple", "simple", need_inner_model=True),
    SchedulerInfo("normal", "Normal", "normal", need_inner_model=True),
    SchedulerInfo("ddim", "DDIM", "ddim", need_inner_model=True),
    SchedulerInfo("beta", "Beta", "beta", need_inner_model=True),
    SchedulerInfo("diffusers", "Diffusers", "model"),  # not A1111's: the diffusers scheduler's own levels
)

# Library schedule -> infotext "Schedule type"; None writes nothing ("a1111": A1111's plain levels,
# "automatic": see schedule_label).
SCHEDULE_LABELS = {"model": "Diffusers", "a1111": None, "automatic": None, "uniform": "Uniform"} | {
    s.schedule: s.label for s in SCHEDULERS if s.schedule not in ("model", "a1111", "automatic")
}


def schedule_label(sampler_key: str, schedule_name: str, automatic: dict[str, str]) -> str | None:
    """The infotext "Schedule type": A1111 writes the label of the schedule type its "Automatic"
    resolves to when that is not the plain one (DPM++ 2M: "Karras"); DDIM takes none."""
    if sampler_key in TIMESTEP_SAMPLERS and schedule_name != "model":
        return None
    if schedule_name == "automatic":
        schedule_name = automatic.get(sampler_key, "a1111")
    return SCHEDULE_LABELS[schedule_name]


# Library RNG -> infotext "RNG"; A1111's randn_source values -> library RNG.
RNG_LABELS = {"cpu": "CPU", "nv": "NV"}
RNG_SOURCES = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}


@dataclass(frozen=True)
class UpscalerInfo:
    """A hires-fix / extras upscaler. Latent ones resize the latents as torch.nn.functional.interpolate
    with `mode` and `antialias` (A1111's `shared.latent_upscale_modes`); image ones decode, resize
    the pixels and encode again: with a PIL filter, or (mode "model") with an exported model upscaler
    (runtime.graphs.upscalers) of that name."""

    name: str
    latent: bool
    mode: str  # interpolate mode, PIL filter name, or MODEL
    antialias: bool = False
    aliases: tuple[str, ...] = ()  # a model upscaler's file stem
    scale: int | None = None  # a model upscaler's own factor


MODEL = "model"
UPSCALERS = (
    UpscalerInfo("Latent", True, "bilinear"),
    UpscalerInfo("Latent (antialiased)", True, "bilinear", antialias=True),
    UpscalerInfo("Latent (bicubic)", True, "bicubic"),
    UpscalerInfo("Latent (bicubic antialiased)", True, "bicubic", antialias=True),
    UpscalerInfo("Latent (nearest)", True, "nearest"),
    UpscalerInfo("Latent (nearest-exact)", True, "nearest-exact"),
    UpscalerInfo("None", False, "none"),
    UpscalerInfo("Lanczos", False, "lanczos"),
    UpscalerInfo("Nearest", False, "nearest"),
)
# The spelling and A1111 1.x's spelling of the same mode.
_EXTRA_UPSCALER_NAMES = {"Latent (antialiased bicubic)": "Latent (bicubic antialiased)"}
# The files A1111 downloads for its Real-ESRGAN entries (modules/realesrgan_model.py) -> the names it
# lists them by. `--add-upscaler` names such a file so; any other file by its stem, as A1111 lists
# ESRGAN files ("4x-UltraSharp", "ESRGAN_4x"). Either name selects the upscaler.
A1111_UPSCALER_FILES = {
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
}


def model_upscaler(name: str, file_stem: str, scale: int) -> UpscalerInfo:
    return UpscalerInfo(name, False, MODEL, aliases=(file_stem,) if file_stem != name else (), scale=scale)


def _table(items: tuple, names) -> dict:
    return {_key(name): item for item in items for name in names(item)}


_SAMPLER_TABLE = _table(SAMPLERS, lambda s: (s.name, s.key, *s.aliases))
_SAMPLER_TABLE.update({_key(n): _SAMPLER_TABLE[_key(k)] for n, k in _EXTRA_SAMPLER_NAMES.items()})
_SCHEDULER_TABLE = _table(SCHEDULERS, lambda s: (s.name, s.label, *s.aliases))
_UPSCALER_TABLE = _table(UPSCALERS, lambda u: (u.name,))
_UPSCALER_TABLE.update({_key(n): _UPSCALER_TABLE[_key(k)] for n, k in _EXTRA_UPSCALER_NAMES.items()})


def _choices(names) -> str:
    return ", ".join(repr(name) for name in names)


def sampler(name: str, field: str = "sampler") -> SamplerInfo:
    """A sampler by library key, A1111 label or alias."""
    info = _SAMPLER_TABLE.get(_key(name)) if isinstance(name, str) else None
    if info is None:
        raise InvalidRequestError(
            field, f"unknown sampler {name!r}; choose one of {_choices(s.name for s in SAMPLERS)}"
        )
    return info


def schedule(name: str, field: str = "schedule") -> str:
    if name not in SCHEDULE_LABELS:
        raise InvalidRequestError(field, f"unknown schedule {name!r}; choose one of {_choices(SCHEDULE_LABELS)}")
    return name


def rng(name: str, field: str = "rng") -> str:
    if not isinstance(name, str) or name.lower() not in RNG_LABELS:
        raise InvalidRequestError(field, f"unknown rng {name!r}; choose one of {_choices(RNG_LABELS)}")
    return name.lower()


def builtin_upscaler(name: str) -> UpscalerInfo | None:
    return _UPSCALER_TABLE.get(_key(name)) if isinstance(name, str) else None


def upscaler(name: str, field: str = "hr_upscaler", models: tuple[UpscalerInfo, ...] = ()) -> UpscalerInfo:
    """A built-in upscaler, or one of the export's model upscalers (`models`) by name or file stem."""
    info = builtin_upscaler(name)
    if info is None and isinstance(name, str):
        info = next((m for m in models if _key(name) in {_key(n) for n in (m.name, *m.aliases)}), None)
    if info is None:
        names = [u.name for u in (*UPSCALERS, *models)]
        raise InvalidRequestError(field, f"unknown upscaler {name!r}; choose one of {_choices(names)}")
    return info


def scheduler(name: str) -> SchedulerInfo:
    """A1111's `scheduler` field."""
    info = _SCHEDULER_TABLE.get(_key(name))
    if info is not None:
        return info
    choices = _choices(s.label for s in SCHEDULERS)
    raise InvalidRequestError("scheduler", f"unknown scheduler {name!r}; use {choices}")


def sampler_and_scheduler(name: str, scheduler_name: str) -> tuple[SamplerInfo, SchedulerInfo]:
    """The sampler, and the scheduler: from a suffix of the name ("DPM++ 2M Karras") or the field,
    as A1111 1.9+ reads them."""
    info = _SAMPLER_TABLE.get(_key(name))
    if info is not None:
        return info, scheduler(scheduler_name)
    for suffix in (n for s in SCHEDULERS for n in (s.label, s.name, *s.aliases)):
        if _key(name).endswith(" " + _key(suffix)):
            base_name = _key(name)[: -len(_key(suffix)) - 1]
            base = _SAMPLER_TABLE.get(base_name)
            if base is not None:
                return base, scheduler(suffix)
    return sampler(name, "sampler_name"), scheduler(scheduler_name)


def library_schedule(info: SamplerInfo, found: SchedulerInfo) -> str:
    """The library schedule for an A1111 sampler + scheduler pair."""
    if found.schedule == "model":
        return "model"
    if info.key in TIMESTEP_SAMPLERS:
        return "a1111"  # A1111's timestep samplers ignore the scheduler: their own timesteps
    return found.schedule
