"""``stepsearch search``: the group every schedule / solver-plan search adds its command to.

Each search family lives in its own module ``stepsearch/cli/search_<family>.py``, found and
imported by :mod:`stepsearch.cli` at start-up (see its docstring for the three lines it takes).
The commands agree with each other and with ``optimize``: the shared options are the types of
:mod:`stepsearch.cli.options` with the defaults of this module (``--model digits``, ``--nfe 6``,
``--out stepsearch-<family>``, ``--device cpu``, ``--dtype float32``, ``--seed 0``,
``--num-samples 256``, ``--held-out-samples 1000`` ...; ``tests/test_cli_search_options.py``
walks every command and checks them). A renamed option keeps its old spelling as a hidden alias
that still works and warns (``deprecated=`` of :func:`search_command`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import typer

from stepsearch.cli._common import HelpGroup, ListOptionsCommand, errors

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

__all__ = [
    "DEFAULT_HELD_OUT_SAMPLES",
    "DEFAULT_NFE",
    "DEFAULT_NUM_SAMPLES",
    "DeprecatedAliasCommand",
    "model_or_default",
    "objective_metric",
    "search_app",
    "search_command",
]

DEFAULT_NFE = 6
"""``--nfe`` of every search (``optimize`` searches 4, 6 and 8)."""
DEFAULT_NUM_SAMPLES = 256
"""``--num-samples``: samples per candidate on the search seed."""
DEFAULT_HELD_OUT_SAMPLES = 1000
"""``--held-out-samples``: samples of the held-out scores."""


search_app = typer.Typer(
    help="Search for step schedules and solver plans (one command per search family).",
    no_args_is_help=True,
    cls=HelpGroup,
)


class DeprecatedAliasCommand(ListOptionsCommand):
    """A command whose renamed options still take their old spelling: ``aliases`` maps an old
    flag to its new name; the old one is not in ``--help``, works, and prints one
    ``warning: --old is deprecated; use --new`` line on stderr."""

    aliases: ClassVar[Mapping[str, str]] = {}

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, [self._renamed(token) for token in args])

    def _renamed(self, token: str) -> str:
        flag, equals, value = token.partition("=")
        new = self.aliases.get(flag)
        if new is None:
            return token
        errors.print(f"[yellow]warning:[/yellow] {flag} is deprecated; use {new}")
        return f"{new}{equals}{value}"


def search_command(
    name: str, *, deprecated: Mapping[str, str] | None = None
) -> Callable[[CommandFunction], CommandFunction]:
    """Register the decorated function as ``stepsearch search NAME`` (list options take several
    values, as in every other command; ``deprecated`` maps old flags to their new names)."""
    command_class = type(
        f"{name.title()}Command", (DeprecatedAliasCommand,), {"aliases": dict(deprecated or {})}
    )
    return search_app.command(name, cls=command_class)


def objective_metric(metric: str | None, pipeline: object) -> str:
    """``--metric``, or its default: ``fd`` on a model, ``traj`` on a pipeline (no feature
    network for FD there)."""
    return metric or ("traj" if pipeline is not None else "fd")


def model_or_default(model: str | None, pipeline: object) -> str | None:
    """``--model``, or ``digits`` unless ``--pipeline`` is given."""
    return model if model is not None or pipeline is not None else "digits"
