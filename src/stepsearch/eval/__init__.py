"""Evaluation metrics: FID / KID / CLIP score and error against reference ODE solutions.

Importing this package is light: transformers and torchmetrics are imported only when a CLIP model
is loaded or a comparison is made.
"""

from stepsearch.eval.clip_score import ClipScorer, clip_score, torchmetrics_clip_loader
from stepsearch.eval.features import (
    ClipFeatures,
    InceptionFeatures,
    ensure_features,
    find_inception_weights,
    load_clip,
    to_uint8_levels,
)
from stepsearch.eval.fid import (
    FeatureStatistics,
    compute_fid,
    compute_kid,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
)
from stepsearch.eval.scoring import FeatureReference, distance_scores
from stepsearch.eval.trajectory import per_sample_rms_error, trajectory_error

__all__ = [
    "ClipFeatures",
    "ClipScorer",
    "FeatureReference",
    "FeatureStatistics",
    "InceptionFeatures",
    "clip_score",
    "compute_fid",
    "compute_kid",
    "distance_scores",
    "ensure_features",
    "feature_statistics",
    "fid_from_features",
    "find_inception_weights",
    "frechet_distance",
    "kernel_inception_distance",
    "load_clip",
    "per_sample_rms_error",
    "to_uint8_levels",
    "torchmetrics_clip_loader",
    "trajectory_error",
]
