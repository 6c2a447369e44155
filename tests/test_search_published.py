"""Published DP schedules (GITS SD1.5, OptimalSteps) and their interpolation."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from stepsearch import published
from stepsearch.noise import DiscreteVP, FlowMatching


def _table_values():
    text = resources.files("stepsearch").joinpath("data/gits_sd15.json").read_text("utf-8")
    tables = json.loads(text)["tables"]
    return tables, sorted({v for rows in tables.values() for row in rows for v in row})


def test_gits_tables_cover_the_published_range():
    tables, _ = _table_values()
    assert [float(c) for c in tables] == list(published.GITS_COEFFS)
    for rows in tables.values():
        assert [len(row) - 1 for row in rows] == list(range(2, 21))  # 2-20 steps


def test_gits_values_lie_on_one_smooth_grid_of_sd15_sigmas():
    """Transcription check: every value is an SD1.5 sigma on one ~10-timestep grid, and its
    offset from the nearest integer-timestep sigma varies smoothly (a mistyped digit would not)."""
    noise = DiscreteVP.stable_diffusion()
    steps = np.arange(1000, dtype=np.float64)
    sigmas = np.asarray(noise.kdiffusion_sigma(np.asarray(noise.t_from_timestep(steps))))
    _, values = _table_values()
    nearest = np.array([np.argmin(np.abs(sigmas - v)) for v in values])
    offsets = np.log(values) - np.log(sigmas[nearest])
    assert np.abs(offsets).max() < 2e-3
    assert len(values) == 98 and np.all(np.diff(nearest) >= 9) and np.all(np.diff(nearest) <= 20)
    grid = offsets[1:]  # sigma_min itself is the t = 0 value; the others lie between timesteps
    inner = grid[1:-1] - 0.5 * (grid[:-2] + grid[2:])
    jump = int(np.argmax(np.abs(np.diff(grid))))  # where the nearest timestep flips side
    inner = np.delete(inner, [jump - 1, jump])
    assert np.abs(inner).max() < 2e-5


@pytest.mark.parametrize("coeff", [0.80, 1.15, 1.50])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 21, 40])
def test_gits_schedules_end_once_at_clean_data(coeff, steps):
    schedule = published.gits_schedule(steps, coeff)
    assert schedule.num_steps == steps and schedule.ends_clean
    sigmas = schedule.to_kdiffusion_sigmas()
    assert np.count_nonzero(sigmas == 0) == 1
    assert sigmas[0] == pytest.approx(14.61464119, rel=1e-6)
    assert sigmas[-2] > 0.029  # the table's sigma_min became the clean end


def test_gits_published_rows_and_interpolation():
    tables, _ = _table_values()
    assert published.gits_sigmas(5, 1.15)[:-1].tolist() == tables["1.15"][3][:-1]
    long = published.gits_sigmas(40, 1.15)
    reference = np.asarray(tables["1.15"][-1])
    assert long[0] == pytest.approx(reference[0]) and long[-1] == 0.0
    assert np.all(np.diff(long) < 0)
    # the interpolated noisy levels stay inside the 20-step table's range
    assert long[-2] > reference[-1]
    with pytest.raises(ValueError, match="coefficients"):
        published.gits_sigmas(5, 1.17)


@pytest.mark.parametrize(("model", "native"), [("flux", 10), ("wan", 20), ("chroma", 40)])
def test_optimal_steps_tables(model, native):
    table = published.OPTIMAL_STEPS[model]
    assert len(table) == native + 1
    exact = published.optimal_steps_sigmas(model, native)
    assert exact[:-1].tolist() == list(table[:-1]) and exact[-1] == 0.0
    for steps in (3, native - 1, native + 7):
        levels = published.optimal_steps_sigmas(model, steps)
        assert len(levels) == steps + 1 and np.count_nonzero(levels == 0) == 1
        assert np.all(np.diff(levels) < 0) and levels[0] == pytest.approx(table[0])
    schedule = published.optimal_steps_schedule(model, native)
    assert isinstance(schedule.noise, FlowMatching) and schedule.ends_clean
    assert schedule.num_steps == native
    with pytest.raises(ValueError, match="publishes"):
        published.optimal_steps_sigmas("sdxl", 10)
    with pytest.raises(ValueError, match="FlowMatching"):
        published.optimal_steps_schedule(model, 10, noise=DiscreteVP.stable_diffusion())


def test_interpolation_refuses_a_table_that_already_ends_in_zero():
    with pytest.raises(ValueError, match="positive"):
        published.interpolate_noisy_levels([1.0, 0.5, 0.0], 5)
