"""Dynamic-programming step schedules: GITS (Chen et al., ICML 2024, arXiv 2405.11326, "On the
Trajectory Regularity of ODE-based Diffusion Sampling", Sec. 5) and OSS (Pei, Hu & Gu 2025,
"Optimal Stepsize for Diffusion Sampling").

Both pick a ``K``-step schedule as a monotone path through a fine *grid* of ``G`` times
``g_0 > g_1 > ... > g_{G-1}`` (default 100 logSNR-uniform points ending at clean data):

1. **Teacher.** A converged solve along the grid from ``N`` seeded noises records, at every grid
   point ``n``, the sample ``X_n`` and the model's estimate ``D_n = denoise(X_n, g_n)``
   (:func:`record_grid_teacher`, cached by model identity, noise, seeds, grid and teacher solver).
2. **Costs.** ``cost(i -> j)`` is the deviation of *one step of the solver that will run the path*
   from grid point ``i`` to ``j``, started on the teacher (``X_i``, ``D_i``), from the teacher's
   ``X_j``. Multistep solvers (DPM-Solver++(2M), UniPC) use history: their step out of ``i`` also
   reads the previous path point ``p`` (its ``D_p``, and for UniPC's corrector ``X_p``), taken from
   the teacher as well, so their cost is ``cost(p, i -> j)`` and the DP runs over *pairs*
   ``(p, i)``. The step is the solver's own: every supported solver's update is linear in the
   tensors it is given, with coefficients that are float64 expressions of the noise levels
   (:func:`step_coefficients`). They are evaluated in closed form for all index tuples at once
   (:mod:`stepsearch.search.dp_coefficients`, milliseconds) and equal, bitwise on the tested grids
   and to 1e-12 by test, what ``solver.step`` gives on one-hot inputs (``method="one_hot"``, the
   reference: a minute per multistep table on a 100-point grid). REFERENCES.md measured why the
   cost must be the running solver's own step: DDIM costs run by 2M gave a worse schedule than the
   baseline at NFE 5.
3. **DP.** The exact minimum of ``sum_m w_m cost_m`` over monotone paths from ``g_0`` to
   ``g_{G-1}`` with exactly ``K`` steps (:func:`best_path`); GITS' cost coefficient makes
   ``w_m = coeff^m`` (GITS' recursion ``V_j(k) = cost(j, i) + coeff V_i(k - 1)``: later steps weigh
   ``coeff`` times more per step). The step index ``m`` is a DP layer, so position-dependent rules
   (warm-up, ``lower_order_final``) and weights stay exact.
4. **OSS** (``per_sample=True``): one DP per teacher trajectory, then the median grid index of every
   path position (Pei et al. use Euler on flow-matching models; here any supported solver and any
   noise schedule).

Approximations (documented, tested where they matter):

- Teacher forcing: every step starts on the teacher, as in GITS/OSS; the summed one-step deviations
  are a proxy for the final error, not the final error.
- History depth is at most one previous point. A third-order multistep step (DPM-Solver++(3M),
  UniPC-3) is costed as the same solver's second-order step, and UniPC's corrector as UniC-1 (the
  corrector of a warm-up step). The layer's order otherwise follows the solver's own rule
  (``solver.step_order(m, K)``: first-order first step, ``lower_order_final``).
- Solvers that evaluate the model between grid points (singlestep DPM-Solver, Heun, PNDM's
  Runge-Kutta warm-up) would need new model calls for every candidate step; they are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.cache import TensorCache
from stepsearch.models.source import SampleSource
from stepsearch.models.trajectories import DEFAULT_TEACHER, record_trajectories, teacher_key
from stepsearch.noise import NoiseSchedule
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.search.dp_coefficients import closed_form_coefficients, has_closed_form
from stepsearch.solvers import (
    DDIM,
    DPMSolver,
    DPMSolverPP,
    Euler,
    UniPC,
    get_solver,
    solver_to_json,
)
from stepsearch.solvers.base import Solver, StepInfo, noise_levels

__all__ = [
    "COEFFICIENT_METHODS",
    "GITS_COEFF",
    "REDUCTIONS",
    "DynamicResult",
    "GridTeacher",
    "LayerRule",
    "StepCosts",
    "best_path",
    "dynamic_schedule",
    "fine_grid",
    "layer_rules",
    "median_path",
    "path_cost",
    "record_grid_teacher",
    "step_coefficients",
]

REDUCTIONS = ("rms", "median")
"""How per-sample deviations reduce to one cost: ``rms`` over all samples and elements (GITS' mean
squared deviation), ``median`` of the per-sample RMS (robust to trajectories that change mode)."""

GITS_COEFF = 1.15
"""GITS' default cost coefficient (zju-pi/diff-sampler gits-main, ``--coeff``): with ``coeff > 1``
later steps weigh more. Measured on a 4-component Gaussian mixture (tests): at NFE 4-8 it beat
``coeff = 1`` for DDIM, DPM-Solver++(2M) and UniPC on held-out trajectory error in 11 of 12 cases."""

ProgressHook = Callable[[str], None]

_PER_SAMPLE_CHUNK = 8
"""Trajectories whose per-sample cost tables are held at once (OSS): a pair table is ``G^3``."""


# ------------------------------------------------------------------------------------------------
# grid and teacher
# ------------------------------------------------------------------------------------------------


def fine_grid(
    noise: NoiseSchedule, num_points: int = 100, spacing: str = "logsnr_uniform"
) -> StepSchedule:
    """The DP grid: ``num_points`` times (``num_points - 1`` steps of ``spacing``), from the
    noise schedule's ``t_max`` down to clean data."""
    if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 3:
        raise ValueError(f"a DP grid needs at least 3 points, got {num_points!r}")
    return make_schedule(noise, int(num_points) - 1, spacing)


@dataclass(frozen=True, eq=False)
class GridTeacher:
    """Teacher trajectories on a grid: ``x[n]`` the samples at ``grid.times[n]`` (``x[G-1]`` the
    final samples), ``denoised[n]`` the model's ``x0`` estimate at ``x[n]`` (``n < G - 1``); both
    float64, shape ``(G or G-1, N, *sample_shape)``, sample ``k`` from seed ``seed``'s noise ``k``."""

    grid: StepSchedule
    x: Tensor
    denoised: Tensor
    seed: int
    solver: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = len(self.grid)
        if self.x.shape[0] != size or self.denoised.shape[0] != size - 1:
            raise ValueError(
                f"teacher of {tuple(self.x.shape)} / {tuple(self.denoised.shape)} does not fit a "
                f"grid of {size} points"
            )

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[1])

    def subset(self, indices: Sequence[int] | slice) -> GridTeacher:
        """The same teacher restricted to some samples."""
        return replace(self, x=self.x[:, indices], denoised=self.denoised[:, indices])


def record_grid_teacher(
    source: SampleSource,
    grid: StepSchedule,
    *,
    num_samples: int = 256,
    seed: int = 0,
    solver: str | Solver = DEFAULT_TEACHER.solver,
    cache: TensorCache | None = None,
    chunk_size: int = 256,
    progress: bool = False,
) -> GridTeacher:
    """Solve along ``grid`` with ``solver`` from samples ``0 .. num_samples - 1`` of ``seed`` and
    record ``X_n`` and ``D_n`` at every grid point (the one recorder,
    :func:`~stepsearch.models.trajectories.record_trajectories`).

    Cached in ``cache`` (default :meth:`TensorCache.default`) under the model identity, the noise
    schedule, the grid, the teacher solver, the seed and the sample count.
    """
    teacher_solver = get_solver(solver) if isinstance(solver, str) else solver
    if grid.noise != source.noise:
        raise ValueError("the grid lives on another noise schedule than the model")
    times = teacher_solver.evaluation_times(grid)
    if times.size != grid.num_steps or not np.array_equal(times, grid.times[:-1]):
        raise ValueError(
            f"the teacher solver {teacher_solver.name} must evaluate once per grid point "
            "(a multistep or first-order solver)"
        )
    if isinstance(num_samples, bool) or int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    described = solver_to_json(teacher_solver)
    key = teacher_key(source, described, seed, num_samples, grid=[float(t) for t in grid.times])
    recorded = record_trajectories(
        source,
        grid,
        int(num_samples),
        seed=int(seed),
        solver=teacher_solver,
        keep="trajectory",
        cache=cache,
        cache_kind="dp-teacher",
        cache_key=key,
        chunk_size=chunk_size,
        progress="teacher on the DP grid" if progress else False,
    )
    return GridTeacher(grid, recorded.x, recorded.denoised, int(seed), described)


# ------------------------------------------------------------------------------------------------
# how each DP layer is costed
# ------------------------------------------------------------------------------------------------

_HISTORY_FREE = (DDIM, Euler)


@dataclass(frozen=True)
class LayerRule:
    """How step ``m`` of a ``K``-step path is costed: with ``depth`` 0 by one step of ``probe``
    on the schedule ``[g_i, g_j]`` (``cost(i, j)``), with ``depth`` 1 by the second step of
    ``probe`` on ``[g_p, g_i, g_j]`` (``cost(p, i, j)``); ``probe`` is the run solver itself, or
    a variant of it whose ``lower_order_final`` makes that step use the layer's order."""

    depth: int
    probe: Solver

    @property
    def key(self) -> tuple[int, Solver]:
        return (self.depth, self.probe)


def _check_supported(solver: Solver) -> None:
    if isinstance(solver, DDIM) and solver.stochastic:
        raise ValueError("DP schedules need a deterministic solver (DDIM with eta = 0)")
    if isinstance(solver, (*_HISTORY_FREE, DPMSolverPP, UniPC)):
        return
    if isinstance(solver, DPMSolver) and solver.order == 1:
        return
    raise ValueError(
        f"solver {solver.name} is not supported by the DP search: its steps evaluate the model "
        "between grid points (or use deeper history); use ddim, euler, dpm_solver_1, "
        "dpm_solver_pp_2m/3m or unipc_bh1/bh2"
    )


def layer_rules(solver: Solver, num_steps: int) -> list[LayerRule]:
    """One :class:`LayerRule` per step of a ``num_steps``-step path run by ``solver`` (module
    docstring: orders follow ``solver.step_order``, capped at 2)."""
    _check_supported(solver)
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not isinstance(solver, (DPMSolverPP, UniPC)):
        return [LayerRule(0, solver)] * int(num_steps)
    config = {**solver.config(), "lower_order_final_below": None}
    second_order = get_solver(solver.name, **{**config, "lower_order_final": False})
    first_order = get_solver(solver.name, **{**config, "lower_order_final": True})
    rules = [LayerRule(0, solver)]
    for m in range(1, int(num_steps)):
        order = min(solver.step_order(m, int(num_steps)), 2)
        if order >= 2:
            rules.append(LayerRule(1, second_order))
        elif isinstance(solver, UniPC):
            rules.append(LayerRule(1, first_order))  # the corrector reads the previous point
        else:
            rules.append(LayerRule(0, solver))  # DPM-Solver++'s first-order step: no history
    return rules


COEFFICIENT_METHODS = ("closed_form", "one_hot")
"""How :func:`step_coefficients` computes a table: in closed form for all index tuples at once
(the default), or by calling ``solver.step`` on one-hot inputs (the reference)."""


def step_coefficients(
    rule: LayerRule,
    grid: StepSchedule,
    progress: ProgressHook | None = None,
    *,
    method: str = "closed_form",
) -> np.ndarray:
    """The linear coefficients of one solver step between grid points (float64, on the CPU).

    Depth 0: ``coef[i, j] = (c_x, c_d)`` with ``x_j = c_x X_i + c_d D_i``; depth 1:
    ``coef[p, i, j] = (c_xp, c_dp, c_xi, c_di)`` for ``x_j = c_xp X_p + c_dp D_p + c_xi X_i +
    c_di D_i``. Entries of non-monotone index triples are NaN.

    ``method="closed_form"``: :func:`~stepsearch.search.dp_coefficients.closed_form_coefficients`
    (every supported solver; a rule without a closed form falls back to one-hot probing).
    ``method="one_hot"``: the solver's own ``step`` on one-hot float64 inputs, so the outputs are
    exactly the coefficients it applies to real tensors; the state for target ``j`` is the state
    for target ``i + 1`` with the target's noise levels swapped in (:func:`_retarget`), one
    ``solver.step`` per index tuple.
    """
    if method not in COEFFICIENT_METHODS:
        raise ValueError(f"method must be one of {COEFFICIENT_METHODS}, got {method!r}")
    if method == "closed_form" and has_closed_form(rule.probe, rule.depth):
        return closed_form_coefficients(rule.probe, rule.depth, grid)
    return _one_hot_coefficients(rule, grid, progress)


def _one_hot_coefficients(
    rule: LayerRule, grid: StepSchedule, progress: ProgressHook | None
) -> np.ndarray:
    """:func:`step_coefficients` by ``solver.step`` on one-hot inputs."""
    times = grid.times
    size = times.size
    levels = noise_levels(grid.noise, times)
    solver = rule.probe
    depth = rule.depth
    basis = torch.eye(2 * (depth + 1), dtype=torch.float64)
    coef = np.full((size,) * (depth + 2) + (2 * (depth + 1),), np.nan)
    for p in range(size - 1 - depth):
        if progress is not None and depth == 1:
            progress(f"coefficients {solver.name}: {p + 1}/{size - 2}")
        starts = [p] if depth == 0 else range(p + 1, size - 1)
        for i in starts:
            points = (i,) if depth == 0 else (p, i)
            state = solver.init(basis[0], StepSchedule(times[[*points, i + 1]], grid.noise))
            if depth == 1:
                _, state = solver.step(state, basis[0], basis[1], 0)
            x_i, d_i = basis[-2], basis[-1]
            for j in range(i + 1, size):
                target = _retarget(state, levels, (*points, j))
                x_next, _ = solver.step(target, x_i, d_i, depth)
                coef[(*points, j)] = x_next.numpy()
    return coef


def _retarget(state: Any, levels: tuple, points: tuple[int, ...]) -> Any:
    """``state`` (made for the schedule ``[..., g_i, g_{i+1}]``) with its last time moved to grid
    point ``points[-1]``: the plan and the noise levels the step reads are replaced; the schedule
    object keeps its step count (all a step reads from it)."""
    grid_levels = tuple(levels[k] for k in points)
    times = [level.t for level in grid_levels]
    plan = tuple(StepInfo(times[k], k, 0, times[k + 1]) for k in range(len(times) - 1))
    return replace(state, plan=plan, grid_levels=grid_levels, evaluation_levels=grid_levels[:-1])


# ------------------------------------------------------------------------------------------------
# costs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepCosts:
    """Cost tables of one teacher and one solver: ``tables[rule.key]`` is ``(G, G)`` (depth 0) or
    ``(G, G, G)`` (depth 1), ``+inf`` where the indices are not increasing."""

    teacher: GridTeacher
    tables: dict[tuple[int, Solver], np.ndarray]
    reduction: str


def _coefficients_cached(
    rule: LayerRule, grid: StepSchedule, cache: TensorCache, progress: ProgressHook | None
) -> np.ndarray:
    key = {
        "noise": grid.noise.to_config(),
        "grid": [float(t) for t in grid.times],
        "solver": solver_to_json(rule.probe),
        "depth": rule.depth,
    }
    stored = cache.load_or_compute(
        "dp-coefficients",
        key,
        lambda: {"coef": torch.from_numpy(step_coefficients(rule, grid, progress))},
    )
    return stored["coef"].numpy()


def _vectors(teacher: GridTeacher) -> Tensor:
    """Rows ``X_0 .. X_{G-1}, D_0 .. D_{G-2}`` as ``(2G - 1, N, M)`` float64."""
    size, count = teacher.x.shape[0], teacher.num_samples
    x = teacher.x.reshape(size, count, -1)
    d = teacher.denoised.reshape(size - 1, count, -1)
    return torch.cat([x, d]).double()


def _term_indices(depth: int, size: int, points: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """Row indices (into :func:`_vectors`) of the coefficient terms, then of ``X_j``."""
    if depth == 0:
        i, j = points
        return [i, size + i, j]
    p, i, j = points
    return [p, size + p, i, size + i, j]


def _cost_table(
    coef: np.ndarray, vectors: Tensor, depth: int, reduction: str, per_sample: bool
) -> np.ndarray:
    """Reduce ``|| sum_a c_a V_a - X_j ||`` over samples for every valid index tuple."""
    size = coef.shape[0]
    valid = ~np.isnan(coef[..., 0])
    points = np.nonzero(valid)
    weights = np.concatenate([coef[points], -np.ones((len(points[0]), 1))], axis=1)
    rows = _term_indices(depth, size, points)
    count, dim = vectors.shape[1], vectors.shape[2]
    shape = coef.shape[:-1] if not per_sample else (count, *coef.shape[:-1])
    table = np.full(shape, np.inf)
    if reduction == "rms" and not per_sample:
        flat = vectors.reshape(vectors.shape[0], -1)
        gram = (flat @ flat.T).numpy() / (count * dim)
        total = np.zeros(len(points[0]))
        for a, rows_a in enumerate(rows):
            for b, rows_b in enumerate(rows):
                total += weights[:, a] * weights[:, b] * gram[rows_a, rows_b]
        table[points] = np.sqrt(np.maximum(total, 0.0))
        return table
    per_sample_errors = _per_sample_errors(vectors, rows, weights)  # (T, N)
    if per_sample:
        table[(slice(None), *points)] = per_sample_errors.T
    elif reduction == "median":
        table[points] = np.median(per_sample_errors, axis=1)
    else:
        table[points] = np.sqrt(np.mean(per_sample_errors**2, axis=1))
    return table


def _per_sample_errors(
    vectors: Tensor, rows: list[np.ndarray], weights: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Per-sample RMS of ``sum_a w_a V_{rows_a}`` for each of ``T`` index tuples: ``(T, N)``."""
    total = len(rows[0])
    out = np.empty((total, vectors.shape[1]))
    weights_t = torch.from_numpy(weights)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        residual = torch.zeros(
            (stop - start, vectors.shape[1], vectors.shape[2]), dtype=torch.float64
        )
        for a, rows_a in enumerate(rows):
            index = torch.from_numpy(rows_a[start:stop])
            residual += weights_t[start:stop, a, None, None] * vectors[index]
        out[start:stop] = residual.square().mean(dim=2).sqrt().numpy()
    return out


def step_costs(
    teacher: GridTeacher,
    rules: Sequence[LayerRule],
    *,
    reduction: str = "rms",
    per_sample: bool = False,
    cache: TensorCache | None = None,
    progress: ProgressHook | None = None,
) -> StepCosts:
    """Cost tables for the distinct rules in ``rules`` (``per_sample``: one table per teacher
    sample, leading axis ``N``, for OSS)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cache = cache if cache is not None else TensorCache.default()
    vectors = _vectors(teacher)
    tables: dict[tuple[int, Solver], np.ndarray] = {}
    for rule in rules:
        if rule.key in tables:
            continue
        coef = _coefficients_cached(rule, teacher.grid, cache, progress)
        if progress is not None:
            progress(f"costs {rule.probe.name} depth {rule.depth}")
        tables[rule.key] = _cost_table(coef, vectors, rule.depth, reduction, per_sample)
    return StepCosts(teacher, tables, reduction)


# ------------------------------------------------------------------------------------------------
# dynamic programming
# ------------------------------------------------------------------------------------------------


def best_path(
    layer_costs: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> tuple[list[int], float]:
    """The exact minimum of ``sum_m weights[m] * cost_m`` over grid paths ``0 = a_0 < a_1 < ...
    < a_K = G - 1`` with ``K = len(layer_costs)`` steps.

    ``layer_costs[m]`` is ``(G, G)`` (``cost(a_m, a_{m+1})``) or ``(G, G, G)``
    (``cost(a_{m-1}, a_m, a_{m+1})``; not allowed for ``m = 0``); ``+inf`` marks forbidden steps.
    The DP state after step ``m`` is the pair ``(a_m, a_{m+1})``: ``V_m[i, j] = min_p V_{m-1}[p, i]
    + w_m cost_m(p, i, j)``, ``O(K G^3)``. Returns the path and its weighted cost (``inf`` when no
    path of that length exists).
    """
    count = len(layer_costs)
    if count < 1:
        raise ValueError("need at least one layer")
    size = layer_costs[0].shape[-1]
    if layer_costs[0].ndim != 2:
        raise ValueError("the first step has no previous point: its cost table must be (G, G)")
    if count > size - 1:
        raise ValueError(f"{count} steps do not fit a grid of {size} points")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError("need one weight per layer")
    value = np.full((size, size), np.inf)
    value[0, :] = weights[0] * layer_costs[0][0, :]
    back: list[np.ndarray] = []
    with np.errstate(invalid="ignore"):
        for m in range(1, count):
            table = layer_costs[m]
            if table.ndim == 2:
                best_prev = value.min(axis=0)  # over p, for each i
                argmin = value.argmin(axis=0)
                candidate = best_prev[:, None] + weights[m] * table
                value = candidate
                back.append(np.broadcast_to(argmin[:, None], (size, size)))
            else:
                total = value[:, :, None] + weights[m] * table  # (p, i, j)
                argmin = total.argmin(axis=0)
                value = np.take_along_axis(total, argmin[None], axis=0)[0]
                back.append(argmin)
    last = size - 1
    if count == 1:
        return [0, last], float(value[0, last])
    previous = int(value[:, last].argmin())
    cost = float(value[previous, last])
    path = [last, previous]
    for m in range(count - 1, 0, -1):
        current, following = path[-1], path[-2]
        path.append(int(back[m - 1][current, following]))
    path.reverse()
    return path, cost


def path_cost(
    path: Sequence[int], layer_costs: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> float:
    """``sum_m w_m cost_m`` of one path (what :func:`best_path` minimises)."""
    weights = [1.0] * len(layer_costs) if weights is None else weights
    total = 0.0
    for m, table in enumerate(layer_costs):
        index = (path[m], path[m + 1]) if table.ndim == 2 else (path[m - 1], path[m], path[m + 1])
        total += float(weights[m]) * float(table[index])
    return total


def median_path(paths: np.ndarray, size: int) -> list[int]:
    """OSS' aggregate of per-sample paths: the median grid index of every position (rounded),
    made strictly increasing with ends ``0`` and ``size - 1``."""
    medians = np.round(np.median(np.asarray(paths), axis=0)).astype(int).tolist()
    steps = len(medians) - 1
    medians[0], medians[-1] = 0, size - 1
    for k in range(1, steps):  # keep room for the remaining points on both sides
        medians[k] = min(max(medians[k], medians[k - 1] + 1), size - 1 - (steps - k))
    return medians


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DynamicResult:
    """A DP schedule: ``schedule`` (the grid times of ``path``), its predicted cost, the
    per-step costs along the path, and the settings that produced it."""

    schedule: StepSchedule
    path: list[int]
    cost: float
    step_costs: list[float]
    settings: dict[str, Any]
    seconds: float


def dynamic_schedule(
    teacher: GridTeacher,
    solver: str | Solver,
    num_steps: int,
    *,
    coeff: float = GITS_COEFF,
    reduction: str = "rms",
    per_sample: bool = False,
    cache: TensorCache | None = None,
    progress: ProgressHook | None = None,
) -> DynamicResult:
    """The best ``num_steps``-step grid path for ``solver`` on ``teacher`` (module docstring):
    GITS with ``coeff`` (``w_m = coeff^m``), OSS with ``per_sample=True`` (one DP per teacher
    sample, median indices)."""
    start = time.perf_counter()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    if not coeff > 0:
        raise ValueError(f"coeff must be positive, got {coeff!r}")
    rules = layer_rules(run_solver, num_steps)
    weights = [float(coeff) ** m for m in range(num_steps)]
    size = len(teacher.grid)
    options = {"reduction": reduction, "cache": cache, "progress": progress}
    if per_sample:
        paths = []
        for first in range(0, teacher.num_samples, _PER_SAMPLE_CHUNK):
            chunk = teacher.subset(slice(first, first + _PER_SAMPLE_CHUNK))
            tables = step_costs(chunk, rules, per_sample=True, **options).tables
            for k in range(chunk.num_samples):
                paths.append(best_path([tables[rule.key][k] for rule in rules], weights)[0])
        path = median_path(np.asarray(paths), size)
        pooled = step_costs(teacher, rules, **options).tables
        layers = [pooled[rule.key] for rule in rules]
        cost = path_cost(path, layers, weights)
    else:
        tables = step_costs(teacher, rules, **options).tables
        layers = [tables[rule.key] for rule in rules]
        path, cost = best_path(layers, weights)
    per_step = _per_step_costs(path, layers)
    schedule = StepSchedule(
        teacher.grid.times[path],
        teacher.grid.noise,
        {"spacing": "dp_per_sample" if per_sample else "dp", "grid_indices": path},
    )
    settings = {
        "solver": solver_to_json(run_solver),
        "num_steps": int(num_steps),
        "grid_points": size,
        "grid": {
            "spacing": teacher.grid.metadata.get("spacing"),
            "times": teacher.grid.times.tolist(),
        },
        "teacher": {**teacher.solver, "seed": teacher.seed, "num_samples": teacher.num_samples},
        "coeff": float(coeff),
        "reduction": reduction,
        "per_sample": bool(per_sample),
    }
    return DynamicResult(schedule, path, cost, per_step, settings, time.perf_counter() - start)


def _per_step_costs(path: Sequence[int], layers: Sequence[np.ndarray]) -> list[float]:
    out = []
    for m, table in enumerate(layers):
        index = (path[m], path[m + 1]) if table.ndim == 2 else (path[m - 1], path[m], path[m + 1])
        out.append(float(table[index]))
    return out
