"""``--dtype``: the network runs in half precision (bfloat16 on CPU), samples and solver maths stay
float32; every model-loading command passes the option through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_pipeline import SD_SCHEDULER_CONFIG, tiny_pipeline
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.models import load_model, load_source, model_dtype
from stepsearch.models.source import generate_from_source
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    """A tiny random-weight ``UNet2DModel`` directory (1x8x8 samples, epsilon prediction)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("tiny-unet")
    unet.save_pretrained(root)
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    (root / "scheduler_config.json").write_text(json.dumps(config))
    return root


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_model_dtype_names():
    assert model_dtype(None) is torch.float32
    assert model_dtype("bfloat16") is torch.bfloat16
    assert model_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="--dtype must be one of float32, float16, bfloat16"):
        model_dtype("float64")


def test_bfloat16_unet_directory_runs_in_bfloat16_and_samples_in_float32(unet_dir):
    full = load_source(str(unet_dir))
    half = load_source(str(unet_dir), dtype="bfloat16")
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.unet.parameters()} == {torch.float32}
    assert half.dtype == full.dtype == torch.float32  # samples and solver maths
    assert half.describe()["network_dtype"] == "bfloat16" and "network_dtype" not in full.describe()
    assert half.identity.digest != full.identity.digest  # its own teacher cache entries

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in (0.9, 0.3):
        expected = full.denoiser()(x, t)
        got = half.denoiser()(x, t)
        assert got.dtype == torch.float32
        assert 0 < _relative_error(got, expected) < 0.05  # bf16 has an 8-bit mantissa
    schedule = make_schedule(full.noise, 4, "logsnr_uniform")
    solver = get_solver("dpm_solver_pp_2m")
    expected = generate_from_source(full, solver, schedule, 6, seed=2)
    got = generate_from_source(half, solver, schedule, 6, seed=2)
    assert got.dtype == torch.float32
    assert _relative_error(got, expected) < 0.05
    # diffusers' own loop: the model output comes back in the sample's dtype
    output = half.model_fn(x, torch.full((4,), 500.0))
    assert output.dtype == torch.float32


def test_bfloat16_pipeline_runs_its_unet_in_bfloat16(tmp_path):
    from diffusers import DDIMScheduler

    saved = tmp_path / "sd"
    tiny_pipeline(tmp_path, DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)).save_pretrained(saved)
    prompts = ["a cat", "the dog"]
    full = load_model(pipeline=saved, prompts=prompts, guidance_scale=2.0)
    half = load_model(pipeline=saved, prompts=prompts, guidance_scale=2.0, torch_dtype="bfloat16")
    assert {p.dtype for p in half.pipeline.unet.parameters()} == {torch.bfloat16}
    assert half.dtype == torch.float32
    assert half.describe()["network_dtype"] == "bfloat16"
    x = torch.randn(2, *full.sample_shape, generator=torch.Generator().manual_seed(0))
    expected = full.denoiser(range(2))(x, 0.5)
    got = half.denoiser(range(2))(x, 0.5)
    assert got.dtype == torch.float32
    assert 0 < _relative_error(got, expected) < 0.05


class _Loaded(Exception):
    """Raised by the spy loader: the command got as far as loading its model."""


LOADERS = {  # command -> (arguments, module whose loader it calls, loader name, dtype keyword)
    "eval": (["eval", "--nfe", "4"], "stepsearch.eval.evaluate", "load_model", "torch_dtype"),
    "optimize": (["optimize", "--nfe", "4"], "stepsearch.search.optimize.models", "load_model",
                 "torch_dtype"),
    "search dp": (["search", "dp"], "stepsearch.search.family", "load_model", "torch_dtype"),
    "search autodiffusion": (["search", "autodiffusion", "--solver", "ddim", "--nfe", "4"],
                             "stepsearch.search.family", "load_model", "torch_dtype"),
    "search s3": (["search", "s3", "--nfe", "4"], "stepsearch.search.family", "load_model",
                  "torch_dtype"),
    "search ays": (["search", "ays", "--nfe", "4"], "stepsearch.ays.search", "load_source",
                   "dtype"),
    "search olss": (["search", "olss"], "stepsearch.olss.search", "load_source", "dtype"),
    "search guidance": (["search", "guidance", "--nfe", "4"], "stepsearch.models", "load_model",
                        "torch_dtype"),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_every_command_loads_its_model_in_the_dtype_given(command, unet_dir, tmp_path, monkeypatch):
    import importlib

    arguments, module, loader, keyword = LOADERS[command]
    seen: dict[str, object] = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(importlib.import_module(module), loader, spy)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, [*arguments, "--model", str(unet_dir), "--out", str(out), "--dtype", "bf16"]
    )
    assert isinstance(result.exception, _Loaded), result.output
    assert seen[keyword] == "bfloat16"
