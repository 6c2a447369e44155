"""The guidance-schedule search (``stepsearch search guidance``) on the bundled ``digits-cond``.

Ground truth: the network passes the budget rule predicts are the passes the guided denoiser
really runs; the Pareto front is the brute-force non-dominated set; the pick obeys its stated rule;
the study holds every trial and a rerun adds none; the files load back with provenance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.guidance import GuidanceSchedule, load_guidance, noise_range, unet_passes
from stepsearch.models import load_model
from stepsearch.models.source import initial_noise_for
from stepsearch.sampling import sample
from stepsearch.schedule import karras
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.guidance import (
    GuidanceCandidate,
    GuidanceScore,
    GuidanceSearchSettings,
    GuidanceTrial,
    constant_curve_point,
    pareto_front,
    pick_trial,
    search_guidance,
    selection_pool,
    steps_for_budget,
)
from stepsearch.solvers import get_solver

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def digits_cond() -> Any:
    return load_model("digits-cond")


@pytest.mark.parametrize("solver_name", ["dpm_solver_pp_2m", "heun"])
def test_budget_counts_the_passes_the_denoiser_runs(digits_cond, solver_name):
    solver = get_solver(solver_name)
    low, high = noise_range(digits_cond.noise)
    schedules = [
        GuidanceSchedule.constant(2.0),
        GuidanceSchedule.constant(1.0),
        GuidanceSchedule.linear(2.0, low, high),
        GuidanceSchedule.interval(3.0, 0.3, 5.0),
    ]
    for guidance in schedules:
        grid, passes = steps_for_budget(guidance, digits_cond.noise, solver, 12, rho=7.0)
        assert passes <= 12
        # one more step would not fit
        longer = karras(digits_cond.noise, grid.num_steps + 1, rho=7.0)
        sigmas = digits_cond.noise.kdiffusion_sigma(solver.evaluation_times(longer))
        assert unet_passes(guidance(sigmas)) > 12
        model = dataclasses.replace(digits_cond, guidance_schedule=guidance)
        denoiser = model.denoiser([0, 1, 2])
        with torch.inference_mode():
            sample(denoiser, initial_noise_for(model, [0, 1, 2], 0, grid), grid, solver)
        assert denoiser.passes == passes
    constant, _ = steps_for_budget(schedules[0], digits_cond.noise, get_solver("ddim"), 12, 7.0)
    interval, spent = steps_for_budget(schedules[3], digits_cond.noise, get_solver("ddim"), 12, 7.0)
    assert constant.num_steps == 6 and interval.num_steps > 6 and spent <= 12


def _trial(number: int, fd: float, accuracy: float) -> GuidanceTrial:
    score = GuidanceScore(fd, None, accuracy, 0.0, 4, 8, 10, "search")
    return GuidanceTrial(
        number, "search", GuidanceCandidate(GuidanceSchedule.constant(2), 7), score
    )


def test_pareto_front_is_the_non_dominated_set():
    generator = torch.Generator().manual_seed(3)
    points = torch.rand(40, 2, generator=generator).double()
    points[5] = points[6]  # ties do not dominate each other
    trials = [_trial(i, float(f), float(a)) for i, (f, a) in enumerate(points)]
    trials.append(_trial(99, math.nan, 1.0))
    expected = {
        t.number
        for t in trials[:-1]
        if not any(
            (o.score.fd <= t.score.fd and o.score.accuracy >= t.score.accuracy)
            and (o.score.fd, o.score.accuracy) != (t.score.fd, t.score.accuracy)
            for o in trials[:-1]
        )
    }
    front = pareto_front(trials)
    assert {t.number for t in front} == expected and len(expected) >= 2
    assert [t.score.fd for t in front] == sorted(t.score.fd for t in front)


def test_selection_pool_is_the_constants_and_whole_non_dominated_layers():
    generator = torch.Generator().manual_seed(4)
    points = torch.rand(30, 2, generator=generator).double()
    trials = [_trial(i, float(f), float(a)) for i, (f, a) in enumerate(points)]
    constants, searched = trials[:3], trials[3:]

    def beats(o: Any, t: Any) -> bool:
        return (o.score.fd <= t.score.fd and o.score.accuracy >= t.score.accuracy) and (
            o.score.fd,
            o.score.accuracy,
        ) != (t.score.fd, t.score.accuracy)

    layer: dict[int, int] = {}  # brute force: 1 + the deepest layer of any trial beating it
    for t in sorted(searched, key=lambda t: (t.score.fd, -t.score.accuracy)):
        layer[t.number] = 1 + max((layer[o.number] for o in searched if beats(o, t)), default=0)
    for size in (1, 4, 9):
        depth = min(d for d in set(layer.values()) if sum(v <= d for v in layer.values()) >= size)
        expected = {0, 1, 2} | {n for n, d in layer.items() if d <= depth}
        pool = selection_pool(trials, constants, size)
        assert {t.number for t in pool} == expected
        assert [t.number for t in pool] == sorted(expected)


def test_constant_curve_is_linear_in_the_weight_and_takes_the_lower_fd_crossing():
    # accuracy rises to w=2 and falls after it (as digits-cond's does at high weights)
    curve = {1.0: (4.0, 0.90), 2.0: (10.0, 0.99), 3.0: (50.0, 0.95)}
    point = constant_curve_point(curve, 0.95)  # crossed between 1 and 2 and between 2 and 3
    t = (0.95 - 0.90) / (0.99 - 0.90)
    assert point.between == (1.0, 2.0) and point.t == pytest.approx(t)
    assert point.fd == pytest.approx(4.0 + 6.0 * t) and point.weight == pytest.approx(1.0 + t)
    # at 0.97: 8.67 between 1 and 2, 30 between 2 and 3
    assert constant_curve_point(curve, 0.97).fd == pytest.approx(4.0 + 6.0 * 0.07 / 0.09)
    above = constant_curve_point(curve, 0.995)  # above every accuracy: the most accurate weight
    assert (above.weight, above.fd, above.condition, above.t) == (2.0, 10.0, 0.99, 0.0)
    below = constant_curve_point(curve, 0.5)
    assert (below.weight, below.fd, below.between) == (1.0, 4.0, (1.0, 1.0))
    assert constant_curve_point(curve, 0.99).fd == pytest.approx(10.0)


def test_pick_rules_on_the_selection_scores():
    constants = {1.0: _trial(0, 4.0, 0.90), 2.0: _trial(1, 10.0, 0.99), 3.0: _trial(2, 50.0, 0.95)}
    searched = [
        _trial(3, 5.0, 0.95),  # curve at 0.95: 4 + 6 * 5/9 = 7.33, margin 2.33
        _trial(4, 9.5, 0.995),  # above the curve's accuracies: w=2's FD 10, margin 0.5
        _trial(5, 1.0, 0.85),  # less accurate than w=1: not eligible for the margin
        _trial(6, 8.0, 0.98),  # curve at 0.98: 9.33, margin 1.33
        _trial(7, math.nan, 0.999),
    ]
    pool = [*constants.values(), *searched]
    selection = {t.number: t.score for t in pool}
    assert pick_trial(pool, selection, constants, 2.0, "margin").number == 3
    assert pick_trial(pool, selection, constants, 2.0, "default").number == 4  # acc >= 0.99
    assert pick_trial(pool, selection, constants, 1.0, "default").number == 0  # acc >= 0.90
    # the rule reads the selection scores, not the search seed's
    reselected = {**selection, 6: dataclasses.replace(selection[6], fd=6.0)}
    assert pick_trial(pool, reselected, constants, 2.0, "margin").number == 6
    with pytest.raises(ValueError, match="pick rule"):
        pick_trial(pool, selection, constants, 2.0, "lowest")
    diverged = {n: dataclasses.replace(score, fd=math.nan) for n, score in selection.items()}
    with pytest.raises(ValueError, match="no trial with a finite selection FD"):
        pick_trial(pool, diverged, constants, 2.0, "default")


def test_settings_refuse_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="pick_rule"):
        GuidanceSearchSettings(pick_rule="lowest")
    with pytest.raises(ValueError, match="shapes"):
        GuidanceSearchSettings(shapes=("constant", "zigzag"))
    with pytest.raises(ValueError, match="shapes must include 'constant'"):
        GuidanceSearchSettings(shapes=("interval",))
    with pytest.raises(ValueError, match="weight_range"):
        GuidanceSearchSettings(weight_range=(0.5, 3.0))
    with pytest.raises(ValueError, match="constant_weights"):
        GuidanceSearchSettings(constant_weights=(1.0, 9.0))
    with pytest.raises(ValueError, match="trials"):
        GuidanceSearchSettings(trials=3, constant_weights=(1.0, 2.0, 3.0))


def test_unconditional_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="class-conditional"):
        search_guidance(load_model("digits"), "ddim", 8, tmp_path)


TINY = GuidanceSearchSettings(trials=7, constant_weights=(1.0, 2.0, 3.0))


def test_search_picks_by_its_rule_stores_every_trial_and_resumes(digits_cond, tmp_path):
    import optuna

    run = dict(settings=TINY, num_samples=20, select_samples=24, held_out_samples=20)
    result = search_guidance(digits_cond, "dpm_solver_pp_2m", 8, tmp_path, **run)
    assert len(result.trials) == 7
    assert sorted(t.origin for t in result.trials).count("constant") == 3
    assert all(t.score.passes <= 8 for t in result.trials)
    # the rule, on the selection seed: lowest FD among the pool's trials at least as accurate as
    # constant w=2 (the pool: the constant curve and the search seed's best layers)
    reference = result.reference
    assert reference.candidate.guidance.parameters["weight"] == 2.0
    pool = selection_pool(result.trials, [t for t in result.trials if t.origin == "constant"], 12)
    assert sorted(result.selection) == [t.number for t in pool]
    assert all(score.split == "select" and score.num_samples == 24
               for score in result.selection.values())  # fmt: skip
    floor = result.selection[reference.number].accuracy
    eligible = [n for n, score in result.selection.items() if score.accuracy >= floor]
    assert result.selection[result.pick.number].fd == min(result.selection[n].fd for n in eligible)
    assert set(result.held_out) == {"constant w=1", "constant w=2", "constant w=3", "pick"}
    assert all(score.split == "held_out" for score in result.held_out.values())

    guidance = load_guidance(tmp_path / "guidance.json")
    assert guidance.shape == result.pick.candidate.guidance.shape
    assert guidance.provenance["unet_passes"] == 8
    assert guidance.provenance["seeds"] == {"search": 0, "select": 2, "held_out": 1}
    assert guidance.provenance["scores"]["select"]["split"] == "select"
    schedule_file = ScheduleFile.load(tmp_path / "best_schedule.json")
    assert schedule_file.schedule.num_steps == result.pick.score.num_steps
    assert schedule_file.provenance.extra["guidance_schedule"]["shape"] == guidance.shape
    assert (tmp_path / "scheduler" / "scheduler_config.json").exists()
    summary = json.loads((tmp_path / "result.json").read_text())
    assert len(summary["trials"]) == 7 and summary["pick"]["trial"] == result.pick.number

    storage = f"sqlite:///{tmp_path / 'study.sqlite3'}"
    (name,) = optuna.get_all_study_names(storage)
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 7
    again = search_guidance(digits_cond, "dpm_solver_pp_2m", 8, tmp_path, **run)
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 7
    assert again.pick.number == result.pick.number
    assert again.selection == result.selection  # kept in the study, not drawn again
    # another pick rule chooses among the same trials: the study resumes, nothing is redrawn
    margin = dataclasses.replace(TINY, pick_rule="margin")
    other = search_guidance(
        digits_cond, "dpm_solver_pp_2m", 8, tmp_path, **{**run, "settings": margin}
    )
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == 7
    assert other.selection == result.selection
    constants = {
        t.candidate.guidance.parameters["weight"]: t for t in pool if t.origin == "constant"
    }
    expected = pick_trial(pool, result.selection, constants, 2.0, "margin")
    assert other.pick.number == expected.number
    assert "margin" in json.loads((tmp_path / "result.json").read_text())["pick_rule"]
    with pytest.raises(ValueError, match="other settings"):
        search_guidance(digits_cond, "dpm_solver_pp_2m", 8, tmp_path, **{**run, "num_samples": 30})


def test_cli_search_guidance(tmp_path):
    arguments = [
        "search", "guidance", "--nfe", "6", "--budget", "4", "--constant-weights", "1",
        "--constant-weights", "2", "--shapes", "constant", "--shapes", "interval",
        "--num-samples", "10", "--held-out-samples", "10", "--no-progress", "--out",
        str(tmp_path),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "picked" in result.output and "held-out constant w=2" in result.output
    assert ".from_pretrained(" in result.output  # the line that loads its scheduler
    assert load_guidance(tmp_path / "guidance.json").provenance["unet_passes"] == 6
    bad = CliRunner().invoke(app, [*arguments[:-1], str(tmp_path / "x"), "--model", "digits"])
    assert bad.exit_code != 0 and "class-conditional" in bad.output
