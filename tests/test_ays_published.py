"""NVIDIA's published AYS schedules: the paper's numbers, safe interpolation, rescaling."""

from __future__ import annotations

import numpy as np
import pytest

from stepsearch.noise import EDM, DiscreteVP
from stepsearch.published import (
    PUBLISHED_SIGMAS,
    PUBLISHED_TIMESTEPS,
    published_schedule,
    published_sigmas,
)

PAPER_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]


def test_tables_are_diffusers_ays_schedules_before_the_zero_replacement():
    from diffusers.schedulers import AysSchedules

    pairs = {
        "sd15": "StableDiffusion",
        "sdxl": "StableDiffusionXL",
        "svd": "StableDiffusionVideo",
    }
    for name, prefix in pairs.items():
        shipped = AysSchedules[f"{prefix}Sigmas"]
        assert shipped[-1] == 0.0  # diffusers' replacement of sigma_min
        assert list(PUBLISHED_SIGMAS[name][:-1]) == pytest.approx(shipped[:-1], abs=0)
        if name in PUBLISHED_TIMESTEPS:
            assert list(PUBLISHED_TIMESTEPS[name][:-1]) == AysSchedules[f"{prefix}Timesteps"]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_timestep_and_sigma_tables_agree_on_stable_diffusion(name):
    """Both published forms are one schedule on SD's noise schedule (to the tables' rounding)."""
    noise = DiscreteVP.stable_diffusion()
    from_timesteps = published_schedule(name, noise, kind="timesteps", clean_end=False)
    from_sigmas = published_schedule(name, noise, clean_end=False)
    np.testing.assert_allclose(
        from_timesteps.to_kdiffusion_sigmas(), PUBLISHED_SIGMAS[name], rtol=0.015
    )
    timesteps = noise.timestep_from_t(from_sigmas.times)
    np.testing.assert_allclose(timesteps, PUBLISHED_TIMESTEPS[name], atol=0.7)
    assert not from_sigmas.metadata["rescaled"]


def test_ten_steps_without_a_clean_end_is_the_paper_table():
    assert published_sigmas("sd1.5", 10, clean_end=False).tolist() == PAPER_SD15
    schedule = published_schedule("sd15", DiscreteVP.stable_diffusion(), 10, clean_end=False)
    np.testing.assert_allclose(schedule.to_kdiffusion_sigmas(), PAPER_SD15, rtol=6e-3)  # 3 decimals


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIGMAS))
@pytest.mark.parametrize("num_steps", [5, 10, 20, 32, 50])
def test_interpolation_decreases_strictly_with_one_trailing_zero(name, num_steps):
    sigmas = published_sigmas(name, num_steps)
    assert sigmas.size == num_steps + 1
    assert np.count_nonzero(sigmas == 0) == 1 and sigmas[-1] == 0
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(PUBLISHED_SIGMAS[name][0], rel=1e-12)
    assert sigmas[-2] == pytest.approx(PUBLISHED_SIGMAS[name][-1])
    no_zero = published_sigmas(name, num_steps, clean_end=False)
    assert no_zero.size == num_steps + 1 and np.all(no_zero > 0) and np.all(np.diff(no_zero) < 0)


def test_interpolation_is_log_linear_between_table_points():
    table = np.asarray(PUBLISHED_SIGMAS["sdxl"])
    twenty = published_sigmas("sdxl", 20, clean_end=False)
    np.testing.assert_allclose(twenty[::2], table, rtol=1e-12)
    np.testing.assert_allclose(twenty[1::2], np.sqrt(table[:-1] * table[1:]), rtol=1e-12)


def test_rescaling_maps_the_table_onto_another_sigma_range():
    ddpm = DiscreteVP.from_diffusers_config({})  # linear betas: sigma in [0.01, 157]
    schedule = published_schedule("sd15", ddpm, 10)
    sigmas = schedule.to_kdiffusion_sigmas()
    low, high = float(ddpm.kdiffusion_sigma(ddpm.t_min)), float(ddpm.kdiffusion_sigma(ddpm.t_max))
    assert schedule.metadata["rescaled"]
    assert sigmas[0] == pytest.approx(high) and sigmas[-2] == pytest.approx(low)
    # the shape (relative position in log sigma) is the table's
    table = published_sigmas("sd15", 10)[:-1]
    fraction = np.log(table / table[-1]) / np.log(table[0] / table[-1])
    mapped = np.log(sigmas[:-1] / low) / np.log(high / low)
    np.testing.assert_allclose(mapped, fraction, atol=1e-9)
    clipped = published_schedule("sd15", ddpm, 10, rescale="never").to_kdiffusion_sigmas()
    assert clipped[0] == pytest.approx(14.615)
    svd = published_schedule("svd", EDM(), 10).to_kdiffusion_sigmas()  # 700 -> 80
    assert svd[0] == pytest.approx(80.0) and svd[-2] == pytest.approx(0.002)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="no published AYS"):
        published_sigmas("sd3")
    with pytest.raises(ValueError, match="timesteps"):
        published_schedule("svd", DiscreteVP.stable_diffusion(), kind="timesteps")
    with pytest.raises(ValueError, match="DiscreteVP"):
        published_schedule("sd15", EDM(), kind="timesteps")
    with pytest.raises(ValueError, match="rescale"):
        published_schedule("sd15", EDM(), rescale="sometimes")
    with pytest.raises(ValueError, match="num_steps"):
        published_sigmas("sd15", 0)
