"""The DP's closed-form coefficient tables equal the solvers' own steps on one-hot inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepsearch.noise import EDM, DiscreteVP, FlowMatching
from stepsearch.schedule import StepSchedule
from stepsearch.search import dynamic
from stepsearch.search.dp_coefficients import closed_form_coefficients, has_closed_form
from stepsearch.solvers import get_solver

SOLVERS = [
    ("ddim", {}),
    ("euler", {}),
    ("dpm_solver_1", {}),
    ("dpm_solver_pp_2m", {}),
    ("dpm_solver_pp_2m", {"lower_order_final": False}),
    ("dpm_solver_pp_3m", {}),
    ("dpm_solver_pp_3m", {"legacy_3m": True}),
    ("unipc_bh1", {}),
    ("unipc_bh2", {}),
    ("unipc_bh2", {"order": 1}),
    ("unipc_bh1", {"order": 3}),
    ("unipc_bh2", {"order": 3, "lower_order_final": False}),
]

NOISES = {
    "vp-logsnr": (
        DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"}),
        "logsnr_uniform",
    ),
    "vp-zero-snr": (
        DiscreteVP.from_diffusers_config(
            {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True}
        ),
        "time_uniform",
    ),
    "flow": (FlowMatching(shift=3.0), "time_uniform"),  # starts where alpha = 0
    "edm": (EDM(), "karras"),
}


def _rules(name, options):
    return {r.key: r for r in dynamic.layer_rules(get_solver(name, **options), 6)}.values()


@pytest.mark.parametrize("noise_name", sorted(NOISES))
@pytest.mark.parametrize(("name", "options"), SOLVERS)
def test_closed_form_equals_one_hot_solver_steps(noise_name, name, options):
    noise, spacing = NOISES[noise_name]
    grid = dynamic.fine_grid(noise, 9, spacing)
    for rule in _rules(name, options):
        assert has_closed_form(rule.probe, rule.depth)
        reference = dynamic.step_coefficients(rule, grid, method="one_hot")
        fast = dynamic.step_coefficients(rule, grid)
        assert fast.shape == reference.shape
        assert np.array_equal(np.isnan(fast), np.isnan(reference))
        valid = ~np.isnan(reference)
        assert valid.sum() == (9 * 8 // 2 if rule.depth == 0 else 9 * 8 * 7 // 6) * fast.shape[-1]
        np.testing.assert_allclose(fast[valid], reference[valid], rtol=1e-12, atol=1e-300)


def test_closed_form_table_runs_the_solver_on_real_tensors():
    """Ground truth beyond one-hot inputs: the table applied to random tensors is the solver's
    step from a fresh ``init`` on ``[g_p, g_i, g_j]`` (a step to clean data included)."""
    noise, spacing = NOISES["vp-logsnr"]
    grid = dynamic.fine_grid(noise, 12, spacing)
    generator = torch.Generator().manual_seed(0)
    tensors = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    for rule in _rules("unipc_bh2", {}):
        coef = closed_form_coefficients(rule.probe, rule.depth, grid)
        for points in [(0, 4), (3, 11)] if rule.depth == 0 else [(0, 2, 7), (1, 5, 11)]:
            schedule = StepSchedule(grid.times[list(points)], grid.noise)
            state = rule.probe.init(tensors[0], schedule)
            for k in range(len(points) - 1):
                x, state = rule.probe.step(state, tensors[2 * k], tensors[2 * k + 1], k)
            combined = sum(c * t for c, t in zip(coef[points], tensors, strict=False))
            torch.testing.assert_close(combined, x, rtol=1e-12, atol=1e-14)


def test_a_100_point_table_never_steps_the_solver(monkeypatch):
    """The closed form is what makes the table fast (timed in benchmarks/dp_coefficients.py:
    0.33 s for UniPC bh2 on 100 points vs 162 s one-hot): building it calls no solver step."""
    grid = dynamic.fine_grid(NOISES["vp-logsnr"][0], 100)
    for rule in _rules("unipc_bh2", {}):

        def refuse(*args, **kwargs):
            raise AssertionError("the closed-form table stepped the solver")

        monkeypatch.setattr(rule.probe, "step", refuse)
        table = dynamic.step_coefficients(rule, grid)
        forward = table[np.triu_indices(100, 1)] if rule.depth == 0 else table[0, 1, 2:]
        assert np.isfinite(forward).all()  # every monotone index tuple has its coefficients


@pytest.mark.parametrize(
    "name", ["heun", "dpm_solver_2", "dpm_solver_pp_2s", "pndm", "dpm_solver_2m"]
)
def test_solvers_that_the_dp_refuses_have_no_closed_form(name):
    solver = get_solver(name)
    with pytest.raises(ValueError, match="not supported"):
        dynamic.layer_rules(solver, 5)
    grid = dynamic.fine_grid(NOISES["vp-logsnr"][0], 6)
    for depth in (0, 1):
        assert not has_closed_form(solver, depth)
        with pytest.raises(ValueError, match="no closed-form"):
            closed_form_coefficients(solver, depth, grid)
    assert not has_closed_form(get_solver("ddim", eta=0.5), 0)


def test_step_coefficients_names_a_bad_method():
    rule = dynamic.layer_rules(get_solver("ddim"), 2)[0]
    grid = dynamic.fine_grid(NOISES["vp-logsnr"][0], 5)
    with pytest.raises(ValueError, match="method must be one of"):
        dynamic.step_coefficients(rule, grid, method="fast")
