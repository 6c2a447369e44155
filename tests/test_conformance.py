"""Drop-in conformance: the drop-in classes against their diffusers twins (issue 9).

Tiny tensors, a fixed random conv as the model; each case runs full denoising loops in both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from stepsearch.integrations import diffusers_keys
from stepsearch.integrations.diffusers import (
    SCHEDULERS,
    StepsearchDDIMScheduler,
    StepsearchDPMSolver1Scheduler,
    StepsearchDPMSolver2Scheduler,
    StepsearchDPMSolver3Scheduler,
    StepsearchDPMSolverMultistepScheduler,
    StepsearchDPMSolverPP3MScheduler,
    StepsearchDPMSolverSinglestepScheduler,
    StepsearchEulerDiscreteScheduler,
    StepsearchFlowMatchEulerDiscreteScheduler,
    StepsearchHeunDiscreteScheduler,
    StepsearchScheduler,
    StepsearchUniPCBH1Scheduler,
    StepsearchUniPCMultistepScheduler,
)
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule, karras

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TOLERANCE = 1e-5
DOCS = Path(__file__).resolve().parents[1] / "docs" / "schedulers.md"


class Model:
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64) / 6.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        time = float(torch.as_tensor(t).reshape(-1)[0])
        hidden = torch.nn.functional.conv2d(x.double(), self.weight, padding=1)
        return (torch.tanh(hidden) * (1.0 + time / 1000.0)).to(x.dtype)


def loop(scheduler, x: torch.Tensor, **set_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(**set_kwargs)
    model = Model()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(scaled, t), t, x).prev_sample
    return x


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


# 1. options that change the method are honoured ----------------------------------------------
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_multistep_options_match_diffusers(order, final, lower_order_final, num_steps, x_T):
    twin = DPMSolverMultistepScheduler(
        **SD, solver_order=order, final_sigmas_type=final, lower_order_final=lower_order_final
    )
    ours = StepsearchDPMSolverMultistepScheduler.from_config(twin.config)
    assert error(loop(ours, x_T, num_inference_steps=num_steps),
                 loop(twin, x_T, num_inference_steps=num_steps)) < TOLERANCE  # fmt: skip


def loop_with_last_input(scheduler, x: torch.Tensor, num_steps: int):
    """``(final sample, the sample fed to the last step)`` of a loop on the toy model; a last
    step that fails (diffusers' UniPC-3 to sigma = 0 solves a singular system) gives NaN."""
    scheduler.set_timesteps(num_steps)
    model, before_last = Model(), x
    for t in scheduler.timesteps:
        before_last = x
        try:
            x = scheduler.step(model(x, t), t, x).prev_sample
        except torch.linalg.LinAlgError:
            x = torch.full_like(x, float("nan"))
    return x, before_last


UNIPC_METHODS = [("bh1", 1, True), *[
    (solver_type, order, lower_order_final)
    for solver_type in ("bh1", "bh2") for order in (2, 3) for lower_order_final in (True, False)
], ("bh2", 1, True)]  # fmt: skip


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize(
    ("num_steps", "prediction_type"), [(10, "epsilon"), (10, "v_prediction"), (25, "epsilon")]
)
@pytest.mark.parametrize(("solver_type", "order", "lower_order_final"), UNIPC_METHODS)
def test_unipc_matches_diffusers(
    solver_type, order, lower_order_final, num_steps, prediction_type, final, x_T
):
    """UniPC (bh1 / bh2, orders 1-3, lower_order_final at every step count, as diffusers) against
    UniPCMultistepScheduler. Where diffusers' last step to sigma = 0 is NaN (bh1: B(h) = h is
    infinite there; order >= 2 without lower_order_final: its r_k = 0 divides, or its linear
    system is singular), stepsearch's
    step is finite and every step before the last still agrees."""
    twin = UniPCMultistepScheduler(
        **SD, solver_type=solver_type, solver_order=order, lower_order_final=lower_order_final,
        prediction_type=prediction_type, final_sigmas_type=final,
    )  # fmt: skip
    ours = StepsearchUniPCMultistepScheduler.from_config(twin.config)
    config = ours.solver.config()
    assert ours.config.solver == f"unipc_{solver_type}"
    assert (config["order"], config["lower_order_final"]) == (order, lower_order_final)
    assert config["lower_order_final_below"] is None  # diffusers' UniPC has no 15-step rule
    got, got_last_input = loop_with_last_input(ours, x_T, num_steps)
    want, want_last_input = loop_with_last_input(twin, x_T, num_steps)
    assert torch.isfinite(got).all()
    assert error(got_last_input, want_last_input) < TOLERANCE
    if torch.isfinite(want).all():
        assert error(got, want) < TOLERANCE
    else:
        assert final == "zero" and (solver_type == "bh1" or not lower_order_final)


def test_unipc_lower_order_final_applies_above_15_steps(x_T):
    results = [
        loop(StepsearchUniPCMultistepScheduler(**SD, solver_order=3, lower_order_final=lof,
                                               final_sigmas_type="sigma_min"),
             x_T, num_inference_steps=25)
        for lof in (True, False)
    ]  # fmt: skip
    assert error(*results) > 1e-7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algorithm_type": "sde-dpmsolver++"}, "not ODE solvers"),
        ({"solver_type": "heun"}, "heun"),
        ({"variance_type": "learned_range"}, "learned"),
        ({"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
        ({"euler_at_final": True, "solver_order": 3}, "euler_at_final"),
    ],
)
def test_unsupported_options_are_refused(options, message):
    twin = DPMSolverMultistepScheduler(**SD, **options)
    with pytest.raises(ValueError, match=message):
        StepsearchDPMSolverMultistepScheduler.from_config(twin.config)
    with pytest.raises(ValueError, match=message):
        StepsearchDPMSolverMultistepScheduler(**SD, **options)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize(("num_steps", "prediction_type"), [(10, "epsilon"), (25, "v_prediction")])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_noise_prediction_dpm_solver_matches_diffusers(
    order, lower_order_final, num_steps, prediction_type, spacing, x_T
):
    """``algorithm_type="dpmsolver"`` (multistep DPM-Solver-2M / 3M on noise prediction)."""
    twin = DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=order,
        lower_order_final=lower_order_final, prediction_type=prediction_type,
        timestep_spacing=spacing,
    )  # fmt: skip
    ours = StepsearchDPMSolverMultistepScheduler.from_config(twin.config)
    assert ours.config.solver == f"dpm_solver_{order}m"
    got = loop(ours, x_T, num_inference_steps=num_steps)
    assert error(got, loop(twin, x_T, num_inference_steps=num_steps)) < TOLERANCE


THRESHOLD = {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}


def twin_loop(scheduler, x: torch.Tensor, num_steps: int, **step_kwargs) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    model = Model()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("thresholding", [True, False])
def test_thresholding_and_clip_sample_match_ddim(
    thresholding, num_steps, use_clipped_model_output, x_T
):
    """diffusers' DDIM clips x0 in the data term but keeps the model's eps in the direction term
    (unless ``use_clipped_model_output``); the drop-in does the same."""
    twin = DDIMScheduler(
        **SD, thresholding=thresholding, clip_sample=True, clip_sample_range=1.5,
        set_alpha_to_one=True, **THRESHOLD,
    )  # fmt: skip
    ours = StepsearchDDIMScheduler.from_config(twin.config)
    kwargs = {"use_clipped_model_output": True} if use_clipped_model_output else {}
    got = twin_loop(ours, x_T * 3.0, num_steps, **kwargs)
    assert error(got, twin_loop(twin, x_T * 3.0, num_steps, **kwargs)) < TOLERANCE
    plain = loop(StepsearchDDIMScheduler(**SD), x_T * 3.0, num_inference_steps=num_steps)
    assert error(got, plain) > 1e-3  # post-processing really changes the result


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_thresholding_matches_dpm_solver_multistep(order, num_steps, prediction_type, x_T):
    twin = DPMSolverMultistepScheduler(
        **SD, solver_order=order, thresholding=True, prediction_type=prediction_type, **THRESHOLD
    )
    ours = StepsearchDPMSolverMultistepScheduler.from_config(twin.config)
    got = loop(ours, x_T * 3.0, num_inference_steps=num_steps)
    assert error(got, loop(twin, x_T * 3.0, num_inference_steps=num_steps)) < TOLERANCE
    plain = StepsearchDPMSolverMultistepScheduler(
        **SD, solver_order=order, prediction_type=prediction_type
    )
    assert error(got, loop(plain, x_T * 3.0, num_inference_steps=num_steps)) > 1e-3


# 2. constructor and from_config agree ---------------------------------------------------------
def test_constructor_and_from_config_build_the_same_solver():
    direct = StepsearchDPMSolverMultistepScheduler(solver_order=3)
    loaded = StepsearchDPMSolverMultistepScheduler.from_config({"solver_order": 3})
    assert direct.config.solver == loaded.config.solver == "dpm_solver_pp_3m"
    assert direct.config.solver_order == 3


# 3. n == num_train_timesteps ------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls", [StepsearchDPMSolverMultistepScheduler, StepsearchUniPCMultistepScheduler]
)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_every_trained_step_is_a_valid_request(cls, spacing):
    scheduler = cls(num_train_timesteps=25, timestep_spacing=spacing)
    scheduler.set_timesteps(25)
    assert scheduler.timesteps.tolist() == list(range(24, -1, -1))
    x = loop(scheduler, torch.randn(1, 4, 4, 4), num_inference_steps=25)
    assert torch.isfinite(x).all()


FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_KARRAS = {"prediction_type": "flow_prediction", "timestep_spacing": "karras"}


# 4. flow + Karras ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [5, 10])
def test_flow_karras_is_karras_in_flow_time(num_steps, x_T):
    twin = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(twin.config)
    got = loop(ours, x_T, num_inference_steps=num_steps)
    want = loop(twin, x_T, num_inference_steps=num_steps)
    assert np.allclose(ours.sigmas.numpy(), twin.sigmas.numpy(), atol=1e-6)
    assert np.all(np.diff(ours.sigmas.numpy()) < 0)
    assert error(got, want) < TOLERANCE
    # stepsearch's own Karras spacing on a flow model: Karras in flow time, sigma_min / max kept
    dpm_flow = StepsearchDPMSolverMultistepScheduler(
        prediction_type="flow_prediction", timestep_spacing="karras", flow_shift=3.0,
        sigma_min=0.05, sigma_max=0.9,
    )  # fmt: skip
    dpm_flow.set_timesteps(5)
    assert dpm_flow.sigmas[0] == pytest.approx(0.9) and dpm_flow.sigmas[-2] == pytest.approx(0.05)
    # ... and its saved config (use_flow_sigmas and use_karras_sigmas both derived) loads again
    again = StepsearchDPMSolverMultistepScheduler.from_config(dpm_flow.config)
    again.set_timesteps(5)
    assert torch.equal(again.sigmas, dpm_flow.sigmas)


@pytest.mark.parametrize(
    "cls", [StepsearchUniPCMultistepScheduler, StepsearchDPMSolverMultistepScheduler]
)
@pytest.mark.parametrize(
    "key", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"]
)
def test_flow_sigmas_with_a_sigma_spacing_switch_is_refused_naming_both(cls, key):
    """diffusers' DPM-Solver / UniPC test the spacing switch before use_flow_sigmas and space
    the VP schedule's sigmas (DPM-Solver steps a flow model from sigma 157): refused, naming both
    options and both ranges, at construction and through from_config of the diffusers twin's config."""
    twin_class = getattr(diffusers, diffusers_keys.TWINS[cls.__name__])
    if key not in diffusers_keys.twin_parameters(twin_class.__name__):
        pytest.skip(f"{twin_class.__name__} has no {key}")
    twin = twin_class(use_flow_sigmas=True, prediction_type="flow_prediction", **{key: True})
    for make in (lambda: cls(**FLOW, **{key: True}), lambda: cls.from_config(twin.config)):
        with pytest.raises(ValueError) as raised:
            make()
        message = str(raised.value)
        assert f"{key}=True with use_flow_sigmas=True" in message
        assert "range [0.0100005, 157.407]" in message and "range [1e-06, 1]" in message


@pytest.mark.parametrize(
    ("cls", "options", "named"),
    [
        # Euler / Heun: a Karras sigma_max above the trained range (it clipped silently at 4
        # steps and reported duplicated *times* at 28)
        (StepsearchEulerDiscreteScheduler, {"sigma_max": 200.0}, "sigma_max=200"),
        (StepsearchEulerDiscreteScheduler, {"sigma_min": 1e-4}, "sigma_min=0.0001"),
        (StepsearchHeunDiscreteScheduler, {"sigma_max": 1000.0}, "sigma_max=1000"),
        # flow matching (Karras in flow time, stepsearch's spacing): sigma_max above t = 1,
        # sigma_min at 0 (out-of-range times before)
        (StepsearchUniPCMultistepScheduler, {**FLOW_KARRAS, "sigma_max": 2.0}, "sigma_max=2"),
        (StepsearchDPMSolverMultistepScheduler, {**FLOW_KARRAS, "sigma_min": 0.0}, "sigma_min=0"),
        (StepsearchUniPCMultistepScheduler, {**FLOW_KARRAS, "sigma_min": 0.9, "sigma_max": 0.5},
         "sigma_min=0.9 must lie below sigma_max=0.5"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("num_steps", [4, 28])
def test_karras_range_outside_the_model_is_refused_naming_the_option(
    cls, options, named, num_steps
):
    scheduler = cls(**({"use_karras_sigmas": True} | options))
    with pytest.raises(ValueError) as raised:
        scheduler.set_timesteps(num_steps)
    message = str(raised.value)
    assert named in message and "use_karras_sigmas" in message and "range [" in message
    assert "times" not in message.split("range")[0]  # the option, not the times it made


# 5. replay -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls",
    [
        StepsearchDPMSolver2Scheduler,
        StepsearchDPMSolver3Scheduler,
        StepsearchDPMSolverSinglestepScheduler,
        StepsearchHeunDiscreteScheduler,
        StepsearchDPMSolverMultistepScheduler,
    ],
)
def test_timesteps_read_back_replay_the_run(cls, x_T):
    first = cls(**SD)
    a = loop(first, x_T, num_inference_steps=10)
    again = cls(**SD)
    b = loop(again, x_T, timesteps=first.timesteps.clone())
    assert torch.equal(again.timesteps, first.timesteps)
    assert torch.equal(a, b)


# 6. a fitted schedule is not resampled silently ------------------------------------------------
def test_fitted_schedule_resampling_is_announced(caplog):
    schedule = karras(DiscreteVP.stable_diffusion(), 10)
    scheduler = StepsearchDPMSolverMultistepScheduler.from_step_schedule(schedule)
    scheduler.set_timesteps()
    assert scheduler.num_inference_steps == 10
    with caplog.at_level(logging.WARNING):
        scheduler.set_timesteps(50)
    assert "10-step schedule" in caplog.text and "50 steps" in caplog.text
    assert scheduler.num_inference_steps == 50


# 7. config hygiene --------------------------------------------------------------------------------
def test_config_hygiene(tmp_path):
    scheduler = StepsearchDDIMScheduler(beta_schedule="exp")
    assert "kwargs" not in scheduler.config
    assert "kwargs" not in (scheduler.config.get("_use_default_values") or [])
    for name in ("betas", "alphas_cumprod"):
        assert isinstance(getattr(scheduler, name), torch.Tensor)
    expected = 1.0 - np.exp(-12.0 / 1000)
    assert np.allclose(scheduler.betas.numpy(), expected)
    twin = DPMSolverMultistepScheduler(**SD, solver_order=3, lower_order_final=False)
    ours = StepsearchDPMSolverMultistepScheduler.from_config(twin.config)
    ours.save_pretrained(tmp_path)
    loaded = StepsearchDPMSolverMultistepScheduler.from_pretrained(tmp_path)
    for key in ("solver_order", "lower_order_final", "final_sigmas_type", "algorithm_type"):
        assert loaded.config[key] == twin.config[key]
    assert loaded.config.solver == ours.config.solver == "dpm_solver_pp_3m"
    assert DPMSolverMultistepScheduler.from_config(loaded.config).config.lower_order_final is False


# flow matching ---------------------------------------------------------------------------------
FLOW_CONFIGS = {
    "sd3": {"shift": 3.0},
    "flux": {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    "ltx": {"shift": 2.0, "shift_terminal": 0.1},
    "linear_mu": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
}


@pytest.mark.parametrize("num_steps", [4, 8, 28])
@pytest.mark.parametrize("name", sorted(FLOW_CONFIGS))
def test_flow_twin_matches_flow_match_euler(name, num_steps, x_T):
    options = FLOW_CONFIGS[name]
    mu = {"mu": 0.8} if options.get("use_dynamic_shifting") else {}
    twin = FlowMatchEulerDiscreteScheduler(**options)
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(twin.config)
    got = loop(ours, x_T, num_inference_steps=num_steps, **mu)
    want = loop(twin, x_T, num_inference_steps=num_steps, **mu)
    assert torch.allclose(ours.timesteps.float(), twin.timesteps, atol=1e-3)
    assert error(got, want) < TOLERANCE


def test_flow_shift_is_applied_once_whatever_is_passed(x_T):
    ours = StepsearchFlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(6)
    reference = ours.timesteps.clone()
    sigmas = np.linspace(1.0, 1.0 / 6, 6)
    ours.set_timesteps(sigmas=sigmas)
    shifted = ours.timesteps.clone()
    assert np.allclose(shifted.numpy() / 1000, 3 * sigmas / (1 + 2 * sigmas), atol=1e-6)
    ours.set_timesteps(timesteps=shifted)  # the model's own times: not shifted again
    assert torch.allclose(ours.timesteps.float(), shifted.float())
    ours.set_timesteps(sigmas=sigmas, timesteps=shifted)  # both, consistent
    assert torch.allclose(ours.timesteps.float(), shifted.float())
    with pytest.raises(ValueError, match="disagree"):
        ours.set_timesteps(sigmas=sigmas, timesteps=reference * 0.5)
    dynamic = StepsearchFlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        dynamic.set_timesteps(4)


@pytest.mark.parametrize("options", [{"invert_sigmas": True}, {"stochastic_sampling": True}])
def test_flow_options_that_change_the_method_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        StepsearchFlowMatchEulerDiscreteScheduler.from_config(
            FlowMatchEulerDiscreteScheduler(**options).config
        )


# half precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_same_dtype_out(dtype, x_T):
    scheduler = StepsearchDPMSolverMultistepScheduler(**SD)
    out = loop(scheduler, x_T.to(dtype), num_inference_steps=5)
    assert out.dtype == dtype
    full = loop(StepsearchDPMSolverMultistepScheduler(**SD), x_T, num_inference_steps=5)
    assert error(out.float(), full) < 2e-2


# the key table -------------------------------------------------------------------------------------
def test_every_twin_key_has_a_rule_and_a_row_in_the_docs():
    text = DOCS.read_text()
    for twin in sorted(set(diffusers_keys.TWINS.values())):
        section = text.split(f"### {twin}\n", 1)[1].split("\n### ", 1)[0]
        for key in diffusers_keys.twin_parameters(twin):
            assert key in diffusers_keys.RULES, f"{twin}.{key} has no rule"
            assert f"| `{key}` |" in section, f"docs/schedulers.md lacks {twin}.{key}"


def test_docs_table_is_the_generated_one():
    assert diffusers_keys.key_table_markdown() in DOCS.read_text()


def test_unknown_diffusers_keys_are_not_dropped_silently(caplog):
    with caplog.at_level(logging.WARNING):
        StepsearchScheduler.from_config({"_class_name": "DDIMScheduler", "some_new_option": 3})
    assert "some_new_option" in caplog.text


# the parity matrix: class x twin x prediction type x spacing x steps --------------------------
GRIDS = ("leading", "linspace", "trailing")
SPACING_KEYS = {
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu": {"use_lu_lambdas": True},
}
PARITY = {
    # name: (twin, twin options, drop-in class, spacings with exact parity, warned spacings)
    "ddim": (DDIMScheduler, {"clip_sample": False}, StepsearchDDIMScheduler, ("leading", "trailing"), ()),
    "dpm_1": (DPMSolverMultistepScheduler, {"solver_order": 1}, StepsearchDPMSolver1Scheduler, GRIDS, ()),
    "dpm_2m": (DPMSolverMultistepScheduler, {}, StepsearchDPMSolverMultistepScheduler, GRIDS,
               ("karras", "exponential", "beta", "lu")),
    "dpm_3m": (DPMSolverMultistepScheduler, {"solver_order": 3}, StepsearchDPMSolverPP3MScheduler, GRIDS, ()),
    "unipc_bh2": (UniPCMultistepScheduler, {}, StepsearchUniPCMultistepScheduler, GRIDS,
                  ("karras", "exponential", "beta")),
    "unipc_bh1": (UniPCMultistepScheduler, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                  StepsearchUniPCBH1Scheduler, GRIDS, ()),
    "euler": (EulerDiscreteScheduler, {}, StepsearchEulerDiscreteScheduler, GRIDS,
              ("karras", "exponential", "beta")),
    "heun": (HeunDiscreteScheduler, SD, StepsearchHeunDiscreteScheduler, GRIDS, ("karras", "exponential", "beta")),
}  # fmt: skip
EXACT = [(name, spacing) for name, case in PARITY.items() for spacing in case[3]]
WARNED = [(name, spacing) for name, case in PARITY.items() for spacing in case[4]]


def twin_and_ours(name: str, prediction_type: str, **options):
    twin_class, twin_options, ours_class, _, _ = PARITY[name]
    twin = twin_class(**{**SD, **twin_options, **options, "prediction_type": prediction_type})
    return twin, ours_class.from_config(twin.config)


def parity_error(twin, ours, x: torch.Tensor, **set_kwargs) -> float:
    """Relative difference of full loops from the same unit noise, each scaled by its own
    ``init_noise_sigma`` (Euler / Heun work on ``x / alpha``, the drop-in in x-space: the same
    start, ``sigma_0 eps`` on linspace / trailing, ``eps`` otherwise)."""
    want = loop(twin, x, **set_kwargs)
    got = loop(ours, x, **set_kwargs)
    return error(got, want)


@pytest.mark.parametrize(
    ("num_steps", "prediction_type"), [(10, "epsilon"), (25, "v_prediction"), (50, "epsilon")]
)
@pytest.mark.parametrize(("name", "spacing"), EXACT)
def test_parity_matrix(name, spacing, num_steps, prediction_type, x_T):
    twin, ours = twin_and_ours(name, prediction_type, **SPACING_KEYS[spacing])
    assert parity_error(twin, ours, x_T, num_inference_steps=num_steps) < TOLERANCE
    assert torch.allclose(ours.timesteps.double(), twin.timesteps.double())


@pytest.mark.parametrize(("name", "spacing"), WARNED)
def test_warned_spacings_warn_and_stay_close(name, spacing, x_T, caplog, monkeypatch):
    """Karras / exponential / beta / Lu sigmas: the model is evaluated at each sigma's exact
    fractional timestep (diffusers rounds or interpolates): warned once, samples within 1e-3."""
    monkeypatch.setattr(diffusers_keys, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        twin, ours = twin_and_ours(name, "epsilon", **SPACING_KEYS[spacing])
    assert f"use_{spacing}" in caplog.text or spacing in caplog.text
    assert parity_error(twin, ours, x_T, num_inference_steps=10) < 1e-3


@pytest.mark.filterwarnings("ignore")
def test_ddim_linspace_is_warned(caplog, monkeypatch):
    monkeypatch.setattr(diffusers_keys, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        StepsearchDDIMScheduler.from_config(DDIMScheduler(timestep_spacing="linspace").config)
    assert "timestep_spacing='linspace'" in caplog.text


AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
AYS_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]


@pytest.mark.parametrize(
    ("name", "given"),
    [
        ("dpm_2m", {"timesteps": AYS_TIMESTEPS}),
        ("dpm_3m", {"timesteps": AYS_TIMESTEPS}),
        ("euler", {"timesteps": AYS_TIMESTEPS}),
        ("heun", {"timesteps": AYS_TIMESTEPS}),
        ("euler", {"sigmas": AYS_SIGMAS}),
    ],
)
def test_custom_timesteps_and_sigmas_match(name, given, x_T, monkeypatch):
    monkeypatch.setattr(diffusers_keys, "_WARNED", set())
    twin, ours = twin_and_ours(name, "epsilon")
    tolerance = TOLERANCE if "timesteps" in given else 1e-3  # sigmas: fractional timesteps
    assert parity_error(twin, ours, x_T, **given) < tolerance


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("name", ["euler", "dpm_1"])
def test_final_sigma_type_matches(name, final, num_steps, x_T):
    """(diffusers' Euler on ``sigma_min`` ends with a zero-length step from the last trained sigma
    to itself, one model evaluation more; the drop-in leaves it out.)"""
    twin, ours = twin_and_ours(name, "epsilon", final_sigmas_type=final)
    want = loop(twin, x_T, num_inference_steps=num_steps)
    if final == "sigma_min" and twin.init_noise_sigma != 1.0:  # Euler ends in x / alpha space
        want = want / (1.0 + float(twin.sigmas[-1]) ** 2) ** 0.5
    assert error(loop(ours, x_T, num_inference_steps=num_steps), want) < TOLERANCE


# every class: config round trips, img2img tails, half precision ----------------------------------
ALL_CLASSES = [*SCHEDULERS.values(), StepsearchFlowMatchEulerDiscreteScheduler]


NOISE_PREDICTION = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
TWIN_OPTIONS = {  # the twin config whose method the class runs
    "StepsearchDPMSolver1Scheduler": {"solver_order": 1},
    "StepsearchDPMSolver2Scheduler": NOISE_PREDICTION,
    "StepsearchDPMSolver3Scheduler": {"solver_order": 3, **NOISE_PREDICTION},
    "StepsearchDPMSolverPP3MScheduler": {"solver_order": 3},
    "StepsearchUniPCBH1Scheduler": {"solver_type": "bh1"},
    "StepsearchPNDMScheduler": {"skip_prk_steps": True},
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_config_round_trips(cls, tmp_path):
    twin_name = diffusers_keys.TWINS[cls.__name__]
    options = {**({} if "Flow" in twin_name else SD), **TWIN_OPTIONS.get(cls.__name__, {})}
    twin = getattr(diffusers, twin_name)(**options)
    ours = cls.from_config(twin.config)
    ours.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    assert public(cls.from_config(ours.config).config) == public(ours.config)
    for key, value in twin.config.items():  # what was given stays as given
        if not key.startswith("_"):
            assert ours.config[key] == value, key
    # and back: the twin rebuilt from ours has the twin's config
    back = getattr(diffusers, twin_name).from_config(loaded.config)
    assert {key: back.config[key] for key in public(twin.config)} == public(twin.config)


@pytest.mark.filterwarnings("ignore")
def test_a_class_with_its_own_method_says_so_in_its_config():
    """A fixed-method class built from another method's config writes the method it runs."""
    ours = StepsearchDPMSolver1Scheduler.from_config(DPMSolverMultistepScheduler(**SD).config)
    assert ours.config.solver_order == 1
    bh1 = StepsearchUniPCBH1Scheduler.from_config(UniPCMultistepScheduler(**SD).config)
    assert bh1.config.solver_type == "bh1"
    assert UniPCMultistepScheduler.from_config(bh1.config).config.solver_type == "bh1"


IMG2IMG_CLASSES = [
    StepsearchDDIMScheduler, StepsearchDPMSolverMultistepScheduler, StepsearchDPMSolverPP3MScheduler,
    StepsearchUniPCMultistepScheduler, StepsearchEulerDiscreteScheduler, StepsearchHeunDiscreteScheduler,
    StepsearchDPMSolverSinglestepScheduler,
]  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("cls", IMG2IMG_CLASSES, ids=lambda c: c.__name__)
def test_img2img_keeps_a_custom_schedule_tail(cls, strength, x_T):
    """As diffusers' img2img pipelines: ``t_start = n - int(n strength)``, run ``timesteps[t_start *
    order:]`` after ``set_begin_index(t_start * order)``: the run is the fitted schedule's tail, and
    equals a fresh scheduler on that tail."""
    fitted = karras(DiscreteVP.stable_diffusion(), 10)
    scheduler = cls.from_step_schedule(fitted)
    scheduler.set_timesteps(10)
    t_start = 10 - int(10 * strength)
    begin = t_start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    model, x = Model(), x_T * 0.5
    for t in timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    tail = StepSchedule(fitted.times[t_start:], fitted.noise)
    fresh = cls.from_step_schedule(tail)
    fresh.set_timesteps()
    assert torch.allclose(fresh.timesteps.double(), timesteps.double())
    assert error(loop(fresh, x_T * 0.5, num_inference_steps=tail.num_steps), x) < 1e-6


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_half_precision_in_same_dtype_out(cls, dtype, x_T):
    out = loop(cls(), x_T.to(dtype), num_inference_steps=5)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    full = loop(cls(), x_T, num_inference_steps=5)
    assert error(out.float(), full) < 3e-2
