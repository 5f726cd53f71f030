"""Markdown tables for docs/ablation.md from `samerge suite report` folders (their seeds.csv).

    python benchmarks/ablation_tables.py ablation/text-full/candidates [more report folders...]

One table per folder: average normalized score per seed, mean ± std over seeds, and the paired difference to
the reference method (TIES, density 0.2, per tensor, disjoint mean, lambda = 1) with its spread and win count.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from samerge.evaluation.report import paired_differences

REF = "ties[aggregate=mean,scale=1.0]"


def table(folder: Path, ref: str = REF) -> str:
    with open(folder / "seeds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_seed: dict[str, list[dict]] = {}
    for r in rows:
        per_seed.setdefault(r["seed"], []).append({**r, "normalized": float(r["normalized"])})
    seeds = list(per_seed)
    pairs = sorted(paired_differences(per_seed, ref), key=lambda p: -p["mean"])
    head = f"{rows[0]['suite']}, {rows[0]['split']} split"
    if len(seeds) == 1:
        lines = [f"{head}, seed {seeds[0]} (average normalized score; Δ = difference to `{ref}` on the same experts)",
                 "", "| method | normalized | Δ |", "|---|---|---|"]
        lines += [f"| `{p['method']}` | {p['mean']:.3f} | {p['diff_mean']:+.3f} |" for p in pairs if p["method"] != "expert"]
        return "\n".join(lines)
    lines = [f"{head}, seeds {', '.join(seeds)} (average normalized score; Δ = paired difference to `{ref}`)", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | Δ mean ± std | wins |",
             "|---" * (len(seeds) + 4) + "|"]
    for p in pairs:
        if p["method"] == "expert":
            continue
        lines.append(f"| `{p['method']}` | " + " | ".join(f"{p['values'][s]:.3f}" for s in seeds)
                     + f" | {p['mean']:.3f} ± {p['std']:.3f} | {p['diff_mean']:+.3f} ± {p['diff_std']:.3f} | "
                     + f"{p['wins']}/{len(seeds)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(table(Path(arg)))
        print()
