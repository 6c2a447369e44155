"""The AYS optimizer: coordinate-wise search over a schedule's noisy points (AYS Alg. 1, Sec. 3.3).

The schedule is a decreasing list of noisy k-diffusion sigmas ``s_0 > s_1 > ... > s_m`` (the first
and last are fixed: the model's ``sigma_max`` and ``sigma_min``; a clean end ``s = 0`` is appended
outside). The cost is a sum of per-interval terms (:class:`IntervalCost`): term ``k`` covers
``[s_{k+1}, s_k]`` and depends on ``s_{k+1}``, ``s_k`` and, for ``reach`` = 1, on ``s_{k-1}`` too.
So moving point ``j`` changes only terms ``j - 1 .. j + reach``, and points ``reach + 2`` apart can
move in parallel (for the paper's first-order KLUB: every other point).

One **sweep** visits every free point once, colour by colour: for each point, 11 candidates in
``log s`` (the current value and five either side, spread over ``radius`` times the gap to each
neighbour), the affected terms re-estimated for each, the lowest total kept (ties keep the current
value, so the cost never rises). A sweep that accepts no move halves ``radius``; the search is
**stable** when ``radius`` falls below ``min_radius``.

**Early stopping** (Sec. 3.3: the KLUB's optimum is not the KL optimum): after every sweep a
``proxy`` (a quality score on the search seed, e.g. the objective's trajectory error) is evaluated;
the best-proxy schedule is kept and the search stops after ``patience`` sweeps without a better one.

**Hierarchical refinement**: :func:`subdivide` inserts log-midpoints; only the new points are free.

The whole state is JSON (:class:`SearchState`): a run checkpointed after each sweep and restarted
resumes exactly where it stopped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from stepsearch.ays.klub import Interval, gaussian_klub_interval
from stepsearch.noise import FloatArray

__all__ = [
    "CANDIDATES",
    "EulerGaussianKL",
    "ExactGaussianKLUB",
    "IntervalCost",
    "SearchSettings",
    "SearchState",
    "coordinate_search",
    "subdivide",
]

CANDIDATES = 11
"""Candidates per point and sweep (the paper's choice), the current value included."""


class IntervalCost(Protocol):
    """A schedule cost that is a sum of per-interval terms (see module docstring)."""

    @property
    def reach(self) -> int:
        """0: term ``k`` depends on its two ends; 1: also on the point before its upper end."""
        ...

    def terms(self, intervals: Sequence[Interval]) -> FloatArray: ...


@dataclass(frozen=True)
class EulerGaussianKL:
    """The exact cost behind AYS Thm 3.1: for data ``N(0, c^2 I)`` the probability-flow ODE solved
    by Euler / DDIM in sigma space shrinks the output's std by ``prod_k cos(theta_k - theta_{k+1})``
    with ``theta = atan(s / c)``, so the output's KL to the true marginal is a decreasing function of
    ``sum_k -log cos(theta_k - theta_{k+1})``: these are the terms. Its optimum is
    :func:`stepsearch.schedule.ays_gaussian` (equal steps in ``theta``)."""

    c: float = 0.5
    reach: int = 0

    def terms(self, intervals: Sequence[Interval]) -> FloatArray:
        return np.asarray(
            [
                -math.log(math.cos(math.atan(iv.upper / self.c) - math.atan(iv.lower / self.c)))
                for iv in intervals
            ]
        )


@dataclass(frozen=True)
class ExactGaussianKLUB:
    """The first-order KLUB of Gaussian data ``N(0, c^2 I_d)`` in closed form
    (:func:`~stepsearch.ays.klub.gaussian_klub_interval` times ``d``)."""

    c: float = 0.5
    dim: int = 1
    reach: int = 0

    def terms(self, intervals: Sequence[Interval]) -> FloatArray:
        return np.asarray(
            [self.dim * gaussian_klub_interval(iv.lower, iv.upper, self.c) for iv in intervals]
        )


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of :func:`coordinate_search`."""

    radius: float = 0.5
    min_radius: float = 1.0 / 64
    max_sweeps: int = 40
    patience: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.min_radius <= self.radius < 1:
            raise ValueError("need 0 < min_radius <= radius < 1")
        if self.max_sweeps < 0 or self.patience < 1:
            raise ValueError("need max_sweeps >= 0 and patience >= 1")


@dataclass
class SearchState:
    """Everything a search needs to continue (JSON-serialisable; see module docstring)."""

    sigmas: list[float]
    free: list[bool]
    radius: float
    terms: list[float]
    sweeps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_sigmas: list[float] | None = None
    best_proxy: float | None = None
    stale: int = 0
    done: bool = False
    reason: str = ""

    @property
    def klub(self) -> float:
        return float(sum(self.terms))

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, payload: dict[str, Any]) -> SearchState:
        try:
            return cls(**payload)
        except TypeError as error:
            raise ValueError(f"not a search state: {error}") from None

    def result(self) -> list[float]:
        """The schedule to keep: the best under the proxy if one was used, else the last."""
        return list(self.best_sigmas if self.best_sigmas is not None else self.sigmas)


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    values = [float(v) for v in sigmas]
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError("sigmas must be at least two positive finite numbers")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError("sigmas must decrease strictly")
    return values


def subdivide(sigmas: Sequence[float]) -> tuple[list[float], list[bool]]:
    """Insert the log-midpoint of every interval (AYS Sec. 3.3); the new points are the free ones."""
    values = _check_sigmas(sigmas)
    refined, free = [values[0]], [False]
    for upper, lower in itertools.pairwise(values):
        refined += [math.sqrt(upper * lower), lower]
        free += [True, False]
    return refined, free


def _terms_for(cost: IntervalCost, sigmas: Sequence[float], ks: Sequence[int]) -> list[Interval]:
    order = 2 if cost.reach else 1
    return [
        Interval(sigmas[k + 1], sigmas[k], sigmas[k - 1] if order == 2 and k > 0 else None)
        for k in ks
    ]


def _candidates(sigmas: Sequence[float], j: int, radius: float) -> list[float]:
    """The current value first, then five steps towards each neighbour in ``log s``."""
    current, upper, lower = (math.log(sigmas[i]) for i in (j, j - 1, j + 1))
    half = (CANDIDATES - 1) // 2
    steps = [radius * k / half for k in range(1, half + 1)]
    up = [current + f * (upper - current) for f in steps]
    down = [current - f * (current - lower) for f in steps]
    return [sigmas[j]] + [math.exp(v) for v in up + down]


def _sweep(cost: IntervalCost, state: SearchState) -> int:
    """One sweep over all free points, colour by colour; returns the number of accepted moves."""
    sigmas, terms = list(state.sigmas), list(state.terms)
    stride = cost.reach + 2
    accepted = 0
    last = len(sigmas) - 2  # the last term's index
    for colour in range(stride):
        points = [j for j in range(1, len(sigmas) - 1) if state.free[j] and j % stride == colour]
        if not points:
            continue
        plan: list[tuple[int, list[float], list[int]]] = []
        intervals: list[Interval] = []
        for j in points:
            affected = [k for k in range(j - 1, j + cost.reach + 1) if 0 <= k <= last]
            candidates = _candidates(sigmas, j, state.radius)
            for value in candidates[1:]:
                trial = list(sigmas)
                trial[j] = value
                intervals += _terms_for(cost, trial, affected)
            plan.append((j, candidates, affected))
        values = np.asarray(cost.terms(intervals), dtype=np.float64)
        offset = 0
        for j, candidates, affected in plan:
            width = len(affected)
            best_total = sum(terms[k] for k in affected)
            best_value, best_terms = sigmas[j], None
            for value in candidates[1:]:
                trial_terms = values[offset : offset + width]
                offset += width
                total = float(trial_terms.sum())
                if total < best_total and math.isfinite(total):
                    best_total, best_value, best_terms = total, value, trial_terms
            if best_terms is not None:
                sigmas[j] = best_value
                for k, term in zip(affected, best_terms, strict=True):
                    terms[k] = float(term)
                accepted += 1
    state.sigmas, state.terms = sigmas, terms
    return accepted


def initial_state(
    cost: IntervalCost,
    sigmas: Sequence[float],
    free: Sequence[bool] | None = None,
    settings: SearchSettings | None = None,
) -> SearchState:
    """A fresh state: ``sigmas`` (decreasing, noisy), the free points (default: all interior)."""
    values = _check_sigmas(sigmas)
    mask = [0 < i < len(values) - 1 for i in range(len(values))] if free is None else list(free)
    if len(mask) != len(values) or mask[0] or mask[-1]:
        raise ValueError("free must have one flag per sigma and keep both ends fixed")
    settings = settings or SearchSettings()
    terms = cost.terms(_terms_for(cost, values, range(len(values) - 1)))
    return SearchState(values, [bool(f) for f in mask], settings.radius, [float(v) for v in terms])


def coordinate_search(
    cost: IntervalCost,
    state: SearchState,
    settings: SearchSettings | None = None,
    *,
    proxy: Callable[[list[float]], float] | None = None,
    on_sweep: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Run (or resume) the search on ``state`` until stable, out of sweeps, or early-stopped.

    ``proxy(sigmas) -> float`` (lower is better) drives early stopping; ``on_sweep(state)`` is
    called after the initial evaluation and after every sweep (checkpoint there).
    """
    settings = settings or SearchSettings()
    if proxy is not None and state.best_proxy is None and not state.history:
        state.best_proxy = float(proxy(list(state.sigmas)))
        state.best_sigmas = list(state.sigmas)
    if not state.history:
        state.history.append(
            {
                "sweep": 0,
                "klub": state.klub,
                "accepted": 0,
                "radius": state.radius,
                "proxy": state.best_proxy,
            }
        )
        if on_sweep is not None:
            on_sweep(state)
    while not state.done:
        if not any(state.free):
            state.done, state.reason = True, "no free points"
            break
        if state.sweeps >= settings.max_sweeps:
            state.done, state.reason = True, "max_sweeps"
            break
        accepted = _sweep(cost, state)
        state.sweeps += 1
        score = float(proxy(list(state.sigmas))) if proxy is not None else None
        if score is not None:
            if state.best_proxy is None or score < state.best_proxy:
                state.best_proxy, state.best_sigmas, state.stale = score, list(state.sigmas), 0
            else:
                state.stale += 1
        state.history.append(
            {
                "sweep": state.sweeps,
                "klub": state.klub,
                "accepted": accepted,
                "radius": state.radius,
                "proxy": score,
            }
        )
        if accepted == 0:
            state.radius *= 0.5
        if state.radius < settings.min_radius:
            state.done, state.reason = True, "stable"
        elif proxy is not None and state.stale >= settings.patience:
            state.done, state.reason = True, "early_stopping"
        if on_sweep is not None:
            on_sweep(state)
    return state

