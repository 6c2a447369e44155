"""S³'s learned predictor: a small network that ranks solver plans from their per-step features.

The S³ paper (Liu, Ning, Yang & Wang, ICLR 2024) guides its evolutionary search with a light
predictor trained on the plans evaluated so far; it is not published. This one follows the same
authors' OMS-DPM predictor (per-step embedding -> recurrent encoder -> mean pool -> MLP -> a
score) trained with a pairwise ranking loss: for every pair of evaluated plans whose standardized
log scores differ by more than ``pair_threshold``, the better plan's predicted score should be the
lower one. Only the order matters (lower is better). The loss is RankNet's logistic
``log(1 + exp(-(s_worse - s_better)))`` by default, or OMS-DPM's hinge
``max(0, margin - (s_worse - s_better))``; the per-step features are standardized with the
training plans' mean and spread (kept in the model, applied to every plan it scores).

Why these two choices (``benchmarks/s3_predictor.py``, ``docs/s3.md``): trained on the stages
before it of a search without the predictor and asked to rank the next stage's children (plans
it never saw, the ones it screens in a search), the hinge loss on raw features ranked them at
Kendall's tau +0.39 (NFE 3) and +0.10 (NFE 5) on the digits model; standardized features with the
logistic loss at +0.55 and +0.21. S³ adds one more feature where the data allow, a plan's error on
a Gaussian mixture fitted to the data (:mod:`stepsearch.search.plan_proxy`): with it the predictor
ranked NFE 4 / 5 children at +0.58 / +0.52 (+0.39 / +0.21 without).

Training is a pure function of its inputs: the weights are initialised from ``seed`` in a forked
random state, the data keep their given order, full-batch Adam runs on one thread in float32, so
every worker of a shared study (and a resumed run) retrains the identical predictor from the
stored trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor, nn

from stepsearch._threads import one_thread

__all__ = [
    "LOSSES",
    "PlanPredictor",
    "PredictorSettings",
    "ranking_agreement",
    "train_predictor",
]

LOSSES = ("logistic", "hinge")
"""The pairwise ranking losses (module docstring)."""


@dataclass(frozen=True)
class PredictorSettings:
    """The predictor's size and training (defaults: fast on a CPU core for a few hundred
    plans)."""

    hidden: int = 64
    epochs: int = 150
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    margin: float = 0.1
    """The hinge loss's margin (unused by the logistic loss)."""
    pair_threshold: float = 0.05
    loss: str = "logistic"
    """``"logistic"`` (RankNet) or ``"hinge"`` (OMS-DPM)."""
    standardize: bool = True
    """Standardize every feature with the training plans' mean and standard deviation."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if isinstance(self.hidden, bool) or int(self.hidden) < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden!r}")
        if isinstance(self.epochs, bool) or int(self.epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs!r}")

    def to_json_dict(self) -> dict[str, float | int | str | bool]:
        return {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "margin": self.margin,
            "pair_threshold": self.pair_threshold,
            "loss": self.loss,
            "standardize": self.standardize,
        }


class PlanPredictor(nn.Module):
    """Per-step features (shifted by ``feature_mean`` and divided by ``feature_scale``, set by
    :func:`train_predictor`; 0 and 1 until then) -> a GRU -> the mean over the plan's steps -> an
    MLP -> one score."""

    feature_mean: Tensor
    feature_scale: Tensor

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(features))
        self.embed = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, steps: Tensor, mask: Tensor) -> Tensor:
        """Scores of a padded batch ``steps`` ``[B, L, F]`` with ``mask`` ``[B, L]`` (1 on real
        steps); padding comes after the real steps, so it never reaches them through the GRU."""
        normalized = (steps - self.feature_mean) / self.feature_scale
        encoded, _ = self.encoder(self.embed(normalized))
        weights = mask.unsqueeze(-1)
        pooled = (encoded * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def scores(self, plans: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted scores (lower is better) of plans given as per-step feature arrays."""
        if not plans:
            return np.zeros(0, dtype=np.float64)
        with one_thread():
            steps, mask = _padded(plans)
            return self(steps, mask).double().numpy()


def train_predictor(
    plans: Sequence[np.ndarray],
    values: Sequence[float],
    *,
    seed: int,
    settings: PredictorSettings | None = None,
) -> PlanPredictor:
    """A predictor trained to rank ``plans`` (per-step feature arrays) as their ``values``
    (lower is better; non-finite values rank last) with a pairwise ranking loss (module
    docstring). Deterministic in its arguments."""
    settings = settings or PredictorSettings()
    if len(plans) != len(values) or not plans:
        raise ValueError("train_predictor needs as many values as plans, and at least one")
    targets = _standardized(values)
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = PlanPredictor(int(plans[0].shape[1]), settings.hidden)
        steps, mask = _padded(plans)
        if settings.standardize:
            rows = torch.from_numpy(np.concatenate(plans).astype(np.float32))
            scale = rows.std(0, correction=0)
            model.feature_mean.copy_(rows.mean(0))
            model.feature_scale.copy_(torch.where(scale > 1e-6, scale, torch.ones_like(scale)))
        y = torch.as_tensor(targets, dtype=torch.float32)
        difference = y[:, None] - y[None, :]  # > 0 where j is better than i
        pairs = (difference > settings.pair_threshold).float()
        count = pairs.sum()
        if count == 0:
            return model.eval()
        optimizer = torch.optim.Adam(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        for _ in range(int(settings.epochs)):
            optimizer.zero_grad()
            score = model(steps, mask)
            # for every pair (i worse, j better): score_j below score_i
            gap = score[:, None] - score[None, :]
            if settings.loss == "hinge":
                per_pair = torch.relu(settings.margin - gap)
            else:
                per_pair = nn.functional.softplus(-gap)
            loss = (per_pair * pairs).sum() / count
            loss.backward()
            optimizer.step()
    return model.eval()


def ranking_agreement(predicted: Sequence[float], values: Sequence[float]) -> float:
    """Kendall's tau between predicted scores and true values (1: the same order)."""
    true = _standardized(values)
    tau = kendalltau(np.asarray(predicted, dtype=np.float64), true).statistic
    return float(tau) if tau is not None and math.isfinite(tau) else 0.0


def _standardized(values: Sequence[float]) -> np.ndarray:
    """``log`` of positive values (else the values), non-finite ones one unit above the worst,
    standardized to mean 0 and standard deviation 1."""
    raw = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(raw)
    if finite.any() and np.all(raw[finite] > 0):
        raw = np.where(finite, np.log(np.where(finite, raw, 1.0)), raw)
    if not finite.any():
        return np.zeros_like(raw)
    spread = float(np.std(raw[finite])) or 1.0
    worst = float(np.max(raw[finite])) + spread
    raw = np.where(finite, raw, worst)
    return (raw - raw.mean()) / (raw.std() or 1.0)


def _padded(plans: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    longest = max(p.shape[0] for p in plans)
    steps = np.zeros((len(plans), longest, plans[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(plans), longest), dtype=np.float32)
    for k, plan in enumerate(plans):
        steps[k, : plan.shape[0]] = plan
        mask[k, : plan.shape[0]] = 1.0
    return torch.from_numpy(steps), torch.from_numpy(mask)
