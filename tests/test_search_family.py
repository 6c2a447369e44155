"""The search-family protocol, the registry and the one job runner: the built-in families are
registered adapters, and a new family (the toy of ``docs/search-families.md``) runs through
``run_search`` and ``optimize`` end to end with one registration line."""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import optuna
import pytest
from _toy_search import RandomPerturbationFamily, RandomPerturbationSettings

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.family import FAMILIES, SearchFamily, family, register, run_search
from stepsearch.search.optimize import OptimizeSettings, optimize
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
TOY = "random_perturbation"


def _source() -> DenoiserSource:
    mixture = GaussianMixture.random(num_components=3, dim=6, noise=NOISE, seed=2)
    return DenoiserSource.of_mixture(mixture, name="mix", num_reference=128)


@pytest.fixture()
def toy():
    registered = register(RandomPerturbationFamily())  # the one registration line
    yield registered
    FAMILIES.pop(TOY, None)


def test_built_in_families_are_registered_adapters_of_the_protocol():
    family("dp")  # loads the built-in families
    assert list(FAMILIES)[:5] == ["dp", "ays", "olss", "autodiffusion", "s3"]
    for name in ("dp", "ays", "olss", "autodiffusion", "s3"):
        found = FAMILIES[name]
        assert isinstance(found, SearchFamily) and found.name == name
        assert hasattr(found.settings_type(), "to_json_dict")
    assert [n for n, f in FAMILIES.items() if f.expensive] == ["autodiffusion", "s3"]
    assert not FAMILIES["ays"].uses_store and not FAMILIES["olss"].uses_store
    with pytest.raises(ValueError, match="unknown search family 'gits'"):
        family("gits")


def test_optimize_has_no_family_name_branches():
    package = resources.files("stepsearch.search.optimize")
    for module in package.iterdir():
        if module.name.endswith(".py"):
            text = module.read_text()
            assert len(text.splitlines()) <= 500, module.name
            assert not re.search(r"""[=!]= ?["'](dp|ays|olss|autodiffusion|s3)["']""", text)
            assert not re.search(r"""["'](dp|ays|olss|autodiffusion)["'] in methods""", text)


def test_the_runner_writes_every_result_file_and_resumes_from_the_store(toy, tmp_path):
    objective = Objective(_source(), "traj", num_samples=16, cache=TensorCache(None))
    out = tmp_path / "toy"
    settings = RandomPerturbationSettings(trials=4)
    job = run_search(toy, objective, "ddim", 4, out, settings=settings, progress=False)
    assert {"schedule", "scheduler", "plot", "summary"} <= set(job.files)
    loaded = ScheduleFile.load(out / "best_schedule.json", noise=NOISE)
    assert loaded.schedule == job.found.schedule
    assert loaded.provenance.search["family"] == TOY
    assert loaded.provenance.search["settings"]["trials"] == 4
    assert loaded.provenance.scores["held_out"]["value"] == pytest.approx(job.held_out.value)
    summary = json.loads((out / "result.json").read_text())
    assert summary["family"] == TOY and summary["trials_in_study"] == job.trials
    starts = {tuple(np.round(b.schedule.times, 12)) for b in job.baselines}  # one schedule, one trial
    assert job.trials == len(starts) + 4  # the starting points are trials too
    assert set(summary["held_out"]) == {"search_result", f"start ({job.start.name})"}
    storage = f"sqlite:///{out / 'study.sqlite3'}"
    (study,) = optuna.get_all_study_summaries(storage)
    assert study.study_name == f"{TOY}-mix-ddim-nfe4"
    evaluations = objective.evaluations
    again = run_search(toy, objective, "ddim", 4, out, settings=settings, progress=False)
    assert again.found.schedule == job.found.schedule and again.trials == job.trials
    assert objective.evaluations == evaluations + 2  # the two held-out scores; trials looked up


def test_a_new_family_runs_through_optimize_end_to_end(toy, tmp_path, monkeypatch):
    settings = OptimizeSettings(
        search_samples=16, select_samples=24, held_out_samples=24, baseline_solvers=("ddim",),
        spacings=("time_uniform", "trailing"), diffusers_baselines=False,
        families={TOY: RandomPerturbationSettings(trials=4)},
    )  # fmt: skip
    out = tmp_path / "run"

    def run():
        return optimize(
            _source(), [4], [TOY], 30.0, out, settings=settings, cache=TensorCache(None),
            progress=False,
        )  # fmt: skip

    result = run()
    stage = out / "nfe-4" / f"{TOY}-ddim"
    assert (stage / "stage.json").is_file() and (stage / "best_schedule.json").is_file()
    rows = {row["label"]: row for row in result.report["per_nfe"]["4"]["rows"]}
    assert rows[f"{TOY} ddim"]["family"] == TOY
    assert result.report["methods"] == [TOY]
    assert result.report["settings"][TOY] == {"trials": 4, "scale": 0.3, "seed": 0}
    assert not result.partial

    def not_again(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(toy, "search", not_again)
    again = run()  # the same run: every stage and score is read back
    assert _without_timings(again.report) == _without_timings(result.report)


def _without_timings(report: dict) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "files")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(json.dumps(report)))
