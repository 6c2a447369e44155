"""The plan proxy (S³'s predictor feature): a plan's trajectory error on a Gaussian mixture fitted
to the data, checked against the exact error of the bed the data came from."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from stepsearch.models import load_source
from stepsearch.noise import DiscreteVP
from stepsearch.sampling import initial_noise_scale, sample
from stepsearch.schedule import logsnr_uniform
from stepsearch.search.job import spacing_schedules
from stepsearch.search.plan_proxy import MAX_DIMENSIONS, PlanProxy
from stepsearch.search.plan_space import step_features
from stepsearch.search.s3 import S3Settings, _featurizer
from stepsearch.solvers import get_solver
from stepsearch.solvers.plan_solver import PlanSolver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
SOLVERS = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "dpm_solver_2m", "unipc_bh2")


@pytest.fixture(scope="module")
def bed() -> GaussianMixture:
    return GaussianMixture.random(num_components=3, dim=6, noise=NOISE, seed=2)


@pytest.fixture(scope="module")
def proxy(bed: GaussianMixture) -> PlanProxy:
    data = bed.sample(2000, torch.Generator().manual_seed(5))
    return PlanProxy(data, NOISE, components=3, samples=128)


def _plans(nfes=(3, 4, 5, 6)):
    plans = []
    for nfe in nfes:
        for name in SOLVERS:
            for schedule in spacing_schedules(NOISE, nfe).values():
                plans.append(get_solver(name).default_plan(schedule))
    return plans


def _exact_log_errors(bed: GaussianMixture, plans, noises: torch.Tensor) -> np.ndarray:
    """Each plan's log RMS distance to the converged solve on the bed the data came from."""
    fine = logsnr_uniform(NOISE, 400)
    solution = sample(bed, initial_noise_scale(fine) * noises, fine, get_solver("dpm_solver_pp_3m"))
    errors = []
    for plan in plans:
        found = sample(bed, initial_noise_scale(plan.schedule) * noises, plan, PlanSolver())
        errors.append(math.log(float(((found.sample - solution.sample) ** 2).mean().sqrt())))
    return np.array(errors)


def test_fitted_to_samples_it_ranks_plans_as_the_exact_beds_error_does(bed, proxy):
    """Plans of five solvers on every spacing at NFE 3-6: the proxy (fitted to 2,000 samples)
    against the exact trajectory error on the mixture itself (other noises)."""
    plans = _plans()
    noises = torch.randn((256, 6), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exact = _exact_log_errors(bed, plans, noises)
    found = np.array([proxy(plan, PlanSolver()) for plan in plans])
    assert kendalltau(found, exact).statistic > 0.8
    assert np.median(np.abs(found - exact)) < 0.35  # about the same error, not only the order


def test_the_error_falls_at_the_solvers_order_to_the_reference(proxy):
    """DPM-Solver++(2M) on log-SNR-uniform steps: second order (fitted slope of log error on log
    steps), and the reference's own solver and schedule reproduce it to rounding."""
    steps = np.array([20, 40, 80])
    errors = [proxy(get_solver("dpm_solver_pp_2m").default_plan(logsnr_uniform(NOISE, int(n))),
                    PlanSolver()) for n in steps]  # fmt: skip
    slope = np.polyfit(np.log(steps), errors, 1)[0]
    assert -2.4 < slope < -1.6, slope
    reference = get_solver("dpm_solver_pp_3m").default_plan(logsnr_uniform(NOISE, 200))
    assert proxy(reference, PlanSolver()) == math.log(1e-8)  # the floor: the same solve


def test_the_fitted_mixture_keeps_the_data_mean_and_values_do_not_depend_on_threads(bed):
    data = bed.sample(500, torch.Generator().manual_seed(1))
    first = PlanProxy(data, NOISE, components=4, samples=32)
    mixture_mean = (first.bed.weights[:, None] * first.bed.means).sum(0)
    torch.testing.assert_close(mixture_mean, data.double().mean(0), rtol=0, atol=1e-12)
    plan = get_solver("unipc_bh2").default_plan(logsnr_uniform(NOISE, 5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        second = PlanProxy(data, NOISE, components=4, samples=32)
        assert second(plan, PlanSolver()) == first(plan, PlanSolver())
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


def test_a_source_gets_a_proxy_only_with_small_data_in_its_own_space():
    digits = load_source("digits")
    found = PlanProxy.for_source(digits, samples=8)
    assert found is not None and found.shape == (1, 8, 8)
    decoded = SimpleNamespace(noise=NOISE, sample_shape=(4, 8, 8),
                              reference_data=torch.zeros(16, 3, 64, 64))  # fmt: skip
    assert PlanProxy.for_source(decoded) is None
    wide = (1, 64, 64)
    assert MAX_DIMENSIONS < 4096
    large = SimpleNamespace(noise=NOISE, sample_shape=wide, reference_data=torch.zeros(16, *wide))
    assert PlanProxy.for_source(large) is None
    assert PlanProxy.for_source(SimpleNamespace(noise=NOISE, sample_shape=(6,))) is None
    with pytest.raises(ValueError, match="at most"):
        PlanProxy(torch.zeros(16, *wide), NOISE)
    with pytest.raises(ValueError, match="at least 4"):
        PlanProxy(torch.zeros(2, 6), NOISE)


def test_the_predictor_sees_the_proxy_as_a_last_column(proxy):
    plan = get_solver("dpm_solver_pp_3m").default_plan(logsnr_uniform(NOISE, 5))
    plain = _featurizer(None, PlanSolver())(plan)
    rows = _featurizer(proxy, PlanSolver())(plan)
    np.testing.assert_array_equal(plain, step_features(plan))
    np.testing.assert_array_equal(rows[:, :-1], plain)
    assert np.all(rows[:, -1] == np.float32(proxy(plan, PlanSolver())))


def test_the_proxy_setting_is_recorded_only_where_the_predictor_runs():
    assert S3Settings().to_json_dict()["proxy"] is True
    assert S3Settings(proxy=False).to_json_dict()["proxy"] is False
    assert "proxy" not in S3Settings(use_predictor=False).to_json_dict()
