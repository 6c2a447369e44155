"""The public objective: common random numbers, search vs held-out seeds, cached teachers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.models.trajectories import TeacherSpec
from stepsearch.noise import EDM, DiscreteVP
from stepsearch.plan import SolverPlan
from stepsearch.schedule import karras, logsnr_uniform
from stepsearch.testbeds.gaussian_mixture import GaussianMixture


class CountingDenoiser:
    """A denoiser that counts its calls (model evaluations)."""

    def __init__(self, inner):
        self.inner, self.noise, self.calls = inner, inner.noise, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.inner(x, t)


@pytest.fixture(scope="module")
def gaussian():
    noise = EDM()
    rng = np.random.default_rng(0)
    return GaussianMixture.gaussian(rng.normal(size=8), rng.uniform(0.05, 0.5, 8), noise)


def test_teacher_is_the_exact_ode_solution(gaussian, tmp_path):
    source = DenoiserSource.of_mixture(gaussian, name="gauss")
    objective = Objective(source, num_samples=64, cache=TensorCache(tmp_path))
    teacher = objective.teacher()
    schedule = logsnr_uniform(source.noise, 100)
    x_T = (
        torch.stack([torch.randn(8, generator=_gen(0, i), dtype=torch.float64) for i in range(64)])
        * schedule.sigmas[0]
    )
    exact = gaussian.ode_solution(x_T, float(schedule.times[0]), float(schedule.times[-1]))
    assert (teacher - exact).abs().max() < 1e-4


def _gen(seed, index):
    from stepsearch.models.batches import sample_generator

    return sample_generator(seed, index)


def test_score_falls_with_nfe_and_is_reproducible(gaussian):
    source = DenoiserSource.of_mixture(gaussian)
    objective = Objective(source, num_samples=128, solver="dpm_solver_pp_2m", cache=TensorCache())
    scores = [objective(logsnr_uniform(source.noise, n)).value for n in (8, 16, 32, 64)]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert scores[-1] < 0.1 * scores[0]
    again = objective(logsnr_uniform(source.noise, 16))
    assert again.value == scores[1]  # common random numbers: the same noise every call
    assert again.per_sample is not None and again.per_sample.shape == (128,)
    assert again.std is not None and 0 < again.std < again.value
    assert again.nfe == 16 and again.split == "search"


def test_score_counts_a_plans_own_evaluations(gaussian):
    """An analytical first step skips the network: the plan spends one evaluation fewer than its
    schedule has steps, and the score says so."""
    source = DenoiserSource.of_mixture(gaussian)
    objective = Objective(source, num_samples=8, solver="plan", cache=TensorCache())
    plan = SolverPlan.uniform(logsnr_uniform(source.noise, 6), 2, first_step="zero_x0")
    score = objective(plan)
    assert plan.nfe == plan.num_steps - 1
    assert score.nfe == plan.nfe


def test_held_out_uses_other_noise(gaussian):
    source = DenoiserSource.of_mixture(gaussian)
    objective = Objective(
        source, num_samples=64, held_out_samples=96, solver="ddim", cache=TensorCache()
    )
    schedule = karras(source.noise, 6)
    search, held_out = objective(schedule), objective.held_out(schedule)
    assert held_out.split == "held_out" and held_out.num_samples == 96
    assert search.value != held_out.value
    assert not torch.equal(objective.teacher("search")[:64], objective.teacher("held_out")[:64])
    with pytest.raises(ValueError, match="never saw"):
        Objective(source, search_seed=3, held_out_seed=3)


def test_teacher_cached_across_processes(gaussian, tmp_path):
    counting = CountingDenoiser(gaussian)
    first = DenoiserSource.of_mixture(gaussian, name="gauss")
    first.model = counting
    spec = TeacherSpec(num_steps=20)
    Objective(first, num_samples=32, teacher=spec, cache=TensorCache(tmp_path)).teacher()
    assert counting.calls == 20
    # a second "process": a fresh objective and a fresh in-memory cache over the same directory
    second = Objective(first, num_samples=32, teacher=spec, cache=TensorCache(tmp_path))
    second.teacher()
    assert counting.calls == 20
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1
    # another seed or sample count is another entry
    Objective(first, num_samples=16, teacher=spec, cache=TensorCache(tmp_path)).teacher()
    assert counting.calls == 40


def test_fd_metric_against_exact_data(tmp_path):
    noise = EDM()
    mixture = GaussianMixture.random(num_components=3, dim=4, noise=noise, seed=1)
    source = DenoiserSource.of_mixture(mixture, num_reference=4096)
    objective = Objective(
        source, "fd", num_samples=1024, solver="dpm_solver_pp_2m", cache=TensorCache(tmp_path)
    )
    coarse, fine = objective(karras(noise, 3)), objective(karras(noise, 40))
    assert fine.value < 0.2 * coarse.value
    assert fine.value < 0.05  # converged samples follow the exact distribution
    assert fine.std is not None


def test_bad_candidates_and_metrics(gaussian):
    source = DenoiserSource.of_mixture(gaussian)
    objective = Objective(source, num_samples=8, cache=TensorCache())
    with pytest.raises(ValueError, match="name a solver"):
        objective(karras(source.noise, 4))
    with pytest.raises(ValueError, match="another noise schedule"):
        objective(logsnr_uniform(DiscreteVP.stable_diffusion(), 4), "ddim")
    with pytest.raises(ValueError, match="unknown metric"):
        Objective(source, "bogus")
    bare = DenoiserSource(gaussian, (8,), source.identity)
    with pytest.raises(ValueError, match="feature network"):
        Objective(bare, "fd")


# --- schedule files with provenance --------------------------------------------------------------


def _fitted(gaussian):
    from stepsearch.schedule_file import ScheduleFile

    source = DenoiserSource.of_mixture(gaussian, name="gauss")
    objective = Objective(source, num_samples=16, solver="ddim", cache=TensorCache())
    schedule = karras(source.noise, 5)
    provenance = objective.provenance(
        objective.solver, objective(schedule), objective.held_out(schedule), "test", {"budget": 1}
    )
    return ScheduleFile(schedule, provenance), source


def test_schedule_file_round_trip_and_checks(gaussian, tmp_path):
    import json

    from stepsearch.schedule_file import ModelMismatchWarning, ScheduleFile, load_schedule

    fitted, source = _fitted(gaussian)
    path = tmp_path / "fit.json"
    fitted.save(path)
    loaded = ScheduleFile.load(path, noise=source.noise, model=source.identity)
    assert loaded.schedule == fitted.schedule
    assert loaded.provenance.to_json_dict() == fitted.provenance.to_json_dict()
    assert loaded.provenance.scores["held_out"]["split"] == "held_out"
    assert loaded.provenance.seeds == {"search": 0, "held_out": 1}
    assert load_schedule(path, noise=source.noise) == fitted.schedule
    with pytest.raises(ValueError, match=r"another noise schedule.*EDM"):
        ScheduleFile.load(path, noise=DiscreteVP.stable_diffusion())
    other = {"name": "other", "digest": "sha256:0"}
    with pytest.warns(ModelMismatchWarning, match="fitted on model 'gauss'.*'other'"):
        ScheduleFile.load(path, model=other)

    payload = json.loads(path.read_text())

    def broken(edit) -> str:
        copy = json.loads(json.dumps(payload))
        edit(copy)
        target = tmp_path / "broken.json"
        target.write_text(json.dumps(copy))
        return str(target)

    cases = {
        "version": lambda p: p.update(version=2),
        "lacks 'seeds'": lambda p: p["provenance"].pop("seeds"),
        "lacks 'provenance'": lambda p: p.pop("provenance"),
        "strictly decreasing": lambda p: p["schedule"]["times"].reverse(),
        "positive integer": lambda p: p["provenance"].update(nfe=0),
    }
    for message, edit in cases.items():
        with pytest.raises(ValueError, match=message):
            ScheduleFile.load(broken(edit))
    nan_file = tmp_path / "nan.json"
    nan_file.write_text(path.read_text().replace(str(payload["schedule"]["times"][1]), "NaN", 1))
    with pytest.raises(ValueError, match="non-finite"):
        ScheduleFile.load(nan_file)


def test_schedule_file_fitted_at_another_guidance_warns_and_loads_in_eval(gaussian, tmp_path):
    """A schedule fitted at guidance 4 used at 2 warns; at 4, or where either side names no
    scale, it does not; ``stepsearch eval --schedules`` reads a search's schedule file."""
    import dataclasses
    import warnings

    from stepsearch.eval.evaluate import methods_from_names, sampling_guidance_scale
    from stepsearch.schedule_file import GuidanceMismatchWarning, ScheduleFile, load_schedule

    fitted, source = _fitted(gaussian)
    guided = ScheduleFile(
        fitted.candidate, dataclasses.replace(fitted.provenance, guidance_scale=4.0)
    )
    path = tmp_path / "guided.json"
    guided.save(path)
    with pytest.warns(GuidanceMismatchWarning, match="fitted at guidance scale 4 but is used at 2"):
        load_schedule(path, noise=source.noise, guidance_scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_schedule(path, guidance_scale=4.0) == fitted.schedule
        assert load_schedule(path) == fitted.schedule
        unguided = tmp_path / "unguided.json"
        fitted.save(unguided)  # guidance_scale None: nothing to compare
        ScheduleFile.load(unguided, guidance_scale=2.0)
    # fitted under a guidance schedule: no one scale, and a constant scale at use warns
    scheduled = tmp_path / "scheduled.json"
    schedule_record = {"shape": "interval", "parameters": {"weight": 2.5}}
    ScheduleFile(
        fitted.candidate,
        dataclasses.replace(fitted.provenance, extra={"guidance_schedule": schedule_record}),
    ).save(scheduled)
    with pytest.warns(GuidanceMismatchWarning, match=r"guidance schedule \(interval\) but is"):
        load_schedule(scheduled, guidance_scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_schedule(scheduled) == fitted.schedule
    with pytest.warns(GuidanceMismatchWarning):
        (method,) = methods_from_names([str(path)], ["ddim"], [], guidance_scale=7.5)
    assert method.schedule == fitted.schedule.with_metadata(name="guided")
    assert method.label.endswith("guided")
    assert sampling_guidance_scale("digits", None, None) is None
    assert sampling_guidance_scale("digits-cond", None, None) == 2.0
    assert sampling_guidance_scale("digits", "pipe", None) == 7.5
    assert sampling_guidance_scale("digits-cond", None, 3) == 3.0


def test_score_samples_of_a_diffusers_loop_matches_the_solver():
    """diffusers' DDIMScheduler on trailing spacing is exact DDIM at 5 steps (REFERENCES: its
    uniform-step assumption holds there): its samples, scored through ``score_samples`` from the
    objective's noise, must score what stepsearch's DDIM scores on the same schedule."""
    from diffusers import DDIMScheduler

    from stepsearch.models import load_image_model
    from stepsearch.models.batches import generate_with_diffusers_scheduler
    from stepsearch.schedule import diffusers_spacing

    model = load_image_model("digits")
    source = model  # an ImageModel is a sample source
    objective = Objective(
        source,
        num_samples=16,
        solver="ddim",
        teacher=TeacherSpec(num_steps=20),
        cache=TensorCache(None),
        bootstrap=0,
    )
    scheduler = DDIMScheduler.from_config(
        model.scheduler_config,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    samples, nfe = generate_with_diffusers_scheduler(
        model.model_fn,
        scheduler,
        5,
        16,
        model.sample_shape,
        seed=objective.seeds["search"],
        progress=False,
    )
    theirs = objective.score_samples(samples, nfe, split="search")
    ours = objective(diffusers_spacing(source.noise, 5, "trailing"))
    assert theirs.nfe == ours.nfe == 5
    assert abs(theirs.value - ours.value) < 1e-4 * ours.value
    smaller = Objective(source, num_samples=8, cache=TensorCache(None))
    with pytest.raises(ValueError, match="16 samples for the search split, which has 8"):
        smaller.score_samples(samples, nfe, split="search")
