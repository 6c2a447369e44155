"""The drop-in diffusers schedulers: parity with diffusers where diffusers is right, parity with
``stepsearch.sampling.sample``, config translation both ways, and clear errors on bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from stepsearch.denoiser import ModelDenoiser
from stepsearch.integrations.diffusers import (
    SCHEDULERS,
    StepsearchDDIMScheduler,
    StepsearchDPMSolverMultistepScheduler,
    StepsearchDPMSolverPP3MScheduler,
    StepsearchEulerDiscreteScheduler,
    StepsearchHeunDiscreteScheduler,
    StepsearchScheduler,
    diffusers_grid_timesteps,
)
from stepsearch.noise import DiscreteVP
from stepsearch.sampling import sample
from stepsearch.schedule import StepSchedule, karras
from stepsearch.solvers import get_solver

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
PARITY_TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("_one_thread")


class ToyModel:
    """A fixed random conv with a timestep-dependent gain: deterministic, depends on both inputs,
    float64 inside so both loops see bit-identical outputs for identical inputs."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64) / 6.0
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        time = float(torch.as_tensor(t).reshape(-1)[0])
        hidden = torch.nn.functional.conv2d(x.double(), self.weight, padding=1)
        return (torch.tanh(hidden) * (1.0 + time / 1000.0)).to(x.dtype)


def diffusers_loop(scheduler, x_T: torch.Tensor, model: ToyModel, **set_kwargs) -> torch.Tensor:
    """The plain diffusers denoising loop (as in every pipeline)."""
    scheduler.set_timesteps(**set_kwargs)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = (
            scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        )
        x = scheduler.step(model(model_input, t), t, x, return_dict=False)[0]
    return x


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# parity with diffusers
# --------------------------------------------------------------------------------------------

PARITY_CASES: list[tuple[str, Callable[[dict], object], type[StepsearchScheduler]]] = [
    (
        "ddim",
        lambda c: DDIMScheduler(**c, clip_sample=False, set_alpha_to_one=True),
        StepsearchDDIMScheduler,
    ),
    ("dpm_2m", lambda c: DPMSolverMultistepScheduler(**c), StepsearchDPMSolverMultistepScheduler),
    (
        "dpm_3m",
        lambda c: DPMSolverMultistepScheduler(**c, solver_order=3),
        StepsearchDPMSolverMultistepScheduler,
    ),
    ("euler", lambda c: EulerDiscreteScheduler(**c), StepsearchEulerDiscreteScheduler),
    ("heun", lambda c: HeunDiscreteScheduler(**c), StepsearchHeunDiscreteScheduler),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [7, 10, 20])
@pytest.mark.parametrize(("name", "make_diffusers", "ours"), PARITY_CASES)
def test_parity_with_diffusers(name, make_diffusers, ours, prediction_type, num_steps, x_T):
    """Same config, diffusers' own default timesteps, same model: final samples agree to 1e-5.
    (20 steps is past diffusers' lower_order_final threshold of 15.)"""
    reference_scheduler = make_diffusers({**SD_BETAS, "prediction_type": prediction_type})
    overrides = {}
    if name == "dpm_3m" and "legacy_3m" in get_solver("dpm_solver_pp_3m").config():
        # Our 3M corrects the second-difference term by default; diffusers and the reference
        # dpm-solver code use the legacy coefficient, which the solver keeps as an option.
        overrides["solver_kwargs"] = {"legacy_3m": True}
    scheduler = ours.from_config(reference_scheduler.config, **overrides)
    expected_solver = {"dpm_3m": "dpm_solver_pp_3m", "dpm_2m": "dpm_solver_pp_2m"}
    assert scheduler.config.solver == expected_solver.get(name, name)
    reference = diffusers_loop(reference_scheduler, x_T, ToyModel(), num_inference_steps=num_steps)
    # Euler / Heun start at init_noise_sigma = sigma~_max (x / alpha space) for "linspace": the
    # twins' own init_noise_sigma is the same start in x-space (sigma_0), so the loop is the same.
    model = ToyModel()
    ours_out = diffusers_loop(scheduler, x_T, model, num_inference_steps=num_steps)
    assert torch.equal(scheduler.timesteps.double(), reference_scheduler.timesteps.double())
    assert model.calls == len(reference_scheduler.timesteps)
    assert relative_error(ours_out, reference) < PARITY_TOLERANCE


@pytest.mark.parametrize("num_steps", [10, 28])
def test_flow_parity_with_flow_match_euler(num_steps, x_T):
    """Flow models: same sigmas (shift 3) as FlowMatchEulerDiscreteScheduler, same samples."""
    reference_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler = StepsearchEulerDiscreteScheduler.from_config(reference_scheduler.config)
    assert scheduler.config.prediction_type == "flow_prediction"
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    reference = diffusers_loop(reference_scheduler, x_T, ToyModel(), sigmas=sigmas)
    ours_out = diffusers_loop(scheduler, x_T, ToyModel(), sigmas=sigmas)
    assert torch.allclose(scheduler.timesteps.float(), reference_scheduler.timesteps, atol=1e-3)
    assert relative_error(ours_out, reference) < PARITY_TOLERANCE


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("solver", sorted(SCHEDULERS))
def test_scheduler_loop_equals_core_sampler(solver, prediction_type, x_T):
    """Every scheduler through the diffusers loop gives what ``stepsearch.sampling.sample`` gives
    with the same solver and schedule (off-grid evaluations included)."""
    scheduler = SCHEDULERS[solver](**SD_BETAS, prediction_type=prediction_type)
    through_diffusers = diffusers_loop(scheduler, x_T, ToyModel(), num_inference_steps=6)
    schedule = scheduler.schedule
    denoiser = ModelDenoiser(ToyModel(), schedule.noise, prediction_type)
    # from the pipeline's start (Euler / Heun on linspace start at sigma_0 eps, as diffusers')
    result = sample(denoiser, x_T * scheduler.init_noise_sigma, schedule, get_solver(solver))
    assert result.nfe == len(scheduler.timesteps)
    assert relative_error(through_diffusers, result.sample) < 1e-6


# --------------------------------------------------------------------------------------------
# grids, configs, round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 333])
def test_grids_match_diffusers(spacing, num_steps):
    config = {**SD_BETAS, "timestep_spacing": spacing, "steps_offset": 1}
    for reference_cls, convention in (
        (DDIMScheduler, "ddim"),
        (DPMSolverMultistepScheduler, "dpm"),
        (EulerDiscreteScheduler, "euler"),
    ):
        reference = reference_cls(**config)
        reference.set_timesteps(num_steps)
        ours = diffusers_grid_timesteps(convention, spacing, num_steps, 1000, steps_offset=1)
        np.testing.assert_allclose(ours, reference.timesteps.double().numpy(), atol=1e-4)


def test_noise_schedules_match_diffusers():
    """Every beta schedule (and trained betas, zero-terminal-SNR rescale) gives diffusers'
    alphas_cumprod (diffusers computes in float32)."""
    cases = [
        {"beta_schedule": "linear"},
        SD_BETAS,
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid"},
        {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
        {**SD_BETAS, "rescale_betas_zero_snr": True},
    ]
    for config in cases:
        reference = DDPMScheduler(**config).alphas_cumprod.double().numpy()
        ours = StepsearchDDIMScheduler(**config).noise.alphas_cumprod
        reference = np.maximum(reference, 2.0**-24)  # the zero-SNR clamp diffusers' Euler uses
        np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=1e-7, err_msg=str(config))


def test_zero_terminal_snr_trailing_v_prediction_runs(x_T):
    scheduler = StepsearchDPMSolverMultistepScheduler(
        **SD_BETAS,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    out = diffusers_loop(scheduler, x_T, ToyModel(), num_inference_steps=5)
    assert scheduler.timesteps[0] == 999
    assert torch.isfinite(out).all()


def test_from_diffusers_configs_translates_choices():
    ddim = DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, steps_offset=1)
    ours = StepsearchDDIMScheduler.from_config(ddim.config)
    assert (ours.config.final, ours.config.steps_offset) == ("t_min", 1)
    dpm = DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True, solver_order=3)
    ours = StepsearchScheduler.from_config(dpm.config)
    assert (ours.config.solver, ours.config.timestep_spacing) == ("dpm_solver_pp_3m", "karras")
    lu = DPMSolverMultistepScheduler(use_lu_lambdas=True, final_sigmas_type="sigma_min")
    ours = StepsearchDPMSolverMultistepScheduler.from_config(lu.config)
    assert (ours.config.timestep_spacing, ours.config.final) == ("logsnr_uniform", "t_min")
    assert StepsearchScheduler.from_config(PNDMScheduler().config).config.solver == "pndm"
    unipc = UniPCMultistepScheduler(solver_type="bh1")
    assert StepsearchScheduler.from_config(unipc.config).config.solver == "unipc_bh1"
    assert StepsearchScheduler.from_config(EulerDiscreteScheduler().config).config.solver == "euler"


def test_to_diffusers_configs(x_T):
    """A stepsearch config loads into diffusers' classes with the same choices, and DDIM built
    from our DDIM config reproduces our samples."""
    ours = StepsearchDDIMScheduler(**SD_BETAS, prediction_type="v_prediction", steps_offset=1)
    ddim = DDIMScheduler.from_config(ours.config)
    assert ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is True
    assert ddim.config.prediction_type == "v_prediction"
    assert ddim.config.steps_offset == 1
    a = diffusers_loop(ddim, x_T, ToyModel(), num_inference_steps=8)
    b = diffusers_loop(ours, x_T, ToyModel(), num_inference_steps=8)
    assert relative_error(b, a) < PARITY_TOLERANCE

    t_min = StepsearchDDIMScheduler(final="t_min")
    assert DDIMScheduler.from_config(t_min.config).config.set_alpha_to_one is False
    three = StepsearchDPMSolverPP3MScheduler(final="t_min", timestep_spacing="karras")
    dpm = DPMSolverMultistepScheduler.from_config(three.config)
    assert dpm.config.solver_order == 3
    assert dpm.config.final_sigmas_type == "sigma_min"
    assert dpm.config.use_karras_sigmas is True
    assert EulerDiscreteScheduler.from_config(three.config).config.use_karras_sigmas is True


def test_swaps_between_stepsearch_classes_keep_explicit_settings():
    heun = StepsearchHeunDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    swapped = StepsearchDPMSolverMultistepScheduler.from_config(heun.config)
    assert swapped.config.solver == "dpm_solver_pp_2m"  # the default solver was not explicit
    assert swapped.config.timestep_spacing == "trailing"
    assert swapped.config.beta_schedule == "scaled_linear"
    explicit = StepsearchScheduler(solver="unipc_bh1", solver_kwargs={"order": 3})
    again = StepsearchScheduler.from_config(explicit.config)
    assert (again.config.solver, again.config.solver_kwargs) == ("unipc_bh1", {"order": 3})


def test_custom_schedule_round_trips_through_save_pretrained(tmp_path):
    noise = DiscreteVP.from_diffusers_config(SD_BETAS)
    schedule = karras(noise, 9)
    scheduler = StepsearchDPMSolverPP3MScheduler.from_step_schedule(schedule)
    scheduler.save_pretrained(tmp_path)
    loaded = StepsearchScheduler.from_pretrained(tmp_path)
    assert type(loaded) is StepsearchScheduler  # the generic class loads any stepsearch config
    loaded = StepsearchDPMSolverPP3MScheduler.from_pretrained(tmp_path)
    assert loaded.config.custom_times == scheduler.config.custom_times
    loaded.set_timesteps()
    assert np.array_equal(loaded.schedule.times, schedule.times)  # bit-exact through JSON
    loaded.set_timesteps(9)
    assert np.array_equal(loaded.schedule.times, schedule.times)
    loaded.set_timesteps(18)  # another step count: log-linear resampling of the stored schedule
    sigmas = loaded.schedule.to_kdiffusion_sigmas()
    assert loaded.schedule.num_steps == 18
    assert sigmas[0] == pytest.approx(schedule.to_kdiffusion_sigmas()[0])
    assert np.all(np.diff(sigmas) < 0) and sigmas[-1] == 0.0


def test_custom_timesteps_and_sigmas(x_T):
    """``timesteps=`` (diffusers units, may be off-grid) and ``sigmas=`` (k-diffusion, with the
    final 0) describing the same schedule give the same samples."""
    scheduler = StepsearchDPMSolverMultistepScheduler(**SD_BETAS)
    ays = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    by_timesteps = diffusers_loop(scheduler, x_T, ToyModel(), timesteps=ays)
    assert scheduler.timesteps.tolist() == ays
    assert scheduler.timesteps.dtype == torch.int64
    sigmas = scheduler.schedule.to_kdiffusion_sigmas()
    by_sigmas = diffusers_loop(scheduler, x_T, ToyModel(), sigmas=sigmas.tolist())
    np.testing.assert_allclose(scheduler.timesteps.double().numpy(), ays, atol=1e-3)
    assert relative_error(by_sigmas, by_timesteps) < 1e-6
    scheduler.set_timesteps(timesteps=[900.5, 600.25, 10.0])
    assert scheduler.timesteps.dtype == torch.float32
    assert scheduler.timesteps.tolist() == [900.5, 600.25, 10.0]


def test_add_noise_matches_diffusers():
    ddim = DDIMScheduler(**SD_BETAS)
    ours = StepsearchDDIMScheduler(**SD_BETAS)
    generator = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    timesteps = torch.tensor([999, 500, 3])
    expected = ddim.add_noise(x0, noise, timesteps)
    assert relative_error(ours.add_noise(x0, noise, timesteps), expected) < 1e-6
    assert (
        relative_error(
            ours.add_noise(x0, noise, torch.tensor([500])),
            ddim.add_noise(x0, noise, torch.tensor([500])),
        )
        < 1e-6
    )


def test_attributes_pipelines_read():
    scheduler = StepsearchHeunDiscreteScheduler(**SD_BETAS)
    assert scheduler.init_noise_sigma == 1.0
    assert len(scheduler) == 1000
    x = torch.randn(1, 4, 8, 8)
    assert scheduler.scale_model_input(x, 999) is x
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 9  # t0, then t1..t4 twice (Euler into sigma = 0)
    assert scheduler.order == 2
    assert scheduler.step_index is None and scheduler.begin_index is None
    assert scheduler.sigmas[-1] == 0.0
    assert StepsearchDDIMScheduler().order == 1
    set_timesteps = StepsearchScheduler.set_timesteps.__code__.co_varnames
    assert "timesteps" in set_timesteps and "sigmas" in set_timesteps


# --------------------------------------------------------------------------------------------
# the failure modes of REFERENCES.md
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timesteps": [999, 500, 700]}, "strictly decreasing"),
        ({"timesteps": [999, 500, 500, 10]}, "duplicated"),
        ({"timesteps": [1000, 500]}, r"lie in \[0, 999\]"),
        ({"timesteps": [500, -3]}, r"lie in \[0, 999\]"),
        ({"sigmas": [14.6, 3.0, 5.0, 0.0]}, "strictly decreasing"),
        ({"sigmas": [14.6, 3.0, 0.0, 0.0]}, "duplicated"),
        ({"sigmas": [14.6, 0.0, 1.0, 0.0]}, "strictly decreasing"),
        ({"sigmas": [14.6, float("nan"), 0.0]}, "finite"),
        ({"num_inference_steps": 1001}, "num_train_timesteps"),
        ({"num_inference_steps": 0}, "1 .. num_train_timesteps"),
        ({"num_inference_steps": -4}, "1 .. num_train_timesteps"),
        ({"num_inference_steps": 2.5}, "integer"),
        ({"num_inference_steps": 10, "timesteps": [999, 500]}, "10 but 2"),
        ({"timesteps": [999, 500], "sigmas": [1.0, 0.0]}, "only one"),
        ({}, "num_inference_steps"),
    ],
)
def test_bad_schedules_are_errors(kwargs, message):
    scheduler = StepsearchDPMSolverMultistepScheduler(**SD_BETAS)
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(**kwargs)


def test_timestep_not_in_schedule_is_an_error(x_T):
    scheduler = StepsearchDDIMScheduler(**SD_BETAS)
    output = torch.zeros_like(x_T)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(output, 999, x_T)
    scheduler.set_timesteps(10)  # 900, 800, ..., 0
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(output, 850, x_T)
    scheduler.step(output, 900, x_T)
    with pytest.raises(ValueError, match="expected 800"):
        scheduler.step(output, 700, x_T)  # skipping a step is not silently "the last index"
    with pytest.raises(ValueError, match="expected 800"):
        scheduler.step(output, 900, x_T)  # nor is repeating one


@pytest.mark.parametrize("cls", [StepsearchDPMSolverPP3MScheduler, StepsearchHeunDiscreteScheduler])
def test_state_is_reset_between_runs(cls, x_T):
    """Second run identical to the first: through set_timesteps, and when a finished run is
    simply started again at the first timestep (multistep history and Heun stages included)."""
    scheduler = cls(**SD_BETAS)
    first = diffusers_loop(scheduler, x_T, ToyModel(), num_inference_steps=6)
    second = diffusers_loop(scheduler, x_T, ToyModel(), num_inference_steps=6)
    assert torch.equal(first, second)
    x = x_T * scheduler.init_noise_sigma
    model = ToyModel()
    for t in scheduler.timesteps:  # no set_timesteps: the finished run restarts
        x = scheduler.step(model(x, t), t, x).prev_sample
    assert torch.equal(x, first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_stepped_in_float32(dtype, x_T):
    scheduler = StepsearchDPMSolverMultistepScheduler(**SD_BETAS)
    reference = diffusers_loop(scheduler, x_T, ToyModel(), num_inference_steps=8)
    half = diffusers_loop(scheduler, x_T.to(dtype), ToyModel(), num_inference_steps=8)
    assert half.dtype == dtype
    scheduler.set_timesteps(8)
    out = scheduler.step(torch.zeros_like(x_T, dtype=dtype), 999, x_T.to(dtype))
    assert out.pred_original_sample.dtype == dtype
    # only the per-step rounding of the sample to half precision remains
    tolerance = 4e-3 if dtype == torch.float16 else 3e-2
    assert relative_error(half, reference) < tolerance


def test_begin_index_must_start_a_step():
    scheduler = StepsearchHeunDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(5)
    scheduler.set_begin_index(4)  # the first evaluation of step 2
    assert scheduler.begin_index == 4
    with pytest.raises(ValueError, match="not the first evaluation"):
        scheduler.set_begin_index(3)  # Heun's correction evaluation of step 1
    with pytest.raises(ValueError, match="outside"):
        scheduler.set_begin_index(9)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        StepsearchScheduler(solver="rk45")
    with pytest.raises(ValueError, match="prediction_type"):
        StepsearchScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="final"):
        StepsearchScheduler(final="zero")
    with pytest.raises(ValueError, match="spacing"):
        StepsearchScheduler(timestep_spacing="cubic").set_timesteps(10)
    with pytest.raises(ValueError, match="custom_times"):
        StepsearchScheduler(custom_times=[0.5, 0.9, 0.0])


def test_t_min_final_matches_ddim_without_alpha_to_one(x_T):
    """``set_alpha_to_one=False`` ends at the first trained step; with ``trailing`` spacing
    (last timestep 99, so no repeated step) diffusers' DDIM agrees."""
    ddim = DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )
    ours = StepsearchDDIMScheduler.from_config(ddim.config)
    reference = diffusers_loop(ddim, x_T, ToyModel(), num_inference_steps=10)
    result = diffusers_loop(ours, x_T, ToyModel(), num_inference_steps=10)
    assert ours.schedule.times[-1] == ours.noise.t_min
    assert relative_error(result, reference) < PARITY_TOLERANCE


def test_schedule_from_step_schedule_equals_core(x_T):
    noise = DiscreteVP.from_diffusers_config(SD_BETAS)
    schedule = StepSchedule(np.array([1.0, 0.7, 0.41, 0.2, 0.05, 0.0]), noise)
    scheduler = StepsearchScheduler.from_step_schedule(schedule, solver="unipc_bh2")
    out = diffusers_loop(scheduler, x_T, ToyModel())
    core = sample(ModelDenoiser(ToyModel(), noise), x_T, schedule, get_solver("unipc_bh2"))
    assert relative_error(out, core.sample) < 1e-6
