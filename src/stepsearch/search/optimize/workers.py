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

A task waits only for what it reads: a trial-budgeted family's stage at one NFE for every cheap
stage and every earlier trial-budgeted family's stage at that NFE (S³ is seeded with those
results), the judging of an NFE for every stage at that NFE and the reference (whose converged
solve the judges reuse); the reference and the cheap stages wait for nothing. A free worker takes
the first ready task in the order reference, cheap stages, each trial-budgeted family's stages,
judging (larger NFE first within each), so that no worker idles while another finishes a phase.
Every task's inputs are the same whichever worker runs it and whenever: the seeds of a stage are
read back in the single-process order. Afterwards every worker runs the ordinary single-process
path, which now reads every stage and score back, and writes the same report. Give every worker the same
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

__all__ = ["run_shared", "share_work", "study_name"]

Task = tuple[str, Callable[[], dict[str, Any]], set[str]]
"""A task: its key in the study, the work that returns its files (path relative to ``out`` ->
text), and the keys of the tasks it waits for."""


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
    cheap = [
        (m, int(nfe), s)
        for m in methods
        if not family(m).expensive
        for nfe in nfes
        for s in run.settings.solvers(m)
    ]
    stages = cheap + expensive_stages(run.settings, methods, nfes)  # the single-process order
    needs = {key: _stage_needs(key, stages, methods) for key in stages}
    read: dict[StageKey, Candidate | None] = {}

    def read_back(key: StageKey) -> Candidate | None:
        """The stage's result from its files in ``run.out`` (every dependency is done)."""
        if key not in read:
            read[key] = _local_stage(run, key, shares, seeds_of(needs[key]))
        return read[key]

    def seeds_of(keys: set[StageKey]) -> list[Candidate]:
        found = (read_back(key) for key in stages if key in keys)
        return [candidate for candidate in found if candidate is not None]

    judges = _judges(run)
    tasks: list[Task] = [("reference", _reference_work(run, judges), set())]
    tasks += [_stage_task(run, key, shares, needs[key], seeds_of) for key in stages]
    for nfe in sorted({int(n) for n in nfes}, reverse=True):
        at_nfe = {key for key in stages if key[1] == nfe}
        tasks.append((
            f"judge:nfe-{nfe}",
            _judge_work(run, nfe, lambda keys=at_nfe: seeds_of(keys), judges),
            {_stage_task_key(key) for key in at_nfe} | {"reference"},
        ))  # fmt: skip
    position = {method: i for i, method in enumerate(methods)}

    def priority(task: Task) -> tuple[int, int]:
        kind, *rest = task[0].split(":")
        if kind == "reference":
            return (0, 0)
        if kind == "judge":
            return (2 + len(methods), 0)
        method, nfe = rest[0], int(rest[1])
        return (2 + position[method] if family(method).expensive else 1, -nfe)

    tasks.sort(key=priority)  # stable: the single-process order within a rank
    with StudyStore.open(
        storage, name, metadata={"optimize": name}, worker_name=worker_name
    ) as store:
        _run_tasks(store, run.out, tasks)
    run.incomplete[:], run.trials[:] = noted


def run_shared(
    storage: str,
    fingerprint: Mapping[str, Any],
    worker_name: str | None,
    out: Path,
    key: str,
    work: Callable[[], dict[str, Any]],
) -> None:
    """One task of the run's study before the run's others (the guidance search): run here or by
    another worker, its files written into ``out`` either way."""
    name = study_name(fingerprint)
    with StudyStore.open(
        storage, name, metadata={"optimize": name}, worker_name=worker_name
    ) as store:
        _run_tasks(store, out, [(key, work, set())])


def _stage_needs(
    key: StageKey, stages: Sequence[StageKey], methods: Sequence[str]
) -> set[StageKey]:
    """The stages whose results ``key`` reads: none for a cheap family; at its NFE, every cheap
    stage and every stage of an earlier trial-budgeted family for a trial-budgeted one."""
    method, nfe, _ = key
    if not family(method).expensive:
        return set()
    before = methods.index(method)
    return {
        (m, n, s)
        for m, n, s in stages
        if n == nfe and (not family(m).expensive or methods.index(m) < before)
    }


def _stage_task_key(key: StageKey) -> str:
    method, nfe, solver = key
    return f"stage:{method}:{nfe}:{solver}"


def _stage_task(
    run: _Run,
    key: StageKey,
    shares: dict[StageKey, WorkShare] | None,
    needs: set[StageKey],
    seeds_of: Callable[[set[StageKey]], list[Candidate]],
) -> Task:
    method, nfe, solver = key

    def work() -> dict[str, Any]:
        _local_stage(run, key, shares, seeds_of(needs))
        folder = Path(f"nfe-{nfe}") / f"{method}-{solver}"
        record_path = run.out / folder / "stage.json"
        if not record_path.is_file():  # the time budget left none for it
            return {"files": {}}
        record = json.loads(record_path.read_text())
        names = ["stage.json", record["schedule_file"], "plan.json"]
        return _files(run, [str(folder / n) for n in names])

    return _stage_task_key(key), work, {_stage_task_key(k) for k in needs}


def _local_stage(
    run: _Run, key: StageKey, shares: dict[StageKey, WorkShare] | None,
    earlier: Sequence[Candidate],
) -> Candidate | None:  # fmt: skip
    method, nfe, solver = key
    if not family(method).expensive:
        return _stage(run, method, solver, nfe)
    assert shares is not None, "many workers need a work budget"
    return _stage(run, method, solver, nfe, trials=shares[key].trials, earlier=tuple(earlier))


def _reference_work(run: _Run, judges: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        _reference(run, judges)
        return _files(run, ["reference.json"])

    return work


def _judge_work(
    run: _Run, nfe: int, found: Callable[[], list[Candidate]], judges: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        _judge(run, nfe, _baselines(run, nfe) + found(), judges)
        return _files(run, [f"nfe-{nfe}/judged.json"])

    return work


def _files(run: _Run, names: Sequence[str]) -> dict[str, Any]:
    """The texts of ``names`` (relative to ``run.out``) that exist."""
    paths = [(name, run.out / name) for name in names if name]
    return {"files": {name: path.read_text() for name, path in paths if path.is_file()}}


def _run_tasks(store: StudyStore, out: Path, tasks: Sequence[Task]) -> None:
    """Run ``tasks`` (in priority order): again and again, the first one whose needs are done
    that no other worker runs, claimed and run here or its stored result taken; its files
    written into ``out``. Wait while every ready task runs elsewhere."""
    pending = list(tasks)
    done: set[str] = set()
    while pending:
        for task in pending:
            key, work, needs = task
            if not needs <= done:
                continue
            result = store.run_task(key, work)
            if result is None:  # running elsewhere
                continue
            for name, text in result.get("files", {}).items():
                path = out / name
                if not path.is_file() or path.read_text() != text:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, text)
            done.add(key)
            pending.remove(task)
            break  # the first ready task again: finishing one may have readied better ones
        else:
            time.sleep(store.poll_interval * 4)  # every ready one is running elsewhere
