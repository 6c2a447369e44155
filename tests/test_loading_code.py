"""The line of Python a run prints for its winner's scheduler directory: its class comes from the
directory's ``scheduler_config.json`` (a stepsearch drop-in, OLSS, a solver plan or one of
diffusers' own), and running the line in a fresh namespace loads a scheduler of that class."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from stepsearch.cli._common import print_loading_code
from stepsearch.integrations.diffusers import StepsearchDPMSolverMultistepScheduler
from stepsearch.integrations.load import load_scheduler, loading_code, scheduler_class
from stepsearch.integrations.olss import StepsearchOLSSScheduler
from stepsearch.integrations.plan_scheduler import StepsearchPlanScheduler, write_plan_scheduler_dir
from stepsearch.noise import DiscreteVP
from stepsearch.plan import SolverPlan
from stepsearch.schedule import logsnr_uniform, make_schedule
from stepsearch.solvers import PlanSolver
from stepsearch.solvers.olss import ddim_coefficients

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})


def _drop_in(path):
    schedule = make_schedule(NOISE, 5, "logsnr_uniform")
    StepsearchDPMSolverMultistepScheduler.from_step_schedule(schedule).save_pretrained(path)


def _olss(path):
    coefficients = ddim_coefficients(make_schedule(NOISE, 5, "time_uniform"))
    StepsearchOLSSScheduler.from_fit(coefficients, {"prediction_type": "epsilon"}).save_pretrained(
        path
    )


def _plan(path):
    schedule = logsnr_uniform(NOISE, 3)
    plan = SolverPlan(
        schedule,
        orders=(1, 2, 1),
        predictions=("data", "data", "data"),
        correctors=("none", "none", "none"),
        rules=("taylor",) * 3,
        estimation_points=((), (1,), ()),
        relaxations=(0.0, 0.0, 0.0),
        first_step="model",
    )
    solver = PlanSolver(data_mean=torch.zeros(1, 2, 2, dtype=torch.float64))
    write_plan_scheduler_dir(path, plan, solver, prediction_type="epsilon")


def _diffusers(path):
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++").save_pretrained(path)


@pytest.mark.parametrize(
    ("write", "module", "expected"),
    [
        (_drop_in, "stepsearch.integrations.diffusers", StepsearchDPMSolverMultistepScheduler),
        (_olss, "stepsearch.integrations.olss", StepsearchOLSSScheduler),
        (_plan, "stepsearch.integrations.plan_scheduler", StepsearchPlanScheduler),
        (_diffusers, "diffusers", DPMSolverMultistepScheduler),
    ],
    ids=["drop-in", "olss", "plan", "diffusers"],
)
def test_the_printed_line_loads_the_directory_class(write, module, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "x" / "nfe-5" / "scheduler"
    write(folder)
    relative = os.path.join("runs", "x", "nfe-5", "scheduler")  # as the user typed --out
    line = loading_code(relative)
    name = expected.__name__
    assert line == (
        f"from {module} import {name}; scheduler = {name}.from_pretrained({json.dumps(relative)})"
    )
    namespace: dict = {}
    exec(line, namespace)  # a fresh namespace: the line imports what it needs
    loaded = namespace["scheduler"]
    assert type(loaded) is expected
    assert scheduler_class(folder) == (module, expected)
    assert type(load_scheduler(folder)) is expected
    reference = expected.from_pretrained(folder)
    assert dict(loaded.config) == dict(reference.config)


def test_the_line_quotes_any_path(tmp_path):
    folder = tmp_path / 'odd "name" \\ dir'
    _drop_in(folder)
    namespace: dict = {}
    exec(loading_code(folder), namespace)
    assert type(namespace["scheduler"]) is StepsearchDPMSolverMultistepScheduler


def test_unknown_or_missing_classes_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="not a scheduler directory"):
        loading_code(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "NoSuchScheduler"}))
    with pytest.raises(ValueError, match="unknown scheduler class 'NoSuchScheduler'"):
        loading_code(tmp_path)


def test_the_summary_prints_the_line_unwrapped(tmp_path, capsys, monkeypatch):
    from stepsearch.cli import _common

    monkeypatch.setattr(_common.console, "width", 40)  # narrower than the line
    folder = tmp_path / "a-rather-long-folder-name" / "scheduler"
    _olss(folder)
    print_loading_code(folder)
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == loading_code(folder)  # one line, flush left: it can be pasted as it is
    print_loading_code(None)  # no diffusers form: nothing
    assert capsys.readouterr().out == ""


def test_optimize_summary_prints_each_winners_line(capsys, monkeypatch):
    """``optimize``'s last lines on the committed digits run (its report names its folders
    relative to the run folder, where this runs): after each NFE's sentence, that NFE's line."""
    from pathlib import Path

    from stepsearch.cli import _common
    from stepsearch.cli.optimize import print_summary

    monkeypatch.setattr(_common.console, "width", 1000)  # the sentences unwrapped
    run = Path(__file__).parents[1] / "benchmarks" / "results" / "optimize_run"
    report = json.loads((run / "report.json").read_text())
    monkeypatch.chdir(run)
    print_summary(report, {"markdown": "report.md", "png": "report.png", "json": "report.json"})
    lines = capsys.readouterr().out.splitlines()
    for nfe, entry in report["per_nfe"].items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"NFE {nfe}:"))
        assert lines[at + 1] == loading_code(entry["files"]["scheduler"])
        namespace: dict = {}
        exec(lines[at + 1], namespace)
        assert type(namespace["scheduler"]).__name__ in lines[at + 1]
