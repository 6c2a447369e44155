"""The ``search`` subcommands agree with each other and with ``optimize``: every command's click
parameters are walked and the shared options checked for the same flag, default, type and
metavar; renamed options keep their old spelling as a hidden alias that works and warns; every
``--help`` reads alike (a one-line summary, then the details; defaults shown)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.cli.search import search_app

SEARCHES = ("dp", "autodiffusion", "s3", "olss", "ays", "guidance")

# flag -> (default, type, metavar); the same in every search command that has it
SHARED = {
    "--model": (None, "str", "NAME|DIR"),
    "--nfe": (6, "int", "N"),
    "--device": ("cpu", "str", "NAME"),
    "--dtype": ("float32", "str", "NAME"),
    "--seed": (0, "int", "N"),
    "--progress": (True, "bool", None),
    "--guidance-scale": (None, "float", "G"),
    "--held-out-samples": (1000, "int", "N"),
}
# the options every search command has (the rest of SHARED where the family has a use for it)
EVERYWHERE = ("--model", "--nfe", "--out", "--device", "--dtype", "--seed", "--progress",
              "--guidance-scale", "--held-out-samples")  # fmt: skip
OBJECTIVE = {  # searches scoring candidates on an objective: --num-samples, --metric
    "dp": "fd / traj", "autodiffusion": "fd / traj", "s3": "fd / traj", "ays": "traj",
    "guidance": None,  # judged by FD and accuracy together
}  # fmt: skip
STORE = ("dp", "autodiffusion", "s3", "guidance")  # trials in a study store
CACHE = ("dp", "autodiffusion", "s3", "olss", "ays")
PIPELINE = ("dp", "autodiffusion", "s3", "olss", "ays", "guidance")
EXCEPTIONS = {  # by nature, not by accident
    ("guidance", "--model"): "digits-cond",  # guidance needs a class-conditional model
    ("guidance", "--nfe"): 12,  # it counts network passes: 6 guided steps
}
OPTIMIZE_SHARED = ("--model", "--out", "--device", "--dtype", "--pipeline", "--prompts",
                   "--guidance-scale")  # fmt: skip


def _command(name: str, group: typer.Typer = search_app) -> Any:
    return typer.main.get_command(group).commands[name]  # type: ignore[attr-defined]


def _options(command: Any) -> dict[str, TyperOption]:
    return {
        opt: param
        for param in command.params
        if isinstance(param, TyperOption)
        for opt in param.opts
    }


def _spec(option: TyperOption) -> tuple[object, str, str | None]:
    """typer vendors click: its parameter classes are typer's."""
    metavar = None if option.is_flag else option.metavar
    return option.default, option.type_descriptor.annotation.__name__, metavar


@pytest.mark.parametrize("name", SEARCHES)
def test_shared_options_have_one_name_default_type_and_metavar(name):
    options = _options(_command(name))
    for flag in EVERYWHERE:
        assert flag in options, f"search {name} lacks {flag}"
    for flag, (default, type_name, metavar) in SHARED.items():
        if flag not in options:
            continue
        expected = (EXCEPTIONS.get((name, flag), default), type_name, metavar)
        if (name, flag) == ("guidance", "--model"):
            expected = ("digits-cond", "str", "NAME|DIR")
        assert _spec(options[flag]) == expected, (name, flag)
    out = options["--out"]
    assert (str(out.default), out.metavar) == (f"stepsearch-{name}", "DIR")
    if name in OBJECTIVE:
        assert _spec(options["--num-samples"]) == (256, "int", "N"), name
        assert options["--num-samples"].min == options["--held-out-samples"].min == 2
        if OBJECTIVE[name] is not None:
            assert options["--metric"].metavar == "NAME"
    if name in STORE:
        assert _spec(options["--storage"]) == (None, "str", "FILE|URL"), name
        assert _spec(options["--study-name"]) == (None, "str", "NAME"), name
    if name in CACHE:
        assert _spec(options["--cache"]) == (None, "Path", "DIR"), name
    if name in PIPELINE:
        assert _spec(options["--pipeline"]) == (None, "Path", "DIR"), name
    if "--solver" in options:  # nothing a search needs is required
        assert options["--solver"].default is not None
    required = [param.name for param in _command(name).params if param.required]
    assert required == [], f"search {name} requires {required}"


def test_searches_and_optimize_agree():
    optimize = _options(_command("optimize", app))
    for name in SEARCHES:
        options = _options(_command(name))
        for flag in OPTIMIZE_SHARED:
            if flag not in options:
                continue
            mine, theirs = options[flag], optimize[flag]
            assert (_spec(mine)[1:], mine.help) == (
                _spec(theirs)[1:],
                theirs.help,
            ) or flag in ("--out", "--model"), (name, flag)
    # the same help text for the same option everywhere (one definition in cli/options.py)
    helps: dict[str, set[str]] = {}
    for name in SEARCHES:
        for flag, option in _options(_command(name)).items():
            helps.setdefault(flag, set()).add(option.help or "")
    for flag in ("--device", "--dtype", "--seed", "--progress", "--storage", "--cache",
                 "--held-out-samples", "--guidance-scale", "--pipeline"):  # fmt: skip
        assert len(helps[flag]) == 1, (flag, helps[flag])


@pytest.mark.parametrize("name", SEARCHES)
def test_help_reads_alike(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    command = _command(name)
    summary = (command.help or "").strip().split("\n\n")[0]
    assert "\n" not in summary.strip() or len(" ".join(summary.split())) <= 100, summary
    assert len(" ".join(summary.split())) <= 100, summary
    result = CliRunner().invoke(app, ["search", name, "--help"])
    assert result.exit_code == 0
    text = result.output
    for option in command.params:
        if isinstance(option, TyperOption) and option.default is not None and not option.hidden:
            if option.show_default is False:
                assert "[default:" in (option.help or ""), (name, option.opts)
            else:
                assert option.opts[0] in text
    assert "<int>" not in text and "<str>" not in text and "<float>" not in text, name
    assert text.count("[default:") >= 6


@pytest.mark.parametrize(
    ("command", "old", "new", "value"),
    [
        ("olss", "--samples", "--teacher-samples", "16"),
        ("ays", "--samples", "--klub-samples", "4"),
        ("ays", "--proxy-samples", "--num-samples", "4"),
        ("guidance", "--trials", "--budget", "8"),
    ],
)
def test_old_spellings_are_hidden_aliases_that_warn(command, old, new, value, tmp_path):
    result = CliRunner().invoke(app, ["search", command, "--help"])
    assert old not in result.output.replace(new, "")  # not in the help
    assert new in result.output
    parsed: dict = {}
    cmd = _command(command)
    original = cmd.callback
    cmd.callback = lambda **kwargs: parsed.update(kwargs)  # parse only: no work
    try:
        ctx = cmd.make_context(command, [old, value, "--out", str(tmp_path / "x")])
        ctx.invoke(cmd.callback, **ctx.params)
        ctx_equals = cmd.make_context(command, [f"{old}={value}", "--out", str(tmp_path / "y")])
    finally:
        cmd.callback = original
    key = new.lstrip("-").replace("-", "_")
    assert parsed[key] == int(value) and ctx_equals.params[key] == int(value)
    with pytest.raises(Exception, match="No such option"):
        cmd.make_context(command, ["--no-such-flag", "1"])


def test_an_old_spelling_warns_on_the_command_line(tmp_path):
    # parsed, warned, then refused by the library for another reason (no work is done)
    result = CliRunner().invoke(
        app, ["search", "olss", "--samples", "16", "--search", "nope", "--out", str(tmp_path)]
    )
    assert "--samples is deprecated; use --teacher-samples" in result.output
    assert result.exit_code == 2 and "search must be one of" in result.output
