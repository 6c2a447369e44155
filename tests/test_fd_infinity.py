"""FD extrapolated to infinitely many samples (FD_inf, Chong & Forsyth 2020) against the closed
form between two Gaussians, and the small-sample bias it removes."""

from __future__ import annotations

import numpy as np
import pytest

from stepsearch.eval.fid import FeatureStatistics, frechet_distance, frechet_distance_infinity

DIM = 32


def _gaussians() -> tuple[FeatureStatistics, FeatureStatistics, np.ndarray]:
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    sigma_a = basis @ basis.T + 0.5 * np.eye(DIM)
    sigma_b = np.diag(rng.uniform(0.5, 1.5, DIM))
    a = FeatureStatistics(rng.normal(0.0, 0.1, DIM), sigma_a)
    b = FeatureStatistics(np.zeros(DIM), sigma_b)
    return a, b, np.linalg.cholesky(sigma_a)


def test_fd_infinity_removes_the_small_sample_bias() -> None:
    a, b, root = _gaussians()
    exact = frechet_distance(a, b)  # the distributions' FD, closed form
    rng = np.random.default_rng(0)
    plain_errors, inf_errors = [], []
    for _ in range(4):
        features = a.mu + rng.normal(size=(400, DIM)) @ root.T
        found = frechet_distance_infinity(features, b, seed=1)
        plain_errors.append(found.at_full - exact)
        inf_errors.append(found.value - exact)
        assert found.at_full == pytest.approx(
            frechet_distance(FeatureStatistics.from_features(features), b)
        )
        assert found.slope > 0  # the bias falls like 1 / n
    plain_bias, inf_bias = float(np.mean(plain_errors)), float(np.mean(inf_errors))
    assert plain_bias > 0.1 * exact  # the plain FD of 400 samples is biased upwards
    assert abs(inf_bias) < 0.25 * plain_bias  # FD_inf removes most of it
    assert abs(inf_bias) < 0.05 * exact


def test_fd_infinity_ratio_is_not_shrunk_towards_one() -> None:
    """Two references at FD 1 and 2 from the samples' distribution (a converged solve and a
    sampler twice as far from the data): the plain FDs' ratio at 400 samples is near 1 (the
    shared bias dominates, as on the digits model at 1,000 samples), FD_inf's ratio near 2."""
    a, _, root = _gaussians()
    direction = np.ones(DIM) / np.sqrt(DIM)
    near, far = (FeatureStatistics(a.mu + np.sqrt(d) * direction, a.sigma) for d in (1.0, 2.0))
    assert frechet_distance(a, near) == pytest.approx(1.0)
    assert frechet_distance(a, far) == pytest.approx(2.0)
    rng = np.random.default_rng(3)
    features = a.mu + rng.normal(size=(400, DIM)) @ root.T
    fd_near, fd_far = (frechet_distance_infinity(features, s, seed=2) for s in (near, far))
    assert fd_far.at_full / fd_near.at_full < 1.6
    assert fd_far.value / fd_near.value == pytest.approx(2.0, rel=0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"points": 1}, "points"), ({"smallest": 1.0}, "smallest"), ({}, "too few")],
)
def test_fd_infinity_refuses_what_it_cannot_fit(kwargs: dict, message: str) -> None:
    _, b, _ = _gaussians()
    count = 400 if kwargs else DIM + 2
    features = np.random.default_rng(0).normal(size=(count, DIM))
    with pytest.raises(ValueError, match=message):
        frechet_distance_infinity(features, b, **kwargs)
