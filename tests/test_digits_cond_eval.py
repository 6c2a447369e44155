"""``digits-cond`` and ``digits-flow`` as first-class models of eval, the objective and the searches:
labels follow sample indices (``i mod 10``), classifier-free guidance is the same in stepsearch's
solvers and in diffusers' loop, and the guidance scale is part of every provenance."""

from importlib import resources

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stepsearch.eval.experiment import run_experiment
from stepsearch.models import Method, load_image_model
from stepsearch.schedule import StepSchedule

pytestmark = pytest.mark.skipif(
    not (resources.files("stepsearch") / "data" / "digits_cond_unet.safetensors").is_file(),
    reason="digits-cond is not trained yet",
)


@pytest.fixture(autouse=True)
def _no_grad():
    torch.set_grad_enabled(False)
    yield
    torch.set_grad_enabled(True)


def _diffusers_ddim_pair(model, nfe: int) -> list[Method]:
    """diffusers' DDIMScheduler (leading, steps_offset 1, last step to alphas_cumprod[0]) and
    stepsearch's DDIM replaying its timesteps: the same sampler, twice."""
    from diffusers import DDIMScheduler

    options = {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
               "set_alpha_to_one": False}  # fmt: skip
    ddim = DDIMScheduler.from_config(model.scheduler_config, **options)
    ddim.set_timesteps(nfe)
    timesteps = ddim.timesteps.numpy().astype(np.float64)
    schedule = StepSchedule.from_diffusers_timesteps(model.noise, timesteps, final="t_min")
    return [
        Method.stepsearch("ddim", schedule.with_metadata(name="diffusers DDIM timesteps")),
        Method.diffusers("DDIMScheduler", **options),
    ]


def test_guided_ddim_is_the_same_sampler_in_stepsearch_and_in_diffusers():
    """At guidance 2, in chunks of 5 (labels must follow the indices, not the chunk): diffusers'
    DDIMScheduler in its own loop == stepsearch's DDIM on its timesteps == DDIM on the
    registry's own guided denoiser ``digits.load("digits-cond").denoiser(i mod 10, 2)``."""
    from stepsearch.models.source import generate
    from stepsearch.solvers import get_solver
    from stepsearch.testbeds import digits

    model = load_image_model("digits-cond", guidance_scale=2.0)
    assert model.conditional and model.guidance_scale == 2.0
    ours_method, theirs_method = _diffusers_ddim_pair(model, 7)
    ours, steps = ours_method.run(model, 7, 12, seed=5, chunk_size=5)
    theirs, diffusers_steps = theirs_method.run(model, 7, 12, seed=5, chunk_size=5)
    assert steps == diffusers_steps == 7
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    bundle = digits.load("digits-cond")
    schedule = ours_method.schedule_on(model.noise, 7)
    labels = torch.arange(12) % 10

    def registry(scale: float) -> torch.Tensor:
        return generate(
            bundle.denoiser(labels, scale), schedule, get_solver("ddim"), 12, digits.IMAGE_SHAPE,
            seed=5, chunk_size=12, progress=False,
        )  # fmt: skip

    torch.testing.assert_close(ours, registry(2.0), rtol=1e-4, atol=1e-4)
    # the guidance and the labels reach the samples: other scales or labels give others
    assert (ours - registry(1.0)).abs().max() > 0.1
    unguided = load_image_model("digits-cond", guidance_scale=1.0)
    conditional_only, _ = theirs_method.run(unguided, 7, 12, seed=5, chunk_size=5)
    torch.testing.assert_close(conditional_only, registry(1.0), rtol=1e-4, atol=1e-4)
    shifted = generate(
        bundle.denoiser((labels + 1) % 10, 2.0), schedule, get_solver("ddim"), 12,
        digits.IMAGE_SHAPE, seed=5, chunk_size=12, progress=False,
    )  # fmt: skip
    assert (ours - shifted).abs().max() > 0.1


def test_flow_match_euler_runs_as_a_baseline_and_equals_stepsearch_euler():
    """``Method.diffusers("FlowMatchEulerDiscreteScheduler")`` (no ``init_noise_sigma``, no
    ``scale_model_input``) in the harness == stepsearch's Euler (DDIM on a rectified flow) on
    the same shifted grid, and the grid is diffusers' own sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = load_image_model("digits-flow")
    theirs, steps = Method.diffusers("FlowMatchEulerDiscreteScheduler").run(
        model, 6, 10, seed=2, chunk_size=4
    )
    ours_method = Method.stepsearch("ddim", "flow_shifted")
    ours, _ = ours_method.run(model, 6, 10, seed=2, chunk_size=4)
    assert steps == 6
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(6)
    np.testing.assert_allclose(
        ours_method.schedule_on(model.noise, 6).times, scheduler.sigmas.double().numpy(),
        rtol=1e-6, atol=1e-7,
    )  # fmt: skip
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_accuracy_metric_and_the_guidance_in_source_and_provenance():
    from stepsearch.cache import TensorCache
    from stepsearch.eval.objective import Objective
    from stepsearch.solvers import get_solver
    from stepsearch.testbeds import digits

    model = load_image_model("digits-cond")  # default guidance
    assert model.guidance_scale == digits.GUIDANCE_SCALE == 2.0
    source = model  # an ImageModel is a sample source
    described = source.describe()
    assert described["guidance_scale"] == 2.0 and described["labels"] == "index mod 10"
    assert load_image_model("digits-cond", guidance_scale=4.0).describe() != described
    labels = digits.real_labels()[torch.from_numpy(digits.label_cycle_indices())]
    assert torch.equal(labels, torch.arange(len(labels)) % 10)
    torch.testing.assert_close(source.reference_data[3], digits.real_images()[3])  # a 3

    kept: dict[str, torch.Tensor] = {}
    method = Method.stepsearch("dpm_solver_pp_2m", "logsnr_uniform")
    tables = run_experiment(
        model, [method], [8], ["acc"], num_samples=20, chunk_size=7,
        on_samples=lambda _m, _n, samples: kept.setdefault("x", samples),
    )  # fmt: skip
    expected = digits.class_accuracy(digits.load_classifier(), kept["x"], torch.arange(20) % 10)
    assert tables["acc"].value(method.label, 8) == pytest.approx(expected, abs=1e-12)
    assert not tables["acc"].lower_is_better

    objective = Objective(
        source, "fd", num_samples=8, held_out_samples=8, solver="ddim", cache=TensorCache(None)
    )
    score = objective(method.schedule_on(model.noise, 4))
    provenance = objective.provenance(get_solver("ddim"), score, score, "test", {})
    assert provenance.guidance_scale == 2.0
    assert provenance.objective["source"]["guidance_scale"] == 2.0


def test_guidance_scale_is_refused_for_unconditional_models(tmp_path):
    from stepsearch.cli import app

    with pytest.raises(ValueError, match="'digits' is unconditional"):
        load_image_model("digits", guidance_scale=2.0)
    with pytest.raises(ValueError, match="metric acc"):
        run_experiment(load_image_model("digits-flow"), [], [4], ["acc"], num_samples=4)
    runner = CliRunner()
    for command in (
        ["eval", "--model", "digits-flow", "--guidance-scale", "2", "--out", str(tmp_path)],
        ["search", "dp", "--model", "digits", "--guidance-scale", "2", "--out", str(tmp_path)],
    ):
        done = runner.invoke(app, command, env={"COLUMNS": "300"})
        assert done.exit_code == 2, done.output
        assert "is unconditional" in " ".join(done.output.split()), done.output


def test_a_flow_schedule_written_with_the_models_prediction_type_replays_in_diffusers_loop():
    """What a search on ``digits-flow`` writes (``prediction_type`` ``flow`` from its provenance):
    the drop-in DDIM scheduler on the flow schedule, run by diffusers' loop == stepsearch's DDIM
    on the schedule; a non-flow prediction type is refused."""
    from stepsearch.integrations.diffusers import StepsearchDDIMScheduler
    from stepsearch.schedule import make_schedule

    model = load_image_model("digits-flow")
    schedule = make_schedule(model.noise, 5, "flow_shifted")
    scheduler = StepsearchDDIMScheduler.from_step_schedule(schedule, prediction_type="flow")
    theirs = model.sample_diffusers(scheduler, 5, 6, 1, None, 6, False)
    ours = model.sample_schedule(
        Method.stepsearch("ddim", schedule), schedule, 6, 1, None, 6, False
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs prediction_type 'flow_prediction'"):
        StepsearchDDIMScheduler.from_step_schedule(schedule, prediction_type="epsilon")


@pytest.mark.slow
def test_optimize_on_digits_cond_records_the_guidance_and_its_grid_is_the_guided_source(tmp_path):
    """``optimize("digits-cond", guidance_scale=4)``: the run's fingerprint, the report and the
    winner's schedule file name guidance 4; the report grid, made by the written scheduler
    directory in diffusers' loop (labels ``i mod 10``, guided output), equals the winner's solver
    on the guided source from the same noise; another guidance is another run."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from stepsearch.cache import TensorCache
    from stepsearch.models.source import generate_from_source
    from stepsearch.schedule_file import ScheduleFile
    from stepsearch.search.dp_job import DPSettings
    from stepsearch.search.optimize import OptimizeSettings, optimize
    from stepsearch.solvers import solver_from_json

    settings = OptimizeSettings(
        search_samples=12, select_samples=12, held_out_samples=12, dp_solvers=("ddim",),
        baseline_solvers=("ddim",), spacings=("trailing",), diffusers_baselines=False,
        dp=DPSettings(grid_points=10, teacher_samples=12, coeffs=(1.15,)), grid_rows=1,
        grid_cols=6, chunk_size=5,
    )  # fmt: skip
    out = tmp_path / "run"
    result = optimize(
        "digits-cond", [4], ["dp"], 30.0, out, guidance_scale=4.0, settings=settings,
        cache=TensorCache(None), progress=False,
    )  # fmt: skip
    report = result.report
    assert report["conditioning"]["guidance_scale"] == 4.0
    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    assert fingerprint["conditioning"]["guidance_scale"] == 4.0
    entry = report["per_nfe"]["4"]
    schedule_file = ScheduleFile.load(entry["files"]["schedule"])
    assert schedule_file.provenance.guidance_scale == 4.0
    assert schedule_file.provenance.extra["conditioning"]["labels"] == "index mod 10"
    folder = out / "nfe-4"
    with safe_open(str(folder / "samples.safetensors"), "pt") as grid_file:
        metadata = grid_file.metadata()
    assert metadata["guidance_scale"] == "4.0" and json.loads(metadata["labels"])[:3] == [0, 1, 2]
    grid = load_file(str(folder / "samples.safetensors"))["winner"]
    solver = solver_from_json(dict(schedule_file.provenance.solver))
    source = load_image_model("digits-cond", guidance_scale=4.0)
    direct = generate_from_source(source, solver, schedule_file.schedule, 6, seed=2, chunk_size=4)
    torch.testing.assert_close(grid, direct, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="holds another optimize run"):
        optimize(
            "digits-cond", [4], ["dp"], 30.0, out, guidance_scale=2.0, settings=settings,
            cache=TensorCache(None), progress=False,
        )  # fmt: skip
