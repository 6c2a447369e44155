"""Schedule files: a fitted schedule (or solver plan) as data, with the provenance of its fit.

A search's result is not a scheduler object but a JSON file (the answer to diffusers issue 7802,
"trained schedulers are stateful"): the schedule itself, on its noise schedule, plus what it was
fitted for and how well it did::

    {"format": "stepsearch.ScheduleFile", "version": 1,
     "schedule": {... StepSchedule JSON, noise schedule included ...},   # or "plan": {...}
     "provenance": {"model": {"name", "digest"}, "prediction_type", "solver": {"name", "config"},
                    "nfe", "guidance_scale", "resolution", "flow_shift",
                    "objective": {...}, "scores": {"search": {...}, "held_out": {...}},
                    "seeds": {"search", "held_out"}, "search": {"family", "settings"},
                    "stepsearch_version", "created"}}

Loading checks it against where it is used: another noise schedule raises (the times would mean
other noise levels), another model warns with both identities (a schedule can transfer, but the user
should know), and so does another classifier-free guidance scale (or a constant scale where the
file was fitted under a guidance schedule, ``provenance.extra.guidance_schedule``; its
``guidance_scale`` is then ``null``).
"""

from __future__ import annotations

import datetime as _datetime
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from stepsearch import __version__
from stepsearch._io import atomic_write_json, read_json
from stepsearch.noise import NoiseSchedule
from stepsearch.plan import FORMAT_NAME as PLAN_FORMAT_NAME
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GuidanceMismatchWarning",
    "ModelMismatchWarning",
    "Provenance",
    "ScheduleFile",
    "load_schedule",
    "read_plan_file",
    "read_schedule_or_file",
]

FORMAT_NAME = "stepsearch.ScheduleFile"
FORMAT_VERSION = 1

REQUIRED_FIELDS = ("model", "solver", "nfe", "objective", "scores", "seeds", "search")
"""Provenance fields every schedule file must carry."""


class ModelMismatchWarning(UserWarning):
    """A schedule file fitted on one model is used with another."""


class GuidanceMismatchWarning(UserWarning):
    """A schedule file fitted at one classifier-free guidance scale is used at another (guidance
    changes the ODE: a schedule tuned at one scale need not be good at another)."""


def _version() -> str:
    return __version__


@dataclass(frozen=True)
class Provenance:
    """What a schedule was fitted for and how well it did (module docstring).

    ``model`` is ``{"name", "digest"}`` (:class:`~stepsearch.models.source.ModelIdentity`),
    ``solver`` ``{"name", "config"}``, ``scores`` ``{"search": ..., "held_out": ...}`` (each a
    :meth:`~stepsearch.eval.objective.Score.to_json_dict`), ``seeds`` ``{"search", "held_out"}``,
    ``search`` ``{"family", "settings"}``; ``extra`` holds anything else (JSON).
    """

    model: Mapping[str, Any]
    solver: Mapping[str, Any]
    nfe: int
    objective: Mapping[str, Any]
    scores: Mapping[str, Any]
    seeds: Mapping[str, int]
    search: Mapping[str, Any]
    prediction_type: str | None = None
    guidance_scale: float | None = None
    resolution: tuple[int, ...] | None = None
    flow_shift: float | None = None
    stepsearch_version: str = field(default_factory=_version)
    created: str = field(
        default_factory=lambda: _datetime.datetime.now(_datetime.timezone.utc).isoformat()
    )
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, Mapping) or not {"name", "digest"} <= set(self.model):
            raise ValueError(f"provenance 'model' needs 'name' and 'digest', got {self.model!r}")
        if not isinstance(self.solver, Mapping) or "name" not in self.solver:
            raise ValueError(f"provenance 'solver' needs a 'name', got {self.solver!r}")
        if isinstance(self.nfe, bool) or int(self.nfe) != self.nfe or self.nfe < 1:
            raise ValueError(f"provenance 'nfe' must be a positive integer, got {self.nfe!r}")
        object.__setattr__(self, "nfe", int(self.nfe))
        if self.resolution is not None:
            object.__setattr__(self, "resolution", tuple(int(r) for r in self.resolution))
        for name in ("model", "solver", "objective", "scores", "seeds", "search", "extra"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "prediction_type": self.prediction_type,
            "solver": dict(self.solver),
            "nfe": self.nfe,
            "guidance_scale": self.guidance_scale,
            "resolution": list(self.resolution) if self.resolution is not None else None,
            "flow_shift": self.flow_shift,
            "objective": dict(self.objective),
            "scores": dict(self.scores),
            "seeds": dict(self.seeds),
            "search": dict(self.search),
            "stepsearch_version": self.stepsearch_version,
            "created": self.created,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> Provenance:
        if not isinstance(payload, Mapping):
            raise ValueError("'provenance' must be a JSON object")
        missing = [name for name in REQUIRED_FIELDS if name not in payload]
        if missing:
            raise ValueError(f"provenance lacks {', '.join(repr(m) for m in missing)}")
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in payload.items() if key in known})


@dataclass(frozen=True)
class ScheduleFile:
    """A fitted :class:`~stepsearch.schedule.StepSchedule` or solver plan with its
    :class:`Provenance`. ``schedule`` is always the step schedule (a plan's own, for a plan)."""

    candidate: Any
    provenance: Provenance

    @property
    def schedule(self) -> StepSchedule:
        return getattr(self.candidate, "schedule", self.candidate)

    @property
    def is_plan(self) -> bool:
        return not isinstance(self.candidate, StepSchedule)

    def to_json_dict(self) -> dict[str, Any]:
        key = "plan" if self.is_plan else "schedule"
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            key: self.candidate.to_json_dict(),
            "provenance": self.provenance.to_json_dict(),
        }

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> ScheduleFile:
        if not isinstance(payload, Mapping):
            raise ValueError("a schedule file must hold a JSON object")
        if payload.get("format") != FORMAT_NAME:
            raise ValueError(
                f"not a schedule file: format is {payload.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = payload.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ValueError(
                f"unsupported schedule file version {version!r} (this stepsearch "
                f"{_version()} reads versions 1..{FORMAT_VERSION}; upgrade stepsearch)"
            )
        if "provenance" not in payload:
            raise ValueError("schedule file lacks 'provenance'")
        if "plan" in payload:
            candidate: Any = SolverPlan.from_json_dict(payload["plan"])
        elif "schedule" in payload:
            candidate = StepSchedule.from_json_dict(payload["schedule"])
        else:
            raise ValueError("schedule file lacks 'schedule' (or 'plan')")
        return cls(candidate, Provenance.from_json_dict(payload["provenance"]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as versioned JSON, atomically (NaN/Inf refused)."""
        atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        noise: NoiseSchedule | None = None,
        model: Mapping[str, Any] | Any | None = None,
        guidance_scale: float | None = None,
    ) -> ScheduleFile:
        """Read a schedule file; with ``noise``, refuse it for another noise schedule; with
        ``model`` (an identity or its JSON), warn (:class:`ModelMismatchWarning`) if fitted on
        another model; with ``guidance_scale``, warn (:class:`GuidanceMismatchWarning`) if fitted
        at another guidance scale. Bad content raises ``ValueError`` naming the file."""
        try:
            loaded = cls.from_json_dict(read_json(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        loaded.check(noise=noise, model=model, guidance_scale=guidance_scale, where=str(path))
        return loaded

    def check(
        self,
        *,
        noise: NoiseSchedule | None = None,
        model: Mapping[str, Any] | Any | None = None,
        guidance_scale: float | None = None,
        where: str = "schedule file",
    ) -> None:
        """Raise ``ValueError`` for another noise schedule; warn for another model or another
        guidance scale (only where both the file and the caller name one). A ``model`` without a
        digest (``{"name": ..., "digest": None}``: named before it is loaded) is compared by
        name."""
        check_noise(self.schedule, noise, where)
        fitted_schedule = self.provenance.extra.get("guidance_schedule")
        if guidance_scale is not None and fitted_schedule is not None:
            warnings.warn(
                f"{where} was fitted under a guidance schedule "
                f"({fitted_schedule.get('shape', '?')}) but is used at the constant guidance scale "
                f"{float(guidance_scale):g}; guidance changes the sampling ODE, so its schedule "
                "may not be optimal here (use the guidance schedule, or fit one at this scale)",
                GuidanceMismatchWarning,
                stacklevel=3,
            )
        fitted_scale = self.provenance.guidance_scale
        if (
            guidance_scale is not None
            and fitted_scale is not None
            and abs(float(fitted_scale) - float(guidance_scale)) > 1e-9
        ):
            warnings.warn(
                f"{where} was fitted at guidance scale {float(fitted_scale):g} but is used at "
                f"{float(guidance_scale):g}; guidance changes the sampling ODE, so its schedule "
                "may not be optimal here (fit one at this scale)",
                GuidanceMismatchWarning,
                stacklevel=3,
            )
        if model is None:
            return
        expected = model.to_json_dict() if hasattr(model, "to_json_dict") else dict(model)
        fitted = dict(self.provenance.model)
        if expected.get("digest") is None:  # a model named before it is loaded: names only
            if fitted.get("name") != expected.get("name"):
                warnings.warn(
                    f"{where} was made for model {fitted.get('name')!r} but is used with "
                    f"{expected.get('name')!r}; its schedule may not be optimal here",
                    ModelMismatchWarning,
                    stacklevel=3,
                )
            return
        if fitted.get("digest") != expected.get("digest"):
            warnings.warn(
                f"{where} was fitted on model {fitted.get('name')!r} ({fitted.get('digest')}) "
                f"but is used with {expected.get('name')!r} ({expected.get('digest')}); "
                "its schedule may not be optimal here",
                ModelMismatchWarning,
                stacklevel=3,
            )


def check_noise(schedule: StepSchedule, noise: NoiseSchedule | None, where: str) -> None:
    """Raise ``ValueError`` when ``schedule`` lives on another noise schedule than ``noise``."""
    if noise is not None and schedule.noise != noise:
        raise ValueError(
            f"{where} is for another noise schedule: it was made for {schedule.noise!r} "
            f"({schedule.noise.to_config()}), but the model uses {noise!r} "
            f"({noise.to_config()}); fit or make the schedule on this model's noise schedule"
        )


def read_schedule_or_file(path: str | os.PathLike[str]) -> StepSchedule | ScheduleFile:
    """What ``path`` holds: a plain :class:`StepSchedule` JSON file or a schedule file (a search's
    ``best_schedule.json``); anything else is a ``ValueError`` naming the file."""
    try:
        payload = read_json(path)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    try:
        if isinstance(payload, Mapping) and payload.get("format") == FORMAT_NAME:
            return ScheduleFile.from_json_dict(payload)
        return StepSchedule.from_json_dict(payload)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def load_schedule(
    path: str | os.PathLike[str],
    *,
    noise: NoiseSchedule | None = None,
    model: Mapping[str, Any] | Any | None = None,
    guidance_scale: float | None = None,
) -> StepSchedule:
    """The step schedule of a schedule file or of a plain :class:`StepSchedule` JSON file, checked
    against ``noise`` (raises), ``model`` and ``guidance_scale`` (warn), as
    :meth:`ScheduleFile.load` does (a plain schedule has no provenance to check)."""
    try:
        payload = read_json(path)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT_NAME:
        return ScheduleFile.load(
            path, noise=noise, model=model, guidance_scale=guidance_scale
        ).schedule
    schedule = StepSchedule.load(path)
    check_noise(schedule, noise, str(path))
    return schedule


def read_plan_file(path: str | os.PathLike[str]) -> tuple[SolverPlan, Provenance | None] | None:
    """The solver plan ``path`` holds, with its provenance: a plan file
    (:meth:`SolverPlan.save`, no provenance) or a schedule file of a plan (a search's
    ``best_schedule.json``); ``None`` for files holding a plain schedule. Bad content raises
    ``ValueError`` naming the file."""
    try:
        payload = read_json(path)
        if not isinstance(payload, Mapping):
            return None
        if payload.get("format") == PLAN_FORMAT_NAME:
            return SolverPlan.from_json_dict(payload), None
        if payload.get("format") == FORMAT_NAME and "plan" in payload:
            loaded = ScheduleFile.from_json_dict(payload)
            return loaded.candidate, loaded.provenance
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return None
