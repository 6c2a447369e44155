"""The ``stepsearch`` command as a new user meets it: list options, clear errors instead of
tracebacks, unreachable budgets reported, the schedule/noise trap, readable help."""

import json
from pathlib import Path
from typing import Annotated

import pytest
import torch
import typer
from typer.testing import CliRunner

from stepsearch.cli import app, search_app, search_command
from stepsearch.models import model_noise
from stepsearch.schedule import StepSchedule


def _invoke(*args: object, **env: str):
    return CliRunner(env=env or None).invoke(app, [str(arg) for arg in args])


def _flat(text: str) -> str:
    return " ".join(text.split())


def _fd_eval(out: Path, *extra: object):
    return _invoke("eval", "--metric", "fd", "--num-samples", "8", "--out", out, *extra)


def test_several_values_after_one_flag_reach_the_command(tmp_path):
    result = _fd_eval(tmp_path / "o", "--solvers", "ddim", "euler", "--nfe", "2", "3")
    assert result.exit_code == 0, result.output
    cells = json.loads((tmp_path / "o" / "results_fd.json").read_text())["cells"]
    assert {(cell["method"], cell["nfe"]) for cell in cells} == {
        (f"stepsearch {solver} / logsnr_uniform", nfe)
        for solver in ("ddim", "euler")
        for nfe in (2, 3)
    }


def test_unreachable_nfe_is_reported_per_solver(tmp_path):
    # Heun with a clean end spends 2n - 1 evaluations: NFE 3 (n = 2) is reachable, 4 is not.
    result = _fd_eval(tmp_path / "o", "--solvers", "heun", "ddim", "--nfe", "3", "4")
    assert result.exit_code == 0, result.output
    assert "stepsearch heun / logsnr_uniform cannot spend exactly NFE 4" in _flat(result.output)
    assert "ddim / logsnr_uniform cannot" not in result.output
    cells = json.loads((tmp_path / "o" / "results_fd.json").read_text())["cells"]
    assert sorted(c["nfe"] for c in cells if "heun" in c["method"]) == [3]
    assert (
        "- stepsearch heun / logsnr_uniform: NFE 4" in (tmp_path / "o" / "summary.md").read_text()
    )


def test_budgets_nothing_can_spend_are_refused(tmp_path):
    result = _fd_eval(tmp_path / "o", "--nfe", "0")
    assert result.exit_code == 2 and "greater than or equal to 1" in _flat(result.output)
    result = _fd_eval(tmp_path / "o", "--solvers", "heun", "--nfe", "2")
    assert result.exit_code == 2 and "no method can spend exactly NFE 2" in _flat(result.output)
    assert not (tmp_path / "o" / "results_fd.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--baselines", "DDIMSchedulr"], "did you mean DDIMScheduler"),
        (["eval", "--solvers", "dpm_solver_pp2m"], "unknown solver 'dpm_solver_pp2m'"),
        (["schedule", "show", "--file", "missing.json"], "does not exist"),
        (["schedule", "show", "--noise", "sd"], "--noise: choose one of digits"),
        (["export", "missing.json", "--to", "kdiffusion"], "does not exist"),
    ],
)
def test_usage_errors_are_messages_not_tracebacks(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in _flat(result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cuda_device_without_cuda_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _fd_eval(tmp_path / "o", "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available on this machine" in _flat(result.output)
    assert "use --device cpu" in _flat(result.output)
    result = _fd_eval(tmp_path / "o", "--device", "gpu0")
    text = _flat(result.output)
    assert result.exit_code == 2 and "Invalid value for '--device'" in text and "'gpu0'" in text


def test_schedule_file_for_another_noise_says_which_and_how(tmp_path):
    wrong, right = tmp_path / "sd.json", tmp_path / "digits.json"
    assert _invoke("schedule", "save", wrong, "--steps", "4").exit_code == 0  # Stable Diffusion
    result = _fd_eval(tmp_path / "o", "--schedules", wrong, "--nfe", "4")
    assert result.exit_code == 2
    text = _flat(result.output)
    assert "scaled_linear" in text and "beta_schedule='linear'" in text  # held vs expected
    assert "stepsearch schedule save FILE --model digits" in text
    assert _invoke("schedule", "save", right, "--steps", "4", "--model", "digits").exit_code == 0
    assert StepSchedule.load(right).noise == model_noise("digits")
    preset = tmp_path / "preset.json"
    assert _invoke("schedule", "save", preset, "--steps", "4", "--noise", "digits").exit_code == 0
    assert StepSchedule.load(preset) == StepSchedule.load(right)
    result = _fd_eval(tmp_path / "o", "--schedules", right, "--nfe", "4")
    assert result.exit_code == 0, result.output
    result = _invoke("schedule", "save", preset, "--noise", "edm", "--model", "digits")
    assert result.exit_code == 2 and "not both" in result.output


def test_eval_help_is_readable_at_80_columns():
    result = _invoke("eval", "--help", COLUMNS="80")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "<bool>" not in result.output and "…" not in result.output  # no cut-off names
    for option in ("--inception-weights", "--reference-stats", "--save-samples", "--chunk-size"):
        assert option in result.output
    assert "[default: 4 5 6 8 10]" in _flat(result.output.replace("│", " "))


def test_missing_inception_names_the_flag(tmp_path):
    images = tmp_path / "images.safetensors"
    result = _invoke("stats", images, "--out", tmp_path / "s.npz",
                     "--inception-weights", tmp_path / "absent.pt")  # fmt: skip
    assert result.exit_code == 2
    text = _flat(result.output)
    assert "pass --inception-weights FILE" in text and "InceptionFeatures(" not in text


def test_search_group_takes_registered_commands():
    assert _invoke("search", "--help").exit_code == 0

    @search_command("probe")
    def probe(nfe: Annotated[list[int], typer.Option()]) -> None:
        print("nfe", nfe)

    try:
        result = _invoke("search", "probe", "--nfe", "4", "5")
        assert result.exit_code == 0, result.output
        assert "nfe [4, 5]" in result.output
    finally:
        search_app.registered_commands.pop()
