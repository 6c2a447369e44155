"""Exact ground truth: Gaussian mixtures and finite data sets under any noise schedule.

For data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` and ``x_t = alpha x0 + sigma eps`` every quantity a
sampler needs is closed-form:

- the noised marginal is ``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``;
- the optimal denoiser is the posterior mean ``E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha Sigma_k
  (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k))`` with responsibilities ``r_k``;
- for one Gaussian the probability-flow ODE keeps the standardised coordinate fixed in the
  eigenbasis of ``Sigma``: ``x_s = alpha_s mu + U diag(sqrt(v_s / v_t)) U^T (x_t - alpha_t mu)`` with
  ``v = alpha^2 s + sigma^2`` per eigenvalue ``s``.

All maths is float64; inputs of any dtype and event shape (``(B, D)``, ``(B, 1, 8, 8)``, ...) are
flattened internally and results are returned in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from stepsearch.noise import NoiseSchedule


def _times(t: float | Tensor | np.ndarray, batch: int) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().cpu().double().numpy()
    return np.broadcast_to(np.asarray(t, dtype=np.float64), (batch,))


def _flatten(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"expected samples of shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], -1).double()


class GaussianMixture:
    """A Gaussian mixture with its exact denoiser on a noise schedule (a :class:`Denoiser`).

    Args:
        weights: ``(K,)`` non-negative mixture weights (normalised here).
        means: ``(K, D)`` component means.
        covariances: ``(K, D, D)`` full, ``(K, D)`` diagonal or ``(K,)`` isotropic variances.
        noise: the noise schedule defining ``x_t``.
        shape: event shape of one sample (default ``(D,)``); its size must be ``D``.
    """

    def __init__(
        self,
        weights: ArrayLike,
        means: ArrayLike,
        covariances: ArrayLike,
        noise: NoiseSchedule,
        shape: Sequence[int] | None = None,
    ):
        means_array = np.atleast_2d(np.asarray(means, dtype=np.float64))
        num_components, dim = means_array.shape
        weights_array = np.asarray(weights, dtype=np.float64).reshape(-1)
        if weights_array.shape != (num_components,) or (weights_array < 0).any():
            raise ValueError(f"weights must be {num_components} non-negative numbers")
        covariance_array = _full_covariances(
            np.asarray(covariances, dtype=np.float64), num_components, dim
        )
        eigenvalues, eigenvectors = np.linalg.eigh(covariance_array)
        if (eigenvalues < -1e-10).any():
            raise ValueError("covariances must be positive semi-definite")
        self.noise = noise
        self.shape = tuple(shape) if shape is not None else (dim,)
        if math.prod(self.shape) != dim:
            raise ValueError(f"shape {self.shape} does not hold {dim} values")
        self.weights = torch.from_numpy(weights_array / weights_array.sum())
        self.means = torch.from_numpy(means_array)
        self.covariances = torch.from_numpy(covariance_array)
        self.eigenvalues = torch.from_numpy(np.clip(eigenvalues, 0.0, None))
        self.eigenvectors = torch.from_numpy(eigenvectors)

    @classmethod
    def gaussian(
        cls,
        mean: ArrayLike,
        covariance: ArrayLike,
        noise: NoiseSchedule,
        shape: Sequence[int] | None = None,
    ) -> GaussianMixture:
        """A single Gaussian (``covariance`` full ``(D, D)`` or diagonal ``(D,)``)."""
        mean_array = np.asarray(mean, dtype=np.float64).reshape(1, -1)
        return cls([1.0], mean_array, np.asarray(covariance, dtype=np.float64)[None], noise, shape)

    @classmethod
    def random(
        cls,
        num_components: int,
        dim: int,
        noise: NoiseSchedule,
        seed: int = 0,
        spread: float = 2.0,
        scale_range: tuple[float, float] = (0.05, 0.5),
        shape: Sequence[int] | None = None,
    ) -> GaussianMixture:
        """A reproducible random mixture: means ``~ N(0, spread^2 / D)``-ish, random rotations and
        per-direction standard deviations in ``scale_range``."""
        rng = np.random.default_rng(seed)
        means = rng.normal(0.0, spread / math.sqrt(dim), (num_components, dim))
        covariances = np.empty((num_components, dim, dim))
        for k in range(num_components):
            rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
            scales = rng.uniform(*scale_range, dim)
            covariances[k] = rotation @ np.diag(scales**2) @ rotation.T
        weights = rng.uniform(0.5, 1.5, num_components)
        return cls(weights, means, covariances, noise, shape)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # sampling ---------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact data samples, float64, shape ``(n, *shape)``."""
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = z * self.eigenvalues[components].sqrt()
        x0 = self.means[components] + torch.einsum(
            "nde,ne->nd", self.eigenvectors[components], scaled
        )
        return x0.reshape(n, *self.shape)

    def sample_noisy(self, n: int, t: float, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of the noised marginal at time ``t``."""
        x0 = self.sample(n, generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return float(self.noise.alpha(t)) * x0 + float(self.noise.sigma(t)) * eps

    # exact quantities -------------------------------------------------------------------------
    def _component_terms(self, x: Tensor, t: float | Tensor | np.ndarray) -> tuple[Tensor, ...]:
        flat = _flatten(x, self.shape)
        times = _times(t, flat.shape[0])
        alpha = torch.from_numpy(np.asarray(self.noise.alpha(times))).reshape(-1, 1, 1)
        sigma = torch.from_numpy(np.asarray(self.noise.sigma(times))).reshape(-1, 1, 1)
        centred = flat[:, None, :] - alpha * self.means[None]  # (B, K, D)
        projected = torch.einsum("kde,bkd->bke", self.eigenvectors, centred)
        variance = alpha**2 * self.eigenvalues[None] + sigma**2  # (B, K, D)
        log_likelihood = -0.5 * (projected**2 / variance + torch.log(2 * math.pi * variance)).sum(
            -1
        )
        return flat, alpha, sigma, projected, variance, log_likelihood

    def log_prob(self, x: Tensor, t: float | Tensor | np.ndarray) -> Tensor:
        """Exact log-density of the noised marginal ``p_t(x)`` (needs ``sigma(t) > 0`` or full-rank
        covariances), float64, shape ``(B,)``."""
        *_, log_likelihood = self._component_terms(x, t)
        return torch.logsumexp(self.weights.log()[None] + log_likelihood, dim=1)

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        """Exact posterior mean ``E[x0 | x_t = x]``."""
        flat, alpha, sigma, projected, variance, log_likelihood = self._component_terms(x, t)
        responsibilities = torch.softmax(self.weights.log()[None] + log_likelihood, dim=1)
        shrunk = alpha * self.eigenvalues[None] / variance * projected  # (B, K, D)
        posterior_means = self.means[None] + torch.einsum("kde,bke->bkd", self.eigenvectors, shrunk)
        denoised = (responsibilities[..., None] * posterior_means).sum(1)
        clean = (sigma.reshape(-1) == 0)[:, None]
        denoised = torch.where(clean, flat, denoised)
        return denoised.reshape(x.shape).to(x.dtype)

    def ode_solution(self, x_t: Tensor, t: float, s: float) -> Tensor:
        """Exact probability-flow ODE map from time ``t`` to time ``s`` (single Gaussian only)."""
        if self.num_components != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian only")
        flat = _flatten(x_t, self.shape)
        alpha_t, sigma_t = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        alpha_s, sigma_s = float(self.noise.alpha(s)), float(self.noise.sigma(s))
        mean, vectors, values = self.means[0], self.eigenvectors[0], self.eigenvalues[0]
        projected = (flat - alpha_t * mean) @ vectors
        ratio = torch.sqrt((alpha_s**2 * values + sigma_s**2) / (alpha_t**2 * values + sigma_t**2))
        solution = alpha_s * mean + (projected * ratio) @ vectors.T
        return solution.reshape(x_t.shape).to(x_t.dtype)


def _full_covariances(covariances: np.ndarray, num_components: int, dim: int) -> np.ndarray:
    if covariances.ndim == 0:
        covariances = np.full(num_components, float(covariances))
    if covariances.shape == (num_components,):
        return covariances[:, None, None] * np.eye(dim)[None]
    if covariances.shape == (num_components, dim):
        return np.stack([np.diag(row) for row in covariances])
    if covariances.shape == (num_components, dim, dim):
        if not np.allclose(covariances, np.swapaxes(covariances, 1, 2)):
            raise ValueError("covariances must be symmetric")
        return covariances.copy()
    raise ValueError(
        f"covariances must have shape ({num_components},), ({num_components}, {dim}) or "
        f"({num_components}, {dim}, {dim}); got {covariances.shape}"
    )


class EmpiricalDenoiser:
    """The optimal denoiser of a finite data set (a mixture of point masses).

    ``E[x0 | x_t] = sum_i softmax_i(-||x_t - alpha d_i||^2 / (2 sigma^2)) d_i``: its probability-flow
    ODE trajectories end on data points, which is what an over-fitted model would do; with the
    1,797 scikit-learn digits it gives an exact test bed of image shape ``(1, 8, 8)``.
    """

    def __init__(self, data: Tensor, noise: NoiseSchedule, chunk_size: int = 4096):
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError("data must have shape (N, ...) with N >= 1")
        self.noise = noise
        self.shape = tuple(data.shape[1:])
        self.data = data.reshape(data.shape[0], -1).double()
        self._half_norms = 0.5 * (self.data**2).sum(1)
        self.chunk_size = chunk_size

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        flat = _flatten(x, self.shape)
        times = _times(t, flat.shape[0])
        alpha = torch.from_numpy(np.asarray(self.noise.alpha(times))).reshape(-1, 1)
        sigma = torch.from_numpy(np.asarray(self.noise.sigma(times))).reshape(-1, 1)
        noisy = sigma.reshape(-1) > 0
        denoised = flat.clone()
        if noisy.any():
            rows = noisy.nonzero().reshape(-1)
            for start in range(0, rows.numel(), self.chunk_size):
                index = rows[start : start + self.chunk_size]
                a, s = alpha[index], sigma[index]
                logits = (a * flat[index] @ self.data.T - a**2 * self._half_norms[None]) / s**2
                denoised[index] = torch.softmax(logits, dim=1) @ self.data
        return denoised.reshape(x.shape).to(x.dtype)
