"""What the command modules share: the console, the usage-error exit, list options that take
several values after one flag, and the result-table view."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from stepsearch.eval.evaluate import METRIC_TITLES
from stepsearch.eval.report import ResultTable

console = Console()
errors = Console(stderr=True)

USAGE_ERROR = 2
"""Exit status of a usage error (click's own, for bad options, too)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""What the library raises for a user's mistake (its messages name the option and the value);
anything else is a bug and keeps its traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """:data:`USER_ERRORS` plus the unreadable-file errors of the libraries models are read with
    (a truncated safetensors file, a config diffusers cannot parse)."""
    extra: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        extra.append(SafetensorError)
    return (*USER_ERRORS, *extra)


def report_user_error(error: BaseException) -> typer.Exit:
    """Print ``error: ...`` (one line, no traceback) and return the exit to raise (status 2)."""
    errors.print(f"[red]error:[/red] {escape(str(error))}")
    return typer.Exit(USAGE_ERROR)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn a user's mistake reported by the library (:data:`USER_ERRORS`) into ``error: ...``
    and exit status 2, instead of a traceback. The root command group does the same for every
    command (:class:`HelpGroup`); this marks where a command expects them."""
    try:
        yield
    except _user_errors() as error:
        raise report_user_error(error) from None


@contextlib.contextmanager
def one_line_warnings(*categories: type[Warning]) -> Iterator[None]:
    """Print the library's warnings of ``categories`` as one ``warning: ...`` line each on
    stderr (not Python's two-line form with a source line); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, categories):
                    errors.print(
                        f"[yellow]warning:[/yellow] {escape(str(warning.message))}", soft_wrap=True
                    )
                else:
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )


def expand_list_options(args: Iterable[str], list_options: set[str]) -> list[str]:
    """``--nfe 4 5 6`` and ``--nfe 4,5,6`` -> ``--nfe 4 --nfe 5 --nfe 6`` for the flags in
    ``list_options``; every other token is kept as it is."""
    expanded: list[str] = []
    current: str | None = None
    for token in args:
        if token.startswith("-") and not _is_number(token):  # --nfe -3: a (bad) value
            current = token if token in list_options else None
            if current is None:
                expanded.append(token)
            continue
        if current is None:
            expanded.append(token)
            continue
        expanded += [item for value in token.split(",") if value for item in (current, value)]
    return expanded


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class ListOptionsCommand(TyperCommand):
    """A command whose list options (``list[...]`` parameters) also take several values after one
    flag, ``--nfe 4 5 6``, and comma lists, ``--nfe 4,5,6``, besides repeated flags.

    click gives an option one value per occurrence; this spells the short forms out as repeated
    flags before click parses them. Flags (``--save-samples``) show no ``<bool>`` type label.
    """

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # the help option included
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        names = {
            name
            for param in self.params
            if isinstance(param, TyperOption) and param.multiple
            for name in param.opts
        }
        return super().parse_args(ctx, expand_list_options(args, names))


class HelpGroup(TyperGroup):
    """A command group whose ``--help`` row shows no ``<bool>`` type label, and the CLI's one
    error boundary: a user's mistake that reaches it from any command (:data:`USER_ERRORS`,
    an unreadable model file) becomes one ``error: ...`` line and exit status 2; bad option values
    were refused before, while parsing (:mod:`stepsearch.cli.checks`)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _user_errors() as error:
            raise report_user_error(error) from None
        except OSError as error:  # diffusers: "the config file at ... is not a valid JSON file"
            if error.errno is not None:
                raise  # an operating-system failure (disk full, ...), not the user's input
            raise report_user_error(error) from None

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


def print_table(table: ResultTable) -> None:
    """Methods as rows, NFE as columns, the best of each column in bold green."""
    best = {nfe: table.best(nfe) for nfe in table.nfes}
    view = Table(title=METRIC_TITLES.get(table.metric, table.metric))
    view.add_column("method")
    for nfe in table.nfes:
        view.add_column(f"NFE {nfe}", justify="right")
    for method in table.methods:
        cells = []
        for nfe in table.nfes:
            value = table.value(method, nfe)
            text = "–" if value is None else f"{value:.3g}"
            cells.append(f"[bold green]{text}[/]" if best[nfe] == method else text)
        view.add_row(method, *cells)
    console.print(view)


def print_loading_code(scheduler_dir: str | os.PathLike[str] | None) -> None:
    """Print the line of Python that loads ``scheduler_dir`` (its class read from the directory:
    :func:`~stepsearch.integrations.load.loading_code`), flush left and unwrapped so that it can
    be pasted into Python as it is."""
    if scheduler_dir is None:
        return
    from stepsearch.integrations.load import loading_code

    try:
        line = loading_code(scheduler_dir)
    except ValueError as error:  # a folder edited or removed since: say so, the run is done
        errors.print(f"[yellow]note:[/yellow] {escape(str(error))}")
        return
    console.print(escape(line), soft_wrap=True, highlight=False)


def print_unreachable(cells: list[tuple[str, int]]) -> None:
    """Say which (method, NFE) cells were skipped because no step count spends exactly that NFE."""
    by_method: dict[str, list[int]] = {}
    for label, nfe in cells:
        by_method.setdefault(label, []).append(nfe)
    for label, nfes in by_method.items():
        shown = ", ".join(map(str, nfes))
        errors.print(
            f"[yellow]note:[/yellow] {escape(label)} cannot spend exactly NFE {shown} "
            "(no step count does): not measured"
        )
