"""A solver plan as a diffusers scheduler (issue 21): ``StepsearchPlanScheduler`` replays plans with
every feature of the unified step (Taylor order 4 with chosen estimation points, relaxations, noise
and data predictions, pseudo and UniC correctors, ``zero_x0`` / ``data_mean`` / model first steps)
bit for bit as stepsearch's ``sample(denoiser, x_T, plan, PlanSolver(...))`` does, in diffusers' own
loop, after ``from_pretrained`` in a fresh process, in float32 and float64; it spends exactly
``plan.nfe`` model calls; hand-edited directories are refused naming the file and field; search
jobs, ``stepsearch export`` and ``stepsearch schedule show`` handle plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.denoiser import ModelDenoiser
from stepsearch.integrations.plan_scheduler import (
    StepsearchPlanScheduler,
    write_plan_scheduler_dir,
)
from stepsearch.models.batches import unit_noise
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.plan import SolverPlan
from stepsearch.sampling import sample
from stepsearch.schedule import StepSchedule, flow_shifted, logsnr_uniform, make_schedule
from stepsearch.schedule_file import Provenance, ScheduleFile
from stepsearch.search.job import write_job_result
from stepsearch.solvers import PlanSolver, solver_to_json
from stepsearch.solvers.plan_solver import data_mean_of
from stepsearch.testbeds import digits
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

pytestmark = pytest.mark.usefixtures("_one_thread")

ROOT = Path(__file__).resolve().parents[1]
SHAPE = digits.IMAGE_SHAPE
BATCH = 4
SEED = 3


def feature_plans(schedule: StepSchedule) -> dict[str, SolverPlan]:
    """Three 6-step plans (clean end) that together use every feature of a plan."""
    n = schedule.num_steps
    assert n == 6 and schedule.ends_clean
    return {
        # Taylor orders 1-4, estimation order below the Taylor order (step 3: order 3 from one
        # point), relaxations, both predictions, pseudo-correctors, the data mean at t_0
        "taylor_data_mean": SolverPlan(
            schedule,
            orders=(1, 1, 2, 3, 4, 1),
            predictions=("data", "noise", "data", "noise", "data", "data"),
            correctors=("none", "pseudo", "pseudo", "none", "pseudo", "none"),
            rules=("taylor",) * n,
            estimation_points=((), (), (1,), (2,), (1, 2, 3), ()),
            relaxations=(0.0, 0.35, -0.2, 0.15, 0.05, 0.0),
            first_step="data_mean",
        ),
        # UniP / multistep DPM-Solver steps with UniC next to Taylor steps; eps := x_T at t_0
        "unipc_zero_x0": SolverPlan(
            schedule,
            orders=(1, 1, 2, 3, 3, 1),
            predictions=("data", "noise", "data", "noise", "noise", "data"),
            correctors=("none", "unipc", "unipc", "pseudo", "none", "none"),
            rules=("unipc", "unipc", "unipc", "taylor", "unipc", "taylor"),
            estimation_points=((), (), (1,), (1, 2), (1, 2), ()),
            relaxations=(0.0, 0.0, 0.0, -0.3, 0.0, 0.0),
            first_step="zero_x0",
        ),
        # the model at t_0, Taylor order 4 from three points in noise prediction
        "model_first": SolverPlan(
            schedule,
            orders=(1, 2, 3, 4, 3, 1),
            predictions=("data", "noise", "data", "noise", "data", "noise"),
            correctors=("pseudo", "unipc", "pseudo", "none", "unipc", "none"),
            rules=("taylor", "unipc", "taylor", "taylor", "unipc", "taylor"),
            estimation_points=((), (1,), (1, 2), (1, 2, 3), (1, 2), ()),
            relaxations=(0.25, 0.0, 0.2, -0.1, 0.0, 0.0),
        ),
    }


def digits_noise() -> DiscreteVP:
    return DiscreteVP.from_diffusers_config(digits.checkpoint_record()["scheduler_config"])


def digits_plans() -> dict[str, SolverPlan]:
    """The feature plans on the digits noise: logSNR-uniform (fractional float32 timesteps) and
    the trailing grid for one of them (integer int64 timesteps)."""
    noise = digits_noise()
    plans = feature_plans(logsnr_uniform(noise, 6))
    trailing = feature_plans(make_schedule(noise, 6, "trailing"))
    plans["unipc_zero_x0_trailing"] = trailing["unipc_zero_x0"]
    # a first time below the largest (S³ with a free start, AutoDiffusion's seeds)
    truncated = StepSchedule(np.array([0.7, 0.45, 0.25, 0.12, 0.05, 0.015, 0.0]), noise)
    plans["model_first_truncated"] = feature_plans(truncated)["model_first"]
    return plans


_CHILD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from stepsearch.integrations.plan_scheduler import StepsearchPlanScheduler
from stepsearch.models.batches import generate_with_diffusers_scheduler
from stepsearch.testbeds import digits

folder = sys.argv[1]
names = json.loads(sys.argv[2])
seed = int(sys.argv[3])
starts = load_file(f"{folder}/x_T.safetensors")
results, calls = {}, {}
for dtype in (torch.float32, torch.float64):
    unet = digits.load(dtype=dtype).unet
    tag = str(dtype).removeprefix("torch.")
    for name in names:
        scheduler = StepsearchPlanScheduler.from_pretrained(f"{folder}/{name}")
        counted = []

        def network(x, t):
            counted.append(float(t.reshape(-1)[0]))
            return unet(x, t).sample

        steps = scheduler.num_plan_steps
        if dtype == torch.float32:  # the project's own loop (pipelines' set_timesteps / scale / step)
            out, _ = generate_with_diffusers_scheduler(
                network, scheduler, steps, len(starts[tag]), digits.IMAGE_SHAPE, seed=seed,
                progress=False,
            )
        else:  # diffusers' canonical loop written out
            scheduler.set_timesteps(steps)
            x = starts[tag] * scheduler.init_noise_sigma
            with torch.inference_mode():
                for t in scheduler.timesteps:
                    output = network(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
                    x = scheduler.step(output, t, x).prev_sample
            out = x
        results[f"{name}/{tag}"] = out.contiguous()
        calls[f"{name}/{tag}"] = {"calls": len(counted), "timesteps": len(scheduler.timesteps)}
save_file(results, f"{folder}/replayed.safetensors")
with open(f"{folder}/calls.json", "w") as file:
    json.dump(calls, file)
"""


def test_plans_replay_bit_for_bit_after_from_pretrained_in_a_fresh_process(tmp_path):
    """Every feature plan, saved with the job's own writer, loaded in a fresh process and run in
    diffusers' loop (the project's generate_with_diffusers_scheduler in float32, the canonical
    loop in float64), equals sample() bitwise; UNet calls = len(timesteps) = plan.nfe."""
    plans = digits_plans()
    noise = digits_noise()
    solver = PlanSolver(data_mean=data_mean_of(digits.real_images()))
    for name, plan in plans.items():
        written = write_plan_scheduler_dir(
            tmp_path / name, plan, solver, prediction_type="v_prediction"
        )
        assert written == tmp_path / name and (written / "scheduler_config.json").is_file()
    starts = {
        "float32": unit_noise(range(BATCH), SHAPE, SEED, torch.float32),
        "float64": unit_noise(range(BATCH), SHAPE, SEED, torch.float64),
    }
    save_file(starts, tmp_path / "x_T.safetensors")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + environment.get("PYTHONPATH", "")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), json.dumps(list(plans)), str(SEED)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    expected = {}  # stepsearch's own sampling, while the child runs
    for dtype in (torch.float32, torch.float64):
        unet = digits.load(dtype=dtype).unet
        denoiser = ModelDenoiser(lambda x, t, unet=unet: unet(x, t).sample, noise, "v_prediction")
        tag = str(dtype).removeprefix("torch.")
        for name, plan in plans.items():
            with torch.inference_mode():
                result = sample(denoiser, starts[tag], plan, solver)
            assert result.nfe == plan.nfe == 6 - int(plan.analytical_first_step)
            expected[f"{name}/{tag}"] = result.sample
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, out + err
    replayed = load_file(tmp_path / "replayed.safetensors")
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert sorted(replayed) == sorted(expected)
    for key, reference in expected.items():
        plan = plans[key.split("/")[0]]
        assert calls[key] == {"calls": plan.nfe, "timesteps": plan.nfe}, key
        assert replayed[key].dtype == reference.dtype
        assert torch.equal(replayed[key], reference), (
            f"{key}: max difference {float((replayed[key] - reference).abs().max()):.3g}"
        )
        assert reference.abs().max() > 0.5  # real samples
    # the plans differ from each other (each feature changes the result)
    finals = [expected[f"{name}/float64"] for name in plans]
    assert all(not torch.equal(a, b) for i, a in enumerate(finals) for b in finals[i + 1 :])


def _flow_bed() -> tuple[GaussianMixture, FlowMatching]:
    noise = FlowMatching(shift=3.0)
    rng = np.random.default_rng(0)
    dim = int(np.prod(SHAPE))
    means = rng.normal(0.0, 1.0, (3, dim))
    variances = np.exp(rng.uniform(-3.0, 0.0, (3, dim)))
    return GaussianMixture([0.5, 0.3, 0.2], means, variances, noise, SHAPE), noise


def test_flow_matching_plans_replay_bitwise_on_an_exact_bed(tmp_path):
    """Rectified flow (alpha = 0 at t_0 = 1): an exact Gaussian-mixture velocity network, float64;
    every feature plan equals sample() bitwise through save / from_pretrained."""
    data, noise = _flow_bed()

    def velocity(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        t = float(model_time.reshape(-1)[0]) / noise.num_train_timesteps
        return (x - data(x, t)) / t  # u = eps - x0 with x = (1 - t) x0 + t eps

    denoiser = ModelDenoiser(velocity, noise, "flow")
    solver = PlanSolver(data_mean=data_mean_of(data))
    x_T = unit_noise(range(BATCH), SHAPE, SEED, torch.float64)
    for name, plan in feature_plans(flow_shifted(noise, 6, shift=3.0)).items():
        StepsearchPlanScheduler.from_plan(plan, solver).save_pretrained(tmp_path / name)
        scheduler = StepsearchPlanScheduler.from_pretrained(tmp_path / name)
        assert scheduler.config.prediction_type == "flow_prediction"
        scheduler.set_timesteps(6)
        x, calls = x_T * scheduler.init_noise_sigma, 0
        for t in scheduler.timesteps:
            calls += 1
            output = velocity(scheduler.scale_model_input(x, t), t.expand(BATCH))
            x = scheduler.step(output, t, x, return_dict=False)[0]
        expected = sample(denoiser, x_T, plan, solver)
        assert calls == expected.nfe == plan.nfe
        assert torch.equal(x, expected.sample), name


# ------------------------------------------------------------------------------------------------
# hand-edited directories
# ------------------------------------------------------------------------------------------------


def _toy_noise() -> DiscreteVP:
    return DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"})


@pytest.fixture()
def plan_dir(tmp_path):
    plan = feature_plans(logsnr_uniform(_toy_noise(), 6))["taylor_data_mean"]
    solver = PlanSolver(data_mean=torch.linspace(-0.5, 0.5, 64, dtype=torch.float64).reshape(SHAPE))
    write_plan_scheduler_dir(tmp_path / "scheduler", plan, solver, prediction_type="epsilon")
    path = tmp_path / "scheduler" / "scheduler_config.json"
    return path, json.loads(path.read_text()), plan


def _edit(config: dict, field: str, value: object) -> dict:
    edited = json.loads(json.dumps(config))
    *parents, last = field.split(".")
    target = edited
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return edited


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "solver_plan.orders.3",
            7,
            r"solver_plan: step 3: order must be an integer in \[1, 2, 3, 4\]",
        ),
        ("solver_plan.orders.4", 1.5, "solver_plan: step 4: order must be an integer"),
        ("solver_plan.predictions.1", "velocity", "solver_plan: step 1: prediction must be one of"),
        ("solver_plan.correctors.5", "pseudo", "solver_plan: step 5: the last step cannot have"),
        ("solver_plan.rules.2", "heun", "solver_plan: step 2: rule must be one of"),
        (
            "solver_plan.estimation_points.4",
            [1, 1],
            "solver_plan: step 4: estimation points repeat",
        ),
        (
            "solver_plan.estimation_points.2",
            [2],
            r"solver_plan: step 2: estimation point 2 \(t_0\)",
        ),
        ("solver_plan.relaxations.1", "big", "solver_plan: step 1: relaxation must be a finite"),
        (
            "solver_plan.relaxations",
            [0.0] * 5,
            "solver_plan: relaxations has 5 entries for 6 steps",
        ),
        ("solver_plan.first_step", "noise", "solver_plan: first_step must be one of"),
        ("solver_plan.version", 9, "solver_plan: unsupported solver plan version 9"),
        ("solver_plan.format", "x", "solver_plan: not a solver plan"),
        ("solver_plan.relaxations", _DELETE, "solver_plan: solver plan file lacks 'relaxations'"),
        ("solver_plan", [1, 2], "solver_plan must be a solver plan JSON object"),
        ("solver_plan.schedule.times.2", 0.99, "solver_plan: .*strictly decreasing"),
        (
            "solver_kwargs.data_mean",
            _DELETE,
            "solver_kwargs.data_mean: step 0: first_step 'data_mean'",
        ),
        ("solver_kwargs.variant", "bh3", "solver_kwargs: .*variant must be one of"),
        ("solver", "ddim", "solver: a plan scheduler runs solver 'plan'"),
        ("custom_times.1", 0.5, "custom_times .* disagree with the times of solver_plan"),
        # valid values, but not the plan that was written: the checksum refuses them
        (
            "solver_plan.relaxations.1",
            0.5,
            "plan_checksum: solver_plan or solver_kwargs.data_mean ",
        ),
        ("solver_plan.orders.3", 2, "plan_checksum: solver_plan or .* were edited"),
        ("solver_kwargs.data_mean.0.0.0", 0.25, "plan_checksum: solver_plan or .* were edited"),
    ],
)
def test_edited_directories_are_refused_naming_file_and_field(plan_dir, field, value, message):
    path, config, _ = plan_dir
    path.write_text(json.dumps(_edit(config, field, value)))
    with pytest.raises(ValueError, match=message) as raised:
        StepsearchPlanScheduler.from_pretrained(path.parent)
    assert str(raised.value).startswith(f"{path}: ")


def test_edited_times_are_refused_even_when_consistent(plan_dir):
    path, config, _ = plan_dir
    times = list(config["custom_times"])
    times[2] *= 0.97
    edited = _edit(_edit(config, "custom_times", times), "solver_plan.schedule.times", times)
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="plan_checksum"):
        StepsearchPlanScheduler.from_pretrained(path.parent)


def test_round_trip_and_config_swap(plan_dir):
    path, config, plan = plan_dir
    loaded = StepsearchPlanScheduler.from_pretrained(path.parent)
    assert loaded.plan == plan and loaded.config.plan_checksum == config["plan_checksum"]
    again = StepsearchPlanScheduler.from_config(loaded.config)  # a copy of the config
    assert again.plan == plan and torch.equal(again.solver.data_mean, loaded.solver.data_mean)
    without = {key: value for key, value in config.items() if key != "plan_checksum"}
    assert (
        StepsearchPlanScheduler.from_config(without).config.plan_checksum == config["plan_checksum"]
    )
    with pytest.raises(ValueError, match="needs a solver plan"):
        StepsearchPlanScheduler.from_config({"beta_schedule": "scaled_linear"})


# ------------------------------------------------------------------------------------------------
# the loop's contract
# ------------------------------------------------------------------------------------------------


def _toy_scheduler(name: str) -> tuple[StepsearchPlanScheduler, SolverPlan]:
    plan = feature_plans(logsnr_uniform(_toy_noise(), 6))[name]
    return StepsearchPlanScheduler.from_plan(plan, PlanSolver(data_mean=torch.zeros(SHAPE))), plan


def _eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.5 * x + 0.001 * float(t.reshape(-1)[0]))


def test_set_timesteps_runs_only_the_plan():
    scheduler, plan = _toy_scheduler("unipc_zero_x0")
    with pytest.raises(
        ValueError, match=r"replays a 6-step solver plan \(NFE 5\).*num_inference_steps=6"
    ):
        scheduler.set_timesteps(5)
    scheduler.set_timesteps()
    timesteps = scheduler.timesteps.clone()
    assert len(timesteps) == plan.nfe == 5 and scheduler.num_inference_steps == 6
    scheduler.set_timesteps(timesteps=timesteps)  # the plan's own evaluations
    assert torch.equal(scheduler.timesteps, timesteps)
    scheduler.set_timesteps(sigmas=plan.schedule.to_kdiffusion_sigmas())  # its grid
    assert torch.equal(scheduler.timesteps, timesteps)
    with pytest.raises(ValueError, match="cannot honour these timesteps"):
        scheduler.set_timesteps(timesteps=[999, 700, 400, 100, 10])
    with pytest.raises(ValueError, match="cannot honour these sigmas"):
        scheduler.set_timesteps(sigmas=[14.6, 5.0, 1.0, 0.3, 0.1, 0.03, 0.0])
    with pytest.raises(ValueError, match="runs from its first step only"):
        scheduler.set_begin_index(2)
    with pytest.raises(ValueError, match="not the plan's first model timestep"):
        scheduler.step(torch.zeros(2, *SHAPE), timesteps[2], torch.zeros(2, *SHAPE))


def test_an_analytical_first_step_needs_scale_model_input():
    """A loop that feeds the model x_T itself (DDPMPipeline's) is refused at its first step()."""
    scheduler, _ = _toy_scheduler("taylor_data_mean")
    scheduler.set_timesteps(6)
    x = unit_noise(range(2), SHAPE, 0)
    t = scheduler.timesteps[0]
    with pytest.raises(RuntimeError, match="without calling scale_model_input"):
        scheduler.step(_eps(x, t), t, x)
    with pytest.raises(ValueError, match="not the plan's first model timestep"):
        scheduler.scale_model_input(x, scheduler.timesteps[1])
    # a model-first plan needs nothing: scale_model_input is the identity
    model_first, _ = _toy_scheduler("model_first")
    model_first.set_timesteps(6)
    assert model_first.scale_model_input(x, model_first.timesteps[0]) is x
    for t in model_first.timesteps:
        x = model_first.step(_eps(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_a_guidance_batch_and_repeated_runs_give_the_same_samples():
    """scale_model_input on cat([x_T, x_T]) (Stable Diffusion's CFG batch) gives x_1 per sample;
    a second run of the same scheduler repeats the first exactly."""
    scheduler, _ = _toy_scheduler("taylor_data_mean")
    x_T = unit_noise(range(2), SHAPE, 1)

    def run(doubled: bool) -> torch.Tensor:
        scheduler.set_timesteps(6)
        x = x_T
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if doubled else x
            output = _eps(scheduler.scale_model_input(model_input, t), t)
            x = scheduler.step(output[: len(x)], t, x).prev_sample
        return x

    single = run(False)
    assert torch.equal(run(True), single)
    assert torch.equal(run(False), single)


# ------------------------------------------------------------------------------------------------
# search jobs, export and schedule show
# ------------------------------------------------------------------------------------------------


def _schedule_file(plan: SolverPlan, solver: PlanSolver) -> ScheduleFile:
    provenance = Provenance(
        model={"name": "digits", "digest": "sha256:test"},
        solver=solver_to_json(solver),
        nfe=plan.nfe,
        objective={"metric": "fd"},
        scores={},
        seeds={"search": 0, "held_out": 1},
        search={"family": "s3", "settings": {}},
        prediction_type="v_prediction",
    )
    return ScheduleFile(plan, provenance)


def test_job_result_export_and_show_handle_plans(tmp_path):
    noise = digits_noise()
    plans = feature_plans(logsnr_uniform(noise, 6))
    plan = plans["taylor_data_mean"]
    solver = PlanSolver(variant="bh1", data_mean=data_mean_of(digits.real_images()))
    out = tmp_path / "job"
    out.mkdir()
    files = write_job_result(
        out, _schedule_file(plan, solver), {}, solver=solver, values=[2.0, 1.0], baselines=[],
        title="plan",
    )  # fmt: skip
    assert files["scheduler"] == str(out / "scheduler")
    from_job = StepsearchPlanScheduler.from_pretrained(out / "scheduler")
    assert from_job.plan == plan and from_job.solver == solver
    assert from_job.provenance["search"]["family"] == "s3"
    assert from_job.config.prediction_type == "v_prediction"

    runner = CliRunner()
    exported = runner.invoke(
        app, ["export", str(out / "best_schedule.json"), "--to", "diffusers", str(tmp_path / "e")]
    )
    assert exported.exit_code == 0, exported.output
    assert "StepsearchPlanScheduler" in exported.output and "NFE 5" in exported.output
    again = json.loads((tmp_path / "e" / "scheduler_config.json").read_text())
    first = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    for key in ("solver_plan", "solver_kwargs", "plan_checksum", "prediction_type", "custom_times"):
        assert again[key] == first[key], key

    plain = tmp_path / "plan.json"
    plan.save(plain)  # a plain plan file records no data mean
    refused = runner.invoke(
        app, ["export", str(plain), "--to", "diffusers", str(tmp_path / "p"), "--prediction-type",
              "v_prediction"],
    )  # fmt: skip
    assert refused.exit_code == 2 and "data mean" in refused.output
    zero = tmp_path / "zero.json"
    plans["unipc_zero_x0"].save(zero)
    command = ["export", str(zero), "--to", "diffusers", str(tmp_path / "z")]
    refused = runner.invoke(app, command)
    assert refused.exit_code == 2 and "prediction type" in refused.output
    refused = runner.invoke(app, [*command, "--solver", "ddim", "--prediction-type", "epsilon"])
    assert refused.exit_code == 2 and "'plan' solver" in refused.output
    done = runner.invoke(app, [*command, "--prediction-type", "v_prediction"])
    assert done.exit_code == 0, done.output
    assert StepsearchPlanScheduler.from_pretrained(tmp_path / "z").plan == plans["unipc_zero_x0"]
    sigmas = runner.invoke(app, ["export", str(zero), "--to", "kdiffusion"])
    assert sigmas.exit_code == 0
    assert json.loads(sigmas.output) == plan.schedule.to_kdiffusion_sigmas().tolist()

    for path in (zero, out / "best_schedule.json"):
        shown = runner.invoke(app, ["schedule", "show", "--file", str(path)])
        assert shown.exit_code == 0, shown.output
        described = plans["unipc_zero_x0"] if path == zero else plan
        for line in described.describe().splitlines():
            assert line in shown.output


def test_a_stable_diffusion_pipeline_runs_a_plan(pipe):
    """The (tiny, offline) Stable Diffusion pipeline's own loop: classifier-free guidance batches,
    scale_model_input on cat([latents] * 2), step() on the latents. One UNet call per timestep, NFE
    = plan.nfe, images equal to stepsearch's sampling of the same guided model (to float32
    batching round-off: the pipeline runs both branches in one batch), and ``sigmas=`` naming the
    plan's grid gives the same images as ``num_inference_steps``."""
    from stepsearch.models.pipeline import PipelineModel, generate_images
    from stepsearch.models.source import generate_from_source

    model = PipelineModel(pipe, ["a cat", "a red car"], guidance_scale=2.5)
    plan = feature_plans(logsnr_uniform(model.noise, 6))["taylor_data_mean"]
    mean = 0.2 * torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(0))
    solver = PlanSolver(data_mean=mean)
    scheduler = StepsearchPlanScheduler.from_plan(plan, solver, prediction_type="epsilon")
    seen: list[float] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(float(torch.as_tensor(timestep).reshape(-1)[0]))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        theirs = generate_images(
            model, scheduler, 2, num_inference_steps=6, seed=5, chunk_size=2, progress=False
        )
    finally:
        handle.remove()
    assert len(seen) == plan.nfe == 5
    assert seen == scheduler.timesteps.double().tolist()
    ours = generate_from_source(model, solver, plan, 2, seed=5, chunk_size=2)
    assert ours.std() > 0.05
    print(f"\npipeline vs sample(): max |difference| {float((ours - theirs).abs().max()):.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)
    sigmas = plan.schedule.to_kdiffusion_sigmas().tolist()
    again = generate_images(
        model, scheduler, 2, sigmas=sigmas, seed=5, chunk_size=2, progress=False
    )
    assert torch.equal(again, theirs)
