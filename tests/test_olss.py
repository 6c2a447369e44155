"""OLSS: teacher recording, least-squares fits, path searches, the solver and the drop-in scheduler,
against exact Gaussian-mixture test beds."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.models.trajectories import TeacherSpec
from stepsearch.noise import EDM, DiscreteVP, FlowMatching
from stepsearch.olss import (
    OLSSCoefficients,
    OLSSSolver,
    ddim_coefficients,
    dp_path,
    fit_olss,
    greedy_path,
    record_teacher,
    teacher_forced_fit,
    uniform_path,
)
from stepsearch.olss.fit import _markov_errors
from stepsearch.sampling import sample
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({})
SPACINGS = ("time_uniform", "logsnr_uniform", "karras", "leading", "linspace", "trailing")
BASELINES = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")


def mixture_source(shape: tuple[int, ...], noise=NOISE, seed: int = 0) -> DenoiserSource:
    mixture = GaussianMixture.random(4, int(np.prod(shape)), noise, seed=seed, shape=shape)
    return DenoiserSource.of_mixture(mixture, num_reference=256)


@pytest.fixture(scope="module", params=[(2,), (1, 4, 4)], ids=["2d", "image"])
def bed(request):
    source = mixture_source(request.param)
    cache = TensorCache(None)
    recording = record_teacher(source, 64, seed=0, cache=cache)
    objective = Objective(
        source, "traj", num_samples=64, held_out_samples=128, cache=cache, bootstrap=0
    )
    return source, recording, objective


def held_out_olss(bed, nfe: int, **options) -> float:
    source, recording, objective = bed
    fit = fit_olss(recording, nfe, denoise=source.denoiser(range(64)), **options)
    return objective.held_out(fit.schedule, OLSSSolver(fit.coefficients)).value


@pytest.mark.parametrize("nfe", [4, 5, 6, 8, 10])
def test_olss_beats_builtin_solvers_on_held_out_noise(bed, nfe):
    source, _, objective = bed
    olss = held_out_olss(bed, nfe)
    for name in BASELINES:
        best = min(
            objective.held_out(make_schedule(source.noise, nfe, spacing), name).value
            for spacing in SPACINGS
        )
        assert olss < best, (name, olss, best)


@pytest.mark.parametrize("nfe", [4, 6, 10])
def test_path_search_beats_uniform_path(bed, nfe):
    assert held_out_olss(bed, nfe, search="greedy") < held_out_olss(bed, nfe, search="uniform")


# ------------------------------------------------------------------------------------------------
# exact least squares
# ------------------------------------------------------------------------------------------------


def ddim_teacher(source: DenoiserSource, num_steps: int) -> tuple:
    teacher = TeacherSpec("ddim", "time_uniform", num_steps)
    recording = record_teacher(source, 32, teacher=teacher, cache=TensorCache(None))
    return recording, make_schedule(source.noise, num_steps, "time_uniform")


@pytest.mark.parametrize("basis", ["eps", "denoised"])
def test_fit_on_ddim_teacher_gives_ddim_coefficients(basis):
    """Teacher points that ARE DDIM steps: least squares must return DDIM's rule exactly."""
    source = mixture_source((16,))
    recording, schedule = ddim_teacher(source, 6)
    expected = ddim_coefficients(schedule, basis).matrix()
    rows, errors = teacher_forced_fit(recording.summary(basis), range(7))
    fitted = OLSSCoefficients(schedule, tuple(rows), basis).matrix()
    np.testing.assert_allclose(fitted, expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())
    assert max(errors) < 1e-12
    rollout = fit_olss(
        recording, 6, path=range(7), refit="rollout", basis=basis, denoise=source.denoiser([])
    )
    np.testing.assert_allclose(
        rollout.coefficients.matrix(), expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()
    )


def test_ddim_coefficients_run_ddim():
    source = mixture_source((3,))
    schedule = make_schedule(NOISE, 5, "logsnr_uniform")
    x_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from stepsearch.solvers import get_solver

    reference = sample(source.model, x_T, schedule, get_solver("ddim")).sample
    for basis in ("eps", "denoised"):
        olss = sample(source.model, x_T, schedule, OLSSSolver(ddim_coefficients(schedule, basis)))
        torch.testing.assert_close(olss.sample, reference, rtol=1e-9, atol=1e-9)


def test_streamed_summary_equals_one_shard():
    source = mixture_source((1, 2, 2))
    small = record_teacher(source, 40, chunk_size=7, cache=TensorCache(None))
    whole = record_teacher(source, 40, chunk_size=40, cache=TensorCache(None))
    assert len(small.chunks) == 6
    a, b = small.summary("eps"), whole.summary("eps")
    assert a.num_rows == b.num_rows == 40 * 4
    torch.testing.assert_close(a.r.T @ a.r, b.r.T @ b.r, rtol=1e-10, atol=1e-10)
    rows_a, rows_b = (np.concatenate(teacher_forced_fit(s, (0, 30, 60, 100))[0]) for s in (a, b))
    np.testing.assert_allclose(rows_a, rows_b, rtol=1e-8)


def test_teacher_shards_are_cached_on_disk(tmp_path):
    calls = []
    source = mixture_source((2,))
    inner = source.model

    class Counting:
        noise = inner.noise

        def __call__(self, x, t):
            calls.append(t)
            return inner(x, t)

    counting = DenoiserSource(Counting(), (2,), source.identity, dtype=torch.float64)
    first = record_teacher(counting, 20, chunk_size=8, cache=TensorCache(tmp_path))
    assert len(calls) == 3 * 100 and len(list(tmp_path.glob("olss-teacher-*"))) == 3
    second = record_teacher(counting, 20, chunk_size=8, cache=TensorCache(tmp_path))
    assert len(calls) == 300
    torch.testing.assert_close(first.points([0, 50, 100]), second.points([0, 50, 100]))


# ------------------------------------------------------------------------------------------------
# path searches
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_summary():
    source = mixture_source((1, 2, 2))
    teacher = TeacherSpec("dpm_solver_pp_2m", "logsnr_uniform", 10)
    return record_teacher(source, 32, teacher=teacher, cache=TensorCache(None)).summary("eps")


def test_dp_path_is_the_exact_minimum(short_summary):
    errors = _markov_errors(short_summary)
    K = short_summary.num_steps

    def total(path):
        previous = [K, *path[:-2]]
        return sum(errors[p, c, j] for p, c, j in zip(previous, path[:-1], path[1:], strict=True))

    for n in (1, 3, 5):
        path, value = dp_path(short_summary, n)
        assert len(path) == n + 1 and path[0] == 0 and path[-1] == K
        brute = min(total((0, *inner, K)) for inner in itertools.combinations(range(1, K), n - 1))
        assert value == pytest.approx(brute, rel=1e-12) and total(path) == pytest.approx(value)


def test_greedy_path_meets_its_bound_and_the_bound_is_tight(short_summary):
    from stepsearch.olss.fit import _greedy, _ReachCache

    path, bound = greedy_path(short_summary, 4)
    assert len(path) == 5
    _, errors = teacher_forced_fit(short_summary, path)
    assert max(errors) <= bound * (1 + 1e-12)
    assert _greedy(_ReachCache(short_summary), 4, bound * 0.999) is None
    assert uniform_path(10, 4) == (0, 2, 5, 8, 10)


def test_bad_paths_and_step_counts_raise(short_summary):
    with pytest.raises(ValueError, match="record a longer teacher"):
        greedy_path(short_summary, 11)
    with pytest.raises(ValueError, match="strictly"):
        teacher_forced_fit(short_summary, (0, 5, 5, 10))
    with pytest.raises(ValueError, match="from teacher index 0"):
        teacher_forced_fit(short_summary, (1, 10))


# ------------------------------------------------------------------------------------------------
# any noise family
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("noise", "basis"), [(EDM(), "eps"), (FlowMatching(), "denoised")], ids=["edm", "flow"]
)
def test_other_noise_families(noise, basis):
    source = mixture_source((2,), noise=noise)
    cache = TensorCache(None)
    recording = record_teacher(source, 64, cache=cache)
    fit = fit_olss(recording, 5, basis=basis, denoise=source.denoiser([]))
    objective = Objective(source, "traj", num_samples=64, cache=cache, bootstrap=0)
    olss = objective.held_out(fit.schedule, OLSSSolver(fit.coefficients)).value
    ddim = min(objective.held_out(make_schedule(noise, 5, s), "ddim").value for s in SPACINGS[:3])
    assert olss < 0.5 * ddim


# ------------------------------------------------------------------------------------------------
# the solver as data
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    source = mixture_source((1, 4, 4))
    recording = record_teacher(source, 32, cache=TensorCache(None))
    return source, fit_olss(recording, 5, denoise=source.denoiser([]))


def test_coefficients_round_trip_and_refuse_other_schedules(fitted):
    _, fit = fitted
    again = OLSSCoefficients.from_json_dict(json.loads(json.dumps(fit.coefficients.to_json_dict())))
    assert again.coefficients == fit.coefficients.coefficients and again.basis == "eps"
    solver = OLSSSolver(again)
    with pytest.raises(ValueError, match="fitted for the 5-step"):
        solver.evaluation_times(make_schedule(NOISE, 5, "karras"))
    with pytest.raises(ValueError, match="coefficient rows"):
        OLSSCoefficients(fit.schedule, fit.coefficients.coefficients[:-1])
    assert OLSSSolver.from_config(
        json.loads(json.dumps(solver.config()))
    ).coefficients.coefficients == (fit.coefficients.coefficients)


def _run_scheduler(scheduler, mixture, x: torch.Tensor) -> torch.Tensor:
    """A diffusers-style loop with the exact mixture's eps as the model output."""
    scheduler.set_timesteps(scheduler.num_fitted_steps)
    noise = scheduler.noise
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(scheduler.schedule.times[i])
        eps = (x - float(noise.alpha(t)) * mixture(x, t)) / float(noise.sigma(t))
        x = scheduler.step(eps, timestep, x).prev_sample
    return x


CHILD = """
import torch
from safetensors.torch import save_file
from stepsearch.integrations.olss import StepsearchOLSSScheduler
from stepsearch.noise import DiscreteVP
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

scheduler = StepsearchOLSSScheduler.from_pretrained({directory!r})
mixture = GaussianMixture.random(4, 16, DiscreteVP.from_diffusers_config({{}}), seed=0, shape=(1, 4, 4))
x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
scheduler.set_timesteps(scheduler.num_fitted_steps)
noise = scheduler.noise
for i, timestep in enumerate(scheduler.timesteps):
    t = float(scheduler.schedule.times[i])
    eps = (x - float(noise.alpha(t)) * mixture(x, t)) / float(noise.sigma(t))
    x = scheduler.step(eps, timestep, x).prev_sample
save_file({{"x": x}}, {output!r})
"""
"""The same loop as :func:`_run_scheduler`, in a fresh interpreter."""


def test_scheduler_round_trips_bit_for_bit_in_a_fresh_process(fitted, tmp_path):
    from safetensors.torch import load_file

    from stepsearch.integrations.olss import StepsearchOLSSScheduler

    source, fit = fitted
    scheduler = StepsearchOLSSScheduler.from_fit(fit, provenance={"model": "mixture", "nfe": 5})
    scheduler.save_pretrained(tmp_path / "scheduler")
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    here = _run_scheduler(scheduler, source.model, x)
    solver_samples = sample(source.model, x, fit.schedule, OLSSSolver(fit.coefficients)).sample
    torch.testing.assert_close(here, solver_samples, rtol=1e-5, atol=1e-6)
    script = CHILD.format(
        directory=str(tmp_path / "scheduler"),
        output=str(tmp_path / "child.safetensors"),
    )
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True)
    assert torch.equal(load_file(tmp_path / "child.safetensors")["x"], here)
    loaded = StepsearchOLSSScheduler.from_pretrained(tmp_path / "scheduler")
    assert loaded.provenance == {"model": "mixture", "nfe": 5}
    assert loaded.config.solver == "olss"


def test_scheduler_refuses_what_it_was_not_fitted_for(fitted):
    from stepsearch.integrations.olss import StepsearchOLSSScheduler

    source, fit = fitted
    scheduler = StepsearchOLSSScheduler.from_fit(fit)
    with pytest.raises(ValueError, match="fitted for 5 steps, not 6"):
        scheduler.set_timesteps(6)
    with pytest.raises(ValueError, match="cannot honour these timesteps"):
        scheduler.set_timesteps(timesteps=[999, 600, 300, 100, 10])
    with pytest.raises(ValueError, match="cannot honour these sigmas"):
        scheduler.set_timesteps(sigmas=[100.0, 5.0, 1.0, 0.5, 0.1, 0.0])
    with pytest.raises(ValueError, match="needs fitted coefficients"):
        StepsearchOLSSScheduler()
    scheduler.set_timesteps(5)
    scheduler.set_timesteps(timesteps=scheduler.timesteps)  # its own timesteps / sigmas are fine
    scheduler.set_timesteps(sigmas=scheduler.sigmas)
    with pytest.raises(ValueError):
        scheduler.set_begin_index(2)
    # state resets on set_timesteps: an abandoned run leaves no trace
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    full = _run_scheduler(scheduler, source.model, x)
    scheduler.set_timesteps(5)
    scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x)
    assert torch.equal(_run_scheduler(scheduler, source.model, x), full)


def test_schedule_on_fitted_times_is_a_valid_step_schedule(fitted):
    _, fit = fitted
    assert isinstance(fit.schedule, StepSchedule) and fit.schedule.ends_clean
    assert fit.schedule.num_steps == 5 and len(fit.step_errors) == 5
