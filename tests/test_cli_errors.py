"""The CLI's one error boundary (issue 23): every class of bad input, through every command it
applies to, is refused before any work with one line naming the option, exit status 2, no
traceback, and nothing new in the output folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.testbeds import digits

# what each command needs to run (the bad input is added to, or replaces, one of these)
COMMANDS: dict[str, list[str]] = {
    "eval": ["eval", "--model", "digits", "--nfe", "4", "--num-samples", "8", "--out", "{out}"],
    "optimize": ["optimize", "--model", "digits", "--nfe", "4", "--out", "{out}"],
    "demo": ["demo", "--out", "{out}"],
    "search dp": ["search", "dp", "--model", "digits", "--nfe", "4", "--out", "{out}"],
    "search ays": ["search", "ays", "--model", "digits", "--nfe", "4", "--out", "{out}"],
    "search olss": ["search", "olss", "--model", "digits", "--nfe", "4", "--out", "{out}"],
    "search autodiffusion": [
        "search", "autodiffusion", "--model", "digits", "--solver", "ddim", "--nfe", "4",
        "--out", "{out}",
    ],
    "search s3": ["search", "s3", "--model", "digits", "--nfe", "4", "--out", "{out}"],
    "search guidance": ["search", "guidance", "--nfe", "4", "--out", "{out}"],
    "schedule save": ["schedule", "save", "{out}/s.json", "--model", "digits", "--steps", "4"],
}  # fmt: skip
MODEL_COMMANDS = [c for c in COMMANDS if c != "demo"]
DEVICE_COMMANDS = ["eval", "optimize", "demo", "search dp", "search ays", "search olss",
                   "search autodiffusion", "search s3", "search guidance"]  # fmt: skip
NFE_COMMANDS = [c for c in COMMANDS if c != "schedule save"]
DIR_OUT_COMMANDS = ["eval", "optimize", "demo", "search dp", "search ays", "search olss",
                    "search autodiffusion", "search s3", "search guidance"]  # fmt: skip
FILE_OUT_COMMANDS = ["schedule save"]
STORE_COMMANDS = ["search dp", "search autodiffusion", "search s3", "search guidance"]
DTYPE_COMMANDS = ["eval", "optimize", "search dp", "search ays", "search olss", "search guidance",
                  "search autodiffusion", "search s3"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The bundled digits UNet saved as a local diffusers model directory."""
    root = tmp_path_factory.mktemp("model")
    bundle = digits.load("digits")
    bundle.unet.save_pretrained(root)
    (root / "scheduler_config.json").write_text(json.dumps(dict(bundle.scheduler_config)))
    return root


def _broken(model_dir: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / f"model-{how}"
    shutil.copytree(model_dir, broken)
    if how == "corrupt-config":
        (broken / "config.json").write_text('{"in_channels": 1, ')
    elif how == "no-config":
        (broken / "config.json").unlink()
    elif how == "truncated-weights":
        weights = broken / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no-scheduler-config":
        (broken / "scheduler_config.json").unlink()
    return broken


def _run(command: str, tmp_path: Path, replace: dict[str, str] | None = None,
         extra: tuple[str, ...] = ()) -> tuple[object, Path]:  # fmt: skip
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "previous.txt").write_text("a complete previous result")
    args = [a.format(out=out) for a in COMMANDS[command]]
    for flag, value in (replace or {}).items():
        if flag in args:
            args[args.index(flag) + 1] = value
        elif flag.startswith("@"):  # a positional argument: replace by position
            args[int(flag[1:])] = value
        else:
            args += [flag, value]
    result = CliRunner().invoke(app, [*args, *extra])
    return result, out


def _assert_refused(result, out: Path, *names: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert ("Traceback" not in output and result.exception is None) or isinstance(
        result.exception, SystemExit
    ), output
    assert any(name in output for name in names), output
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"], "work started"


@pytest.mark.parametrize("how", ["corrupt-config", "no-config", "truncated-weights",
                                 "no-scheduler-config"])  # fmt: skip
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_unusable_model_directories(command, how, model_dir, tmp_path):
    broken = _broken(model_dir, tmp_path, how)
    result, out = _run(command, tmp_path, {"--model": str(broken)})
    _assert_refused(result, out, "--model")


def test_the_intact_model_directory_is_accepted(model_dir, tmp_path):
    result, _ = _run("schedule save", tmp_path, {"--model": str(model_dir)})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_missing_cuda(command, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, out = _run(command, tmp_path, {"--device": "cuda"})
    _assert_refused(result, out, "--device")


@pytest.mark.parametrize("bad", ["float64", "int8", "half-ish"])
@pytest.mark.parametrize("command", DTYPE_COMMANDS)
def test_bad_dtype(command, bad, tmp_path):
    result, out = _run(command, tmp_path, {"--dtype": bad})
    _assert_refused(result, out, "--dtype")


@pytest.mark.parametrize("bad", ["-3", "0", "100000"])
@pytest.mark.parametrize("command", NFE_COMMANDS)
def test_bad_nfe(command, bad, tmp_path):
    result, out = _run(command, tmp_path, {"--nfe": bad})
    _assert_refused(result, out, "--nfe")


@pytest.mark.parametrize("bad", ["inf", "nan", "-1", "0", "soon"])
@pytest.mark.parametrize("command", ["optimize", "demo"])
def test_bad_budget_minutes(command, bad, tmp_path):
    result, out = _run(command, tmp_path, {"--budget-minutes": bad})
    _assert_refused(result, out, "--budget-minutes")


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
@pytest.mark.parametrize("command", DIR_OUT_COMMANDS)
def test_unusable_output_directories(command, where, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker if where == "a-file" else blocker / "results"
    result, out = _run(command, tmp_path, {"--out": str(target)})
    _assert_refused(result, out, "--out")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("where", ["a-directory", "under-a-file"])
@pytest.mark.parametrize("command", FILE_OUT_COMMANDS)
def test_unusable_output_files(command, where, tmp_path):
    blocker = tmp_path / "blocker"
    if where == "a-directory":
        blocker.mkdir()
        target = blocker
    else:
        blocker.write_text("x")
        target = blocker / "schedule.json"
    result, out = _run(command, tmp_path, {"@2": str(target)})
    _assert_refused(result, out, "--out", "'FILE'")


@pytest.mark.parametrize(
    "storage",
    ["postgresql://nobody@127.0.0.1:1/x", "foo://", "not-a-db", "a-directory"],
)
@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_unusable_study_stores(command, storage, tmp_path):
    if storage == "not-a-db":
        path = tmp_path / "notes.txt"
        path.write_text("these are not a database")
        storage = f"sqlite:///{path}"
    elif storage == "a-directory":
        storage = str(tmp_path)
    result, out = _run(command, tmp_path, {"--storage": storage})
    _assert_refused(result, out, "--storage")


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
@pytest.mark.parametrize("target", ["diffusers", "kdiffusion"])
def test_export_destination(target, where, tmp_path):
    from stepsearch.models import model_noise
    from stepsearch.schedule import make_schedule

    schedule = tmp_path / "s.json"
    make_schedule(model_noise("digits"), 4, "trailing").save(schedule)
    blocker = tmp_path / "blocker"
    if target == "kdiffusion" and where == "a-file":
        blocker.mkdir()  # a file target that is a directory
    else:
        blocker.write_text("x")
    destination = blocker if where == "a-file" else blocker / "out"
    result = CliRunner().invoke(
        app, ["export", str(schedule), "--to", target, str(destination),
              "--prediction-type", "v_prediction"] if target == "diffusers"
        else ["export", str(schedule), "--to", target, str(destination)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "DEST" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bad", ["-1", "3", "many"])
def test_bad_headline_samples(bad, tmp_path):
    result, out = _run("optimize", tmp_path, {"--headline-samples": bad})
    _assert_refused(result, out, "--headline-samples")
