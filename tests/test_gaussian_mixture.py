"""The exact test beds against Monte-Carlo estimates and a numerical ODE solve."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from stepsearch.noise import EDM, DiscreteVP, FlowMatching, LinearVP
from stepsearch.testbeds.gaussian_mixture import EmpiricalDenoiser, GaussianMixture


@pytest.mark.parametrize("noise", [DiscreteVP.stable_diffusion(), EDM(), FlowMatching()], ids=repr)
def test_mixture_denoiser_matches_monte_carlo_posterior_mean(noise):
    mixture = GaussianMixture.random(3, 2, noise, seed=1)
    generator = torch.Generator().manual_seed(0)
    x0 = mixture.sample(400_000, generator)
    t = 0.35 * noise.t_max if not isinstance(noise, EDM) else 0.7
    alpha, sigma = float(noise.alpha(t)), float(noise.sigma(t))
    queries = mixture.sample_noisy(4, t, generator)
    exact = mixture(queries, t)
    for query, expected in zip(queries, exact, strict=True):
        # Self-normalised importance sampling: E[x0 | x_t] = E_p0[x0 N(x_t; alpha x0, sigma^2)] / E_p0[N].
        log_weights = -((query - alpha * x0) ** 2).sum(1) / (2 * sigma**2)
        weights = torch.softmax(log_weights, 0)
        effective = 1.0 / (weights**2).sum()
        estimate = (weights[:, None] * x0).sum(0)
        assert effective > 200
        tolerance = 6 * x0.std(0).max() / effective.sqrt()
        assert torch.allclose(estimate, expected, atol=float(tolerance))


def test_log_prob_matches_density_integral_and_shape_independence():
    noise = LinearVP()
    mixture = GaussianMixture.random(2, 2, noise, seed=3)
    t = 0.3
    grid = torch.linspace(-9, 9, 721, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    density = mixture.log_prob(points, t).exp().reshape(721, 721)
    mass = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
    assert float(mass) == pytest.approx(1.0, abs=1e-6)

    images = GaussianMixture.random(2, 64, noise, seed=4, shape=(1, 8, 8))
    flat = GaussianMixture(images.weights, images.means, images.covariances, noise)
    x = images.sample_noisy(5, 0.5, torch.Generator().manual_seed(1))
    assert x.shape == (5, 1, 8, 8)
    torch.testing.assert_close(images(x, 0.5).reshape(5, 64), flat(x.reshape(5, 64), 0.5))
    per_sample = images(x, torch.full((5,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(per_sample, images(x, 0.5))


@pytest.mark.parametrize("noise", [LinearVP(), EDM(), FlowMatching()], ids=repr)
def test_single_gaussian_ode_solution_matches_numerical_solve(noise):
    covariance = np.array([[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.02]])
    gaussian = GaussianMixture.gaussian([1.0, -0.5, 0.25], covariance, noise)
    t_start = noise.t_max * 0.999  # the velocity below uses central differences
    t_end = noise.t_min
    x_start = gaussian.sample_noisy(3, t_start, torch.Generator().manual_seed(2))

    def velocity(log_t: float, flat: np.ndarray) -> np.ndarray:
        # Probability-flow ODE dx/dt = alpha'(t) D + sigma'(t) (x - alpha D) / sigma, integrated in
        # log t (the problem is stiff in t near 0).
        t = float(np.exp(log_t))
        h = 1e-7 * t
        d_alpha = (noise.alpha(t + h) - noise.alpha(t - h)) / (2 * h)
        d_sigma = (noise.sigma(t + h) - noise.sigma(t - h)) / (2 * h)
        x = torch.from_numpy(flat.reshape(3, 3))
        denoised = gaussian(x, t)
        eps = (x - noise.alpha(t) * denoised) / noise.sigma(t)
        return t * (d_alpha * denoised + d_sigma * eps).numpy().ravel()

    span = (np.log(t_start), np.log(t_end))
    numerical = (
        solve_ivp(velocity, span, x_start.numpy().ravel(), method="DOP853", rtol=1e-11, atol=1e-12)
        .y[:, -1]
        .reshape(3, 3)
    )
    exact = gaussian.ode_solution(x_start, t_start, t_end).numpy()
    np.testing.assert_allclose(exact, numerical, atol=1e-6)
    # And the closed form is a flow: t -> s -> r equals t -> r.
    middle = gaussian.ode_solution(x_start, t_start, 0.5 * (t_start + t_end))
    torch.testing.assert_close(
        gaussian.ode_solution(middle, 0.5 * (t_start + t_end), t_end),
        gaussian.ode_solution(x_start, t_start, t_end),
    )


def test_sampling_matches_moments():
    mixture = GaussianMixture.random(3, 4, EDM(), seed=5)
    samples = mixture.sample(200_000, torch.Generator().manual_seed(0))
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="single Gaussian"):
        mixture.ode_solution(samples[:2], 1.0, 0.5)


def test_empirical_denoiser_snaps_to_data_and_matches_mixture_limit():
    noise = DiscreteVP.stable_diffusion()
    data = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    empirical = EmpiricalDenoiser(data, noise)
    t = float(noise.t_from_timestep(5))
    alpha, sigma = float(noise.alpha(t)), float(noise.sigma(t))
    x = alpha * data[:7] + sigma * 0.1 * torch.randn(7, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(empirical(x, t), data[:7], atol=1e-8, rtol=0)
    # A mixture of point masses (zero covariance) is the same denoiser.
    points = GaussianMixture(np.ones(50), data.reshape(50, -1).numpy(), 0.0, noise, shape=(1, 4, 4))
    y = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(empirical(y, 0.6), points(y, 0.6))
    assert torch.equal(empirical(y, 0.0), y)
