"""Teacher and reference trajectories: one teacher spec, one recorder.

Every converged solve stepsearch compares against goes through :func:`record_trajectories`:

- the DP searches' grid teacher (:func:`stepsearch.search.dynamic.record_grid_teacher`: every point
  and model output along a fine grid);
- OLSS' teacher (:func:`stepsearch.olss.trajectories.record_teacher` and
  ``record_pipeline_teacher``: the same, streamed chunk by chunk into cache shards);
- the :class:`~stepsearch.eval.objective.Objective`'s ``traj`` teacher and the evaluation
  harness' reference solution (:func:`stepsearch.models.method.reference_solution`: endpoints
  only).

What is solved is described by a :class:`TeacherSpec` (a solver on a number of steps of a spacing;
default :data:`DEFAULT_TEACHER`, DPM-Solver++(3M) on 100 logSNR-uniform steps), or given as a
:class:`~stepsearch.schedule.StepSchedule` and a solver (the DP grid). Sample ``i`` under ``seed``
starts from the noise of ``(seed, i)`` as everywhere (common random numbers).

Two loops: ``loop="stepsearch"`` runs the stepsearch solver on the model's
``denoiser(indices)`` (any :class:`~stepsearch.models.source.SampleSource`, through
:func:`~stepsearch.models.source.generate_from_source`); ``loop="pipeline"`` runs a
:class:`~stepsearch.models.pipeline.PipelineModel`'s own pipeline call with the solver's drop-in
scheduler (a recording one when trajectories are kept), so what is recorded is what the pipeline
steps with.

Caches are keyed by what the solve depends on: the model's identity (a digest of its weights,
never a path), its settings (``describe()``), the noise schedule, the teacher, the seed and the
sample count (:func:`teacher_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from stepsearch.cache import TensorCache
from stepsearch.integrations.diffusers import scheduler_for_solver
from stepsearch.integrations.olss import RecordingScheduler
from stepsearch.models.batches import chunks_for_process
from stepsearch.models.pipeline import PipelineModel, generate_images
from stepsearch.models.source import SampleSource, generate_from_source
from stepsearch.noise import NoiseSchedule
from stepsearch.sampling import StepRecord
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = [
    "DEFAULT_TEACHER",
    "LOOPS",
    "TeacherSpec",
    "Trajectories",
    "record_trajectories",
    "teacher_key",
]

LOOPS = ("stepsearch", "pipeline")
"""Where a solve runs (module docstring)."""

ChunkHook = Callable[[range, Tensor, Tensor], None]
"""``on_chunk(indices, x, denoised)``: one chunk's trajectory, ``x`` ``(K + 1, m, *shape)``
(``x[0]`` the initial noise, ``x[K]`` the endpoint) and ``denoised`` ``(K, m, *shape)``."""


@dataclass(frozen=True)
class TeacherSpec:
    """A converged solve: ``solver`` on ``num_steps`` steps of ``spacing`` (default
    DPM-Solver++(3M), 100 logSNR-uniform steps; REFERENCES.md measured it as good as DDIM-1000 on
    the digits model at a ninth of the cost)."""

    solver: str = "dpm_solver_pp_3m"
    spacing: str = "logsnr_uniform"
    num_steps: int = 100

    def to_json_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "spacing": self.spacing, "num_steps": self.num_steps}

    def schedule_on(self, noise: NoiseSchedule) -> StepSchedule:
        """The teacher's schedule on ``noise``."""
        return make_schedule(noise, self.num_steps, self.spacing)

    def with_steps(self, num_steps: int | None) -> TeacherSpec:
        """The same teacher on ``num_steps`` steps (``None``: unchanged)."""
        return self if num_steps is None else replace(self, num_steps=int(num_steps))


DEFAULT_TEACHER = TeacherSpec()
"""The one default teacher: DPM-Solver++(3M) on 100 logSNR-uniform steps (the ``traj``
reference, the Objective's teacher and OLSS' teacher agree)."""


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Recorded trajectories of ``N`` samples: ``x`` ``(K + 1, N, *shape)`` and ``denoised``
    ``(K, N, *shape)`` along ``schedule``."""

    schedule: StepSchedule
    x: Tensor
    denoised: Tensor


def teacher_key(
    source: SampleSource, teacher: Mapping[str, Any], seed: int, num_samples: int, **extra: Any
) -> dict[str, Any]:
    """The cache key of a solve of ``source``: its weights digest (not its name or path:
    :meth:`~stepsearch.models.source.ModelIdentity.cache_json`), settings, noise schedule, the
    ``teacher`` description, the seed, the sample count and ``extra`` fields."""
    return {
        "model": source.identity.cache_json(),
        "source": source.describe(),
        "noise": source.noise.to_config(),
        **extra,
        "teacher": dict(teacher),
        "seed": int(seed),
        "num_samples": int(num_samples),
    }


def record_trajectories(
    source: SampleSource,
    teacher: TeacherSpec | StepSchedule,
    num_samples: int,
    *,
    seed: int = 0,
    solver: str | Solver | None = None,
    keep: str = "final",
    on_chunk: ChunkHook | None = None,
    loop: str = "stepsearch",
    decode: bool = True,
    cache: TensorCache | None = None,
    cache_kind: str = "teacher",
    cache_key: Mapping[str, Any] | None = None,
    chunk_size: int = 256,
    accelerator: Any | None = None,
    progress: bool | str = False,
) -> Any:
    """Solve samples ``0 .. num_samples - 1`` of ``source`` under ``seed`` along ``teacher`` (a
    :class:`TeacherSpec`, or a schedule solved by ``solver``) and keep what is asked for.

    Args:
        keep: ``"final"``: return the endpoints (decoded unless ``decode=False``);
            ``"trajectory"``: return :class:`Trajectories` (every ``x`` and ``denoised``, float64,
            on the CPU; needs one model evaluation per step on the schedule).
        on_chunk: called with each chunk's trajectory as soon as the chunk is solved (streaming,
            memory bounded by one chunk), whatever ``keep``.
        loop: ``"stepsearch"`` or ``"pipeline"`` (module docstring; ``pipeline`` needs a
            :class:`~stepsearch.models.pipeline.PipelineModel` and a solver name).
        cache, cache_kind, cache_key: with a key, the result is loaded from / stored in ``cache``
            (default :meth:`TensorCache.default`) under ``cache_kind`` (see :func:`teacher_key`).
    """
    if keep not in ("final", "trajectory"):
        raise ValueError(f"keep must be 'final' or 'trajectory', got {keep!r}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if keep == "trajectory" and accelerator is not None and int(accelerator.num_processes) > 1:
        raise ValueError("whole trajectories are recorded in one process (stream with on_chunk)")
    if isinstance(teacher, TeacherSpec):
        schedule = teacher.schedule_on(source.noise)
        solver = teacher.solver if solver is None else solver
    else:
        schedule = teacher
        if solver is None:
            raise ValueError("a schedule needs a solver to solve it")

    def compute() -> dict[str, Tensor]:
        run = _record_pipeline if loop == "pipeline" else _record_stepsearch
        return run(
            source, schedule, solver, int(num_samples), int(seed), keep, on_chunk, decode,
            int(chunk_size), accelerator, progress,
        )  # fmt: skip

    if cache_key is None:
        stored = compute()
    else:
        cache = cache if cache is not None else TensorCache.default()
        stored = cache.load_or_compute(cache_kind, dict(cache_key), compute)
    if keep == "final":
        return stored["samples"]
    return Trajectories(schedule, stored["x"], stored["denoised"])


class _ChunkRecorder:
    """Collects each chunk's points from ``on_step`` records; hands finished chunks on."""

    def __init__(
        self,
        num_steps: int,
        num_samples: int,
        sample_shape: tuple[int, ...],
        keep_all: bool,
        on_chunk: ChunkHook | None,
    ):
        self.last = num_steps - 1
        self.on_chunk = on_chunk
        self.x: list[Tensor] = []
        self.denoised: list[Tensor] = []
        self.all_x: Tensor | None = None
        self.all_denoised: Tensor | None = None
        if keep_all:
            shape = (num_samples, *sample_shape)
            self.all_x = torch.zeros((num_steps + 1, *shape), dtype=torch.float64)
            self.all_denoised = torch.zeros((num_steps, *shape), dtype=torch.float64)

    def on_step(self, indices: range, record: StepRecord) -> None:
        self.x.append(record.x.detach().to("cpu", copy=True))
        self.denoised.append(record.denoised.detach().to("cpu", copy=True))
        if record.index == self.last:
            self.x.append(record.x_next.detach().to("cpu", copy=True))
            self.finish(indices, torch.stack(self.x), torch.stack(self.denoised))
            self.x, self.denoised = [], []

    def finish(self, indices: range, x: Tensor, denoised: Tensor) -> None:
        if self.all_x is not None and self.all_denoised is not None:
            rows = slice(indices.start, indices.stop)
            self.all_x[:, rows] = x.to(torch.float64)
            self.all_denoised[:, rows] = denoised.to(torch.float64)
        if self.on_chunk is not None:
            self.on_chunk(indices, x, denoised)

    def result(self, samples: Tensor) -> dict[str, Tensor]:
        if self.all_x is None or self.all_denoised is None:
            return {"samples": samples}
        return {"x": self.all_x, "denoised": self.all_denoised}


def _record_stepsearch(
    source: SampleSource,
    schedule: StepSchedule,
    solver: str | Solver,
    num_samples: int,
    seed: int,
    keep: str,
    on_chunk: ChunkHook | None,
    decode: bool,
    chunk_size: int,
    accelerator: Any | None,
    progress: bool | str,
) -> dict[str, Tensor]:
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    recording = keep == "trajectory" or on_chunk is not None
    recorder = _ChunkRecorder(
        schedule.num_steps,
        num_samples,
        tuple(source.sample_shape),
        keep == "trajectory",
        on_chunk,
    )
    samples = generate_from_source(
        source,
        run_solver,
        schedule,
        num_samples,
        seed=seed,
        chunk_size=chunk_size,
        accelerator=accelerator,
        progress=progress,
        decode=decode and keep == "final",
        on_step=recorder.on_step if recording else None,
    )
    return recorder.result(samples)


def _record_pipeline(
    source: SampleSource,
    schedule: StepSchedule,
    solver: str | Solver,
    num_samples: int,
    seed: int,
    keep: str,
    on_chunk: ChunkHook | None,
    decode: bool,
    chunk_size: int,
    accelerator: Any | None,
    progress: bool | str,
) -> dict[str, Tensor]:
    if not isinstance(source, PipelineModel):
        raise TypeError(f"loop='pipeline' needs a PipelineModel, got {type(source).__name__}")
    if not isinstance(solver, str):
        raise TypeError("loop='pipeline' runs a drop-in scheduler: name the solver")
    if not decode and keep == "final":
        raise ValueError("a pipeline's own loop returns decoded images")
    recording = keep == "trajectory" or on_chunk is not None
    sigmas = schedule.to_kdiffusion_sigmas().tolist()
    if not recording:
        scheduler = scheduler_for_solver(solver).from_config(source.scheduler_config)
        samples = generate_images(
            source, scheduler, num_samples, sigmas=sigmas, seed=seed, chunk_size=chunk_size,
            accelerator=accelerator, progress=progress,
        )  # fmt: skip
        return {"samples": samples}
    recorder = _ChunkRecorder(
        schedule.num_steps,
        num_samples,
        tuple(source.sample_shape),
        keep == "trajectory",
        on_chunk,
    )
    process_index = 0 if accelerator is None else int(accelerator.process_index)
    num_processes = 1 if accelerator is None else int(accelerator.num_processes)
    pending = iter(chunks_for_process(num_samples, chunk_size, process_index, num_processes))

    def on_trajectory(x: Tensor, denoised: Tensor) -> None:
        recorder.finish(next(pending), x, denoised)

    scheduler = RecordingScheduler.from_config(source.scheduler_config, solver=solver)
    scheduler.on_trajectory = on_trajectory
    samples = generate_images(
        source, scheduler, num_samples, sigmas=sigmas, seed=seed, chunk_size=chunk_size,
        accelerator=accelerator, progress=progress,
    )  # fmt: skip
    return recorder.result(samples)
