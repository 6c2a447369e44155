"""StepSchedule validation, conversions, JSON and spacing generators."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from stepsearch.noise import EDM, DiscreteVP, FlowMatching, LinearVP
from stepsearch.schedule import (
    SPACINGS,
    StepSchedule,
    ays_gaussian,
    diffusers_spacing,
    flow_shifted,
    karras,
    loglinear_interpolate,
    logsnr_uniform,
    make_schedule,
    time_uniform,
)

SD = DiscreteVP.stable_diffusion()
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ([1.0, 0.5, 0.5, 0.0], r"times\[2\] = 0.5 is duplicated after times\[1\] = 0.5"),
        ([1.0, 0.2, 0.5, 0.0], r"times\[2\] = 0.5 is not decreasing"),
        ([1.0, float("nan"), 0.0], r"times\[1\] is nan"),
        ([1.0, float("inf"), 0.0], r"times\[1\] is inf"),
        ([1.5, 0.5, 0.0], r"times\[0\] = 1.5 is above t_max"),
        ([1.0, 0.5, -0.1], r"negative"),
        ([1.0, 0.0005, 0.0], r"times\[1\] = 0.0005 is below t_min"),
        ([1.0, 0.0, 0.0005], r"strictly decreasing"),
        ([1.0], r"at least 2 times"),
        ([[1.0, 0.5]], r"one-dimensional"),
        (["a", "b"], r"list of numbers"),
    ],
)
def test_invalid_schedules_raise_clear_errors(times, message):
    with pytest.raises(ValueError, match=message):
        StepSchedule(times, SD)


def test_schedule_is_immutable_and_derived_values():
    schedule = time_uniform(SD, 4)
    assert schedule.num_steps == 4 and len(schedule) == 5 and schedule.ends_clean
    with pytest.raises(ValueError):
        schedule.times[0] = 0.3
    np.testing.assert_allclose(
        schedule.lambdas[:-1], np.log(schedule.alphas[:-1] / schedule.sigmas[:-1])
    )
    assert schedule.lambdas[-1] == math.inf


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 25, 50, 999])
def test_diffusers_spacings_match_ddim_scheduler(spacing, num_steps):
    offset = 1 if spacing == "leading" else 0
    reference = DDIMScheduler(**SD_CONFIG, timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(num_steps)
    ours = diffusers_spacing(SD, num_steps, spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours.to_diffusers_timesteps(), reference.timesteps.numpy())
    assert ours.ends_clean and ours.num_steps == num_steps


def test_diffusers_spacing_rejects_bad_counts():
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError):
            diffusers_spacing(SD, bad, "trailing")
    with pytest.raises(ValueError, match="spacing must be"):
        diffusers_spacing(SD, 10, "uniform")
    with pytest.raises(ValueError, match="DiscreteVP"):
        diffusers_spacing(EDM(), 10, "leading")


def test_diffusers_timestep_round_trip_and_off_grid_error():
    timesteps = np.array([999, 700, 421, 130, 7])
    schedule = StepSchedule.from_diffusers_timesteps(SD, timesteps)
    np.testing.assert_array_equal(schedule.to_diffusers_timesteps(), timesteps)
    assert schedule.ends_clean
    assert StepSchedule.from_diffusers_timesteps(SD, timesteps, final="t_min").times[-1] == SD.t_min
    off_grid = StepSchedule([1.0, 0.5004, 0.0], SD)
    with pytest.raises(ValueError, match="not a trained step"):
        off_grid.to_diffusers_timesteps()
    assert off_grid.to_diffusers_timesteps(integer=False)[1] == pytest.approx(499.4)
    np.testing.assert_array_equal(
        off_grid.snapped_to_trained_steps().to_diffusers_timesteps(), [999, 499]
    )


def test_karras_matches_formula_and_kdiffusion_round_trip():
    schedule = karras(SD, 10, rho=7.0)
    sigmas = schedule.to_kdiffusion_sigmas()
    sigma_min, sigma_max = float(SD.kdiffusion_sigma(SD.t_min)), float(SD.kdiffusion_sigma(1.0))
    ramp = np.linspace(0, 1, 10)
    expected = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-10)
    assert sigmas[-1] == 0.0
    back = StepSchedule.from_kdiffusion_sigmas(SD, sigmas)
    np.testing.assert_allclose(back.times, schedule.times, rtol=1e-10, atol=1e-14)
    comfy = schedule.to_comfyui_sigmas()
    assert comfy.dtype == torch.float32 and comfy[-1] == 0 and (comfy.diff() < 0).all()
    with pytest.raises(ValueError, match="end in 0"):
        karras(SD, 5, clean_end=False).to_comfyui_sigmas()


def test_logsnr_uniform_is_uniform_in_lambda():
    schedule = logsnr_uniform(LinearVP(), 8, clean_end=False)
    steps = np.diff(schedule.lambdas)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    assert schedule.times[0] == pytest.approx(1.0, abs=1e-12)
    assert schedule.times[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("spacing", ["logsnr_uniform", "karras", "ays_gaussian", "beta"])
def test_sigma_and_lambda_spacings_start_at_the_noisiest_finite_snr(spacing):
    """Flow matching's t = 1 has lambda = -inf: these spacings start one t_min below it, where the
    grid is finite (before: at lambda = -30, sigma 1e13, a first interval no sample passes through)."""
    flow = FlowMatching()
    schedule = make_schedule(flow, 10, spacing)
    assert flow.t_max_finite == pytest.approx(1.0 - flow.t_min)
    assert schedule.times[0] == pytest.approx(1.0 - flow.t_min, rel=1e-9)
    assert schedule.lambdas[0] == pytest.approx(math.log(flow.t_min / (1.0 - flow.t_min)))
    if spacing == "logsnr_uniform":
        steps = np.diff(schedule.lambdas[:-1])
        np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    # finite SNR at t_max: unchanged (zero-terminal-SNR betas keep diffusers' alpha_bar = 2^-24)
    zero_snr = DiscreteVP.from_diffusers_config({**SD_CONFIG, "rescale_betas_zero_snr": True})
    assert SD.t_max_finite == SD.t_max and zero_snr.t_max_finite == zero_snr.t_max
    assert logsnr_uniform(flow, 10, t_start=1.0).times[0] == pytest.approx(1.0, abs=1e-12)


def test_ays_gaussian_closed_form():
    c, lo, hi, n = 0.5, 0.002, 80.0, 10
    schedule = ays_gaussian(EDM(lo, hi), n, sigma_data=c, clean_end=False)
    i = np.arange(n + 1)
    # Sabour et al. Thm 3.1 in ascending order t_i = c tan((1 - i/n) atan(t_min/c) + i/n atan(t_max/c)).
    ascending = c * np.tan((1 - i / n) * np.arctan(lo / c) + (i / n) * np.arctan(hi / c))
    np.testing.assert_allclose(schedule.to_kdiffusion_sigmas(), ascending[::-1], rtol=1e-10)


def test_loglinear_interpolation_has_no_repeated_zero_sigmas():
    published = np.array(
        [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    )
    with pytest.raises(ValueError, match="below t_min"):  # 0.029 < sigma(t_min) = 0.02917
        StepSchedule.from_kdiffusion_sigmas(SD, np.append(published, 0.0))
    table = StepSchedule.from_kdiffusion_sigmas(SD, np.append(published, 0.0), clip_to_range=True)
    for n in (5, 10, 20, 40):
        resampled = loglinear_interpolate(table, n)
        sigmas = resampled.to_kdiffusion_sigmas()
        assert resampled.num_steps == n and (np.diff(sigmas) < 0).all()
        assert np.count_nonzero(sigmas == 0) == 1
        assert sigmas[0] == pytest.approx(float(SD.kdiffusion_sigma(1.0)), rel=1e-9) and sigmas[
            -2
        ] == pytest.approx(float(SD.kdiffusion_sigma(SD.t_min)))
    # Same step count reproduces the table itself.
    np.testing.assert_allclose(
        loglinear_interpolate(table, 11).to_kdiffusion_sigmas()[:-1],
        table.to_kdiffusion_sigmas()[:-1],
        rtol=1e-9,
    )


def test_flow_shifted_matches_sd3_shift():
    noise = FlowMatching(shift=3.0)
    schedule = flow_shifted(noise, 4)
    u = np.linspace(1.0, noise.t_min, 4)
    np.testing.assert_allclose(schedule.times[:-1], 3 * u / (1 + 2 * u), rtol=1e-12)
    assert schedule.to_flow_times()[-1] == 0.0 and schedule.times[0] == 1.0


def test_json_round_trip_and_bad_files(tmp_path):
    schedule = karras(SD, 6).with_metadata(source="test")
    path = tmp_path / "schedule.json"
    schedule.save(path)
    loaded = StepSchedule.load(path)
    assert loaded == schedule and loaded.metadata["source"] == "test"
    payload = json.loads(path.read_text())
    assert payload["format"] == "stepsearch.StepSchedule" and payload["version"] == 1
    assert len(payload["diffusers_timesteps"]) == 6 and payload["kdiffusion_sigmas"][-1] == 0.0

    cases = {
        "nan": path.read_text().replace(str(payload["times"][2]), "NaN", 1),
        "infinity": path.read_text().replace(str(payload["times"][2]), "Infinity", 1),
        "order": json.dumps({**payload, "times": payload["times"][::-1]}),
        "version": json.dumps({**payload, "version": 99}),
        "format": json.dumps({**payload, "format": "other"}),
        "missing": json.dumps({k: v for k, v in payload.items() if k != "times"}),
        "garbage": "{not json",
        "list": "[1, 2]",
    }
    for name, text in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=str(bad.name)):
            StepSchedule.load(bad)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    time_uniform(SD, 3).save(path)
    before = path.read_text()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("os.replace", explode)
    with pytest.raises(RuntimeError):
        time_uniform(SD, 5).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


@pytest.mark.parametrize("name", sorted(set(SPACINGS) - {"flow_shifted"}))
def test_every_named_spacing_is_valid(name):
    for noise in (SD, LinearVP(), EDM()):
        if name in ("leading", "linspace", "trailing") and not isinstance(noise, DiscreteVP):
            continue
        schedule = make_schedule(noise, 7, name)
        assert schedule.num_steps == 7 and schedule.ends_clean
    with pytest.raises(ValueError, match="unknown spacing"):
        make_schedule(SD, 7, "nope")
