"""The one Fréchet / kernel distance scorer: what ``fd``, ``fid`` and ``kid`` mean everywhere
(the evaluation harness, :func:`~stepsearch.eval.experiment.run_experiment`, and the search
objective, :class:`~stepsearch.eval.objective.Objective`).

A :class:`FeatureReference` is what samples are compared with: a feature extractor, the reference
statistics in its feature space and, when made from images, the reference features (KID needs
them; an ``.npz`` holds only the mean and covariance). :func:`distance_scores` scores samples
against one reference per metric:

- samples are made finite first (clamped to ``[-1e4, 1e4]``, NaN -> 0), and their features
  extracted once per extractor;
- ``fd`` / ``fid``: the Fréchet distance of the samples' statistics to the reference statistics;
  its standard error by a bootstrap over samples when asked (``bootstrap`` resamples);
- ``kid``: KID x 1e3, mean and standard deviation over :data:`KID_SUBSETS` subsets of up to
  :data:`KID_SUBSET_SIZE` samples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import FeatureStatistics, frechet_distance, kernel_inception_distance
from stepsearch.eval.images import iter_image_batches

__all__ = [
    "DISTANCE_METRICS",
    "KID_SCALE",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "FeatureReference",
    "bootstrap_std",
    "distance_scores",
    "finite_samples",
]

DISTANCE_METRICS = ("fd", "fid", "kid")
"""Metrics :func:`distance_scores` computes."""

KID_SUBSETS = 50
"""KID subsets."""

KID_SUBSET_SIZE = 500
"""Samples per KID subset (fewer when fewer samples or reference features exist)."""

KID_SCALE = 1e3
"""KID is reported x 1e3."""

_CLAMP = 1e4


def finite_samples(samples: Tensor) -> Tensor:
    """Samples clamped to ``[-1e4, 1e4]`` with NaN set to 0 (what every distance scores)."""
    return samples.clamp(-_CLAMP, _CLAMP).nan_to_num(0.0)


def bootstrap_std(
    values: np.ndarray, statistic: Any, resamples: int, seed: int = 0
) -> float | None:
    """Standard deviation of ``statistic`` over bootstrap resamples of ``values`` (rows)."""
    if resamples < 2 or len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)]
    finite = np.asarray([s for s in stats if math.isfinite(s)])
    return float(finite.std(ddof=1)) if finite.size >= 2 else None


@dataclass(frozen=True, eq=False)
class FeatureReference:
    """What ``fd`` / ``fid`` / ``kid`` compare samples with (module docstring)."""

    extractor: nn.Module
    statistics: FeatureStatistics
    features: np.ndarray | None = None
    source: str = ""

    @classmethod
    def from_features(
        cls, extractor: nn.Module, features: np.ndarray, source: str = "features"
    ) -> FeatureReference:
        """A reference from features already extracted by ``extractor``."""
        return cls(extractor, FeatureStatistics.from_features(features), features, source)

    @classmethod
    def from_images(
        cls,
        extractor: nn.Module,
        images: Tensor | Iterator[Tensor],
        *,
        batch_size: int = 250,
        progress: bool = False,
        source: str = "images",
    ) -> FeatureReference:
        """Features and statistics of ``images`` (a tensor or an iterable of batches)."""
        features = ensure_features(
            images, extractor, batch_size, progress, desc="reference features"
        )
        return cls.from_features(extractor, features, source)

    @classmethod
    def load(
        cls,
        extractor: nn.Module,
        source: str | os.PathLike[str],
        *,
        batch_size: int = 250,
        progress: bool = True,
    ) -> FeatureReference:
        """From an ``.npz`` of statistics (:meth:`FeatureStatistics.save`, ``stepsearch stats``,
        clean-fid / EDM files) or from reference images (see :func:`iter_image_batches`).

        Raises:
            FileNotFoundError: ``source`` does not exist.
            ValueError: unreadable file, no images, or statistics of another feature dimension.
        """
        path = Path(source)
        if path.suffix == ".npz":
            statistics = FeatureStatistics.load(path)
            expected = getattr(extractor, "num_features", None)
            if expected is not None and statistics.num_features != int(expected):
                raise ValueError(
                    f"{path}: statistics of {statistics.num_features} features, but the feature "
                    f"extractor gives {int(expected)} (made with another extractor?)"
                )
            return cls(extractor, statistics, None, str(path))
        batches = iter_image_batches(path, batch_size, progress)
        return cls.from_images(extractor, batches, batch_size=batch_size, source=str(path))

    def distance(
        self, metric: str, features: np.ndarray, *, bootstrap: int = 0
    ) -> tuple[float, float | None]:
        """``(value, std)`` of ``metric`` (``fd`` / ``fid`` / ``kid``) for sample ``features``
        extracted by :attr:`extractor`."""
        if metric == "kid":
            if self.features is None:
                raise ValueError(
                    f"kid needs reference features, not only statistics ({self.source})"
                )
            mean, std = kernel_inception_distance(
                features,
                self.features,
                subsets=KID_SUBSETS,
                subset_size=min(KID_SUBSET_SIZE, len(features), len(self.features)),
            )
            return mean * KID_SCALE, std * KID_SCALE
        if metric not in DISTANCE_METRICS:
            raise ValueError(f"not a distance metric: {metric!r}")

        def fd(rows: np.ndarray) -> float:
            return frechet_distance(FeatureStatistics.from_features(rows), self.statistics)

        return fd(features), bootstrap_std(features, fd, bootstrap) if bootstrap else None


def distance_scores(
    samples: Tensor, references: Mapping[str, FeatureReference], *, bootstrap: int = 0
) -> dict[str, tuple[float, float | None]]:
    """``{metric: (value, std)}`` of ``samples`` against each metric's reference (module
    docstring); features are extracted once per extractor. ``bootstrap``: resamples for the
    standard error of ``fd`` / ``fid`` (0: ``None``)."""
    finite = finite_samples(samples)
    features_by_extractor: dict[int, np.ndarray] = {}
    scores: dict[str, tuple[float, float | None]] = {}
    for metric, reference in references.items():
        key = id(reference.extractor)
        if key not in features_by_extractor:
            features_by_extractor[key] = ensure_features(
                finite, reference.extractor, progress=False
            )
        scores[metric] = reference.distance(metric, features_by_extractor[key], bootstrap=bootstrap)
    return scores
