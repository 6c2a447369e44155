"""Progress that shows while it goes, in a terminal or in a log.

Live bars (rich, tqdm) redraw one line with carriage returns: in a terminal that is a bar, in a log
file or a pipe it is nothing until the end (rich) or one ever-growing line (tqdm). Every bar of
stepsearch goes through :func:`progress_bar`: a tqdm bar when stderr is a terminal, else a
:class:`PlainProgress` that prints a plain line at most every :data:`INTERVAL` seconds and one when
it ends (``STEPSEARCH_PROGRESS_INTERVAL`` sets the interval).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["INTERVAL", "PlainProgress", "interactive", "progress_bar"]

INTERVAL = 10.0
"""Seconds between two plain progress lines (at most one line per interval)."""


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, where live bars redraw in place."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _interval() -> float:
    configured = os.environ.get("STEPSEARCH_PROGRESS_INTERVAL")
    return float(configured) if configured else INTERVAL


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class PlainProgress:
    """Plain progress lines, ``description: done/total [elapsed] postfix``: at most one per
    ``interval`` seconds while it runs, and one when it closes (the small part of tqdm's API that
    stepsearch uses: ``update``, ``set_description``, ``set_postfix_str``, ``total``, ``n``,
    ``close``, iteration)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        disable: bool = False,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Any = time.monotonic,
        **_: Any,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.disable = disable
        self.n = 0
        self.postfix = ""
        self.interval = _interval() if interval is None else float(interval)
        self._stream = stream
        self._clock = clock
        self._began = clock()
        self._printed = self._began
        self._printed_state: tuple[str, int, str] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more done; a line if ``interval`` seconds passed since the last one."""
        self.n += n
        self._maybe_print()

    def set_completed(self, done: int, postfix: str | None = None) -> None:
        """``done`` in all (and a new ``postfix``); a line if the interval has passed."""
        self.n = done
        if postfix is not None:
            self.postfix = postfix
        self._maybe_print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._maybe_print()

    def set_description(self, text: str = "", refresh: bool = True) -> None:
        self.desc = text
        self._maybe_print()

    def close(self) -> None:
        """The last line (once; not again when the last periodic line already said it)."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self._printed_state != self._state():
            self._print()

    def line(self) -> str:
        """What a progress line says now."""
        total = "?" if self.total is None else str(self.total)
        elapsed = _duration(self._clock() - self._began)
        postfix = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{total} [{elapsed}]{postfix}"

    def _maybe_print(self) -> None:
        if not self.disable and self._clock() - self._printed >= self.interval:
            self._print()

    def _state(self) -> tuple[str, int, str]:
        return (self.desc, self.n, self.postfix)

    def _print(self) -> None:
        self._printed = self._clock()
        self._printed_state = self._state()
        stream = sys.stderr if self._stream is None else self._stream
        print(self.line(), file=stream, flush=True)


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    disable: bool = False,
    leave: bool = True,
    **options: Any,
) -> Any:
    """A tqdm bar in a terminal, else a :class:`PlainProgress` (module docstring); the arguments
    are tqdm's."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, leave=leave, **options)
    return PlainProgress(iterable, total=total, desc=desc, disable=disable)
