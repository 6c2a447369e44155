"""Progress shows while it goes when stderr is not a terminal (a log, a pipe, CI): plain lines at
most every interval and one at the end, for the search bars (rich in a terminal) and the teacher /
DP / OLSS bars (tqdm in a terminal) alike."""

from __future__ import annotations

import io

from stepsearch._progress import PlainProgress, progress_bar
from stepsearch.search.job import SearchProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_interval_and_one_at_the_end():
    clock, stream = Clock(), io.StringIO()
    bar = PlainProgress(total=30, desc="teacher", interval=10.0, stream=stream, clock=clock)
    for second in range(25):  # one update a second for 25 s
        clock.now = 100.0 + second + 1
        bar.update()
    assert stream.getvalue().splitlines() == ["teacher: 10/30 [0:10]", "teacher: 20/30 [0:20]"]
    bar.set_postfix_str("fit")
    bar.close()
    bar.close()  # once
    assert stream.getvalue().splitlines()[-1] == "teacher: 25/30 [0:25] fit"
    assert len(stream.getvalue().splitlines()) == 3


def test_the_line_at_the_end_is_not_a_repeat_of_the_last_periodic_line():
    clock, stream = Clock(), io.StringIO()
    bar = PlainProgress(total=20, desc="held-out", interval=10.0, stream=stream, clock=clock)
    for second in range(20):  # the 20th update lands on a periodic line
        clock.now = 100.0 + second + 1
        bar.update()
    clock.now += 0.5
    bar.close()
    assert stream.getvalue().splitlines() == ["held-out: 10/20 [0:10]", "held-out: 20/20 [0:20]"]


def test_disabled_prints_nothing_and_iteration_counts():
    stream = io.StringIO()
    assert list(PlainProgress(range(3), desc="x", disable=True, stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""
    bar = PlainProgress(range(4), desc="chunks", interval=1e9, stream=stream)
    assert list(bar) == [0, 1, 2, 3]
    assert stream.getvalue().splitlines() == ["chunks: 4/4 [0:00]"]


def test_bars_are_plain_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("STEPSEARCH_PROGRESS_INTERVAL", "0")  # a line per update
    bar = progress_bar(total=2, desc="DP schedules")
    assert isinstance(bar, PlainProgress)
    bar.set_description("DP coefficient table")
    bar.update()
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "DP coefficient table: 0/2 [0:00]",
        "DP coefficient table: 1/2 [0:00]",  # not again at the end: it said it already
    ]
    search = SearchProgress(5, "AutoDiffusion unipc_bh2 NFE 5")
    with search.running():
        search.update(1, 3.5)
        search.budget = 8  # set late (DP)
        search.update(2, 2.25)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "AutoDiffusion unipc_bh2 NFE 5: 1/5 [0:00] best 3.5"
    assert lines[1] == "AutoDiffusion unipc_bh2 NFE 5: 2/8 [0:00] best 2.25"
    assert lines[-1] == "AutoDiffusion unipc_bh2 NFE 5: 2/8 [0:00] best 2.25"  # at the end


def test_a_terminal_gets_live_bars(monkeypatch):
    monkeypatch.setattr("stepsearch._progress.interactive", lambda stream=None: True)
    bar = progress_bar(total=2, desc="teacher", disable=True)
    assert not isinstance(bar, PlainProgress)  # tqdm redraws in place
    bar.close()
