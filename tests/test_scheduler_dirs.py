"""Scheduler directories edited by hand (issue 23): every field is checked with a message naming
it, and OLSS coefficients are checked against the times they were fitted for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stepsearch.integrations.diffusers import StepsearchScheduler
from stepsearch.integrations.olss import StepsearchOLSSScheduler
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import make_schedule
from stepsearch.solvers.olss import OLSSCoefficients, ddim_coefficients


def _saved(scheduler, folder):
    scheduler.save_pretrained(folder)
    return folder / "scheduler_config.json", json.loads((folder / "scheduler_config.json").read_text())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[0.9, 0.5], [0.1, 0.0]], r"custom_times\[0\] must be a number"),
        ("0.9, 0.5, 0.0", "custom_times must be a list"),
        ([0.9, "a", 0.0], r"custom_times\[1\] must be a number"),
        ([0.5, 0.9, 0.0], "custom_times: times must be strictly decreasing"),
        (7, "custom_times must be a list"),
    ],
)
def test_edited_custom_times_are_refused_naming_the_field(bad, message, tmp_path):
    path, config = _saved(StepsearchScheduler(solver="ddim", custom_times=[0.9, 0.5, 0.0]), tmp_path)
    path.write_text(json.dumps({**config, "custom_times": bad}))
    with pytest.raises(ValueError, match=message):
        StepsearchScheduler.from_pretrained(tmp_path)


@pytest.fixture()
def olss_dir(tmp_path):
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    coefficients = ddim_coefficients(make_schedule(noise, 5, "time_uniform"))
    scheduler = StepsearchOLSSScheduler.from_fit(coefficients, {"prediction_type": "epsilon"})
    path, config = _saved(scheduler, tmp_path)
    return path, config, coefficients


def test_olss_directory_round_trips(olss_dir, tmp_path):
    _, _, coefficients = olss_dir
    loaded = StepsearchOLSSScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(5)
    assert np.array_equal(loaded.schedule.times, coefficients.schedule.times)


def test_olss_edited_fitted_times_are_refused(olss_dir, tmp_path):
    """Before: edited olss_coefficients.schedule.times were accepted (sampling at t = 386 with
    coefficients fitted for t = 429)."""
    path, config, _ = olss_dir
    edited = json.loads(json.dumps(config))
    times = edited["olss_coefficients"]["schedule"]["times"]
    times[2] = times[2] * 0.9
    edited["custom_times"] = times  # even edited consistently in both places
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="edited after the fit"):
        StepsearchOLSSScheduler.from_pretrained(tmp_path)


def test_olss_custom_times_must_be_the_fitted_ones(olss_dir, tmp_path):
    """Before: custom_times in an OLSS directory were silently ignored."""
    path, config, _ = olss_dir
    times = list(config["custom_times"])
    times[1] = times[1] * 0.95
    path.write_text(json.dumps({**config, "custom_times": times}))
    with pytest.raises(ValueError, match="disagree with the times olss_coefficients were fitted"):
        StepsearchOLSSScheduler.from_pretrained(tmp_path)


def test_coefficients_without_a_checksum_still_load(olss_dir):
    _, config, coefficients = olss_dir
    payload = dict(config["olss_coefficients"])
    assert payload.pop("checksum") == coefficients.checksum()
    again = OLSSCoefficients.from_json_dict(payload)
    assert again.checksum() == coefficients.checksum()
