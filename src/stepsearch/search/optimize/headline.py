"""The honest headline of an optimize run: each NFE's winner against converged solves, re-judged on
fresh noise with many samples.

Why (measured on the bundled digits model, 2026-12-05, see ``benchmarks/results/headline.md``):
the report's "FD / converged FD" at 1,000 samples (1.08x at NFE 5) and an independent check's
(2.33x) disagreed because

- the plain FD of ``n`` samples in a 64-d feature space carries a bias of roughly ``c / n`` with
  ``c`` ~1e4 (+9 at 1,000 samples, +2 at 5,000, while the converged solve's own FD is ~1): a ratio
  of two plain FDs shrinks towards 1 and depends on ``n`` (the report itself found 1.08x at 1,000
  and 1.31x at 5,000 samples). The headline therefore compares FD extrapolated to infinitely many
  samples (:func:`~stepsearch.eval.fid.frechet_distance_infinity`), and states the plain FDs and
  their difference (nearly bias-free) beside it;
- "trajectory error" was the median per-sample RMS in the report and a mean in the check (0.028
  vs 0.047 on the same samples: the per-sample errors are heavy-tailed); both are stated here.

The converged solves themselves agree (3M on 100 logSNR steps vs 2M on 250 trailing steps: 0.0026
median RMS apart, a tenth of the NFE-5 winner's error), and the written scheduler directory run in
diffusers' own loop reproduces stepsearch's sampling of the same solver to ~1e-5.

What :func:`judge_headline` does, per fresh seed (:data:`HEADLINE_SEEDS`, never used by the
searches, the selection or the report): the candidates' scheduler directories are run in
diffusers' own loop, each converged solve (:data:`HEADLINE_REFERENCES`) by stepsearch on the same
noise (cached like every teacher); FD (plain and extrapolated) against the source's reference
data, and trajectory error to each converged solve (median, mean, 90th percentile).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from stepsearch.cache import TensorCache
from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import FeatureStatistics, frechet_distance, frechet_distance_infinity
from stepsearch.eval.objective import Objective
from stepsearch.eval.scoring import finite_samples
from stepsearch.eval.trajectory import per_sample_rms_error
from stepsearch.models import DiffusionModel, TeacherSpec, record_trajectories, teacher_key
from stepsearch.search.optimize.candidates import load_scheduler_dir
from stepsearch.search.optimize.settings import REPORT_SEED, SELECT_SEED

__all__ = [
    "HEADLINE_REFERENCES",
    "HEADLINE_SEEDS",
    "HeadlineCandidate",
    "HeadlineSettings",
    "headline_markdown",
    "judge_headline",
    "run_candidates",
    "write_run_headline",
]

HEADLINE_REFERENCES = (
    TeacherSpec("dpm_solver_pp_3m", "logsnr_uniform", 100),
    TeacherSpec("dpm_solver_pp_2m", "trailing", 250),
)
"""Two independent converged solves (other solver, order, spacing and step count)."""

HEADLINE_SEEDS = (3, 4)
"""Fresh noise: the searches use seed 0, the selection seed 1, the report seed 2."""

PAIRED_BOOTSTRAP = 20
"""Bootstrap resamples of the paired FD difference (candidate - converged, same noise)."""

AGREEMENT_SIGMAS = 3.0
"""Two converged solves agree when their FD_inf differ by at most this many standard errors."""


@dataclass(frozen=True)
class HeadlineSettings:
    """How the headline is judged.

    Args:
        samples: samples per seed (default 5,000: the main job on digits; tests use tiny counts).
        seeds: fresh noise streams (at least one; none of the run's seeds 0, 1, 2).
        references: the converged solves (at least one; two independent ones by default).
        chunk_size: samples per model call.
    """

    samples: int = 5000
    seeds: tuple[int, ...] = HEADLINE_SEEDS
    references: tuple[TeacherSpec, ...] = HEADLINE_REFERENCES
    chunk_size: int = 500

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or int(self.samples) < 8:
            raise ValueError(f"headline samples must be an integer >= 8, got {self.samples!r}")
        seeds = tuple(int(s) for s in self.seeds)
        used = {0, SELECT_SEED, REPORT_SEED}
        if not seeds or len(set(seeds)) != len(seeds) or used & set(seeds):
            raise ValueError(
                f"headline seeds must be distinct and fresh (not {sorted(used)}: the search, "
                f"selection and report seeds), got {list(self.seeds)}"
            )
        if not self.references:
            raise ValueError("headline references: name at least one converged solve")
        if isinstance(self.chunk_size, bool) or int(self.chunk_size) < 1:
            raise ValueError(f"headline chunk_size must be >= 1, got {self.chunk_size!r}")
        object.__setattr__(self, "seeds", seeds)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "samples": int(self.samples),
            "seeds": list(self.seeds),
            "references": [spec.to_json_dict() for spec in self.references],
            "chunk_size": int(self.chunk_size),
        }


@dataclass(frozen=True)
class HeadlineCandidate:
    """A sampler the headline re-judges: a scheduler directory run in diffusers' own loop at
    ``num_inference_steps``; ``label`` is unique among the candidates judged together."""

    label: str
    scheduler_dir: Path
    num_inference_steps: int
    nfe: int
    extra: Mapping[str, Any] = field(default_factory=dict)


def _label(spec: TeacherSpec) -> str:
    return f"{spec.solver} / {spec.spacing} x{spec.num_steps}"


def run_candidates(run_dir: str | Path) -> list[tuple[int, list[HeadlineCandidate]]]:
    """The winner and best built-in of every NFE of an optimize run directory, as written there
    (``nfe-N/winner.json`` with its ``scheduler``; ``nfe-N/baseline_scheduler``, its step count
    from ``samples.safetensors``)."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    found = []
    for nfe_text, entry in sorted(report["per_nfe"].items(), key=lambda item: int(item[0])):
        nfe, folder = int(nfe_text), run_dir / f"nfe-{nfe_text}"
        winner = json.loads((folder / "winner.json").read_text())
        if "scheduler" not in winner.get("files", {}):
            continue
        candidates = [
            HeadlineCandidate(
                f"NFE {nfe} winner: {winner['label']}", folder / winner["files"]["scheduler"],
                int(winner["num_inference_steps"]), nfe, {"role": "winner"},
            )
        ]  # fmt: skip
        baseline_dir = folder / "baseline_scheduler"
        steps = _baseline_steps(folder, baseline_dir, nfe)
        if steps is not None:
            candidates.append(
                HeadlineCandidate(
                    f"NFE {nfe} best built-in: {entry['best_baseline']}", baseline_dir, steps, nfe,
                    {"role": "baseline"},
                )
            )  # fmt: skip
        found.append((nfe, candidates))
    return found


def _baseline_steps(folder: Path, scheduler_dir: Path, nfe: int) -> int | None:
    """The best built-in's ``num_inference_steps``: as the sample grid recorded it, else the
    drop-in's own schedule length (``custom_times``), else the NFE (diffusers' multistep
    schedulers spend one evaluation per step); ``None`` without a scheduler directory."""
    config_path = scheduler_dir / "scheduler_config.json"
    if not config_path.is_file():
        return None
    path = folder / "samples.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            steps = (file.metadata() or {}).get("steps_baseline")
        if steps is not None:
            return int(steps)
    times = json.loads(config_path.read_text()).get("custom_times")
    return len(times) - 1 if times else nfe


def _fd(features: np.ndarray, reference: FeatureStatistics, seed: int) -> dict[str, float]:
    extrapolated = frechet_distance_infinity(features, reference, seed=seed)
    return {
        "fd": extrapolated.at_full,
        "fd_inf": extrapolated.value,
        "fd_inf_std": extrapolated.std,
    }


def _paired_std(
    candidate: np.ndarray, reference: np.ndarray, statistics: FeatureStatistics, seed: int
) -> float:
    """Standard error of ``FD(candidate) - FD(reference)`` by a paired bootstrap: the same
    resampled sample indices (the same noise) for both."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(PAIRED_BOOTSTRAP):
        rows = rng.integers(0, len(candidate), len(candidate))
        differences.append(
            frechet_distance(FeatureStatistics.from_features(candidate[rows]), statistics)
            - frechet_distance(FeatureStatistics.from_features(reference[rows]), statistics)
        )
    return float(np.std(differences, ddof=1))


def _traj(samples: Tensor, reference: Tensor) -> dict[str, float]:
    errors = per_sample_rms_error(samples, reference).numpy()
    return {
        "median": float(np.median(errors)),
        "mean": float(np.mean(errors)),
        "p90": float(np.quantile(errors, 0.9)),
    }


def judge_headline(
    model: DiffusionModel,
    candidates: Sequence[HeadlineCandidate],
    settings: HeadlineSettings | None = None,
    *,
    cache: TensorCache | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Re-judge ``candidates`` against ``settings.references`` on ``settings.seeds`` (module
    docstring). Returns JSON data: per seed, each reference's and candidate's FD (plain and
    extrapolated, where the model has a feature network and reference data) and each candidate's
    trajectory error to each reference; ``ratios`` (candidate FD_inf / reference FD_inf per seed,
    and the plain FD ratio); ``references_agree`` with the evidence."""
    settings = settings or HeadlineSettings()
    cache = cache if cache is not None else TensorCache.default()
    count = int(settings.samples)
    statistics = None
    if model.features is not None and model.reference_data is not None:
        judge = Objective(model, "fd", num_samples=count, cache=cache)
        statistics = FeatureStatistics.from_features(judge.reference_features())
    per_seed: dict[str, Any] = {}
    for seed in settings.seeds:
        solved: dict[str, Tensor] = {}
        for spec in settings.references:
            solved[_label(spec)] = record_trajectories(
                model, spec, count, seed=seed, cache=cache, cache_kind="teacher",
                cache_key=teacher_key(model, spec.to_json_dict(), seed, count),
                chunk_size=settings.chunk_size,
                progress=f"converged {_label(spec)}, seed {seed}" if progress else False,
            )  # fmt: skip
        made = {
            c.label: model.sample_diffusers(
                load_scheduler_dir(c.scheduler_dir), c.num_inference_steps, count, seed, None,
                settings.chunk_size, f"{c.label}, seed {seed}" if progress else False,
            )
            for c in candidates
        }  # fmt: skip
        entry: dict[str, Any] = {"references": {}, "candidates": {}}
        for label, samples in solved.items():
            entry["references"][label] = {
                "traj_to": {o: _traj(samples, other) for o, other in solved.items() if o != label}
            }
        for label, samples in made.items():
            entry["candidates"][label] = {
                "traj_to": {o: _traj(samples, other) for o, other in solved.items()}
            }
        if statistics is not None:
            assert model.features is not None
            features: dict[str, np.ndarray] = {}
            for group, sets in (("references", solved), ("candidates", made)):
                for label, samples in sets.items():
                    features[label] = ensure_features(
                        finite_samples(samples), model.features, progress=False
                    )
                    entry[group][label].update(_fd(features[label], statistics, seed))
            for label in made:
                entry["candidates"][label]["fd_difference_std"] = {
                    ref: _paired_std(features[label], features[ref], statistics, seed)
                    for ref in solved
                }
        per_seed[str(seed)] = entry
    payload: dict[str, Any] = {
        "settings": settings.to_json_dict(),
        "candidates": [
            {"label": c.label, "nfe": c.nfe, "num_inference_steps": c.num_inference_steps,
             "scheduler_dir": str(c.scheduler_dir), **dict(c.extra)}
            for c in candidates
        ],
        "seeds": per_seed,
    }  # fmt: skip
    if statistics is not None:
        payload["ratios"] = _ratios(per_seed)
        payload["references_agree"] = _agreement(per_seed)
    return payload


def _ratios(per_seed: Mapping[str, Any]) -> dict[str, Any]:
    """Candidate / reference FD_inf (and plain FD) per reference, per seed, with their mean."""
    ratios: dict[str, Any] = {}
    first = next(iter(per_seed.values()))
    for label in first["candidates"]:
        ratios[label] = {}
        for ref in first["references"]:
            inf = [_inf_ratio(s["candidates"][label], s["references"][ref])
                   for s in per_seed.values()]  # fmt: skip
            plain = [s["candidates"][label]["fd"] / s["references"][ref]["fd"]
                     for s in per_seed.values()]  # fmt: skip
            difference = [s["candidates"][label]["fd"] - s["references"][ref]["fd"]
                          for s in per_seed.values()]  # fmt: skip
            difference_std = [s["candidates"][label]["fd_difference_std"][ref]
                              for s in per_seed.values()]  # fmt: skip
            ratios[label][ref] = {
                "fd_inf_ratio": inf,
                "fd_inf_ratio_mean": None if None in inf else float(np.mean(inf)),
                "fd_ratio": plain, "fd_difference": difference,
                "fd_difference_std": difference_std,
            }  # fmt: skip
    return ratios


def _inf_ratio(candidate: Mapping[str, float], reference: Mapping[str, float]) -> float | None:
    """Candidate FD_inf / reference FD_inf; ``None`` where the reference's FD_inf is within two
    standard errors of 0 (too few samples to tell the converged solve from the data)."""
    if reference["fd_inf"] <= 2.0 * reference["fd_inf_std"]:
        return None
    return candidate["fd_inf"] / reference["fd_inf"]


def _agreement(per_seed: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the converged solves' FD_inf agree within their own noise: on every seed the
    difference is within :data:`AGREEMENT_SIGMAS` standard errors (the fit's, combined with the
    seed-to-seed spread of each solve's FD_inf where there are several seeds)."""
    references = list(next(iter(per_seed.values()))["references"])
    if len(references) < 2:
        return {"agree": None, "why": "one converged solve only"}
    spread = {
        ref: float(np.std([s["references"][ref]["fd_inf"] for s in per_seed.values()], ddof=1))
        if len(per_seed) > 1 else 0.0
        for ref in references
    }  # fmt: skip
    checks = []
    for seed, entry in per_seed.items():
        for i, a in enumerate(references):
            for b in references[i + 1 :]:
                ra, rb = entry["references"][a], entry["references"][b]
                noise = math.sqrt(
                    ra["fd_inf_std"] ** 2 + rb["fd_inf_std"] ** 2 + spread[a] ** 2 + spread[b] ** 2
                )
                gap = abs(ra["fd_inf"] - rb["fd_inf"])
                checks.append({"seed": int(seed), "pair": [a, b], "fd_inf_gap": gap,
                               "noise": noise, "agree": gap <= AGREEMENT_SIGMAS * noise})  # fmt: skip
    return {"agree": all(c["agree"] for c in checks), "checks": checks}


def headline_markdown(payload: Mapping[str, Any], title: str = "Headline") -> str:
    """The headline as markdown: one table per NFE, the references' agreement."""
    settings = payload["settings"]
    seeds = list(payload["seeds"])
    refs = [_label(TeacherSpec(**spec)) for spec in settings["references"]]
    lines = [
        f"# {title}",
        "",
        f"{settings['samples']} samples on each of the fresh seeds {', '.join(seeds)} (noise no "
        "search, selection or report saw); candidates run from their scheduler directories in "
        "diffusers' own loop; converged solves by stepsearch on the same noise. FD_inf is the FD "
        "extrapolated to infinitely many samples (the plain FD of n samples carries a bias of "
        "about c / n that shrinks ratios towards 1); trajectory error is the per-sample RMS to "
        "the converged solve from the same noise (median / mean).",
        "",
    ]
    first = payload["seeds"][seeds[0]]
    has_fd = "fd_inf" in next(iter(first["references"].values()))
    if has_fd:
        lines += ["| converged solve | " + " | ".join(f"FD seed {s} | FD_inf seed {s}"
                  for s in seeds) + " |", "| --- |" + " ---: | ---: |" * len(seeds)]  # fmt: skip
        for ref in refs:
            cells = [f"{payload['seeds'][s]['references'][ref]['fd']:.3g} | "
                     f"{payload['seeds'][s]['references'][ref]['fd_inf']:.3g} "
                     f"± {payload['seeds'][s]['references'][ref]['fd_inf_std']:.2g}"
                     for s in seeds]  # fmt: skip
            lines.append(f"| {ref} | " + " | ".join(cells) + " |")
        agree = payload["references_agree"]
        verdict = {True: "agree within their own noise", False: "**do not agree** within their "
                   "own noise: the ratios below are uncertain by their difference",
                   None: agree.get("why", "")}[agree["agree"]]  # fmt: skip
        lines += ["", f"The converged solves {verdict}."]
    for i, ref in enumerate(refs):
        for other in refs[i + 1 :]:
            dist = [payload["seeds"][s]["references"][ref]["traj_to"][other] for s in seeds]
            lines.append(
                f"Distance between the converged solves {ref} and {other}: median RMS "
                + ", ".join(f"{d['median']:.4f}" for d in dist) + " (mean "
                + ", ".join(f"{d['mean']:.4f}" for d in dist) + ")."
            )  # fmt: skip
    lines.append("")
    by_nfe: dict[int, list[dict[str, Any]]] = {}
    for candidate in payload["candidates"]:
        by_nfe.setdefault(int(candidate["nfe"]), []).append(candidate)
    for nfe, group in sorted(by_nfe.items()):
        lines += [f"## NFE {nfe}", ""]
        header = "| candidate | converged solve | traj median | traj mean |"
        rule = "| --- | --- | ---: | ---: |"
        if has_fd:
            header += " FD | FD_inf | FD_inf / converged | FD / converged | FD - converged |"
            rule += " ---: | ---: | ---: | ---: | ---: |"
        lines += [header, rule]
        for candidate in group:
            label = candidate["label"]
            for ref in refs:
                rows = [payload["seeds"][s]["candidates"][label] for s in seeds]
                cells = [label, ref,
                         " / ".join(f"{r['traj_to'][ref]['median']:.4f}" for r in rows),
                         " / ".join(f"{r['traj_to'][ref]['mean']:.4f}" for r in rows)]  # fmt: skip
                if has_fd:
                    ratio = payload["ratios"][label][ref]
                    cells += [
                        " / ".join(f"{r['fd']:.3g}" for r in rows),
                        " / ".join(f"{r['fd_inf']:.3g}" for r in rows),
                        " / ".join(
                            "n/a" if v is None else f"{v:.2f}x" for v in ratio["fd_inf_ratio"]
                        ),
                        " / ".join(f"{v:.2f}x" for v in ratio["fd_ratio"]),
                        " / ".join(
                            f"{v:+.2f} ± {e:.2f}"
                            for v, e in zip(
                                ratio["fd_difference"], ratio["fd_difference_std"], strict=True
                            )
                        ),
                    ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        f"Each cell: seed {' / seed '.join(seeds)}. n/a: the converged solve's FD_inf is within "
        "two standard errors of 0 at this sample count (no ratio can be stated; the FD difference "
        "to the converged solve, paired on the same noise, is the robust number)."
    )
    return "\n".join(lines) + "\n"


def write_run_headline(
    out: str | Path,
    model: DiffusionModel,
    settings: HeadlineSettings,
    *,
    cache: TensorCache | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The headline of the optimize run in ``out`` (its ``report.json`` and scheduler directories
    written): ``headline.json`` and ``headline.md`` there, and a ``headline`` entry (the FD_inf
    ratios and the references' agreement) added to ``report.json`` and ``report.md``."""
    from stepsearch._io import atomic_write_json, atomic_write_text

    out = Path(out)
    candidates = [c for _, group in run_candidates(out) for c in group]
    payload = judge_headline(model, candidates, settings, cache=cache, progress=progress)
    atomic_write_json(out / "headline.json", payload)
    text = headline_markdown(payload, "Headline: winners against converged solves, fresh noise")
    atomic_write_text(out / "headline.md", text)
    report = json.loads((out / "report.json").read_text())
    report["headline"] = {
        "file": "headline.json",
        "settings": payload["settings"],
        "ratios": payload.get("ratios"),
        "references_agree": payload.get("references_agree", {}).get("agree"),
    }
    atomic_write_json(out / "report.json", report)
    markdown = (out / "report.md").read_text()
    body = text.split("\n", 1)[1]  # without its title: a section of the report
    atomic_write_text(out / "report.md", markdown.rstrip("\n") + "\n\n## Headline" + body)
    return payload
