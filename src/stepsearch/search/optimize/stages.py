"""The search stages of an optimize run: one registered family, one solver, one NFE, each in
``out/nfe-N/<family>-<solver>/`` through :func:`~stepsearch.search.family.run_search`;
a finished stage (``stage.json`` with the same fingerprint) is read back."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepsearch._io import atomic_write_json
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.family import family, run_search
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize.candidates import Candidate
from stepsearch.search.optimize.settings import _Run
from stepsearch.solvers import get_solver, solver_from_json


def _stage_fingerprint(
    run: _Run,
    name: str,
    solver: str,
    nfe: int,
    earlier: Sequence[Candidate] = (),
    trials: int | None = None,
) -> dict[str, Any]:
    objective = {k: v for k, v in run.search.describe().items() if k != "held_out_samples"}
    fingerprint = {
        "family": name,
        "solver": solver,
        "nfe": int(nfe),
        "settings": run.settings.family_settings(name),
        "objective": objective,
    }
    if run.inputs.get(name) is not None:
        fingerprint["data"] = family(name).inputs_digest(run.inputs[name])
    if earlier:  # a family seeded with the other searches' results depends on them
        fingerprint["seeds"] = sorted(candidate.key() for candidate in earlier)
    if trials is not None:  # a work budget's trials (a time budget's are fixed in plan.json)
        fingerprint["trials"] = int(trials)
    return fingerprint


def _stage(
    run: _Run,
    name: str,
    solver: str,
    nfe: int,
    *,
    seconds: float | None = None,
    trials: int | None = None,
    earlier: Sequence[Candidate] = (),
) -> Candidate | None:
    """One search (a finished one is read back); ``None`` when the budget left no time for it.
    ``trials``: an expensive family's trial budget from the run's work budget
    (:func:`~stepsearch.search.optimize.budget.work_shares`); else ``seconds``, its time share
    (its trial budget comes from the measured time of one trial).
    ``earlier``: the other searches' results at this NFE, the seeds of a family that takes them
    (``seeded_by_others``: S³) as its ``inputs``."""
    search_family = family(name)
    folder = run.out / f"nfe-{nfe}" / f"{name}-{solver}"
    record_path = folder / "stage.json"
    inputs = run.inputs.get(name)
    if not getattr(search_family, "seeded_by_others", False):
        earlier = ()
    elif earlier:
        inputs = {candidate.label: candidate.runs for candidate in earlier}
    fingerprint = _stage_fingerprint(run, name, solver, nfe, earlier, trials)
    label = search_family.stage_label(solver)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint:
            return _candidate_from_record(run, record, folder, label, nfe)
    if run.seconds_left() <= 0:
        run.incomplete.append({"nfe": nfe, "stage": label, "reason": "budget spent before it ran"})
        return None
    folder.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    partial = False
    notes: dict[str, Any] = {}
    budget = None
    if search_family.expensive and trials is not None:
        budget = int(trials)
        notes["trials"] = budget
    elif search_family.expensive:
        budget, partial = _trial_budget(run, name, solver, nfe, folder, seconds or 0.0)
        if budget is None:
            run.incomplete.append(
                {"nfe": nfe, "stage": label, "reason": "budget too short for a search"}
            )
            return None
        notes["trials"] = budget
    job = run_search(
        search_family,
        run.search,
        solver,
        nfe,
        folder,
        settings=run.settings.settings_of(name),
        progress=run.progress,
        budget=budget,
        inputs=inputs,
    )
    record = {
        "fingerprint": fingerprint,
        "schedule_file": Path(job.files["schedule"]).name,
        "partial": partial,
        "seconds": round(time.perf_counter() - begin, 2),
        **notes,
    }
    atomic_write_json(record_path, record)
    return _candidate_from_record(run, record, folder, label, nfe)


def _candidate_from_record(
    run: _Run, record: dict[str, Any], folder: Path, label: str, nfe: int
) -> Candidate:
    schedule_file = ScheduleFile.load(
        folder / record["schedule_file"], noise=run.source.noise, model=run.source.identity
    )
    solver = solver_from_json(dict(schedule_file.provenance.solver))
    name = str(record["fingerprint"]["family"])
    plan = schedule_file.candidate if schedule_file.is_plan else None
    if record.get("trials") is not None:
        run.trials.append({"nfe": nfe, "stage": label, "trials": int(record["trials"])})
    if record.get("partial"):
        run.incomplete.append(
            {"nfe": nfe, "stage": label,
             "reason": f"budget ended the search after {record.get('trials')} trials "
                       "(best so far kept)"}
        )  # fmt: skip
    return Candidate(
        label, name, nfe, solver, schedule_file.schedule,
        schedule_file=schedule_file, partial=bool(record.get("partial")), plan=plan,
    )  # fmt: skip


def _trial_budget(
    run: _Run, name: str, solver: str, nfe: int, folder: Path, seconds: float
) -> tuple[int | None, bool]:
    """The trial budget of an expensive family's stage: what ``seconds`` allows at the measured
    cost of one trial (capped at the family's ``max_trials``), fixed in ``plan.json`` so that a
    resumed run replays the same search; ``None`` when not even the starting spacings fit."""
    plan_path = folder / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return int(plan["trials"]), bool(plan["partial"])
    run_solver = get_solver(solver)
    steps = run_solver.num_steps_for_nfe(nfe)
    starts = spacing_schedules(run.source.noise, steps)
    probe = next(iter(starts.values()))
    measured = run.search(probe, run_solver).seconds
    trials = int(seconds // max(measured, 1e-3))
    cap = run.settings.max_trials(name)
    if trials < len(starts) + 2:
        return None, True
    plan = {"trials": min(trials, cap), "partial": trials < cap, "seconds_per_trial": measured}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    return int(plan["trials"]), bool(plan["partial"])
