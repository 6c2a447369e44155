"""Fréchet distance (FID) and kernel distance (KID) between feature sets, in float64.

FID (Heusel et al., NeurIPS 2017): fit a Gaussian to each feature set and take

    d² = ||mu_a - mu_b||² + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2)).

The trace term is computed from eigenvalues of the symmetric positive semi-definite matrix
``sigma_a^(1/2) sigma_b sigma_a^(1/2)`` (same spectrum as ``sigma_a sigma_b``), clipped at 0, which
stays real and accurate when the covariances are singular (fewer samples than features), where
``scipy.linalg.sqrtm`` returns complex parts.

KID (Bińkowski et al., ICLR 2018, "Demystifying MMD GANs"): the unbiased estimator of the squared
MMD with the polynomial kernel ``k(x, y) = (gamma x·y + coef0)^degree``, ``gamma = 1/F``, averaged
over random subsets, as in clean-fid and torchmetrics.

Statistics files are ``.npz`` with arrays ``mu`` (F,), ``sigma`` (F, F) and optionally ``n``: the
layout of clean-fid's and EDM's reference statistics, which therefore load directly (``n=None``).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepsearch._io import atomic_write_bytes
from stepsearch.eval.features import ImageBatches, ensure_features

__all__ = [
    "ExtrapolatedDistance",
    "FeatureStatistics",
    "compute_fid",
    "compute_kid",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "frechet_distance_infinity",
    "kernel_inception_distance",
]


def _as_features(features: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F), got {array.shape}")
    bad_rows = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
    if bad_rows:
        raise ValueError(f"{name} contain NaN or inf in {bad_rows} of {array.shape[0]} rows")
    return array


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """Mean and covariance of a feature set: ``mu`` float64 (F,), ``sigma`` float64 (F, F).

    ``sigma`` is the unbiased sample covariance (divisor ``n - 1``), as in clean-fid, torchmetrics
    and the TF reference; ``n`` is the number of samples (``None`` when unknown, e.g. a file made
    elsewhere). Construction validates shapes, finiteness and symmetry.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self) -> None:
        mu = np.array(self.mu, dtype=np.float64)
        sigma = np.array(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or mu.shape[0] < 1:
            raise ValueError(f"mu must have shape (F,), got {mu.shape}")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"sigma must have shape {(mu.shape[0],) * 2}, got {sigma.shape}")
        if not np.isfinite(mu).all():
            raise ValueError(f"mu has {int(np.count_nonzero(~np.isfinite(mu)))} non-finite values")
        if not np.isfinite(sigma).all():
            count = int(np.count_nonzero(~np.isfinite(sigma)))
            raise ValueError(f"sigma has {count} non-finite values")
        scale = float(np.abs(sigma).max(initial=0.0))
        if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * scale:
            raise ValueError("sigma is not symmetric")
        if self.n is not None and (isinstance(self.n, bool) or int(self.n) != self.n or self.n < 2):
            raise ValueError(f"n must be an integer >= 2 or None, got {self.n!r}")
        mu.setflags(write=False)
        sigma.setflags(write=False)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", None if self.n is None else int(self.n))

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStatistics:
        """Sample mean and unbiased covariance of ``features`` (N, F), N >= 2, in float64."""
        array = _as_features(features)
        if array.shape[0] < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {array.shape[0]}")
        mu = array.mean(axis=0)
        centered = array - mu
        sigma = centered.T @ centered / (array.shape[0] - 1)
        return cls(mu=mu, sigma=sigma, n=array.shape[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``mu``, ``sigma`` (and ``n``) to an ``.npz`` file atomically (temp + rename)."""
        buffer = io.BytesIO()
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n, dtype=np.int64)
        np.savez(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStatistics:
        """Read statistics saved by :meth:`save` (or by clean-fid / EDM: ``mu``, ``sigma``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an ``.npz`` of plain arrays, keys missing, bad shapes or values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics file '{path}' does not exist")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: not a readable .npz file ({error})") from error
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: expected an .npz archive with 'mu' and 'sigma'")
        with loaded:
            missing = {"mu", "sigma"} - set(loaded.files)
            if missing:
                raise ValueError(
                    f"{path}: missing arrays {sorted(missing)} (found {sorted(loaded.files)})"
                )
            try:
                mu, sigma = loaded["mu"], loaded["sigma"]
                n = loaded["n"] if "n" in loaded.files else None
            except (ValueError, OSError, zipfile.BadZipFile) as error:  # object arrays need pickle
                raise ValueError(f"{path}: unreadable array ({error})") from error
        if n is not None:
            if n.shape != () or n.dtype.kind not in "iu":
                raise ValueError(f"{path}: 'n' must be an integer scalar, got {n.dtype} {n.shape}")
            n = int(n)
        try:
            return cls(mu=mu, sigma=sigma, n=n)
        except ValueError as error:
            raise ValueError(f"{path}: invalid feature statistics: {error}") from error


def _clip_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero eigenvalues indistinguishable from round-off (``<= F · eps · max|λ|``, the
    ``numpy.linalg.matrix_rank`` tolerance). Their square roots (~``sqrt(eps)``, not ~``eps``)
    would otherwise bias the trace term when covariances are singular (N <= F)."""
    tolerance = eigenvalues.shape[0] * np.finfo(np.float64).eps * np.abs(eigenvalues).max()
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(_clip_roundoff(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """``tr((sigma_a sigma_b)^(1/2))`` as the sum of square roots of the eigenvalues of the
    symmetric PSD ``sigma_a^½ sigma_b sigma_a^½`` (similar to ``sigma_a sigma_b``)."""
    sqrt_a = _sqrt_psd(np.asarray(sigma_a, dtype=np.float64))
    middle = sqrt_a @ np.asarray(sigma_b, dtype=np.float64) @ sqrt_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(_clip_roundoff(eigenvalues)).sum())


def frechet_distance(stats_a: FeatureStatistics, stats_b: FeatureStatistics) -> float:
    """Squared Fréchet distance between Gaussians ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)``.

    ``||mu_a - mu_b||² + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^½)`` (Dowson &
    Landau 1982; FID, Heusel et al. 2017), float64, trace term from eigenvalues (module docstring).
    Round-off below zero is returned as 0.
    """
    if stats_a.num_features != stats_b.num_features:
        raise ValueError(
            f"feature dimensions differ: {stats_a.num_features} vs {stats_b.num_features}"
        )
    diff = stats_a.mu - stats_b.mu
    trace_term = trace_sqrt_product(stats_a.sigma, stats_b.sigma)
    distance = (
        float(diff @ diff)
        + float(np.trace(stats_a.sigma))
        + float(np.trace(stats_b.sigma))
        - 2.0 * trace_term
    )
    return max(distance, 0.0)


@dataclass(frozen=True)
class ExtrapolatedDistance:
    """FD extrapolated to infinitely many samples (:func:`frechet_distance_infinity`).

    ``value`` is the intercept of the least-squares line ``FD(n) = value + slope / n`` through
    the FD of random subsets of ``sizes`` samples (``distances``, one mean per size); ``std`` its
    standard error from the fit's residuals; ``at_full`` the plain FD of all samples.
    """

    value: float
    std: float
    slope: float
    at_full: float
    sizes: tuple[int, ...]
    distances: tuple[float, ...]


def frechet_distance_infinity(
    features: np.ndarray | torch.Tensor,
    reference: FeatureStatistics,
    *,
    points: int = 8,
    draws: int = 4,
    smallest: float = 0.25,
    seed: int = 0,
) -> ExtrapolatedDistance:
    """The Fréchet distance of ``features`` (N, F) to ``reference`` without its small-sample bias.

    The plain FD of N samples overestimates the distribution's FD by roughly ``c / N`` (the
    sample covariance's error enters the trace term; Chong & Forsyth, CVPR 2020, "Effectively
    Unbiased FID and Inception Score and where to find them", FID_inf): on the bundled digits
    model (64 features) ``c`` is ~1e4, so at 1,000 samples every FD carries ~+9 and ratios of two
    FDs shrink towards 1. Here the FD of random subsets of ``points`` sizes from
    ``smallest * N`` to ``N`` (``draws`` subsets each, seeded by ``seed``, without replacement)
    is fitted by ``value + slope / n`` in float64 and the intercept returned. The reference's own
    finite-sample error (its statistics are fixed) is not removed: it is the same for every
    candidate.

    Raises:
        ValueError: fewer than 2 points, a ``smallest`` outside (0, 1), or too few samples for
            ``points`` distinct subset sizes of at least F + 2 samples.
    """
    array = _as_features(features)
    if points < 2 or draws < 1:
        raise ValueError(f"points must be >= 2 and draws >= 1, got {points} and {draws}")
    if not 0.0 < smallest < 1.0:
        raise ValueError(f"smallest must be in (0, 1), got {smallest}")
    count, dim = array.shape
    low = max(math.ceil(smallest * count), dim + 2)
    sizes = tuple(sorted({round(n) for n in np.linspace(low, count, points)}))
    if len(sizes) < 2 or low >= count:
        raise ValueError(
            f"{count} samples of {dim} features are too few to extrapolate the FD "
            f"(need subsets of {dim + 2} to {count} samples at {points} sizes)"
        )
    rng = np.random.default_rng(seed)
    distances = []
    for size in sizes:
        repeats = 1 if size == count else draws
        values = [
            frechet_distance(
                FeatureStatistics.from_features(array[rng.choice(count, size, replace=False)]),
                reference,
            )
            for _ in range(repeats)
        ]
        distances.append(float(np.mean(values)))
    design = np.stack([np.ones(len(sizes)), 1.0 / np.asarray(sizes, dtype=np.float64)], axis=1)
    target = np.asarray(distances, dtype=np.float64)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ solution
    dof = max(len(sizes) - 2, 1)
    covariance = np.linalg.inv(design.T @ design) * float(residual @ residual) / dof
    return ExtrapolatedDistance(
        value=float(solution[0]),
        std=float(np.sqrt(max(covariance[0, 0], 0.0))),
        slope=float(solution[1]),
        at_full=distances[-1],
        sizes=sizes,
        distances=tuple(distances),
    )


def fid_from_features(
    features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor
) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``(N_a, F)``, ``(N_b, F)``."""
    return frechet_distance(
        FeatureStatistics.from_features(features_a), FeatureStatistics.from_features(features_b)
    )


def _polynomial_mmd2_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float
) -> float:
    m = x.shape[0]
    k_xx = (gamma * (x @ x.T) + coef0) ** degree
    k_yy = (gamma * (y @ y.T) + coef0) ** degree
    k_xy = (gamma * (x @ y.T) + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation over ``subsets`` of the unbiased squared MMD.

    Each subset draws ``m = min(subset_size, N_a, N_b)`` rows of each set without replacement
    (clean-fid clamps the same way; torchmetrics raises instead) and computes

        MMD²_u = [Σ_{i≠j} k(a_i, a_j) + Σ_{i≠j} k(b_i, b_j)] / (m (m - 1)) - 2 Σ_{i,j} k(a_i, b_j) / m²

    with ``k(x, y) = (gamma x·y + coef0)^degree``, ``gamma = 1/F`` by default (Bińkowski et al.,
    ICLR 2018). The standard deviation is the population one (``ddof=0``), as torchmetrics reports.
    The estimate can be negative when the sets come from the same distribution. Float64, seeded.
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1 or degree < 1:
        raise ValueError(f"subsets and degree must be >= 1, got {subsets} and {degree}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"need at least 2 samples per subset, got {m}")
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for index in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[index] = _polynomial_mmd2_unbiased(x, y, degree, gamma, coef0)
    return float(values.mean()), float(values.std())


def feature_statistics(
    images: ImageBatches, extractor: nn.Module, *, batch_size: int = 250, progress: bool = True
) -> FeatureStatistics:
    """Extract features of ``images`` (see :func:`ensure_features`) and fit their Gaussian."""
    return FeatureStatistics.from_features(
        ensure_features(images, extractor, batch_size, progress, desc="FID features")
    )


def compute_fid(
    samples: ImageBatches,
    reference: ImageBatches | FeatureStatistics,
    extractor: nn.Module,
    *,
    batch_size: int = 250,
    progress: bool = True,
) -> float:
    """FID between generated ``samples`` and ``reference`` images or precomputed statistics.

    Reference statistics must come from the same extractor (and, for Inception, the same resize
    mode); FID at small N is biased, so compare numbers only at equal N (see REFERENCES.md).
    """
    if not isinstance(reference, FeatureStatistics):
        reference = feature_statistics(
            reference, extractor, batch_size=batch_size, progress=progress
        )
    sample_stats = feature_statistics(samples, extractor, batch_size=batch_size, progress=progress)
    return frechet_distance(sample_stats, reference)


def compute_kid(
    samples: ImageBatches,
    reference: ImageBatches,
    extractor: nn.Module,
    *,
    batch_size: int = 250,
    progress: bool = True,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std) between generated ``samples`` and ``reference`` images via ``extractor``."""
    sample_features = ensure_features(samples, extractor, batch_size, progress, desc="KID features")
    reference_features = ensure_features(
        reference, extractor, batch_size, progress, desc="KID features"
    )
    return kernel_inception_distance(
        sample_features, reference_features, subsets=subsets, subset_size=subset_size, seed=seed
    )
