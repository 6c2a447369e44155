"""The study store: every candidate a search evaluates is a trial in an Optuna study.

One store is one Optuna study in a relational database: a SQLite file by default (embedded, nothing
to start), or any SQLAlchemy database URL (``postgresql://user@host:port/db``) when workers on
several machines share one search. Searches whose proposal rule is not one of Optuna's samplers
drive the study through the storage's ask-and-tell primitives, so the same study can be viewed with
``optuna-dashboard sqlite:///study.sqlite3``::

    store = StudyStore.open("runs/ad/study.sqlite3", "autodiffusion-digits-nfe5",
                            metadata={"model": ..., "solver": "ddim", "nfe": 5, "objective": ...})
    score = store.evaluate(schedule, lambda c: objective(c, "ddim"), solver="ddim")
    store.best().candidate(), store.trials()

What a trial holds (user attributes, so the dashboard shows them): ``candidate`` (the schedule or
plan JSON), ``solver`` (name and config), ``key``, ``score`` (the score's ``std``, ``metric``,
``split``, ``num_samples``, ``nfe``, ``seconds`` and ``per_sample``), the ``worker`` (host, pid,
id) that evaluated it, and the caller's extra attributes. The trial's value is the score's value; its
params ``t0 .. tn`` are the schedule's times (for plots).

- **Duplicates are looked up, not re-evaluated.** A candidate's key is the SHA-256 of its JSON
  (schedule times, plan steps, noise schedule) and of its solver (name, config), with every float
  rounded to :data:`KEY_SIGNIFICANT_DIGITS` significant digits and free-form ``metadata`` left out.
  A completed trial with the same key is returned as it was stored.
- **One evaluation per key, across workers.** A worker claims a candidate by creating its trial
  (atomically, attributes included); if several workers claim one key at once, the lowest trial
  number wins and the others fail their trial as ``lost_claim`` and wait for the winner's result.
- **Killed workers.** A trial left ``RUNNING`` by a dead worker is failed (``stale``) and its
  candidate evaluated again: on the same host a dead process id says so at once, elsewhere Optuna's
  heartbeat (``heartbeat_interval``, ``grace_period``) does.
- **Same study, same settings.** The study records the ``metadata`` it was opened with (model, NFE,
  solver, objective ...); opening it with other metadata or another direction raises ``ValueError``
  instead of mixing two searches in one study.

A search is resumable (and shareable between workers) when its proposals are a deterministic
function of its seed and the values of earlier candidates: rerunning it replays the proposals, and
every candidate already in the store is a lookup. Values round-trip exactly (64-bit floats in
SQLite and PostgreSQL), so the replay takes the same decisions as the first run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from stepsearch.eval.objective import Score
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver

__all__ = [
    "DEFAULT_STORAGE_NAME",
    "KEY_SIGNIFICANT_DIGITS",
    "StoredTrial",
    "StudyStore",
    "candidate_key",
    "storage_url",
]

DEFAULT_STORAGE_NAME = "study.sqlite3"
"""The SQLite file a job keeps its study in (inside its output directory) unless told otherwise."""

KEY_SIGNIFICANT_DIGITS = 10
"""Floats in a candidate's key are rounded to this many significant digits: two schedules whose
times agree to ~1e-10 relative are the same candidate."""

STORE_FORMAT = 1
_STUDY_ATTR = "stepsearch"
_RESERVED_ATTRS = frozenset(
    {"key", "candidate", "solver", "worker", "score", "error", "failed_as", "lost_to", "result"}
)
_DERIVED_KEYS = frozenset({"metadata", "diffusers_timesteps", "kdiffusion_sigmas"})


# keys and URLs ---------------------------------------------------------------------------------
def storage_url(storage: str | os.PathLike[str]) -> str:
    """A database URL for ``storage``: a URL (``scheme://...``) is kept, a path becomes the URL of
    a SQLite file there (its folder is created)."""
    text = os.fspath(storage)
    if not text:
        raise ValueError("storage is empty: give a SQLite file path or a database URL")
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise ValueError(
            f"storage {text!r} is a directory; give a file (e.g. {DEFAULT_STORAGE_NAME})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _solver_json(solver: str | Solver) -> dict[str, Any]:

    resolved = get_solver(solver) if isinstance(solver, str) else solver
    return _plain(solver_to_json(resolved))


def _plain(payload: Any) -> Any:
    """``payload`` as plain JSON (tuples -> lists, numpy scalars -> numbers); ValueError if not JSON."""
    try:
        return json.loads(json.dumps(payload, allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as error:
        raise ValueError(f"not JSON-serialisable: {error}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _rounded(payload: Any) -> Any:
    if isinstance(payload, bool) or payload is None or isinstance(payload, (int, str)):
        return payload
    if isinstance(payload, float):
        return format(payload + 0.0, f".{KEY_SIGNIFICANT_DIGITS}g")  # + 0.0: -0.0 -> 0.0
    if isinstance(payload, Mapping):
        return {k: _rounded(v) for k, v in payload.items() if k not in _DERIVED_KEYS}
    if isinstance(payload, (list, tuple)):
        return [_rounded(v) for v in payload]
    raise ValueError(f"cannot key a {type(payload).__name__}")


def candidate_key(candidate: Any, solver: str | Solver | Mapping[str, Any]) -> str:
    """``sha256:<hex>`` naming ``candidate`` (a StepSchedule or plan) run by ``solver`` (module
    docstring: floats rounded to :data:`KEY_SIGNIFICANT_DIGITS` digits, metadata ignored)."""
    solver_json = dict(solver) if isinstance(solver, Mapping) else _solver_json(solver)
    payload = {"candidate": _rounded(candidate.to_json_dict()), "solver": _rounded(solver_json)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _candidate_from_json(payload: Mapping[str, Any]) -> Any:
    if payload.get("format") == "stepsearch.StepSchedule":
        return StepSchedule.from_json_dict(payload)
    return SolverPlan.from_json_dict(payload)


# workers ---------------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTrial:
    """One trial of the study as a search or a report sees it.

    ``state`` is Optuna's trial state name (``"COMPLETE"``, ``"RUNNING"``, ``"FAIL"``), ``score``
    the stored :class:`~stepsearch.eval.objective.Score` (``None`` unless complete), ``attrs`` the
    caller's extra attributes, ``worker`` ``{"id", "host", "pid"}`` of the worker that claimed it.
    """

    number: int
    state: str
    key: str
    candidate_json: Mapping[str, Any] = field(repr=False)
    solver: Mapping[str, Any]
    score: Score | None
    worker: Mapping[str, Any]
    attrs: Mapping[str, Any]

    @property
    def value(self) -> float | None:
        return None if self.score is None else self.score.value

    def candidate(self) -> Any:
        """The evaluated StepSchedule (or plan), rebuilt from its JSON."""
        return _candidate_from_json(self.candidate_json)

    @classmethod
    def from_frozen(cls, trial: optuna.trial.FrozenTrial) -> StoredTrial:
        attrs = trial.user_attrs
        complete = trial.state == TrialState.COMPLETE
        score = _score_from_attrs(trial.value, attrs["score"]) if complete else None
        return cls(
            number=trial.number,
            state=trial.state.name,
            key=attrs.get("key", ""),
            candidate_json=attrs.get("candidate", {}),
            solver=attrs.get("solver", {}),
            score=score,
            worker=attrs.get("worker", {}),
            attrs={k: v for k, v in attrs.items() if k not in _RESERVED_ATTRS},
        )


def _score_attrs(score: Score, direction: str) -> tuple[float, dict[str, Any]]:
    """The trial value and user attributes that store ``score`` (NaN is stored as the worst value,
    +-inf, with ``nonfinite: "nan"``: Optuna refuses NaN values)."""
    value = float(score.value)
    attrs: dict[str, Any] = {"nonfinite": None}
    if math.isnan(value):
        value = math.inf if direction == "minimize" else -math.inf
        attrs["nonfinite"] = "nan"
    per_sample = None
    if score.per_sample is not None:
        per_sample = [float(v) if math.isfinite(v) else None for v in np.asarray(score.per_sample)]
    std = None if score.std is None or not math.isfinite(score.std) else float(score.std)
    attrs.update(
        std=std,
        metric=score.metric,
        split=score.split,
        num_samples=int(score.num_samples),
        nfe=int(score.nfe),
        seconds=float(score.seconds),
        per_sample=per_sample,
    )
    return value, attrs


def _score_from_attrs(value: float | None, attrs: Mapping[str, Any]) -> Score:
    per_sample = attrs.get("per_sample")
    return Score(
        value=float(value) if value is not None else math.nan,
        std=attrs.get("std"),
        metric=attrs.get("metric", ""),
        split=attrs.get("split", ""),
        num_samples=int(attrs.get("num_samples", 0)),
        nfe=int(attrs.get("nfe", 0)),
        seconds=float(attrs.get("seconds", 0.0)),
        per_sample=None
        if per_sample is None
        else np.asarray([math.nan if v is None else v for v in per_sample], dtype=np.float64),
    )


# the store -------------------------------------------------------------------------------------
class StudyStore:
    """An Optuna study holding a search's evaluated candidates (module docstring).

    Build it with :meth:`open`. ``worker_name`` labels this process's trials (default
    ``host:pid``).
    """

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        study: optuna.Study,
        metadata: Mapping[str, Any],
        *,
        url: str,
        worker_name: str | None = None,
        poll_interval: float = 0.25,
    ):
        self._storage = storage
        self.study = study
        """The Optuna study (for Optuna's own tools: visualisation, ``trials_dataframe``)."""
        self.url = url
        self.metadata = metadata
        self.poll_interval = float(poll_interval)
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self._direction = "minimize" if study.direction.name == "MINIMIZE" else "maximize"
        host = socket.gethostname()
        self.worker = {
            "id": worker_name or f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            "host": host,
            "boot": _boot_id(),
            "pid": os.getpid(),
        }
        self._active: set[int] = set()
        self._complete: dict[str, optuna.trial.FrozenTrial] = {}
        self._last_stale_check = 0.0
        self.evaluations = 0
        """Candidates this process evaluated (not looked up)."""
        self._owns_storage = True

    @classmethod
    def open(
        cls,
        storage: str | os.PathLike[str],
        study_name: str,
        *,
        direction: str = "minimize",
        metadata: Mapping[str, Any],
        worker_name: str | None = None,
        heartbeat_interval: int = 10,
        grace_period: int | None = None,
        poll_interval: float = 0.25,
    ) -> StudyStore:
        """Open (or create) the study ``study_name`` in ``storage`` (a SQLite file path or a
        database URL). An existing study opened with other ``metadata`` or another ``direction``
        raises ``ValueError``. ``heartbeat_interval`` / ``grace_period`` (seconds) set how soon a
        trial of a dead worker on another host is failed."""
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        if not study_name:
            raise ValueError("study_name is empty")
        if int(heartbeat_interval) < 1:
            raise ValueError(f"heartbeat_interval must be >= 1 second, got {heartbeat_interval!r}")
        try:
            recorded = {"format": STORE_FORMAT, "metadata": _plain(dict(metadata))}
        except ValueError as error:
            raise ValueError(f"study metadata is {error}") from None
        url = storage_url(storage)
        rdb = _connect(url, int(heartbeat_interval), grace_period)
        return cls._open_in(rdb, url, study_name, direction, recorded, worker_name, poll_interval)

    def sibling(self, suffix: str, metadata: Mapping[str, Any]) -> StudyStore:
        """Another study in this one's storage, named ``<this study's name>:<suffix>``, opened as
        :meth:`open` opens one (the same direction and worker; ``metadata`` checked the same way):
        for a search's second kind of evaluation beside its trials (S³'s selection seed), which
        resumes and is shared by the workers as the trials are. Close it before this store."""
        if not suffix:
            raise ValueError("suffix is empty")
        try:
            recorded = {"format": STORE_FORMAT, "metadata": _plain(dict(metadata))}
        except ValueError as error:
            raise ValueError(f"study metadata is {error}") from None
        return self._open_in(
            self._storage,
            self.url,
            f"{self.study.study_name}:{suffix}",
            self._direction,
            recorded,
            self.worker["id"],
            self.poll_interval,
            owns_storage=False,
        )

    @classmethod
    def _open_in(
        cls,
        rdb: optuna.storages.RDBStorage,
        url: str,
        study_name: str,
        direction: str,
        recorded: dict[str, Any],
        worker_name: str | None,
        poll_interval: float,
        *,
        owns_storage: bool = True,
    ) -> StudyStore:
        study = optuna.create_study(
            storage=rdb, study_name=study_name, direction=direction, load_if_exists=True
        )
        existing_direction = study.direction.name.lower()
        if existing_direction != direction:
            raise ValueError(
                f"study {study_name!r} in {url} was created to {existing_direction}, "
                f"not to {direction}"
            )
        existing = study.user_attrs.get(_STUDY_ATTR)
        if existing is None:
            study.set_user_attr(_STUDY_ATTR, recorded)
        elif existing != recorded:
            raise ValueError(_metadata_mismatch(study_name, url, existing, recorded))
        store = cls(
            rdb,
            study,
            recorded["metadata"],
            url=url,
            worker_name=worker_name,
            poll_interval=poll_interval,
        )
        store._owns_storage = owns_storage
        return store

    # evaluating --------------------------------------------------------------------------------
    def evaluate(
        self,
        candidate: Any,
        score: Callable[[Any], Score],
        *,
        solver: str | Solver,
        **attrs: Any,
    ) -> Score:
        """The score of ``candidate`` run by ``solver``: the stored one if the study has it, else
        ``score(candidate)`` recorded as a new trial (``attrs``: extra JSON user attributes). If
        another worker is evaluating it, wait for its result."""
        return self.evaluate_many([candidate], score, solver=solver, attrs=[attrs])[0]

    def evaluate_many(
        self,
        candidates: Sequence[Any],
        score: Callable[[Any], Score],
        *,
        solver: str | Solver,
        attrs: Sequence[Mapping[str, Any]] | None = None,
        on_score: Callable[[int, Score], None] | None = None,
    ) -> list[Score]:
        """Scores of ``candidates`` (in order), as :meth:`evaluate` gives them, sharing the work
        with other workers: a candidate another worker is evaluating is deferred while this worker
        evaluates the next, then waited for. ``on_score(index, score)`` is called as each one
        becomes known (for progress bars)."""
        if attrs is not None and len(attrs) != len(candidates):
            raise ValueError(f"{len(attrs)} attribute sets for {len(candidates)} candidates")
        extra = [self._checked_attrs(a) for a in (attrs or [{}] * len(candidates))]
        solver_json = _solver_json(solver)
        keys = [candidate_key(c, solver_json) for c in candidates]
        results: dict[int, Score] = {}
        pending = list(range(len(candidates)))
        while pending:
            deferred = []
            for index in pending:
                outcome = self._try(
                    candidates[index], keys[index], solver_json, score, extra[index]
                )
                if outcome is None:
                    deferred.append(index)
                else:
                    results[index] = outcome
                    if on_score is not None:
                        on_score(index, outcome)
            if len(deferred) == len(pending):
                time.sleep(self.poll_interval)  # every one is being evaluated elsewhere
            pending = deferred
        return [results[i] for i in range(len(candidates))]

    def run_task(
        self, key: str, work: Callable[[], Mapping[str, Any]], **attrs: Any
    ) -> dict[str, Any] | None:
        """A unit of work shared by the workers of one study, claimed like a candidate (one
        worker runs it; a dead worker's claim is failed and the task run again): the stored
        result (the JSON object ``work()`` returned, user attribute ``result``) if a worker
        finished it, ``None`` while another worker runs it, else ``work()`` run here and stored.
        ``key``: the task's name, unique in the study; ``attrs``: extra JSON user attributes."""
        extra = self._checked_attrs(attrs)
        if key not in self._complete:
            running = [t for t in self._refresh() if t.user_attrs.get("key") == key]
            if key not in self._complete and any(not self._fail_if_stale(t) for t in running):
                return None
        if key in self._complete:
            return dict(self._complete[key].user_attrs["result"])
        trial_id, number = self._create_running(key, {}, {}, extra)
        winner = min(
            (t for t in self._refresh() if t.user_attrs.get("key") == key),
            key=lambda t: t.number,
            default=None,
        )
        if key in self._complete or (winner is not None and winner.number < number):
            lost_to = self._complete[key].number if key in self._complete else winner.number
            self._finish_failed(trial_id, failed_as="lost_claim", lost_to=lost_to)
            return dict(self._complete[key].user_attrs["result"]) if key in self._complete else None
        try:
            with self._heartbeat(trial_id):
                result = _plain(dict(work()))
            self._storage.set_trial_user_attr(trial_id, "result", result)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.0])
        except BaseException as error:
            self._finish_failed(
                trial_id, failed_as="error", error=f"{type(error).__name__}: {error}"
            )
            raise
        finally:
            self._active.discard(trial_id)
        stored = self._storage.get_trial(trial_id)
        if stored.state == TrialState.COMPLETE:
            self._complete.setdefault(key, stored)
        return result

    def lookup(self, candidate: Any, solver: str | Solver) -> StoredTrial | None:
        """The completed trial of ``candidate`` run by ``solver``, or ``None``."""
        key = candidate_key(candidate, solver)
        found = self._completed(key)
        return None if found is None else StoredTrial.from_frozen(found)

    # reports -----------------------------------------------------------------------------------
    def trials(self, states: Sequence[str] = ("COMPLETE",)) -> list[StoredTrial]:
        """Trials in ``states`` (Optuna state names), by trial number."""
        wanted = tuple(TrialState[s] for s in states)
        frozen = self.study.get_trials(deepcopy=False, states=wanted)
        return [StoredTrial.from_frozen(t) for t in sorted(frozen, key=lambda t: t.number)]

    def best(self) -> StoredTrial | None:
        """The completed trial with the best value (the earliest among ties), or ``None``."""
        complete = self.trials()
        if not complete:
            return None
        sign = 1.0 if self._direction == "minimize" else -1.0
        return min(complete, key=lambda t: (sign * t.value, t.number))

    def count(self, state: str = "COMPLETE") -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState[state],)))

    def close(self) -> None:
        """Release the database connections (a :meth:`sibling` leaves them to its parent)."""
        self._storage.remove_session()
        if self._owns_storage:
            self._storage.engine.dispose()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals ---------------------------------------------------------------------------------
    def _checked_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        clash = sorted(set(attrs) & _RESERVED_ATTRS)
        if clash:
            raise ValueError(f"attribute names {clash} are reserved by the store")
        try:
            return _plain(dict(attrs))
        except ValueError as error:
            raise ValueError(f"trial attributes are {error}") from None

    def _completed(self, key: str) -> optuna.trial.FrozenTrial | None:
        if key not in self._complete:
            self._refresh()
        return self._complete.get(key)

    def _refresh(self) -> list[optuna.trial.FrozenTrial]:
        """Read the study; remember completed trials by key; return the running ones. (Reads go
        through the study's trial cache, which fetches only new and unfinished trials.)"""
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)
        )
        running = []
        for trial in sorted(trials, key=lambda t: t.number):
            key = trial.user_attrs.get("key")
            if key is None:
                continue
            if trial.state == TrialState.COMPLETE:
                self._complete.setdefault(key, trial)
            else:
                running.append(trial)
        return running

    def _try(
        self,
        candidate: Any,
        key: str,
        solver_json: Mapping[str, Any],
        score: Callable[[Any], Score],
        attrs: Mapping[str, Any],
    ) -> Score | None:
        """Look ``candidate`` up, or claim and evaluate it; ``None`` while another worker has it."""
        if key in self._complete:
            return self._stored_score(self._complete[key])
        running = [t for t in self._refresh() if t.user_attrs.get("key") == key]
        if key in self._complete:
            return self._stored_score(self._complete[key])
        if any(not self._fail_if_stale(t) for t in running):
            return None
        trial_id, number = self._claim(candidate, key, solver_json, attrs)
        winner = min(
            (t for t in self._refresh() if t.user_attrs.get("key") == key),
            key=lambda t: t.number,
            default=None,
        )
        if key in self._complete or (winner is not None and winner.number < number):
            lost_to = self._complete[key].number if key in self._complete else winner.number
            self._finish_failed(trial_id, failed_as="lost_claim", lost_to=lost_to)
            return self._stored_score(self._complete[key]) if key in self._complete else None
        return self._run(trial_id, candidate, key, score)

    def _claim(
        self, candidate: Any, key: str, solver_json: Mapping[str, Any], attrs: Mapping[str, Any]
    ) -> tuple[int, int]:
        schedule: StepSchedule = getattr(candidate, "schedule", candidate)
        high = max(float(schedule.noise.t_max), float(schedule.times[0]))
        return self._create_running(
            key,
            {f"t{i}": float(t) for i, t in enumerate(schedule.times)},
            {f"t{i}": FloatDistribution(0.0, high) for i in range(schedule.times.size)},
            {
                **attrs,
                "candidate": _plain(candidate.to_json_dict()),
                "solver": dict(solver_json),
            },
        )

    def _create_running(
        self,
        key: str,
        params: Mapping[str, float],
        distributions: Mapping[str, Any],
        attrs: Mapping[str, Any],
    ) -> tuple[int, int]:
        """A RUNNING trial of ``key`` created with its attributes in one step (the claim)."""
        template = optuna.trial.FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.datetime.now(),  # as Optuna's own running trials
            datetime_complete=None,
            params=dict(params),
            distributions=dict(distributions),
            user_attrs={**attrs, "key": key, "worker": dict(self.worker)},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
        trial_id = self._storage.create_new_trial(self._study_id, template_trial=template)
        self._active.add(trial_id)
        if self._storage.get_heartbeat_interval() is not None:
            self._storage.record_heartbeat(trial_id)
        return trial_id, self._storage.get_trial_number_from_id(trial_id)

    def _run(self, trial_id: int, candidate: Any, key: str, score: Callable[[Any], Score]) -> Score:
        try:
            with self._heartbeat(trial_id):
                result = score(candidate)
            if not isinstance(result, Score):
                raise TypeError(f"score(candidate) must return a Score, got {type(result)}")
            value, attrs = _score_attrs(result, self._direction)
            self._storage.set_trial_user_attr(trial_id, "score", attrs)
            # failed as stale meanwhile (a long pause)? our result still stands
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        except BaseException as error:
            self._finish_failed(
                trial_id, failed_as="error", error=f"{type(error).__name__}: {error}"
            )
            raise
        finally:
            self._active.discard(trial_id)
        self.evaluations += 1
        stored = self._storage.get_trial(trial_id)
        if stored.state == TrialState.COMPLETE:
            self._complete.setdefault(key, stored)
        return _score_from_attrs(value, attrs)

    def _stored_score(self, trial: optuna.trial.FrozenTrial) -> Score:
        return _score_from_attrs(trial.value, trial.user_attrs["score"])

    def _finish_failed(self, trial_id: int, **attrs: Any) -> None:
        try:
            for name, value in attrs.items():
                self._storage.set_trial_user_attr(trial_id, name, value)
            self._storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        self._active.discard(trial_id)

    def _fail_if_stale(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Fail ``trial`` (RUNNING) if its worker is dead; return whether it was stale."""
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(
            self._study_id, trial.number
        )
        worker = trial.user_attrs.get("worker", {})
        if worker.get("id") == self.worker["id"]:
            stale = trial_id not in self._active  # left behind by an exception in this store
        elif (
            worker.get("host") == self.worker["host"] and worker.get("boot") == self.worker["boot"]
        ):
            stale = not _pid_alive(int(worker.get("pid", -1)))
        else:
            stale = self._heartbeat_stale(trial_id)
        if stale:
            self._finish_failed(trial_id, failed_as="stale")
        return stale

    def _heartbeat_stale(self, trial_id: int) -> bool:
        if time.monotonic() - self._last_stale_check > self.poll_interval * 4:
            self._last_stale_check = time.monotonic()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        return self._storage.get_trial(trial_id).state == TrialState.FAIL

    @contextlib.contextmanager
    def _heartbeat(self, trial_id: int) -> Iterator[None]:
        interval = self._storage.get_heartbeat_interval()
        if interval is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                with contextlib.suppress(Exception):  # a missed beat is not fatal
                    self._storage.record_heartbeat(trial_id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _connect(url: str, heartbeat_interval: int, grace_period: int | None) -> Any:
    """An RDBStorage for ``url``. A bare ``postgresql://`` URL is driven by psycopg 3 (the
    ``postgres`` extra; SQLAlchemy before 2.1 would look for psycopg2). Two processes creating
    one SQLite file at once can race on its tables; a retry settles it."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            url = "postgresql+psycopg://" + url[len(bare) :]
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
            break
        except ImportError as error:
            raise ValueError(
                f"no database driver for {url.split('://', 1)[0]}: {error} "
                '(PostgreSQL: pip install "stepsearch[postgres]")'
            ) from None
        except Exception:  # sqlalchemy.exc.OperationalError / IntegrityError while racing
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    if url.startswith("sqlite"):
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # later connections get the pragmas
    return storage


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    """Write-ahead logging: readers do not block the writer (several workers on one file), and a
    commit costs one fsync at checkpoints instead of one per transaction. Committed trials survive
    a killed process (not necessarily a power cut, which is SQLite's documented trade-off)."""
    del record
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _metadata_mismatch(
    study_name: str, url: str, existing: Mapping[str, Any], recorded: Mapping[str, Any]
) -> str:
    old = existing.get("metadata", {}) if isinstance(existing, Mapping) else {}
    new = recorded["metadata"]
    differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    details = "; ".join(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in differing[:6])
    return (
        f"study {study_name!r} in {url} belongs to another search ({details or 'format differs'}); "
        "use another --storage / study name, or the settings it was made with"
    )
