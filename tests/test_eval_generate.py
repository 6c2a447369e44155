"""Seed-deterministic generation, chunking, NFE matching, reports and the eval CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stepsearch.cli import app, expand_list_options
from stepsearch.eval.report import Cell, ResultTable, environment, image_grid
from stepsearch.models.batches import chunks_for_process, steps_for_nfe, unit_noise
from stepsearch.models.source import generate
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import logsnr_uniform, make_schedule
from stepsearch.solvers import get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

SD = DiscreteVP.stable_diffusion()


def test_noise_depends_only_on_the_sample_index():
    whole = unit_noise(range(10), (1, 4, 4), seed=3)
    torch.testing.assert_close(unit_noise([7, 2], (1, 4, 4), seed=3), whole[[7, 2]], rtol=0, atol=0)
    assert not torch.equal(unit_noise([2], (1, 4, 4), seed=4)[0], whole[2])


@pytest.mark.parametrize("num_processes", [1, 2, 3, 5])
def test_chunks_partition_the_indices(num_processes):
    seen = [
        i
        for p in range(num_processes)
        for chunk in chunks_for_process(23, 4, p, num_processes)
        for i in chunk
    ]
    assert sorted(seen) == list(range(23))


def test_generation_is_independent_of_chunk_size():
    mixture = GaussianMixture.random(3, 6, SD, seed=0, shape=(1, 2, 3))
    schedule = logsnr_uniform(SD, 6)
    solver = get_solver("dpm_solver_pp_2m")
    a = generate(
        mixture,
        schedule,
        solver,
        17,
        (1, 2, 3),
        seed=1,
        chunk_size=4,
        dtype=torch.float64,
        progress=False,
    )
    b = generate(
        mixture,
        schedule,
        solver,
        17,
        (1, 2, 3),
        seed=1,
        chunk_size=17,
        dtype=torch.float64,
        progress=False,
    )
    assert a.shape == (17, 1, 2, 3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_steps_for_nfe():
    def schedule(n):
        return make_schedule(SD, n, "logsnr_uniform")

    assert steps_for_nfe(get_solver("dpm_solver_pp_2m"), schedule, 7) == 7
    heun = get_solver("heun")
    nfe_of = {n: heun.evaluation_times(schedule(n)).size for n in range(1, 6)}
    odd = steps_for_nfe(heun, schedule, nfe_of[3])
    assert odd == 3
    missing = sorted(set(range(1, 10)) - set(nfe_of.values()))
    assert steps_for_nfe(heun, schedule, missing[0]) is None


def test_result_table_markdown_json_and_plot(tmp_path):
    table = ResultTable("fd")
    for method, values in {"a": (5.0, 3.0), "b": (4.0, 3.5)}.items():
        for nfe, value in zip((4, 8), values, strict=True):
            table.add(Cell(method, nfe, "fd", value))
    markdown = table.to_markdown()
    assert "| a | 5.00 | **3.00** |" in markdown and "| b | **4.00** | 3.50 |" in markdown
    paths = table.save(tmp_path, "fd", "title", model="x")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths["json"].read_text())
    assert ResultTable.from_json_dict(payload).to_markdown() == markdown and payload["model"] == "x"
    with pytest.raises(ValueError):
        table.add(Cell("a", 4, "kid", 1.0))
    grid = image_grid(torch.zeros(5, 1, 8, 8), nrow=3)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3) and grid.dtype == np.uint8


def test_environment_names_the_cpu_kernels():
    recorded = environment()
    # torch's own report of the instruction set its CPU kernels dispatch to
    assert recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert recorded["cpu_model"] and recorded["torch"] == torch.__version__
    json.dumps(recorded)


def test_list_options_accept_several_values():
    argv = ["eval", "--nfe", "4", "5", "--solvers", "ddim,heun", "--out", "x", "--nfe", "6"]
    assert expand_list_options(argv, {"--nfe", "--solvers"}) == [
        "eval",
        "--nfe",
        "4",
        "--nfe",
        "5",
        "--solvers",
        "ddim",
        "--solvers",
        "heun",
        "--out",
        "x",
        "--nfe",
        "6",
    ]


def test_schedule_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["schedule", "show", "--spacing", "trailing", "--steps", "4"])
    assert result.exit_code == 0 and "999" in result.output and "clean" in result.output
    path = tmp_path / "k.json"
    assert runner.invoke(app, ["schedule", "save", str(path), "--steps", "3"]).exit_code == 0
    assert json.loads(path.read_text())["times"][-1] == 0.0
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text().replace("0.0\n", "NaN\n", 1))
    result = runner.invoke(app, ["schedule", "show", "--file", str(bad)])
    assert result.exit_code == 2 and "non-finite" in result.output
    result = runner.invoke(app, ["schedule", "show", "--spacing", "nope"])
    assert result.exit_code == 2 and "unknown spacing" in result.output


EVAL_ARGS = [
    "eval",
    "--model",
    "digits",
    "--solvers",
    "dpm_solver_pp_2m",
    "--schedules",
    "logsnr_uniform",
    "--nfe",
    "4",
    "--metric",
    "fd",
    "--num-samples",
    "24",
    "--chunk-size",
    "5",
    "--save-samples",
]


def test_eval_one_process_equals_two_processes(tmp_path):
    """The same seeds give the identical set of images under accelerate with 2 CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "stepsearch", *EVAL_ARGS, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "stepsearch",
    ]
    double = subprocess.run(
        [*launcher, *EVAL_ARGS, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stdout + double.stderr
    name = "stepsearch_dpm_solver_pp_2m_logsnr_uniform_nfe4.safetensors"
    one = load_file(tmp_path / "one" / "samples" / name)["samples"]
    two = load_file(tmp_path / "two" / "samples" / name)["samples"]
    assert one.shape == (24, 1, 8, 8)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    for stem in (
        "results_fd.json",
        "results_fd.md",
        "results_fd.png",
        "summary.md",
        "samples_nfe4.png",
    ):
        assert (tmp_path / "two" / stem).is_file()
