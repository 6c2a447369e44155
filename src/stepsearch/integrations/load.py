"""Scheduler directories: write one for a schedule and solver, load any that a stepsearch run
writes, and say how to load it in Python.

A run's winner can be a stepsearch drop-in (one class per solver,
:mod:`stepsearch.integrations.diffusers`), a fitted OLSS sampler
(:mod:`stepsearch.integrations.olss`), a solver plan
(:mod:`stepsearch.integrations.plan_scheduler`) or one of diffusers' own schedulers (a built-in that
no search beat). The directory's ``scheduler_config.json`` names the class (``_class_name``); these
helpers look it up in that order, so nothing hard-codes one class:

>>> loading_code("runs/x/nfe-5/scheduler")  # doctest: +SKIP
'from stepsearch.integrations.olss import StepsearchOLSSScheduler; scheduler = StepsearchOLSSScheduler.from_pretrained("runs/x/nfe-5/scheduler")'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from stepsearch._io import atomic_write_dir
from stepsearch.integrations.diffusers import scheduler_for_solver
from stepsearch.integrations.olss import StepsearchOLSSScheduler
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver

__all__ = ["load_scheduler", "loading_code", "scheduler_class", "write_scheduler_dir"]


def _modules() -> tuple[ModuleType, ...]:
    """Where scheduler classes are looked up, stepsearch's first (imported when needed)."""
    import diffusers

    from stepsearch.integrations import diffusers as drop_in
    from stepsearch.integrations import olss, plan_scheduler

    return drop_in, olss, plan_scheduler, diffusers


def scheduler_class(path: str | os.PathLike[str]) -> tuple[str, type]:
    """The module to import from and the class of the scheduler directory ``path`` (its
    ``scheduler_config.json``'s ``_class_name``, looked up among stepsearch's scheduler modules,
    then diffusers'); ``ValueError`` for a folder without one or a class neither provides."""
    config_path = Path(path) / "scheduler_config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} is not a scheduler directory (no scheduler_config.json)")
    try:  # diffusers' own configs hold -Infinity (lambda_min_clipped): plain json
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{config_path} names no scheduler class ('_class_name')")
    for module in _modules():
        found = getattr(module, name, None)
        # a stepsearch class is imported from the module that defines it, diffusers' from the top
        defined_here = module.__name__ in ("diffusers", getattr(found, "__module__", None))
        if isinstance(found, type) and hasattr(found, "from_pretrained") and defined_here:
            return module.__name__, found
    raise ValueError(f"{config_path}: unknown scheduler class {name!r}")


def load_scheduler(path: str | os.PathLike[str]) -> Any:
    """The scheduler of the directory ``path`` (:func:`scheduler_class`'s ``from_pretrained``)."""
    return scheduler_class(path)[1].from_pretrained(path)


def loading_code(path: str | os.PathLike[str]) -> str:
    """One line of Python that loads the scheduler directory ``path`` (as given: relative paths
    stay relative to where the run was started): the import of its class and its
    ``from_pretrained``, ready to paste (``pipe.scheduler = scheduler`` puts it in a pipeline)."""
    module, found = scheduler_class(path)
    literal = json.dumps(os.fspath(path), ensure_ascii=False)  # a valid Python string literal
    name = found.__name__
    return f"from {module} import {name}; scheduler = {name}.from_pretrained({literal})"


def write_scheduler_dir(
    path: str | os.PathLike[str], schedule: StepSchedule, solver: Solver, **config: Any
) -> Path | None:
    """A diffusers scheduler directory replaying ``schedule`` with ``solver`` (its drop-in class's
    ``from_step_schedule(...).save_pretrained``; a fitted OLSS solver: its own class), written at
    once (:func:`~stepsearch._io.atomic_write_dir`: a reader sees the previous complete folder or
    the new one); ``None`` when the noise schedule has no diffusers form (EDM, continuous VP)."""
    if solver.name == "olss":  # a fitted OLSS solver: its own scheduler class
        olss = StepsearchOLSSScheduler.from_fit(solver, config)
        return atomic_write_dir(path, olss.save_pretrained)
    if not isinstance(schedule.noise, (DiscreteVP, FlowMatching)):
        return None
    scheduler_class = scheduler_for_solver(solver.name)
    solver_kwargs = {k: v for k, v in solver.config().items() if k != "name"}
    if solver_kwargs:
        config.setdefault("solver_kwargs", solver_kwargs)
    scheduler = scheduler_class.from_step_schedule(schedule, **config)
    return atomic_write_dir(path, scheduler.save_pretrained)
