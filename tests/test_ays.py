"""Align Your Steps: the KLUB estimator, the coordinate search, the search job and its resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from stepsearch.ays.klub import Interval, KLUBEstimator, gaussian_klub_interval
from stepsearch.ays.optimize import (
    EulerGaussianKL,
    ExactGaussianKLUB,
    SearchSettings,
    SearchState,
    coordinate_search,
    initial_state,
    subdivide,
)
from stepsearch.ays.search import AYSConfig, search_ays
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import EDM, DiscreteVP, FlowMatching
from stepsearch.schedule import ays_gaussian, karras, make_schedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

C = 0.5


def _gaussian(noise, dim=4, shape=None):
    return GaussianMixture.gaussian(np.zeros(dim), np.full(dim, C**2), noise, shape)


# --- estimator ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "noise", [EDM(), DiscreteVP.from_diffusers_config({}), FlowMatching()], ids=type
)
@pytest.mark.parametrize("proposal", ["gaussian", "paper"])
def test_klub_matches_the_gaussian_closed_form_on_every_time_axis(noise, proposal):
    """The k-diffusion sigma mapping: the same intervals give the same KLUB on VE, VP and flow."""
    gaussian = _gaussian(noise)
    data = gaussian.sample(8192, generator=torch.Generator().manual_seed(0))
    estimator = KLUBEstimator(
        gaussian, data, num_samples=4096, proposal=proposal, dtype=torch.float64, seed=3
    )
    intervals = [Interval(0.05, 0.2), Interval(0.2, 1.0), Interval(1.0, 5.0)]
    estimate = estimator.terms(intervals)
    exact = [4 * gaussian_klub_interval(iv.lower, iv.upper, C) for iv in intervals]
    np.testing.assert_allclose(estimate, exact, rtol=0.05)
    assert estimator.evaluations == 3 * 4096 * 2


class _LinearInLambda:
    """A "denoiser" that is exactly linear in ``lambda = -log sigma`` and ignores ``x``."""

    noise = EDM()

    def __call__(self, x, t):
        lambda_ = -torch.log(torch.as_tensor(t, dtype=x.dtype)).reshape(-1, *([1] * (x.ndim - 1)))
        return lambda_ * torch.ones_like(x)


def test_klub_uses_common_random_numbers_and_order_two_extrapolates():
    gaussian = _gaussian(EDM(), dim=2)
    data = gaussian.sample(512, generator=torch.Generator().manual_seed(0))
    first = KLUBEstimator(gaussian, data, num_samples=256, dtype=torch.float64)
    second = KLUBEstimator(gaussian, data, num_samples=256, order=2, dtype=torch.float64)
    interval = Interval(0.3, 1.0)
    assert first.terms([interval])[0] == first.terms([interval])[0]  # fixed draws
    # without an earlier evaluation an order-2 term is the first-order one, with the same draws
    assert second.terms([interval])[0] == pytest.approx(first.terms([interval])[0], rel=1e-12)
    # the line in lambda through (previous, upper) is exact for a denoiser linear in lambda
    linear = _LinearInLambda()
    exact = KLUBEstimator(linear, data, num_samples=64, order=2, dtype=torch.float64)
    frozen = KLUBEstimator(linear, data, num_samples=64, order=1, dtype=torch.float64)
    assert exact.terms([Interval(0.3, 1.0, 2.0)])[0] < 1e-20
    assert frozen.terms([Interval(0.3, 1.0, 2.0)])[0] > 1.0


class _Memoriser:
    """A conditional denoiser that knows each row's data sample: ``D(x, t) = data[index]`` (the
    exact posterior mean when the conditioning pins the sample down, e.g. a caption per image)."""

    def __init__(self, data: torch.Tensor, noise, indices):
        self.data, self.noise, self.indices = data, noise, list(indices)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        assert x.shape[0] == len(self.indices)
        return self.data[self.indices].to(x.dtype)


def test_conditioned_klub_routes_every_row_to_its_own_data_sample():
    """With a per-sample oracle every KLUB term is exactly 0, but only if row j is conditioned
    on data sample data_index[j] in every part of the batch (the noisy point, the interval's upper
    end and the order-2 previous point); the unconditional posterior mean of the same three points
    is not constant, so its KLUB is positive."""
    noise = EDM()
    data = torch.tensor([[-1.0, 0.5], [0.25, 2.0], [1.5, -1.0]], dtype=torch.float64)

    def conditioned(indices):
        return _Memoriser(data, noise, indices)

    mixture = GaussianMixture(
        np.full(3, 1 / 3), data.numpy(), np.tile(1e-6 * np.eye(2), (3, 1, 1)), noise
    )
    for order in (1, 2):
        intervals = [Interval(0.2, 1.0, 3.0 if order == 2 else None), Interval(1.0, 5.0)]
        oracle = KLUBEstimator(
            conditioned(range(3)), data, conditioned=conditioned, num_samples=12, order=order,
            batch_size=5, dtype=torch.float64,
        )  # fmt: skip
        assert np.array_equal(oracle.terms(intervals), np.zeros(2))
        unconditional = KLUBEstimator(
            mixture, data, num_samples=12, order=order, batch_size=5, dtype=torch.float64
        )
        assert (unconditional.terms(intervals) > 1e-3).all()


def test_klub_rejects_bad_input():
    gaussian = _gaussian(EDM(), dim=2)
    data = gaussian.sample(8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="order"):
        KLUBEstimator(gaussian, data, order=3)
    with pytest.raises(ValueError, match="proposal"):
        KLUBEstimator(gaussian, data, proposal="uniform")
    with pytest.raises(ValueError, match="NaN"):
        KLUBEstimator(gaussian, data * float("nan"))
    with pytest.raises(ValueError, match="lower < upper"):
        Interval(1.0, 0.5)


# --- optimizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [5, 10])
def test_coordinate_search_recovers_theorem_3_1(num_steps):
    """Thm 3.1's objective (the exact KL of Euler on Gaussian data) has ays_gaussian as optimum."""
    noise = EDM()
    settings = SearchSettings(min_radius=1e-4, max_sweeps=400)
    start = karras(noise, num_steps, clean_end=False).to_kdiffusion_sigmas()
    cost = EulerGaussianKL(C)
    state = coordinate_search(cost, initial_state(cost, start, settings=settings), settings)
    expected = ays_gaussian(noise, num_steps, sigma_data=C, clean_end=False).to_kdiffusion_sigmas()
    assert state.reason == "stable"
    np.testing.assert_allclose(state.sigmas, expected, rtol=0.02)
    assert np.all(np.diff([entry["klub"] for entry in state.history]) <= 0)


def _exact_klub_optimum(sigma_min, sigma_max, num_intervals):
    cost = ExactGaussianKLUB(C)

    def total(z):
        fractions = np.cumsum(np.exp(z)) / np.exp(z).sum()
        inner = np.exp(np.log(sigma_min) + (np.log(sigma_max) - np.log(sigma_min)) * fractions)
        sigmas = np.concatenate([[sigma_max], inner[:-1][::-1], [sigma_min]])
        from stepsearch.ays.klub import intervals_of

        return cost.terms(intervals_of(sigmas)).sum(), sigmas

    found = minimize(
        lambda z: total(z)[0],
        np.zeros(num_intervals),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000},
    )
    return total(found.x)[1]


def test_klub_search_on_1d_gaussian_data_finds_the_klub_optimum():
    """Monte Carlo KLUB + coordinate search land on the closed-form KLUB's optimum (scipy); that
    optimum is *not* Thm 3.1's schedule (the KLUB bounds the SDE, the theorem is the ODE's KL)."""
    noise = EDM(sigma_min=0.01, sigma_max=20.0)
    gaussian = _gaussian(noise, dim=1)
    data = gaussian.sample(4096, generator=torch.Generator().manual_seed(1))
    estimator = KLUBEstimator(gaussian, data, num_samples=1024, dtype=torch.float64)
    settings = SearchSettings(min_radius=1 / 128, max_sweeps=60)
    start = karras(noise, 4, clean_end=False).to_kdiffusion_sigmas()
    state = coordinate_search(
        estimator, initial_state(estimator, start, settings=settings), settings
    )
    optimum = _exact_klub_optimum(0.01, 20.0, 4)
    np.testing.assert_allclose(state.sigmas, optimum, rtol=0.04)
    theorem = ays_gaussian(noise, 4, sigma_data=C, clean_end=False).to_kdiffusion_sigmas()
    assert np.abs(np.asarray(state.sigmas) / theorem - 1).max() > 0.3


def test_hierarchical_stages_stop_at_the_requested_step_count():
    from stepsearch.ays.search import hierarchical_plan

    assert hierarchical_plan(10, 2, 5) == [10]
    assert hierarchical_plan(10, 2, 10) == [10]
    assert hierarchical_plan(10, 2, 11) == [10, 20]
    assert hierarchical_plan(10, 2, 32) == [10, 20, 40]
    assert hierarchical_plan(10, 2, 50) == [10, 20, 40]  # then interpolated up
    assert hierarchical_plan(3, 1, 5) == [3, 6]


def test_subdivide_frees_only_the_new_points():
    refined, free = subdivide([8.0, 2.0, 0.5])
    assert refined == pytest.approx([8.0, 4.0, 2.0, 1.0, 0.5])
    assert free == [False, True, False, True, False]
    cost = EulerGaussianKL(C)
    state = coordinate_search(cost, initial_state(cost, refined, free))
    assert state.sigmas[0::2] == [8.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="decrease"):
        subdivide([1.0, 2.0])


def test_search_state_round_trips_through_json():
    cost = EulerGaussianKL(C)
    state = initial_state(cost, [80.0, 1.0, 0.1, 0.002])
    again = SearchState.from_json_dict(json.loads(json.dumps(state.to_json_dict())))
    assert again == state
    with pytest.raises(ValueError, match="search state"):
        SearchState.from_json_dict({"sigmas": []})


# --- the search job on Gaussian-mixture test beds -------------------------------------------------
@pytest.fixture(scope="module")
def mixtures():
    flat = GaussianMixture.random(4, 2, EDM(), seed=1)
    image = GaussianMixture.random(
        4, 16, DiscreteVP.from_diffusers_config({}), seed=1, shape=(1, 4, 4)
    )
    return {"2d-edm": flat, "image-vp": image}


@pytest.mark.parametrize("solver", ["dpm_solver_pp_2m", "ddim"])
@pytest.mark.parametrize("name", ["2d-edm", "image-vp"])
def test_ays_beats_the_built_in_spacings_on_held_out_seeds(mixtures, name, solver):
    mixture = mixtures[name]
    source = DenoiserSource.of_mixture(mixture, num_reference=1024)
    objective = Objective(
        source, "traj", num_samples=64, held_out_samples=256, cache=TensorCache(None), bootstrap=0
    )
    config = AYSConfig(strategy="direct", num_samples=48, max_sweeps=6)
    result = search_ays(source, solver, 10, objective=objective, config=config)
    history = [entry["klub"] for entry in result.runs["direct"].stages[0].history]
    assert np.all(np.diff(history) <= 0) and history[-1] < history[0]
    baselines = {
        spacing: objective.held_out(make_schedule(mixture.noise, 10, spacing), solver).value
        for spacing in ("time_uniform", "karras", "logsnr_uniform")
    }
    assert result.held_out.value < min(baselines.values()), (result.held_out.value, baselines)
    provenance = result.schedule_file.provenance
    assert provenance.search["family"] == "ays" and provenance.nfe == 10
    assert provenance.scores["held_out"]["value"] == pytest.approx(result.held_out.value)


def test_ays_on_flow_matching_starts_time_uniform_and_improves_on_it():
    """Flow matching: sigma_max = exp(30) at t = 1 is handled in sigma space."""
    mixture = GaussianMixture.random(3, 2, FlowMatching(), seed=1)
    source = DenoiserSource.of_mixture(mixture, num_reference=512)
    objective = Objective(
        source, "traj", num_samples=64, held_out_samples=256, cache=TensorCache(None), bootstrap=0
    )
    config = AYSConfig(strategy="direct", num_samples=32, max_sweeps=4)
    result = search_ays(source, "dpm_solver_pp_2m", 8, objective=objective, config=config)
    assert result.schedule.times[0] == pytest.approx(1.0, abs=1e-9) and result.schedule.ends_clean
    uniform = objective.held_out(
        make_schedule(mixture.noise, 8, "time_uniform"), "dpm_solver_pp_2m"
    )
    assert result.held_out.value < 0.8 * uniform.value


def test_search_file_loads_back_and_refuses_another_noise(mixtures, tmp_path):
    mixture = mixtures["image-vp"]
    source = DenoiserSource.of_mixture(mixture, num_reference=256)
    objective = Objective(source, "traj", num_samples=16, cache=TensorCache(None), bootstrap=0)
    config = AYSConfig(
        strategy="hierarchical", base_intervals=3, refinements=1, num_samples=8, max_sweeps=1
    )
    result = search_ays(source, "ddim", 5, objective=objective, config=config)
    path = tmp_path / "ays.json"
    result.schedule_file.save(path)
    loaded = ScheduleFile.load(path, noise=mixture.noise, model=source.identity)
    assert loaded.schedule == result.schedule and loaded.schedule.num_steps == 5
    assert loaded.schedule.ends_clean
    loaded.schedule.to_diffusers_timesteps()  # snapped: usable as pipe(timesteps=...)
    with pytest.raises(ValueError, match="another noise schedule"):
        ScheduleFile.load(path, noise=EDM())
    with pytest.raises(ValueError, match="no reference data"):
        search_ays(
            DenoiserSource(mixture, (1, 4, 4), source.identity),
            "ddim",
            5,
            objective=objective,
            config=config,
        )


# --- resume after SIGKILL -------------------------------------------------------------------------
_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from stepsearch.ays.search import AYSConfig, search_ays
    from stepsearch.cache import TensorCache
    from stepsearch.eval.objective import Objective
    from stepsearch.models.source import DenoiserSource
    from stepsearch.noise import EDM
    from stepsearch.testbeds.gaussian_mixture import GaussianMixture

    checkpoint, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mixture = GaussianMixture.random(3, 2, EDM(), seed=2)
    source = DenoiserSource.of_mixture(mixture, num_reference=256)
    objective = Objective(source, "traj", num_samples=16, cache=TensorCache(None), bootstrap=0)
    config = AYSConfig(strategy="hierarchical", base_intervals=4, refinements=1, num_samples=16,
                       max_sweeps=4)
    sweeps = 0

    def progress(strategy, stage, state):
        global sweeps
        sweeps += 1
        if sweeps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = search_ays(source, "dpm_solver_pp_2m", 6, objective=objective, config=config,
                        checkpoint=checkpoint, on_progress=progress)
    json.dump({"times": result.schedule.times.tolist(), "sweeps": sweeps}, open(out, "w"))
    """
)


def _run(script: Path, *args: object) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    source_dir = str(Path(__file__).resolve().parents[1] / "src")
    environment["PYTHONPATH"] = source_dir + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_killed_search_resumes_to_the_same_schedule(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    whole = _run(script, tmp_path / "a.ckpt.json", tmp_path / "a.json", 0)
    assert whole.returncode == 0, whole.stderr
    killed = _run(script, tmp_path / "b.ckpt.json", tmp_path / "b.json", 3)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "b.ckpt.json").exists() and not (tmp_path / "b.json").exists()
    resumed = _run(script, tmp_path / "b.ckpt.json", tmp_path / "b.json", 0)
    assert resumed.returncode == 0, resumed.stderr
    first = json.loads((tmp_path / "a.json").read_text())
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["times"] == first["times"]
    assert second["sweeps"] < first["sweeps"]  # the resumed run skipped the finished sweeps
    # the same checkpoint with other settings is refused
    mixture = GaussianMixture.random(3, 2, EDM(), seed=2)
    source = DenoiserSource.of_mixture(mixture, num_reference=256)
    objective = Objective(source, "traj", num_samples=16, cache=TensorCache(None), bootstrap=0)
    with pytest.raises(ValueError, match="another AYS search"):
        search_ays(
            source,
            "dpm_solver_pp_2m",
            6,
            objective=objective,
            config=AYSConfig(num_samples=17),
            checkpoint=tmp_path / "b.ckpt.json",
        )


def test_search_ays_rejects_bad_arguments(mixtures):
    source = DenoiserSource.of_mixture(mixtures["2d-edm"], num_reference=64)
    objective = Objective(source, "traj", num_samples=4, cache=TensorCache(None), bootstrap=0)
    with pytest.raises(ValueError, match="strategy"):
        AYSConfig(strategy="greedy")
    with pytest.raises(ValueError, match="nfe"):
        search_ays(source, "ddim", 0, objective=objective)
    with pytest.raises(ValueError, match="exactly"):
        search_ays(source, "heun", 4, objective=objective)
    with pytest.raises(ValueError, match="shape"):
        search_ays(source, "ddim", 4, objective=objective, data=torch.zeros(8, 3))
    assert math.isfinite(objective(karras(source.noise, 4), "ddim").value)
