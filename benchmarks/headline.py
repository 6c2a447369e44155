"""Re-judge an optimize run directory honestly: its winners (and best built-ins) against two
independent converged solves, on fresh noise, with many samples.

Each NFE's written scheduler directories (``nfe-N/scheduler``, ``nfe-N/baseline_scheduler``) run in
diffusers' own loop on seeds 3 and 4 (noise the run never used); the converged solves
(DPM-Solver++(3M) on 100 logSNR steps, DPM-Solver++(2M) on 250 trailing steps) by stepsearch on the
same noise. FD (plain and extrapolated to infinitely many samples, FD_inf) against the digits, and
trajectory error (median and mean per-sample RMS) to each converged solve
(:func:`stepsearch.search.optimize.headline.judge_headline`). Writes
``benchmarks/results/headline.{json,md}``.

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/headline.py`` (default 5,000 samples per seed;
``--samples 1000`` on a loaded 2-core machine: the converged solves dominate the cost, about
``samples x 350`` model evaluations per seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.report import environment
from stepsearch.models import load_model
from stepsearch.search.optimize.headline import (
    HEADLINE_SEEDS,
    HeadlineSettings,
    headline_markdown,
    judge_headline,
    run_candidates,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=RESULTS / "optimize_run")
    parser.add_argument("--model", default=None, help="default: the run's model (run.json)")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(HEADLINE_SEEDS))
    parser.add_argument("--nfe", type=int, nargs="*", default=None, help="default: every NFE")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    report = json.loads((args.run_dir / "report.json").read_text())
    model = load_model(args.model or report["model"]["name"])
    candidates = [
        candidate
        for nfe, group in run_candidates(args.run_dir)
        if args.nfe is None or nfe in args.nfe
        for candidate in group
    ]
    settings = HeadlineSettings(args.samples, tuple(args.seeds), chunk_size=args.chunk_size)
    cache = TensorCache(args.cache) if args.cache is not None else TensorCache.default()
    payload = judge_headline(model, candidates, settings, cache=cache, progress=True)
    payload["run_dir"] = str(args.run_dir)
    payload["report_says"] = {
        nfe: {"fd_over_reference": entry.get("fd_over_reference"), "samples":
              report["report"]["samples"], "seed": report["report"]["seed"]}
        for nfe, entry in report["per_nfe"].items()
    }  # fmt: skip
    payload["seconds"] = round(time.perf_counter() - began, 1)
    payload["environment"] = environment()
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "headline.json", payload)
    text = headline_markdown(payload, f"Headline: {args.run_dir.name} re-judged")
    said = ", ".join(f"NFE {nfe} {v['fd_over_reference']:.2f}x"
                     for nfe, v in payload["report_says"].items()
                     if v["fd_over_reference"] is not None)  # fmt: skip
    text += (f"\nThe run's report said (winner FD / converged FD, {report['report']['samples']} "
             f"samples of seed {report['report']['seed']}, plain FD): {said}.\n"
             f"\nWall time {payload['seconds']:.0f} s, {args.threads} thread(s).\n")  # fmt: skip
    atomic_write_text(args.results / "headline.md", text)
    print(text)


if __name__ == "__main__":
    main()
