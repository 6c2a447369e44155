"""The optimize report's picture: what each plotted series holds, and that the winners' schedules
are drawn whatever kind of sampler won."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from stepsearch.noise import DiscreteVP
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize.candidates import Candidate
from stepsearch.search.optimize.report import _series, _winner_sigmas


def _row(label: str, family: str, fd: float | None) -> dict:
    return {"label": label, "family": family, "report": {"fd": fd}}


REPORT = {
    "per_nfe": {
        "4": {"rows": [_row("ddim", "baseline", 9.0), _row("DDIMScheduler", "diffusers", 7.0),
                       _row("dp a", "dp", 5.0), _row("dp b", "dp", 4.0),
                       _row("s3", "s3", None)]},
        "6": {"rows": [_row("ddim", "baseline", 3.0), _row("DDIMScheduler", "diffusers", 6.0),
                       _row("dp a", "dp", 2.5), _row("s3", "s3", 2.0)]},
    }
}  # fmt: skip


def test_series_hold_each_familys_best_and_the_best_built_in():
    series = _series(REPORT, "fd")
    assert series["dp"] == {4: 4.0, 6: 2.5}
    assert series["s3"] == {6: 2.0}  # a missing score leaves a gap, not a zero
    assert series["best built-in"] == {4: 7.0, 6: 3.0}
    assert series["built-in: ddim"] == {4: 9.0, 6: 3.0}
    assert set(series) == {"dp", "s3", "best built-in", "built-in: ddim", "built-in: DDIMScheduler"}


def test_a_built_in_winners_schedule_is_drawn():
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    schedule = spacing_schedules(noise, 3, ("karras",))["karras"]
    winner = Candidate("stepsearch ddim / karras", "baseline", 3, schedule=schedule)
    sigmas = _winner_sigmas(SimpleNamespace(model=None), winner)
    expected = schedule.to_kdiffusion_sigmas()
    np.testing.assert_allclose(sigmas, expected[expected > 0], rtol=0, atol=0)
    assert np.all(np.diff(sigmas) < 0)


def test_a_diffusers_winners_sigmas_come_from_its_own_timesteps():
    from stepsearch.models.method import default_methods

    config = {"num_train_timesteps": 1000, "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02}  # fmt: skip
    ddim = default_methods()[0]
    winner = Candidate("diffusers DDIMScheduler (leading)", "diffusers", 4, method=ddim)
    sigmas = _winner_sigmas(SimpleNamespace(model=SimpleNamespace(scheduler_config=config)), winner)
    # DDIM "leading", steps_offset 1, 4 steps: timesteps 751, 501, 251, 1.
    betas = np.linspace(0.0001, 0.02, 1000)
    cumulative = np.cumprod(1.0 - betas)[[751, 501, 251, 1]]
    np.testing.assert_allclose(
        sigmas, np.sqrt((1 - cumulative) / cumulative), rtol=2e-4
    )  # float32 table
