"""An on-disk cache of tensors (teachers, reference features) keyed by what they were computed from.

Every search on the same model reuses the same teacher solutions and reference features: an entry is
a safetensors file named after the SHA-256 of its *key* (a JSON-serialisable description: the
model's identity, the noise schedule, the seeds, the reference solver, ...), and it stores that key
in its metadata so a reader can check it. Entries are written atomically, so two processes that
compute the same entry at once both end with a complete file.

The directory is ``$STEPSEARCH_CACHE`` when set, else ``~/.cache/stepsearch``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stepsearch._io import atomic_write_bytes

__all__ = ["TensorCache", "cache_key", "default_cache_dir", "tensor_digest"]

_KEY_FIELD = "stepsearch_cache_key"


def default_cache_dir() -> Path:
    """``$STEPSEARCH_CACHE`` or ``~/.cache/stepsearch``."""
    configured = os.environ.get("STEPSEARCH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "stepsearch"


def _canonical(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def cache_key(payload: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload`` (sorted keys; non-JSON values via ``str``)."""
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()


class TensorCache:
    """Tensors by key, on disk (``directory``) or in memory only (``directory=None``).

    Within one process a computed entry is also kept in memory, so repeated look-ups cost nothing.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, dict[str, Tensor]] = {}

    @classmethod
    def default(cls) -> TensorCache:
        return cls(default_cache_dir())

    def path(self, kind: str, key: Mapping[str, Any]) -> Path | None:
        """Where the entry of ``kind`` (a short name: ``teacher``, ``features``) and ``key`` lives."""
        if self.directory is None:
            return None
        return self.directory / f"{kind}-{cache_key(key)[:24]}.safetensors"

    def get(
        self, kind: str, key: Mapping[str, Any], *, keep_in_memory: bool = True
    ) -> dict[str, Tensor] | None:
        """The stored tensors, or ``None``. A file whose stored key differs (a hash prefix
        collision, or a hand-edited file) is ignored. ``keep_in_memory=False`` reads a disk entry
        without keeping it (streaming large shards)."""
        digest = cache_key({"kind": kind, **key})
        if digest in self._memory:
            return self._memory[digest]
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get(_KEY_FIELD) != _canonical({"kind": kind, **key}):
                    return None
                tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        except (OSError, ValueError, RuntimeError):  # truncated or foreign file: recompute
            return None
        if keep_in_memory:
            self._memory[digest] = tensors
        return tensors

    def put(
        self,
        kind: str,
        key: Mapping[str, Any],
        tensors: Mapping[str, Tensor],
        *,
        keep_in_memory: bool = True,
    ) -> None:
        """Store ``tensors`` (contiguous CPU copies) under ``kind`` and ``key``, atomically;
        ``keep_in_memory=False`` only writes the file (a memory-only cache keeps it anyway)."""
        stored = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        path = self.path(kind, key)
        if keep_in_memory or path is None:
            self._memory[cache_key({"kind": kind, **key})] = stored
        if path is None:
            return
        from safetensors.torch import save

        metadata = {_KEY_FIELD: _canonical({"kind": kind, **key})}
        atomic_write_bytes(path, save(stored, metadata=metadata))

    def load_or_compute(
        self,
        kind: str,
        key: Mapping[str, Any],
        compute: Callable[[], Mapping[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The cached entry, or ``compute()`` stored and returned."""
        found = self.get(kind, key)
        if found is not None:
            return found
        self.put(kind, key, compute())
        found = self.get(kind, key)
        assert found is not None
        return found


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
