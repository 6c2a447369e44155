"""Work budgets, the dry-run forecast and the time bound of ``stepsearch optimize`` on a
Gaussian-mixture test bed (exact denoiser): the same report whatever the thread count, every
planned model evaluation counted against the denoiser's real calls, a too-small budget refused
before any work, an overrun of the time bound reported with its reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_optimize import NOISE, SETTINGS, _comparable, _source

from stepsearch.cache import TensorCache
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize import optimize
from stepsearch.search.optimize.budget import work_shares
from stepsearch.search.optimize.forecast import forecast, plan_stages

METHODS = ["dp", "ays", "olss", "autodiffusion", "s3"]
BUDGET = 2000
"""Model sample-evaluations: 1000 per trial-budgeted stage at NFE 3 (72 a trial)."""


class CountingDenoiser:
    """The test bed's exact denoiser, counting model sample-evaluations (batch rows per call)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __call__(self, x, t, *args, **kwargs):
        self.count += int(x.shape[0])
        return self.inner(x, t, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _optimize(out: Path, source=None, **kwargs):
    kwargs.setdefault("budget_minutes", 60.0)
    return optimize(
        source or _source(), [3], kwargs.pop("methods", METHODS), out=out,
        cache=TensorCache(out.parent / f"{out.name}-cache"), progress=False, settings=SETTINGS,
        budget_evals=kwargs.pop("budget_evals", BUDGET), **kwargs,
    )  # fmt: skip


def test_work_shares_split_the_budget_evenly_and_refuse_too_little():
    shares = work_shares(NOISE, SETTINGS, METHODS, [3], BUDGET)
    assert set(shares) == {("autodiffusion", 3, "unipc_bh2"), ("s3", 3, "plan")}
    starts = len(spacing_schedules(NOISE, 3))
    for share in shares.values():
        assert share.evaluations == BUDGET // 2 and share.per_trial == 24 * 3
        assert share.starts == starts
        assert share.trials == (BUDGET // 2) // 72 - starts  # 13 - starts
    capped = work_shares(NOISE, SETTINGS, METHODS, [3], 10**6)
    assert capped[("autodiffusion", 3, "unipc_bh2")].trials == SETTINGS.autodiffusion_trials
    assert capped[("s3", 3, "plan")].trials == SETTINGS.s3_trials
    with pytest.raises(ValueError, match=r"--budget-evals 300 is too small.*give at least"):
        work_shares(NOISE, SETTINGS, METHODS, [3], 300)
    with pytest.raises(ValueError, match="positive integer"):
        work_shares(NOISE, SETTINGS, METHODS, [3], 0)


def test_a_too_small_work_budget_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        _optimize(tmp_path / "run", budget_evals=300)
    assert not (tmp_path / "run").exists()


def test_the_same_report_whatever_the_thread_count(tmp_path):
    threads = torch.get_num_threads()
    reports = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            reports.append(_optimize(tmp_path / f"threads-{count}").report)
    finally:
        torch.set_num_threads(threads)
    assert _comparable(reports[0]) == _comparable(reports[1])
    report = reports[0]
    assert not report["partial"]
    assert {row["family"] for row in report["per_nfe"]["3"]["rows"]} >= set(METHODS)
    shares = work_shares(NOISE, SETTINGS, METHODS, [3], BUDGET)
    assert report["budget"]["evals"] == BUDGET
    assert {s["stage"]: s["trials"] for s in report["budget"]["stages"]} == {
        "autodiffusion unipc_bh2": shares[("autodiffusion", 3, "unipc_bh2")].trials,
        "s3": shares[("s3", 3, "plan")].trials,
    }
    assert report["budget"]["seconds"]["overran"] is None


def test_planned_evaluations_are_the_denoisers_calls(tmp_path):
    """Every forecast stage counted against the exact denoiser's real calls (AYS: not forecast;
    AutoDiffusion and S³: an upper bound, a repeated candidate is looked up: S³'s second
    evolution starts from the first one's seeds)."""
    methods = ["dp", "olss", "s3"]
    base = _source()
    counter = CountingDenoiser(base.model)
    source = replace(base, model=counter)
    shares = work_shares(NOISE, SETTINGS, methods, [3], BUDGET)
    planned = plan_stages(source, [3], methods, SETTINGS, shares)
    assert [s.phase for s in planned] == ["teacher"] * 3 + ["search"] * 3 + ["judging"]
    _optimize(tmp_path / "run", source, methods=methods)
    (s3,) = [s for s in planned if s.phase == "search" and s.label.startswith("s3")]
    spent = counter.count - sum(s.evaluations for s in planned if s is not s3)
    assert s3.evaluations / 2 < spent <= s3.evaluations
    with_ays = plan_stages(source, [3], ["ays", "dp"], SETTINGS, None)
    assert [s.evaluations is None for s in with_ays if s.phase == "search"] == [True, False]


def test_forecast_writes_nothing_and_times_the_plan(tmp_path):
    planned = forecast(_source(), [3], METHODS, 1.0, budget_evals=BUDGET, settings=SETTINGS)
    assert planned.seconds_per_evaluation > 0
    assert planned.evaluations == sum(s.evaluations or 0 for s in planned.stages)
    assert planned.seconds == pytest.approx(planned.evaluations * planned.seconds_per_evaluation)
    shares = work_shares(NOISE, SETTINGS, METHODS, [3], BUDGET)
    trials = {s.label: s.trials for s in planned.stages if s.trials is not None}
    assert trials == {
        "autodiffusion unipc_bh2": shares[("autodiffusion", 3, "unipc_bh2")].trials,
        "s3": shares[("s3", 3, "plan")].trials,
    }
    assert list(tmp_path.iterdir()) == []


def test_an_overrun_time_bound_is_reported_with_its_reason(tmp_path):
    result = _optimize(tmp_path / "run", methods=["dp", "autodiffusion"], budget_minutes=1e-9)
    seconds = result.report["budget"]["seconds"]
    assert result.partial and seconds["overran"] > 0 and result.report["budget"]["minutes"] == 1e-9
    assert "judging" in seconds["why"]
    assert "over its" in (tmp_path / "run" / "report.md").read_text()


def test_cli_dry_run_prints_every_stage_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from stepsearch.cli import app

    out = tmp_path / "never"
    done = CliRunner().invoke(
        app,
        ["optimize", "--dry-run", "--nfe", "4", "--methods", "dp", "autodiffusion",
         "--num-samples", "8", "--select-samples", "8", "--held-out-samples", "8",
         "--budget-evals", "5000", "--out", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "autodiffusion" in done.output and "judging" in done.output
    assert "total:" in done.output and "model evaluations" in done.output
    assert not out.exists()
