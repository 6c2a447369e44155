"""Teachers are cached by a digest of the model's weights, not by its name or directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stepsearch.cache import TensorCache
from stepsearch.models import load_source
from stepsearch.models.trajectories import teacher_key
from stepsearch.search.dynamic import fine_grid, record_grid_teacher
from stepsearch.testbeds import digits


def _copy_of_bundled_digits(folder: Path, perturb: bool = False) -> Path:
    """The bundled ``digits`` weights as a local diffusers directory (one weight nudged if
    ``perturb``)."""
    bundle = digits.load("digits")
    unet = bundle.unet
    if perturb:
        with torch.no_grad():
            next(unet.parameters()).view(-1)[0] += 1e-3
    unet.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(dict(bundle.scheduler_config)))
    return folder


def _teacher(source, cache: TensorCache):
    grid = fine_grid(source.noise, 4)
    return record_grid_teacher(source, grid, num_samples=2, seed=3, cache=cache)


def test_copies_of_the_same_weights_share_one_teacher_entry(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    first = load_source(str(_copy_of_bundled_digits(tmp_path / "first-copy")))
    second = load_source(str(_copy_of_bundled_digits(tmp_path / "elsewhere")))
    bundled = load_source("digits")
    assert first.identity.name != second.identity.name
    assert first.identity.digest == second.identity.digest == bundled.identity.digest
    key = teacher_key(first, {"solver": "ddim"}, 0, 2)
    assert key == teacher_key(second, {"solver": "ddim"}, 0, 2)
    assert key == teacher_key(bundled, {"solver": "ddim"}, 0, 2)
    assert "name" not in json.dumps(key["model"])

    recorded = _teacher(first, cache)
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 1
    for other in (second, bundled):
        again = _teacher(other, cache)
        assert sorted((tmp_path / "cache").glob("*.safetensors")) == entries
        assert torch.equal(again.x, recorded.x)
        assert torch.equal(again.denoised, recorded.denoised)


def test_different_weights_get_their_own_teacher_entry(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    same = load_source(str(_copy_of_bundled_digits(tmp_path / "model")))
    changed = load_source(str(_copy_of_bundled_digits(tmp_path / "changed", perturb=True)))
    assert same.identity.digest != changed.identity.digest
    assert teacher_key(same, {}, 0, 2) != teacher_key(changed, {}, 0, 2)
    recorded = _teacher(same, cache)
    other = _teacher(changed, cache)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert not torch.equal(other.denoised, recorded.denoised)
