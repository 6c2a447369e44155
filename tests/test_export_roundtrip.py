"""A schedule made for a model reaches diffusers whole: ``schedule save --model digits`` records
the model's prediction type and scheduler config, ``export --to diffusers`` builds the drop-in
from them, and ``from_pretrained`` in a fresh process samples bitwise what the in-process
scheduler built from the model's own config samples. And every file a search writes (a
``ScheduleFile``) is accepted by every command that reads schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import stepsearch
from stepsearch.cli import app
from stepsearch.integrations.diffusers import scheduler_for_solver
from stepsearch.models import load_image_model
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.testbeds import digits

NUM_SAMPLES, SEED = 6, 11

FRESH_PROCESS = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from stepsearch.integrations import diffusers as drop_in
from stepsearch.models import load_image_model

directory, steps, count, seed, out = sys.argv[1:]
name = json.loads((Path(directory) / "scheduler_config.json").read_text())["_class_name"]
scheduler = getattr(drop_in, name).from_pretrained(directory)
model = load_image_model("digits")
samples = model.sample_diffusers(scheduler, int(steps), int(count), int(seed), None, 64, False)
save_file({"samples": samples.contiguous()}, out)
"""


pytestmark = pytest.mark.usefixtures("_one_thread")  # the fresh process runs one thread too


def _fresh_process_samples(directory: Path, steps: int, out: Path) -> torch.Tensor:
    """Samples of diffusers' loop with the scheduler loaded by ``from_pretrained`` in a new
    Python process (nothing of this process's state reaches it)."""
    source = str(Path(stepsearch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", FRESH_PROCESS, str(directory), str(steps)]
    command += [str(NUM_SAMPLES), str(SEED), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out)["samples"]


@pytest.fixture(scope="module")
def digits_model():
    return load_image_model("digits")


@pytest.mark.parametrize("solver", ["unipc_bh2"])
def test_schedule_save_export_from_pretrained_round_trip_is_bitwise(digits_model, solver, tmp_path):
    path, exported = tmp_path / "digits.json", tmp_path / "scheduler"
    saved = CliRunner().invoke(
        app, ["schedule", "save", str(path), "--model", "digits", "--steps", "5",
              "--spacing", "logsnr_uniform"],
    )  # fmt: skip
    assert saved.exit_code == 0, saved.output
    schedule = StepSchedule.load(path)
    assert schedule.metadata["prediction_type"] == "v_prediction"  # what the model predicts
    assert schedule.metadata["scheduler_config"]["beta_schedule"] == "linear"
    # no --prediction-type: the schedule says (it wrote epsilon here before: garbage samples)
    result = CliRunner().invoke(
        app, ["export", str(path), "--to", "diffusers", str(exported), "--solver", solver]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((exported / "scheduler_config.json").read_text())
    assert written["prediction_type"] == "v_prediction" and written["solver"] == solver

    # the in-process scheduler built from the model's own config, replaying the same times
    bundle = digits.load()
    in_process = scheduler_for_solver(solver).from_config(
        bundle.scheduler_config, solver=solver, custom_times=schedule.times.tolist()
    )
    expected = digits_model.sample_diffusers(in_process, 5, NUM_SAMPLES, SEED, None, 64, False)
    loaded = _fresh_process_samples(exported, 5, tmp_path / "fresh.safetensors")
    assert torch.equal(loaded, expected)
    # real digits: the v-prediction drop-in agrees with stepsearch's own sampler on the model
    assert expected.abs().max() > 0.5
    from stepsearch.models.source import generate_from_source
    from stepsearch.solvers import get_solver

    own = generate_from_source(
        digits_model, get_solver(solver), schedule, NUM_SAMPLES, seed=SEED, chunk_size=64
    )
    assert torch.allclose(own, expected, atol=1e-3)


def test_export_with_model_reads_its_config_and_refuses_other_targets(tmp_path):
    path = tmp_path / "plain.json"
    CliRunner().invoke(app, ["schedule", "save", str(path), "--noise", "digits", "--steps", "4"])
    refused = CliRunner().invoke(
        app, ["export", str(path), "--to", "diffusers", str(tmp_path / "a")]
    )
    assert refused.exit_code == 2 and "prediction type" in refused.output
    done = CliRunner().invoke(
        app, ["export", str(path), "--to", "diffusers", str(tmp_path / "a"), "--model", "digits"]
    )
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "a" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    other = CliRunner().invoke(
        app, ["export", str(path), "--to", "kdiffusion", "--model", "digits"]
    )
    assert other.exit_code == 2 and "--model applies to the diffusers export" in other.output
    stable = tmp_path / "sd.json"
    CliRunner().invoke(app, ["schedule", "save", str(stable), "--steps", "4"])
    wrong = CliRunner().invoke(
        app, ["export", str(stable), "--to", "diffusers", str(tmp_path / "b"), "--model", "digits"]
    )
    assert wrong.exit_code == 2 and "another noise schedule" in wrong.output
    assert not (tmp_path / "b").exists()


# --- a search's own result file, read by every command that reads schedules ----------------------


@pytest.fixture(scope="module")
def search_result(tmp_path_factory, digits_model):
    """A real search job's folder on the digits model (the toy family of the search tests)."""
    from _toy_search import RandomPerturbationFamily, RandomPerturbationSettings

    from stepsearch.cache import TensorCache
    from stepsearch.eval.objective import Objective
    from stepsearch.search.family import FAMILIES, register, run_search

    toy = register(RandomPerturbationFamily())
    try:
        objective = Objective(
            digits_model, "traj", num_samples=4, held_out_samples=4, cache=TensorCache(None)
        )
        out = tmp_path_factory.mktemp("search")
        settings = RandomPerturbationSettings(trials=2)
        run_search(toy, objective, "ddim", 4, out, settings=settings, progress=False)
    finally:
        FAMILIES.pop(toy.name, None)
    return out


@pytest.mark.parametrize("target", ["kdiffusion", "comfyui", "timesteps"])
def test_a_search_result_exports_to_every_target(search_result, target):
    path = search_result / "best_schedule.json"
    result = CliRunner().invoke(app, ["export", str(path), "--to", target])
    assert result.exit_code == 0, result.output
    schedule = json.loads(path.read_text())["schedule"]
    values = json.loads(result.output)
    assert len(values) in (len(schedule["times"]), len(schedule["times"]) - 1)


def test_a_search_result_exports_to_diffusers_as_the_search_wrote_it(
    search_result, digits_model, tmp_path
):
    path = search_result / "best_schedule.json"
    result = CliRunner().invoke(
        app, ["export", str(path), "--to", "diffusers", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output  # the provenance says solver and prediction type
    config = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert config["solver"] == "ddim" and config["prediction_type"] == "v_prediction"
    exported = scheduler_for_solver("ddim").from_pretrained(tmp_path / "s")
    by_search = scheduler_for_solver("ddim").from_pretrained(search_result / "scheduler")
    steps = len(json.loads(path.read_text())["schedule"]["times"]) - 1
    a = digits_model.sample_diffusers(exported, steps, 4, SEED, None, 64, False)
    b = digits_model.sample_diffusers(by_search, steps, 4, SEED, None, 64, False)
    assert torch.equal(a, b)


def test_schedule_show_reads_a_search_result(search_result):
    path = search_result / "best_schedule.json"
    result = CliRunner().invoke(app, ["schedule", "show", "--file", str(path)])
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and "clean" in result.output  # its rows, ending clean


def test_eval_reads_a_search_result_and_warns_once_for_another_model(search_result, monkeypatch):
    import stepsearch.cli.eval as eval_cli

    seen = {}

    def evaluate(model, methods, *args, **kwargs):  # the scoring itself is eval's own tests'
        seen["methods"] = methods
        raise SystemExit(0)

    monkeypatch.setattr(eval_cli, "evaluate", evaluate)
    path = str(search_result / "best_schedule.json")
    args = ["eval", "--schedules", path, "--solvers", "ddim", "--nfe", "4"]
    same = CliRunner().invoke(app, [*args, "--model", "digits"])
    assert same.exit_code == 0, same.output
    assert "warning" not in same.output
    assert [m.label for m in seen["methods"]] and seen["methods"][0].schedule.num_steps == 4
    other = CliRunner().invoke(app, [*args, "--model", "digits-cond"])
    assert other.exit_code == 0, other.output
    lines = [line for line in other.output.splitlines() if "warning" in line]
    assert len(lines) == 1  # one line, naming both models
    assert "'digits'" in lines[0] and "'digits-cond'" in lines[0]


# --- every family's result file: AYS, OLSS, a plan job (S³), read by every command -----------


@pytest.fixture(scope="module")
def family_files(tmp_path_factory, search_result):
    """``{family: (file, the search's own scheduler directory or None)}``: real ``search ays`` and
    ``search olss`` runs on digits (tiny settings), the job runner's file (dp, autodiffusion and
    S³ all write through it) and a plan job's file (what S³ writes)."""
    from stepsearch.plan import SolverPlan
    from stepsearch.schedule import logsnr_uniform
    from stepsearch.schedule_file import Provenance
    from stepsearch.search.job import write_job_result
    from stepsearch.solvers import PlanSolver, solver_to_json

    root = tmp_path_factory.mktemp("families")
    env = {"STEPSEARCH_CACHE": str(root / "cache")}
    ays = ["search", "ays", "--nfe", "3", "--strategy", "direct", "--samples", "4",
           "--proxy-samples", "4", "--teacher-steps", "8", "--max-sweeps", "1",
           "--out", str(root / "ays.json")]  # fmt: skip
    olss = ["search", "olss", "--model", "digits", "--nfe", "3", "--samples", "8",
            "--held-out-samples", "8", "--teacher-steps", "20", "--out", str(root / "olss")]  # fmt: skip
    for arguments in (ays, olss):
        done = CliRunner().invoke(app, arguments, env=env)
        assert done.exit_code == 0, done.output
    noise = load_image_model("digits").noise
    plan = SolverPlan(
        logsnr_uniform(noise, 3),
        orders=(1, 2, 1),
        predictions=("data", "data", "data"),
        correctors=("unipc", "unipc", "none"),
    )
    solver = PlanSolver(variant="bh2")
    provenance = Provenance(
        model={"name": "digits", "digest": "sha256:test"},
        solver=solver_to_json(solver),
        nfe=plan.nfe,
        objective={"metric": "traj"},
        scores={},
        seeds={"search": 0, "held_out": 1},
        search={"family": "s3", "settings": {}},
        prediction_type="v_prediction",
    )
    (root / "s3").mkdir()
    write_job_result(
        root / "s3", ScheduleFile(plan, provenance), {}, solver=solver, values=[1.0],
        baselines=[], title="plan",
    )  # fmt: skip
    return {
        "job": (search_result / "best_schedule.json", search_result / "scheduler"),
        "ays": (root / "ays.json", None),
        "olss": (root / "olss" / "olss_schedule.json", root / "olss" / "scheduler"),
        "s3": (root / "s3" / "best_schedule.json", root / "s3" / "scheduler"),
    }


FAMILIES = ["job", "ays", "olss", "s3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_search_file_exports_to_every_target(family_files, family, tmp_path):
    path, own = family_files[family]
    times = ScheduleFile.load(path).schedule.times
    for target in ("kdiffusion", "comfyui", "timesteps"):
        result = CliRunner().invoke(app, ["export", str(path), "--to", target])
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.output)) in (len(times), len(times) - 1)
    result = CliRunner().invoke(
        app, ["export", str(path), "--to", "diffusers", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, (
        result.output
    )  # no --solver, no --prediction-type: it records them
    config = json.loads((tmp_path / "d" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    if own is not None:  # the same scheduler the search wrote beside it
        written = json.loads((own / "scheduler_config.json").read_text())
        assert config["_class_name"] == written["_class_name"]
        for key in ("custom_times", "solver", "olss_coefficients", "solver_plan", "plan_checksum"):
            assert config.get(key) == written.get(key), key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_search_file_is_shown(family_files, family):
    path, _ = family_files[family]
    result = CliRunner().invoke(app, ["schedule", "show", "--file", str(path)])
    assert result.exit_code == 0, result.output
    assert "clean" in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_every_search_file_is_evaluated_and_another_model_warns(family_files, family, monkeypatch):
    import stepsearch.cli.eval as eval_cli

    seen = {}

    def evaluate(model, methods, *args, **kwargs):  # the scoring itself is eval's own tests'
        seen["methods"] = methods
        raise SystemExit(0)

    monkeypatch.setattr(eval_cli, "evaluate", evaluate)
    path, _ = family_files[family]
    args = ["eval", "--schedules", str(path), "--solvers", "ddim", "--nfe", "3"]
    same = CliRunner().invoke(app, [*args, "--model", "digits"])
    assert same.exit_code == 0, same.output
    warned = [line for line in same.output.splitlines() if "warning" in line]
    # a plan: its step schedule runs with --solvers, and eval says so; nothing else warns
    assert len(warned) == (family == "s3") and all("solver plan" in line for line in warned)
    expected = ScheduleFile.load(path).schedule.times
    assert np.array_equal(seen["methods"][0].schedule.times, expected)  # the file's own steps
    other = CliRunner().invoke(app, [*args, "--model", "digits-cond"])
    assert other.exit_code == 0, other.output
    assert sum("'digits-cond'" in line for line in other.output.splitlines()) == 1


def test_a_search_job_names_its_files_and_store_run_relative(search_result):
    summary = json.loads((search_result / "result.json").read_text())
    assert summary["files"] == {"schedule": "best_schedule.json", "scheduler": "scheduler",
                                "plot": "progress.png", "summary": "result.json"}  # fmt: skip
    study = ScheduleFile.load(search_result / "best_schedule.json").provenance.extra["study"]
    assert study["storage"] == "study.sqlite3" and (search_result / study["storage"]).is_file()
