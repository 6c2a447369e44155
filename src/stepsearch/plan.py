"""Solver plans: a step schedule plus the solver's choice at every step, as validated data.

A :class:`SolverPlan` of ``n`` steps holds a :class:`~stepsearch.schedule.StepSchedule` (its
``n + 1`` times, start and end included) and, for each step ``i`` (from ``s = t_i`` to
``t = t_{i+1}``, ``h = lambda_t - lambda_s``), the choices of S3's unified sampling framework
(USF; Liu, Ning, Yang & Wang, ICLR 2024, arXiv 2312.07243, Sec. 3):

- ``rules[i]``: how the step is computed.

  - ``"unipc"`` (version 1's only rule, the default): the multistep predictor of UniPC
    (Zhao et al. 2023; UniP-p for ``"data"``, which with ``B(h) = e^h - 1`` is DPM-Solver++(1 /
    2M / 3M)) or multistep DPM-Solver for ``"noise"``. Its order is 1-3 and it uses the last
    ``order - 1`` outputs; these are not the plain Taylor rule (2M's ``1 / (2 r)`` simplification).
  - ``"taylor"``: USF's unified step, the exponential-integrator Taylor expansion (USF eq. 6 / 7)::

        noise: x_t = (alpha_t / alpha_s) x_s - sum_{k=0}^{K-1} sigma_t h^{k+1} phi_{k+1}(h)  eps^(k)
        data:  x_t = (sigma_t / sigma_s) x_s + sum_{k=0}^{K-1} alpha_t h^{k+1} phi_{k+1}(-h) x0^(k)

    with ``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z`` and the
    derivatives (in ``lambda``, at ``s``) estimated from the chosen earlier points (below).

- ``orders[i]``: the order ``K`` (1-4 for ``"taylor"``, 1-3 for ``"unipc"``): the step uses the
  derivatives up to ``K - 1``. Bounded by the history: ``K - 1`` earlier model outputs must exist.
- ``predictions[i]``: ``"data"`` (expand the ``x0`` estimate) or ``"noise"`` (expand ``eps``).
- ``estimation_points[i]``: for ``"taylor"`` steps, which earlier points estimate the derivatives,
  as offsets back from ``i`` (``1`` is ``t_{i-1}``); ``m`` points, ``1 <= m <= K - 1``. The
  derivatives ``1 .. m`` solve the Taylor system ``f_j - f_s = sum_k (Delta lambda_j)^k / k!
  f^(k)`` (``T[k][j] = Delta lambda_j^k / k!``); with ``m < K - 1`` (an estimation order lower
  than the Taylor order) the terms beyond ``m`` are dropped. Every point must be a model
  evaluation (not an analytical first step). ``"unipc"`` steps always use ``1 .. K - 1``.
- ``relaxations[i]``: ``c`` of USF's first-derivative relaxation: the ``k = 1`` term is multiplied
  by ``(1 + c h)`` (finite; ``"taylor"`` only; 0 where the step has no first-derivative term).
- ``correctors[i]``: ``"none"``; ``"unipc"`` (UniC on a ``"unipc"`` step); ``"pseudo"`` (USF's
  pseudo-corrector on a ``"taylor"`` step: once the model has been evaluated at ``t_{i+1}``, the
  step is recomputed with that output appended as an estimation point, order ``K + 1``). Both reuse
  the evaluation the next step needs, so cost no NFE; never on the last step.

and one plan-wide choice, ``first_step`` (USF's analytical first step, which skips the network):

- ``"model"`` (default): step 0 evaluates the model at ``t_0``;
- ``"zero_x0"``: ``eps(x_T, t_0) := x_T`` in variance-preserving coordinates, i.e. ``eps :=
  x_T / sqrt(alpha_0^2 + sigma_0^2)`` (``x_T`` itself for VP schedules), and the ``x0`` estimate
  follows from ``x = alpha x0 + sigma eps``: ``x0 = alpha_0 x_T / (r (r + sigma_0))``, ``r =
  sqrt(alpha_0^2 + sigma_0^2)`` (~0 at high noise, 0 where ``alpha_0 = 0``);
- ``"data_mean"``: ``x0 := `` the data mean, which the plan does not store: the solver gets it at run
  time (``PlanSolver(data_mean=...)``, see :func:`stepsearch.solvers.plan_solver.data_mean_of`).

An analytical first step costs no model evaluation, so ``nfe`` is ``n - 1``; step 0 then has order
1 and ``t_0``'s estimate is no model output (no estimation point, no warm-up credit). Other rules
(checked, ``ValueError`` naming the step): a step to clean data (``t = 0``) returns the ``x0``
estimate, so its order is 1; the last step has no corrector.

JSON: version 2 writes every field; version-1 files (``orders`` 1-3, ``predictions``,
``correctors``) still load, with the defaults that reproduce them (rules ``"unipc"``, no
relaxation, ``first_step = "model"``).
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
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ORDERS = (1, 2, 3, 4)
UNIPC_ORDERS = (1, 2, 3)
PREDICTIONS = ("data", "noise")
RULES = ("unipc", "taylor")
CORRECTORS = ("none", "unipc", "pseudo")
FIRST_STEPS = ("model", "zero_x0", "data_mean")
RULE_CORRECTOR = {"unipc": "unipc", "taylor": "pseudo"}
"""The corrector each rule can take (besides ``"none"``)."""


@dataclass(frozen=True, eq=True)
class SolverPlan:
    """A step schedule with per-step ``order``, ``prediction``, ``corrector``, ``rule``,
    ``estimation_points`` and ``relaxation``, and the plan's ``first_step`` (see module).

    The first four sequences are version 1's; ``rules`` (default all ``"unipc"``),
    ``estimation_points`` (default: the last ``order - 1`` points) and ``relaxations`` (default 0)
    may be ``None``. Sequences are stored as tuples; ``__post_init__`` validates everything.
    """

    schedule: StepSchedule
    orders: tuple[int, ...]
    predictions: tuple[str, ...]
    correctors: tuple[str, ...]
    rules: tuple[str, ...] | None = None
    estimation_points: tuple[tuple[int, ...], ...] | None = None
    relaxations: tuple[float, ...] | None = None
    first_step: str = "model"

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, StepSchedule):
            raise ValueError(f"schedule must be a StepSchedule, got {type(self.schedule).__name__}")
        n = self.schedule.num_steps
        if self.rules is None:
            object.__setattr__(self, "rules", ("unipc",) * n)
        if self.relaxations is None:
            object.__setattr__(self, "relaxations", (0.0,) * n)
        for name in ("orders", "predictions", "correctors", "rules", "relaxations"):
            object.__setattr__(self, name, _sequence(name, getattr(self, name), n))
        if self.first_step not in FIRST_STEPS:
            raise ValueError(
                f"first_step must be one of {list(FIRST_STEPS)}, got {self.first_step!r}"
            )
        if self.analytical_first_step and n < 2:
            raise ValueError("an analytical first step needs at least 2 steps (else NFE 0)")
        object.__setattr__(
            self, "orders", tuple(_checked_order(i, o) for i, o in enumerate(self.orders))
        )
        object.__setattr__(
            self,
            "relaxations",
            tuple(_checked_relaxation(i, c) for i, c in enumerate(self.relaxations)),
        )
        for i in range(n):
            self._check_choices(i)
        points = self.estimation_points
        if points is None:
            points = tuple(tuple(range(1, order)) for order in self.orders)
        points = _sequence("estimation_points", points, n)
        object.__setattr__(
            self,
            "estimation_points",
            tuple(self._checked_points(i, p) for i, p in enumerate(points)),
        )
        for i in range(n):
            self._check_relaxation_applies(i)
        if self.schedule.ends_clean and self.orders[-1] != 1:
            raise ValueError(
                f"step {n - 1}: the step to clean data (t = 0) returns the x0 estimate, so its "
                f"order must be 1, got {self.orders[-1]}"
            )
        if self.correctors[-1] != "none":
            raise ValueError(
                f"step {n - 1}: the last step cannot have a corrector (no evaluation follows)"
            )

    def _check_choices(self, i: int) -> None:
        order, prediction = self.orders[i], self.predictions[i]
        rule, corrector = self.rules[i], self.correctors[i]
        if rule not in RULES:
            raise ValueError(f"step {i}: rule must be one of {list(RULES)}, got {rule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"step {i}: prediction must be one of {list(PREDICTIONS)}, got {prediction!r}"
            )
        if corrector not in CORRECTORS:
            raise ValueError(
                f"step {i}: corrector must be one of {list(CORRECTORS)}, got {corrector!r}"
            )
        if corrector != "none" and corrector != RULE_CORRECTOR[rule]:
            raise ValueError(
                f"step {i}: rule {rule!r} takes corrector 'none' or {RULE_CORRECTOR[rule]!r}, "
                f"got {corrector!r}"
            )
        if rule == "unipc" and order not in UNIPC_ORDERS:
            raise ValueError(
                f"step {i}: rule 'unipc' runs orders {list(UNIPC_ORDERS)}, got {order} "
                "(orders up to 4 need rule 'taylor')"
            )
        available = self.model_outputs_at(i)
        if order > max(available, 1):
            raise ValueError(
                f"step {i}: order {order} needs {order} model outputs, only {available} exist "
                + (
                    "(warm-up; the analytical first step is no model output)"
                    if self.analytical_first_step
                    else "(warm-up)"
                )
            )

    def _checked_points(self, i: int, points: Any) -> tuple[int, ...]:
        order, rule = self.orders[i], self.rules[i]
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
            raise ValueError(
                f"step {i}: estimation points must be a sequence of offsets, got {points!r}"
            )
        offsets = tuple(_checked_offset(i, p) for p in points)
        if rule == "unipc":
            implied = tuple(range(1, order))
            if offsets not in ((), implied):
                raise ValueError(
                    f"step {i}: rule 'unipc' estimates from the last {order - 1} points "
                    f"{list(implied)}, got {list(offsets)} (choose points with rule 'taylor')"
                )
            return implied
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"step {i}: estimation points repeat: {list(offsets)}")
        if order == 1 and offsets:
            raise ValueError(
                f"step {i}: order 1 uses no derivative, got estimation points {list(offsets)}"
            )
        if order > 1 and not 1 <= len(offsets) <= order - 1:
            raise ValueError(
                f"step {i}: order {order} takes 1 to {order - 1} estimation points, got "
                f"{list(offsets)}"
            )
        first = 1 if self.analytical_first_step else 0
        for offset in offsets:
            if i - offset < first:
                what = "the analytical first step" if i - offset == 0 else "before t_0"
                raise ValueError(
                    f"step {i}: estimation point {offset} (t_{i - offset}) is {what}, not a "
                    "previous model evaluation"
                )
        return tuple(sorted(offsets))

    def _check_relaxation_applies(self, i: int) -> None:
        relaxation = self.relaxations[i]
        if relaxation == 0.0:
            return
        if self.rules[i] != "taylor":
            raise ValueError(
                f"step {i}: relaxation applies to rule 'taylor' only, got "
                f"{relaxation!r} on rule {self.rules[i]!r}"
            )
        if self.orders[i] == 1 and self.correctors[i] == "none":
            raise ValueError(
                f"step {i}: relaxation {relaxation!r} on an order-1 step without "
                "corrector: there is no first-derivative term to relax"
            )

    # derived ----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def analytical_first_step(self) -> bool:
        """Whether step 0 skips the network (``first_step`` ``"zero_x0"`` / ``"data_mean"``)."""
        return self.first_step != "model"

    @property
    def nfe(self) -> int:
        """Model evaluations: one per step (correctors reuse the next step's evaluation), minus
        one with an analytical first step."""
        return self.num_steps - int(self.analytical_first_step)

    def model_outputs_at(self, i: int) -> int:
        """How many model outputs exist at step ``i`` (``t_i``'s included): ``i + 1``, or ``i``
        after an analytical first step."""
        return i + 1 - int(self.analytical_first_step)

    @property
    def lookback(self) -> int:
        """The furthest estimation point back from any step (0 for first-order plans)."""
        return max((max(p) for p in self.estimation_points if p), default=0)

    def extensions(self) -> list[str]:
        """The choices beyond a version-1 plan (``"taylor"`` steps, an analytical first step),
        as ``"step i: ..."`` phrases; empty for plans the multistep solvers can run."""
        found = [f"step {i}: rule 'taylor'" for i, rule in enumerate(self.rules) if rule != "unipc"]
        if self.analytical_first_step:
            found.insert(0, f"step 0: first_step {self.first_step!r}")
        return found

    @classmethod
    def uniform(
        cls,
        schedule: StepSchedule,
        order: int,
        prediction: str = "data",
        corrector: str = "none",
        lower_order_final: bool = False,
        *,
        rule: str = "unipc",
        relaxation: float = 0.0,
        first_step: str = "model",
    ) -> SolverPlan:
        """The plan of a fixed-order multistep solver: order ``min(order, outputs)`` at step ``i``
        (``outputs``: the model outputs there, :meth:`model_outputs_at`; 1 at a clean end;
        ``lower_order_final``: at most ``n - i`` near the end), the same prediction and rule
        everywhere (``"taylor"`` steps estimate from the last ``order - 1`` points), ``corrector``
        on every step but the last and ``relaxation`` where a first-derivative term exists."""
        n = schedule.num_steps
        analytical = first_step != "model"
        orders = []
        for i in range(n):
            step_order = min(_checked_order(i, order), max(i + 1 - int(analytical), 1))
            if lower_order_final:
                step_order = min(step_order, n - i)
            if i == n - 1 and schedule.ends_clean:
                step_order = 1
            orders.append(step_order)
        correctors = (corrector,) * (n - 1) + ("none",)
        relaxations = tuple(
            relaxation if (o > 1 or c != "none") else 0.0
            for o, c in zip(orders, correctors, strict=True)
        )
        return cls(
            schedule,
            tuple(orders),
            (prediction,) * n,
            correctors,
            rules=(rule,) * n,
            relaxations=relaxations,
            first_step=first_step,
        )

    def describe(self) -> str:
        """The plan as a text table: one row per step (its times, prediction, rule, order,
        estimation points as grid indices, relaxation, corrector), then the NFE."""
        times = self.schedule.times.tolist()
        header = ("step", "t_s -> t_t", "prediction", "rule", "order", "points", "relax", "corr.")
        rows = []
        for i in range(self.num_steps):
            points = ",".join(str(i - p) for p in self.estimation_points[i]) or "-"
            rule = self.rules[i]
            if i == 0 and self.analytical_first_step:
                rule = f"{rule}, {self.first_step}"
            rows.append(
                (
                    str(i),
                    f"{times[i]:.4g} -> {times[i + 1]:.4g}",
                    self.predictions[i],
                    rule,
                    str(self.orders[i]),
                    points,
                    f"{self.relaxations[i]:+.3f}" if self.relaxations[i] else "-",
                    self.correctors[i],
                )
            )
        widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        first = "model" if not self.analytical_first_step else f"{self.first_step} (no model call)"
        lines.append(f"NFE {self.nfe}; first step: {first}; points are grid indices")
        return "\n".join(lines)

    # JSON -------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "schedule": self.schedule.to_json_dict(),
            "orders": list(self.orders),
            "predictions": list(self.predictions),
            "correctors": list(self.correctors),
            "rules": list(self.rules),
            "estimation_points": [list(p) for p in self.estimation_points],
            "relaxations": list(self.relaxations),
            "first_step": self.first_step,
        }

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> SolverPlan:
        """Read version 2 (every field) or version 1 (``orders``, ``predictions``,
        ``correctors``; the other fields take the defaults that reproduce version 1)."""
        if not isinstance(payload, Mapping):
            raise ValueError("a solver plan file must hold a JSON object")
        if payload.get("format") != FORMAT_NAME:
            raise ValueError(
                f"not a solver plan: format is {payload.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = payload.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(
                f"unsupported solver plan version {version!r} "
                f"(this stepsearch reads versions {list(READABLE_VERSIONS)})"
            )
        required = ["schedule", "orders", "predictions", "correctors"]
        extra = ["rules", "estimation_points", "relaxations", "first_step"]
        if version >= 2:
            required += extra
        else:
            present = [key for key in extra if key in payload]
            if present:
                raise ValueError(f"a version-1 solver plan has no {present[0]!r}")
        for key in required:
            if key not in payload:
                raise ValueError(f"solver plan file lacks {key!r}")
        schedule = StepSchedule.from_json_dict(payload["schedule"])
        if version == 1:
            return cls(schedule, payload["orders"], payload["predictions"], payload["correctors"])
        return cls(
            schedule,
            payload["orders"],
            payload["predictions"],
            payload["correctors"],
            rules=payload["rules"],
            estimation_points=payload["estimation_points"],
            relaxations=payload["relaxations"],
            first_step=payload["first_step"],
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as versioned JSON (version 2), atomically."""
        atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SolverPlan:
        """Read a plan written by :meth:`save` (or a version-1 file); bad content raises
        ``ValueError``."""
        try:
            return cls.from_json_dict(read_json(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _sequence(name: str, values: Any, n: int) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of {n} entries, got {values!r}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} steps")
    return tuple(values)


def _whole_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not isinstance(value, float) or (math.isfinite(value) and value.is_integer())


def _checked_order(step: int, order: Any) -> int:
    """An order in 1-4 (ints, or floats that are whole numbers; NaN / Inf / bools rejected)."""
    if not _whole_number(order) or int(order) not in ORDERS:
        raise ValueError(f"step {step}: order must be an integer in {list(ORDERS)}, got {order!r}")
    return int(order)


def _checked_offset(step: int, offset: Any) -> int:
    if not _whole_number(offset) or int(offset) < 1:
        raise ValueError(
            f"step {step}: an estimation point is an offset back (a positive integer), got "
            f"{offset!r}"
        )
    return int(offset)


def _checked_relaxation(step: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"step {step}: relaxation must be a finite number, got {value!r}")
    return float(value)
