"""Many workers on one optimize run: ``optimize(..., storage=URL)`` (``stepsearch optimize ...
--storage URL``) started in several processes or on several machines shares the work through
one study of the store (:class:`~stepsearch.search.store.StudyStore`, a SQLite file or
PostgreSQL).

The run's work is a list of *tasks*: every search stage (one family, one solver, one NFE), the
converged reference, and the judging of each NFE (every candidate on the selection and report
seeds). Each task is claimed as a trial of the study named after the run's fingerprint
(:meth:`~stepsearch.search.store.StudyStore.run_task`): one worker runs it, in its own ``out``,
and stores the files the run reads back (``stage.json`` and the schedule file; ``reference.json``;
``judged.json``) in the trial; the other workers write those files into their own ``out``. A dead
worker's claim is failed (same host: its process id; elsewhere: Optuna's heartbeat) and the task
run again by a live one.

Tasks run in phases, each waiting for the one before: the cheap families' stages, then each
trial-budgeted family's stages in turn (S³ is seeded with the other results at its NFE), then the
reference and the judging. Afterwards every worker runs the ordinary single-process path, which
now reads every stage and score back, and writes the same report. Give every worker the same
arguments; a work budget (``--budget-evals``) is required: a time budget would size trials from
each worker's own clock.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stepsearch._io import atomic_write_text
from stepsearch.search.family import family
from stepsearch.search.optimize.budget import StageKey, WorkShare, expensive_stages
from stepsearch.search.optimize.candidates import Candidate, _baselines
from stepsearch.search.optimize.judging import _judge, _judges, _reference
from stepsearch.search.optimize.settings import _Run
from stepsearch.search.optimize.stages import _stage
from stepsearch.search.store import StudyStore

__all__ = ["share_work", "study_name"]

Task = tuple[str, Callable[[], dict[str, Any]]]
"""A task: its key in the study and the work that returns its files (path relative to ``out`` ->
text)."""


def study_name(fingerprint: Mapping[str, Any]) -> str:
    """The run's coordination study: ``optimize-`` and a digest of its fingerprint (workers with
    other settings never share a study)."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return "optimize-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def share_work(
    run: _Run,
    nfes: Sequence[int],
    methods: Sequence[str],
    shares: dict[StageKey, WorkShare] | None,
    storage: str,
    fingerprint: Mapping[str, Any],
    worker_name: str | None = None,
) -> None:
    """Run this worker's part of every task and write every task's files into ``run.out``
    (module docstring); the caller then reads them back."""
    noted = list(run.incomplete), list(run.trials)
    name = study_name(fingerprint)
    with StudyStore.open(
        storage, name, metadata={"optimize": name}, worker_name=worker_name
    ) as store:
        found: dict[int, list[Candidate]] = {int(nfe): [] for nfe in nfes}
        cheap = [
            (m, int(nfe), s)
            for m in methods
            if not family(m).expensive
            for nfe in nfes
            for s in run.settings.solvers(m)
        ]
        expensive = expensive_stages(run.settings, methods, nfes)
        phases = [cheap] + [[key for key in expensive if key[0] == m] for m in methods]
        for phase in [p for p in phases if p]:
            tasks = [_stage_task(run, key, shares, found) for key in phase]
            _run_tasks(store, run, tasks)
            for key in phase:  # read back (every worker now has the files)
                candidate = _local_stage(run, key, shares, found)
                if candidate is not None:
                    found[key[1]].append(candidate)
        judges = _judges(run)
        tasks: list[Task] = [("reference", _reference_work(run, judges))]
        for nfe in nfes:
            tasks.append((f"judge:nfe-{nfe}", _judge_work(run, int(nfe), found, judges)))
        _run_tasks(store, run, tasks)
    run.incomplete[:], run.trials[:] = noted


def _stage_task(
    run: _Run, key: StageKey, shares: dict[StageKey, WorkShare] | None,
    found: dict[int, list[Candidate]],
) -> Task:  # fmt: skip
    method, nfe, solver = key

    def work() -> dict[str, Any]:
        _local_stage(run, key, shares, found)
        folder = Path(f"nfe-{nfe}") / f"{method}-{solver}"
        record_path = run.out / folder / "stage.json"
        if not record_path.is_file():  # the time budget left none for it
            return {"files": {}}
        record = json.loads(record_path.read_text())
        names = ["stage.json", record["schedule_file"], "plan.json"]
        return _files(run, [str(folder / n) for n in names])

    return f"stage:{method}:{nfe}:{solver}", work


def _local_stage(
    run: _Run, key: StageKey, shares: dict[StageKey, WorkShare] | None,
    found: dict[int, list[Candidate]],
) -> Candidate | None:  # fmt: skip
    method, nfe, solver = key
    if not family(method).expensive:
        return _stage(run, method, solver, nfe)
    assert shares is not None, "many workers need a work budget"
    return _stage(run, method, solver, nfe, trials=shares[key].trials, earlier=tuple(found[nfe]))


def _reference_work(run: _Run, judges: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        _reference(run, judges)
        return _files(run, ["reference.json"])

    return work


def _judge_work(
    run: _Run, nfe: int, found: dict[int, list[Candidate]], judges: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        _judge(run, nfe, _baselines(run, nfe) + found[nfe], judges)
        return _files(run, [f"nfe-{nfe}/judged.json"])

    return work


def _files(run: _Run, names: Sequence[str]) -> dict[str, Any]:
    """The texts of ``names`` (relative to ``run.out``) that exist."""
    paths = [(name, run.out / name) for name in names if name]
    return {"files": {name: path.read_text() for name, path in paths if path.is_file()}}


def _run_tasks(store: StudyStore, run: _Run, tasks: Sequence[Task]) -> None:
    """Claim and run what no other worker runs; wait for the rest and write their files."""
    pending = list(tasks)
    while pending:
        deferred = []
        for key, work in pending:
            result = store.run_task(key, work)
            if result is None:
                deferred.append((key, work))
                continue
            for name, text in result.get("files", {}).items():
                path = run.out / name
                if not path.is_file() or path.read_text() != text:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, text)
        if len(deferred) == len(pending):
            time.sleep(store.poll_interval * 4)  # every one is running elsewhere
        pending = deferred
