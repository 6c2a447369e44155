"""Solver plans: a step schedule plus the solver's choice at every step, as validated data.

A :class:`SolverPlan` of ``n`` steps holds a :class:`~stepsearch.schedule.StepSchedule` (its
``n + 1`` times, start and end included) and, for each step ``i`` (``t_i -> t_{i+1}``):

- ``orders[i]`` (1-3): the order of the multistep predictor, i.e. how many model outputs
  (``t_i`` and the ``orders[i] - 1`` before it) the update uses;
- ``predictions[i]``: ``"data"`` (expand the ``x0`` estimate: DPM-Solver++ / UniP) or ``"noise"``
  (expand the ``eps`` estimate: multistep DPM-Solver);
- ``correctors[i]``: ``"unipc"`` to refine the result of step ``i`` with UniC (Zhao et al. 2023)
  using the model output at ``t_{i+1}`` (the next step's evaluation, so no extra NFE), or
  ``"none"``.

This is the per-step search space of S3 / USF (Liu et al. 2024, arXiv 2312.07243) restricted to
multistep predictors. Every step costs one model evaluation, so a plan's NFE is ``n``. Rules a
plan must obey (checked, ``ValueError`` naming the step):

- warm-up: ``orders[i] <= i + 1`` (only ``i + 1`` model outputs exist at step ``i``);
- a step to clean data (``t = 0``) returns the ``x0`` estimate, so its order is 1;
- the last step has no corrector (no model evaluation follows it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepsearch._io import atomic_write_json, read_json
from stepsearch.schedule import StepSchedule

FORMAT_NAME = "stepsearch.SolverPlan"
FORMAT_VERSION = 1
ORDERS = (1, 2, 3)
PREDICTIONS = ("data", "noise")
CORRECTORS = ("none", "unipc")


@dataclass(frozen=True, eq=True)
class SolverPlan:
    """A step schedule with a per-step ``order``, ``prediction`` and ``corrector`` (see module).

    Sequences are stored as tuples; ``__post_init__`` validates everything.
    """

    schedule: StepSchedule
    orders: tuple[int, ...]
    predictions: tuple[str, ...]
    correctors: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, StepSchedule):
            raise ValueError(f"schedule must be a StepSchedule, got {type(self.schedule).__name__}")
        n = self.schedule.num_steps
        for name in ("orders", "predictions", "correctors"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"{name} must be a sequence of {n} entries, got {values!r}")
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} steps")
            object.__setattr__(self, name, tuple(values))
        object.__setattr__(
            self, "orders", tuple(_checked_order(i, o) for i, o in enumerate(self.orders))
        )
        clean_end = self.schedule.ends_clean
        for i in range(n):
            order, prediction, corrector = self.orders[i], self.predictions[i], self.correctors[i]
            if order > i + 1:
                raise ValueError(
                    f"step {i}: order {order} needs {order} model outputs, only {i + 1} exist "
                    "(warm-up)"
                )
            if prediction not in PREDICTIONS:
                raise ValueError(
                    f"step {i}: prediction must be one of {list(PREDICTIONS)}, got {prediction!r}"
                )
            if corrector not in CORRECTORS:
                raise ValueError(
                    f"step {i}: corrector must be one of {list(CORRECTORS)}, got {corrector!r}"
                )
        if clean_end and self.orders[-1] != 1:
            raise ValueError(
                f"step {n - 1}: the step to clean data (t = 0) returns the x0 estimate, so its "
                f"order must be 1, got {self.orders[-1]}"
            )
        if self.correctors[-1] != "none":
            raise ValueError(
                f"step {n - 1}: the last step cannot have a corrector (no evaluation follows)"
            )

    # derived ----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def nfe(self) -> int:
        """Model evaluations: one per step (the corrector reuses the next step's evaluation)."""
        return self.num_steps

    @classmethod
    def uniform(
        cls,
        schedule: StepSchedule,
        order: int,
        prediction: str = "data",
        corrector: str = "none",
        lower_order_final: bool = False,
    ) -> SolverPlan:
        """The plan of a fixed-order multistep solver: order ``min(order, i + 1)`` at step ``i``
        (1 at a clean end; ``lower_order_final``: at most ``n - i`` near the end), the same
        prediction everywhere and ``corrector`` on every step but the last."""
        n = schedule.num_steps
        orders = []
        for i in range(n):
            step_order = min(_checked_order(i, order), i + 1)
            if lower_order_final:
                step_order = min(step_order, n - i)
            if i == n - 1 and schedule.ends_clean:
                step_order = 1
            orders.append(step_order)
        return cls(schedule, tuple(orders), (prediction,) * n, (corrector,) * (n - 1) + ("none",))

    # JSON -------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "schedule": self.schedule.to_json_dict(),
            "orders": list(self.orders),
            "predictions": list(self.predictions),
            "correctors": list(self.correctors),
        }

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> SolverPlan:
        if not isinstance(payload, Mapping):
            raise ValueError("a solver plan file must hold a JSON object")
        if payload.get("format") != FORMAT_NAME:
            raise ValueError(
                f"not a solver plan: format is {payload.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = payload.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported solver plan version {version!r} "
                f"(this stepsearch reads version {FORMAT_VERSION})"
            )
        for key in ("schedule", "orders", "predictions", "correctors"):
            if key not in payload:
                raise ValueError(f"solver plan file lacks {key!r}")
        schedule = StepSchedule.from_json_dict(payload["schedule"])
        return cls(schedule, payload["orders"], payload["predictions"], payload["correctors"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as versioned JSON, atomically."""
        atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SolverPlan:
        """Read a plan written by :meth:`save`; bad content raises ``ValueError``."""
        try:
            return cls.from_json_dict(read_json(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _checked_order(step: int, order: Any) -> int:
    """An order in 1-3 (ints, or floats that are whole numbers; NaN / Inf / bools rejected)."""
    if isinstance(order, bool) or not isinstance(order, (int, float)):
        raise ValueError(f"step {step}: order must be an integer in {list(ORDERS)}, got {order!r}")
    if isinstance(order, float) and (not math.isfinite(order) or not order.is_integer()):
        raise ValueError(f"step {step}: order must be an integer in {list(ORDERS)}, got {order!r}")
    if int(order) not in ORDERS:
        raise ValueError(f"step {step}: order must be an integer in {list(ORDERS)}, got {order!r}")
    return int(order)
