"""Solvers against ground truth on the exact Gaussian test bed.

Order tests: the single Gaussian has a closed-form probability-flow ODE solution, so the global error
of every solver at the final grid time is known exactly. Its log-log slope against the largest step
in ``lambda`` must match the solver's order (within 0.3) on a logSNR-uniform, a Karras and a random
non-uniform grid, for discrete VP and EDM (and flow matching for a few solvers). Run with ``-s`` to
see the measured slopes.

Choices that matter (measured, see the module constants):

- Grids end at a small positive time, never at clean data: the final first-order jump to
  ``sigma = 0`` would dominate the error and hide the order.
- The window ends at k-diffusion sigma 0.2, inside the data's transition region (standard
  deviations 0.2-1.4), not at ``t_min``. On a window covering the whole transition the leading
  error terms nearly telescope away on this test bed (for ``D = mu + sqrt(v) z s(lambda)`` with a
  sigmoid-like ``s``, integrals such as ``int s s''' dlambda`` vanish), and third-order methods
  then look fourth/fifth order for 10-80 steps: DPM-Solver-3 on Karras grids measured 4.5-5.1, with
  its error changing sign near 100 steps.
- The "random" grid is a fixed random smooth warp of the logSNR axis (seeded), the same for every
  step count: independent random grids per step count (e.g. sorted random lambdas) make the error
  curve noise-dominated (local slopes from -1 to 18 measured), which tests nothing.
- Multistep solvers warm up with lower orders (as in the papers and diffusers). The first-order
  first step leaves an ``O(h^2)`` error whose constant is proportional to how fast the denoiser
  changes at the start: negligible from pure noise (the windows start at ``t_max``), dominant from
  an intermediate start (``test_multistep_warm_up_limits_order_from_intermediate_noise``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from stepsearch.noise import EDM, DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.sampling import sample
from stepsearch.schedule import (
    StepSchedule,
    diffusers_spacing,
    flow_shifted,
    karras,
    logsnr_uniform,
    make_schedule,
    time_uniform,
)
from stepsearch.solvers import (
    BUILT_IN_SOLVERS,
    NEEDS_DATA,
    SOLVERS,
    DPMSolverPP,
    OLSSSolver,
    Solver,
    StagedState,
    get_solver,
    solver_from_json,
    solver_to_json,
)
from stepsearch.solvers.base import CHECKED_FIELDS, multistep_order
from stepsearch.solvers.pndm import adams_bashforth_coefficients
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

DIM = 8
_RNG = np.random.default_rng(0)
MEAN = _RNG.normal(0.0, 1.0, DIM)
VARIANCE = np.exp(_RNG.uniform(math.log(0.05), math.log(2.0), DIM))  # std 0.22 .. 1.41

NOISES: dict[str, NoiseSchedule] = {
    "discrete_vp": DiscreteVP.from_diffusers_config({}),
    "edm": EDM(),
    "flow": FlowMatching(),
}
END_KDIFFUSION_SIGMA = 0.2
"""The order-test window ends here (inside the data's transition region, see the module doc)."""
FLOW_START = 0.98
"""Flow matching's order windows start below t = 1, where alpha = 0 clamps lambda at -30."""

ONE_STEP = [10, 16, 25, 40]
MODERATE = [20, 32, 50, 80]
MANY = [40, 64, 100, 160]
PNDM_STEPS = [64, 100, 160, 250]  # AB4 in sigma~ reaches its asymptotic slope late (3.7 at 40-160)
NO_LOWER_FINAL = {"lower_order_final": False}
ORDER_CASES: dict[str, tuple[dict, list[int]]] = {
    "ddim": ({}, ONE_STEP),
    "euler": ({}, ONE_STEP),
    "dpm_solver_1": ({}, ONE_STEP),
    "dpm_solver_2": ({}, ONE_STEP),
    "dpm_solver_3": ({}, MODERATE),
    "dpm_solver_pp_2s": ({}, ONE_STEP),
    "heun": ({}, ONE_STEP),
    "dpm_solver_pp_2m": (NO_LOWER_FINAL, MODERATE),
    "dpm_solver_pp_3m": (NO_LOWER_FINAL, MANY),
    "unipc_bh1": (NO_LOWER_FINAL, MODERATE),
    "unipc_bh2": (NO_LOWER_FINAL, MODERATE),
    "pndm": ({}, PNDM_STEPS),
}
EXTRA_SOLVERS = {"unipc_3": ("unipc_bh2", {"order": 3, **NO_LOWER_FINAL}, MANY)}
"""Non-default options with their own order: UniPC-3 (order 4)."""
FLOW_ORDER_SOLVERS = ["ddim", "dpm_solver_2", "dpm_solver_pp_2m", "unipc_bh2", "heun"]
SPACINGS = ["logsnr", "karras", "random"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: thread hand-offs cost more than the maths on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(noise: NoiseSchedule, shape: tuple[int, ...] | None = None) -> GaussianMixture:
    return GaussianMixture.gaussian(MEAN, VARIANCE, noise, shape)


def order_window(noise: NoiseSchedule) -> tuple[float, float]:
    start = FLOW_START if isinstance(noise, FlowMatching) else noise.t_max
    end = float(noise.t_from_kdiffusion_sigma(END_KDIFFUSION_SIGMA))
    return start, end


def random_warp(u: np.ndarray, seed: int = 7) -> np.ndarray:
    """A fixed random monotone map of [0, 1]: step density ``exp(sum_k a_k sin(k pi u))``."""
    rng = np.random.default_rng(seed)
    k = np.arange(1, 5)
    amplitudes = rng.normal(0.0, 0.6, k.size) / k
    grid = np.linspace(0.0, 1.0, 2001)
    density = np.exp((amplitudes * np.sin(np.pi * k * grid[:, None])).sum(1))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return np.interp(u, grid, cumulative / cumulative[-1])


def order_schedule(noise: NoiseSchedule, spacing: str, n: int) -> StepSchedule:
    start, end = order_window(noise)
    if spacing == "logsnr":
        return logsnr_uniform(noise, n, t_start=start, t_end=end, clean_end=False)
    if spacing == "karras":
        sigma_max, sigma_min = (float(noise.kdiffusion_sigma(t)) for t in (start, end))
        return karras(noise, n, sigma_max=sigma_max, sigma_min=sigma_min, clean_end=False)
    lambda_start, lambda_end = float(noise.lambda_(start)), float(noise.lambda_(end))
    lambdas = lambda_start + random_warp(np.linspace(0.0, 1.0, n + 1)) * (lambda_end - lambda_start)
    return StepSchedule(np.asarray(noise.t_from_lambda(lambdas)), noise, {"spacing": "random"})


def convergence(
    solver: Solver, noise: NoiseSchedule, spacing: str, steps: list[int], start: float | None = None
) -> tuple[float, np.ndarray]:
    """Fitted slope of log(RMS error) vs log(max step in lambda), and the errors."""
    data = gaussian(noise)
    first = order_schedule(noise, spacing, steps[0])
    t_start, t_end = float(first.times[0]), float(first.times[-1])
    x_start = data.sample_noisy(16, t_start, torch.Generator().manual_seed(0))
    exact = data.ode_solution(x_start, t_start, t_end)
    errors, largest_steps = [], []
    for n in steps:
        schedule = order_schedule(noise, spacing, n)
        result = sample(data, x_start, schedule, solver).sample
        errors.append(float((result - exact).pow(2).mean().sqrt()))
        largest_steps.append(float(np.diff(schedule.lambdas).max()))
    slope = np.polyfit(np.log(largest_steps), np.log(errors), 1)[0]
    return float(slope), np.array(errors)


def order_test_cases() -> list[tuple[str, str, str]]:
    cases = [
        (name, noise, spacing)
        for name in ORDER_CASES
        for noise in ("discrete_vp", "edm")
        for spacing in SPACINGS
    ]
    cases += [(name, "flow", spacing) for name in FLOW_ORDER_SOLVERS for spacing in SPACINGS]
    cases += [("unipc_3", "edm", spacing) for spacing in SPACINGS]
    return cases


# ------------------------------------------------------------------------------------------------
# convergence order
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "noise_name", "spacing"), order_test_cases())
def test_global_error_falls_at_the_solver_order(name, noise_name, spacing):
    if name in EXTRA_SOLVERS:
        registered, kwargs, steps = EXTRA_SOLVERS[name]
        solver = get_solver(registered, **kwargs)
    else:
        kwargs, steps = ORDER_CASES[name]
        solver = get_solver(name, **kwargs)
    slope, errors = convergence(solver, NOISES[noise_name], spacing, steps)
    print(
        f"\nslope {name:17s} {noise_name:11s} {spacing:7s} {slope:5.2f} (order {solver.order}; "
        f"n {steps[0]}-{steps[-1]}, error {errors[0]:.1e} -> {errors[-1]:.1e})"
    )
    assert np.all(np.diff(errors) < 0), errors
    assert abs(slope - solver.order) <= 0.3


def test_multistep_warm_up_limits_order_from_intermediate_noise():
    """From k-diffusion sigma 2 (img2img-like start) the first-order warm-up step of DPM-Solver++(3M)
    dominates: the global error falls at order 2, not 3 (see the module doc)."""
    noise = NOISES["edm"]
    solver = get_solver("dpm_solver_pp_3m", lower_order_final=False)
    data = gaussian(noise)
    x_start = data.sample_noisy(16, 2.0, torch.Generator().manual_seed(0))
    exact = data.ode_solution(x_start, 2.0, END_KDIFFUSION_SIGMA / 10)
    errors = []
    for n in MODERATE:
        schedule = logsnr_uniform(noise, n, t_start=2.0, t_end=0.02, clean_end=False)
        errors.append(float((sample(data, x_start, schedule, solver).sample - exact).abs().max()))
    slope = np.polyfit(np.log(1.0 / np.array(MODERATE)), np.log(errors), 1)[0]
    print(f"\nslope dpm_solver_pp_3m from sigma 2: {slope:.2f}")
    assert abs(slope - 2.0) <= 0.3


def test_legacy_3m_of_diffusers_is_second_order():
    """dpm-solver's and diffusers' 3M weight the second difference ``D2`` by ``phi_3`` where the
    Taylor term needs ``2 phi_3``; ``legacy_3m=True`` reproduces that and converges at order 2."""
    solver = DPMSolverPP(order=3, lower_order_final=False, legacy_3m=True)
    slope, _ = convergence(solver, NOISES["edm"], "karras", MANY)
    print(f"\nslope legacy 3M edm karras: {slope:.2f}")
    assert abs(slope - 2.0) <= 0.3


# ------------------------------------------------------------------------------------------------
# exactness and identities
# ------------------------------------------------------------------------------------------------


def random_schedule(noise: NoiseSchedule, n: int, seed: int, clean_end: bool) -> StepSchedule:
    """Sorted random times (fixed seed), optionally ending at clean data."""
    rng = np.random.default_rng(seed)
    start, end = (FLOW_START if isinstance(noise, FlowMatching) else noise.t_max), noise.t_min
    lambdas = np.sort(rng.uniform(float(noise.lambda_(start)), float(noise.lambda_(end)), n - 1))
    times = np.concatenate([[start], np.asarray(noise.t_from_lambda(lambdas)), [end]])
    return StepSchedule(np.append(times[:-1], 0.0) if clean_end else times, noise)


@pytest.mark.parametrize("noise_name", list(NOISES))
@pytest.mark.parametrize("clean_end", [False, True])
def test_first_order_solvers_are_identical(noise_name, clean_end):
    """DDIM == DPM-Solver-1 == DPM-Solver++(1) == Euler == UniPC-1 predictor steps (float64)."""
    noise = NOISES[noise_name]
    schedule = random_schedule(noise, 12, seed=3, clean_end=clean_end)
    data = gaussian(noise)
    x_start = data.sample_noisy(8, float(schedule.times[0]), torch.Generator().manual_seed(1))
    reference = sample(data, x_start, schedule, get_solver("ddim")).sample
    for solver in (get_solver("dpm_solver_1"), DPMSolverPP(order=1), get_solver("euler")):
        result = sample(data, x_start, schedule, solver).sample
        torch.testing.assert_close(result, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh1", "pndm"])
def test_first_multistep_step_is_ddim(name):
    noise = NOISES["discrete_vp"]
    schedule = random_schedule(noise, 6, seed=4, clean_end=False)
    data = gaussian(noise)
    x = data.sample_noisy(8, float(schedule.times[0]), torch.Generator().manual_seed(2))
    denoised = data(x, float(schedule.times[0]))
    ddim = get_solver("ddim")
    expected, _ = ddim.step(ddim.init(x, schedule), x, denoised, 0)
    solver = get_solver(name, warmup="lower_order") if name == "pndm" else get_solver(name)
    result, _ = solver.step(solver.init(x, schedule), x, denoised, 0)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise_name", list(NOISES))
@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_every_solver_is_exact_on_point_mass_data(name, noise_name):
    """Data with zero variance: the denoiser is the constant ``mu`` and ``eps`` is constant along
    ODE trajectories, so every consistent update is exact, on any grid, to clean data too."""
    noise = NOISES[noise_name]
    point = GaussianMixture.gaussian(MEAN, np.zeros(DIM), noise)
    schedule = random_schedule(noise, 7, seed=5, clean_end=True)
    x_start = torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = sample(point, x_start, schedule, get_solver(name)).sample
    expected = torch.as_tensor(MEAN).expand(4, DIM)
    torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-11)
    # and at a noisy end time: the affine closed form
    noisy = StepSchedule(schedule.times[:-1], noise)
    result = sample(point, x_start, noisy, get_solver(name)).sample
    exact = point.ode_solution(x_start, float(noisy.times[0]), float(noisy.times[-1]))
    torch.testing.assert_close(result, exact, rtol=1e-11, atol=1e-11)


def test_ddim_converges_to_the_closed_form_ode_solution():
    noise = NOISES["discrete_vp"]
    data = gaussian(noise)
    t_start, t_end = 0.8, 0.01
    x_start = data.sample_noisy(8, t_start, torch.Generator().manual_seed(4))
    exact = data.ode_solution(x_start, t_start, t_end)
    errors = []
    for n in (10, 100, 1000):
        schedule = time_uniform(noise, n, t_start=t_start, t_end=t_end, clean_end=False)
        errors.append(
            float((sample(data, x_start, schedule, get_solver("ddim")).sample - exact).abs().max())
        )
    assert errors[2] < 4e-3  # of a solution of size 2.6
    assert errors[0] / errors[1] == pytest.approx(10.0, rel=0.2)
    assert errors[1] / errors[2] == pytest.approx(10.0, rel=0.05)


class LambdaPolynomialDenoiser:
    """``denoised(x, t) = sum_k c_k lambda_t^k`` (independent of ``x``): the data-prediction ODE
    ``x_s = (sigma_s / sigma_t) x_t + sigma_s int e^lambda denoised dlambda`` is then a quadrature."""

    def __init__(self, noise: NoiseSchedule, coefficients: list[float]):
        self.noise, self.coefficients = noise, coefficients

    def value(self, lambda_: float) -> float:
        return sum(c * lambda_**k for k, c in enumerate(self.coefficients))

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full_like(x, self.value(float(self.noise.lambda_(t))))

    def solution(self, x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        from scipy.integrate import quad

        lam_t, lam_s = float(self.noise.lambda_(t)), float(self.noise.lambda_(s))
        sigma_t, sigma_s = float(self.noise.sigma(t)), float(self.noise.sigma(s))
        integral = quad(lambda lam: math.exp(lam) * self.value(lam), lam_t, lam_s, epsabs=1e-14)[0]
        return sigma_s / sigma_t * x + sigma_s * integral


def test_dpm_solver_pp_3m_step_integrates_a_quadratic_denoiser_exactly():
    """Regression for the third-order term (``2 phi_3 D2``): with exact history the 3M step is exact
    for ``denoised`` quadratic in ``lambda``; the legacy (diffusers) weighting is not."""
    noise = NOISES["edm"]
    schedule = StepSchedule(np.array([40.0, 9.0, 3.0, 0.8]), noise)
    denoiser = LambdaPolynomialDenoiser(noise, [0.3, -0.7, 0.25])
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    errors = {}
    for legacy in (False, True):
        solver = DPMSolverPP(order=3, lower_order_final=False, legacy_3m=legacy)
        state = solver.init(x, schedule)
        for i in range(2):  # warm-up steps fill the history; their result is discarded
            _, state = solver.step(state, x, denoiser(x, schedule.times[i]), i)
        exact_x2 = denoiser.solution(x, schedule.times[0], schedule.times[2])
        result, _ = solver.step(state, exact_x2, denoiser(x, schedule.times[2]), 2)
        exact = denoiser.solution(x, schedule.times[0], schedule.times[3])
        errors[legacy] = float((result - exact).abs().max())
    assert errors[False] < 1e-12
    assert errors[True] > 1e-3


def test_pndm_is_exact_for_cubic_eps_in_kdiffusion_sigma():
    """PRK (RK4 = Simpson for x-independent slopes) and variable-step AB4 are exact when ``eps`` is
    a cubic polynomial of ``sigma~ = sigma / alpha``: ``y_s = y_t + int eps dsigma~``."""
    noise = NOISES["discrete_vp"]
    coefficients = [0.4, -0.3, 0.05, -0.002]

    def eps_of(sigma_k: float) -> float:
        return sum(c * sigma_k**k for k, c in enumerate(coefficients))

    class CubicEps:
        def __init__(self):
            self.noise = noise

        def __call__(self, x, t):
            alpha, sigma = float(noise.alpha(t)), float(noise.sigma(t))
            return (x - sigma * eps_of(sigma / alpha)) / alpha

    schedule = random_schedule(noise, 9, seed=6, clean_end=False)
    x_start = torch.linspace(-2, 2, 7, dtype=torch.float64)
    result = sample(CubicEps(), x_start, schedule, get_solver("pndm")).sample
    t0, t1 = float(schedule.times[0]), float(schedule.times[-1])
    s0, s1 = (float(noise.kdiffusion_sigma(t)) for t in (t0, t1))
    antiderivative = [c / (k + 1) for k, c in enumerate(coefficients)]
    integral = sum(c * (s1 ** (k + 1) - s0 ** (k + 1)) for k, c in enumerate(antiderivative))
    exact = float(noise.alpha(t1)) * (x_start / float(noise.alpha(t0)) + integral)
    torch.testing.assert_close(result, exact, rtol=1e-10, atol=1e-10)
    # uniform steps in sigma~ reproduce PLMS's hard-coded weights
    weights = adams_bashforth_coefficients(np.array([0.0, -1.0, -2.0, -3.0]))
    np.testing.assert_allclose(weights * 24, [55, -59, 37, -9], rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# evaluation plans and NFE
# ------------------------------------------------------------------------------------------------


def expected_nfe(name: str, schedule: StepSchedule) -> int:
    n, clean = schedule.num_steps, schedule.ends_clean
    alpha_zero_start = float(schedule.noise.alpha(schedule.times[0])) == 0.0
    if name in ("dpm_solver_2", "dpm_solver_3", "dpm_solver_pp_2s", "heun"):
        k = 3 if name == "dpm_solver_3" else 2
        single = int(clean) + int(alpha_zero_start and name != "dpm_solver_pp_2s")
        return k * n - (k - 1) * min(single, n)
    if name == "pndm":  # 3 pseudo Runge-Kutta intervals of 4 evaluations
        rk = sum(
            1
            for i in range(min(3, n))
            if not (clean and i == n - 1) and not (alpha_zero_start and i == 0)
        )
        return n + 3 * rk
    return n


NFE_SCHEDULES: dict[str, Callable[[], StepSchedule]] = {
    "vp_clean_10": lambda: time_uniform(NOISES["discrete_vp"], 10),
    "vp_noisy_10": lambda: logsnr_uniform(NOISES["discrete_vp"], 10, clean_end=False),
    "edm_karras_7": lambda: karras(NOISES["edm"], 7),
    "flow_from_1_clean_6": lambda: flow_shifted(NOISES["flow"], 6, shift=3.0),
    "flow_from_1_noisy_3": lambda: time_uniform(NOISES["flow"], 3, clean_end=False),
    "vp_clean_1": lambda: time_uniform(NOISES["discrete_vp"], 1),
    "vp_clean_2": lambda: time_uniform(NOISES["discrete_vp"], 2),
}


class CountingDenoiser:
    def __init__(self, inner):
        self.inner, self.noise, self.calls = inner, inner.noise, []

    def __call__(self, x, t):
        self.calls.append(float(t))
        return self.inner(x, t)


@pytest.mark.parametrize("schedule_name", list(NFE_SCHEDULES))
@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_evaluation_counts_are_exact(name, schedule_name):
    schedule = NFE_SCHEDULES[schedule_name]()
    solver = get_solver(name)
    times = solver.evaluation_times(schedule)
    assert times.dtype == np.float64
    assert times.size == expected_nfe(name, schedule)
    assert solver.nfe(schedule) == times.size
    data = CountingDenoiser(gaussian(schedule.noise))
    x_start = data.inner.sample_noisy(3, float(schedule.times[0]), torch.Generator().manual_seed(0))
    result = sample(data, x_start, schedule, solver)
    assert result.nfe == times.size == len(data.calls)
    np.testing.assert_array_equal(np.array(data.calls), times)
    state = solver.init(x_start, schedule)
    np.testing.assert_array_equal(state.evaluation_times, times)
    # every evaluation lies in its interval; step i lands where evaluation i + 1 happens
    for i, info in enumerate(state.plan):
        low, high = schedule.times[info.interval + 1], schedule.times[info.interval]
        assert low <= info.t <= high and low <= info.t_next <= high
        assert info.on_grid == bool(np.isin(info.t, schedule.times))
        if i + 1 < len(state.plan):
            assert info.t_next == state.plan[i + 1].t
        else:
            assert info.t_next == schedule.times[-1]


def test_singlestep_intermediate_points_sit_at_lambda_fractions():
    noise = NOISES["edm"]
    schedule = karras(noise, 4, clean_end=False)
    lambdas = schedule.lambdas
    for name, fractions in (("dpm_solver_2", [0.5]), ("dpm_solver_3", [1 / 3, 2 / 3])):
        times = get_solver(name).evaluation_times(schedule)
        k = len(fractions) + 1
        for i in range(schedule.num_steps):
            stage_lambdas = np.asarray(noise.lambda_(times[k * i : k * (i + 1)]))
            h = lambdas[i + 1] - lambdas[i]
            np.testing.assert_allclose((stage_lambdas[1:] - lambdas[i]) / h, fractions, rtol=1e-9)


def test_lower_order_final_follows_diffusers():
    orders = [multistep_order(3, i, 10, True) for i in range(10)]
    assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [multistep_order(3, i, 20, True) for i in range(20)][-3:] == [3, 3, 3]
    assert [multistep_order(3, i, 20, True, None) for i in range(20)][-3:] == [3, 2, 1]
    assert [multistep_order(2, i, 10, False) for i in range(10)][-2:] == [2, 2]
    solver = get_solver("dpm_solver_pp_3m")
    assert [solver.step_order(i, 5) for i in range(5)] == [1, 2, 3, 2, 1]
    # lowering the order stabilises few steps and changes the numbers
    noise = NOISES["discrete_vp"]
    schedule = logsnr_uniform(noise, 6)
    data = gaussian(noise)
    x_start = data.sample_noisy(4, 1.0, torch.Generator().manual_seed(0))
    lowered = sample(data, x_start, schedule, solver).sample
    full = sample(data, x_start, schedule, get_solver("dpm_solver_pp_3m", **NO_LOWER_FINAL)).sample
    assert not torch.allclose(lowered, full)


# ------------------------------------------------------------------------------------------------
# immutability, determinism, shapes and dtypes
# ------------------------------------------------------------------------------------------------


class RecordingDenoiser:
    """Keeps clones of every tensor the solver saw, to check nothing was edited afterwards."""

    def __init__(self, inner):
        self.inner, self.noise, self.seen = inner, inner.noise, []

    def __call__(self, x, t):
        denoised = self.inner(x, t)
        self.seen.append((x, x.clone(), denoised, denoised.clone()))
        return denoised


@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_no_in_place_edits_frozen_state_and_repeatable_runs(name):
    noise = NOISES["discrete_vp"]
    schedule = random_schedule(noise, 8, seed=8, clean_end=True)
    data = RecordingDenoiser(gaussian(noise))
    x_start = data.inner.sample_noisy(4, 1.0, torch.Generator().manual_seed(5))
    x_copy = x_start.clone()
    solver = get_solver(name)
    first = sample(data, x_start, schedule, solver).sample
    assert torch.equal(x_start, x_copy)
    for x, x_clone, denoised, denoised_clone in data.seen:
        assert torch.equal(x, x_clone) and torch.equal(denoised, denoised_clone)
    assert torch.equal(sample(data, x_start, schedule, solver).sample, first)
    # two interleaved runs with one solver instance: no hidden counters
    states = [solver.init(x_start, schedule) for _ in range(2)]
    xs = [x_start, x_start * 1.0]
    for i, t in enumerate(states[0].evaluation_times):
        for k in range(2):
            xs[k], states[k] = solver.step(states[k], xs[k], data.inner(xs[k], float(t)), i)
    assert torch.equal(xs[0], first) and torch.equal(xs[1], first)
    state = solver.init(x_start, schedule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.history = ()  # type: ignore[misc]
    with pytest.raises(ValueError):
        state.evaluation_times[0] = 0.5
    with pytest.raises(IndexError):
        solver.step(state, x_start, x_start, len(state.evaluation_times))


@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_steps_share_the_checked_fields_and_evolve_guards_them(name):
    """``step`` builds the next state with ``evolve`` (no re-validation per step): every state of a
    run shares the fields ``init`` checked, and ``evolve`` refuses to change those."""
    noise = NOISES["discrete_vp"]
    schedule = random_schedule(noise, 6, seed=3, clean_end=True)
    data = gaussian(noise)
    solver = get_solver(name)
    x = data.sample_noisy(2, 1.0, torch.Generator().manual_seed(1))
    x, state = solver.start(solver.init(x, schedule), x)
    first = state
    for i, t in enumerate(first.evaluation_times):
        x, state = solver.step(state, x, data(x, float(t)), i)
        assert type(state) is type(first)
        for field in CHECKED_FIELDS:
            assert getattr(state, field) is getattr(first, field), field
    with pytest.raises(ValueError, match="'plan' is not a memory field"):
        first.evolve(plan=())
    with pytest.raises(ValueError, match="'evaluation_levels' is not a memory field"):
        first.evolve(history=(), evaluation_levels=())
    with pytest.raises(ValueError, match="'nonsense' is not a memory field"):
        first.evolve(nonsense=1)
    evolved = first.evolve(history=((0.5, x),))
    assert evolved.history[0][1] is x and evolved is not first
    assert first.history == () and evolved.grid_levels is first.grid_levels


@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_any_tensor_rank_and_dtype(name):
    noise = NOISES["edm"]
    flat = GaussianMixture.random(2, 64, noise, seed=1)
    images = GaussianMixture(flat.weights, flat.means, flat.covariances, noise, shape=(1, 8, 8))
    schedule = karras(noise, 6)
    x_flat = flat.sample_noisy(3, 80.0, torch.Generator().manual_seed(6))
    solver = get_solver(name)
    out_flat = sample(flat, x_flat, schedule, solver).sample
    out_images = sample(images, x_flat.reshape(3, 1, 8, 8), schedule, solver).sample
    assert out_images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out_images.reshape(3, 64), out_flat, rtol=1e-12, atol=1e-12)
    out_single = sample(flat, x_flat.float(), schedule, solver).sample
    assert out_single.dtype == torch.float32
    torch.testing.assert_close(out_single.double(), out_flat, rtol=1e-4, atol=1e-4)
    out_half = sample(flat, x_flat.half(), schedule, solver).sample
    assert out_half.dtype == torch.float16
    torch.testing.assert_close(out_half.double(), out_flat, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# alpha = 0 starts and zero terminal SNR
# ------------------------------------------------------------------------------------------------

ZERO_SNR = DiscreteVP.from_diffusers_config(
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    }
)


def pure_noise_schedules() -> dict[str, StepSchedule]:
    flow, zero_snr = NOISES["flow"], ZERO_SNR
    return {
        "flow_uniform_1": time_uniform(flow, 1),
        "flow_uniform_2": time_uniform(flow, 2),
        "flow_shifted_5": flow_shifted(flow, 5, shift=3.0),
        "flow_logsnr_12": logsnr_uniform(flow, 12, t_start=1.0),
        "flow_karras_8": karras(flow, 8, sigma_max=float(flow.kdiffusion_sigma(1.0))),
        "flow_uniform_40_noisy": time_uniform(flow, 40, clean_end=False),
        "zero_snr_trailing_3": diffusers_spacing(zero_snr, 3, "trailing"),
        "zero_snr_trailing_25": diffusers_spacing(zero_snr, 25, "trailing"),
        "zero_snr_karras_10": karras(zero_snr, 10),
    }


RESOLVED = ("flow_uniform_40_noisy", "zero_snr_trailing_25")
"""Grids fine enough in lambda for every solver to be accurate (after the first step out of alpha
= 0: flow's time-uniform grid jumps from lambda = -30 to -3.7 in its first step)."""
DATA_PREDICTION = (
    "ddim",
    "dpm_solver_1",
    "euler",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "dpm_solver_pp_2s",
    "unipc_bh2",
)
"""Solvers whose updates stay bounded on any grid. Noise-prediction corrections (DPM-Solver-2/3)
and sigma-space ones (Heun, PNDM) scale with ``e^h = alpha_s sigma_t / (sigma_s alpha_t)`` and UniPC
bh1's with ``B(h) = h``: across one step of many units of lambda (Karras from flow's t = 1, 3
zero-SNR steps) they stay finite but are meaningless (measured relative errors up to 1e7)."""


@pytest.mark.parametrize("schedule_name", list(pure_noise_schedules()))
@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_alpha_zero_and_zero_terminal_snr_are_finite(name, schedule_name):
    schedule = pure_noise_schedules()[schedule_name]
    noise = schedule.noise
    t_start = float(schedule.times[0])
    assert t_start == pytest.approx(1.0, abs=1e-12)  # alpha = 0 (1e-13 on the logSNR grid)
    data = gaussian(noise)
    x_start = data.sample_noisy(16, t_start, torch.Generator().manual_seed(7))
    result = sample(data, x_start, schedule, get_solver(name)).sample
    assert torch.isfinite(result).all()
    exact = data.ode_solution(x_start, t_start, float(schedule.times[-1]))
    relative_error = float((result - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
    if schedule_name in RESOLVED:
        assert relative_error < 0.1
    elif name in DATA_PREDICTION:
        assert relative_error < 1.0


# ------------------------------------------------------------------------------------------------
# stochastic DDIM
# ------------------------------------------------------------------------------------------------


def test_stochastic_ddim_is_seeded():
    noise = NOISES["discrete_vp"]
    schedule = time_uniform(noise, 10)
    data = gaussian(noise)
    x_start = data.sample_noisy(4, 1.0, torch.Generator().manual_seed(0))
    solver = get_solver("ddim", eta=0.8)
    assert solver.stochastic and not get_solver("ddim").stochastic

    def run(seed: int) -> torch.Tensor:
        return sample(
            data, x_start, schedule, solver, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = run(1).sample, run(1).sample, run(2).sample
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.isfinite(sample(data, x_start, schedule, solver).sample).all()  # global RNG
    flow = NOISES["flow"]
    from_pure_noise = gaussian(flow).sample_noisy(4, 1.0, torch.Generator().manual_seed(0))
    result = sample(gaussian(flow), from_pure_noise, time_uniform(flow, 5), solver)
    assert torch.isfinite(result.sample).all()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_stochastic_ddim_sample_distribution(eta):
    """With the exact denoiser every update is affine in ``x`` plus Gaussian noise, so the sample
    variance follows ``Var_s = a^2 Var_t + c^2`` per dimension, computed here independently with
    diffusers' VP formulas (``c^2 = eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t / abar_s)``);
    with many steps it tends to the data variance."""
    noise = NOISES["discrete_vp"]
    schedule = time_uniform(noise, 100)
    data = gaussian(noise)
    generator = torch.Generator().manual_seed(11)
    x_start = data.sample_noisy(4000, 1.0, generator)
    result = sample(data, x_start, schedule, get_solver("ddim", eta=eta), generator=generator)
    mean, variance = result.sample.mean(0).numpy(), result.sample.var(0).numpy()

    abar = np.asarray(noise.alpha(schedule.times)) ** 2
    predicted = abar[0] * VARIANCE + (1 - abar[0])
    for i in range(schedule.num_steps):
        a_t, a_s = abar[i], abar[i + 1]
        gain = math.sqrt(a_t) * VARIANCE / (a_t * VARIANCE + 1 - a_t)  # x0_hat = mu + gain (x - ..)
        if i + 1 == schedule.num_steps:
            predicted = gain**2 * predicted
            break
        c2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        direction = math.sqrt(1 - a_s - c2)
        slope = math.sqrt(a_s) * gain + direction * (1 - math.sqrt(a_t) * gain) / math.sqrt(1 - a_t)
        predicted = slope**2 * predicted + c2
    standard_error = np.sqrt(VARIANCE / 4000)
    assert np.all(np.abs(mean - MEAN) < 4.5 * standard_error)
    np.testing.assert_allclose(variance, predicted, rtol=0.12)
    np.testing.assert_allclose(predicted, VARIANCE, rtol=0.35)  # tends to the data, O(1/n) bias
    assert np.all(predicted < VARIANCE)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_registry_names_orders_and_configs():
    assert list(SOLVERS) == [
        "ddim",
        "pndm",
        "dpm_solver_1",
        "dpm_solver_2",
        "dpm_solver_3",
        "dpm_solver_pp_2m",
        "dpm_solver_pp_3m",
        "dpm_solver_pp_2s",
        "dpm_solver_2m",
        "dpm_solver_3m",
        "unipc_bh1",
        "unipc_bh2",
        "euler",
        "heun",
        "plan",
        "olss",
    ]
    assert list(BUILT_IN_SOLVERS) == list(SOLVERS)[:-1] and dict(NEEDS_DATA) == {
        "olss": ("coefficients",)
    }
    orders = {name: get_solver(name).order for name in BUILT_IN_SOLVERS}
    assert orders == {
        "ddim": 1,
        "pndm": 4,
        "dpm_solver_1": 1,
        "dpm_solver_2": 2,
        "dpm_solver_3": 3,
        "dpm_solver_pp_2m": 2,
        "dpm_solver_pp_3m": 3,
        "dpm_solver_pp_2s": 2,
        "dpm_solver_2m": 2,
        "dpm_solver_3m": 3,
        "unipc_bh1": 3,
        "unipc_bh2": 3,
        "euler": 1,
        "heun": 2,
        "plan": 3,
    }
    assert get_solver("unipc_bh2", order=3).order == 4
    for name in BUILT_IN_SOLVERS:
        solver = get_solver(name)
        assert solver.name == name
        config = json.loads(json.dumps(solver.config()))
        assert get_solver(name, **config) == solver
    assert isinstance(get_solver("heun").init(torch.zeros(1), karras(EDM(), 3)), StagedState)
    with pytest.raises(ValueError, match="ddim, pndm, dpm_solver_1"):
        get_solver("dpm_solver_4")
    with pytest.raises(ValueError, match="order=2"):
        get_solver("dpm_solver_2", order=3)
    with pytest.raises(ValueError, match="bad options"):
        get_solver("euler", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        get_solver("ddim", eta=1.5)


# ------------------------------------------------------------------------------------------------
# the JSON codec and the fitted OLSS solver in the registry
# ------------------------------------------------------------------------------------------------

EXTRA_CODEC_CONFIGS = [
    ("ddim", {"eta": 0.5}),
    ("pndm", {"warmup": "lower_order"}),
    ("unipc_bh2", {"order": 3}),
    ("dpm_solver_pp_3m", {"legacy_3m": True}),
]


def _olss_solver(schedule: StepSchedule) -> OLSSSolver:
    from stepsearch.solvers.olss import ddim_coefficients

    return OLSSSolver(ddim_coefficients(schedule))


@pytest.mark.parametrize(
    ("name", "kwargs"), [(name, {}) for name in BUILT_IN_SOLVERS] + EXTRA_CODEC_CONFIGS
)
def test_solver_json_round_trips_with_the_current_shape(name, kwargs):
    solver = get_solver(name, **kwargs)
    payload = solver_to_json(solver)
    assert payload == {"name": solver.name, "config": solver.config()}  # the shape files use
    assert list(payload) == ["name", "config"]
    text = json.dumps(payload, sort_keys=True)
    assert solver_from_json(json.loads(text)) == solver
    assert json.dumps(solver_to_json(solver_from_json(json.loads(text))), sort_keys=True) == text


def test_olss_is_registered_and_its_coefficients_round_trip():
    schedule = time_uniform(NOISES["discrete_vp"], 5)
    solver = _olss_solver(schedule)
    assert get_solver("olss", coefficients=solver.coefficients) == solver
    payload = json.loads(json.dumps(solver_to_json(solver)))
    assert payload["name"] == "olss" and set(payload["config"]) == {"coefficients"}
    rebuilt = solver_from_json(payload)
    assert isinstance(rebuilt, OLSSSolver) and rebuilt == solver
    assert rebuilt.coefficients.coefficients == solver.coefficients.coefficients  # exact floats
    np.testing.assert_array_equal(rebuilt.schedule.times, schedule.times)
    assert get_solver("olss", **payload["config"]) == solver
    assert OLSSSolver.from_config(payload["config"]) == solver
    with pytest.raises(ValueError, match=r"olss.*coefficients="):
        get_solver("olss")
    with pytest.raises(ValueError, match="bad options"):
        get_solver("olss", coefficients=solver.coefficients, eta=0.5)
    with pytest.raises(ValueError, match="not OLSS coefficients"):
        solver_from_json({"name": "olss", "config": {"coefficients": {"format": "x"}}})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "JSON object"),
        ({"config": {}}, "needs a 'name'"),
        ({"name": 3}, "needs a 'name'"),
        ({"name": "dpm_solver_4", "config": {}}, "unknown solver 'dpm_solver_4'"),
        ({"name": "ddim", "config": [1]}, "'config' must be an object"),
        ({"name": "ddim", "config": {"eta": 1.5}}, "eta"),
        ({"name": "euler", "config": {"eta": 0.5}}, "bad options for solver 'euler'"),
        ({"name": "ddim", "conifg": {}}, "unknown keys"),
    ],
)
def test_solver_from_json_rejects_bad_payloads(payload, message):
    with pytest.raises(ValueError, match=message):
        solver_from_json(payload)


def test_solver_from_json_defaults_and_ignores_a_name_inside_config():
    assert solver_from_json({"name": "ddim"}) == get_solver("ddim")
    assert solver_from_json({"name": "ddim", "config": None}) == get_solver("ddim")
    assert solver_from_json({"name": "ddim", "config": {"name": "ddim", "eta": 0.5}}) == get_solver(
        "ddim", eta=0.5
    )
    with pytest.raises(TypeError, match="expected a Solver"):
        solver_to_json("ddim")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# NFE -> steps: one rule
# ------------------------------------------------------------------------------------------------

NFE_NOISES = {
    **NOISES,
    "zero_snr": DiscreteVP.from_diffusers_config({"rescale_betas_zero_snr": True}),
}


def _counted_steps(build: Callable[[StepSchedule], Solver], noise: NoiseSchedule, nfe: int):
    """What the removed duplicates did: count evaluation times of time-uniform schedules."""
    for steps in range(1, nfe + 1):
        schedule = make_schedule(noise, steps, "time_uniform")
        spent = build(schedule).evaluation_times(schedule).size
        if spent == nfe:
            return steps
        if spent > nfe:
            return None
    return None


@pytest.mark.parametrize("noise_name", list(NFE_NOISES))
@pytest.mark.parametrize(
    "name", [*SOLVERS, "pndm_lower_order", "unipc_bh2_order_3", "dpm_solver_pp_3m_legacy"]
)
def test_num_steps_for_nfe_agrees_with_counting_evaluation_times(name, noise_name):
    noise = NFE_NOISES[noise_name]
    variants = {
        "pndm_lower_order": ("pndm", {"warmup": "lower_order"}),
        "unipc_bh2_order_3": ("unipc_bh2", {"order": 3}),
        "dpm_solver_pp_3m_legacy": ("dpm_solver_pp_3m", {"legacy_3m": True}),
    }
    registered, kwargs = variants.get(name, (name, {}))
    if registered == "olss":  # runs only the schedule it was fitted on: one fit per schedule

        def build(schedule: StepSchedule) -> Solver:
            from stepsearch.solvers.olss import ddim_coefficients

            basis = "denoised" if float(noise.alpha(schedule.times[0])) == 0.0 else "eps"
            return OLSSSolver(ddim_coefficients(schedule, basis))

        solver = build(make_schedule(noise, 1, "time_uniform"))
    else:
        solver = get_solver(registered, **kwargs)

        def build(schedule: StepSchedule) -> Solver:
            return solver

    like = make_schedule(noise, 1, "time_uniform")
    for nfe in range(1, 13):
        expected = _counted_steps(build, noise, nfe)
        if expected is None:
            with pytest.raises(ValueError, match=f"cannot spend exactly {nfe} model"):
                solver.num_steps_for_nfe(nfe, like=like)
        else:
            assert solver.num_steps_for_nfe(nfe, like=like) == expected, nfe


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(BUILT_IN_SOLVERS))
def test_num_steps_for_a_huge_nfe_answers_fast(name):
    import time

    solver = get_solver(name)
    started = time.perf_counter()
    for nfe in (100_000, 100_001, 10**12):
        try:
            steps = solver.num_steps_for_nfe(nfe)
        except ValueError as error:
            assert "nearest reachable" in str(error)
        else:
            assert solver.nfe(steps) == nfe
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValueError, match="either a schedule or"):
        solver.num_steps_for_nfe(3, like=time_uniform(EDM(), 2), clean_end=True)
