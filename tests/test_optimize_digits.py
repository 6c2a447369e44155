"""``stepsearch optimize`` on the bundled digits model at a tiny budget: the written scheduler
directories, loaded with ``from_pretrained`` in a fresh process into a ``DDPMPipeline`` wrapping the
bundled UNet, reproduce the report's samples bit for bit on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from stepsearch.cache import TensorCache
from stepsearch.search.optimize import OptimizeSettings, optimize

SETTINGS = OptimizeSettings(
    search_samples=16,
    select_samples=32,
    held_out_samples=32,
    baseline_solvers=("unipc_bh2",),
    spacings=("logsnr_uniform",),
    olss_samples=16,
    grid_rows=2,
    grid_cols=4,
)

REPLAY = textwrap.dedent(
    """
    import inspect, json, sys
    import numpy as np
    import torch
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file
    import stepsearch.integrations.diffusers as drop_in
    import stepsearch.integrations.olss as olss
    import diffusers
    from stepsearch.models.batches import sample_generator
    from stepsearch.testbeds import digits

    folder, role, directory, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))  # the parent's count: bitwise equality needs one order
    name = json.load(open(f"{directory}/scheduler_config.json"))["_class_name"]
    cls = next(getattr(m, name) for m in (drop_in, olss, diffusers) if hasattr(m, name))
    scheduler = cls.from_pretrained(directory)
    if "generator" not in inspect.signature(scheduler.step).parameters:
        # DDPMPipeline passes generator= to step; diffusers' deterministic multistep schedulers
        # (a built-in baseline) take none, so it is dropped (nothing random is drawn)
        step = scheduler.step
        scheduler.step = lambda *args, generator=None, **kwargs: step(*args, **kwargs)
    pipe = DDPMPipeline(unet=digits.load().unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = load_file(f"{folder}/samples.safetensors")[role]
    generators = [sample_generator(2, i) for i in range(len(expected))]
    images = pipe(batch_size=len(expected), generator=generators, num_inference_steps=steps,
                  output_type="np").images
    want = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    print(name, float(np.abs(images - want).max()))
    sys.exit(0 if np.array_equal(images, want) else 1)
    """
)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scheduler_dirs_reproduce_the_report_samples_in_a_fresh_pipeline(tmp_path):
    out = tmp_path / "run"
    result = optimize(
        "digits", [4], ["olss"], 30.0, out, settings=SETTINGS,
        cache=TensorCache(tmp_path / "cache"), progress=False,
    )  # fmt: skip
    entry = result.report["per_nfe"]["4"]
    folder = out / "nfe-4"
    with safe_open(str(folder / "samples.safetensors"), "pt") as grid:
        metadata = grid.metadata()
    assert metadata["seed"] == "2"
    baseline = next(r for r in entry["rows"] if r["label"] == entry["best_baseline"])
    assert baseline["family"] in ("baseline", "diffusers")
    script = tmp_path / "replay.py"
    script.write_text(REPLAY)
    for role, directory in (("winner", "scheduler"), ("baseline", "baseline_scheduler")):
        done = subprocess.run(
            [sys.executable, str(script), str(folder), role, str(folder / directory),
             metadata[f"steps_{role}"], str(torch.get_num_threads())],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.split()[1] == "0.0"
    assert (out / "report.png").stat().st_size > 10_000
