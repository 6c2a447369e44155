"""Guidance schedules as data (stepsearch.guidance) and in stepsearch's own samplers.

Ground truth: closed forms (means of the mean-parametrized shapes, endpoints, bounds), the JSON
round trip, and the bundled ``digits-cond`` model, where a schedule's unguided steps must skip the
unconditional pass (counted) and a constant schedule must equal the plain guidance scale.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from stepsearch.denoiser import ModelDenoiser
from stepsearch.guidance import (
    FORMAT_NAME,
    GuidanceSchedule,
    load_guidance,
    noise_range,
    unet_passes,
)
from stepsearch.noise import EDM
from stepsearch.sampling import sample
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver

LOW, HIGH = 0.01, 100.0

pytestmark = pytest.mark.usefixtures("_one_thread")


def _sigmas(count: int = 200_001) -> np.ndarray:
    """Sigmas uniform in log from HIGH to LOW (progress p uniform on [0, 1])."""
    return np.exp(np.linspace(np.log(HIGH), np.log(LOW), count))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("increasing", [True, False])
def test_mean_parametrized_shapes(kind, increasing):
    build = getattr(GuidanceSchedule, kind)
    schedule = build(4.0, LOW, HIGH, increasing=increasing)
    weights = schedule(_sigmas())
    p = np.linspace(0.0, 1.0, weights.size)
    assert np.trapezoid(weights, p) == pytest.approx(4.0, rel=1e-6)  # mean weight is w
    steps = np.diff(weights)
    assert (steps >= -1e-12).all() if increasing else (steps <= 1e-12).all()
    start, end = (1.0, 7.0) if increasing else (7.0, 1.0)  # 1 and 2w - 1
    assert weights[0] == pytest.approx(start) and weights[-1] == pytest.approx(end)
    assert schedule.bounds() == (1.0, 7.0)
    assert schedule(1e6) == pytest.approx(start) and schedule(1e-6) == pytest.approx(end)


def test_wang_families_and_interval():
    sigmas = _sigmas(1001)
    linear = GuidanceSchedule.linear(3.0, LOW, HIGH)(sigmas)
    clamped = GuidanceSchedule.clamp_linear(3.0, 2.0, LOW, HIGH)
    np.testing.assert_allclose(clamped(sigmas), np.maximum(2.0, linear))
    assert clamped.bounds() == (2.0, 5.0)
    cosine = GuidanceSchedule.cosine(3.0, LOW, HIGH)(sigmas)
    np.testing.assert_allclose(GuidanceSchedule.power_cosine(3.0, 1.0, LOW, HIGH)(sigmas), cosine)
    sharp = GuidanceSchedule.power_cosine(3.0, 4.0, LOW, HIGH)
    p = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_allclose(sharp(sigmas), 1.0 + 2.0 * (1.0 - np.cos(np.pi * p**4)), atol=1e-12)
    interval = GuidanceSchedule.interval(2.5, 0.28, 5.42)
    assert interval(0.28) == 2.5 and interval(5.42) == 2.5 and interval(1.0) == 2.5
    assert interval(0.27) == 1.0 and interval(5.5) == 1.0 and interval(np.inf) == 1.0
    assert GuidanceSchedule.constant(7.5)(np.array([0.1, 10.0])).tolist() == [7.5, 7.5]


def test_json_round_trip_and_provenance(tmp_path):
    schedule = GuidanceSchedule.power_cosine(2.5, 1.7, LOW, HIGH).with_provenance(model="m")
    path = tmp_path / "guidance.json"
    schedule.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT_NAME and data["version"] == 1
    assert data["provenance"]["model"] == "m" and "created" in data["provenance"]
    loaded = load_guidance(path)
    assert loaded == schedule
    np.testing.assert_array_equal(loaded(_sigmas(101)), schedule(_sigmas(101)))


@pytest.mark.parametrize(
    ("shape", "parameters", "field"),
    [
        ("zigzag", {"weight": 2.0}, "unknown 'zigzag'"),
        ("constant", {"weight": float("nan")}, "weight must be a finite number"),
        ("constant", {"weight": -1.0}, "weight must be >= 0"),
        ("constant", {"weight": True}, "weight must be a finite number"),
        ("constant", {}, "missing ['weight']"),
        ("constant", {"weight": 2.0, "c": 1.0}, "unknown ['c']"),
        ("power_cosine", {"weight": 2.0, "s": 0.0, "sigma_min": 1, "sigma_max": 2}, "s must be"),
        ("clamp_linear", {"weight": 2.0, "c": -1, "sigma_min": 1, "sigma_max": 2}, "c must be"),
        ("linear_increasing", {"weight": 2.0, "sigma_min": 2, "sigma_max": 1}, "sigma_min <"),
        ("interval", {"weight": 2.0, "sigma_lo": 3.0, "sigma_hi": 1.0}, "sigma_lo < sigma_hi"),
        ("interval", {"weight": 2.0, "sigma_lo": 0.0, "sigma_hi": 1e400}, "sigma_hi must be"),
    ],
)
def test_validation_names_the_field(shape, parameters, field):
    with pytest.raises(ValueError) as error:
        GuidanceSchedule(shape, parameters)
    assert field in str(error.value)


def test_file_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    good = GuidanceSchedule.constant(2.0).to_json()
    for change, message in [
        ({"format": "x"}, "format"),
        ({"version": 2}, "version"),
        ({"extra": 1}, "unknown fields ['extra']"),
        ({"parameters": {"weight": "2"}}, "weight must be a finite number"),
    ]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError) as error:
            load_guidance(path)
        assert message in str(error.value) and "bad.json" in str(error.value)


def test_one_schedule_transfers_across_step_counts():
    """The weight is a function of sigma alone: the same sigma gets the same weight whatever
    grid it lies on, and the unguided steps of an interval are exactly those outside it."""
    noise = EDM()
    schedule = GuidanceSchedule.interval(3.0, 0.5, 5.0)
    for steps in (5, 10, 20):
        grid = make_schedule(noise, steps, "karras")
        sigmas = noise.kdiffusion_sigma(grid.times[:-1])
        weights = schedule(sigmas)
        assert ((weights == 3.0) == ((sigmas >= 0.5) & (sigmas <= 5.0))).all()
        assert unet_passes(weights) == steps + int(((sigmas >= 0.5) & (sigmas <= 5.0)).sum())


def test_model_denoiser_skips_the_unconditional_pass_outside_the_interval():
    """Exact Gaussian-free check: cond = 1, uncond = 0, so the guided output is the weight."""
    calls = {"cond": 0, "uncond": 0}

    def branch(name, value):
        def network(x, model_time):
            calls[name] += 1
            return torch.full_like(x, value)

        return network

    schedule = GuidanceSchedule.interval(3.0, 0.5, 5.0)
    denoiser = ModelDenoiser(
        branch("cond", 1.0), EDM(), "sample", unconditional=branch("uncond", 0.0), guidance=schedule
    )
    x = torch.zeros(2, 3)
    assert denoiser(x, 10.0).unique().tolist() == [1.0]  # outside: conditional alone
    assert denoiser(x, 1.0).unique().tolist() == [3.0]
    assert calls == {"cond": 2, "uncond": 1} and denoiser.passes == 3


def test_digits_cond_guidance_schedules_in_the_sampler():
    """On ``digits-cond``: a constant schedule equals the plain scale bit for bit; an interval
    schedule's pass count is one per step outside plus two inside, and its samples differ from
    constant guidance only through the steps it leaves unguided."""
    from stepsearch.models.loading import load_model

    model = load_model("digits-cond", guidance_scale=2.0)
    scheduled = dataclasses.replace(model, guidance_schedule=GuidanceSchedule.constant(2.0))
    grid = make_schedule(model.noise, 8, "logsnr_uniform")
    solver = get_solver("dpm_solver_pp_2m")
    indices = list(range(6))
    x_T = torch.randn(6, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    x_T = x_T * float(model.noise.initial_noise_scale(float(grid.times[0])))
    with torch.inference_mode():
        plain = sample(model.denoiser(indices), x_T, grid, solver).sample
        constant = sample(scheduled.denoiser(indices), x_T, grid, solver).sample
        torch.testing.assert_close(constant, plain, rtol=0, atol=0)
        low, high = noise_range(model.noise)
        sigmas = model.noise.kdiffusion_sigma(grid.times[:-1])
        interval = GuidanceSchedule.interval(2.0, float(sigmas[5]), float(sigmas[1]))
        denoiser = dataclasses.replace(model, guidance_schedule=interval).denoiser(indices)
        result = sample(denoiser, x_T, grid, solver).sample
    assert denoiser.passes == 8 + 5  # steps 1..5 guided
    assert denoiser.passes == unet_passes(interval(sigmas))
    assert (result - plain).abs().max() > 1e-3
    assert low <= sigmas[-1] and sigmas[0] <= high * (1 + 1e-12)
    assert scheduled.describe()["guidance_schedule"] == {
        "shape": "constant",
        "parameters": {"weight": 2.0},
    }
