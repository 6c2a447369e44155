"""``stepsearch optimize`` at default settings on the bundled digits DDPM, NFE 4 5 6 8 10.

The run (:func:`stepsearch.search.optimize.optimize`: DP, AYS, OLSS, then AutoDiffusion with the
rest of the budget; the winner per NFE picked on FD-digits of seed 1, every number on seed 2 with
1,000 samples) writes its folder to ``benchmarks/results/optimize_run/``; this script then checks
NFE 5 on 5,000 more report-seed samples (winner and best built-in, ``--confirm-samples``) and writes
``benchmarks/results/optimize.{json,md}``: per NFE the winner and the best built-in on FD-digits and
trajectory error, the gain, the winner's FD over the converged reference's (goals: <= 1.25 at NFE 5,
<= 1.05 at NFE 10) and the two-judges flags. Rerunning resumes the run folder.

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/optimize.py`` (defaults: 60 search minutes;
``--quick`` for a smoke run: NFE 4 6, 256 samples, 2 minutes, no confirmation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_image_model
from stepsearch.search.optimize import (
    METHODS,
    REPORT_SEED,
    SELECT_SEED,
    OptimizeSettings,
    demo_settings,
    gains_in_words,
    optimize,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _confirm(report: dict[str, Any], run_dir: Path, nfe: int, samples: int) -> dict[str, Any]:
    """FD-digits of NFE ``nfe``'s winner and best built-in on ``samples`` report-seed samples."""
    from stepsearch.models.batches import generate_with_diffusers_scheduler
    from stepsearch.search.optimize import load_scheduler_dir

    model = load_image_model("digits")
    judge = Objective(model, "fd", num_samples=2, search_seed=SELECT_SEED,
                      held_out_seed=REPORT_SEED, held_out_samples=samples)  # fmt: skip
    entry = report["per_nfe"][str(nfe)]
    out = {"samples": samples}
    folder = run_dir / f"nfe-{nfe}"
    from safetensors import safe_open

    with safe_open(str(folder / "samples.safetensors"), "pt") as grid:
        steps = grid.metadata()
    for role, directory in (("winner", "scheduler"), ("baseline", "baseline_scheduler")):
        scheduler = load_scheduler_dir(folder / directory)
        made, _ = generate_with_diffusers_scheduler(
            model.model_fn, scheduler, int(steps[f"steps_{role}"]), samples, model.sample_shape,
            seed=REPORT_SEED, progress=False,
        )  # fmt: skip
        out[role] = {
            "label": entry["winner" if role == "winner" else "best_baseline"],
            "fd": judge.score_samples(made, nfe, split="held_out").to_json_dict(),
        }
    # The converged solve on the same noise: FD at 5,000 samples has less bias than at 1,000, so the
    # winner's ratio to the reference is read against the reference at the same sample count.
    teacher, spec = judge.teacher("held_out"), judge.teacher_spec
    out["reference"] = {
        "label": f"{spec.solver}, {spec.num_steps} {spec.spacing} steps",
        "fd": judge.score_samples(teacher, spec.num_steps, split="held_out").to_json_dict(),
    }
    return out


def _markdown(
    report: dict[str, Any], confirm: dict[str, Any] | None, seconds: float, invocations: int = 1
) -> str:
    lines = [
        "# stepsearch optimize on the bundled digits DDPM",
        "",
        f"Report seed {report['report']['seed']}, {report['report']['samples']} samples per cell; "
        f"winner picked on seed {report['selection']['seed']} by {report['selection']['metric']}; "
        f"searches on seed 0. Whole run {seconds / 60:.1f} min"
        + (f" over {invocations} invocations (resumed)" if invocations > 1 else "")
        + (" (**partial**: " + "; ".join(f"NFE {i['nfe']} {i['stage']}: {i['reason']}"
                                          for i in report["incomplete"]) + ")"
           if report["partial"] else "")
        + ".",
        "",
        "| NFE | winner | FD-digits | traj | best built-in | FD-digits | traj | FD gain | "
        "winner FD / reference FD |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for nfe, entry in report["per_nfe"].items():
        rows = {row["label"]: row["report"] for row in entry["rows"]}
        win, base = rows[entry["winner"]], rows[entry["best_baseline"]]
        gain, ratio = entry["gain"].get("fd"), entry["fd_over_reference"]
        lines.append(
            f"| {nfe} | {entry['winner']} | {win['fd']:.4g} | {win['traj']:.4g} | "
            f"{entry['best_baseline']} | {base['fd']:.4g} | {base['traj']:.4g} | "
            f"{'' if gain is None else f'{100 * gain:.1f}%'} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    reference = report["reference"].get("fd", {}).get("value")
    lines += ["", f"Converged reference FD-digits: {reference:.4g}." if reference else ""]
    flags = [(n, e["two_judges"]) for n, e in report["per_nfe"].items() if e["two_judges"]]
    if flags:
        lines += ["", "Two judges:", ""] + [f"- NFE {n}: {t}" for n, t in flags]
    if confirm:
        lines += ["", f"NFE 5 on {confirm['samples']} report-seed samples: winner "
                  f"{confirm['winner']['label']} FD {confirm['winner']['fd']['value']:.4g}, best "
                  f"built-in {confirm['baseline']['label']} FD {confirm['baseline']['fd']['value']:.4g}"
                  + (f", converged reference ({confirm['reference']['label']}) FD "
                     f"{confirm['reference']['fd']['value']:.4g}: winner / reference "
                     f"{confirm['winner']['fd']['value'] / confirm['reference']['fd']['value']:.3f}"
                     if "reference" in confirm else "") + "."]  # fmt: skip
    root = str(RESULTS.parent.parent) + "/"  # scheduler paths relative to the repository
    lines += ["", "In words:", ""] + [f"- {line.replace(root, '')}" for line in gains_in_words(report)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--confirm-samples", type=int, default=5000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default=str(RESULTS / "optimize"))
    parser.add_argument("--replot", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    previous_path = Path(args.out + ".json")
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    if args.replot:
        if previous is None:
            parser.error(f"--replot: no {previous_path}")
        atomic_write_text(args.out + ".md", _markdown(
            previous["report"], previous.get("confirm_nfe5"),
            previous.get("seconds_total", previous["seconds"]), previous.get("invocations", 1)))  # fmt: skip
        return
    settings = OptimizeSettings()
    if args.quick:
        args.nfe, args.budget_minutes, args.confirm_samples = [4, 6], 2.0, 0
        settings = demo_settings()
    began = time.perf_counter()
    run_dir = Path(args.out + "_run")
    result = optimize(
        "digits", args.nfe, args.methods, args.budget_minutes, run_dir, resume=True,
        settings=settings, cache=TensorCache(args.cache) if args.cache else None,
    )  # fmt: skip
    confirm = None
    if args.confirm_samples and 5 in args.nfe:
        confirm = _confirm(result.report, run_dir, 5, args.confirm_samples)
    seconds = time.perf_counter() - began
    # A rerun resumes the run folder: the whole run's time is every invocation's, added up.
    same_run = previous is not None and previous["report"]["nfes"] == result.report["nfes"]
    total = seconds + (previous.get("seconds_total", previous["seconds"]) if same_run else 0.0)
    invocations = 1 + (previous.get("invocations", 1) if same_run else 0)
    payload = {"report": result.report, "confirm_nfe5": confirm, "seconds": round(seconds, 1),
               "seconds_total": round(total, 1), "invocations": invocations,
               "quick": args.quick, "environment": environment()}  # fmt: skip
    atomic_write_json(args.out + ".json", payload)
    atomic_write_text(args.out + ".md", _markdown(result.report, confirm, total, invocations))
    print("\n".join(gains_in_words(result.report)))


if __name__ == "__main__":
    main()
