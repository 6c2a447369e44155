"""Error of few-step samples against reference ODE solutions started from the same noise.

With the noise fixed, a deterministic sampler is a map noise -> sample; its distance to an accurate
solve of the same probability-flow ODE (a many-step high-order solver, or the exact solution on a
test bed) measures discretization error without the sampling noise of FID. This is the objective of
GITS / OLSS / LD3-style schedule searches; FID stays the final judge.

A few trajectories can jump to another mode (another mixture component, another digit) under a
coarse schedule; their huge error would dominate a mean, so the default reduction is the median of
the per-sample errors (see REFERENCES.md, Gaussian-mixture test bed).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = ["per_sample_rms_error", "trajectory_error"]

Reduction = Literal["median", "mean", "rms"]


def per_sample_rms_error(
    samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """``e_i = sqrt(mean_j (samples[i, j] - reference[i, j])²)`` over all non-batch dims, float64.

    Both inputs have the same shape ``(N, ...)``, row ``i`` started from the same noise. A
    non-finite sample (a diverged solve) gets error ``+inf``, never NaN, so that it ranks last.
    """
    samples_t = torch.as_tensor(samples).detach()
    reference_t = torch.as_tensor(reference).detach()
    if samples_t.shape != reference_t.shape:
        raise ValueError(
            f"samples and reference shapes differ: {tuple(samples_t.shape)} vs "
            f"{tuple(reference_t.shape)}"
        )
    if samples_t.ndim < 1 or samples_t.shape[0] < 1:
        raise ValueError(f"need a batch (N, ...) with N >= 1, got shape {tuple(samples_t.shape)}")
    if not torch.isfinite(reference_t).all():
        raise ValueError("reference contains NaN or inf")
    diff = samples_t.to("cpu", torch.float64) - reference_t.to("cpu", torch.float64)
    diff = diff.reshape(diff.shape[0], -1)
    errors = diff.square().mean(dim=1).sqrt()
    return torch.where(torch.isfinite(errors), errors, torch.full_like(errors, float("inf")))


def trajectory_error(
    samples: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    reduction: Reduction = "median",
) -> float:
    """Reduce the per-sample RMS errors (:func:`per_sample_rms_error`) to one number.

    ``"median"`` (default; robust to a few trajectories that change mode), ``"mean"``, or ``"rms"``
    (``sqrt(mean_i e_i²)``, the RMS over all elements). Diverged samples count as ``+inf``.
    """
    errors = per_sample_rms_error(samples, reference)
    if reduction == "median":
        # torch.median returns the lower middle value for even N; take the usual midpoint instead.
        return float(np.median(errors.numpy()))
    if reduction == "mean":
        return float(errors.mean())
    if reduction == "rms":
        return float(errors.square().mean().sqrt())
    raise ValueError(f"reduction must be 'median', 'mean' or 'rms', got {reduction!r}")
