"""Regression pins first written *before* the architecture move (issue 20): DP, OLSS and AYS at
fixed settings must give the same schedules and coefficients after any refactor.

These are golden values beside the real tests (which check the searches against exact beds); they
only say "nothing moved". They were SHA-256 digests (bitwise) until a CI machine with another CPU
fitted OLSS coefficients that differed in the last bits (LAPACK kernels differ between CPUs): the
pins are now the values themselves, compared to a relative 1e-6 (a real change moves them by far
more). ``python tests/test_regression_pins.py --write`` rewrites the pins; do so only for a change
that is *meant* to change results, and say so in the commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PINS = Path(__file__).parent / "data" / "regression_pins.json"


RTOL, ATOL = 1e-6, 1e-9
"""How close a result must come to its pin (float64 values: another CPU's BLAS / LAPACK kernels
move the last bits, a real change far more)."""


def _pinned(*arrays: object) -> list[dict[str, list]]:
    """The arrays as pinned: shape and float64 values (flattened)."""
    pinned = []
    for array in arrays:
        value = np.asarray(array, dtype=np.float64)
        pinned.append({"shape": list(value.shape), "values": [float(v) for v in value.ravel()]})
    return pinned


def _mixture_source():
    from stepsearch.noise import DiscreteVP
    from stepsearch.testbeds.gaussian_mixture import GaussianMixture

    try:
        from stepsearch.models import DenoiserSource
    except ImportError:  # before the move
        from stepsearch.models.source import DenoiserSource

    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"})
    mixture = GaussianMixture.random(num_components=3, dim=8, noise=noise, seed=7)
    return DenoiserSource.of_mixture(mixture, name="pin-mixture")


def _cache(tmp_path):
    try:
        from stepsearch.cache import TensorCache
    except ImportError:
        from stepsearch.cache import TensorCache
    return TensorCache(tmp_path / "cache")


def pin_dp(tmp_path) -> dict[str, str]:
    from stepsearch.search.dynamic import dynamic_schedule, fine_grid

    try:
        from stepsearch.search.dynamic import record_grid_teacher as record
    except ImportError:
        from stepsearch.search.dynamic import record_grid_teacher as record
    source = _mixture_source()
    teacher = record(source, fine_grid(source.noise, 24), num_samples=64, seed=3,
                     cache=_cache(tmp_path))  # fmt: skip
    out = {}
    for solver in ("ddim", "dpm_solver_pp_2m", "unipc_bh2"):
        for nfe in (4, 6):
            result = dynamic_schedule(teacher, solver, nfe)
            out[f"{solver}/{nfe}"] = _pinned(result.schedule.times, result.path)
    return out


def pin_olss(tmp_path) -> dict[str, str]:
    from stepsearch.olss.search import search_olss

    source = _mixture_source()
    out = {}
    for nfe in (4, 6):
        result = search_olss(source, nfe, num_samples=48, held_out_samples=32, seed=0,
                             held_out_seed=1, fd=False, baselines=("ddim",),
                             spacings=("trailing",), cache=_cache(tmp_path))  # fmt: skip
        coefficients = result.fit.coefficients
        out[f"olss/{nfe}"] = _pinned(
            coefficients.schedule.times, coefficients.matrix()
        )
    return out


def pin_ays(tmp_path) -> dict[str, str]:
    from stepsearch.ays.search import AYSConfig, search_ays

    try:
        from stepsearch.eval.objective import Objective
    except ImportError:
        from stepsearch.eval import Objective
    source = _mixture_source()
    out = {}
    for solver, nfe in (("dpm_solver_pp_2m", 5), ("ddim", 6)):
        objective = Objective(source, "traj", num_samples=32, cache=_cache(tmp_path))
        config = AYSConfig(strategy="direct", num_samples=16, max_sweeps=2, seed=4)
        result = search_ays(source, solver, nfe, objective=objective, config=config)
        out[f"ays/{solver}/{nfe}"] = _pinned(result.schedule.times)
    return out


def pin_digits(tmp_path) -> dict[str, str]:
    """The bundled network through the model loader: a DP schedule and an OLSS fit, small."""
    from stepsearch.olss.search import search_olss
    from stepsearch.search.dynamic import dynamic_schedule, fine_grid

    try:
        from stepsearch.models import load_source
    except ImportError:
        from stepsearch.models import load_source
    try:
        from stepsearch.search.dynamic import record_grid_teacher as record
    except ImportError:
        from stepsearch.search.dynamic import record_grid_teacher as record
    source = load_source("digits")
    teacher = record(source, fine_grid(source.noise, 16), num_samples=24, seed=5,
                     cache=_cache(tmp_path))  # fmt: skip
    result = dynamic_schedule(teacher, "unipc_bh2", 5)
    olss = search_olss(source, 4, num_samples=24, held_out_samples=8, fd=False, baselines=(),
                       cache=_cache(tmp_path))  # fmt: skip
    coefficients = olss.fit.coefficients
    return {
        "dp/unipc_bh2/5": _pinned(result.schedule.times, result.path),
        "olss/4": _pinned(coefficients.schedule.times, coefficients.matrix()),
    }


PINNERS = {"dp": pin_dp, "olss": pin_olss, "ays": pin_ays, "digits": pin_digits}


pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.mark.parametrize("family", sorted(PINNERS))
def test_results_are_those_pinned_before_the_move(family, tmp_path):
    pinned = json.loads(PINS.read_text())[family]
    results = PINNERS[family](tmp_path)
    assert sorted(results) == sorted(pinned)
    for key, arrays in results.items():
        assert len(arrays) == len(pinned[key]), key
        for got, want in zip(arrays, pinned[key], strict=True):
            assert got["shape"] == want["shape"], key
            np.testing.assert_allclose(got["values"], want["values"], rtol=RTOL, atol=ATOL,
                                       err_msg=key)  # fmt: skip


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        pins = {name: pin(Path(folder) / name) for name, pin in PINNERS.items()}
    PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(json.dumps(pins, indent=1))
