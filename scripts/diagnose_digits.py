"""Print a bundled digits model's error against the exact posterior mean, by timestep.

    python scripts/diagnose_digits.py --model digits
    python scripts/diagnose_digits.py --model digits --directory /path/to/checkpoints --json out.json

The exact ``E[x0 | x_t]`` of the 1,797 digits comes from ``EmpiricalDenoiser``; see
:func:`stepsearch.testbeds.digits.posterior_mean_error` for the measurement (256 samples per
timestep by default, seeded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from stepsearch import _io
    from stepsearch.testbeds import digits
except ModuleNotFoundError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from stepsearch import _io
    from stepsearch.testbeds import digits

COLUMNS = ("timestep", "sigma_over_alpha", "x0_rms", "eps_rms", "x0_max_abs", "exact_x0_rms_to_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", choices=sorted(digits.MODELS), default="digits", help="registry name")
    add("--directory", type=Path, default=None, help="checkpoint directory (default: bundled)")
    add("--timesteps", type=int, nargs="+", default=list(digits.DIAGNOSTIC_TIMESTEPS))
    add("--num-samples", type=int, default=256, help="noised digits per timestep")
    add("--seed", type=int, default=0, help="seed of the digits and the noise")
    add("--json", type=Path, default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def markdown_table(rows: list[dict[str, float]]) -> str:
    """The rows as a markdown table, one line per timestep."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " ---: |" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row['timestep']:d}"] + [f"{row[key]:.4g}" for key in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = digits.load(args.model, directory=args.directory)
    rows = digits.posterior_mean_error(
        model, tuple(args.timesteps), num_samples=args.num_samples, seed=args.seed
    )
    print(markdown_table(rows))
    if args.json is not None:
        _io.atomic_write_json(args.json, {"model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
