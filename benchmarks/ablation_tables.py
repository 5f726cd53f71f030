"""Markdown tables for docs/ablation.md from `samerge suite report` folders (their seeds.csv).

    python benchmarks/ablation_tables.py ablation/text-full/candidates [more report folders...]

One table per folder: average normalized accuracy per seed, mean ± std over seeds, and the paired difference to
the reference method (TIES, density 0.2, per tensor, disjoint mean, lambda = 1) with its spread and win count.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

REF = "ties[aggregate=mean,scale=1.0]"


def table(folder: Path, ref: str = REF) -> str:
    with open(folder / "seeds.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "average"]
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    val = {(r["method"], r["seed"]): float(r["normalized"]) for r in rows}
    split = rows[0]["split"]
    if len(seeds) == 1:
        lines = [f"{rows[0]['suite']}, {split} split, seed {seeds[0]} (average normalized accuracy; "
                 f"Δ = difference to `{ref}` on the same experts)", "", "| method | normalized | Δ |", "|---|---|---|"]
        for m in sorted(methods, key=lambda m: -val[(m, seeds[0])]):
            if m != "expert":
                lines.append(f"| `{m}` | {val[(m, seeds[0])]:.3f} | {val[(m, seeds[0])] - val[(ref, seeds[0])]:+.3f} |")
        return "\n".join(lines)
    lines = [f"{rows[0]['suite']}, {split} split, seeds {', '.join(seeds)} (average normalized accuracy; "
             f"Δ = paired difference to `{ref}`)", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | Δ mean ± std | wins |",
             "|---" * (len(seeds) + 4) + "|"]
    order = sorted(methods, key=lambda m: -statistics.fmean(val[(m, s)] for s in seeds))
    for m in order:
        if m == "expert":
            continue
        v = [val[(m, s)] for s in seeds]
        d = [val[(m, s)] - val[(ref, s)] for s in seeds]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        dsd = statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(f"| `{m}` | " + " | ".join(f"{x:.3f}" for x in v)
                     + f" | {statistics.fmean(v):.3f} ± {sd:.3f} | {statistics.fmean(d):+.3f} ± {dsd:.3f} | "
                     + f"{sum(x > 0 for x in d)}/{len(d)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(table(Path(arg)))
        print()
