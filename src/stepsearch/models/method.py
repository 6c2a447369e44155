"""Samplers as data (:class:`Method`: a stepsearch solver on a schedule, or a diffusers scheduler
class with options), the built-in line-up every comparison uses, the model protocol they run on
(:class:`DiffusionModel`) and the reference solution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from stepsearch.models.batches import steps_for_nfe
from stepsearch.models.pipeline import PipelineModel
from stepsearch.models.source import SampleSource
from stepsearch.models.trajectories import DEFAULT_TEACHER, record_trajectories
from stepsearch.noise import NoiseSchedule
from stepsearch.schedule import StepSchedule, loglinear_interpolate, make_schedule
from stepsearch.solvers.base import Solver

__all__ = [
    "DiffusionModel",
    "Method",
    "default_methods",
    "dpm_solver_3m_leading",
    "reference_solution",
]


@dataclass(frozen=True)
class Method:
    """A sampler: a stepsearch solver on a schedule (a spacing name or a saved schedule, resampled
    log-linearly to other step counts), or a diffusers scheduler class with options."""

    label: str
    solver: str | None = None
    schedule: str | StepSchedule | None = None
    solver_options: dict[str, Any] = field(default_factory=dict)
    diffusers_scheduler: str | None = None
    diffusers_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def stepsearch(cls, solver: str, schedule: str | StepSchedule, **options: Any) -> Method:
        name = schedule if isinstance(schedule, str) else str(schedule.metadata.get("name", "file"))
        shown = ", ".join(f"{key}={value}" for key, value in options.items())
        label = f"stepsearch {solver}" + (f" ({shown})" if shown else "") + f" / {name}"
        return cls(label, solver=solver, schedule=schedule, solver_options=options)

    @classmethod
    def diffusers(cls, scheduler: str, label: str | None = None, **options: Any) -> Method:
        if label is None:
            spacing = options.get("timestep_spacing")
            label = f"diffusers {scheduler}" + (f" ({spacing})" if spacing else "")
        return cls(label, diffusers_scheduler=scheduler, diffusers_options=options)

    def schedule_for(self, model: SampleSource, num_steps: int) -> StepSchedule:
        """The method's ``num_steps``-step schedule on ``model``'s noise schedule."""
        return self.schedule_on(model.noise, num_steps)

    def schedule_on(self, noise: NoiseSchedule, num_steps: int) -> StepSchedule:
        """The method's ``num_steps``-step schedule on ``noise``: the spacing by name, or the saved
        schedule resampled log-linearly (:func:`~stepsearch.schedule.loglinear_interpolate`)."""
        if isinstance(self.schedule, StepSchedule):
            if self.schedule.noise != noise:
                raise ValueError(
                    f"{self.label}: the schedule file is for another noise schedule: it holds "
                    f"{self.schedule.noise!r}, the model needs {noise!r}. Write one for the model "
                    "with `stepsearch schedule save FILE --model digits` (or --model DIR for a "
                    "local model; --noise PRESET for the presets)"
                )
            if self.schedule.num_steps == num_steps:
                return self.schedule
            return loglinear_interpolate(self.schedule, num_steps)
        return make_schedule(noise, num_steps, str(self.schedule))

    def run(
        self,
        model: DiffusionModel,
        nfe: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None = None,
        chunk_size: int = 250,
    ) -> tuple[Tensor, int] | None:
        """Samples of ``model`` (an image model or a text-to-image pipeline) at exactly
        ``nfe`` model evaluations and the step count, or ``None`` if the method cannot spend
        exactly ``nfe``."""
        progress = f"{self.label} NFE {nfe}"
        if self.diffusers_scheduler is not None:
            found = self.diffusers_scheduler_for(model.scheduler_config, nfe)
            if found is None:
                return None
            scheduler, num_steps = found
            samples = model.sample_diffusers(
                scheduler, num_steps, num_samples, seed, accelerator, chunk_size, progress
            )
            return samples, num_steps
        noise = model.noise
        solver = model.solver_for(self)
        num_steps = steps_for_nfe(solver, lambda n: self.schedule_on(noise, n), nfe)
        if num_steps is None:
            return None
        schedule = self.schedule_on(noise, num_steps)
        samples = model.sample_schedule(
            self, schedule, num_samples, seed, accelerator, chunk_size, progress
        )
        return samples, num_steps

    def diffusers_scheduler_for(self, scheduler_config: Any, nfe: int) -> tuple[Any, int] | None:
        """This method's diffusers scheduler (``from_config`` plus its options) and the
        ``num_inference_steps`` at which it spends exactly ``nfe`` evaluations, or ``None``."""
        import diffusers

        scheduler_class = getattr(diffusers, str(self.diffusers_scheduler), None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"diffusers has no scheduler class {self.diffusers_scheduler!r}")
        scheduler = scheduler_class.from_config(scheduler_config, **self.diffusers_options)
        for num_steps in range(1, nfe + 1):
            scheduler.set_timesteps(num_steps)
            if len(scheduler.timesteps) == nfe:
                return scheduler, num_steps
            if len(scheduler.timesteps) > nfe:
                break
        return None


def dpm_solver_3m_leading() -> Method:
    """diffusers' DPM-Solver++(3M) on ``leading`` spacing: the strongest diffusers built-in at 5-8
    NFE on the bundled DDPM (``benchmarks/report.py``)."""
    return Method.diffusers(
        "DPMSolverMultistepScheduler",
        "diffusers DPMSolverMultistepScheduler 3M (leading)",
        solver_order=3,
        timestep_spacing="leading",
    )


def default_methods() -> list[Method]:
    """The demo's line-up: diffusers' built-ins with their own default spacings (set explicitly:
    ``from_config`` of a DDPM config would otherwise carry ``leading`` into every class) vs
    stepsearch solvers on stepsearch spacings."""
    return [
        Method.diffusers(
            "DDIMScheduler",
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        Method.diffusers("DPMSolverMultistepScheduler", timestep_spacing="linspace"),
        dpm_solver_3m_leading(),
        Method.diffusers("UniPCMultistepScheduler", timestep_spacing="linspace"),
        Method.diffusers("EulerDiscreteScheduler", timestep_spacing="linspace"),
        Method.stepsearch("ddim", "trailing"),
        Method.stepsearch("dpm_solver_pp_2m", "trailing"),
        Method.stepsearch("unipc_bh2", "trailing"),
        Method.stepsearch("unipc_bh2", "logsnr_uniform"),
    ]


class DiffusionModel(SampleSource, Protocol):
    """The one model protocol: a :class:`~stepsearch.models.source.SampleSource` (stepsearch's
    solvers sample it through ``denoiser(indices)``) that also runs diffusers' own loop and names
    the solver a :class:`Method` runs on it (it counts the NFE). Implemented by
    :class:`~stepsearch.models.image_model.ImageModel` (unconditional or class-conditional) and
    :class:`~stepsearch.models.pipeline.PipelineModel` (a text-to-image pipeline, driven through
    the drop-in scheduler)."""

    name: str
    scheduler_config: dict[str, Any]

    def solver_for(self, method: Method) -> Solver:
        """The solver that runs ``method`` on this model (it counts the NFE)."""
        ...

    def sample_schedule(
        self,
        method: Method,
        schedule: StepSchedule,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples ``0 .. num_samples - 1`` along ``schedule`` with ``method``'s solver."""
        ...

    def sample_diffusers(
        self,
        scheduler: Any,
        num_steps: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples with a diffusers ``scheduler`` at ``num_steps`` inference steps."""
        ...

    def prompts_for(self, indices: Sequence[int]) -> list[str] | None:
        """The prompt of each sample index, or ``None`` for a model without prompts."""
        ...


def reference_solution(
    model: DiffusionModel,
    num_samples: int,
    seed: int,
    accelerator: Any | None = None,
    chunk_size: int = 250,
    num_steps: int | None = None,
) -> Tensor:
    """Accurate solutions from the same per-index noise (and prompts): the default teacher
    (:data:`~stepsearch.models.trajectories.DEFAULT_TEACHER`, ``num_steps`` steps, default its
    100), in a pipeline's own loop for a pipeline."""
    teacher = DEFAULT_TEACHER.with_steps(num_steps or None)
    return record_trajectories(
        model,
        teacher,
        num_samples,
        seed=seed,
        loop="pipeline" if isinstance(model, PipelineModel) else "stepsearch",
        chunk_size=chunk_size,
        accelerator=accelerator,
        progress=f"reference solution ({teacher.num_steps} steps)",
    )
