"""Solver plans: validation and JSON, the plan executor against every plan-reading solver, the
noise-prediction multistep solvers against diffusers and their convergence order, exact budgets."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from test_solvers import (
    MANY,
    MODERATE,
    NFE_SCHEDULES,
    NOISES,
    CountingDenoiser,
    convergence,
    gaussian,
)
from test_solvers_diffusers import run_diffusers

from stepsearch.noise import DiscreteVP
from stepsearch.plan import FORMAT_VERSION, SolverPlan
from stepsearch.sampling import sample
from stepsearch.schedule import (
    StepSchedule,
    flow_shifted,
    karras,
    logsnr_uniform,
    time_uniform,
)
from stepsearch.solvers import BUILT_IN_SOLVERS, PlanSolver, Solver, get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture(noise) -> GaussianMixture:
    """Three anisotropic components in 6 dimensions: a denoiser far from linear."""
    rng = np.random.default_rng(3)
    means = rng.normal(0.0, 1.5, (3, 6))
    covariances = np.stack([np.diag(np.exp(rng.uniform(-3.0, 0.5, 6))) for _ in range(3)])
    return GaussianMixture([0.5, 0.3, 0.2], means, covariances, noise)


SCHEDULES: dict[str, Callable[[], StepSchedule]] = {
    "vp_logsnr_clean_8": lambda: logsnr_uniform(NOISES["discrete_vp"], 8),
    "vp_time_noisy_20": lambda: time_uniform(NOISES["discrete_vp"], 20, clean_end=False),
    "edm_karras_clean_6": lambda: karras(NOISES["edm"], 6),
    "flow_from_1_clean_7": lambda: flow_shifted(NOISES["flow"], 7, shift=3.0),
}

IDENTITIES: list[tuple[str, dict, str]] = [
    ("ddim", {}, "bh2"),
    ("euler", {}, "bh2"),
    ("dpm_solver_1", {}, "bh2"),
    ("dpm_solver_pp_2m", {}, "bh2"),
    ("dpm_solver_pp_2m", {"lower_order_final": False}, "bh2"),
    ("dpm_solver_pp_3m", {}, "bh2"),
    ("dpm_solver_pp_3m", {"lower_order_final_below": None}, "bh2"),
    ("unipc_bh2", {}, "bh2"),
    ("unipc_bh2", {"order": 3}, "bh2"),
    ("unipc_bh1", {}, "bh1"),
    ("unipc_bh1", {"order": 1, "lower_order_final": False}, "bh1"),
    ("dpm_solver_2m", {}, "bh2"),
    ("dpm_solver_3m", {"lower_order_final": False}, "bh2"),
]


def run(solver: Solver, schedule: StepSchedule | SolverPlan, x_start: torch.Tensor, data):
    return sample(data, x_start, schedule, solver).sample


def start_noise(schedule: StepSchedule, data: GaussianMixture, seed: int = 0) -> torch.Tensor:
    return data.sample_noisy(5, float(schedule.times[0]), torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# the plan executor reproduces every plan-reading solver from its default plan
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize(("name", "kwargs", "variant"), IDENTITIES)
def test_default_plan_through_plan_solver_reproduces_the_solver(
    name, kwargs, variant, schedule_name
):
    schedule = SCHEDULES[schedule_name]()
    data = mixture(schedule.noise)
    x_start = start_noise(schedule, data)
    solver = get_solver(name, **kwargs)
    plan = solver.default_plan(schedule)
    expected = run(solver, schedule, x_start, data)
    assert expected.dtype == torch.float64 and torch.isfinite(expected).all()
    # the solver reads its plan: passing it explicitly changes nothing
    torch.testing.assert_close(run(solver, plan, x_start, data), expected, rtol=0, atol=0)
    result = run(PlanSolver(variant), plan, x_start, data)
    scale = float(expected.abs().max())
    assert float((result - expected).abs().max()) <= 1e-12 * max(scale, 1.0)


def test_default_plans_spell_out_the_solvers_rules():
    vp = NOISES["discrete_vp"]
    clean_10, noisy_10 = logsnr_uniform(vp, 10), logsnr_uniform(vp, 10, clean_end=False)
    plan = get_solver("dpm_solver_pp_2m").default_plan(noisy_10)
    assert plan.orders == (1,) + (2,) * 8 + (1,)  # warm-up and lower_order_final (< 15 steps)
    assert set(plan.predictions) == {"data"} and set(plan.correctors) == {"none"}
    plan = get_solver("dpm_solver_pp_3m", lower_order_final=False).default_plan(clean_10)
    assert plan.orders == (1, 2) + (3,) * 7 + (1,)  # the step to clean data is first order
    plan = get_solver("dpm_solver_pp_3m").default_plan(time_uniform(vp, 20, clean_end=False))
    assert plan.orders == (1, 2) + (3,) * 18  # lower_order_final applies below 15 steps only
    plan = get_solver("unipc_bh2").default_plan(noisy_10)
    assert plan.orders == (1,) + (2,) * 8 + (1,)
    assert plan.correctors == ("unipc",) * 9 + ("none",)
    plan = get_solver("dpm_solver_3m").default_plan(noisy_10)
    assert plan.orders == (1, 2) + (3,) * 6 + (2, 1) and set(plan.predictions) == {"noise"}
    assert get_solver("ddim").default_plan(noisy_10) == SolverPlan.uniform(noisy_10, 1)
    assert PlanSolver().default_plan(noisy_10) == get_solver("unipc_bh2").default_plan(noisy_10)


def test_plans_change_what_the_solvers_do():
    """A plan is not decoration: other orders / no corrector give other samples, and running
    a plan a solver cannot run raises."""
    schedule = logsnr_uniform(NOISES["edm"], 8)
    data = mixture(schedule.noise)
    x_start = start_noise(schedule, data)
    unipc = get_solver("unipc_bh2")
    default = unipc.default_plan(schedule)
    no_corrector = SolverPlan(schedule, default.orders, default.predictions, ("none",) * 8)
    torch.testing.assert_close(
        run(unipc, no_corrector, x_start, data),
        run(get_solver("dpm_solver_pp_2m"), schedule, x_start, data),
        rtol=1e-12,
        atol=1e-12,
    )  # UniP-2 (bh2) without UniC is DPM-Solver++(2M)
    first_order = SolverPlan.uniform(schedule, 1, corrector="none")
    torch.testing.assert_close(
        run(unipc, first_order, x_start, data), run(get_solver("ddim"), schedule, x_start, data)
    )
    with pytest.raises(ValueError, match="step 2: solver 'dpm_solver_pp_2m' runs orders up to 2"):
        get_solver("dpm_solver_pp_2m").init(x_start, SolverPlan.uniform(schedule, 3))
    with pytest.raises(ValueError, match="step 0: solver 'dpm_solver_pp_3m' runs data"):
        get_solver("dpm_solver_pp_3m").init(x_start, SolverPlan.uniform(schedule, 2, "noise"))
    with pytest.raises(ValueError, match="step 0: solver 'ddim' runs corrector none"):
        get_solver("ddim").init(x_start, SolverPlan.uniform(schedule, 1, corrector="unipc"))
    with pytest.raises(ValueError, match="'heun' evaluates the model off the grid or several"):
        get_solver("heun").init(x_start, default)
    with pytest.raises(ValueError, match="cannot be written as a SolverPlan"):
        get_solver("dpm_solver_2").default_plan(schedule)


def test_mixed_plan_runs_and_every_choice_matters():
    schedule = logsnr_uniform(NOISES["discrete_vp"], 9, clean_end=False)
    data = gaussian(schedule.noise)  # closed-form ODE solution
    x_start = start_noise(schedule, data)
    orders = (1, 2, 3, 3, 2, 3, 1, 2, 2)
    predictions = ("data", "noise", "noise", "data", "data", "noise", "data", "noise", "data")
    correctors = ("unipc", "none", "unipc", "unipc", "none", "unipc", "none", "unipc", "none")
    plan = SolverPlan(schedule, orders, predictions, correctors)
    solver = PlanSolver()
    result = run(solver, plan, x_start, data)
    exact = data.ode_solution(x_start, float(schedule.times[0]), float(schedule.times[-1]))
    relative = float((result - exact).norm() / exact.norm())
    assert relative < 0.05, relative
    variants = {
        "order": SolverPlan(schedule, (1, 2, 2, *orders[3:]), predictions, correctors),
        "prediction": SolverPlan(schedule, orders, ("data",) * 9, correctors),
        "corrector": SolverPlan(schedule, orders, predictions, ("none",) * 9),
    }
    for name, other in variants.items():
        assert not torch.allclose(run(solver, other, x_start, data), result, atol=1e-9), name
    assert not torch.allclose(run(PlanSolver("bh1"), plan, x_start, data), result, atol=1e-9)


def test_noise_prediction_after_a_corrector_matches_the_direct_form():
    """A noise step after UniC starts from the corrected sample with the model's own eps:
    ``(alpha_s / alpha_t) x_c - sigma_s (e^h - 1) eps``, checked by hand for one step."""
    schedule = logsnr_uniform(NOISES["edm"], 3, clean_end=False)
    data = mixture(schedule.noise)
    x_start = start_noise(schedule, data)
    plan = SolverPlan(schedule, (1, 1, 1), ("data", "noise", "data"), ("unipc", "none", "none"))
    solver = PlanSolver()
    state = solver.init(x_start, plan)
    x, states = x_start, []
    for i, t in enumerate(state.evaluation_times):
        x_model = x
        x, state = solver.step(state, x, data(x, float(t)), i)
        states.append((x_model, state))
    x_model_1, state_1 = states[1]
    now, target = state_1.grid_levels[1], state_1.grid_levels[2]
    eps = (x_model_1 - now.alpha * data(x_model_1, now.t)) / now.sigma
    h = target.lambda_ - now.lambda_
    expected = (target.alpha / now.alpha) * state_1.last_sample - target.sigma * np.expm1(h) * eps
    x_2 = states[2][0]
    torch.testing.assert_close(x_2, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(state_1.last_sample, x_model_1)  # the corrector did something


# ------------------------------------------------------------------------------------------------
# noise-prediction multistep DPM-Solver: diffusers parity and order
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20])  # below and above lower_order_final's 15
@pytest.mark.parametrize(
    ("name", "diffusers_order", "kwargs"),
    [
        ("dpm_solver_2m", 2, {}),
        ("dpm_solver_3m", 3, {"legacy_3m": True}),
    ],
)
def test_noise_prediction_multistep_matches_diffusers(name, diffusers_order, kwargs, steps):
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver",
        solver_order=diffusers_order,
        final_sigmas_type="sigma_min",  # diffusers refuses a clean end for noise prediction
        prediction_type="sample",
    )
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    data = mixture(noise)
    x_start = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected, timesteps, evaluated = run_diffusers(scheduler, noise, data, x_start, steps)
    schedule = StepSchedule.from_diffusers_timesteps(noise, timesteps, final="t_min")
    solver = get_solver(name, **kwargs)
    result = sample(data, x_start, schedule, solver).sample
    np.testing.assert_allclose(solver.evaluation_times(schedule), evaluated, rtol=1e-12)
    torch.testing.assert_close(result, expected.double(), rtol=2e-6, atol=2e-6)
    if name == "dpm_solver_3m":  # the exact 2 phi_3 differs from diffusers' phi_3
        other = sample(data, x_start, schedule, get_solver(name)).sample
        assert float((other - expected.double()).abs().max()) > 1e-5


ORDER_CASES = [
    ("dpm_solver_2m", {"lower_order_final": False}, MODERATE, 2.0),
    ("dpm_solver_3m", {"lower_order_final": False}, MANY, 3.0),
    ("dpm_solver_3m", {"lower_order_final": False, "legacy_3m": True}, MANY, 2.0),
]


@pytest.mark.parametrize("spacing", ["logsnr", "random"])
@pytest.mark.parametrize(("name", "kwargs", "steps", "order"), ORDER_CASES)
def test_noise_prediction_multistep_order(name, kwargs, steps, order, spacing):
    slope, errors = convergence(get_solver(name, **kwargs), NOISES["edm"], spacing, steps)
    print(
        f"\nslope {name} {kwargs} {spacing}: {slope:.2f} "
        f"(errors {errors[0]:.1e} -> {errors[-1]:.1e})"
    )
    assert np.all(np.diff(errors) < 0), errors
    assert abs(slope - order) <= 0.3


# ------------------------------------------------------------------------------------------------
# exact budgets
# ------------------------------------------------------------------------------------------------

EXTRA_CONFIGS: list[tuple[str, dict]] = [
    ("pndm", {"warmup": "lower_order"}),
    ("pndm", {"order": 2}),
    ("unipc_bh2", {"order": 3}),
    ("plan", {"variant": "bh1"}),
]
BUDGET_SCHEDULES = {
    **NFE_SCHEDULES,
    "flow_from_1_clean_1": lambda: time_uniform(NOISES["flow"], 1),
    "flow_from_1_noisy_1": lambda: time_uniform(NOISES["flow"], 1, clean_end=False),
    "flow_from_1_clean_2": lambda: time_uniform(NOISES["flow"], 2),
}


@pytest.mark.parametrize("schedule_name", list(BUDGET_SCHEDULES))
@pytest.mark.parametrize(
    ("name", "kwargs"), [(name, {}) for name in BUILT_IN_SOLVERS] + EXTRA_CONFIGS
)
def test_nfe_is_the_number_of_denoiser_calls(name, kwargs, schedule_name):
    schedule = BUDGET_SCHEDULES[schedule_name]()
    solver = get_solver(name, **kwargs)
    data = CountingDenoiser(mixture(schedule.noise))
    sample(data, start_noise(schedule, data.inner), schedule, solver)
    spent = len(data.calls)
    assert solver.nfe(schedule) == spent
    clean = schedule.ends_clean
    alpha_zero = float(schedule.noise.alpha(schedule.times[0])) == 0.0
    assert solver.nfe(schedule.num_steps, clean_end=clean, alpha_zero_start=alpha_zero) == spent
    facts = {"clean_end": clean, "alpha_zero_start": alpha_zero}
    assert solver.num_steps_for_nfe(spent, **facts) == schedule.num_steps
    if solver.uses_plan:
        assert solver.nfe(solver.default_plan(schedule)) == spent == schedule.num_steps


@pytest.mark.parametrize(
    ("name", "kwargs"), [(name, {}) for name in BUILT_IN_SOLVERS] + EXTRA_CONFIGS
)
def test_num_steps_for_nfe_inverts_nfe(name, kwargs):
    solver = get_solver(name, **kwargs)
    for clean_end in (True, False):
        for alpha_zero_start in (True, False):
            facts = {"clean_end": clean_end, "alpha_zero_start": alpha_zero_start}
            budgets = {solver.nfe(n, **facts): n for n in range(1, 30)}
            for nfe in range(1, max(budgets)):
                if nfe in budgets:
                    assert solver.num_steps_for_nfe(nfe, **facts) == budgets[nfe]
                else:
                    with pytest.raises(ValueError, match=f"cannot spend exactly {nfe} model"):
                        solver.num_steps_for_nfe(nfe, **facts)


def test_budget_errors_say_what_is_reachable():
    heun = get_solver("heun")
    assert [heun.nfe(n) for n in (1, 2, 3)] == [1, 3, 5]  # clean end: 2 n - 1
    assert [heun.nfe(n, clean_end=False) for n in (1, 2, 3)] == [2, 4, 6]
    assert heun.nfe(2, clean_end=False, alpha_zero_start=True) == 3
    with pytest.raises(ValueError, match=r"nearest reachable: 3 \(2 steps\) or 5 \(3 steps\)"):
        heun.num_steps_for_nfe(4)
    with pytest.raises(ValueError, match="nearest reachable: 2 \\(1 step\\)"):
        heun.num_steps_for_nfe(1, clean_end=False)
    assert get_solver("dpm_solver_3").nfe(4) == 10 and get_solver("pndm").nfe(5) == 14
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nfe must be a positive integer"):
            heun.num_steps_for_nfe(bad)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        heun.nfe(0)
    with pytest.raises(ValueError, match="either a schedule or"):
        heun.nfe(karras(NOISES["edm"], 3), clean_end=True)


# ------------------------------------------------------------------------------------------------
# validation and JSON
# ------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    schedule = karras(NOISES["edm"], 4)
    plan = SolverPlan(
        schedule,
        (1, 2, 2, 1),
        ("data", "noise", "data", "noise"),
        ("unipc", "none", "unipc", "none"),
    )
    payload = json.loads(json.dumps(plan.to_json_dict()))
    assert payload["format"] == "stepsearch.SolverPlan" and payload["version"] == FORMAT_VERSION
    assert SolverPlan.from_json_dict(payload) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = SolverPlan.load(path)
    assert loaded == plan and loaded.nfe == 4
    np.testing.assert_array_equal(loaded.schedule.times, schedule.times)
    flow = SolverPlan.uniform(flow_shifted(NOISES["flow"], 5, shift=3.0), 3, "noise", "unipc")
    assert SolverPlan.from_json_dict(json.loads(json.dumps(flow.to_json_dict()))) == flow


def _payload(**changes) -> dict:
    plan = SolverPlan.uniform(karras(NOISES["edm"], 3), 2)
    payload = json.loads(json.dumps(plan.to_json_dict()))
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"orders": [1, 2, float("nan")]}, "step 2: order must be an integer"),
        ({"orders": [1, 2, float("inf")]}, "step 2: order must be an integer"),
        ({"orders": [1, 2.5, 1]}, "step 1: order must be an integer"),
        ({"orders": [1, 5, 1]}, "step 1: order must be an integer in \\[1, 2, 3, 4\\]"),
        ({"orders": [1, 4, 1]}, "step 1: rule 'unipc' runs orders \\[1, 2, 3\\], got 4"),
        ({"orders": [1, True, 1]}, "step 1: order must be an integer"),
        ({"orders": [1, "2", 1]}, "step 1: order must be an integer"),
        ({"orders": [2, 2, 1]}, "step 0: order 2 needs 2 model outputs"),
        ({"orders": [1, 2, 2]}, "step 2: the step to clean data"),
        ({"orders": [1, 2]}, "orders has 2 entries for 3 steps"),
        ({"orders": "121"}, "orders must be a sequence"),
        ({"predictions": ["data", "eps", "data"]}, "step 1: prediction must be one of"),
        ({"predictions": ["data", "data"]}, "predictions has 2 entries"),
        ({"correctors": ["unipc", "bogus", "none"]}, "step 1: corrector must be one of"),
        ({"correctors": ["unipc", "unipc", "unipc"]}, "step 2: the last step cannot have"),
        ({"version": FORMAT_VERSION + 1}, "unsupported solver plan version"),
        ({"format": "stepsearch.StepSchedule"}, "not a solver plan"),
    ],
)
def test_bad_plans_raise_value_errors_naming_the_step(changes, message):
    with pytest.raises(ValueError, match=message):
        SolverPlan.from_json_dict(_payload(**changes))


def test_missing_fields_and_bad_times_raise():
    for key in ("schedule", "orders", "predictions", "correctors"):
        payload = _payload()
        del payload[key]
        with pytest.raises(ValueError, match=f"lacks '{key}'"):
            SolverPlan.from_json_dict(payload)
    payload = _payload()
    payload["schedule"]["times"][1] = float("nan")
    with pytest.raises(ValueError):
        SolverPlan.from_json_dict(payload)
    with pytest.raises(ValueError, match="JSON object"):
        SolverPlan.from_json_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule must be a StepSchedule"):
        SolverPlan([1.0, 0.0], (1,), ("data",), ("none",))  # type: ignore[arg-type]
