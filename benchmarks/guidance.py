"""Guidance schedules on ``digits-cond``: searched vs constant guidance, on HELD-OUT noise.

For each budget of network (UNet) passes (``--nfe``; a guided step costs two passes, a step at
weight 1 one):

1. **Search** (:func:`~stepsearch.search.guidance.search_guidance`): ``--trials`` trials judged on
   FD-digits and the classifier's accuracy on ``--num-samples`` search-seed samples; the constant
   curve (``--constant-weights`` at Karras rho 7) and the best non-dominated trials scored again
   on ``--select-samples`` selection-seed samples, the pick made there by ``--pick-rule``
   (``margin``, the default here: the trial furthest below the selection seed's constant curve at
   its own accuracy; ``default``: the lowest FD at accuracy >= constant w=2's); the constant curve and the pick scored on ``--held-out-samples`` held-out
   samples. *Dominates* (the issue's test) means: the pick's FD is below that of constant guidance
   at the pick's accuracy (:func:`constant_at_accuracy`: the constant curve interpolated linearly
   in the weight, the lower-FD crossing where there are two; above the curve's highest accuracy,
   its most accurate weight), with the margin in standard errors of a paired bootstrap over the
   held-out samples that resamples FDs and accuracies together (:func:`joint_margin`; the FD-only
   error is reported beside it). Also reported: whether the pick's FD is below that of every
   constant weight less accurate than it.
2. **Wang et al.'s claim**: linear-increasing vs constant guidance at equal mean weight
   (``--mean-weight``), same budget and spacing, with a paired bootstrap of the FD difference
   (the same held-out noise and labels, samples resampled jointly) and the accuracy difference.
3. **Interval guidance** (Kynkäänniemi et al.): interval schedules at the budget constant w=2
   spends with its step count, minus the passes they skip, vs constant w=2 at its budget.

Results: ``benchmarks/results/guidance.{json,md}`` (every recorded run; the reading is
``docs/guidance.md``). ``--rescore`` recomputes the recorded runs' margins with the joint bootstrap
(no search; a killed rescore resumes). Full protocol (the issue's done-when)::

    python benchmarks/guidance.py --nfe 8 16 --trials 80 --held-out-samples 5000 --jobs 2

(``--jobs 2``: the budgets in two processes, one thread each.) A reduced run::

    python benchmarks/guidance.py --nfe 8 16 --trials 24 --num-samples 128 \\
        --select-samples 256 --held-out-samples 500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.experiment import class_correct
from stepsearch.eval.fid import FeatureStatistics, frechet_distance
from stepsearch.eval.report import environment
from stepsearch.eval.scoring import FeatureReference
from stepsearch.guidance import GuidanceSchedule, noise_range, unet_passes
from stepsearch.models import load_model
from stepsearch.search.guidance import (
    GuidanceCandidate,
    GuidanceSearchSettings,
    condition_judge,
    constant_curve_point,
    evaluate_candidate,
    feature_matrix,
    search_guidance,
    steps_for_budget,
)
from stepsearch.solvers import get_solver

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 1
SELECT_SEED = 2


def paired_fd_combination(
    features: list[np.ndarray], weights: list[float], reference: FeatureStatistics, resamples: int
) -> tuple[float, float]:
    """``sum_k weights[k] FD(features[k])`` and its bootstrap standard deviation, resampling sample
    rows jointly (the feature sets share noise and labels row by row)."""

    def value(rows: np.ndarray) -> float:
        return sum(
            w * frechet_distance(FeatureStatistics.from_features(f[rows]), reference)
            for f, w in zip(features, weights, strict=True)
            if w != 0
        )

    count = len(features[0])
    rng = np.random.default_rng(0)
    draws = [value(rng.integers(0, count, count)) for _ in range(resamples)]
    return float(value(np.arange(count))), float(np.std(draws, ddof=1))


def paired_fd_difference(
    features_a: np.ndarray, features_b: np.ndarray, reference: FeatureStatistics, resamples: int
) -> tuple[float, float]:
    """``FD(a) - FD(b)`` and its bootstrap standard deviation, resampling sample rows jointly
    (``a`` and ``b`` share noise and labels row by row)."""
    return paired_fd_combination([features_a, features_b], [1.0, -1.0], reference, resamples)


def constant_at_accuracy(constants: dict[float, dict[str, Any]], accuracy: float) -> dict[str, Any]:
    """Constant guidance at ``accuracy``: ``constants`` (weight -> held-out score with ``fd``,
    ``fd_std``, ``accuracy``) on the curve of :func:`constant_curve_point` (linear in the weight
    between neighbouring weights whose accuracies bracket it, the lowest-FD crossing; else the
    constant with the nearest accuracy). Returns ``weight``, ``fd``, ``fd_std`` (interpolated
    alike) and ``accuracy`` there, the two weights (``between``) and the fraction ``t`` of the way
    from the first to the second."""
    point = constant_curve_point(
        {w: (score["fd"], score["accuracy"]) for w, score in constants.items()}, accuracy
    )
    low, high = point.between
    fd_std = (1 - point.t) * (constants[low]["fd_std"] or 0.0) + point.t * (
        constants[high]["fd_std"] or 0.0
    )
    return {"weight": point.weight, "fd": point.fd, "fd_std": fd_std,
            "accuracy": point.condition, "between": [low, high], "t": point.t}  # fmt: skip


def _held_out(source: Any, candidate: GuidanceCandidate, solver: Any, budget: int, count: int,
              reference: FeatureReference) -> tuple[Any, np.ndarray, torch.Tensor]:  # fmt: skip
    samples: list[torch.Tensor] = []
    score = evaluate_candidate(
        source, candidate, solver, budget, count, seed=HELD_OUT_SEED, split="held_out",
        reference=reference, samples_out=samples,
    )  # fmt: skip
    return score, feature_matrix(samples[0], reference), samples[0]


def dominance(
    held_out: dict[str, Any], paired: dict[str, tuple[float, float]] | None = None
) -> dict[str, Any]:
    """The pick against the constant curve (held-out scores as JSON dicts): the constant at the
    pick's accuracy (:func:`constant_at_accuracy`), the FD margin and its standard error, and the
    second reading. With ``paired`` (:func:`_paired_margin` on the shared held-out noise) the
    error that decides is the joint bootstrap's (FDs and accuracies resampled together), the
    FD-only one is kept beside it; else the independent errors added in quadrature."""
    pick = held_out["pick"]
    constants = {
        float(name.split("=", 1)[1]): score
        for name, score in held_out.items()
        if name.startswith("constant w=")
    }
    matched = constant_at_accuracy(constants, pick["accuracy"])
    margin = pick["fd"] - matched["fd"]
    independent = math.hypot(pick["fd_std"] or 0.0, matched["fd_std"])
    error = independent if paired is None else paired["joint"][1]
    weaker = [v for v in constants.values() if v["accuracy"] <= pick["accuracy"]]
    return {
        "constant_at_pick_accuracy": matched,
        "fd_margin": margin,
        "fd_margin_std": error,
        "fd_margin_std_kind": "independent" if paired is None else "joint paired bootstrap",
        "fd_margin_std_independent": independent,
        # from regenerated samples: equal to fd_margin when sampling is deterministic
        "fd_margin_paired": None if paired is None else paired["joint"][0],
        "fd_margin_std_fd_only": None if paired is None else paired["fd_only"][1],
        "dominates": bool(margin < 0 and pick["accuracy"] >= matched["accuracy"]),
        "significant": bool(margin < -2 * error),
        "below_every_less_accurate_constant": bool(weaker)
        and all(pick["fd"] < v["fd"] for v in weaker),
    }


def joint_margin(
    features: np.ndarray, correct: np.ndarray, constants: dict[float, tuple[np.ndarray, np.ndarray]],
    reference: FeatureStatistics, resamples: int,
) -> tuple[float, float]:  # fmt: skip
    """A schedule's FD minus the constant curve's at the schedule's accuracy, and its bootstrap
    standard deviation resampling sample rows jointly for the FDs *and* the accuracies (the curve
    and the matched point recomputed on every resample), so the accuracies' errors count too.

    ``features``, ``correct``: the schedule's feature rows and per-sample classifier hits;
    ``constants``: weight -> the same of each constant weight, row by row on the same noise."""

    def margin(rows: np.ndarray) -> float:
        curve = {
            w: (frechet_distance(FeatureStatistics.from_features(f[rows]), reference),
                float(c[rows].mean()))
            for w, (f, c) in constants.items()
        }  # fmt: skip
        point = constant_curve_point(curve, float(correct[rows].mean()))
        fd = frechet_distance(FeatureStatistics.from_features(features[rows]), reference)
        return float(fd - point.fd)

    count = len(features)
    rng = np.random.default_rng(0)
    draws = [margin(rng.integers(0, count, count)) for _ in range(resamples)]
    return margin(np.arange(count)), float(np.std(draws, ddof=1))


def _paired_margin(
    source: Any, pick: GuidanceCandidate, unpaired: dict[str, Any], solver: Any, budget: int,
    weights: list[float], count: int, resamples: int, reference: FeatureReference,
) -> dict[str, tuple[float, float]]:  # fmt: skip
    """The pick's FD minus the interpolated constant curve's at its accuracy, by two paired
    bootstraps over the held-out samples (the pick and the constants ``weights`` regenerated):
    ``fd_only`` resamples the FDs at the matched point of the full sample (its accuracy held
    fixed), ``joint`` resamples FDs and accuracies together (:func:`joint_margin`)."""
    classifier = condition_judge(source).classifier
    labels = source.labels_for(range(count))

    def judged(candidate: GuidanceCandidate) -> tuple[np.ndarray, np.ndarray]:
        _, features, samples = _held_out(source, candidate, solver, budget, count, reference)
        return features, class_correct(classifier, samples, labels).numpy()

    pick_features, pick_correct = judged(pick)
    constants = {w: judged(GuidanceCandidate(GuidanceSchedule.constant(w), 7.0)) for w in weights}
    matched = unpaired["constant_at_pick_accuracy"]
    (low, high), t = matched["between"], matched["t"]
    fd_only = paired_fd_combination(  # one constant when low == high: the weights add up
        [pick_features, constants[low][0], constants[high][0]], [1.0, -(1.0 - t), -t],
        reference.statistics, resamples,
    )  # fmt: skip
    joint = joint_margin(pick_features, pick_correct, constants, reference.statistics, resamples)
    return {"fd_only": fd_only, "joint": joint}


def run_budget(budget: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement at ``budget`` passes (a process of its own with ``--jobs``)."""
    if args.jobs > 1:
        torch.set_num_threads(1)
    source = load_model("digits-cond")
    reference = FeatureReference.from_images(source.feature_extractor, source.reference_images)
    solver = get_solver(args.solver)
    settings = GuidanceSearchSettings(
        trials=args.trials, constant_weights=tuple(args.constant_weights),
        weight_range=(1.0, args.max_weight), select_trials=args.select_trials,
        pick_rule=args.pick_rule,
    )  # fmt: skip
    began = time.perf_counter()
    result = search_guidance(
        source, solver, budget, args.out / f"passes{budget}", settings=settings,
        num_samples=args.num_samples, select_samples=args.select_samples,
        held_out_samples=args.held_out_samples, held_out_seed=HELD_OUT_SEED,
        select_seed=SELECT_SEED, progress=True,
    )  # fmt: skip
    search_seconds = time.perf_counter() - began
    constants = {k: v for k, v in result.held_out.items() if k.startswith("constant")}

    # Wang et al.: linear increasing vs constant at equal mean weight
    low, high = noise_range(source.noise)
    mean = args.mean_weight
    pair = {
        "constant": GuidanceCandidate(GuidanceSchedule.constant(mean), 7.0),
        "linear_increasing": GuidanceCandidate(GuidanceSchedule.linear(mean, low, high), 7.0),
    }
    judged = {name: _held_out(source, c, solver, budget, args.held_out_samples, reference)
              for name, c in pair.items()}  # fmt: skip
    difference, spread = paired_fd_difference(
        judged["linear_increasing"][1], judged["constant"][1], reference.statistics, args.bootstrap
    )
    accuracy_difference = judged["linear_increasing"][0].accuracy - judged["constant"][0].accuracy
    wang = {
        "mean_weight": mean,
        "constant": judged["constant"][0].to_json_dict(),
        "linear_increasing": judged["linear_increasing"][0].to_json_dict(),
        "fd_difference": difference,
        "fd_difference_bootstrap_std": spread,
        "accuracy_difference": accuracy_difference,
    }

    # interval guidance at constant w=2's step count, fewer passes
    constant_steps = constants["constant w=2"].num_steps
    intervals = []
    for weight, top, bottom in args.intervals:
        sigma_hi = high * (low / high) ** top
        sigma_lo = high * (low / high) ** bottom
        guidance = GuidanceSchedule.interval(weight, sigma_lo, sigma_hi)
        grid, _ = steps_for_budget(
            GuidanceSchedule.constant(2.0), source.noise, solver, budget, 7.0
        )
        passes = unet_passes(guidance(source.noise.kdiffusion_sigma(solver.evaluation_times(grid))))
        score = _held_out(source, GuidanceCandidate(guidance, 7.0), solver, passes,
                          args.held_out_samples, reference)[0]  # fmt: skip
        base = constants["constant w=2"]
        intervals.append({
            "guidance": guidance.describe(), "progress_range": [top, bottom],
            **score.to_json_dict(),
            "reaches_constant": bool(score.passes < base.passes
                                     and score.fd <= base.fd + (base.fd_std or 0.0)
                                     and score.accuracy >= base.accuracy - base.accuracy_std),
        })  # fmt: skip
    held_out = {k: v.to_json_dict() for k, v in result.held_out.items()}
    paired = _paired_margin(
        source, result.pick.candidate, dominance(held_out), solver, budget,
        list(args.constant_weights), args.held_out_samples, args.bootstrap, reference,
    )  # fmt: skip
    return {
        "unet_passes": budget,
        "search_seconds": round(search_seconds, 1),
        "pick": result.pick.to_json_dict(),
        "pick_select": result.selection[result.pick.number].to_json_dict(),
        "held_out": held_out,
        "dominance": dominance(held_out, paired),
        "front_size": len(result.front),
        "wang_linear_vs_constant": wang,
        "constant_w2_steps": constant_steps,
        "intervals": intervals,
    }


def _unguided_note(row: dict[str, Any]) -> str:
    """A pick whose guidance touches none of its evaluations samples unguided, a constant pick
    differs from the curve only in its spacing: say so."""
    pick = row["held_out"]["pick"]
    if row["pick"]["shape"] == "constant":
        return (
            f" The pick is constant guidance (w={row['pick']['parameters']['weight']:.3g}): what "
            f"it changes against the curve is the step spacing, Karras rho "
            f"{row['pick']['rho']:.3g} instead of 7."
        )
    if pick["unet_passes"] != pick["num_steps"]:
        return ""
    return (
        f" The pick's {row['pick']['shape']} guidance holds none of its {pick['num_steps']} "
        "evaluation noise levels: it samples unguided (one pass a step), and its gain over the "
        f"constant curve (Karras rho 7) is its step spacing, rho {row['pick']['rho']:.3g}."
    )


def command(settings: dict[str, Any]) -> str:
    """The command line that measures ``settings`` (the report's)."""
    flags = ("nfe", "trials", "num_samples", "select_trials", "select_samples",
             "held_out_samples", "pick_rule")  # fmt: skip
    parts = ["python benchmarks/guidance.py"]
    for name in flags:
        value = settings.get(name, "default" if name == "pick_rule" else None)
        if value is not None:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"--{name.replace('_', '-')} {shown}")
    return " ".join([*parts, "--jobs 2"])


def _margin_text(d: dict[str, Any]) -> str:
    """The dominance margin with the standard error that decides (and the FD-only one)."""
    text = (
        f"{d['fd_margin']:+.2f} ± {d['fd_margin_std']:.2f} from it "
        f"({d.get('fd_margin_std_kind', 'independent')} standard error"
    )
    if d.get("fd_margin_std_fd_only") is not None:
        text += f"; FD-only paired bootstrap ± {d['fd_margin_std_fd_only']:.2f}"
    return text + f"; {'more' if d['significant'] else 'less'} than two)"


def budget_section(row: dict[str, Any], title: str) -> list[str]:
    """One budget's held-out scores, dominance reading, Wang et al.'s pair and intervals."""
    lines = [f"## {title}", "",
             "| schedule | steps | passes | FD-digits (± boot. s.e.) | accuracy (± s.e.) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, s in row["held_out"].items():
        label = (
            name
            if name != "pick"
            else f"**searched**: {row['pick']['shape']} "
            + ", ".join(f"{k}={v:.3g}" for k, v in row["pick"]["parameters"].items())
            + f", rho={row['pick']['rho']:.3g}"
        )
        lines.append(f"| {label} | {s['num_steps']} | {s['unet_passes']} | {s['fd']:.2f} ± "
                     f"{s['fd_std'] or math.nan:.2f} | {s['accuracy']:.4f} ± "
                     f"{s['accuracy_std']:.4f} |")  # fmt: skip
    w = row["wang_linear_vs_constant"]
    d = row["dominance"]
    matched = d["constant_at_pick_accuracy"]
    lines += [
        "",
        f"Searched schedule dominates constant guidance: **{d['dominates']}**. Constant "
        f"guidance at the pick's accuracy ({matched['accuracy']:.4f}: weight "
        f"{matched['weight']:.3g} on the curve interpolated in the weight) has FD "
        f"{matched['fd']:.2f}; the pick's FD is {_margin_text(d)}. Below the FD of every less "
        f"accurate constant weight: {d['below_every_less_accurate_constant']}."
        + _unguided_note(row),
        "",
        f"Wang et al., linear-increasing vs constant at mean weight {w['mean_weight']:g}: FD "
        f"{w['linear_increasing']['fd']:.2f} vs {w['constant']['fd']:.2f}, difference "
        f"{w['fd_difference']:+.2f} ± {w['fd_difference_bootstrap_std']:.2f} (paired "
        f"bootstrap); accuracy {w['linear_increasing']['accuracy']:.4f} vs "
        f"{w['constant']['accuracy']:.4f}.",
        "",
        "| interval schedule (constant w=2's steps) | steps | passes | FD | accuracy | "
        "reaches constant w=2 |",
        "|---|---|---|---|---|---|",
    ]
    for i in row["intervals"]:
        lines.append(f"| {i['guidance']} | {i['num_steps']} | {i['unet_passes']} | "
                     f"{i['fd']:.2f} | {i['accuracy']:.4f} | {i['reaches_constant']} |")  # fmt: skip
    return [*lines, ""]


def _run_label(settings: dict[str, Any]) -> str:
    return (
        f"{settings['trials']} trials × {settings['num_samples']}, selection "
        f"{settings['select_trials']} × {settings['select_samples']:,}, held-out "
        f"{settings['held_out_samples']:,}"
    )


def runs_table(report: dict[str, Any]) -> list[str]:
    """Every recorded run's pick against the constant curve, one row per budget."""
    runs = [report, *report.get("other_runs", {}).values()]
    lines = [
        "| run | passes | pick | steps / passes | FD | accuracy | constant curve there | "
        "margin (FD-only s.e.) | margin (joint s.e.) | dominates (2 joint s.e.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run["budgets"]:
            pick, held, d = row["pick"], row["held_out"]["pick"], row["dominance"]
            described = f"{pick['shape']} " + ", ".join(
                f"{k}={v:.3g}" for k, v in pick["parameters"].items() if not k.startswith("sigma_m")
            )
            fd_only = d.get("fd_margin_std_fd_only")
            if fd_only is None and d["fd_margin_std_kind"] == "paired bootstrap":
                fd_only = d["fd_margin_std"]  # recorded before the joint bootstrap
            joint = d["fd_margin_std_kind"] == "joint paired bootstrap"
            lines.append(
                f"| {_run_label(run['settings'])} | {row['unet_passes']} | {described}, rho "
                f"{pick['rho']:.3g} | {held['num_steps']} / {held['unet_passes']} | "
                f"{held['fd']:.2f} | {held['accuracy']:.4f} | "
                f"{d['constant_at_pick_accuracy']['fd']:.2f} | "
                + (f"{d['fd_margin']:+.2f} ± {fd_only:.2f}" if fd_only is not None else "-")
                + " | "
                + (f"{d['fd_margin']:+.2f} ± {d['fd_margin_std']:.2f}" if joint else "-")
                + f" | {'yes' if joint and d['significant'] else 'no'} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Guidance schedules on digits-cond (held-out noise)",
        "",
        f"Settings: {report['settings']}. Budgets count network (UNet) passes per sample.",
        "",
        f"Measured {report['environment']['date'][:10]} on {report['environment']['cpu_count']} "
        f"CPU cores, one budget per process (`{command(report['settings'])}`); the pick is made "
        "on the selection seed (2) by that pick rule, every number below is on held-out seed 1. "
        "The constant curve between two weights is interpolated linearly in the weight; at 8 "
        "passes every weight above 1 costs two passes a step (4 steps), so between w=1 (8 steps) "
        "and w=1.25 the interpolation is kinder to constant guidance than any real weight there. "
        "The margin's standard error that decides is a paired bootstrap over the shared held-out "
        "samples resampling the FDs and the accuracies together (the constant curve and the "
        "matched point recomputed each time); the FD-only one holds the matched accuracy fixed. "
        "What the numbers say: [docs/guidance.md](../../docs/guidance.md).",
        "",
    ]
    for row in report["budgets"]:
        lines += budget_section(row, f"{row['unet_passes']} UNet passes")
    lines += [
        "## Every recorded run (held-out seed 1)",
        "",
        "Each search is its own study, with the margin pick rule. Where a row has a joint "
        "standard error, it was computed in the run or, for runs recorded before it existed, on "
        f"{report.get('rescored', '-')} by `python benchmarks/guidance.py --rescore` (the pick "
        "and the constant curve regenerated from the recorded settings; sampling is "
        "deterministic, so the margins are the recorded ones).",
        "",
        *runs_table(report),
        "",
    ]
    main_passes = {row["unet_passes"] for row in report["budgets"]}
    for name, run in report.get("other_runs", {}).items():
        for row in run["budgets"]:
            if row["unet_passes"] not in main_passes:
                title = f"{row['unet_passes']} UNet passes ({name}: {_run_label(run['settings'])})"
                lines += budget_section(row, title)
    return "\n".join(lines).rstrip("\n") + "\n"


def _rescore_row(settings: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """``row``'s dominance recomputed with the joint bootstrap (pick and constant curve
    regenerated on held-out noise from the recorded settings)."""
    torch.set_num_threads(1)
    source = load_model("digits-cond")
    reference = FeatureReference.from_images(source.feature_extractor, source.reference_images)
    pick = row["pick"]
    candidate = GuidanceCandidate(GuidanceSchedule(pick["shape"], pick["parameters"]), pick["rho"])
    unpaired = dominance(row["held_out"])
    paired = _paired_margin(
        source, candidate, unpaired, get_solver(settings["solver"]), row["unet_passes"],
        [float(w) for w in settings["constant_weights"]], settings["held_out_samples"],
        settings["bootstrap"], reference,
    )  # fmt: skip
    # sampling is deterministic up to the thread count's float rounding (1e-5 in FD)
    if abs(paired["joint"][0] - unpaired["fd_margin"]) > 1e-3:
        raise RuntimeError(
            f"regenerated margin {paired['joint'][0]:.6f} differs from the recorded "
            f"{unpaired['fd_margin']:.6f} ({row['unet_passes']} passes): not the recorded run"
        )
    return dominance(row["held_out"], paired)


def rescore(jobs: int) -> dict[str, Any]:
    """Recompute the dominance margin of every recorded run in ``guidance.json`` (its budgets and
    ``other_runs``) with the joint bootstrap, smallest budget first, rewriting the report after each
    (rows already rescored are kept: a rerun resumes)."""
    report = json.loads((RESULTS / "guidance.json").read_text())
    runs = [report, *report.get("other_runs", {}).values()]
    tasks = [
        (run["settings"], row)
        for run in runs
        for row in run["budgets"]
        if row["dominance"].get("fd_margin_std_kind") != "joint paired bootstrap"
    ]
    tasks.sort(key=lambda task: task[1]["unet_passes"])  # the budgets (8, 16) first
    os.environ["OMP_NUM_THREADS"] = "1"
    report["rescored"] = time.strftime("%Y-%m-%d")
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(_rescore_row, *task): task for task in tasks}
        for future in as_completed(futures):
            futures[future][1]["dominance"] = future.result()
            atomic_write_json(RESULTS / "guidance.json", report)
            atomic_write_text(RESULTS / "guidance.md", markdown(report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--solver", default="dpm_solver_pp_2m")
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--held-out-samples", type=int, default=5000)
    parser.add_argument("--select-samples", type=int, default=1000)
    parser.add_argument("--select-trials", type=int, default=12)
    parser.add_argument(
        "--pick-rule", default="margin", choices=["default", "margin"],
        help="the search's pick rule (stepsearch.search.guidance.PICK_RULES)",
    )  # fmt: skip
    parser.add_argument(
        "--constant-weights", type=float, nargs="+", default=[1, 1.25, 1.5, 1.75, 2, 3, 4]
    )
    parser.add_argument("--jobs", type=int, default=1, help="budgets run in parallel processes")
    parser.add_argument("--max-weight", type=float, default=5.0)
    parser.add_argument("--mean-weight", type=float, default=2.0)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="study folder (default: temp)")
    parser.add_argument(
        "--rescore", action="store_true",
        help="recompute the recorded runs' margins with the joint bootstrap (no search)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rescore:
        if not (RESULTS / "guidance.json").is_file():
            parser.error(
                f"--rescore needs a recorded report: {RESULTS / 'guidance.json'} is missing"
            )
        report = rescore(args.jobs)
        atomic_write_json(RESULTS / "guidance.json", report)
        atomic_write_text(RESULTS / "guidance.md", markdown(report))
        print(markdown(report))
        return
    # (weight, top, bottom): guided for progress top..bottom of the log-sigma range
    args.intervals = [(2.0, 0.2, 0.8), (3.0, 0.2, 0.8), (2.5, 0.3, 1.0), (3.0, 0.0, 0.6)]
    with tempfile.TemporaryDirectory() as scratch:
        args.out = args.out or Path(scratch)
        if args.jobs > 1:
            os.environ["OMP_NUM_THREADS"] = "1"
            with ProcessPoolExecutor(args.jobs) as pool:
                budgets = list(pool.map(run_budget, args.nfe, [args] * len(args.nfe)))
        else:
            budgets = [run_budget(budget, args) for budget in args.nfe]
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "jobs")},
        "environment": environment(),
        "budgets": budgets,
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "guidance.json", report)
    atomic_write_text(RESULTS / "guidance.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
