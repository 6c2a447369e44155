"""The search space of S³: solver plans at a fixed NFE, and the operators that move in it.

A point is a :class:`~stepsearch.plan.SolverPlan` whose number of model evaluations is the search's
NFE: ``nfe`` steps from ``t_start`` (the noise schedule's largest time) to ``t_end`` (clean data,
or a small time) with step 0 evaluating the model, or ``nfe + 1`` steps with an analytical first
step. With ``free_start`` the first time is searched too (anywhere at or below ``t_start``, above
the second time), as AutoDiffusion searches it: the initial noise is then taken as the sample at
that time, like a truncated schedule, and AutoDiffusion's results become points of the space. The
operators follow the released USF search (Liu, Ning, Yang & Wang, ICLR 2024; rules in
``shared/REFERENCES.md``): each interior time scaled by ``1 + N(0, time_sigma)`` with probability
``time_probability`` (with ``free_start`` the first time too, never above ``t_start``); per
step, with probability ``gene_probability`` each, a new order (drawn with probabilities 1: .2,
2: .4, 3: .3, 4: .1), a flipped prediction (noise / data), a flipped rule (``unipc`` /
``taylor``), new estimation points, a relaxation moved by ``N(0, relaxation_sigma)`` or reset,
a corrector switched on / off; with probability ``move_probability`` one interior time
removed and another inserted (the NFE stays); with probability ``first_step_probability`` the first
step switched between the model and an analytical one (a time inserted or removed so that the NFE
stays). Crossover takes each step's choices (and each interior time) from either of two parents
with the same number of steps.

Every child goes through :meth:`PlanSpace.repair`: orders bounded by the history (and 1 into clean
data), rule-compatible correctors, estimation points that exist, relaxation only where a first
derivative term exists, none of it silently invalid - :class:`~stepsearch.plan.SolverPlan`
validates the result. Times are rounded to 1e-6 so that plans, their JSON and their study keys
are exactly reproducible.

:func:`step_features` turns a plan into one row of numbers per step for the predictor
(:mod:`stepsearch.search.predictor`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stepsearch.noise import NoiseSchedule
from stepsearch.plan import FIRST_STEPS, ORDERS, PREDICTIONS, RULE_CORRECTOR, RULES, SolverPlan
from stepsearch.schedule import StepSchedule

__all__ = [
    "FEATURES",
    "PlanSpace",
    "plan_key",
    "step_features",
]

TIME_DECIMALS = 6
"""Times are rounded to this many decimals (exactly reproducible plans and keys)."""
ORDER_PROBABILITIES = (0.2, 0.4, 0.3, 0.1)
"""USF's released order distribution for orders 1, 2, 3, 4."""


def plan_key(plan: SolverPlan) -> str:
    """A canonical string of ``plan`` (equal plans, equal keys)."""
    return json.dumps(plan.to_json_dict(), sort_keys=True)


@dataclass(frozen=True)
class PlanSpace:
    """Solver plans at ``nfe`` model evaluations on ``noise`` (module docstring)."""

    noise: NoiseSchedule
    nfe: int
    t_start: float
    t_end: float
    first_steps: tuple[str, ...] = ("model", "zero_x0")
    """The first steps the search may choose (``"data_mean"`` needs the data mean)."""
    time_probability: float = 0.3
    time_sigma: float = 0.08
    gene_probability: float = 0.15
    move_probability: float = 0.2
    first_step_probability: float = 0.1
    relaxation_sigma: float = 0.2
    relaxation_bound: float = 1.0
    min_gap: float = 1e-3
    """The smallest distance between two times."""
    free_start: bool = False
    """Whether the first time is searched (at most ``t_start``) instead of fixed at ``t_start``."""
    order_probabilities: tuple[float, ...] = field(default=ORDER_PROBABILITIES)

    def __post_init__(self) -> None:
        if int(self.nfe) < 1:
            raise ValueError(f"nfe must be at least 1, got {self.nfe!r}")
        if not self.t_start > self.t_end >= 0.0:
            raise ValueError(f"need t_start > t_end >= 0, got {self.t_start!r}, {self.t_end!r}")
        unknown = [s for s in self.first_steps if s not in FIRST_STEPS]
        if unknown or "model" not in self.first_steps:
            raise ValueError(f"first_steps must include 'model' and be among {list(FIRST_STEPS)}")
        if len(self.order_probabilities) != len(ORDERS):
            raise ValueError("order_probabilities needs one probability per order 1-4")

    @classmethod
    def for_noise(
        cls, noise: NoiseSchedule, nfe: int, *, data_mean: bool = False, **options: Any
    ) -> PlanSpace:
        """The space on ``noise``'s full time range, ending at clean data."""
        first = ("model", "zero_x0", "data_mean") if data_mean else ("model", "zero_x0")
        return cls(noise, int(nfe), float(noise.t_max), 0.0, first, **options)

    # building plans -------------------------------------------------------------------------
    def steps_for(self, first_step: str) -> int:
        """Steps of a plan with ``first_step`` at this NFE."""
        return self.nfe + int(first_step != "model")

    def contains(self, plan: SolverPlan) -> bool:
        """Whether ``plan`` is a point of this space (NFE, end points, first step)."""
        return self.adoption_problem(plan) is None

    def adoption_problem(self, plan: SolverPlan) -> str | None:
        """Why ``plan`` is not a point of this space (its NFE, first step or end points), or
        ``None`` when it is (up to :meth:`repair`)."""
        if plan.nfe != self.nfe:
            return f"it uses {plan.nfe} model evaluations, the search {self.nfe}"
        if plan.first_step not in self.first_steps:
            return f"its first step {plan.first_step!r} is not among {list(self.first_steps)}"
        times = plan.schedule.times
        first, last = float(times[0]), float(times[-1])
        if self.free_start:
            if first > self.t_start + 1e-9:
                return (
                    f"it starts at t={first:.6g}, above the space's largest time {self.t_start:.6g}"
                )
        elif not math.isclose(first, self.t_start, abs_tol=1e-9):
            return (
                f"it starts at t={first:.6g}, the space at t={self.t_start:.6g} "
                "(a search with a free start time takes it)"
            )
        if not math.isclose(last, self.t_end, abs_tol=1e-9):
            return f"it ends at t={last:.6g}, the space at t={self.t_end:.6g}"
        return None

    def repair(
        self,
        times: Sequence[float],
        orders: Sequence[int],
        predictions: Sequence[str],
        rules: Sequence[str],
        points: Sequence[Sequence[int]],
        relaxations: Sequence[float],
        correctors: Sequence[str],
        first_step: str,
        rng: np.random.Generator | None = None,
    ) -> SolverPlan | None:
        """The valid plan closest to these choices, or ``None`` when the times cannot be made a
        schedule of this space. Orders are capped by the history (1 into clean data; 3 for rule
        ``unipc``), estimation points that do not exist are dropped (and drawn again with ``rng``,
        else the nearest ones taken), correctors fit the rule and the last step has none,
        relaxations vanish where there is no first-derivative term."""
        grid = self._times(times)
        if grid is None:
            return None
        n = grid.size - 1
        if n != self.steps_for(first_step) or first_step not in self.first_steps:
            return None
        analytical = first_step != "model"
        schedule = StepSchedule(grid, self.noise, {"search": "s3"})
        clean_end = schedule.ends_clean
        new_orders, new_points, new_relax, new_correctors = [], [], [], []
        for i in range(n):
            outputs = i + 1 - int(analytical)
            rule = rules[i]
            order = int(min(int(orders[i]), max(outputs, 1), 3 if rule == "unipc" else 4))
            if i == n - 1 and clean_end:
                order = 1
            first_point = 1 if analytical else 0
            usable = [j for j in range(1, i - first_point + 1)]  # offsets to model outputs
            if rule == "unipc" or order == 1:
                chosen: tuple[int, ...] = ()
            else:
                wanted = [int(p) for p in points[i] if int(p) in usable][: order - 1]
                if not wanted:
                    if rng is not None:
                        count = int(rng.integers(1, order))
                        wanted = sorted(
                            int(p) for p in rng.choice(usable, size=count, replace=False)
                        )
                    else:
                        wanted = usable[: order - 1]
                chosen = tuple(sorted(set(wanted)))
            corrector = correctors[i]
            if corrector != "none":
                corrector = RULE_CORRECTOR[rule]
            if i == n - 1:
                corrector = "none"
            relaxation = float(relaxations[i]) if rule == "taylor" else 0.0
            if order == 1 and corrector == "none":
                relaxation = 0.0
            relaxation = float(
                np.round(np.clip(relaxation, -self.relaxation_bound, self.relaxation_bound), 4)
            )
            new_orders.append(order)
            new_points.append(chosen)
            new_relax.append(relaxation)
            new_correctors.append(corrector)
        try:
            return SolverPlan(
                schedule,
                tuple(new_orders),
                tuple(predictions[:n]),
                tuple(new_correctors),
                rules=tuple(rules[:n]),
                estimation_points=tuple(new_points),
                relaxations=tuple(new_relax),
                first_step=first_step,
            )
        except ValueError:
            return None

    def adopt(self, plan: SolverPlan) -> SolverPlan | None:
        """``plan`` as a point of this space (repaired; ``None`` if its NFE, first step or ends
        do not fit: :meth:`adoption_problem` says why)."""
        if self.adoption_problem(plan) is not None:
            return None
        return self.repair(*_fields(plan))

    def _times(self, times: Sequence[float]) -> np.ndarray | None:
        values = np.asarray(times, dtype=np.float64)
        if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
            return None
        interior = np.round(values[1:-1], TIME_DECIMALS)
        interior = np.sort(interior)[::-1]
        start = self.t_start
        if self.free_start:
            start = min(float(np.round(values[0], TIME_DECIMALS)), self.t_start)
        grid = np.concatenate(([start], interior, [self.t_end]))
        if np.any(-np.diff(grid) < self.min_gap):
            return None
        return grid

    # operators ------------------------------------------------------------------------------
    def mutate(self, plan: SolverPlan, rng: np.random.Generator) -> SolverPlan | None:
        """A mutated copy of ``plan`` (module docstring); ``None`` if the result is invalid."""
        fields = _fields(plan)
        times, orders, predictions, rules, points, relaxations, correctors, first_step = fields
        times = list(times)
        for k in range(1, len(times) - 1):
            if rng.random() < self.time_probability:
                times[k] = float(times[k]) * (1.0 + float(rng.normal(0.0, self.time_sigma)))
        if self.free_start and rng.random() < self.time_probability:
            scaled = float(times[0]) * (1.0 + float(rng.normal(0.0, self.time_sigma)))
            times[0] = min(scaled, self.t_start)
        low, high = self.t_end + self.min_gap, float(times[0]) - self.min_gap
        times = [
            times[0],
            *sorted(np.clip(times[1:-1], low, high).tolist(), reverse=True),
            times[-1],
        ]
        n = len(orders)
        for i in range(n):
            if rng.random() < self.gene_probability:
                orders[i] = int(rng.choice(ORDERS, p=self.order_probabilities))
            if rng.random() < self.gene_probability:
                predictions[i] = PREDICTIONS[1 - PREDICTIONS.index(predictions[i])]
            if rng.random() < self.gene_probability:
                rules[i] = RULES[1 - RULES.index(rules[i])]
            if rng.random() < self.gene_probability:
                points[i] = ()  # drawn again by repair
            if rng.random() < self.gene_probability:
                if rng.random() < 0.25:
                    relaxations[i] = 0.0
                else:
                    relaxations[i] = relaxations[i] + float(rng.normal(0.0, self.relaxation_sigma))
            if rng.random() < self.gene_probability:
                correctors[i] = "none" if correctors[i] != "none" else RULE_CORRECTOR[rules[i]]
        if len(times) > 2 and rng.random() < self.move_probability:
            times = self._moved(times, rng)
        if len(self.first_steps) > 1 and rng.random() < self.first_step_probability:
            choices = [s for s in self.first_steps if s != first_step]
            new_first = str(rng.choice(choices))
            if (first_step == "model") != (new_first == "model"):
                fields = self._switch_first(
                    times, orders, predictions, rules, points, relaxations, correctors, rng,
                    to_analytical=new_first != "model",
                )  # fmt: skip
                times, orders, predictions, rules, points, relaxations, correctors = fields
            first_step = new_first
        return self.repair(
            times, orders, predictions, rules, points, relaxations, correctors, first_step, rng
        )

    def crossover(
        self, first: SolverPlan, second: SolverPlan, rng: np.random.Generator
    ) -> SolverPlan | None:
        """Each step's choices and each interior time from ``first`` or ``second`` (equal
        probability); ``None`` when their step counts differ or the child is invalid."""
        if first.num_steps != second.num_steps or first.first_step != second.first_step:
            return None
        a, b = _fields(first), _fields(second)
        n = first.num_steps
        pick = rng.random(n) < 0.5
        times = [
            float(x if rng.random() < 0.5 else y)
            for x, y in zip(first.schedule.times, second.schedule.times, strict=True)
        ]
        per_step = [
            [a[f][i] if pick[i] else b[f][i] for i in range(n)] for f in range(1, 7)
        ]  # orders, predictions, rules, points, relaxations, correctors
        return self.repair(times, *per_step, first.first_step, rng)

    def _moved(self, times: list[float], rng: np.random.Generator) -> list[float]:
        """One interior time removed and a new one inserted (log-SNR midpoint of a random gap,
        jittered), so the number of steps stays."""
        interior = list(times[1:-1])
        if not interior:
            return times
        del interior[int(rng.integers(len(interior)))]
        grid = [times[0], *interior, times[-1]]
        gap = int(rng.integers(len(grid) - 1))
        return [*grid[: gap + 1], self._between(grid[gap], grid[gap + 1], rng), *grid[gap + 1 :]]

    def _between(self, high: float, low: float, rng: np.random.Generator) -> float:
        """A time between ``high`` and ``low``: a random point of the log-SNR interval."""
        lam_high = float(self.noise.lambda_(np.float64(high)))
        if low <= 0.0:
            lam_low = float(self.noise.lambda_(np.float64(max(float(self.noise.t_min), 1e-6))))
        else:
            lam_low = float(self.noise.lambda_(np.float64(low)))
        lam = lam_high + float(rng.uniform(0.2, 0.8)) * (lam_low - lam_high)
        return float(self.noise.t_from_lambda(np.float64(lam)))

    def _switch_first(
        self,
        times: list[float],
        orders: list[int],
        predictions: list[str],
        rules: list[str],
        points: list[tuple[int, ...]],
        relaxations: list[float],
        correctors: list[str],
        rng: np.random.Generator,
        *,
        to_analytical: bool,
    ) -> tuple[list[Any], ...]:
        """Add a step after ``t_start`` (to an analytical first step) or drop ``t_1`` (back to
        the model), keeping the NFE."""
        if to_analytical:
            new_time = self._between(times[0], times[1], rng)
            times = [times[0], new_time, *times[1:]]
            orders = [1, *orders]
            predictions = [predictions[0], *predictions]
            rules = [rules[0], *rules]
            points = [(), *points]
            relaxations = [0.0, *relaxations]
            correctors = ["none", *correctors]
        else:
            times = [times[0], *times[2:]]
            orders, predictions, rules = orders[1:], predictions[1:], rules[1:]
            points, relaxations, correctors = points[1:], relaxations[1:], correctors[1:]
        return times, orders, predictions, rules, points, relaxations, correctors

    def random_variant(self, plan: SolverPlan, rng: np.random.Generator) -> SolverPlan | None:
        """An exploratory child: ``plan`` mutated with every probability tripled."""
        bold = replace(
            self,
            time_probability=min(1.0, 3 * self.time_probability),
            gene_probability=min(1.0, 3 * self.gene_probability),
            move_probability=min(1.0, 3 * self.move_probability),
            first_step_probability=min(1.0, 3 * self.first_step_probability),
        )
        return bold.mutate(plan, rng)


def _fields(plan: SolverPlan) -> tuple[Any, ...]:
    """A plan's choices as mutable lists (times, orders, predictions, rules, points,
    relaxations, correctors) and its first step."""
    return (
        [float(t) for t in plan.schedule.times],
        list(plan.orders),
        list(plan.predictions),
        list(plan.rules or ()),
        [tuple(p) for p in (plan.estimation_points or ())],
        [float(c) for c in (plan.relaxations or ())],
        list(plan.correctors),
        plan.first_step,
    )


# features for the predictor ---------------------------------------------------------------------
FEATURES = (
    "lambda_s", "lambda_t", "h", "last", "order_1", "order_2", "order_3", "order_4",
    "data", "taylor", "point_1", "point_2", "point_3", "relaxation", "corrector",
    "zero_x0", "data_mean", "model_first",
)  # fmt: skip
"""The per-step features of :func:`step_features`, in order."""


def step_features(plan: SolverPlan, lambda_scale: float = 10.0) -> np.ndarray:
    """One row of :data:`FEATURES` per step of ``plan`` (float32): the step's log-SNRs (``lambda``
    / ``lambda_scale``, the clean end at the last finite value + 1), its length, whether it is
    the last step, the one-hot order, data prediction, Taylor rule, which of the last three
    points estimate derivatives, the relaxation, a corrector, and (on every row) the first step."""
    schedule = plan.schedule
    noise = schedule.noise
    times = schedule.times
    lambdas = []
    for t in times:
        if t <= 0.0:
            lambdas.append(math.nan)
        else:
            lambdas.append(float(noise.lambda_(np.float64(t))))
    finite = [v for v in lambdas if math.isfinite(v)]
    top = max(finite) + 1.0 if finite else 0.0
    lambdas = [v if math.isfinite(v) else top for v in lambdas]
    n = plan.num_steps
    rows = np.zeros((n, len(FEATURES)), dtype=np.float32)
    for i in range(n):
        points = plan.estimation_points[i] if plan.estimation_points else ()
        row = [
            lambdas[i] / lambda_scale,
            lambdas[i + 1] / lambda_scale,
            (lambdas[i + 1] - lambdas[i]) / lambda_scale,
            float(i == n - 1),
            *(float(plan.orders[i] == k) for k in ORDERS),
            float(plan.predictions[i] == "data"),
            float(plan.rules[i] == "taylor") if plan.rules else 0.0,
            *(float(k in points) for k in (1, 2, 3)),
            float(plan.relaxations[i]) if plan.relaxations else 0.0,
            float(plan.correctors[i] != "none"),
            float(plan.first_step == "zero_x0"),
            float(plan.first_step == "data_mean"),
            float(plan.first_step == "model"),
        ]
        rows[i] = row
    return rows
