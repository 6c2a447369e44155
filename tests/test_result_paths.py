"""Result files name the files beside them by run-relative paths: never by where the machine that
ran the job kept them (issue 23). Unit checks of :func:`stepsearch._io.run_relative` and a scan of
the committed optimize results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stepsearch._io import run_relative

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MACHINE_PATH = re.compile(r"(?<![\w.])/(tmp|work|home|root|Users)/")


def test_run_relative_inside_outside_and_sqlite(tmp_path):
    run = tmp_path / "run"
    assert run_relative(run / "nfe-4" / "scheduler", run) == "nfe-4/scheduler"
    assert run_relative(str(run / "best_schedule.json"), run) == "best_schedule.json"
    outside = tmp_path / "elsewhere" / "x.json"
    assert run_relative(outside, run) == str(outside)  # not ours to rename
    assert run_relative(f"sqlite:///{run / 'study.sqlite3'}", run) == "study.sqlite3"
    url = "postgresql://user@host:5432/db"
    assert run_relative(url, run) == url
    elsewhere = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    assert run_relative(elsewhere, run) == elsewhere


COMMITTED = [
    *sorted(p for p in (RESULTS / "optimize_run").rglob("*") if p.suffix in (".json", ".md")),
    RESULTS / "optimize.json",
    RESULTS / "optimize.md",
]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_optimize_results_hold_no_machine_paths(path):
    text = path.read_text(encoding="utf-8")
    assert not MACHINE_PATH.search(text), MACHINE_PATH.search(text).group(0)
    if path.name == "winner.json":  # and what it names is there, beside it
        for name in json.loads(text)["files"].values():
            assert (path.parent / name).exists(), name
