"""OLSS fitting: least squares along a path of teacher indices, and the search for that path.

Notation (Duan et al. 2023, arXiv 2305.14677, Sec. 3): the teacher visits ``x_0 = x_T, .., x_K`` and
outputs ``d_0 .. d_{K-1}`` (:mod:`stepsearch.olss.trajectories`). An ``n``-step OLSS sampler is a
*path* of teacher indices ``0 = c_0 < c_1 < .. < c_n = K``; its step ``i`` approximates
``x_{c_{i+1}}`` in ``span{x_T, d_{c_0} .. d_{c_i}}``. Coefficients are ordinary least squares pooled
over samples and pixels, float64; the *fit error* of a step is the mean squared residual.

- **Teacher-forced fit** (the paper's): the ``d`` are the teacher's own outputs. All teacher-forced
  fits run on the R factor of the pooled columns (:class:`TrajectorySummary`), exactly.
- **Rollout fit** (:func:`rollout_fit`): the ``d`` are the outputs the model gives at the sampler's
  *own* points ``x_hat_{c_i}`` (one model call per step and sample), so the fitted rule sees at
  run time what it was fitted on; step ``i``'s coefficients are fitted after step ``i - 1``'s.

Path searches (all teacher-forced, no model calls):

- :func:`greedy_path`: the paper's search. For an error bound ``b`` go from ``c_i`` to the
  farthest index whose fit error is at most ``b``; bisect ``b`` (30 halvings) for the smallest
  bound whose greedy path reaches ``K`` within ``n`` steps (min-max fit error).
- :func:`uniform_path`: evenly spaced indices (the paper's "OLSS-P" ablation).
- :func:`dp_path` (beyond the paper): dynamic programming over teacher indices that minimises the
  *total* fit error exactly, for a Markov version of the step rule: step ``c -> j`` fitted in
  ``span{x_c, d_p, d_c}`` (the teacher point and the last two outputs, ``p`` the index before
  ``c``; ``span{x_0, d_0}`` for the first step). The full-history rule is then fitted on that path.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch._threads import one_thread
from stepsearch.olss.trajectories import TeacherRecording, TrajectorySummary
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import noise_levels
from stepsearch.solvers.olss import BASES, OLSSCoefficients

__all__ = [
    "PATH_SEARCHES",
    "OLSSFit",
    "RolloutFitter",
    "best_of",
    "dp_path",
    "fit_olss",
    "greedy_path",
    "least_squares",
    "rollout_fit",
    "teacher_forced_fit",
    "uniform_path",
]

PATH_SEARCHES = ("greedy", "uniform", "dp")
"""Path searches; ``fit_olss(search="best")`` runs all three and keeps the lowest endpoint error."""
REFITS = ("teacher", "rollout")


@dataclass(frozen=True)
class OLSSFit:
    """A fitted OLSS sampler: the teacher ``path``, the :class:`OLSSCoefficients`, the fit error
    of each step (mean squared residual) and how it was found."""

    path: tuple[int, ...]
    coefficients: OLSSCoefficients
    step_errors: tuple[float, ...]
    search: str
    refit: str
    bound: float | None = None
    seconds: float = 0.0
    teacher_forced_errors: tuple[float, ...] = field(default=())
    candidates: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule(self) -> StepSchedule:
        return self.coefficients.schedule

    @property
    def total_error(self) -> float:
        return float(sum(self.step_errors))

    def describe(self) -> dict[str, Any]:
        return {
            "path": list(self.path),
            "search": self.search,
            "refit": self.refit,
            "bound": self.bound,
            "step_errors": list(self.step_errors),
            "teacher_forced_errors": list(self.teacher_forced_errors),
            "basis": self.coefficients.basis,
            "seconds": round(self.seconds, 4),
            "candidates": dict(self.candidates),
        }

    def summary(self) -> dict[str, Any]:
        """Path, endpoint and total fit error (for comparing searches)."""
        return {
            "path": list(self.path),
            "endpoint_error": self.step_errors[-1],
            "total_error": self.total_error,
            "max_error": max(self.step_errors),
            "bound": self.bound,
        }


def best_of(fits: Sequence[OLSSFit]) -> OLSSFit:
    """The fit with the lowest endpoint error (the last step's, the one that lands on the teacher's
    sample), with every candidate's :meth:`OLSSFit.summary` attached."""
    chosen = min(fits, key=lambda fit: fit.step_errors[-1])
    candidates = {fit.search: fit.summary() for fit in fits}
    seconds = sum(fit.seconds for fit in fits)
    return replace(chosen, candidates=candidates, seconds=seconds)


# ------------------------------------------------------------------------------------------------
# least squares
# ------------------------------------------------------------------------------------------------


def least_squares(a: Tensor, b: Tensor, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """``argmin_c ||a c - b||`` (float64, SVD-based so rank-deficient bases are fine; batched) and
    the mean squared residual of each right-hand side (divided by ``num_rows``, default the rows
    of ``a``). ``a``: ``(..., rows, k)``, ``b``: ``(..., rows, m)``."""
    a, b = a.double(), b.double()
    with one_thread():  # the same bits on any machine (stepsearch._threads)
        solution = torch.linalg.lstsq(a, b, driver="gelsd").solution
        residual = (a @ solution - b).square().sum(dim=-2)
    return solution, residual / float(num_rows or a.shape[-2])


def _check_path(path: Sequence[int], num_teacher_steps: int) -> tuple[int, ...]:
    path = tuple(int(c) for c in path)
    if len(path) < 2 or path[0] != 0 or path[-1] != num_teacher_steps:
        raise ValueError(f"a path runs from teacher index 0 to {num_teacher_steps}, got {path}")
    if any(b <= a for a, b in itertools.pairwise(path)):
        raise ValueError(f"path indices must increase strictly, got {path}")
    return path


def _history_columns(summary: TrajectorySummary, path: Sequence[int], i: int) -> list[int]:
    return [summary.x_column(0), *(summary.d_column(c) for c in path[: i + 1])]


def teacher_forced_fit(
    summary: TrajectorySummary, path: Sequence[int]
) -> tuple[list[tuple[float, ...]], list[float]]:
    """The paper's fit along ``path``: per step, the coefficients of ``x_{c_{i+1}}`` in
    ``span{x_T, d_{c_0} .. d_{c_i}}`` (teacher outputs) and the fit error."""
    path = _check_path(path, summary.num_steps)
    rows, errors = [], []
    for i in range(len(path) - 1):
        columns = _history_columns(summary, path, i)
        target = summary.r[:, [summary.x_column(path[i + 1])]]
        solution, mse = least_squares(summary.r[:, columns], target, summary.num_rows)
        rows.append(tuple(solution[:, 0].tolist()))
        errors.append(float(mse[0]))
    return rows, errors


class RolloutFitter:
    """The rollout fit one step at a time, for callers that own the model loop (a pipeline's
    scheduler): :meth:`advance` takes the sample ``x_hat_i`` the model saw and its ``x0``
    estimate, fits step ``i`` to ``targets[i]`` and returns ``x_hat_{i+1}`` (in ``x``'s dtype)."""

    def __init__(self, targets: Tensor, schedule: StepSchedule, basis: str = "eps"):
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        if targets.shape[0] != schedule.num_steps:
            raise ValueError(
                f"need one target per step: {schedule.num_steps}, got {targets.shape[0]}"
            )
        self.targets = targets
        self.basis = basis
        self.levels = noise_levels(schedule.noise, schedule.times)
        self.columns: list[Tensor] = []
        self.rows: list[tuple[float, ...]] = []
        self.errors: list[float] = []

    @property
    def done(self) -> bool:
        return len(self.rows) == self.targets.shape[0]

    def advance(self, x: Tensor, denoised: Tensor) -> Tensor:
        i = len(self.rows)
        if self.done:
            raise RuntimeError("every step is fitted already")
        if tuple(x.shape) != tuple(self.targets.shape[1:]):
            raise ValueError(
                f"the rollout needs every sample at once: {tuple(self.targets.shape[1:])}, "
                f"got {tuple(x.shape)}"
            )
        if i == 0:
            self.columns.append(x.double().reshape(-1))
        level = self.levels[i]
        denoised = denoised.double()
        if self.basis == "eps":
            denoised = (x.double() - level.alpha * denoised) / level.sigma
        self.columns.append(denoised.reshape(-1))
        a = torch.stack(self.columns, dim=1)
        solution, mse = least_squares(a, self.targets[i].double().reshape(-1, 1))
        self.rows.append(tuple(solution[:, 0].tolist()))
        self.errors.append(float(mse[0]))
        return (a @ solution).reshape(x.shape).to(x.dtype)


def rollout_fit(
    denoise: Callable[[Tensor, float], Tensor],
    x_T: Tensor,
    targets: Tensor,
    schedule: StepSchedule,
    basis: str = "eps",
) -> tuple[list[tuple[float, ...]], list[float]]:
    """Fit along the sampler's own points: ``x_hat_0 = x_T``; at step ``i`` evaluate ``denoise``
    at ``x_hat_i`` (time ``schedule.times[i]``), fit ``targets[i]`` (the teacher at ``c_{i+1}``)
    in ``span{x_T, d_0 .. d_i}`` and move to the fitted ``x_hat_{i+1}``. Returns the coefficient
    rows and the fit errors; ``x_hat`` is kept in ``x_T``'s dtype, as the solver computes it."""
    fitter = RolloutFitter(targets, schedule, basis)
    x = x_T
    for i in range(schedule.num_steps):
        with torch.inference_mode():
            denoised = denoise(x, float(schedule.times[i]))
        x = fitter.advance(x, denoised)
    return fitter.rows, fitter.errors


# ------------------------------------------------------------------------------------------------
# path searches
# ------------------------------------------------------------------------------------------------


def uniform_path(num_teacher_steps: int, num_steps: int) -> tuple[int, ...]:
    """``round(linspace(0, K, n + 1))`` (OLSS-P)."""
    _check_steps(num_teacher_steps, num_steps)
    return tuple(int(c) for c in np.round(np.linspace(0, num_teacher_steps, num_steps + 1)))


def _check_steps(num_teacher_steps: int, num_steps: int) -> None:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_teacher_steps:
        raise ValueError(
            f"cannot pick {num_steps} steps from a teacher of {num_teacher_steps}; record a longer teacher"
        )


class _ReachCache:
    """Fit errors of every candidate next index after a path prefix (independent of the bound)."""

    def __init__(self, summary: TrajectorySummary):
        self.summary = summary
        self.errors: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in self.errors:
            s = self.summary
            columns = _history_columns(s, prefix, len(prefix) - 1)
            targets = [s.x_column(j) for j in range(prefix[-1] + 1, s.num_steps + 1)]
            _, mse = least_squares(s.r[:, columns], s.r[:, targets], s.num_rows)
            self.errors[prefix] = mse.numpy()
        return self.errors[prefix]


def _greedy(reach: _ReachCache, num_steps: int, bound: float) -> tuple[int, ...] | None:
    """Farthest-reachable path under ``bound``, or ``None`` if it needs more than ``num_steps``."""
    end = reach.summary.num_steps
    path = (0,)
    while len(path) - 1 < num_steps:
        errors = reach(path)
        allowed = np.flatnonzero(errors <= bound)
        if allowed.size == 0:
            return None
        path = (*path, path[-1] + 1 + int(allowed[-1]))
        if path[-1] == end:
            return path
    return None


def _fill(path: tuple[int, ...], num_steps: int) -> tuple[int, ...]:
    """Split the widest index gaps until the path has ``num_steps`` steps."""
    points = list(path)
    while len(points) - 1 < num_steps:
        gaps = np.diff(points)
        k = int(np.argmax(gaps))
        points.insert(k + 1, points[k] + int(gaps[k]) // 2)
    return tuple(points)


def greedy_path(
    summary: TrajectorySummary, num_steps: int, iterations: int = 30
) -> tuple[tuple[int, ...], float]:
    """The paper's search (module docstring): the path and its error bound. A greedy path with
    fewer than ``num_steps`` steps gets its widest gaps halved (the budget is spent)."""
    _check_steps(summary.num_steps, num_steps)
    reach = _ReachCache(summary)
    low, high = 0.0, float(reach((0,))[-1]) * (1 + 1e-9) + 1e-300  # one step to K: always reachable
    path = _greedy(reach, num_steps, high)
    for _ in range(int(iterations)):
        middle = 0.5 * (low + high)
        found = _greedy(reach, num_steps, middle)
        if found is None:
            low = middle
        else:
            high, path = middle, found
    assert path is not None
    return _fill(path, num_steps), high


def _without(q: Tensor, vectors: Tensor) -> Tensor:
    """``vectors`` minus their projection on the orthonormal columns ``q`` (twice, for accuracy)."""
    for _ in range(2):
        vectors = vectors - q @ (q.T @ vectors)
    return vectors


def _markov_errors(summary: TrajectorySummary) -> np.ndarray:
    """``E[p, c, j]``: fit error of ``x_j`` in ``span{x_c, d_p, d_c}`` (``p = K`` stands for "no
    previous output": ``span{x_0, d_0}`` at ``c = 0``); ``inf`` where undefined.

    For each ``c`` the shared columns ``x_c, d_c`` are projected out once (QR); adding one more
    column ``d_p`` then lowers the residual of ``y`` by ``(d_p' . y')^2 / |d_p'|^2`` on the
    projected vectors, so all ``~K^3 / 6`` fits cost a few matrix products (float64)."""
    s, K = summary, summary.num_steps
    errors = np.full((K + 1, K + 1, K + 1), np.inf)
    r = s.r
    targets = r[:, [s.x_column(j) for j in range(1, K + 1)]]
    directions = r[:, [s.d_column(k) for k in range(K)]]

    def shared(c: int) -> Tensor:
        return torch.linalg.qr(r[:, [s.x_column(c), s.d_column(c)]]).Q

    first = _without(shared(0), targets)
    errors[K, 0, 1:] = (first.square().sum(dim=0) / s.num_rows).numpy()
    for c in range(1, K):
        q = shared(c)
        later = _without(q, targets[:, c:])  # x_{c+1} .. x_K
        earlier = _without(q, directions[:, :c])  # d_0 .. d_{c-1}
        squared = earlier.square().sum(dim=0)
        usable = squared > 1e-24 * directions[:, :c].square().sum(dim=0).clamp_min(1e-300)
        gain = (earlier.T @ later).square() / squared.clamp_min(1e-300)[:, None]
        gain = torch.where(usable[:, None], gain, torch.zeros_like(gain))
        residual = (later.square().sum(dim=0)[None, :] - gain).clamp_min(0.0)
        errors[:c, c, c + 1 :] = (residual / s.num_rows).numpy()
    return errors


def dp_path(summary: TrajectorySummary, num_steps: int) -> tuple[tuple[int, ...], float]:
    """The path of exactly ``num_steps`` steps minimising the total Markov fit error (module
    docstring), and that total."""
    _check_steps(summary.num_steps, num_steps)
    K = summary.num_steps
    errors = _markov_errors(summary)
    best = np.full((K + 1, K + 1), np.inf)  # best[p, c]: cheapest way to stand at c after p
    best[K, 0] = 0.0
    back = []
    for _ in range(num_steps):
        total = best[:, :, None] + errors  # (p, c, j)
        choice = np.argmin(total, axis=0)  # (c, j)
        best = np.take_along_axis(total, choice[None], axis=0)[0]  # becomes best[c, j]
        back.append(choice)
    previous = int(np.argmin(best[:, K]))
    value = float(best[previous, K])
    if not np.isfinite(value):
        raise ValueError(f"no {num_steps}-step path reaches the teacher's end")
    path = [K, previous]
    for choice in reversed(back[1:]):
        c, j = path[-1], path[-2]
        path.append(int(choice[c, j]))
    path.reverse()
    return _check_path(path, K), value


# ------------------------------------------------------------------------------------------------
# the whole fit
# ------------------------------------------------------------------------------------------------


def fit_olss(
    recording: TeacherRecording,
    num_steps: int,
    *,
    search: str = "best",
    refit: str = "rollout",
    basis: str = "eps",
    denoise: Callable[[Tensor, float], Tensor] | None = None,
    summary: TrajectorySummary | None = None,
    path: Sequence[int] | None = None,
    chunk_size: int = 256,
) -> OLSSFit:
    """Search a path (``search``: ``greedy`` / ``uniform`` / ``dp``, ``best`` of the three by
    endpoint error after the refit, or a given ``path``), then fit
    the coefficients on it: ``refit="teacher"`` (the paper) or ``"rollout"`` (on the sampler's own
    points; needs ``denoise``, the model as ``(x, t) -> denoised`` for all recorded samples in
    order, called in chunks of ``chunk_size``)."""
    if search == "best" and path is None:
        summary = summary if summary is not None else recording.summary(basis)
        options = {"refit": refit, "basis": basis, "denoise": denoise, "summary": summary}
        fits = [
            fit_olss(recording, num_steps, search=name, chunk_size=chunk_size, **options)
            for name in PATH_SEARCHES
        ]
        return best_of(fits)
    if search not in PATH_SEARCHES and path is None:
        raise ValueError(f"search must be one of {PATH_SEARCHES} or 'best', got {search!r}")
    if refit not in REFITS:
        raise ValueError(f"refit must be one of {REFITS}, got {refit!r}")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if refit == "rollout" and denoise is None:
        raise ValueError("refit='rollout' needs the model (denoise=...) to evaluate its own points")
    start = time.perf_counter()
    summary = summary if summary is not None else recording.summary(basis)
    if summary.basis != basis:
        raise ValueError(f"the summary is in basis {summary.basis!r}, not {basis!r}")
    bound = None
    if path is not None:
        chosen = _check_path(path, summary.num_steps)
        search = "given"
    elif search == "greedy":
        chosen, bound = greedy_path(summary, num_steps)
    elif search == "uniform":
        chosen = uniform_path(summary.num_steps, num_steps)
    else:
        chosen, _ = dp_path(summary, num_steps)
    schedule = StepSchedule(
        recording.times[list(chosen)], recording.noise, {"spacing": f"olss_{search}"}
    )
    rows, forced_errors = teacher_forced_fit(summary, chosen)
    errors = forced_errors
    if refit == "rollout":
        assert denoise is not None
        x_T = recording.points([0])[0]
        targets = recording.points(chosen[1:])
        rows, errors = rollout_fit(_chunked(denoise, chunk_size), x_T, targets, schedule, basis)
    metadata = {"path": list(chosen), "search": search, "refit": refit}
    coefficients = OLSSCoefficients(schedule, tuple(rows), basis, metadata)
    return OLSSFit(
        chosen,
        coefficients,
        tuple(errors),
        search,
        refit,
        bound,
        time.perf_counter() - start,
        tuple(forced_errors),
    )


def _chunked(
    denoise: Callable[[Tensor, float], Tensor], chunk_size: int
) -> Callable[[Tensor, float], Tensor]:
    def call(x: Tensor, t: float) -> Tensor:
        return torch.cat([denoise(part, t) for part in x.split(int(chunk_size))])

    return call
