"""The CLI's one input boundary: checks of option values that every command shares, run while the
command line is parsed, before any work starts.

Each check takes the raw text of an option and returns its value, or raises
:class:`typer.BadParameter` (click prints ``Invalid value for '--OPTION': <why and what to do>``
and exits with status 2, no traceback). The option types of :mod:`stepsearch.cli.options` use
them as parsers, so a command that declares ``device: options.Device`` gets the device check, and
so on. What can only be known by the library (a solver's reachable NFEs, a schedule file's noise
schedule) is the library's ``ValueError``, turned into one line by the command group
(:class:`stepsearch.cli._common.HelpGroup`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer

__all__ = [
    "check_budget_minutes",
    "check_clip_model",
    "check_device",
    "check_dtype",
    "check_guidance_schedule",
    "check_inception_weights",
    "check_model",
    "check_out_dir",
    "check_out_file",
    "check_reference_stats",
    "check_storage",
]

SQLITE_HEADER = b"SQLite format 3\x00"
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def check_device(value: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda[:N]`` with CUDA available, ``mps``."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise typer.BadParameter(
            f"{value!r} is not a torch device ({error}); use cpu or cuda"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise typer.BadParameter(
                f"{value!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"built {build}); use --device cpu, or install a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise typer.BadParameter(
                f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise typer.BadParameter(f"{value!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise typer.BadParameter(f"{value!r}: use cpu, cuda, cuda:N or mps")
    return value


DTYPES = ("float32", "float16", "bfloat16")
"""``--dtype`` values: what the network runs in (the library's ``MODEL_DTYPES``)."""


def check_dtype(value: str) -> str:
    """A network dtype: ``float32``, ``float16`` or ``bfloat16`` (also ``fp32``, ``fp16``,
    ``bf16``). CPUs lack some float16 kernels: ``bfloat16`` is the half precision that runs
    there."""
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(value.strip().lower(), value.strip().lower())
    if name not in DTYPES:
        raise typer.BadParameter(f"{value!r} is not a model dtype; use {', '.join(DTYPES)}")
    return name


def check_guidance_schedule(value: str) -> str:
    """``search``, or a guidance schedule file that loads (JSON, finite weights and noise levels,
    a known shape): :func:`~stepsearch.guidance.load_guidance`."""
    if value == "search":
        return value
    from stepsearch.guidance import load_guidance

    path = Path(value).expanduser()
    if not path.is_file():
        raise typer.BadParameter(
            f"{value!r} is neither `search` nor a guidance schedule file (guidance.json)"
        )
    try:
        load_guidance(path)
    except (ValueError, OSError) as error:
        raise typer.BadParameter(str(error)) from None
    return str(path)


def check_model(value: str) -> str:
    """A bundled model name, or a local diffusers model directory whose configs parse and whose
    weights file is a readable safetensors file (checked from its header, not loaded)."""
    from stepsearch.testbeds.digits import MODELS

    if value in MODELS:
        return value
    root = Path(value).expanduser()
    if not root.exists():
        raise typer.BadParameter(
            f"{value!r} is neither a bundled model ({', '.join(sorted(MODELS))}) nor an "
            "existing directory"
        )
    if not root.is_dir():
        raise typer.BadParameter(f"{value!r} is a file; give a diffusers model directory")
    unet = root / "unet" if (root / "unet").is_dir() else root
    _check_json(unet / "config.json", value, "the UNet's config.json")
    schedulers = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"]
    found = next((path for path in schedulers if path.is_file()), None)
    if found is None:
        raise typer.BadParameter(
            f"{value!r} has no scheduler_config.json (at its root or in scheduler/): the "
            "noise schedule the model was trained with is needed"
        )
    _check_json(found, value, "its scheduler config")
    weights = sorted(unet.glob("*.safetensors"))
    if not weights:
        if any(unet.glob("*.bin")):
            raise typer.BadParameter(
                f"{value!r}: only pickled .bin weights; stepsearch reads safetensors only "
                "(convert them with diffusers' save_pretrained(safe_serialization=True))"
            )
        raise typer.BadParameter(f"{value!r}: no .safetensors weights in {unet}")
    for path in weights:
        _check_safetensors(path, value)
    return value


def _check_json(path: Path, value: str, what: str) -> None:
    if not path.is_file():
        raise typer.BadParameter(f"{value!r}: {what} is missing ({path})")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise typer.BadParameter(f"{value!r}: {what} ({path}) is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise typer.BadParameter(f"{value!r}: {what} ({path}) must hold a JSON object")


def _check_safetensors(path: Path, value: str) -> None:
    """The header parses and the file is as long as the header says (a truncated download is
    refused here, not halfway through a job)."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items()
                   if key != "__metadata__"), default=0)  # fmt: skip
        complete = os.path.getsize(path) >= 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        complete = False
    if not complete:
        raise typer.BadParameter(
            f"{value!r}: {path.name} is not a complete safetensors file (truncated or corrupt); "
            "download or save the weights again"
        )


def _first_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_creatable(path: Path, value: str) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable directory."""
    ancestor = _first_existing(path.parent)
    if not ancestor.is_dir():
        raise typer.BadParameter(f"{value!r} lies under the file {str(ancestor)!r}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{value!r}: cannot write into {str(ancestor)!r} (permission)")


def check_out_dir(value: str) -> Path:
    """An output directory: existing and writable, or creatable (not a file, not under a file)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise typer.BadParameter(f"{value!r} is a file; give a directory (it is created)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise typer.BadParameter(f"{value!r}: cannot write into it (permission)")
        return path
    _check_creatable(path, value)
    return path


def check_out_file(value: str) -> Path:
    """An output file: not a directory, its folder existing and writable or creatable."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise typer.BadParameter(f"{value!r} is a directory; give a file name to write")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise typer.BadParameter(f"{value!r}: cannot overwrite it (permission)")
        return path
    _check_creatable(path, value)
    return path


def check_storage(value: str) -> str:
    """A study store: a SQLite file (path or ``sqlite:///PATH``; a new file, or an existing SQLite
    database) or a PostgreSQL URL that answers within 5 s."""
    if value in ("", None):
        return value
    if value.startswith(POSTGRES_SCHEMES):
        _check_postgres(value)
        return value
    if "://" in value and not value.startswith("sqlite:///"):
        raise typer.BadParameter(
            f"{_redacted(value)}: unsupported store; give a SQLite file (PATH or sqlite:///PATH) "
            "or a PostgreSQL URL (postgresql://user@host/db)"
        )
    path = Path(value.removeprefix("sqlite:///")).expanduser()
    if path.is_dir():
        raise typer.BadParameter(f"{value!r} is a directory; give a SQLite file name")
    if path.exists():
        try:
            with open(path, "rb") as file:
                head = file.read(len(SQLITE_HEADER))
        except OSError as error:
            raise typer.BadParameter(f"{value!r}: cannot read it ({error})") from None
        if head and head != SQLITE_HEADER:
            raise typer.BadParameter(
                f"{value!r} exists and is not a SQLite database; give a new file name or the "
                "study store of an earlier run"
            )
        if not os.access(path, os.W_OK):
            raise typer.BadParameter(f"{value!r}: cannot write to it (permission)")
        return value
    _check_creatable(path, value)
    return value


def _check_postgres(value: str) -> None:
    try:
        import psycopg
    except ImportError:
        raise typer.BadParameter(
            f'{_redacted(value)}: PostgreSQL needs psycopg: pip install "stepsearch[postgres]"'
        ) from None
    conninfo = "postgresql://" + value.split("://", 1)[1]
    try:
        with psycopg.connect(conninfo, connect_timeout=5):
            pass
    except Exception as error:  # psycopg.OperationalError, ProgrammingError (bad URL), ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise typer.BadParameter(
            f"cannot reach the study store {_redacted(value)}: {reason}; check the URL and that "
            "the server is running"
        ) from None


def _redacted(url: str) -> str:
    """A URL with its password hidden."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def check_budget_minutes(value: str) -> float:
    """A finite, positive number of minutes."""
    try:
        minutes = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number of minutes") from None
    if not math.isfinite(minutes) or minutes <= 0:
        raise typer.BadParameter(f"{value!r}: give a finite, positive number of minutes")
    return minutes


def check_clip_model(value: str) -> Path:
    """A local CLIP model directory (``CLIPModel`` + ``CLIPProcessor`` ``save_pretrained``
    output): its config.json parses and its safetensors weights are complete (not loaded)."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise typer.BadParameter(
            f"{value!r} is not a directory; give a local CLIP model directory (CLIPModel and "
            "CLIPProcessor save_pretrained output: config.json, model.safetensors, the "
            "processor's files)"
        )
    _check_json(path / "config.json", value, "the CLIP model's config.json")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights, value)
    return path


def check_inception_weights(value: str) -> Path:
    """The FID Inception network: ``inception-2015-12-05.pt`` or a folder holding it."""
    from stepsearch.eval.features import INCEPTION_FILENAME, INCEPTION_URL, find_inception_weights

    path = Path(value).expanduser()
    if find_inception_weights(path) is None:
        where = "has no" if path.is_dir() else "is not"
        raise typer.BadParameter(
            f"{value!r} {where} {INCEPTION_FILENAME}: give that file (TorchScript, from "
            f"{INCEPTION_URL} ) or a folder holding it"
        )
    return path


def check_reference_stats(value: str) -> Path:
    """An FID reference: an ``.npz`` of feature statistics that loads (``stepsearch stats``,
    clean-fid, EDM), or a folder or ``.safetensors`` file of reference images."""
    path = Path(value).expanduser()
    if path.suffix == ".npz":
        from stepsearch.eval.fid import FeatureStatistics

        if not path.is_file():
            raise typer.BadParameter(
                f"{value!r} does not exist; make reference statistics with `stepsearch stats "
                "IMAGES --out FILE.npz`, or give a folder of reference images"
            )
        try:
            FeatureStatistics.load(path)
        except (ValueError, OSError) as error:
            raise typer.BadParameter(str(error)) from None
        return path
    if not (path.is_dir() or (path.is_file() and path.suffix == ".safetensors")):
        raise typer.BadParameter(
            f"{value!r} is neither an .npz of feature statistics (`stepsearch stats`) nor a "
            "folder or .safetensors file of reference images"
        )
    return path
