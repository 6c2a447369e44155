"""The KL upper bound (KLUB) of a step schedule, estimated by Monte Carlo (Sabour et al. 2024, AYS).

Align Your Steps works in k-diffusion sigma space, ``x~ = x0 + s n`` with ``s = sigma / alpha =
exp(-lambda)``; every :class:`~stepsearch.noise.NoiseSchedule` maps onto it (discrete and continuous
VP, EDM, flow matching): the denoiser at sigma ``s`` is ``D~(x~, s) = D(alpha(t) x~, t)`` with
``t = t_from_kdiffusion_sigma(s)``.

For stochastic DDIM (a first-order solver) the denoiser is frozen at the start of each interval; by
Girsanov's theorem (AYS eq. 5-10) the KL divergence between the true reverse SDE and the solver's
linearised one is bounded by a sum of per-interval terms::

    KLUB = sum_k  int_{s_{k+1}}^{s_k} s^-3 E ||D~(x~_s, s) - D~(x~_{s_k}, s_k)||^2 ds

with ``(x~_s, x~_{s_k})`` two points of one forward-noising path: ``x~_s = x0 + s n``,
``x~_{s_k} = x~_s + sqrt(s_k^2 - s^2) n'``. (We keep Girsanov's factor 1/2, so the weight is
``s^-3``; the paper prints ``2 s^-3`` in eq. 8. Constant factors do not move the optimum.)

A multistep solver of order 2 (DPM-Solver++(2M), UniPC) approximates ``D~`` inside interval ``k``
by the line in ``lambda = -log s`` through its last two evaluations, at ``s_k`` and ``s_{k-1}``
(:attr:`KLUBEstimator.order` = 2): the same bound then holds for that solver's linearised SDE, and
each term depends on three points, so a coordinate update touches three intervals instead of two.

Estimator (AYS Sec. 3.3): fixed draws ``(x0, n, n', n'', u)`` per Monte Carlo sample (common random
numbers: every candidate interval sees the same draws), ``s`` importance-sampled by inverting the
CDF of a proposal density on the interval, each term reweighted by ``1 / density``. Proposals:

- ``"gaussian"`` (default): the exact integrand for Gaussian data of std ``c``, per dimension
  ``c^4 (1/(s^2 + c^2) - 1/(s_k^2 + c^2)) / s^3`` (derived from the forward path above; a zero-
  variance proposal for such data);
- ``"paper"``: AYS eq. 15, ``(1/(s^2 + c^2) - 1/(s_k^2 + c^2))^2 / s^3`` (its Lemma 3.3 writes the
  Gaussian integrand with that square; the forward-path expectation gives the first power).

Both are normalised numerically on a log-spaced grid; sampling uses the piecewise-constant density
of that grid, and the weights use the same density, so the estimator is unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.denoiser import Denoiser
from stepsearch.noise import FloatArray, NoiseSchedule

__all__ = [
    "PROPOSALS",
    "Interval",
    "KLUBDraws",
    "KLUBEstimator",
    "gaussian_klub_interval",
]

PROPOSALS = ("gaussian", "paper")

_GRID_POINTS = 513


@dataclass(frozen=True)
class Interval:
    """One interval of a schedule in k-diffusion sigma: from ``upper`` down to ``lower``;
    ``previous`` (> ``upper``) is the evaluation before ``upper`` (used by order-2 terms)."""

    lower: float
    upper: float
    previous: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.lower < self.upper:
            raise ValueError(f"need 0 < lower < upper, got {self.lower!r}, {self.upper!r}")
        if self.previous is not None and not self.previous > self.upper:
            raise ValueError(f"previous {self.previous!r} must exceed upper {self.upper!r}")


def gaussian_klub_interval(lower: float, upper: float, c: float) -> float:
    """The exact first-order KLUB term per dimension for Gaussian data of std ``c`` and the ideal
    denoiser: ``int_lower^upper c^4 (1/(s^2 + c^2) - 1/(upper^2 + c^2)) s^-3 ds``."""
    c2 = c * c

    def antiderivative(s: float) -> float:  # of 1 / (s^3 (c^2 + s^2)), by partial fractions
        return -1.0 / (2 * c2 * s * s) - math.log(s) / c2**2 + math.log(c2 + s * s) / (2 * c2**2)

    first = antiderivative(upper) - antiderivative(lower)
    second = (0.5 / lower**2 - 0.5 / upper**2) / (c2 + upper * upper)
    return c2 * c2 * (first - second)


@dataclass(frozen=True)
class KLUBDraws:
    """The fixed random draws of the estimator (common random numbers across candidates).

    Row ``j``: the data sample ``x0[j]`` (index ``data_index[j]`` of the data set), three unit
    noises along its forward path and a stratified uniform ``u[j]`` that picks ``s`` in any interval.
    """

    x0: Tensor
    data_index: np.ndarray
    noise: Tensor
    noise_upper: Tensor
    noise_previous: Tensor
    u: FloatArray

    @property
    def num_samples(self) -> int:
        return int(self.u.size)

    @classmethod
    def draw(
        cls,
        data: Tensor,
        num_samples: int,
        seed: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KLUBDraws:
        """``num_samples`` rows from ``data`` (without replacement while it lasts), float64 draws
        from one seeded generator on the CPU, then moved to ``device`` / ``dtype``."""
        if isinstance(num_samples, bool) or int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be (N, ...) with N >= 1, got shape {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or Inf")
        count = int(num_samples)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4B4C5542]))
        repeats = math.ceil(count / data.shape[0])
        index = np.concatenate([rng.permutation(data.shape[0]) for _ in range(repeats)])[:count]
        strata = rng.permutation(count)
        u = (strata + rng.uniform(0.0, 1.0, count)) / count
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        shape = (count, *data.shape[1:])
        noises = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]

        def put(tensor: Tensor) -> Tensor:
            return tensor.to(device=device, dtype=dtype)

        x0 = data.detach().to("cpu", torch.float64)[torch.from_numpy(index)]
        return cls(put(x0), index, *(put(n) for n in noises), u)


class KLUBEstimator:
    """Monte Carlo KLUB terms of intervals for one denoiser and one data set (module docstring).

    Args:
        denoiser: ``(x, t) -> x0_hat`` on ``denoiser.noise`` (per-sample ``t`` tensors allowed).
        data: real samples ``(N, ...)`` in the space the denoiser works in (latents for a latent
            model: see :func:`~stepsearch.models.pipeline.encode_images`).
        conditioned: for conditional data, the denoiser of a batch of data indices (e.g.
            :meth:`SampleSource.denoiser <stepsearch.models.source.SampleSource.denoiser>` of a
            pipeline whose prompt ``i`` describes ``data[i]``): every row is denoised conditioned
            on its own data sample's prompt or label, as in the paper's text-to-image setup.
            ``None``: ``denoiser`` for every row.
        num_samples: Monte Carlo samples per interval (the paper used 8192 data samples).
        seed: seed of the fixed draws.
        order: 1 (stochastic DDIM, the paper's derivation) or 2 (multistep, see module docstring).
        sigma_data: ``c`` of the proposal (the paper uses 0.5).
        proposal: ``"gaussian"`` or ``"paper"``.
        batch_size: rows per denoiser call.
        device / dtype: where and in which dtype the denoiser is evaluated.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        data: Tensor,
        *,
        conditioned: Callable[[Sequence[int]], Denoiser] | None = None,
        num_samples: int = 1024,
        seed: int = 0,
        order: int = 1,
        sigma_data: float = 0.5,
        proposal: str = "gaussian",
        batch_size: int = 1024,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.denoiser = denoiser
        self.conditioned = conditioned
        self.noise: NoiseSchedule = denoiser.noise
        self.order = int(order)
        self.sigma_data = float(sigma_data)
        self.proposal = proposal
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.draws = KLUBDraws.draw(data, num_samples, seed, device=self.device, dtype=dtype)
        self.evaluations = 0
        """Denoiser rows evaluated so far (each term costs ``order + 1`` rows per sample)."""

    @property
    def reach(self) -> int:
        """How many points before an interval's upper end its term depends on (``order - 1``)."""
        return self.order - 1

    def describe(self) -> dict[str, Any]:
        return {
            "estimator": "klub",
            "order": self.order,
            "num_samples": self.draws.num_samples,
            "sigma_data": self.sigma_data,
            "proposal": self.proposal,
        }

    # proposal ----------------------------------------------------------------------------------
    def _proposal_density(self, s: FloatArray, upper: float) -> FloatArray:
        c2 = self.sigma_data**2
        difference = 1.0 / (s * s + c2) - 1.0 / (upper * upper + c2)
        shape = difference if self.proposal == "gaussian" else difference**2
        return np.maximum(shape, 0.0) / s**3

    def _sample_sigmas(self, interval: Interval) -> tuple[FloatArray, FloatArray]:
        """``(s, density)`` for every draw's ``u`` on ``interval`` (piecewise-constant proposal)."""
        grid = np.geomspace(interval.lower, interval.upper, _GRID_POINTS)
        values = self._proposal_density(grid, interval.upper)
        cells = 0.5 * (values[1:] + values[:-1]) * np.diff(grid)
        if not cells.sum() > 0:  # a degenerate proposal: fall back to log-uniform
            cells = np.diff(np.log(grid))
        cumulative = np.concatenate([[0.0], np.cumsum(cells)])
        cumulative /= cumulative[-1]
        u = self.draws.u
        cell = np.clip(np.searchsorted(cumulative, u, side="right") - 1, 0, cells.size - 1)
        mass = cumulative[cell + 1] - cumulative[cell]
        width = grid[cell + 1] - grid[cell]
        fraction = np.where(mass > 0, (u - cumulative[cell]) / np.where(mass > 0, mass, 1.0), 0.5)
        s = grid[cell] + np.clip(fraction, 0.0, 1.0) * width
        return np.clip(s, interval.lower, interval.upper), mass / width

    # estimation --------------------------------------------------------------------------------
    def _denoise_ve(self, x_ve: Tensor, sigmas: FloatArray, data_index: np.ndarray) -> Tensor:
        """``D~(x~, s) = D(alpha(t) x~, t)`` row by row, row ``r`` conditioned on data sample
        ``data_index[r]`` when the estimator is conditioned."""
        t = np.asarray(self.noise.t_from_kdiffusion_sigma(sigmas))
        alpha = torch.as_tensor(np.asarray(self.noise.alpha(t)), dtype=self.dtype)
        alpha = alpha.to(self.device).reshape(-1, *([1] * (x_ve.ndim - 1)))
        times = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        if self.conditioned is None:
            return self.denoiser(alpha * x_ve, times)
        return self.conditioned(data_index.tolist())(alpha * x_ve, times)

    def terms(self, intervals: Sequence[Interval]) -> FloatArray:
        """The KLUB term of each interval (mean over the fixed draws)."""
        intervals = list(intervals)
        if not intervals:
            return np.zeros(0)
        draws = self.draws
        m = draws.num_samples
        sampled = [self._sample_sigmas(interval) for interval in intervals]
        s = np.concatenate([pair[0] for pair in sampled])
        density = np.concatenate([pair[1] for pair in sampled])
        upper = np.repeat([iv.upper for iv in intervals], m)
        use_previous = self.order == 2
        previous = np.repeat(
            [iv.previous if use_previous and iv.previous else np.nan for iv in intervals], m
        )
        row = np.tile(np.arange(m), len(intervals))
        values = np.empty(s.size)
        for start in range(0, s.size, self.batch_size):
            chunk = slice(start, min(start + self.batch_size, s.size))
            values[chunk] = self._chunk(row[chunk], s[chunk], upper[chunk], previous[chunk])
        weighted = values / s**3 / density
        return weighted.reshape(len(intervals), m).mean(axis=1)

    def _chunk(
        self, row: np.ndarray, s: FloatArray, upper: FloatArray, previous: FloatArray
    ) -> FloatArray:
        draws = self.draws
        index = torch.as_tensor(row, device=self.device)
        shape = (-1, *([1] * (draws.x0.ndim - 1)))

        def column(values: FloatArray) -> Tensor:
            return torch.as_tensor(values, dtype=self.dtype, device=self.device).reshape(shape)

        x_s = draws.x0[index] + column(s) * draws.noise[index]
        x_upper = x_s + column(np.sqrt(np.maximum(upper**2 - s**2, 0.0))) * draws.noise_upper[index]
        has_previous = ~np.isnan(previous)
        inputs = [x_s, x_upper]
        sigmas = [s, upper]
        if has_previous.any():
            rise = np.sqrt(np.maximum(np.where(has_previous, previous, upper) ** 2 - upper**2, 0.0))
            inputs.append(x_upper + column(rise) * draws.noise_previous[index])
            sigmas.append(np.where(has_previous, previous, upper))
        data_index = np.tile(draws.data_index[row], len(inputs))
        with torch.inference_mode():
            denoised = self._denoise_ve(torch.cat(inputs), np.concatenate(sigmas), data_index)
        self.evaluations += int(denoised.shape[0])
        parts = denoised.double().split(s.size)
        frozen = parts[1]
        if len(parts) == 3:  # order 2: the line in lambda = -log s through (s_prev, s_upper)
            span = np.log(np.where(has_previous, previous, 2.0 * upper) / upper)
            slope = np.where(has_previous, np.log(upper / s) / span, 0.0)
            frozen = parts[1] + torch.as_tensor(slope, device=self.device).reshape(shape) * (
                parts[1] - parts[2]
            )
        difference = (parts[0] - frozen).reshape(s.size, -1)
        return (difference * difference).sum(dim=1).cpu().numpy()

    def total(self, sigmas: Sequence[float]) -> float:
        """The KLUB of a decreasing list of noisy sigmas (no zero)."""
        return float(self.terms(intervals_of(sigmas, self.order)).sum())


def intervals_of(sigmas: Sequence[float], order: int = 1) -> list[Interval]:
    """The intervals of decreasing noisy ``sigmas``: ``(sigmas[k+1], sigmas[k], sigmas[k-1])``."""
    values = [float(v) for v in sigmas]
    return [
        Interval(values[k + 1], values[k], values[k - 1] if order == 2 and k > 0 else None)
        for k in range(len(values) - 1)
    ]
