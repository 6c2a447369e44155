"""The unified step of S3 / USF as plan data (SolverPlan version 2) run by the ``plan`` solver.

- Default (rule ``"unipc"``) plans still reproduce DPM-Solver++(2M/3M), DPM-Solver(2M/3M) and UniPC
  bh1/bh2 to 1e-12 in float64 on random schedules, also when read from version-1 JSON.
- Rule ``"taylor"`` with exact derivative estimation is the exponential-integrator Taylor step: at
  order 1 it is DDIM, at order 3 DPM-Solver++(3M) / DPM-Solver(3M) with the exact ``2 phi_3``.
- Pure Taylor order-k plans converge at order k (k = 1..4, data and noise prediction) on the
  single-Gaussian bed; the pseudo-corrector adds one; an estimation order below the Taylor order
  caps it. Order windows as in ``test_solvers`` (ending at k-diffusion sigma 0.2). The first
  ``k - 1`` (warm-up) intervals are split in 4: with a plain warm-up the order-2 warm-up step's
  ``O(h^3)`` error caps order 4 near 3.4 at 64-250 steps on EDM grids (measured).
- An analytical first step skips the model at ``t_0``: exact NFE accounting, and the ``x0`` /
  ``eps`` it uses.
Run with ``-s`` to see the measured differences and slopes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_plan import mixture
from test_solvers import NOISES, CountingDenoiser, gaussian, order_schedule, random_schedule

from stepsearch.models.source import DenoiserSource
from stepsearch.plan import FORMAT_VERSION, SolverPlan
from stepsearch.sampling import StepRecord, sample
from stepsearch.schedule import StepSchedule, flow_shifted, karras, logsnr_uniform
from stepsearch.solvers import PlanSolver, get_solver
from stepsearch.solvers.plan_solver import data_mean_of, phi


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def start_noise(schedule: StepSchedule, data, n: int = 5, seed: int = 0) -> torch.Tensor:
    return data.sample_noisy(n, float(schedule.times[0]), torch.Generator().manual_seed(seed))


def v1_payload(plan: SolverPlan) -> dict:
    """The plan as a version-1 file wrote it (before rules, points, relaxations, first steps)."""
    return {
        "format": "stepsearch.SolverPlan",
        "version": 1,
        "schedule": plan.schedule.to_json_dict(),
        "orders": list(plan.orders),
        "predictions": list(plan.predictions),
        "correctors": list(plan.correctors),
    }


# ------------------------------------------------------------------------------------------------
# default plans reproduce the solvers (rule "unipc")
# ------------------------------------------------------------------------------------------------

REPRODUCED = [
    ("dpm_solver_pp_2m", {}, "bh2"),
    ("dpm_solver_pp_3m", {}, "bh2"),
    ("dpm_solver_2m", {}, "bh2"),
    ("dpm_solver_3m", {}, "bh2"),
    ("dpm_solver_3m", {"lower_order_final": False}, "bh2"),
    ("unipc_bh1", {}, "bh1"),
    ("unipc_bh2", {}, "bh2"),
    ("unipc_bh2", {"order": 3}, "bh2"),
]


@pytest.mark.parametrize(("name", "kwargs", "variant"), REPRODUCED)
def test_default_plans_reproduce_the_solvers_on_random_schedules(name, kwargs, variant):
    solver, worst = get_solver(name, **kwargs), 0.0
    for noise_name in ("discrete_vp", "edm", "flow"):
        for seed, steps, clean_end in ((1, 7, True), (2, 11, False), (3, 16, True)):
            schedule = random_schedule(NOISES[noise_name], steps, seed, clean_end)
            data = mixture(schedule.noise)
            x_start = start_noise(schedule, data)
            expected = sample(data, x_start, schedule, solver).sample
            plan = solver.default_plan(schedule)
            assert set(plan.rules) == {"unipc"} and plan.first_step == "model"
            old = SolverPlan.from_json_dict(json.loads(json.dumps(v1_payload(plan))))
            assert old == plan  # a version-1 file loads as the same plan
            for candidate in (plan, old):
                result = sample(data, x_start, candidate, PlanSolver(variant)).sample
                assert expected.dtype == torch.float64 and torch.isfinite(expected).all()
                worst = max(worst, max_difference(result, expected))
    print(f"\n{name} {kwargs}: max |plan - solver| = {worst:.1e}")
    assert worst <= 1e-12


def test_taylor_rule_with_exact_estimation_is_ddim_and_the_exact_third_order_multistep():
    """Taylor order 1 is DDIM; orders (1, 1, 3, 3, ...) with points (1, 2) are DPM-Solver++(3M)
    and DPM-Solver(3M) (both with the exact ``2 phi_3``) on the same orders, up to rounding: the
    inverse Taylor matrix and the divided differences round differently, which random grids with
    step ratios near 100 amplify (measured 5e-11 for data prediction on the flow grid)."""
    worst = 0.0
    for noise_name in ("discrete_vp", "edm", "flow"):
        schedule = random_schedule(NOISES[noise_name], 12, seed=5, clean_end=True)
        n = schedule.num_steps
        data = mixture(schedule.noise)
        x_start = start_noise(schedule, data)
        taylor = SolverPlan.uniform(schedule, 1, rule="taylor")
        ddim = sample(data, x_start, schedule, get_solver("ddim")).sample
        worst = max(worst, max_difference(sample(data, x_start, taylor, PlanSolver()).sample, ddim))
        orders = (1, 1) + (3,) * (n - 3) + (1,)
        for name, prediction in (("dpm_solver_pp_3m", "data"), ("dpm_solver_3m", "noise")):
            multistep = SolverPlan(schedule, orders, (prediction,) * n, ("none",) * n)
            taylor = SolverPlan(
                schedule, orders, (prediction,) * n, ("none",) * n, rules=("taylor",) * n
            )
            expected = sample(data, x_start, multistep, get_solver(name)).sample
            result = sample(data, x_start, taylor, PlanSolver()).sample
            worst = max(worst, max_difference(result, expected))
    print(f"\nmax |taylor - multistep| = {worst:.1e}")
    assert worst <= 1e-10


def test_phi_functions():
    for z in (-40.0, -3.0, -0.9, -1e-3, 0.0, 1e-3, 0.7, 2.5):
        expected = np.expm1(z) / z if z else 1.0
        assert phi(1, z) == pytest.approx(expected, rel=1e-14)
        for k in (1, 2, 3, 4):
            if abs(z) > 0.5:  # the recurrence is exact enough here
                recurrence = (phi(k, z) - 1.0 / math.factorial(k)) / z
                assert phi(k + 1, z) == pytest.approx(recurrence, rel=1e-12)
    assert phi(3, 0.0) == pytest.approx(1.0 / 6.0, rel=1e-15)
    assert phi(4, 0.999) == pytest.approx(phi(4, 1.001), rel=1e-2)


# ------------------------------------------------------------------------------------------------
# convergence orders on the single-Gaussian bed
# ------------------------------------------------------------------------------------------------


def fine_start(schedule: StepSchedule, intervals: int, parts: int = 4) -> StepSchedule:
    """``schedule`` with its first ``intervals`` intervals split in ``parts`` (logSNR-uniform)."""
    if intervals < 1:
        return schedule
    lambdas = schedule.lambdas
    pieces = [np.linspace(lambdas[i], lambdas[i + 1], parts + 1)[:-1] for i in range(intervals)]
    times = np.asarray(schedule.noise.t_from_lambda(np.concatenate([*pieces, lambdas[intervals:]])))
    times[0], times[-1] = schedule.times[0], schedule.times[-1]
    return StepSchedule(times, schedule.noise)


def plan_slope(make_plan, noise_name: str, spacing: str, steps: list[int], warm_up: int):
    """Fitted slope of log(RMS error at the last grid time) vs log(max step in lambda)."""
    noise = NOISES[noise_name]
    data = gaussian(noise)
    first = order_schedule(noise, spacing, steps[0])
    t_start, t_end = float(first.times[0]), float(first.times[-1])
    x_start = data.sample_noisy(16, t_start, torch.Generator().manual_seed(0))
    exact = data.ode_solution(x_start, t_start, t_end)
    errors, largest = [], []
    for n in steps:
        schedule = fine_start(order_schedule(noise, spacing, n), warm_up)
        result = sample(data, x_start, make_plan(schedule), PlanSolver()).sample
        errors.append(float((result - exact).pow(2).mean().sqrt()))
        largest.append(float(np.diff(schedule.lambdas).max()))
    return float(np.polyfit(np.log(largest), np.log(errors), 1)[0]), np.array(errors)


ORDER_STEPS = {
    1: [10, 16, 25, 40],
    2: [20, 32, 50, 80],
    3: [32, 50, 80, 125],
    4: [64, 100, 160, 250],
}


@pytest.mark.parametrize("spacing", ["logsnr", "random"])
@pytest.mark.parametrize("noise_name", ["discrete_vp", "edm"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_pure_taylor_plan_converges_at_its_order(order, prediction, noise_name, spacing):
    def make(schedule):
        return SolverPlan.uniform(schedule, order, prediction, rule="taylor")

    slope, errors = plan_slope(make, noise_name, spacing, ORDER_STEPS[order], order - 1)
    print(
        f"\nslope taylor-{order} {prediction} {noise_name} {spacing}: {slope:.2f} "
        f"(errors {errors[0]:.1e} -> {errors[-1]:.1e})"
    )
    assert np.all(np.diff(errors) < 0), errors
    assert abs(slope - order) <= 0.3


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_pseudo_corrector_adds_one_order_without_extra_evaluations(order, prediction):
    def make(schedule):
        return SolverPlan.uniform(schedule, order, prediction, "pseudo", rule="taylor")

    steps = [16, 25, 40, 64] if order < 3 else [32, 50, 80, 125]
    slope, errors = plan_slope(make, "edm", "random", steps, order)
    print(f"\nslope taylor-{order} + pseudo-corrector {prediction}: {slope:.2f}")
    assert np.all(np.diff(errors) < 0), errors
    assert abs(slope - (order + 1)) <= 0.3
    schedule = karras(NOISES["edm"], 6)
    counting = CountingDenoiser(gaussian(schedule.noise))
    plan = make(schedule)
    result = sample(counting, start_noise(schedule, counting.inner), plan, PlanSolver())
    assert len(counting.calls) == result.nfe == plan.nfe == 6


def test_estimation_order_below_the_taylor_order_caps_the_order():
    """Order 3 estimated from one point drops the second derivative (order 2); order 2 from the
    point two steps back (skipping one) stays order 2."""

    def one_point(schedule):
        n = schedule.num_steps
        orders = tuple(min(3, i + 1) for i in range(n))
        points = tuple(() if o == 1 else (1,) for o in orders)
        return SolverPlan(schedule, orders, ("data",) * n, ("none",) * n, ("taylor",) * n, points)

    def skip_one(schedule):
        n = schedule.num_steps
        orders = tuple(1 if i < 2 else 2 for i in range(n))
        points = tuple(() if o == 1 else (2,) for o in orders)
        return SolverPlan(schedule, orders, ("noise",) * n, ("none",) * n, ("taylor",) * n, points)

    for make in (one_point, skip_one):
        slope, _ = plan_slope(make, "edm", "logsnr", [20, 32, 50, 80], 2)
        print(f"\nslope {make.__name__}: {slope:.2f}")
        assert abs(slope - 2.0) <= 0.3


def test_relaxation_scales_the_first_derivative_term():
    """On one order-2 step the result is affine in ``c``, and the ``c = 1`` change is ``h`` times
    the whole first-derivative term (the ``c = 0`` step minus the first-order step)."""
    schedule = logsnr_uniform(NOISES["edm"], 2, clean_end=False)
    data = mixture(schedule.noise)
    x_start = start_noise(schedule, data)

    def run(order, relaxation):
        plan = SolverPlan(
            schedule,
            (1, order),
            ("data", "data"),
            ("none", "none"),
            ("taylor",) * 2,
            relaxations=(0.0, relaxation),
        )
        return sample(data, x_start, plan, PlanSolver()).sample

    first, plain, relaxed = run(1, 0.0), run(2, 0.0), run(2, 1.0)
    h = float(np.diff(schedule.lambdas)[1])
    torch.testing.assert_close(relaxed - plain, h * (plain - first), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        run(2, -0.5) - plain, -0.5 * (relaxed - plain), rtol=1e-9, atol=1e-12
    )


# ------------------------------------------------------------------------------------------------
# the analytical first step
# ------------------------------------------------------------------------------------------------

ANALYTICAL_SCHEDULES = {
    "vp_logsnr_clean_4": lambda: logsnr_uniform(NOISES["discrete_vp"], 4),
    "edm_karras_noisy_6": lambda: karras(NOISES["edm"], 6, clean_end=False),
    "flow_from_1_clean_5": lambda: flow_shifted(NOISES["flow"], 5, shift=3.0),
}


@pytest.mark.parametrize("rule", ["unipc", "taylor"])
@pytest.mark.parametrize("first_step", ["zero_x0", "data_mean"])
@pytest.mark.parametrize("schedule_name", list(ANALYTICAL_SCHEDULES))
def test_analytical_first_step_skips_the_model_at_t0(schedule_name, first_step, rule):
    schedule = ANALYTICAL_SCHEDULES[schedule_name]()
    inner = mixture(schedule.noise)
    counting = CountingDenoiser(inner)
    corrector = "unipc" if rule == "unipc" else "pseudo"
    plan = SolverPlan.uniform(schedule, 3, "data", corrector, rule=rule, first_step=first_step)
    solver = PlanSolver(data_mean=data_mean_of(inner))
    records: list[StepRecord] = []
    result = sample(counting, start_noise(schedule, inner), plan, solver, callback=records.append)
    n = schedule.num_steps
    assert plan.nfe == n - 1 == solver.nfe(plan) == len(counting.calls) == result.nfe
    np.testing.assert_array_equal(counting.calls, schedule.times[1:n])
    np.testing.assert_array_equal(solver.evaluation_times(plan), schedule.times[1:n])
    assert [r.index for r in records] == list(range(n - 1))
    assert torch.isfinite(result.sample).all()
    assert solver.nfe(schedule) == n  # a plain schedule still means the default plan


def x0_and_eps_at_start(first_step: str, schedule: StepSchedule, x_T, mean):
    """What the analytical first step should use: ``eps := x_T / sqrt(alpha^2 + sigma^2)`` or
    ``x0 := mean``, the other from ``x = alpha x0 + sigma eps`` (written out independently)."""
    alpha, sigma = (
        float(schedule.noise.alpha(schedule.times[0])),
        float(schedule.noise.sigma(schedule.times[0])),
    )
    if first_step == "zero_x0":
        eps = x_T / np.hypot(alpha, sigma)
        x0 = (x_T - sigma * eps) / alpha if alpha > 0 else torch.zeros_like(x_T)
        return x0, eps
    return mean.expand_as(x_T), (x_T - alpha * mean) / sigma


@pytest.mark.parametrize("first_step", ["zero_x0", "data_mean"])
@pytest.mark.parametrize("schedule_name", list(ANALYTICAL_SCHEDULES))
def test_analytical_first_step_uses_the_stated_estimates(schedule_name, first_step):
    """The sample the first model call sees is ``alpha_1 x0 + sigma_1 eps`` of the analytical
    estimates (a first-order step, data or noise prediction alike)."""
    schedule = ANALYTICAL_SCHEDULES[schedule_name]()
    inner = mixture(schedule.noise)
    mean = data_mean_of(inner)
    x_T = start_noise(schedule, inner)
    x0, eps = x0_and_eps_at_start(first_step, schedule, x_T, mean)
    alpha_1, sigma_1 = (
        float(f(schedule.times[1])) for f in (schedule.noise.alpha, schedule.noise.sigma)
    )
    for prediction in ("data", "noise"):
        plan = SolverPlan.uniform(schedule, 2, prediction, rule="taylor", first_step=first_step)
        records: list[StepRecord] = []
        sample(inner, x_T, plan, PlanSolver(data_mean=mean), callback=records.append)
        expected = alpha_1 * x0 + sigma_1 * eps
        assert max_difference(records[0].x, expected) <= 1e-12 * max(1.0, float(x_T.abs().max()))
    if first_step == "zero_x0" and isinstance(schedule.noise, type(NOISES["discrete_vp"])):
        torch.testing.assert_close(eps, x_T, rtol=1e-15, atol=0)  # VP: eps(x_T, T) := x_T


def test_data_mean_is_the_exact_denoiser_at_pure_noise_and_makes_3_nfe_meaningful():
    """At VP's ``t_max`` (``alpha ~ 0.006``) the exact denoiser is nearly the data mean; a 4-step
    plan whose first step is analytical spends 3 NFE and is far more accurate than 3 model steps
    of the same kind on the same window."""
    noise = NOISES["discrete_vp"]
    data = gaussian(noise)
    mean = data_mean_of(data)
    x_T = data.sample_noisy(64, noise.t_max, torch.Generator().manual_seed(0))
    assert max_difference(data(x_T, noise.t_max), mean.expand_as(x_T)) < 0.05
    t_end = float(noise.t_from_kdiffusion_sigma(0.2))
    exact = data.ode_solution(x_T, noise.t_max, t_end)
    errors = {}
    for steps, first_step in ((3, "model"), (4, "data_mean"), (4, "zero_x0")):
        schedule = logsnr_uniform(noise, steps, t_end=t_end, clean_end=False)
        plan = SolverPlan.uniform(
            schedule, 2, "data", "pseudo", rule="taylor", first_step=first_step
        )
        result = sample(data, x_T, plan, PlanSolver(data_mean=mean))
        assert result.nfe == 3
        errors[first_step] = float((result.sample - exact).pow(2).mean().sqrt())
    print(f"\nRMS error at NFE 3: {errors}")
    assert errors["data_mean"] < 0.5 * errors["model"]


def test_data_mean_comes_from_the_objectives_data(tmp_path):
    data = mixture(NOISES["edm"])
    expected = (data.weights[:, None] * data.means).sum(0)
    torch.testing.assert_close(data_mean_of(data), expected)
    source = DenoiserSource.of_mixture(data)
    torch.testing.assert_close(data_mean_of(source), expected)  # the exact one, not the samples
    samples = data.sample(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(data_mean_of(samples), expected, atol=0.05, rtol=0)
    plain = DenoiserSource(lambda x, t: x, (6,), source.identity, reference_data=samples)
    torch.testing.assert_close(data_mean_of(plain), samples.mean(0))
    latent = DenoiserSource(lambda x, t: x, (2, 3), source.identity, reference_data=samples)
    with pytest.raises(ValueError, match="not in the solver's space"):
        data_mean_of(latent)
    solver = PlanSolver(data_mean=expected)
    config = json.loads(json.dumps(solver.config()))
    assert get_solver("plan", **config) == solver != PlanSolver()
    assert PlanSolver().config() == {"variant": "bh2"}  # unchanged without a mean


def test_analytical_first_step_errors():
    schedule = karras(NOISES["edm"], 4)
    plan = SolverPlan.uniform(schedule, 2, first_step="data_mean")
    x_T = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="first_step 'data_mean' needs the data mean"):
        PlanSolver().init(x_T, plan)
    with pytest.raises(ValueError, match="does not broadcast"):
        sample(mixture(schedule.noise), x_T, plan, PlanSolver(data_mean=torch.zeros(5)))
    for name in ("ddim", "unipc_bh2", "dpm_solver_pp_2m"):
        with pytest.raises(ValueError, match=f"step 0: first_step 'zero_x0': solver '{name}'"):
            get_solver(name).init(x_T, SolverPlan.uniform(schedule, 1, first_step="zero_x0"))
    taylor = SolverPlan.uniform(schedule, 1, rule="taylor")
    with pytest.raises(ValueError, match="step 0: rule 'taylor': solver 'ddim' runs version-1"):
        get_solver("ddim").init(x_T, taylor)


# ------------------------------------------------------------------------------------------------
# format version 2: JSON, validation, the table
# ------------------------------------------------------------------------------------------------


def full_plan() -> SolverPlan:
    schedule = karras(NOISES["edm"], 6, clean_end=False)
    return SolverPlan(
        schedule,
        orders=(1, 1, 2, 3, 4, 2),
        predictions=("data", "noise", "data", "noise", "data", "data"),
        correctors=("pseudo", "none", "unipc", "pseudo", "pseudo", "none"),
        rules=("taylor", "taylor", "unipc", "taylor", "taylor", "taylor"),
        estimation_points=((), (), (1,), (2,), (1, 2, 3), (1,)),
        relaxations=(0.25, 0.0, 0.0, -0.38, 0.42, 0.1),
        first_step="zero_x0",
    )


def test_version_2_round_trip_and_version_1_files(tmp_path):
    plan = full_plan()
    payload = json.loads(json.dumps(plan.to_json_dict()))
    assert payload["version"] == FORMAT_VERSION == 2
    assert payload["estimation_points"] == [[], [], [1], [2], [1, 2, 3], [1]]
    assert SolverPlan.from_json_dict(payload) == plan
    plan.save(tmp_path / "plan.json")
    assert SolverPlan.load(tmp_path / "plan.json") == plan and plan.nfe == 5
    old = v1_payload(SolverPlan.uniform(plan.schedule, 3, "noise", "unipc"))
    loaded = SolverPlan.from_json_dict(old)
    assert loaded.rules == ("unipc",) * 6 and loaded.relaxations == (0.0,) * 6
    assert loaded.first_step == "model" and loaded.estimation_points[3] == (1, 2)
    assert loaded == SolverPlan.uniform(plan.schedule, 3, "noise", "unipc")
    with pytest.raises(ValueError, match="a version-1 solver plan has no 'rules'"):
        SolverPlan.from_json_dict({**old, "rules": ["unipc"] * 6})
    for key in ("rules", "estimation_points", "relaxations", "first_step"):
        broken = dict(payload)
        del broken[key]
        with pytest.raises(ValueError, match=f"lacks '{key}'"):
            SolverPlan.from_json_dict(broken)


def test_full_plan_runs_and_every_choice_matters():
    """A plan using every version-2 choice spends 5 NFE on 6 steps; changing any one choice
    changes the sample. (Accuracy is not the point: 6 Karras steps are too coarse for order 4.)"""
    plan = full_plan()
    data = gaussian(plan.schedule.noise)
    x_T = start_noise(plan.schedule, data)
    counting = CountingDenoiser(data)
    result = sample(counting, x_T, plan, PlanSolver()).sample
    assert len(counting.calls) == 5 and torch.isfinite(result).all()
    variants = {
        "first_step": {"first_step": "model"},
        "rule": {
            "rules": ("taylor",) * 2 + ("taylor",) + plan.rules[3:],
            "correctors": ("pseudo", "none", "pseudo", "pseudo", "pseudo", "none"),
        },
        "points": {"estimation_points": (*plan.estimation_points[:5], (2,))},
        "relaxation": {"relaxations": (*plan.relaxations[:3], 0.0, *plan.relaxations[4:])},
        "corrector": {"correctors": ("pseudo", "none", "unipc", "none", "pseudo", "none")},
        "prediction": {"predictions": ("data",) * 6},
    }
    for name, change in variants.items():
        other = dataclasses.replace(plan, **change)
        changed = sample(data, x_T, other, PlanSolver()).sample
        assert max_difference(changed, result) > 1e-9, name


def _edited(**changes) -> dict:
    payload = json.loads(json.dumps(full_plan().to_json_dict()))
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rules": ["taylor", "taylor", "unipc", "taylor", "taylor", "euler"]},
            "step 5: rule must be",
        ),
        ({"orders": [1, 1, 2, 3, 5, 2]}, "step 4: order must be an integer in"),
        (
            {"orders": [1, 2, 2, 3, 4, 2]},
            "step 1: order 2 needs 2 model outputs, only 1 exist "
            "\\(warm-up; the analytical first step is no model output\\)",
        ),
        (
            {"orders": [1, 1, 2, 3, 4, 4], "estimation_points": [[], [], [1], [2], [1, 2, 3], [1]]},
            None,
        ),
        (
            {"estimation_points": [[], [], [1], [3], [1, 2, 3], [1]]},
            "step 3: estimation point 3 \\(t_0\\) is the analytical first step",
        ),
        ({"estimation_points": [[], [], [1], [4], [1, 2, 3], [1]]}, "step 3: estimation point 4"),
        ({"estimation_points": [[], [], [1], [2, 2], [1, 2, 3], [1]]}, "step 3: estimation points"),
        (
            {"estimation_points": [[], [], [1], [1, 2, 3], [1, 2, 3], [1]]},
            "step 3: order 3 takes 1 to 2 estimation points",
        ),
        (
            {"estimation_points": [[], [], [1], [], [1, 2, 3], [1]]},
            "step 3: order 3 takes 1 to 2 estimation points",
        ),
        ({"estimation_points": [[1], [], [1], [2], [1, 2, 3], [1]]}, "step 0: order 1 uses no"),
        (
            {"estimation_points": [[], [], [2], [2], [1, 2, 3], [1]]},
            "step 2: rule 'unipc' estimates from the last 1 points",
        ),
        ({"estimation_points": [[], [], [1], [0], [1, 2, 3], [1]]}, "step 3: an estimation point"),
        ({"relaxations": [0.25, 0.0, 0.0, float("nan"), 0.42, 0.1]}, "step 3: relaxation must be"),
        ({"relaxations": [0.25, 0.0, 0.1, -0.38, 0.42, 0.1]}, "step 2: relaxation applies to"),
        ({"relaxations": [0.25, 0.3, 0.0, -0.38, 0.42, 0.1]}, "step 1: relaxation 0.3 on an"),
        (
            {"correctors": ["pseudo", "none", "pseudo", "pseudo", "pseudo", "none"]},
            "step 2: rule 'unipc' takes corrector 'none' or 'unipc', got 'pseudo'",
        ),
        (
            {"correctors": ["unipc", "none", "unipc", "pseudo", "pseudo", "none"]},
            "step 0: rule 'taylor' takes corrector 'none' or 'pseudo'",
        ),
        (
            {"correctors": ["pseudo", "none", "unipc", "pseudo", "pseudo", "pseudo"]},
            "step 5: the last step cannot have a corrector",
        ),
        ({"first_step": "average_x0"}, "first_step must be one of"),
        ({"version": 3}, "unsupported solver plan version 3"),
    ],
)
def test_bad_version_2_plans_name_the_step(changes, message):
    if message is None:  # a valid edit (order 4 at step 5 with one point: estimation order 1)
        assert SolverPlan.from_json_dict(_edited(**changes)).orders[-1] == 4
        return
    with pytest.raises(ValueError, match=message):
        SolverPlan.from_json_dict(_edited(**changes))


def test_clean_end_and_short_analytical_plans():
    clean = karras(NOISES["edm"], 3)
    with pytest.raises(ValueError, match="step 2: the step to clean data"):
        SolverPlan(clean, (1, 2, 2), ("data",) * 3, ("none",) * 3, ("taylor",) * 3)
    with pytest.raises(ValueError, match="at least 2 steps"):
        SolverPlan.uniform(karras(NOISES["edm"], 1), 1, first_step="data_mean")
    plan = SolverPlan.uniform(clean, 4, rule="taylor", first_step="zero_x0")
    assert plan.orders == (1, 1, 1) and plan.nfe == 2
    plan = SolverPlan.uniform(karras(NOISES["edm"], 6, clean_end=False), 4, rule="taylor")
    assert plan.orders == (1, 2, 3, 4, 4, 4)
    assert plan.estimation_points == ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3), (1, 2, 3))


def test_describe_prints_the_plan_as_a_table():
    table = full_plan().describe()
    print("\n" + table)
    lines = table.splitlines()
    assert lines[0].split() == [
        "step",
        "t_s",
        "->",
        "t_t",
        "prediction",
        "rule",
        "order",
        "points",
        "relax",
        "corr.",
    ]
    assert lines[2].split()[:6] == ["0", "80", "->", "30.18", "data", "taylor,"]
    assert "zero_x0" in lines[2] and "+0.250" in lines[2]
    assert lines[6].split()[-4:] == ["4", "3,2,1", "+0.420", "pseudo"]
    assert lines[-1] == "NFE 5; first step: zero_x0 (no model call); points are grid indices"
