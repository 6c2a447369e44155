"""Classifier-free guidance schedules as data: a weight as a function of the noise level.

A :class:`GuidanceSchedule` maps the **k-diffusion sigma** ``sigma = sigma_t / alpha_t =
exp(-lambda_t)`` of a step to a guidance weight ``w`` in diffusers' convention, ``x = uncond + w
(cond - uncond)``: ``w = 1`` is the conditional branch alone (no guidance, one network pass), and
``w`` is ``1 +`` the weight of Ho & Salimans / Wang et al. Since the weight depends on the noise
level alone, one schedule means the same thing at any step count, with any solver, in stepsearch's
samplers and in a diffusers pipeline (:mod:`stepsearch.integrations.diffusers_guidance`).

Shapes (``w`` = ``weight``; ``p`` the progress from noise to data on a log-sigma axis,
``p = (log sigma_max - log sigma) / (log sigma_max - log sigma_min)`` clipped to ``[0, 1]``, i.e.
linear in ``lambda``; ``[sigma_min, sigma_max]`` is the model's noise range, stored in the file):

============================ ==================================================================
``constant``                 ``w``
``linear_increasing``        ``1 + 2 (w - 1) p`` (1 at pure noise, ``2w - 1`` at data; mean ``w``)
``linear_decreasing``        ``1 + 2 (w - 1) (1 - p)``
``cosine_increasing``        ``1 + (w - 1) (1 - cos(pi p))`` (mean ``w``)
``cosine_decreasing``        ``1 + (w - 1) (1 + cos(pi p))``
``clamp_linear``             ``max(c, 1 + 2 (w - 1) p)`` (Wang et al. 2024, arXiv 2404.13040, the
                             clamp-linear family; ``c`` here is ``1 +`` the paper's ``c``)
``power_cosine``             ``1 + (w - 1) (1 - cos(pi p^s))`` (the paper's power-cosine family;
                             ``s = 1`` is ``cosine_increasing``)
``interval``                 ``w`` for ``sigma_lo <= sigma <= sigma_hi``, 1 (no guidance)
                             elsewhere (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
                             Interval")
============================ ==================================================================

"Increasing" follows Wang et al.: the weight grows as sampling proceeds (low at high noise).

On disk (versioned JSON, written atomically)::

    {"format": "stepsearch.GuidanceSchedule", "version": 1, "shape": "interval",
     "parameters": {"weight": 2.5, "sigma_lo": 0.28, "sigma_hi": 5.42},
     "provenance": {"stepsearch_version": ..., "created": ..., ...}}
"""

from __future__ import annotations

import datetime as _datetime
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from stepsearch import __version__
from stepsearch._io import atomic_write_json, read_json
from stepsearch.noise import NoiseSchedule

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SHAPES",
    "GuidanceSchedule",
    "guidance_settings",
    "load_guidance",
    "noise_range",
    "unet_passes",
]

FORMAT_NAME = "stepsearch.GuidanceSchedule"
FORMAT_VERSION = 1

_RANGE = ("sigma_min", "sigma_max")
SHAPES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "constant": ("weight",),
        "linear_increasing": ("weight", *_RANGE),
        "linear_decreasing": ("weight", *_RANGE),
        "cosine_increasing": ("weight", *_RANGE),
        "cosine_decreasing": ("weight", *_RANGE),
        "clamp_linear": ("weight", "c", *_RANGE),
        "power_cosine": ("weight", "s", *_RANGE),
        "interval": ("weight", "sigma_lo", "sigma_hi"),
    }
)
"""Each shape's parameters (all required, no others)."""


def noise_range(noise: NoiseSchedule) -> tuple[float, float]:
    """``(sigma_min, sigma_max)``: the k-diffusion sigmas of a noise schedule's ``t_min`` and
    its largest finite-noise time (the range the progressive shapes are laid over)."""
    low = float(noise.kdiffusion_sigma(noise.t_min))
    high = float(noise.kdiffusion_sigma(noise.t_max_finite))
    return low, high


def unet_passes(weights: Sequence[float] | np.ndarray) -> int:
    """Network passes of guided evaluations at these weights: one where ``w == 1`` (the
    conditional branch alone), two elsewhere."""
    array = np.asarray(weights, dtype=np.float64).reshape(-1)
    return int(array.size + np.count_nonzero(array != 1.0))


def _check(shape: str, parameters: Mapping[str, Any]) -> dict[str, float]:
    """Validated float parameters of ``shape``; ``ValueError`` naming the field otherwise."""
    if shape not in SHAPES:
        raise ValueError(f"guidance shape: unknown {shape!r}; expected one of {tuple(SHAPES)}")
    names = SHAPES[shape]
    if not isinstance(parameters, Mapping):
        raise ValueError(f"guidance parameters must be a mapping, got {type(parameters).__name__}")
    missing = [name for name in names if name not in parameters]
    extra = [name for name in parameters if name not in names]
    if missing or extra:
        raise ValueError(
            f"guidance shape {shape!r} takes parameters {list(names)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    values: dict[str, float] = {}
    for name in names:
        value = parameters[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"guidance {shape}: {name} must be a finite number, got {value!r}")
        values[name] = float(value)
    if values["weight"] < 0.0:
        raise ValueError(f"guidance {shape}: weight must be >= 0, got {values['weight']!r}")
    if "c" in values and values["c"] < 0.0:
        raise ValueError(f"guidance {shape}: c must be >= 0, got {values['c']!r}")
    if "s" in values and values["s"] <= 0.0:
        raise ValueError(f"guidance {shape}: s must be > 0, got {values['s']!r}")
    if "sigma_min" in values and not 0.0 < values["sigma_min"] < values["sigma_max"]:
        raise ValueError(
            f"guidance {shape}: need 0 < sigma_min < sigma_max, got sigma_min="
            f"{values['sigma_min']!r}, sigma_max={values['sigma_max']!r}"
        )
    if "sigma_lo" in values and not 0.0 <= values["sigma_lo"] < values["sigma_hi"]:
        raise ValueError(
            f"guidance {shape}: need 0 <= sigma_lo < sigma_hi, got sigma_lo="
            f"{values['sigma_lo']!r}, sigma_hi={values['sigma_hi']!r}"
        )
    return values


@dataclass(frozen=True)
class GuidanceSchedule:
    """A guidance weight as a function of the k-diffusion sigma (module docstring).

    Build one with the constructors (:meth:`constant`, :meth:`linear`, :meth:`cosine`,
    :meth:`clamp_linear`, :meth:`power_cosine`, :meth:`interval`) or from JSON; call it on sigmas
    (:meth:`weight`). ``provenance`` is free JSON (what it was searched for, scores, ...).
    """

    shape: str
    parameters: Mapping[str, float]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "parameters", MappingProxyType(_check(self.shape, self.parameters))
        )
        object.__setattr__(self, "provenance", MappingProxyType(dict(self.provenance)))

    # constructors ----------------------------------------------------------------------------
    @classmethod
    def constant(cls, weight: float) -> GuidanceSchedule:
        return cls("constant", {"weight": weight})

    @classmethod
    def linear(
        cls, weight: float, sigma_min: float, sigma_max: float, *, increasing: bool = True
    ) -> GuidanceSchedule:
        """Linear in the log-sigma progress with mean ``weight`` (1 at one end, ``2w - 1`` at the
        other); increasing: low at high noise."""
        shape = "linear_increasing" if increasing else "linear_decreasing"
        return cls(shape, {"weight": weight, "sigma_min": sigma_min, "sigma_max": sigma_max})

    @classmethod
    def cosine(
        cls, weight: float, sigma_min: float, sigma_max: float, *, increasing: bool = True
    ) -> GuidanceSchedule:
        """Half a cosine over the log-sigma progress with mean ``weight``."""
        shape = "cosine_increasing" if increasing else "cosine_decreasing"
        return cls(shape, {"weight": weight, "sigma_min": sigma_min, "sigma_max": sigma_max})

    @classmethod
    def clamp_linear(
        cls, weight: float, c: float, sigma_min: float, sigma_max: float
    ) -> GuidanceSchedule:
        """``max(c, linear_increasing)`` (Wang et al.'s clamp-linear, ``c`` in diffusers' scale)."""
        parameters = {"weight": weight, "c": c, "sigma_min": sigma_min, "sigma_max": sigma_max}
        return cls("clamp_linear", parameters)

    @classmethod
    def power_cosine(
        cls, weight: float, s: float, sigma_min: float, sigma_max: float
    ) -> GuidanceSchedule:
        """``1 + (w - 1)(1 - cos(pi p^s))`` (Wang et al.'s power-cosine family)."""
        parameters = {"weight": weight, "s": s, "sigma_min": sigma_min, "sigma_max": sigma_max}
        return cls("power_cosine", parameters)

    @classmethod
    def interval(cls, weight: float, sigma_lo: float, sigma_hi: float) -> GuidanceSchedule:
        """``weight`` for ``sigma_lo <= sigma <= sigma_hi``, no guidance elsewhere."""
        return cls("interval", {"weight": weight, "sigma_lo": sigma_lo, "sigma_hi": sigma_hi})

    # evaluation ------------------------------------------------------------------------------
    def progress(self, sigma: float | np.ndarray) -> np.ndarray:
        """``p`` in ``[0, 1]``: 0 at ``sigma_max`` (noise) and above, 1 at ``sigma_min`` and below
        (linear in ``log sigma``); shapes without a range raise."""
        if "sigma_min" not in self.parameters:
            raise ValueError(f"guidance shape {self.shape!r} has no sigma range")
        log_low = math.log(self.parameters["sigma_min"])
        log_high = math.log(self.parameters["sigma_max"])
        with np.errstate(divide="ignore"):
            log_sigma = np.log(np.asarray(sigma, dtype=np.float64))
        return np.clip((log_high - log_sigma) / (log_high - log_low), 0.0, 1.0)

    def weight(self, sigma: float | np.ndarray) -> float | np.ndarray:
        """The weight at k-diffusion sigma(s) ``sigma`` (float64; a float for a scalar input)."""
        sigma_array = np.asarray(sigma, dtype=np.float64)
        if np.any(np.isnan(sigma_array)) or np.any(sigma_array < 0.0):
            raise ValueError("sigma must be >= 0 (k-diffusion sigma = sigma_t / alpha_t)")
        values = self.parameters
        w = values["weight"]
        if self.shape == "constant":
            result = np.full_like(sigma_array, w)
        elif self.shape == "interval":
            inside = (sigma_array >= values["sigma_lo"]) & (sigma_array <= values["sigma_hi"])
            result = np.where(inside, w, 1.0)
        else:
            result = self._progressive(self.progress(sigma_array))
        return float(result) if result.ndim == 0 else result

    def _progressive(self, p: np.ndarray) -> np.ndarray:
        w = self.parameters["weight"]
        if self.shape == "linear_increasing":
            return 1.0 + 2.0 * (w - 1.0) * p
        if self.shape == "linear_decreasing":
            return 1.0 + 2.0 * (w - 1.0) * (1.0 - p)
        if self.shape == "cosine_increasing":
            return 1.0 + (w - 1.0) * (1.0 - np.cos(np.pi * p))
        if self.shape == "cosine_decreasing":
            return 1.0 + (w - 1.0) * (1.0 + np.cos(np.pi * p))
        if self.shape == "clamp_linear":
            return np.maximum(self.parameters["c"], 1.0 + 2.0 * (w - 1.0) * p)
        if self.shape == "power_cosine":
            return 1.0 + (w - 1.0) * (1.0 - np.cos(np.pi * p ** self.parameters["s"]))
        raise AssertionError(f"unreachable shape {self.shape}")

    def __call__(self, sigma: float | np.ndarray) -> float | np.ndarray:
        return self.weight(sigma)

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest weight over all sigmas (closed form per shape)."""
        w = self.parameters["weight"]
        if self.shape == "constant":
            return (w, w)
        ends = (1.0, w) if self.shape == "interval" else (1.0, 2.0 * w - 1.0)
        low, high = min(ends), max(ends)
        if self.shape == "clamp_linear":
            c = self.parameters["c"]
            low, high = max(c, low), max(c, high)
        return (low, high)

    def describe(self) -> str:
        """One line: shape and parameters."""
        settings = ", ".join(f"{name}={value:g}" for name, value in self.parameters.items())
        return f"{self.shape}({settings})"

    # JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "shape": self.shape,
            "parameters": dict(self.parameters),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GuidanceSchedule:
        """A schedule from :meth:`to_json`'s dict; wrong format, version or fields raise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a guidance schedule is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"format: expected {FORMAT_NAME!r}, got {data.get('format')!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"version: {FORMAT_NAME} version {data.get('version')!r} is not supported "
                f"(this stepsearch reads version {FORMAT_VERSION})"
            )
        unknown = sorted(set(data) - {"format", "version", "shape", "parameters", "provenance"})
        if unknown:
            raise ValueError(f"unknown fields {unknown} in a guidance schedule")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise ValueError("provenance must be a JSON object")
        return cls(str(data.get("shape")), data.get("parameters", {}), provenance)

    def with_provenance(self, **entries: Any) -> GuidanceSchedule:
        """The same schedule with provenance entries added (version and creation time included)."""
        created = _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds")
        provenance = {
            "stepsearch_version": __version__,
            "created": created,
            **self.provenance,
            **entries,
        }
        return GuidanceSchedule(self.shape, self.parameters, provenance)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON file atomically (stepsearch version and creation time added)."""
        schedule = self if "created" in self.provenance else self.with_provenance()
        atomic_write_json(path, schedule.to_json())


def guidance_settings(schedule: GuidanceSchedule | None) -> dict[str, Any]:
    """``{"guidance_schedule": {"shape", "parameters"}}`` for a model's provenance and cache keys
    (no provenance, so equal schedules give equal keys); empty for ``None``."""
    if schedule is None:
        return {}
    return {"guidance_schedule": {"shape": schedule.shape, "parameters": dict(schedule.parameters)}}


def load_guidance(path: str | os.PathLike[str]) -> GuidanceSchedule:
    """A guidance schedule file; errors name the file and the field."""
    try:
        return GuidanceSchedule.from_json(read_json(path))
    except ValueError as error:
        raise ValueError(f"guidance schedule '{path}': {error}") from None
