"""The report of an optimize run: per-NFE entries, ``report.md``, ``report.png`` and the
plain-sentence summary (:func:`gains_in_words`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch._io import atomic_write_bytes
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize.candidates import Candidate
from stepsearch.search.optimize.settings import OptimizeResult, _Run


def _nfe_entry(
    nfe: int,
    candidates: list[Candidate],
    scores: dict[str, dict[str, Any]],
    winner: Candidate,
    best_baseline: Candidate,
    selection: str,
    files: dict[str, str],
    steps: int | None,
    reference: dict[str, Any],
) -> dict[str, Any]:
    rows = [
        {"label": c.label, "family": c.family, "partial": c.partial,
         "select": {m: _finite(s["value"]) for m, s in scores[c.label]["select"].items()},
         "report": {m: _finite(s["value"]) for m, s in scores[c.label]["report"].items()},
         "report_std": {m: s.get("std") for m, s in scores[c.label]["report"].items()}}
        for c in candidates
    ]  # fmt: skip
    report_of = {row["label"]: row["report"] for row in rows}
    win, base = report_of[winner.label], report_of[best_baseline.label]
    gain = {
        metric: None if not (base[metric] and win[metric]) else 1.0 - win[metric] / base[metric]
        for metric in win
    }
    most_accurate = min(rows, key=lambda r: _finite(r["report"]["traj"], math.inf))
    two_judges = None
    less_accurate = _finite(win["traj"], math.inf) > _finite(
        most_accurate["report"]["traj"], math.inf
    )
    if selection == "fd" and most_accurate["label"] != winner.label and less_accurate:
        two_judges = (
            f"FD prefers {winner.label} (trajectory error {win['traj']:.4g}) over the more "
            f"accurate {most_accurate['label']} (trajectory error "
            f"{most_accurate['report']['traj']:.4g})"
        )
    reference_fd = reference.get("fd", {}).get("value")
    return {
        "winner": winner.label,
        "winner_family": winner.family,
        "best_baseline": best_baseline.label,
        "num_inference_steps": steps,
        "gain": gain,
        "fd_over_reference": None
        if reference_fd is None or win.get("fd") is None
        else win["fd"] / reference_fd,
        "two_judges": two_judges,
        "files": files,
        "rows": rows,
    }


def _finite(value: Any, default: Any = None) -> Any:
    return float(value) if value is not None and math.isfinite(float(value)) else default


def _markdown(report: dict[str, Any]) -> str:
    metrics = report["report"]["metrics"]
    sel = report["selection"]
    lines = [
        f"# stepsearch optimize: {report['model']['name']}",
        "",
        f"Searches optimise trajectory error on seed 0 ({report['search']['samples']} samples); "
        f"the winner per NFE is the lowest {sel['metric']} on seed {sel['seed']} "
        f"({sel['samples']} samples) among search results and built-in samplers; every number "
        f"below is on seed {report['report']['seed']} ({report['report']['samples']} samples), "
        "noise neither the searches nor the selection saw.",
        "",
    ]
    conditioning = report.get("conditioning")
    if conditioning and conditioning.get("kind") == "class_conditional":
        lines += [
            f"Class-conditional model: sample i asks for class {conditioning['labels']}, "
            + (
                "classifier-free guidance by the schedule below."
                if "guidance_schedule" in conditioning
                else f"classifier-free guidance scale {conditioning['guidance_scale']:g}."
            ),
            "",
        ]
    elif conditioning:
        lines += [
            f"Text-to-image pipeline ({conditioning['pipeline']}, {conditioning['height']}x"
            f"{conditioning['width']}): {conditioning['num_prompts']} prompts "
            f"({conditioning['prompts'][:19]}...), sample i gets prompt i mod "
            f"{conditioning['num_prompts']}, guidance scale {conditioning['guidance_scale']:g}; "
            "trajectory error is measured on the decoded images.",
            "",
        ]
    lines += _guidance_lines(report.get("guidance"))
    for item in report.get("skipped", []):
        lines += [f"- {item['reason']}", ""]
    if report["partial"]:
        lines += ["**Partial result** (the budget ended before every stage finished):", ""]
        lines += [f"- NFE {i['nfe']}, {i['stage']}: {i['reason']}" for i in report["incomplete"]]
        lines.append("")
    lines += _budget_lines(report.get("budget"))
    reference_fd = report["reference"].get("fd", {}).get("value")
    if reference_fd is not None:
        lines += [f"Converged reference ({report['reference']['sampler']['solver']}, "
                  f"{report['reference']['sampler']['num_steps']} steps): FD {reference_fd:.4g}.",
                  ""]  # fmt: skip
    head = "| NFE | winner | " + " | ".join(f"winner {m}" for m in metrics)
    head += " | best built-in | " + " | ".join(f"built-in {m}" for m in metrics) + " | gain |"
    lines += [head, "| ---: | --- | " + "---: | " * len(metrics) + "--- | "
              + "---: | " * len(metrics) + "---: |"]  # fmt: skip
    for nfe, entry in report["per_nfe"].items():
        report_of = {row["label"]: row["report"] for row in entry["rows"]}
        win, base = report_of[entry["winner"]], report_of[entry["best_baseline"]]
        gain = entry["gain"].get(sel["metric"])
        lines.append(
            f"| {nfe} | {entry['winner']} | " + " | ".join(_cell(win[m]) for m in metrics)
            + f" | {entry['best_baseline']} | " + " | ".join(_cell(base[m]) for m in metrics)
            + f" | {'' if gain is None else f'{100 * gain:.1f}%'} |"
        )  # fmt: skip
    flags = [(n, e["two_judges"]) for n, e in report["per_nfe"].items() if e["two_judges"]]
    if flags:
        lines += ["", "Two judges disagree:", ""]
        lines += [f"- NFE {n}: {text}" for n, text in flags]
    for nfe, entry in report["per_nfe"].items():
        lines += ["", f"## NFE {nfe}", "",
                  f"Scheduler directory: `{entry['files'].get('scheduler', '(none)')}`", "",
                  "| method | " + " | ".join(f"{m} (report)" for m in metrics)
                  + f" | {sel['metric']} (selection) |",
                  "| --- | " + "---: | " * (len(metrics) + 1)]  # fmt: skip
        for row in sorted(entry["rows"], key=lambda r: _finite(r["select"][sel["metric"]], 1e300)):
            mark = " **(winner)**" if row["label"] == entry["winner"] else ""
            mark += " (partial)" if row["partial"] else ""
            lines.append(
                f"| {row['label']}{mark} | " + " | ".join(_cell(row["report"][m]) for m in metrics)
                + f" | {_cell(row['select'][sel['metric']])} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _guidance_lines(guidance: dict[str, Any] | None) -> list[str]:
    """The guidance paragraph: the schedule every sampler ran with and, for a searched one, what
    it bought against constant guidance at the model's weight (report seed)."""
    if not guidance:
        return []
    if guidance["origin"] == "file":
        return [f"Every sampler runs with the guidance schedule {guidance['schedule']} "
                f"(from `{guidance['file'] or 'the caller'}`).", ""]  # fmt: skip
    pick = guidance["held_out"]["pick"]
    name = f"constant w={guidance['default_weight']:g}"
    constant = guidance["held_out"][name]
    return [
        f"Every sampler runs with the searched guidance schedule {guidance['schedule']} "
        f"(`{guidance['file']}`; pick rule: {guidance['pick_rule']}). What it bought, at "
        f"{guidance['unet_passes']} network passes with {guidance['solver']} on seed "
        f"{guidance['seed']}: FD {_cell(pick['fd'])} and accuracy {pick['accuracy']:.4f} "
        f"({pick['num_steps']} steps, {pick['unet_passes']} passes) vs {name}'s FD "
        f"{_cell(constant['fd'])} and accuracy {constant['accuracy']:.4f} "
        f"({constant['num_steps']} steps, {constant['unet_passes']} passes).",
        "",
    ]


def _budget_lines(budget: dict[str, Any] | None) -> list[str]:
    """The budget paragraph: the work budget and the trials it bought, the time bound and any
    overrun with its reason."""
    if not budget:
        return []
    trials = ", ".join(f"{s['stage']} NFE {s['nfe']}: {s['trials']}" for s in budget["stages"])
    if budget.get("evals") is not None:
        text = (f"Work budget: {budget['evals']} model evaluations for the trial-budgeted "
                f"searches ({trials or 'none ran'} trials), the same on any machine.")  # fmt: skip
    else:
        text = ("Time budget: the trial-budgeted searches shared the time the others left "
                f"({trials or 'none ran'} trials; they depend on the machine's speed).")  # fmt: skip
    seconds = budget.get("seconds", {})
    if seconds.get("overran") is not None:
        text += (f" The run took {seconds['total']:.0f} s, {seconds['overran']:.0f} s over its "
                 f"{budget['minutes']:g}-minute bound: {seconds['why']}.")  # fmt: skip
    return [text, ""]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


GRID_PIXELS = 192
"""The largest side of one image in the report's PNG grid."""


def _upscaled(samples: Tensor, rows: int, cols: int, scale: int) -> np.ndarray:
    """A ``rows x cols`` montage of images in ``[-1, 1]`` as ``[0, 1]`` pixels, each pixel a
    ``scale x scale`` block (nearest neighbour), one blank pixel row / column between images.
    Images above :data:`GRID_PIXELS` a side (a pipeline's 512 or 1024) are average-pooled to about
    that first: a figure shows no more, and the montage stays small."""
    samples = samples.detach().cpu().double()[: rows * cols]
    pool = math.ceil(max(samples.shape[-2:]) / GRID_PIXELS)
    if pool > 1:
        samples = torch.nn.functional.avg_pool2d(samples, pool, ceil_mode=True)
    images = ((samples / 2 + 0.5).clamp(0, 1)).numpy()
    channels, height, width = images.shape[1:]
    pad = max(1, scale // 2)
    canvas = np.ones((rows * (height * scale + pad), cols * (width * scale + pad), channels))
    for k in range(min(rows * cols, images.shape[0])):
        r, c = divmod(k, cols)
        block = images[k].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        y, x = r * (height * scale + pad), c * (width * scale + pad)
        canvas[y : y + height * scale, x : x + width * scale] = block
    return canvas[..., 0] if channels == 1 else canvas


BUILT_IN_FAMILIES = ("baseline", "diffusers")
"""Candidate families that are built-in samplers, not search results."""


def _series(report: dict[str, Any], metric: str) -> dict[str, dict[int, float]]:
    """Per series, the best report-seed ``metric`` at each NFE: one series per search family,
    ``"best built-in"`` (the lowest of every built-in sampler) and one per built-in label
    (prefixed ``"built-in: "``)."""
    series: dict[str, dict[int, float]] = {}
    for nfe_text, entry in report["per_nfe"].items():
        nfe = int(nfe_text)
        for row in entry["rows"]:
            value = row["report"].get(metric)
            if value is None:
                continue
            built_in = row["family"] in BUILT_IN_FAMILIES
            names = ["best built-in", f"built-in: {row['label']}"] if built_in else [row["family"]]
            for name in names:
                best = series.setdefault(name, {})
                best[nfe] = min(best.get(nfe, math.inf), value)
    return series


def _winner_sigmas(run: _Run, winner: Candidate) -> np.ndarray | None:
    """The positive k-diffusion sigmas the winner visits, where they can be told: its stepsearch
    schedule, or a diffusers scheduler's timesteps read on its own ``alphas_cumprod``."""
    if winner.schedule is not None:
        sigmas = winner.schedule.to_kdiffusion_sigmas()
        return sigmas[sigmas > 0]
    if winner.method is None or run.model is None:
        return None
    found = winner.method.diffusers_scheduler_for(run.model.scheduler_config, winner.nfe)
    if found is None:
        return None
    scheduler, steps = found
    scheduler.set_timesteps(steps)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    timesteps = scheduler.timesteps.long().unique(sorted=True).flip(0)
    cumulative = alphas.double()[timesteps].numpy()
    return np.sqrt((1.0 - cumulative) / cumulative)


def _plot(
    run: _Run,
    report: dict[str, Any],
    grids: dict[int, dict[str, Tensor]],
    winners: dict[int, Candidate],
) -> Path:
    """One PNG: per metric, each search family's best and the best built-in vs NFE (every
    built-in faint grey behind them, the winner starred); the winners' schedules against the
    built-in spacings; and best built-in vs winner samples."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["report"]["metrics"]
    nfes = [int(n) for n in report["per_nfe"]]
    image_rows = len(grids)
    rows, cols = run.settings.grid_rows, run.settings.grid_cols
    montages = {
        nfe: {role: _upscaled(made[role], rows, cols, max(1, 48 // max(int(made[role].shape[-2]), 1)))
              for role in ("baseline", "winner")}
        for nfe, made in grids.items()
    }  # fmt: skip
    width = 6.0 * max(len(metrics) + 1, 2)
    # An image row is as tall as its montage drawn at half the figure's width, plus its title.
    aspect = max(
        (m["winner"].shape[0] / m["winner"].shape[1] for m in montages.values()), default=0
    )
    heights = [5.0] + [width / 2 * aspect + 0.4] * image_rows
    figure = plt.figure(figsize=(width, sum(heights)), layout="constrained")
    outer = figure.add_gridspec(1 + image_rows, 1, height_ratios=heights)
    grid_spec = outer[0, 0].subgridspec(1, len(metrics) + 1)
    families = sorted(
        {r["family"] for e in report["per_nfe"].values() for r in e["rows"]}
        - set(BUILT_IN_FAMILIES)
    )
    colors = {family: f"C{index % 10}" for index, family in enumerate(families)}
    for column, metric in enumerate(metrics):
        axes = figure.add_subplot(grid_spec[0, column])
        series = _series(report, metric)
        shown_faint = False
        for name, values in series.items():
            if not name.startswith("built-in: "):
                continue
            xs = sorted(values)
            axes.plot(xs, [values[n] for n in xs], color="0.6", lw=0.7, alpha=0.5,
                      label=None if shown_faint else "each built-in")  # fmt: skip
            shown_faint = True
        best = series.get("best built-in", {})
        if best:
            xs = sorted(best)
            axes.plot(xs, [best[n] for n in xs], color="0.25", lw=2, ls="--", marker="s",
                      ms=4, label="best built-in")  # fmt: skip
        for family in families:
            values = series.get(family, {})
            xs = sorted(values)
            if xs:
                axes.plot(xs, [values[n] for n in xs], color=colors[family], lw=2,
                          marker="o", ms=5, label=family)  # fmt: skip
        stars = [
            (nfe, row["report"][metric])
            for nfe in nfes
            for row in report["per_nfe"][str(nfe)]["rows"]
            if row["label"] == report["per_nfe"][str(nfe)]["winner"]
            and row["report"].get(metric) is not None
        ]
        if stars:
            axes.plot(*zip(*stars, strict=True), ls="none", marker="*", ms=14, color="gold",
                      markeredgecolor="black", label="winner", zorder=5)  # fmt: skip
        reference = report["reference"].get(metric, {}).get("value") if metric == "fd" else None
        if reference is not None:
            axes.axhline(reference, color="black", lw=1, ls="-.", label="converged solve")
        axes.set_yscale("log")
        axes.set_xticks(nfes)
        axes.set_xlabel("NFE")
        axes.set_ylabel(f"{metric} (held-out seed {report['report']['seed']}, lower is better)")
        axes.set_title(f"{metric} vs NFE")
        axes.legend(fontsize=8, loc="best", framealpha=0.85)
    axes = figure.add_subplot(grid_spec[0, len(metrics)])
    for index, nfe in enumerate(nfes):
        color = f"C{index % 10}"
        for schedule in spacing_schedules(
            run.source.noise, nfe, ("karras", "logsnr_uniform", "trailing")
        ).values():
            sigmas = schedule.to_kdiffusion_sigmas()
            axes.plot(np.flatnonzero(sigmas > 0), sigmas[sigmas > 0], ls=":", lw=0.8, color=color)
        sigmas = None if nfe not in winners else _winner_sigmas(run, winners[nfe])
        name = report["per_nfe"][str(nfe)]["winner"]
        if sigmas is not None:
            axes.plot(np.arange(len(sigmas)), sigmas, marker="o", lw=2, color=color,
                      label=f"NFE {nfe}: {name}")  # fmt: skip
        else:
            axes.plot([], [], color=color, label=f"NFE {nfe}: {name} (sigmas not known)")
    axes.set_yscale("log")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("step")
    axes.set_ylabel("k-diffusion sigma")
    axes.set_title("winners' schedules (solid) vs karras / logSNR / trailing (dotted)", fontsize=10)
    axes.legend(fontsize=7, loc="upper right", framealpha=0.85)
    for position, (nfe, montage) in enumerate(sorted(montages.items())):
        entry = report["per_nfe"][str(nfe)]
        pair = outer[1 + position, 0].subgridspec(1, 2)
        for column, role in enumerate(("baseline", "winner")):
            axes = figure.add_subplot(pair[0, column])
            axes.imshow(montage[role], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            name = entry["best_baseline"] if role == "baseline" else entry["winner"]
            axes.set_title(f"NFE {nfe}: {'best built-in' if role == 'baseline' else 'optimized'}"
                           f" - {name}", fontsize=9)  # fmt: skip
            axes.axis("off")
    figure.suptitle(f"stepsearch optimize: {report['model']['name']}"
                    + (" (partial)" if report["partial"] else ""))  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return atomic_write_bytes(run.out / "report.png", buffer.getvalue())


def gains_in_words(result: OptimizeResult | dict[str, Any]) -> list[str]:
    """One plain sentence per NFE: the optimized sampler vs the best built-in on the report seed,
    and where its scheduler directory is."""
    report = result.report if isinstance(result, OptimizeResult) else result
    metric = report["selection"]["metric"]
    names = {"fd": "FD-digits" if report["model"]["name"] == "digits" else "FD",
             "traj": "trajectory error"}  # fmt: skip
    lines = []
    for nfe, entry in report["per_nfe"].items():
        report_of = {row["label"]: row["report"] for row in entry["rows"]}
        win, base = report_of[entry["winner"]], report_of[entry["best_baseline"]]
        where = entry["files"].get("scheduler", "(no diffusers form)")
        if entry["winner"] == entry["best_baseline"]:
            lines.append(
                f"NFE {nfe}: no search beat the best built-in sampler ({entry['winner']}, "
                f"{names.get(metric, metric)} {_cell(base[metric])}); scheduler: {where}"
            )
            continue
        gain = entry["gain"].get(metric)
        text = "" if gain is None else f"{100 * gain:.0f}% lower "
        lines.append(
            f"NFE {nfe}: {entry['winner']} has {text}{names.get(metric, metric)} than the best "
            f"built-in ({entry['best_baseline']}): {_cell(win[metric])} vs {_cell(base[metric])}"
            + (f"; trajectory error {_cell(win['traj'])} vs {_cell(base['traj'])}"
               if metric != "traj" else "")
            + f". Scheduler: {where}"
        )  # fmt: skip
    return lines
