"""A1111's sampler parameters (eta, s_churn, s_tmin, s_tmax, s_noise): which sampler takes which,
their defaults, their checks and their infotext fields.

A1111 1.10 (sd_samplers_common.Sampler.initialize) passes eta to the samplers whose function has
an ``eta`` argument, defaulting to its options ``eta_ancestral`` (1) for the k-diffusion ones and
``eta_ddim`` (0) for DDIM and DDIM CFG++, and s_churn / s_tmin / s_tmax / s_noise to the k-diffusion
functions its ``sampler_extra_params`` lists (Euler, Heun and DPM2 take all four; DPM fast, DPM2 a,
DPM++ 2S a and the SDE samplers s_noise). Every other sampler ignores them, as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError

__all__ = [
    "CHURN_SAMPLERS", "DDIM_ETA", "ETA_DEFAULTS", "S_NOISE_SAMPLERS", "SamplerParams", "check_for_sampler",
    "check_params",
]  # fmt: skip

# The samplers whose function takes eta, and A1111's default for it (eta_ancestral / eta_ddim).
ETA_DEFAULTS = {
    "euler_a": 1.0, "dpm2_a": 1.0, "dpmpp_2s_a": 1.0, "dpm_fast": 1.0, "dpm_adaptive": 1.0, "dpmpp_sde": 1.0,
    "dpmpp_2m_sde": 1.0, "dpmpp_2m_sde_heun": 1.0, "dpmpp_3m_sde": 1.0, "ddim": 0.0, "ddim_cfgpp": 0.0,
}  # fmt: skip
DDIM_ETA = ("ddim", "ddim_cfgpp")  # infotext "Eta DDIM"; above 1 their noise term has no real root
CHURN_SAMPLERS = ("euler", "heun", "dpm2")  # s_churn, s_tmin, s_tmax and s_noise
S_NOISE_SAMPLERS = (*CHURN_SAMPLERS, "dpm_fast", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde",
                    "dpmpp_2m_sde_heun", "dpmpp_3m_sde")  # fmt: skip


@dataclass(frozen=True)
class SamplerParams:
    """A1111's values: `eta` None is the sampler's default; `s_tmax` inf is no upper bound."""

    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def eta_for(self, sampler: str) -> float | None:
        """The eta sampler `sampler` runs with; None if it takes none."""
        if sampler not in ETA_DEFAULTS:
            return None
        return ETA_DEFAULTS[sampler] if self.eta is None else self.eta

    def keywords(self, sampler: str) -> dict[str, float]:
        """The sampler function's keyword arguments (runtime.sampling.ksamplers / samplers)."""
        taken: dict[str, float] = {}
        eta = self.eta_for(sampler)
        if eta is not None:
            taken["eta"] = eta
        if sampler in S_NOISE_SAMPLERS:
            taken["s_noise"] = self.s_noise
        if sampler in CHURN_SAMPLERS:
            taken.update(s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax)
        return taken

    def infotext(self, sampler: str) -> dict[str, float]:
        """A1111's fields for the values `sampler` takes that differ from its defaults."""
        fields: dict[str, float] = {}
        eta = self.eta_for(sampler)
        if eta is not None and eta != ETA_DEFAULTS[sampler]:
            fields["Eta DDIM" if sampler in DDIM_ETA else "Eta"] = eta
        defaults = SamplerParams()
        if sampler in CHURN_SAMPLERS:
            for name, label in (("s_churn", "Sigma churn"), ("s_tmin", "Sigma tmin"), ("s_tmax", "Sigma tmax")):
                if getattr(self, name) != getattr(defaults, name):
                    fields[label] = getattr(self, name)
        if sampler in S_NOISE_SAMPLERS and self.s_noise != defaults.s_noise:
            fields["Sigma noise"] = self.s_noise
        return fields

    def differs_for(self, sampler: str) -> bool:
        """Whether `sampler` would run with a value other than its default."""
        return bool(self.infotext(sampler))


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidRequestError(field, f"must be a finite number >= 0, not {value!r}")
    return float(value)


def check_params(
    eta: Any = None, s_churn: Any = 0.0, s_tmin: Any = 0.0, s_tmax: Any = 0.0, s_noise: Any = 1.0
) -> SamplerParams:
    """The request's values checked (one InvalidRequestError naming the field). As in A1111's API,
    s_tmax 0 (or None) means no upper bound, and None elsewhere the default."""
    defaults = SamplerParams()
    return SamplerParams(
        eta=None if eta is None else _number("eta", eta),
        s_churn=defaults.s_churn if s_churn is None else _number("s_churn", s_churn),
        s_tmin=defaults.s_tmin if s_tmin is None else _number("s_tmin", s_tmin),
        s_tmax=(_number("s_tmax", s_tmax) if s_tmax is not None else 0.0) or math.inf,
        s_noise=defaults.s_noise if s_noise is None else _number("s_noise", s_noise),
    )


def check_for_sampler(params: SamplerParams, sampler: str, schedule: str) -> None:
    """What a sampler cannot run: DDIM's eta above 1 (a NaN image in A1111), and any value other
    than the default on diffusers' own schedulers ("model"), which have none of these knobs here."""
    eta = params.eta_for(sampler)
    if sampler in DDIM_ETA and eta is not None and eta > 1:
        raise InvalidRequestError("eta", f"{sampler}'s eta must be in [0, 1], not {eta:g}")
    if schedule == "model" and params.differs_for(sampler):
        changed = ", ".join(params.infotext(sampler))
        raise InvalidRequestError(
            "schedule", f"schedule 'model' runs diffusers' scheduler with its defaults; {changed} need an A1111 "
            "schedule type (e.g. 'automatic')",
        )  # fmt: skip
