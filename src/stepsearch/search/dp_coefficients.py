"""The DP search's solver-coefficient tables in closed form, for every grid index tuple at once.

A DP cost (:mod:`stepsearch.search.dynamic`) needs the coefficients of one solver step between grid
points: ``x_j = c_x X_i + c_d D_i`` (depth 0) or ``x_j = c_xp X_p + c_dp D_p + c_xi X_i + c_di D_i``
(depth 1: the step out of ``i`` also reads the previous point ``p``). The reference way reads them
off the solver by calling ``solver.step`` on one-hot inputs, once per index tuple (161,700 calls
for a multistep solver on a 100-point grid: about a minute on an idle core). The step is linear in
its tensors and its coefficients are a few float64 expressions of the noise levels, so here they are
written out for the solvers the DP supports and evaluated with numpy on all index tuples at once
(float64 on the CPU, whatever device the model runs on), in milliseconds.

Each expression follows the floating-point operations of the solver's own step on one-hot inputs
(the same products, quotients and ``math.expm1`` values, in the same order), so the tables equal the
one-hot tables bitwise in practice; ``tests/test_dp_coefficients.py`` holds them to 1e-12 (relative)
against ``solver.step`` for every supported solver and option on several noise schedules, which is
what guards these lines against drifting from the solvers.

Formulas (``h = lambda_j - lambda_i``; the solvers' docstrings cite the papers):

- first order (DDIM, Euler, DPM-Solver-1, DPM-Solver++'s first-order steps, UniP-1):
  ``c_x = sigma_j / sigma_i``, ``c_d = -alpha_j expm1(-h)``;
- DPM-Solver++(2M) with ``r_0 = (lambda_i - lambda_p) / h``: ``c_xi = sigma_j / sigma_i``,
  ``c_di = -alpha_j expm1(-h) (1 + 1/(2 r_0))``, ``c_dp = -alpha_j expm1(-h) (-1/(2 r_0))``;
- UniPC: UniC-1 corrects the predicted ``x_i`` from ``X_p`` (``c_xi = 0``: the corrected sample
  replaces it), then UniP-1 or UniP-2 (``rho = 1/2``) steps to ``j``;
- a step to clean data (``sigma_j = 0``) returns ``D_i``.
"""

from __future__ import annotations

import math

import numpy as np

from stepsearch.schedule import StepSchedule
from stepsearch.solvers import DDIM, DPMSolver, DPMSolverPP, Euler, UniPC
from stepsearch.solvers.base import Solver, noise_levels

__all__ = ["closed_form_coefficients", "has_closed_form"]


def has_closed_form(probe: Solver, depth: int) -> bool:
    """Whether :func:`closed_form_coefficients` covers one step of ``probe`` at ``depth``."""
    if isinstance(probe, DDIM):
        return depth == 0 and not probe.stochastic
    if isinstance(probe, Euler) or (isinstance(probe, DPMSolver) and probe.order == 1):
        return depth == 0
    if isinstance(probe, (DPMSolverPP, UniPC)):
        return depth == 0 or (depth == 1 and probe.step_order(1, 2) <= 2)
    return False


def closed_form_coefficients(probe: Solver, depth: int, grid: StepSchedule) -> np.ndarray:
    """The coefficient table of one step of ``probe`` between points of ``grid``, in the layout of
    :func:`stepsearch.search.dynamic.step_coefficients`: depth 0 ``coef[i, j] = (c_x, c_d)``,
    depth 1 ``coef[p, i, j] = (c_xp, c_dp, c_xi, c_di)``, NaN where the indices do not increase.

    At depth 0 the step is the first step of ``probe`` on ``[g_i, g_j]``; at depth 1 the second
    step on ``[g_p, g_i, g_j]`` (its order ``probe.step_order(1, 2)``, first order to clean data).

    Raises:
        ValueError: a solver or depth without a closed form here (see :func:`has_closed_form`).
    """
    if not has_closed_form(probe, depth):
        raise ValueError(f"no closed-form DP coefficients for {probe.name} at depth {depth}")
    levels = _Levels.of(grid)
    size = levels.alpha.size
    if depth == 0:
        i, j = np.nonzero(np.triu(np.ones((size, size), dtype=bool), 1))
        coef = np.full((size, size, 2), np.nan)
        coef[i, j] = np.stack(levels.first_order(i, j), axis=1)
        return coef
    p, i, j = np.nonzero(_increasing_triples(size))
    order = probe.step_order(1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):  # steps to clean data: h = inf
        if isinstance(probe, UniPC):
            columns = _unipc_pair(levels, p, i, j, probe.variant, order)
        else:
            columns = _dpm_solver_pp_pair(levels, p, i, j, order)
    coef = np.full((size, size, size, 4), np.nan)
    coef[p, i, j] = np.stack(columns, axis=1)
    return coef


class _Levels:
    """``alpha``, ``sigma``, ``lambda`` of the grid (the floats the solvers' states hold) and the
    table ``expm1(-(lambda_j - lambda_i))`` over grid pairs ``i < j`` (``math.expm1``, as the
    solvers compute it)."""

    def __init__(self, alpha: np.ndarray, sigma: np.ndarray, lambda_: np.ndarray):
        self.alpha, self.sigma, self.lambda_ = alpha, sigma, lambda_
        self.clean = sigma == 0.0
        size = alpha.size
        self.expm1_neg_h = np.full((size, size), np.nan)
        for i in range(size - 1):
            h = lambda_[i + 1 :] - lambda_[i]
            self.expm1_neg_h[i, i + 1 :] = [math.expm1(-value) for value in h.tolist()]

    @classmethod
    def of(cls, grid: StepSchedule) -> _Levels:
        levels = noise_levels(grid.noise, grid.times)
        return cls(
            np.array([level.alpha for level in levels]),
            np.array([level.sigma for level in levels]),
            np.array([level.lambda_ for level in levels]),
        )

    def first_order(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(c_x, c_d)`` of the first-order step ``i -> j`` (``(0, 1)`` to clean data)."""
        c_x = self.sigma[j] / self.sigma[i]
        c_d = self.alpha[j] * -self.expm1_neg_h[i, j]
        clean = self.clean[j]
        return np.where(clean, 0.0, c_x), np.where(clean, 1.0, c_d)


def _increasing_triples(size: int) -> np.ndarray:
    index = np.arange(size)
    return (index[:, None, None] < index[None, :, None]) & (
        index[None, :, None] < index[None, None]
    )


Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _dpm_solver_pp_pair(
    levels: _Levels, p: np.ndarray, i: np.ndarray, j: np.ndarray, order: int
) -> Columns:
    """The second step of DPM-Solver++ on ``[g_p, g_i, g_j]`` (``dpm_solver_pp_multistep_update``
    with two outputs; order 1: ``first_order_update``)."""
    zero = np.zeros(p.size)
    if order == 1:
        c_x, c_d = levels.first_order(i, j)
        return zero, zero, c_x, c_d
    h = levels.lambda_[j] - levels.lambda_[i]
    r_0 = (levels.lambda_[i] - levels.lambda_[p]) / h
    ratio = levels.sigma[j] / levels.sigma[i]
    scale = levels.alpha[j] * levels.expm1_neg_h[i, j]  # alpha_s phi_1
    c_di = -(scale * (1.0 + 0.5 / r_0))
    c_dp = -(scale * (-0.5 / r_0))
    return _clean_end(levels, j, (zero, c_dp, ratio, c_di))


def _unipc_pair(
    levels: _Levels, p: np.ndarray, i: np.ndarray, j: np.ndarray, variant: str, order: int
) -> Columns:
    """The second step of UniPC on ``[g_p, g_i, g_j]``: UniC-1 on the result of UniP-1 ``p ->
    i`` (``unic_update``: from ``X_p``, the node ``r = 1`` being ``D_i``), then UniP-``order``
    from the corrected sample (``unip_update``)."""
    alpha, sigma, lambda_ = levels.alpha, levels.sigma, levels.lambda_
    zero = np.zeros(p.size)
    # corrector: x_c = (sigma_i/sigma_p) X_p - alpha_i hphi D_p - alpha_i B(h) (D_i - D_p) / 2
    hh = -(lambda_[i] - lambda_[p])
    h_phi_1 = levels.expm1_neg_h[p, i]
    b_h = hh if variant == "bh1" else h_phi_1
    scale_d, scale_b = alpha[i] * h_phi_1, alpha[i] * b_h
    corrected_xp = sigma[i] / sigma[p]
    corrected_dp = -scale_d - scale_b * -0.5
    corrected_di = -(scale_b * 0.5)
    # predictor from the corrected sample, i -> j
    h = lambda_[j] - lambda_[i]
    ratio = sigma[j] / sigma[i]
    h_phi_1 = levels.expm1_neg_h[i, j]
    c_xp = ratio * corrected_xp
    c_dp = ratio * corrected_dp
    c_di = ratio * corrected_di - alpha[j] * h_phi_1
    if order == 2:
        b_h = -h if variant == "bh1" else h_phi_1
        scale_b = alpha[j] * b_h
        r = (lambda_[p] - lambda_[i]) / h
        c_dp = c_dp - scale_b * ((1.0 / r) * 0.5)
        c_di = c_di - scale_b * ((-1.0 / r) * 0.5)
    return _clean_end(levels, j, (c_xp, c_dp, zero, c_di))


def _clean_end(levels: _Levels, j: np.ndarray, columns: Columns) -> Columns:
    """A step to clean data returns ``D_i``: ``(0, 0, 0, 1)`` there."""
    clean = levels.clean[j]
    c_xp, c_dp, c_xi, c_di = (np.where(clean, 0.0, column) for column in columns)
    return c_xp, c_dp, c_xi, np.where(clean, 1.0, c_di)
