"""A cheap, exact stand-in for a plan's quality: its trajectory error on a Gaussian mixture fitted
to the data (a feature of S³'s predictor).

A solver plan's error on a real model is mostly an integration error of the probability-flow ODE,
and the ODE of a Gaussian mixture that resembles the data has a similar shape: the same noise
schedule, the same scales, mode selection at the same noise levels. Its denoiser is closed-form
(:class:`~stepsearch.testbeds.gaussian_mixture.GaussianMixture`), so a plan runs on it in
milliseconds without the network. :class:`PlanProxy` fits the mixture to the source's reference
data (k-means with ``components`` clusters, each a full-covariance Gaussian shrunk a tenth of the
way towards its mean variance so that none is singular), solves the ODE from ``samples`` fixed
noises to convergence once (DPM-Solver++(3M), 200 log-SNR-uniform steps, float64), and scores a
plan by the log RMS distance of its final samples to those solutions from the same noises.

Measured on the bundled digits model (``benchmarks/s3_predictor.py``, a search without the
predictor, 400 FD evaluations): on the children a search stage screens, Kendall's tau between this
one number and the true FD was +0.44 (NFE 4) and +0.59 (NFE 5), against +0.39 and +0.21 for the
predictor on the plan's own features; the predictor with it as one more feature ranked them at
+0.58 and +0.52.

It exists where the source's reference data live in the space the solver integrates and are small
enough for full covariances (at most :data:`MAX_DIMENSIONS` numbers per sample): the bundled
digits models and Gaussian-mixture beds, not latent pipelines (their reference images are
decoded). Everything is a pure function of the data, the noise schedule and the settings,
computed on one CPU thread in float64, so every worker of a shared study gets the same values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

from stepsearch._threads import one_thread
from stepsearch.noise import NoiseSchedule
from stepsearch.plan import SolverPlan
from stepsearch.sampling import initial_noise_scale, sample
from stepsearch.schedule import logsnr_uniform
from stepsearch.search.plan_space import plan_key
from stepsearch.solvers import get_solver
from stepsearch.solvers.plan_solver import PlanSolver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

__all__ = ["MAX_DIMENSIONS", "PlanProxy"]

MAX_DIMENSIONS = 1024
"""The largest sample size (numbers per sample) the proxy fits full covariances for."""
_SHRINKAGE = 0.1
_REFERENCE_STEPS = 200
_LOG_ERROR_RANGE = (math.log(1e-8), math.log(1e3))


class PlanProxy:
    """Log RMS trajectory error of a plan on a Gaussian mixture fitted to ``data`` (module
    docstring).

    Args:
        data: ``(N, ...)`` real samples in the space the solver integrates.
        noise: the model's noise schedule.
        components: k-means clusters (at most ``N // 2``).
        samples: noises the plans are run from.
        seed: the k-means initialisation's and the noises' seed.
    """

    def __init__(
        self,
        data: Tensor,
        noise: NoiseSchedule,
        *,
        components: int = 10,
        samples: int = 128,
        seed: int = 0,
    ) -> None:
        if data.ndim < 2 or data.shape[0] < 4:
            raise ValueError("the proxy needs at least 4 data samples")
        dim = math.prod(data.shape[1:])
        if dim > MAX_DIMENSIONS:
            raise ValueError(
                f"the proxy fits at most {MAX_DIMENSIONS} numbers per sample, not {dim}"
            )
        if int(components) < 1 or int(samples) < 1:
            raise ValueError("components and samples must be at least 1")
        self.noise = noise
        self.shape = tuple(int(n) for n in data.shape[1:])
        self.settings = {"components": int(components), "samples": int(samples), "seed": int(seed)}
        with one_thread():
            self.bed = _fitted_mixture(data, noise, int(components), int(seed))
            generator = torch.Generator().manual_seed(int(seed))
            self.noises = torch.randn((int(samples), *self.shape), generator=generator,
                                      dtype=torch.float64)  # fmt: skip
            fine = logsnr_uniform(noise, _REFERENCE_STEPS)
            x_T = initial_noise_scale(fine) * self.noises
            self.solutions = sample(self.bed, x_T, fine, get_solver("dpm_solver_pp_3m")).sample
        self._known: dict[str, float] = {}

    @classmethod
    def for_source(cls, source: Any, **settings: int) -> PlanProxy | None:
        """The proxy of a :class:`~stepsearch.models.source.SampleSource` (its ``reference_data``
        and ``noise``), or ``None`` where it has none in the solver's space or they are too large
        (module docstring)."""
        data = getattr(source, "reference_data", None)
        shape = tuple(getattr(source, "sample_shape", ()))
        if not isinstance(data, Tensor) or tuple(data.shape[1:]) != shape or data.shape[0] < 4:
            return None
        if math.prod(shape) > MAX_DIMENSIONS:
            return None
        return cls(data.detach().cpu(), source.noise, **settings)

    def describe(self) -> dict[str, Any]:
        """What the values depend on besides the data and the noise schedule (provenance)."""
        return {
            **self.settings,
            "reference": f"dpm_solver_pp_3m / logsnr_uniform x{_REFERENCE_STEPS}",
        }

    def __call__(self, plan: SolverPlan, solver: PlanSolver) -> float:
        """The log RMS distance of ``plan``'s samples (run by ``solver``) to the converged
        solutions from the same noises, clipped to ``[log 1e-8, log 1e3]`` (a diverging plan gets
        the upper end); remembered per plan."""
        key = plan_key(plan)
        if key not in self._known:
            self._known[key] = self._error(plan, solver)
        return self._known[key]

    def _error(self, plan: SolverPlan, solver: PlanSolver) -> float:
        if plan.schedule.noise != self.noise:
            raise ValueError("the plan is on another noise schedule than the proxy")
        with one_thread():
            x_T = initial_noise_scale(plan.schedule) * self.noises
            found = sample(self.bed, x_T, plan, solver).sample.double()
            error = float(((found - self.solutions) ** 2).mean().sqrt())
        low, high = _LOG_ERROR_RANGE
        if not math.isfinite(error):
            return high
        return min(max(math.log(max(error, 1e-300)), low), high)


def _fitted_mixture(
    data: Tensor, noise: NoiseSchedule, components: int, seed: int
) -> GaussianMixture:
    """k-means clusters of ``data`` as full-covariance Gaussians (shrunk towards isotropic)."""
    points = data.reshape(data.shape[0], -1).double().numpy()
    dim = points.shape[1]
    count = max(1, min(components, points.shape[0] // 2))
    _, labels = kmeans2(points, count, seed=np.random.default_rng(seed), minit="++")
    weights, means, covariances = [], [], []
    for k in range(count):
        members = torch.from_numpy(points[labels == k])
        if members.shape[0] < 2:
            continue
        centred = members - members.mean(0)
        covariance = (centred.T @ centred / (members.shape[0] - 1)).numpy()  # torch: one thread
        isotropic = float(np.trace(covariance)) / dim
        weights.append(members.shape[0])
        means.append(members.mean(0).numpy())
        covariances.append(
            (1 - _SHRINKAGE) * covariance + _SHRINKAGE * max(isotropic, 1e-6) * np.eye(dim)
        )
    return GaussianMixture(weights, np.stack(means), np.stack(covariances), noise, data.shape[1:])
