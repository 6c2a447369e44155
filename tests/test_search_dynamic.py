"""GITS / OSS-style dynamic-programming schedules: exact DP, costs from the solver that runs the path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.schedule import StepSchedule, karras, logsnr_uniform, time_uniform
from stepsearch.search import dynamic
from stepsearch.solvers import get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

SOLVERS = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")


@pytest.fixture(scope="module")
def gaussian_teacher():
    """Single-Gaussian test bed (exact denoiser, closed-form ODE), an 8-point grid, 48 samples."""
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    rng = np.random.default_rng(0)
    gaussian = GaussianMixture.gaussian(rng.normal(size=6), rng.uniform(0.05, 0.5, 6), noise)
    source = DenoiserSource.of_mixture(gaussian, name="gauss")
    grid = dynamic.fine_grid(noise, 8)
    teacher = dynamic.record_grid_teacher(source, grid, num_samples=48, cache=TensorCache(None))
    return gaussian, teacher


def _layers(teacher, solver_name, num_steps, **options):
    rules = dynamic.layer_rules(get_solver(solver_name), num_steps)
    costs = dynamic.step_costs(teacher, rules, cache=TensorCache(None), **options)
    return [costs.tables[rule.key] for rule in rules]


def _brute_force(layers, weights=None):
    size = layers[0].shape[-1]
    interior = itertools.combinations(range(1, size - 1), len(layers) - 1)
    return min(
        (dynamic.path_cost([0, *points, size - 1], layers, weights), [0, *points, size - 1])
        for points in interior
    )


def test_teacher_follows_the_exact_ode_solution(gaussian_teacher):
    gaussian, coarse = gaussian_teacher
    source = DenoiserSource.of_mixture(gaussian, name="gauss")
    grid = dynamic.fine_grid(gaussian.noise, 60)
    teacher = dynamic.record_grid_teacher(source, grid, num_samples=16, cache=TensorCache(None))
    assert torch.equal(teacher.x[0], coarse.x[0, :16])  # the same seeded noise
    for n in (20, 59):
        exact = gaussian.ode_solution(teacher.x[0], float(grid.times[0]), float(grid.times[n]))
        error = (teacher.x[n] - exact).square().mean().sqrt()
        assert error < 1e-3 * exact.square().mean().sqrt()
    assert torch.allclose(teacher.denoised[7], gaussian(teacher.x[7], float(grid.times[7])))


@pytest.mark.parametrize("solver_name", SOLVERS)
@pytest.mark.parametrize("num_steps", [2, 3, 4, 5])
def test_dp_equals_the_brute_force_optimum(gaussian_teacher, solver_name, num_steps):
    _, teacher = gaussian_teacher
    layers = _layers(teacher, solver_name, num_steps)
    path, cost = dynamic.best_path(layers)
    best_cost, _best = _brute_force(layers)
    assert cost == pytest.approx(best_cost, rel=1e-12)
    assert dynamic.path_cost(path, layers) == pytest.approx(best_cost, rel=1e-12)
    assert path[0] == 0 and path[-1] == len(teacher.grid) - 1 and len(path) == num_steps + 1
    if solver_name != "ddim" and num_steps >= 3:  # history matters: a (p, i, j) layer
        assert any(layer.ndim == 3 for layer in layers)


@pytest.mark.parametrize("coeff", [0.8, 1.15, 1.5])
def test_gits_coefficient_weights_later_steps(gaussian_teacher, coeff):
    _, teacher = gaussian_teacher
    layers = _layers(teacher, "dpm_solver_pp_2m", 4)
    weights = [coeff**m for m in range(4)]
    path, cost = dynamic.best_path(layers, weights)
    assert cost == pytest.approx(_brute_force(layers, weights)[0], rel=1e-12)
    result = dynamic.dynamic_schedule(
        teacher, "dpm_solver_pp_2m", 4, coeff=coeff, cache=TensorCache(None)
    )
    assert result.path == path
    assert result.cost == pytest.approx(
        sum(w * c for w, c in zip(weights, result.step_costs, strict=False))
    )


@pytest.mark.parametrize("solver_name", SOLVERS)
def test_costs_are_one_step_of_the_real_solver_from_the_teacher(gaussian_teacher, solver_name):
    """Each table entry equals running the probe solver itself, from a fresh ``init`` on the
    schedule ``[g_p,] g_i, g_j``, fed with the teacher's tensors (guards the coefficient probing)."""
    _, teacher = gaussian_teacher
    grid = teacher.grid
    rules = dynamic.layer_rules(get_solver(solver_name), 4)
    for reduction in dynamic.REDUCTIONS:
        costs = dynamic.step_costs(teacher, rules, reduction=reduction, cache=TensorCache(None))
        for rule in {rule.key: rule for rule in rules}.values():
            table = costs.tables[rule.key]
            points_list = [(0, 3), (2, 7), (4, 5)] if rule.depth == 0 else [(0, 2, 5), (1, 3, 7)]
            for points in points_list:
                schedule = StepSchedule(grid.times[list(points)], grid.noise)
                state = rule.probe.init(teacher.x[points[0]], schedule)
                x = teacher.x[points[0]]
                for k, n in enumerate(points[:-1]):
                    x, state = rule.probe.step(state, teacher.x[n], teacher.denoised[n], k)
                errors = (x - teacher.x[points[-1]]).reshape(x.shape[0], -1)
                per_sample = errors.square().mean(dim=1).sqrt()
                expected = (
                    float(np.median(per_sample.numpy()))
                    if reduction == "median"
                    else float(errors.square().mean().sqrt())
                )
                assert table[points] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_layer_rules_follow_the_solver_orders():
    rules = dynamic.layer_rules(get_solver("dpm_solver_pp_2m"), 5)
    # first step first order, middle steps second order, last step first order (lower_order_final)
    assert [rule.depth for rule in rules] == [0, 1, 1, 1, 0]
    assert all(rule.depth == 0 for rule in dynamic.layer_rules(get_solver("ddim"), 5))
    unipc = dynamic.layer_rules(get_solver("unipc_bh2"), 5)
    assert [rule.depth for rule in unipc] == [0, 1, 1, 1, 1]  # the corrector reads the history
    unipc_1 = dynamic.layer_rules(get_solver("unipc_bh2", order=1), 4)  # UniC-1 after UniP-1
    assert [rule.depth for rule in unipc_1] == [0, 1, 1, 1]
    long = dynamic.layer_rules(get_solver("dpm_solver_pp_2m"), 16)  # no lower_order_final at 16
    assert [rule.depth for rule in long] == [0] + [1] * 15
    for name in ("heun", "dpm_solver_2", "dpm_solver_pp_2s", "pndm"):
        with pytest.raises(ValueError, match="not supported"):
            dynamic.layer_rules(get_solver(name), 5)
    with pytest.raises(ValueError, match="deterministic"):
        dynamic.layer_rules(get_solver("ddim", eta=1.0), 5)


def test_best_path_rejects_bad_input():
    table = np.zeros((5, 5))
    with pytest.raises(ValueError, match="first step"):
        dynamic.best_path([np.zeros((5, 5, 5))])
    with pytest.raises(ValueError, match="do not fit"):
        dynamic.best_path([table] * 5)
    with pytest.raises(ValueError, match="one weight"):
        dynamic.best_path([table, table], [1.0])
    with pytest.raises(ValueError, match="at least 3"):
        dynamic.fine_grid(DiscreteVP.from_diffusers_config({}), 2)


def test_median_path_is_strictly_increasing():
    paths = np.array([[0, 1, 2, 9], [0, 1, 2, 9], [0, 5, 8, 9]])
    assert dynamic.median_path(paths, 10) == [0, 1, 2, 9]
    crowded = np.array([[0, 8, 9, 9], [0, 8, 9, 9]])  # would collide at the end
    path = dynamic.median_path(crowded, 10)
    assert path[0] == 0 and path[-1] == 9 and all(b > a for a, b in itertools.pairwise(path))


def test_oss_per_sample_paths_on_flow_matching():
    noise = FlowMatching()
    mixture = GaussianMixture.random(num_components=2, dim=6, noise=noise, seed=1)
    source = DenoiserSource.of_mixture(mixture)
    cache = TensorCache(None)
    teacher = dynamic.record_grid_teacher(
        source, dynamic.fine_grid(noise, 12, "time_uniform"), num_samples=16, cache=cache
    )
    result = dynamic.dynamic_schedule(teacher, "euler", 4, per_sample=True, cache=cache)
    assert result.schedule.num_steps == 4 and result.schedule.ends_clean
    single = teacher.subset(slice(3, 4))
    alone = dynamic.dynamic_schedule(single, "euler", 4, per_sample=True, cache=cache)
    pooled = dynamic.dynamic_schedule(single, "euler", 4, cache=cache, reduction="rms")
    assert alone.path == pooled.path  # one trajectory: the per-sample path is the pooled one
    multistep = dynamic.dynamic_schedule(
        teacher, "dpm_solver_pp_2m", 4, per_sample=True, cache=cache
    )
    assert multistep.schedule.num_steps == 4  # 16 trajectories: two chunks of per-sample tables
    one = dynamic.dynamic_schedule(single, "dpm_solver_pp_2m", 4, per_sample=True, cache=cache)
    assert one.path == dynamic.dynamic_schedule(single, "dpm_solver_pp_2m", 4, cache=cache).path


def test_teacher_is_cached_on_disk(tmp_path):
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    mixture = GaussianMixture.random(num_components=2, dim=4, noise=noise, seed=0)
    source = DenoiserSource.of_mixture(mixture)
    grid = dynamic.fine_grid(noise, 6)
    first = dynamic.record_grid_teacher(source, grid, num_samples=8, cache=TensorCache(tmp_path))
    assert len(list(tmp_path.glob("dp-teacher-*.safetensors"))) == 1
    again = dynamic.record_grid_teacher(source, grid, num_samples=8, cache=TensorCache(tmp_path))
    assert torch.equal(first.x, again.x) and torch.equal(first.denoised, again.denoised)
    other = dynamic.record_grid_teacher(
        source, grid, num_samples=8, seed=5, cache=TensorCache(tmp_path)
    )
    assert not torch.equal(first.x, other.x)
    with pytest.raises(ValueError, match="once per grid point"):
        dynamic.record_grid_teacher(
            source, grid, num_samples=8, solver="heun", cache=TensorCache(None)
        )


@pytest.mark.parametrize("solver_name", ["ddim", "dpm_solver_pp_2m"])
def test_dp_beats_the_standard_spacings_on_held_out_seeds(solver_name):
    """On a Gaussian mixture the DP schedule (teacher on the search seed) beats time-uniform,
    logSNR-uniform and Karras on the held-out seed, scored by trajectory error."""
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    mixture = GaussianMixture.random(num_components=4, dim=8, noise=noise, seed=3)
    source = DenoiserSource.of_mixture(mixture)
    cache = TensorCache(None)
    objective = Objective(source, "traj", num_samples=128, held_out_samples=256, cache=cache)
    teacher = dynamic.record_grid_teacher(
        source, dynamic.fine_grid(noise, 40), num_samples=128, seed=0, cache=cache
    )
    solver = get_solver(solver_name)
    for nfe in (4, 6):
        result = dynamic.dynamic_schedule(teacher, solver, nfe, cache=cache)
        dp_score = objective.held_out(result.schedule, solver).value
        for spacing in (time_uniform, logsnr_uniform, karras):
            baseline = objective.held_out(spacing(noise, nfe), solver).value
            assert dp_score < baseline, (nfe, spacing.__name__, dp_score, baseline)
