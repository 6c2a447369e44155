"""``stepsearch search``: the group every schedule / solver-plan search adds its command to.

Each search family lives in its own module ``stepsearch/cli/search_<family>.py``, found and
imported by :mod:`stepsearch.cli` at start-up (see its docstring for the three lines it takes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer

from stepsearch.cli._common import HelpGroup, ListOptionsCommand

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

search_app = typer.Typer(
    help="Search for step schedules and solver plans (one command per search family).",
    no_args_is_help=True,
    cls=HelpGroup,
)


def search_command(name: str) -> Callable[[CommandFunction], CommandFunction]:
    """Register the decorated function as ``stepsearch search NAME`` (list options take several
    values, as in every other command)."""
    return search_app.command(name, cls=ListOptionsCommand)
