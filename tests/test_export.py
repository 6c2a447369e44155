"""``stepsearch export``: a schedule file to a diffusers scheduler directory (round trip,
bitwise), k-diffusion sigmas, ComfyUI SIGMAS and diffusers timesteps."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.integrations.diffusers import StepsearchScheduler, scheduler_for_solver
from stepsearch.integrations.export import diffusers_scheduler, export_schedule
from stepsearch.models.batches import generate_with_diffusers_scheduler
from stepsearch.noise import EDM
from stepsearch.schedule import StepSchedule, karras, logsnr_uniform, make_schedule
from stepsearch.testbeds import digits


@pytest.fixture(scope="module")
def digits_model():
    return digits.load()


def _samples(model, scheduler, num_steps):
    samples, _ = generate_with_diffusers_scheduler(
        lambda x, t: model.unet(x, t).sample, scheduler, num_steps, 6, digits.IMAGE_SHAPE,
        seed=3, progress=False,
    )  # fmt: skip
    return samples


@pytest.mark.parametrize("solver", ["dpm_solver_pp_2m", "unipc_bh2"])
def test_diffusers_export_round_trip_is_bitwise(digits_model, solver, tmp_path):
    schedule = logsnr_uniform(_digits_noise(), 5).with_metadata(name="test")
    path = tmp_path / "schedule.json"
    schedule.save(path)
    command = ["export", str(path), "--to", "diffusers", str(tmp_path / "sched"), "--solver", solver]
    refused = CliRunner().invoke(app, command)  # a plain schedule does not say: no guessing
    assert refused.exit_code == 2 and "prediction type" in refused.output
    assert not (tmp_path / "sched").exists()
    result = CliRunner().invoke(app, [*command, "--prediction-type", "v_prediction"])
    assert result.exit_code == 0, result.output
    loaded = scheduler_for_solver(solver).from_pretrained(tmp_path / "sched")
    generic = StepsearchScheduler.from_pretrained(tmp_path / "sched")
    in_process = diffusers_scheduler(StepSchedule.load(path), solver, "v_prediction")
    assert loaded.config.solver == generic.config.solver == solver
    loaded.set_timesteps(5)
    assert np.array_equal(loaded.schedule.times, schedule.times)
    expected = _samples(digits_model, in_process, 5)
    assert torch.equal(_samples(digits_model, loaded, 5), expected)
    assert torch.equal(_samples(digits_model, generic, 5), expected)
    assert expected.abs().max() > 0.1  # real samples, not a constant


def test_sigma_and_timestep_exports(tmp_path):
    from stepsearch.noise import DiscreteVP

    sd = DiscreteVP.stable_diffusion()
    schedule = karras(sd, 6)
    sigmas = export_schedule(schedule, "kdiffusion")
    assert sigmas == schedule.to_kdiffusion_sigmas().tolist() and sigmas[-1] == 0.0
    comfy = export_schedule(schedule, "comfyui", tmp_path / "comfy.json")
    assert json.loads((tmp_path / "comfy.json").read_text()) == comfy
    assert comfy == torch.tensor(sigmas, dtype=torch.float32).tolist()
    trailing = export_schedule(make_schedule(sd, 4, "trailing"), "timesteps")
    assert trailing == [999, 749, 499, 249] and all(isinstance(t, int) for t in trailing)
    fractional = export_schedule(schedule, "timesteps")
    assert len(fractional) == 6 and any(t != round(t) for t in fractional)
    with pytest.raises(ValueError, match="needs a directory"):
        export_schedule(schedule, "diffusers")
    with pytest.raises(ValueError, match="end in 0"):
        export_schedule(StepSchedule(np.array([0.9, 0.5, 0.1]), sd), "comfyui")
    with pytest.raises(ValueError, match="DiscreteVP or FlowMatching"):
        export_schedule(karras(EDM(), 4), "diffusers", tmp_path / "edm")
    with pytest.raises(ValueError, match="unknown export target"):
        export_schedule(schedule, "onnx")


def test_export_cli_prints_json_to_stdout(tmp_path):
    path = tmp_path / "s.json"
    schedule = make_schedule(_digits_noise(), 4, "trailing")
    schedule.save(path)
    result = CliRunner().invoke(app, ["export", str(path), "--to", "timesteps"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [999, 749, 499, 249]
    result = CliRunner().invoke(app, ["export", str(path), "--to", "diffusers"])
    assert result.exit_code == 2 and "needs a directory" in result.output
    result = CliRunner().invoke(app, ["export", str(path), "--to", "kdiffusion", "--solver", "x"])
    assert result.exit_code == 2 and "apply to the diffusers export" in result.output


def _digits_noise():
    from stepsearch.models import model_noise

    return model_noise("digits")


def test_atomic_write_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from stepsearch._io import atomic_write_dir

    target = tmp_path / "scheduler"
    atomic_write_dir(target, lambda d: (d / "a.json").write_text("1"))
    assert (target / "a.json").read_text() == "1"

    def fails(folder):
        (folder / "b.json").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, fails)
    assert sorted(p.name for p in target.iterdir()) == ["a.json"]  # the old result, untouched
    atomic_write_dir(target, lambda d: (d / "b.json").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.json"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler"]  # no staging left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        atomic_write_dir(tmp_path / "file", lambda d: None)
