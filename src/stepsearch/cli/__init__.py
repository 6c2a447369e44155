"""The ``stepsearch`` command: one command, subcommands, sensible defaults.

One thin module per subcommand, argument parsing only (the work is done in the library):

============================  ==============================================================
``stepsearch demo``           :mod:`stepsearch.cli.demo` -> :func:`stepsearch.search.optimize.optimize`
``stepsearch optimize``       :mod:`stepsearch.cli.optimize` -> :func:`stepsearch.search.optimize.optimize`
``stepsearch eval``           :mod:`stepsearch.cli.eval` -> :func:`stepsearch.eval.evaluate.evaluate`
``stepsearch stats``          :mod:`stepsearch.cli.stats` -> :func:`~stepsearch.eval.evaluate.compute_statistics`
``stepsearch export``         :mod:`stepsearch.cli.export` -> :mod:`stepsearch.integrations.export`
``stepsearch schedule ...``   :mod:`stepsearch.cli.schedule`
``stepsearch search ...``     :mod:`stepsearch.cli.search` and every ``cli/search_<family>.py``
============================  ==============================================================

Adding a search command: create ``src/stepsearch/cli/search_<family>.py`` holding

.. code-block:: python

    from stepsearch.cli.search import DEFAULT_NFE, search_command

    from stepsearch.cli import options

    @search_command("<family>")
    def family_command(model: options.OptionalModel = None, nfe: options.NFE = DEFAULT_NFE,
                       ...) -> None:
        # docstring: a one-line summary, a blank line, the details (what it writes, resuming)
        ...  # typer options; call the library (stepsearch.search.family.run_job), print, exit

Shared options (``--model``, ``--pipeline``, ``--prompts``, ``--guidance-scale``, ``--nfe``,
``--solver``, ``--out``, ``--storage``, ``--seed``, ``--num-samples``, ``--device``...) are the
``Annotated`` types of :mod:`stepsearch.cli.options`, defined once, with the defaults of
:mod:`stepsearch.cli.search` (``tests/test_cli_search_options.py`` checks every command). Nothing else: every ``search_*`` module of this package is imported when the command starts, and
``stepsearch search <family> --help`` lists its options. List options (``list[int]`` ...) take
several values after one flag (``--nfe 4 5 6``) in every command (:class:`ListOptionsCommand`);
wrap the library call in ``with usage_errors():`` so a ``ValueError`` prints ``error: ...`` and
exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import typer

from stepsearch.cli import demo, eval, export, optimize, stats
from stepsearch.cli._common import HelpGroup, ListOptionsCommand, expand_list_options, usage_errors
from stepsearch.cli.schedule import schedule_app
from stepsearch.cli.search import search_app, search_command

__all__ = [
    "ListOptionsCommand",
    "app",
    "expand_list_options",
    "main",
    "search_app",
    "search_command",
    "usage_errors",
]

app = typer.Typer(
    help="Optimized sampling schedules for diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    cls=HelpGroup,
)
app.command("demo", cls=ListOptionsCommand)(demo.demo_command)
app.command("optimize", cls=ListOptionsCommand)(optimize.optimize_command)
app.command("eval", cls=ListOptionsCommand)(eval.eval_command)
app.command("stats", cls=ListOptionsCommand)(stats.stats_command)
app.command("export", cls=ListOptionsCommand)(export.export_command)
app.add_typer(schedule_app, name="schedule")
app.add_typer(search_app, name="search")


def _import_search_commands() -> None:
    """Import every ``stepsearch.cli.search_<family>`` module: each registers its commands."""
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("search_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_search_commands()


def main() -> None:
    """The console script ``stepsearch``. Optuna's per-trial INFO lines are silenced: the search
    commands show their own progress bars."""
    logging.getLogger("optuna").setLevel(logging.WARNING)
    app(prog_name="stepsearch")
