"""Atomic file writes: a crash or a kill never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """JSON with NaN/Inf refused (they are not JSON and would not round-trip)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON, refusing the non-standard ``NaN``/``Infinity`` literals with a clear error."""

    def reject(token: str) -> Any:
        raise ValueError(f"non-finite number {token!r} is not allowed")

    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file, parse_constant=reject)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error})") from None


def run_relative(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """``path`` relative to the folder ``base`` when it lies inside it (``"nfe-4/scheduler"``),
    else as given: result files name their siblings by run-relative paths, never by where the
    machine that ran them kept them. A ``sqlite:///`` URL of a file inside ``base`` becomes that
    file's relative path (what ``--storage FILE`` takes)."""
    text = os.fspath(path)
    if text.startswith("sqlite:///"):
        inside = run_relative(text[len("sqlite:///") :], base)
        return inside if not os.path.isabs(inside) else text
    try:
        return Path(text).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return text


def atomic_write_dir(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Write a whole directory at once: ``fill(staging)`` writes into a fresh folder beside
    ``path``, whose files are fsynced; then it replaces ``path`` by renames (an existing folder is
    moved aside first and deleted after), so a reader sees the old complete folder or the new
    complete folder, never a mix. ``ValueError`` if ``path`` exists and is not a directory."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"'{target}' exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        fill(staging)
        for written in staging.rglob("*"):
            if written.is_file():
                with open(written, "rb") as file:
                    os.fsync(file.fileno())
        if target.exists():
            old = Path(
                tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old")
            )
            os.replace(target, old / target.name)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous result back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
