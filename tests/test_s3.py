"""S³: the plan space keeps every candidate valid at its NFE, the seeds are the built-in solvers
exactly, the predictor is deterministic and learns a ranking, the search beats every built-in
plan on an exact test bed (held-out noise), and a killed or shared search ends identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.plan import SolverPlan
from stepsearch.sampling import sample
from stepsearch.schedule import StepSchedule
from stepsearch.search.job import spacing_schedules
from stepsearch.search.plan_space import PlanSpace, plan_key, step_features
from stepsearch.search.predictor import PredictorSettings, ranking_agreement, train_predictor
from stepsearch.search.s3 import SEED_SOLVERS, S3Settings, plan_solver_for, s3_search, seed_plans
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver
from stepsearch.solvers.plan_solver import PlanSolver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _toy_s3 import summary, toy_s3  # noqa: E402
from _toy_search import toy_objective  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
    "OMP_NUM_THREADS": "1",
}
NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
BUDGET = 24


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(num_components=3, dim=6, noise=NOISE, seed=2)


# --- the space ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nfe", [3, 5, 6])
def test_every_operator_keeps_plans_valid_at_the_nfe(nfe):
    space = PlanSpace.for_noise(NOISE, nfe, data_mean=True)
    seeds = [plan for _, plan in seed_plans(space, spacing_schedules(NOISE, nfe))]
    assert {plan.first_step for plan in seeds} == {"model", "zero_x0", "data_mean"}
    rng = np.random.default_rng(0)
    population, made = list(seeds), 0
    solver = PlanSolver(data_mean=torch.zeros(1))
    for _ in range(400):
        first, second = (population[int(k)] for k in rng.integers(len(population), size=2))
        for child in (space.mutate(first, rng), space.crossover(first, second, rng),
                      space.random_variant(first, rng)):  # fmt: skip
            if child is None:
                continue
            made += 1
            assert space.contains(child) and child.nfe == nfe
            solver.check_plan(child)
            assert np.all(np.diff(child.schedule.times) < 0)
            assert child.schedule.times[0] == space.t_start and child.schedule.times[-1] == 0
            # plans and keys round-trip exactly through JSON (the study store's keys)
            again = SolverPlan.from_json_dict(json.loads(json.dumps(child.to_json_dict())))
            assert plan_key(again) == plan_key(child)
            population.append(child)
    assert made > 300
    # the space is explored, not stuck: orders, predictions, correctors and first steps all vary
    # (order k needs k model outputs before the last step, which goes into clean data at order 1)
    assert {o for p in population for o in p.orders} == set(range(1, min(4, nfe - 1) + 1))
    assert {c for p in population for c in p.correctors} >= {"none", "unipc"}
    assert {p.first_step for p in population} == {"model", "zero_x0", "data_mean"}
    assert len({plan_key(p) for p in population}) > 200


TRUNCATED = (0.8, 0.45, 0.2, 0.06, 0.0)
"""A 4-step schedule that starts below the largest time, as AutoDiffusion's results do."""


def test_a_free_start_space_searches_the_first_time_and_adopts_truncated_plans():
    fixed = PlanSpace.for_noise(NOISE, 4, data_mean=True)
    free = PlanSpace.for_noise(NOISE, 4, data_mean=True, free_start=True)
    plan = get_solver("dpm_solver_pp_2m").default_plan(StepSchedule(np.array(TRUNCATED), NOISE))
    assert fixed.adopt(plan) is None and not fixed.contains(plan)
    assert fixed.adoption_problem(plan) == (
        "it starts at t=0.8, the space at t=1 (a search with a free start time takes it)"
    )
    adopted = free.adopt(plan)
    assert adopted is not None and free.contains(adopted)
    assert tuple(adopted.schedule.times) == TRUNCATED and adopted.orders == plan.orders
    assert "5 model evaluations" in free.adoption_problem(
        get_solver("ddim").default_plan(StepSchedule(np.array([0.8, 0.6, *TRUNCATED[1:]]), NOISE))
    )
    # the operators move the first time (never above t_start) and keep every child valid
    seeds = [p for _, p in seed_plans(free, spacing_schedules(NOISE, 4))] + [adopted]
    rng = np.random.default_rng(1)
    solver = PlanSolver(data_mean=torch.zeros(1))
    population, starts = list(seeds), []
    for _ in range(300):
        first, second = (population[int(k)] for k in rng.integers(len(population), size=2))
        for child in (free.mutate(first, rng), free.crossover(first, second, rng)):
            if child is None:
                continue
            assert free.contains(child) and child.nfe == 4
            solver.check_plan(child)
            assert np.all(np.diff(child.schedule.times) < 0) and child.schedule.times[-1] == 0
            starts.append(float(child.schedule.times[0]))
            population.append(child)
    assert max(starts) <= free.t_start
    assert min(starts) < 0.75 and sum(s < free.t_start for s in starts) > 30
    # the fixed space never moves it
    child = fixed.mutate(seeds[0], np.random.default_rng(0))
    assert child is None or child.schedule.times[0] == fixed.t_start


@pytest.mark.parametrize("free_start", [False, True])
def test_truncated_results_of_other_searches_seed_s3_or_are_reported(tmp_path, mixture, free_start):
    """AutoDiffusion-style schedules (first time below the largest) seed a free-start search at
    exactly their own solver's value; a fixed-start search says it cannot take them."""
    source = DenoiserSource.of_mixture(mixture, name="mix", num_reference=32)
    objective = Objective(source, "traj", num_samples=16, cache=TensorCache(None))
    settings = S3Settings(
        free_start=free_start, proposals=2, explore=1, seed_solvers=("dpm_solver_pp_2m",),
        predictor=PredictorSettings(hidden=8, epochs=5),
    )  # fmt: skip
    schedules = {
        "autodiffusion": StepSchedule(np.array(TRUNCATED), NOISE),
        **spacing_schedules(NOISE, 4, ("logsnr_uniform",)),
    }
    with StudyStore.open(tmp_path / "s.sqlite3", "s3", metadata={}) as store:
        if free_start:
            result = s3_search(objective, nfe=4, budget=6, store=store, schedules=schedules,
                               settings=settings)  # fmt: skip
        else:
            with pytest.warns(UserWarning, match="with autodiffusion: it starts at t=0.8"):
                result = s3_search(objective, nfe=4, budget=6, store=store,
                                   schedules=schedules, settings=settings)  # fmt: skip
    origins = {r.origin: r.value for r in result.history}
    seeded = "seed dpm_solver_pp_2m / autodiffusion" in origins
    assert seeded == free_start
    if free_start:
        assert result.not_adopted == ()
        theirs = objective(schedules["autodiffusion"], get_solver("dpm_solver_pp_2m")).value
        assert origins["seed dpm_solver_pp_2m / autodiffusion"] == pytest.approx(theirs, rel=1e-9)
        assert result.best_score.value <= theirs
    else:
        assert result.not_adopted == (
            "autodiffusion: it starts at t=0.8, the space at t=1 "
            "(a search with a free start time takes it)",
        )


@pytest.mark.parametrize("name", SEED_SOLVERS)
def test_seed_plans_sample_exactly_as_their_solvers(mixture, name):
    space = PlanSpace.for_noise(NOISE, 5)
    schedules = spacing_schedules(NOISE, 5, ("logsnr_uniform",))
    (origin, plan), *_ = seed_plans(space, schedules, (name,), analytical=False)
    assert origin == f"seed {name} / logsnr_uniform"
    x_T = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the space rounds times to 1e-6 (exact keys); the seed is the solver on those times
    np.testing.assert_allclose(plan.schedule.times, schedules["logsnr_uniform"].times, atol=5e-7)
    theirs = sample(mixture, x_T, plan.schedule, get_solver(name)).sample
    ours = sample(mixture, x_T, plan, PlanSolver()).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# --- the predictor ----------------------------------------------------------------------------------
def _random_plans(count: int, seed: int) -> list[SolverPlan]:
    space = PlanSpace.for_noise(NOISE, 5, data_mean=True)
    population = [plan for _, plan in seed_plans(space, spacing_schedules(NOISE, 5))]
    rng = np.random.default_rng(seed)
    found: dict[str, SolverPlan] = {}
    while len(found) < count:
        child = space.random_variant(population[int(rng.integers(len(population)))], rng)
        if child is not None:
            found.setdefault(plan_key(child), child)
    return list(found.values())


def _known_value(plan: SolverPlan) -> float:
    """A score with a known ranking: higher orders and an early first step are better."""
    return float(np.exp(-0.4 * np.mean(plan.orders) - 0.5 * (plan.first_step != "model")))


@pytest.mark.parametrize(("loss", "standardize"), [("logistic", True), ("hinge", False)])
def test_the_predictor_is_deterministic_and_learns_a_ranking(loss, standardize):
    plans = _random_plans(160, seed=1)
    train, test = plans[:100], plans[100:]
    settings = PredictorSettings(hidden=16, epochs=100, loss=loss, standardize=standardize)
    features = [step_features(p) for p in train]
    values = [_known_value(p) for p in train]
    first = train_predictor(features, values, seed=3, settings=settings)
    second = train_predictor(features, values, seed=3, settings=settings)
    test_features = [step_features(p) for p in test]
    np.testing.assert_array_equal(first.scores(test_features), second.scores(test_features))
    truth = [_known_value(p) for p in test]
    assert ranking_agreement(first.scores(test_features), truth) > 0.6  # unseen plans
    untrained = PredictorSettings(hidden=16, epochs=0)
    blind = train_predictor(features, values, seed=3, settings=untrained)
    assert abs(ranking_agreement(blind.scores(test_features), truth)) < 0.4


def test_standardized_features_make_the_predictor_blind_to_feature_units():
    """With ``standardize`` the predictor sees each feature shifted and scaled by the training
    plans' mean and spread (kept in the model): features in other units give the same scores."""
    plans = _random_plans(60, seed=2)
    features = [step_features(p) for p in plans]
    values = [_known_value(p) for p in plans]
    units = np.linspace(0.5, 40.0, features[0].shape[1]).astype(np.float32)
    moved = [f * units + 3.0 for f in features]
    settings = PredictorSettings(hidden=8, epochs=30)
    first = train_predictor(features, values, seed=0, settings=settings)
    second = train_predictor(moved, values, seed=0, settings=settings)
    np.testing.assert_allclose(first.scores(features), second.scores(moved), atol=2e-4)
    assert "feature_mean" in first.state_dict()
    raw = PredictorSettings(hidden=8, epochs=30, standardize=False)
    assert not np.allclose(
        train_predictor(features, values, seed=0, settings=raw).scores(features),
        train_predictor(moved, values, seed=0, settings=raw).scores(moved),
        atol=2e-4,
    )


def test_predictor_settings_refuse_unknown_losses_and_sizes():
    with pytest.raises(ValueError, match="loss"):
        PredictorSettings(loss="mse")
    with pytest.raises(ValueError, match="hidden"):
        PredictorSettings(hidden=0)
    assert PredictorSettings().to_json_dict()["loss"] == "logistic"


# --- the search -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("nfe", [3, 4, 5, 6])
def test_s3_beats_every_built_in_plan_on_held_out_noise(mixture, nfe, tmp_path):
    """The exact mixture bed: trajectory error to the converged solve, search seed 0 (32
    samples), held-out seed (256 samples), against every built-in multistep solver on every
    built-in spacing."""
    source = DenoiserSource.of_mixture(mixture, name="mix", num_reference=64)
    objective = Objective(
        source, "traj", num_samples=32, held_out_samples=256, cache=TensorCache(None)
    )
    with StudyStore.open(tmp_path / "s.sqlite3", "s3", metadata={"nfe": nfe}) as store:
        result = s3_search(
            objective, nfe=nfe, budget=100, store=store, schedules=spacing_schedules(NOISE, nfe)
        )
    assert result.best.nfe == nfe
    for restart in range(S3Settings().restarts):  # each evolution its budget
        assert len([r for r in result.history if r.stage >= 0 and r.restart == restart]) == 100
    ours = objective.held_out(result.best, plan_solver_for(objective)).value
    built_in = []
    for name in (*SEED_SOLVERS, "unipc_bh1"):
        solver = get_solver(name)
        for spacing, schedule in spacing_schedules(NOISE, solver.num_steps_for_nfe(nfe)).items():
            built_in.append((objective.held_out(schedule, solver).value, name, spacing))
    best_value, best_name, best_spacing = min(built_in)
    assert ours < 0.95 * best_value, (ours, best_name, best_spacing, best_value)


def test_search_stores_every_evaluation_and_reruns_from_the_store(tmp_path):
    storage = str(tmp_path / "s.sqlite3")
    result = toy_s3(storage, BUDGET)
    picked = [r for r in result.history if r.plan is result.best]
    assert len(result.history) == BUDGET and result.best_score.value == picked[0].value
    stages = [r.stage for r in result.history]
    assert stages == sorted(stages) and stages[-1] >= 2  # the seeds, then predictor stages
    assert stages.count(0) <= BUDGET // 2
    picks = result.indices("predictor")
    assert picks and all(result.history[k].stage >= 1 for k in picks)
    with StudyStore.open(storage, "toy-s3", metadata={"toy-s3": 3}) as store:
        trials = store.trials()
        assert len(trials) == BUDGET == len({t.key for t in trials})
        assert [t.attrs["index"] for t in trials] == list(range(BUDGET))
        assert store.best().value == min(result.values)
    began = time.perf_counter()
    again = toy_s3(storage, BUDGET)  # every proposal replayed, every value looked up
    assert summary(again) == summary(result)
    assert time.perf_counter() - began < 10


def test_the_pick_is_made_on_the_selection_seed(tmp_path):
    """The search seed's best ``select_plans`` plans are re-scored on the selection seed (their
    values there are those of an objective built on that seed: ground truth), the lowest there
    is the result, and the scores are a sibling study a rerun looks up."""
    storage = str(tmp_path / "s.sqlite3")
    result = toy_s3(storage, BUDGET)
    ranked = sorted(result.history, key=lambda r: (r.value, r.index))[:8]
    assert [index for index, _ in result.selection] == [r.index for r in ranked]
    assert result.selection_samples == 16 * 16  # sixteen times the toy's search samples
    base = toy_objective()
    direct = Objective(base.source, "traj", num_samples=256, search_seed=3, bootstrap=0,
                       cache=TensorCache(None))  # fmt: skip
    by_index = {r.index: r for r in result.history}
    for index, value in result.selection[:3]:
        assert direct(by_index[index].plan, plan_solver_for(direct)).value == value
        assert value != by_index[index].value  # other noise
    lowest = min(result.selection, key=lambda item: (item[1], by_index[item[0]].value))
    assert by_index[lowest[0]].plan is result.best
    import optuna

    chosen = optuna.load_study(study_name="toy-s3:select", storage=f"sqlite:///{storage}")
    assert len(chosen.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 8
    again = toy_s3(storage, BUDGET)
    assert again.selection == result.selection and summary(again) == summary(result)
    assert len(chosen.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 8


def test_restart_r_is_the_single_search_with_seed_plus_r_and_the_pick_spans_them(tmp_path):
    """Two evolutions in one study: the second replays exactly the single search with seed 1
    (its own predictor and parents; the shared seeds are lookups), the selection seed scores the
    8 best of each, the lowest there wins, the given starts are in the history once, and a
    rerun looks everything up."""
    from dataclasses import replace

    import _toy_s3

    two = replace(_toy_s3.SETTINGS, restarts=2)
    objective = toy_objective()
    schedules = spacing_schedules(NOISE, 3, ("time_uniform", "logsnr_uniform"))
    started = [("start ddim", get_solver("ddim").default_plan(schedules["time_uniform"]), 9.0)]

    def search(store: StudyStore, settings: S3Settings, seed: int):
        return s3_search(objective, nfe=3, budget=BUDGET, store=store, schedules=schedules,
                         evaluated=started, settings=settings, seed=seed)  # fmt: skip

    with StudyStore.open(tmp_path / "two.sqlite3", "s3", metadata={}) as store:
        both = search(store, two, 0)
        trials = store.count()
    singles = {}
    for seed in (0, 1):
        with StudyStore.open(tmp_path / f"one{seed}.sqlite3", "s3", metadata={}) as store:
            singles[seed] = search(store, _toy_s3.SETTINGS, seed)

    def own(records):
        return [(r.stage, r.origin, plan_key(r.plan), r.value) for r in records if r.stage >= 0]

    assert [r.index for r in both.history] == list(range(len(both.history)))
    assert [r.origin for r in both.history].count("start ddim") == 1
    for restart in (0, 1):
        mine = [r for r in both.history if r.restart == restart]
        assert own(mine) == own(singles[restart].history)
        assert len(own(mine)) == BUDGET  # the given start is not one of the budget
    keys = {plan_key(r.plan) for r in both.history if r.stage >= 0}
    assert trials == len(keys) < 2 * BUDGET  # the second evolution's seeds were lookups
    pool = {}
    for single in singles.values():
        for index, value in single.selection:
            pool[plan_key(single.history[index].plan)] = value
    by_index = {r.index: r for r in both.history}
    chosen = {plan_key(by_index[index].plan): value for index, value in both.selection}
    assert chosen == pool  # each evolution's 8 best, scored on the selection seed
    assert min(pool.values()) == chosen[plan_key(both.best)]
    assert (
        both.best_score.value
        == by_index[next(i for i, _ in both.selection if by_index[i].plan is both.best)].value
    )
    with StudyStore.open(tmp_path / "two.sqlite3", "s3", metadata={}) as store:
        again = search(store, two, 0)
        assert store.count() == trials
    assert summary(again) == summary(both)


def test_without_selection_the_search_seeds_best_is_the_pick(tmp_path):
    from dataclasses import replace

    import _toy_s3

    plain = replace(_toy_s3.SETTINGS, select_plans=0)
    objective = toy_objective()
    starts = spacing_schedules(NOISE, 3, ("time_uniform", "logsnr_uniform"))
    with StudyStore.open(tmp_path / "s.sqlite3", "s3", metadata={}) as store:
        result = s3_search(objective, nfe=3, budget=16, store=store, schedules=starts,
                           settings=plain)  # fmt: skip
    assert result.selection == () and result.best_score.value == min(result.values)


def test_a_selection_seed_that_is_the_searchs_or_the_reports_is_refused(tmp_path):
    objective = toy_objective()  # search seed 0, held-out seed 1
    with StudyStore.open(tmp_path / "s.sqlite3", "s3", metadata={}) as store:
        for clash in (0, 1):
            with pytest.raises(ValueError, match=r"select_seed.*held_out|select_seed.*search"):
                s3_search(objective, nfe=3, budget=8, store=store,
                          settings=S3Settings(select_seed=clash, select_plans=8))  # fmt: skip
        assert store.count() == 0  # refused before any work


def test_the_ablation_runs_without_the_predictor(tmp_path, mixture):
    source = DenoiserSource.of_mixture(mixture, name="mix", num_reference=32)
    objective = Objective(source, "traj", num_samples=16, cache=TensorCache(None))
    settings = S3Settings(use_predictor=False, proposals=4, explore=2, seed_solvers=("ddim",))
    with StudyStore.open(tmp_path / "s.sqlite3", "s3", metadata={}) as store:
        result = s3_search(objective, nfe=4, budget=16, store=store, settings=settings,
                           schedules=spacing_schedules(NOISE, 4))  # fmt: skip
    assert not result.indices("predictor") and result.indices("evolution")
    assert result.agreement == ()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="proposals must be at least 1"):
        S3Settings(proposals=0)
    with pytest.raises(ValueError, match="crossover_probability"):
        S3Settings(crossover_probability=1.5)
    with pytest.raises(ValueError, match=r"unknown solver|nope"):
        S3Settings(seed_solvers=("nope",))
    with pytest.raises(ValueError, match="pick"):
        S3Settings(pick="top")
    with pytest.raises(ValueError, match="screen_fraction"):
        S3Settings(screen_fraction=0.0)
    with pytest.raises(ValueError, match="select_samples"):
        S3Settings(select_samples=1)
    with pytest.raises(ValueError, match="select_plans"):
        S3Settings(select_plans=-1)
    with pytest.raises(ValueError, match="restarts"):
        S3Settings(restarts=0)
    assert "restarts" not in S3Settings(restarts=1).to_json_dict()


def test_by_default_the_pick_is_made_among_8_plans_on_16_times_the_samples():
    default = S3Settings()
    assert default.selects and default.select_plans == 8
    assert default.selection_samples(256) == 4096  # the digits default: 4,096
    assert S3Settings(select_samples=100).selection_samples(256) == 100
    assert not S3Settings(select_plans=0).selects and not S3Settings(select_plans=1).selects


def test_the_predictor_picks_its_best_or_screens_its_better_half():
    """``best``: the predictor's best-ranked candidates; ``screen``: drawn at random (seeded)
    from its better-ranked ``screen_fraction``, so not only its best."""
    from stepsearch.search.s3 import _pick

    best = S3Settings(pick="best", proposals=12)
    assert _pick(96, best, np.random.default_rng(0)) == list(range(12))
    assert _pick(5, best, np.random.default_rng(0)) == list(range(5))
    screen = S3Settings(pick="screen", proposals=12, screen_fraction=0.5)
    draws = [_pick(96, screen, np.random.default_rng(seed)) for seed in range(20)]
    for drawn in draws:
        assert len(set(drawn)) == 12 and drawn == sorted(drawn) and max(drawn) < 48
    assert any(max(drawn) >= 12 for drawn in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert _pick(96, screen, np.random.default_rng(3)) == draws[3]  # seeded
    assert _pick(10, screen, np.random.default_rng(0)) == list(range(10))


class _OraclePredictor:
    """A stand-in predictor that ranks plans by a known function of their step features."""

    def scores(self, plans):
        return np.array([float(np.abs(np.asarray(f)).sum()) for f in plans])


def test_the_sibling_pick_is_the_plain_evolution_choosing_among_siblings():
    """``pick="siblings"`` draws each proposal's parents exactly as the evolution without the
    predictor does: with one sibling it proposes the plain evolution's children bit for bit; with
    eight, each proposal is the predictor's best of its siblings, so the picks rank better (on
    average over draws: the families drawn differ once the draws do)."""
    from stepsearch.search.s3 import _plain_stage, _sibling_picks

    space = PlanSpace.for_noise(NOISE, 5, data_mean=True)
    parents = [plan for _, plan in seed_plans(space, spacing_schedules(NOISE, 5))][:16]
    oracle = _OraclePredictor()

    def ranked(plans):
        return oracle.scores([step_features(p) for p in plans])

    plain = S3Settings(proposals=12, explore=0)
    history = [SimpleEvaluated(k, p) for k, p in enumerate(parents)]
    children = [p for _, p in _plain_stage(space, history, set(), plain, np.random.default_rng(7))]
    one = S3Settings(proposals=12, siblings=1, pick="siblings")
    picks, predicted = _sibling_picks(space, parents, oracle, set(), one,
                                      np.random.default_rng(7))  # fmt: skip
    assert [plan_key(p) for p in picks] == [plan_key(p) for p in children]
    assert np.array_equal(predicted, ranked(picks))
    eight = S3Settings(proposals=12, siblings=8, pick="siblings")
    means = []
    for seed in range(6):
        picks, _ = _sibling_picks(space, parents, oracle, set(), eight,
                                  np.random.default_rng(seed))  # fmt: skip
        plain_picks, _ = _sibling_picks(space, parents, oracle, set(), one,
                                        np.random.default_rng(seed))  # fmt: skip
        assert len(picks) == 12 and len({plan_key(p) for p in picks}) == 12
        means.append((ranked(picks).mean(), ranked(plain_picks).mean()))
    screened, blind = np.mean(means, axis=0)
    assert screened < blind - 1.0  # 20.9 vs 22.7 on these seeds
    with pytest.raises(ValueError, match="siblings"):
        S3Settings(siblings=0)
    # recorded (in a study's metadata) only where it acts: studies made before it still resume
    assert "siblings" not in S3Settings().to_json_dict()
    assert eight.to_json_dict()["siblings"] == 8


class SimpleEvaluated:
    """The parts of :class:`~stepsearch.search.s3.Evaluated` the stages read."""

    def __init__(self, index: int, plan: SolverPlan) -> None:
        self.index, self.plan, self.value, self.stage = index, plan, float(index), 0


# --- resume and workers -------------------------------------------------------------------------
def _worker(storage: str, out: Path, study: str = "toy-s3", go: Path | None = None):
    barrier = [] if go is None else [str(go)]
    script = str(TESTS / "_toy_s3.py")
    return subprocess.Popen(
        [sys.executable, script, storage, str(BUDGET), str(out), study, *barrier], env=ENV
    )


def _complete(storage: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(storage, timeout=10) as connection:
            query = "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
            return int(connection.execute(query).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return summary(toy_s3(str(tmp_path_factory.mktemp("ref") / "s.sqlite3"), BUDGET))


@pytest.mark.slow
def test_sigkill_in_a_predictor_stage_resumes_to_the_identical_plan(tmp_path, uninterrupted):
    storage = str(tmp_path / "s.sqlite3")
    process = _worker(storage, tmp_path / "killed.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if _complete(storage) >= 14:  # past the seeds, inside the first predictor stage
            break
        time.sleep(0.02)
    assert process.poll() is None, "the worker finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 14 <= _complete(storage) < BUDGET
    assert summary(toy_s3(storage, BUDGET)) == uninterrupted


@pytest.mark.slow
def test_two_workers_share_one_study_and_reach_the_same_plan(tmp_path, uninterrupted):
    storage = str(tmp_path / "shared.sqlite3")
    StudyStore.open(storage, "toy-s3", metadata={"toy-s3": 3}).close()
    go = tmp_path / "go"
    workers = [_worker(storage, tmp_path / f"{w}.json", go=go) for w in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a worker exited before the barrier"
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    results = [json.loads((tmp_path / f"{w}.json").read_text()) for w in range(2)]
    assert results[0] == results[1] == json.loads(json.dumps(uninterrupted))
    with StudyStore.open(storage, "toy-s3", metadata={"toy-s3": 3}) as store:
        complete = store.trials()
        assert len(complete) == BUDGET == len({t.key for t in complete})
        assert len({t.worker["pid"] for t in complete}) == 2
