"""The fitted linear-subspace step rule of OLSS as data, and the solver that runs it.

OLSS (Duan et al. 2023, "Optimal Linear Subspace Search: Learning to Construct Fast and
High-Quality Schedulers for Diffusion Models", arXiv 2305.14677, Sec. 3) writes step ``i`` of an
``n``-step sampler as a linear combination of everything computed so far::

    x_{i+1} = c_{i,T} x_T + sum_{k <= i} c_{i,k} d_k,

where ``x_T`` is the initial noise and ``d_k`` the ``k``-th model output: the noise estimate
``eps_k = (x_k - alpha_k denoised_k) / sigma_k`` (``basis="eps"``, the paper's choice) or the
data estimate ``denoised_k`` itself (``basis="denoised"``). Along the sampler's own points both
bases span the same space (``x_k`` lies in ``span{x_T, d_0 .. d_{k-1}}``); the data basis stays
defined where ``alpha = 0`` (flow matching at ``t = 1``, where ``eps_0 = x_T`` carries no
information). The coefficients are scalars (float64), fitted once by least squares
(:mod:`stepsearch.olss.fit`); this module only stores and runs them.

:class:`OLSSCoefficients` is the fit as JSON data (times, coefficients, basis);
:class:`OLSSSolver` is a :class:`~stepsearch.solvers.base.Solver` running it through
:func:`stepsearch.sampling.sample` like any other solver. It only runs the schedule it was fitted
on (a clear ``ValueError`` otherwise). Every linear multistep method whose evaluation points are
its own iterates is such a rule: :func:`ddim_coefficients` spells DDIM out in this form.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    NoiseLevel,
    Solver,
    SolverState,
    StepInfo,
    eps_from_denoised,
    linear_combination,
    noise_levels,
)

__all__ = ["BASES", "OLSSCoefficients", "OLSSSolver", "OLSSState", "ddim_coefficients"]

BASES = ("eps", "denoised")
"""What the model outputs ``d_k`` of the linear combination are (module docstring)."""

FORMAT_NAME = "stepsearch.OLSSCoefficients"
FORMAT_VERSION = 1
_TIME_TOLERANCE = 1e-12


def _check_basis(basis: str) -> str:
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    return basis


@dataclass(frozen=True, eq=False)
class OLSSCoefficients:
    """A fitted OLSS sampler: its ``schedule`` (``n + 1`` times; the model is evaluated at the
    first ``n``) and, per step ``i``, the ``i + 2`` coefficients ``(c_{i,T}, c_{i,0} .. c_{i,i})``
    of ``x_T, d_0 .. d_i`` (float64)."""

    schedule: StepSchedule
    coefficients: tuple[tuple[float, ...], ...]
    basis: str = "eps"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_basis(self.basis)
        rows = tuple(tuple(float(c) for c in row) for row in self.coefficients)
        if len(rows) != self.schedule.num_steps:
            raise ValueError(
                f"{len(rows)} coefficient rows for a schedule of {self.schedule.num_steps} steps"
            )
        for i, row in enumerate(rows):
            if len(row) != i + 2:
                raise ValueError(
                    f"step {i} needs {i + 2} coefficients (x_T, d_0..d_{i}), got {len(row)}"
                )
            if not all(math.isfinite(c) for c in row):
                raise ValueError(f"step {i} has non-finite coefficients {row}")
        object.__setattr__(self, "coefficients", rows)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def matrix(self) -> np.ndarray:
        """The coefficients as an ``(n, n + 1)`` lower-triangular float64 array: row ``i``,
        column 0 is ``c_{i,T}``, column ``k + 1`` is ``c_{i,k}``."""
        out = np.zeros((self.num_steps, self.num_steps + 1))
        for i, row in enumerate(self.coefficients):
            out[i, : len(row)] = row
        return out

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "basis": self.basis,
            "schedule": self.schedule.to_json_dict(),
            "coefficients": [list(row) for row in self.coefficients],
            "metadata": dict(self.metadata),
            "checksum": self.checksum(),
        }

    def checksum(self) -> str:
        """``sha256:<hex>`` of the basis, the noise schedule, the fitted times and the
        coefficients: a file whose times or coefficients were edited after the fit (they only
        make sense together) no longer matches it."""
        payload = {
            "basis": self.basis,
            "noise": self.schedule.noise.to_config(),
            "times": [float(t).hex() for t in self.schedule.times],
            "coefficients": [[float(c).hex() for c in row] for row in self.coefficients],
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> OLSSCoefficients:
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT_NAME:
            raise ValueError(f"not OLSS coefficients (format should be {FORMAT_NAME!r})")
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported OLSS coefficients version {payload.get('version')!r}")
        for key in ("schedule", "coefficients"):
            if key not in payload:
                raise ValueError(f"OLSS coefficients lack {key!r}")
        loaded = cls(
            StepSchedule.from_json_dict(payload["schedule"]),
            tuple(tuple(row) for row in payload["coefficients"]),
            str(payload.get("basis", "eps")),
            payload.get("metadata") or {},
        )
        written = payload.get("checksum")  # files from before checksums have none
        if written is not None and written != loaded.checksum():
            raise ValueError(
                "OLSS coefficients were edited after the fit: their times and coefficients no "
                "longer match the checksum the fit wrote (coefficients are only valid at the "
                "times they were fitted for); refit, or restore the original file"
            )
        return loaded

    def matches(self, schedule: StepSchedule) -> bool:
        """Whether ``schedule`` is the fitted one (same noise schedule, same times)."""
        return (
            schedule.noise == self.schedule.noise
            and schedule.times.shape == self.schedule.times.shape
            and bool(np.allclose(schedule.times, self.schedule.times, rtol=_TIME_TOLERANCE, atol=0))
        )


@dataclass(frozen=True, eq=False)
class OLSSState(SolverState):
    """``x_T`` (set at the first step) and the model outputs ``d_0 .. d_{i-1}`` so far."""

    x_T: Tensor | None = None
    directions: tuple[Tensor, ...] = ()


class OLSSSolver(Solver):
    """Runs fitted :class:`OLSSCoefficients` (module docstring): one model evaluation per step,
    ``x_{i+1} = c_{i,T} x_T + sum_k c_{i,k} d_k``. Deterministic; any tensor rank."""

    name = "olss"
    order = 1
    state_type = OLSSState

    def __init__(self, coefficients: OLSSCoefficients):
        if not isinstance(coefficients, OLSSCoefficients):
            raise TypeError(f"OLSSSolver needs OLSSCoefficients, got {type(coefficients).__name__}")
        self.coefficients = coefficients

    @property
    def schedule(self) -> StepSchedule:
        """The schedule the coefficients were fitted on (the only one this solver runs)."""
        return self.coefficients.schedule

    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        if not self.coefficients.matches(schedule):
            fitted = np.array2string(self.schedule.times, precision=4, threshold=12)
            asked = np.array2string(schedule.times, precision=4, threshold=12)
            raise ValueError(
                f"OLSS coefficients were fitted for the {self.schedule.num_steps}-step schedule "
                f"{fitted} and cannot run {asked} ({schedule.num_steps} steps); fit OLSS again "
                "for that step count"
            )
        return super().plan(schedule)

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        del generator
        assert isinstance(state, OLSSState)
        x_T = x if i == 0 else state.x_T
        assert x_T is not None
        direction = self._direction(x, denoised, state.level(i))
        directions = (*state.directions, direction)
        x_next = linear_combination(self.coefficients.coefficients[i], [x_T, *directions])
        return x_next, state.evolve(x_T=x_T, directions=directions)

    def _direction(self, x: Tensor, denoised: Tensor, level: NoiseLevel) -> Tensor:
        if self.coefficients.basis == "denoised":
            return denoised
        return eps_from_denoised(x, denoised, level)

    def config(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients.to_json_dict()}

    @classmethod
    def from_options(cls, coefficients: OLSSCoefficients | Mapping[str, Any]) -> OLSSSolver:
        """The registry's factory (``get_solver("olss", coefficients=...)``): ``coefficients``
        are :class:`OLSSCoefficients` or their JSON (what :meth:`config` holds)."""
        if isinstance(coefficients, Mapping):
            coefficients = OLSSCoefficients.from_json_dict(coefficients)
        return cls(coefficients)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OLSSSolver:
        """Inverse of :meth:`config`."""
        return cls.from_options(**config)

    def __repr__(self) -> str:
        return f"OLSSSolver({self.coefficients.num_steps} steps, basis={self.coefficients.basis!r})"


def ddim_coefficients(schedule: StepSchedule, basis: str = "eps") -> OLSSCoefficients:
    """DDIM (eta = 0) on ``schedule`` written as OLSS coefficients (exact, float64).

    DDIM is ``x_{i+1} = alpha_{i+1} D_i + sigma_{i+1} eps_i`` with ``D_i = (x_i - sigma_i eps_i)
    / alpha_i``, i.e. ``x_{i+1} = (alpha_{i+1} / alpha_i) x_i + (sigma_{i+1} - alpha_{i+1}
    sigma_i / alpha_i) eps_i`` in the noise basis and ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i +
    (alpha_{i+1} - sigma_{i+1} alpha_i / sigma_i) D_i`` in the data basis; unrolling ``x_i``
    gives the coefficients on ``x_T, d_0 .. d_i``. Needs ``alpha > 0`` at every evaluation for
    the noise basis.
    """
    _check_basis(basis)
    levels = noise_levels(schedule.noise, schedule.times)
    n = schedule.num_steps
    current = np.zeros(n + 1)
    current[0] = 1.0  # x_0 = x_T
    rows: list[tuple[float, ...]] = []
    for i in range(n):
        now, target = levels[i], levels[i + 1]
        if basis == "eps":
            if now.alpha == 0.0:
                raise ValueError(
                    "the noise basis cannot express DDIM from alpha = 0; use 'denoised'"
                )
            keep = target.alpha / now.alpha
            new = target.sigma - target.alpha * now.sigma / now.alpha
        else:
            keep = target.sigma / now.sigma
            new = target.alpha - target.sigma * now.alpha / now.sigma
        current = keep * current
        current[i + 1] += new
        rows.append(tuple(current[: i + 2].tolist()))
    return OLSSCoefficients(schedule, tuple(rows), basis, {"rule": "ddim"})


def coefficients_for(
    schedule: StepSchedule, rows: Sequence[Sequence[float]], basis: str, **metadata: Any
) -> OLSSCoefficients:
    """Shorthand for :class:`OLSSCoefficients` from plain rows."""
    return OLSSCoefficients(schedule, tuple(tuple(r) for r in rows), basis, metadata)
