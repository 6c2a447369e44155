"""Test-session settings and fixtures shared by the test modules."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Searches cache teachers and reference features on disk (stepsearch.cache). Tests must neither
# read a stale cache from the home directory nor fill it: one fresh directory per session, unless
# the caller (CI) names one.
os.environ.setdefault("STEPSEARCH_CACHE", tempfile.mkdtemp(prefix="stepsearch-test-cache-"))


@pytest.fixture(scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models and small tensors: one torch thread is faster and immune to oversubscription on
    shared runners; the previous thread count comes back after the module. Modules that want it
    for every test say ``pytestmark = pytest.mark.usefixtures("_one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Stable Diffusion pipeline of ``tests/tiny_pipeline.py``, one per module. Its
    scheduler is ``PIPE_SCHEDULER`` of the requesting module (a scheduler class, built with
    ``from_config(SD_SCHEDULER_CONFIG)``), diffusers' ``PNDMScheduler`` (SD's own) by default."""
    from diffusers import PNDMScheduler
    from tiny_pipeline import SD_SCHEDULER_CONFIG, tiny_pipeline

    scheduler_class = getattr(request.module, "PIPE_SCHEDULER", PNDMScheduler)
    scheduler = scheduler_class.from_config(SD_SCHEDULER_CONFIG)
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), scheduler)


@pytest.fixture(scope="module")
def pipeline_dir(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pipe`` saved with ``save_pretrained`` (a local pipeline folder, as users pass it)."""
    directory = tmp_path_factory.mktemp("saved_sd")
    pipe.save_pretrained(directory)
    return directory
