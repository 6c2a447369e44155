"""``stepsearch optimize`` on a Gaussian-mixture test bed (exact denoiser): selection, resume,
partial budgets and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from stepsearch.ays.search import AYSConfig
from stepsearch.cache import TensorCache
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.autodiffusion import AutoDiffusionSettings
from stepsearch.search.dp_job import DPSettings
from stepsearch.search.family import FAMILIES
from stepsearch.search.optimize import OptimizeSettings, gains_in_words, optimize
from stepsearch.search.predictor import PredictorSettings
from stepsearch.search.s3 import S3Settings
from stepsearch.solvers import get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
NFES = [3]
METHODS = ["dp", "ays", "olss", "autodiffusion", "s3"]
SETTINGS = OptimizeSettings(
    search_samples=24,
    select_samples=48,
    held_out_samples=48,
    dp_solvers=("dpm_solver_pp_2m",),
    baseline_solvers=("ddim", "dpm_solver_pp_2m"),
    spacings=("time_uniform", "logsnr_uniform", "trailing"),
    dp=DPSettings(grid_points=12, teacher_samples=24, coeffs=(1.15,)),
    ays=AYSConfig(num_samples=16, base_intervals=4, refinements=0, max_sweeps=2),
    olss_samples=16,
    autodiffusion=AutoDiffusionSettings(population=6, mutations=3, crossovers=1, parents=2),
    autodiffusion_trials=12,
    s3=S3Settings(proposals=3, explore=1, parents=4, generations=2, children=16,
                  seed_solvers=("dpm_solver_pp_2m", "unipc_bh2"),
                  predictor=PredictorSettings(hidden=8, epochs=20),
                  select_plans=0),  # as optimize's default: the run picks on its own seed
    s3_trials=14,
)  # fmt: skip


def _source() -> DenoiserSource:
    rng = np.random.default_rng(0)
    mixture = GaussianMixture.gaussian(rng.normal(size=4), rng.uniform(0.05, 0.5, 4), NOISE)
    return DenoiserSource.of_mixture(mixture, name="toy-optimize", num_reference=256)


def _run(out: Path, **kwargs):
    kwargs.setdefault("budget_minutes", 60.0)
    kwargs.setdefault("settings", SETTINGS)
    return optimize(
        _source(), NFES, kwargs.pop("methods", METHODS), out=out, cache=TensorCache(None),
        progress=False, **kwargs,
    )  # fmt: skip


def _comparable(report: dict) -> dict:
    """The report without timings and file locations."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "files")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(json.dumps(report)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize") / "run"
    return out, _run(out)


def test_winner_is_never_worse_than_the_best_built_in_on_the_selection_seed(finished):
    _, result = finished
    for entry in result.report["per_nfe"].values():
        rows = {row["label"]: row for row in entry["rows"]}
        built_in = [row for row in entry["rows"] if row["family"] in ("baseline", "diffusers")]
        best = min(row["select"]["fd"] for row in built_in)
        assert rows[entry["winner"]]["select"]["fd"] <= best
        assert (
            min(row["select"]["fd"] for row in entry["rows"])
            == rows[entry["winner"]]["select"]["fd"]
        )
        # every family ran and was judged on both seeds
        families = {row["family"] for row in entry["rows"]}
        assert set(METHODS) <= families
        # the report seed is not the selection seed: the numbers differ
        assert rows[entry["winner"]]["report"]["fd"] != rows[entry["winner"]]["select"]["fd"]
    assert not result.partial
    assert result.report["selection"]["seed"] == 1 and result.report["report"]["seed"] == 2


def test_report_files_and_winner_schedule_file(finished):
    out, result = finished
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).is_file()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entry = result.report["per_nfe"]["3"]
    assert Path(entry["files"]["scheduler"], "scheduler_config.json").is_file()
    schedule_file = ScheduleFile.load(entry["files"]["schedule"], noise=NOISE)
    assert schedule_file.provenance.extra["optimize"]["label"] == entry["winner"]
    assert schedule_file.provenance.nfe == 3
    # the FD winner is compared with the most accurate sampler (two judges)
    traj = {row["label"]: row["report"]["traj"] for row in entry["rows"]}
    most_accurate = min(traj, key=traj.get)
    if most_accurate == entry["winner"] or traj[entry["winner"]] <= traj[most_accurate]:
        assert entry["two_judges"] is None
    else:
        assert most_accurate in entry["two_judges"]
    assert "NFE 3" in gains_in_words(result)[0]
    assert math.isfinite(result.report["reference"]["fd"]["value"])


def test_resume_after_an_interrupted_run_gives_the_same_report(finished, tmp_path, monkeypatch):
    _, reference = finished
    out = tmp_path / "run"
    autodiffusion = FAMILIES["autodiffusion"]
    real_search = autodiffusion.search

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run is killed after the cheap searches

    monkeypatch.setattr(autodiffusion, "search", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(out)
    assert not (out / "report.json").exists()
    assert (out / "nfe-3" / "dp-dpm_solver_pp_2m" / "stage.json").is_file()

    def not_again(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(FAMILIES["dp"], "search", not_again)
    monkeypatch.setattr(FAMILIES["ays"], "search", not_again)
    monkeypatch.setattr(autodiffusion, "search", real_search)
    resumed = _run(out)  # the same command, no flag: it resumes
    assert _comparable(resumed.report) == _comparable(reference.report)
    # a rerun of a finished run reads everything back
    monkeypatch.setattr(autodiffusion, "search", not_again)
    again = _run(out)
    assert _comparable(again.report) == _comparable(reference.report)


def test_a_budget_that_ends_early_still_writes_a_partial_report(tmp_path):
    result = _run(tmp_path / "run", methods=["dp", "autodiffusion"], budget_minutes=1e-9)
    assert result.partial
    stages = {item["stage"] for item in result.report["incomplete"]}
    assert stages == {"dp dpm_solver_pp_2m", "autodiffusion unipc_bh2"}
    entry = result.report["per_nfe"]["3"]
    assert entry["winner_family"] in ("baseline", "diffusers")
    assert Path(entry["files"]["scheduler"]).is_dir()
    assert "Partial result" in (tmp_path / "run" / "report.md").read_text()


def test_an_out_dir_of_another_run_is_refused_unless_resume_or_overwrite(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    other = ["dp"]
    with pytest.raises(ValueError, match=r"another optimize run.*--resume.*--overwrite"):
        _run(copy, methods=other)
    resumed = _run(copy, methods=other, resume=True)  # keeps the matching dp stage
    assert {row["family"] for row in resumed.report["per_nfe"]["3"]["rows"]} >= {"dp"}
    fresh = _run(copy, methods=other, overwrite=True)
    assert not (copy / "nfe-3" / "olss-olss").exists()
    assert fresh.report["methods"] == ["dp"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="files of something else"):
        _run(foreign, methods=other)
    with pytest.raises(ValueError, match="not both"):
        _run(tmp_path / "both", methods=other, resume=True, overwrite=True)


def test_bad_input_is_a_clear_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'gits'; choose from dp, ays"):
        _run(tmp_path / "a", methods=["dp", "gits"])
    solver = get_solver("dpm_solver_pp_2s")
    unreachable = None
    for nfe in (3, 4, 5):
        try:
            solver.num_steps_for_nfe(nfe)
        except ValueError:
            unreachable = nfe
            break
    assert unreachable is not None
    settings = OptimizeSettings(autodiffusion_solvers=("dpm_solver_pp_2s",))
    with pytest.raises(ValueError, match=f"NFE {unreachable} is unreachable for autodiffusion"):
        optimize(_source(), [unreachable], ["autodiffusion"], out=tmp_path / "b",
                 settings=settings, cache=TensorCache(None), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="at least 2"):
        optimize(_source(), [1], ["dp"], out=tmp_path / "c", cache=TensorCache(None),
                 progress=False)  # fmt: skip
    model = tmp_path / "my-unet"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no scheduler config"):
        optimize(str(model), [4], ["dp"], out=tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="budget-minutes"):
        _run(tmp_path / "e", budget_minutes=0)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_cli_errors_are_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from stepsearch.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["optimize", "--nfe", "4", "--methods", "dp", "gits",
                               "--out", str(tmp_path / "x")])  # fmt: skip
    assert done.exit_code == 2 and "unknown method 'gits'" in done.output
    done = runner.invoke(app, ["optimize", "--pipeline", str(tmp_path), "--out", str(tmp_path)])
    assert done.exit_code == 2 and "--pipeline needs --prompts" in done.output
    assert "optimize" in runner.invoke(app, ["--help"]).output
