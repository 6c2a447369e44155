"""S³'s learned predictor: a small network that ranks solver plans from their per-step features.

The S³ paper (Liu, Ning, Yang & Wang, ICLR 2024) guides its evolutionary search with a light
predictor trained on the plans evaluated so far; it is not published. This one follows the same
authors' OMS-DPM predictor (per-step embedding -> recurrent encoder -> mean pool -> MLP -> a
score) trained with a pairwise hinge ranking loss: for every pair of evaluated plans whose
standardized log scores differ by more than ``pair_threshold``, the better plan's predicted score
must be below the worse one's by ``margin``. Only the order matters (lower is better).

Training is a pure function of its inputs: the weights are initialised from ``seed`` in a forked
random state, the data keep their given order, full-batch Adam runs on one thread in float32, so
every worker of a shared study (and a resumed run) retrains the identical predictor from the
stored trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor, nn

__all__ = ["PlanPredictor", "PredictorSettings", "ranking_agreement", "train_predictor"]


@dataclass(frozen=True)
class PredictorSettings:
    """The predictor's size and training (defaults: fast on a CPU core for a few hundred
    plans)."""

    hidden: int = 64
    epochs: int = 150
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    margin: float = 0.1
    pair_threshold: float = 0.05

    def to_json_dict(self) -> dict[str, float | int]:
        return {
            "hidden": self.hidden,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "margin": self.margin,
            "pair_threshold": self.pair_threshold,
        }


class PlanPredictor(nn.Module):
    """Per-step features -> a GRU -> the mean over the plan's steps -> an MLP -> one score."""

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, steps: Tensor, mask: Tensor) -> Tensor:
        """Scores of a padded batch ``steps`` ``[B, L, F]`` with ``mask`` ``[B, L]`` (1 on real
        steps); padding comes after the real steps, so it never reaches them through the GRU."""
        encoded, _ = self.encoder(self.embed(steps))
        weights = mask.unsqueeze(-1)
        pooled = (encoded * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def scores(self, plans: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted scores (lower is better) of plans given as per-step feature arrays."""
        if not plans:
            return np.zeros(0, dtype=np.float64)
        with _one_thread():
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
    (lower is better; non-finite values rank last) with the pairwise hinge loss (module
    docstring). Deterministic in its arguments."""
    settings = settings or PredictorSettings()
    if len(plans) != len(values) or not plans:
        raise ValueError("train_predictor needs as many values as plans, and at least one")
    targets = _standardized(values)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = PlanPredictor(int(plans[0].shape[1]), settings.hidden)
        steps, mask = _padded(plans)
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
            # for every pair (i worse, j better): score_j + margin <= score_i
            hinge = torch.relu(settings.margin - (score[:, None] - score[None, :]))
            loss = (hinge * pairs).sum() / count
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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread (reductions in one order: the same result on every machine
    size), restoring the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
