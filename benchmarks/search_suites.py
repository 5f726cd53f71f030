"""The validation-guided merge search against the baselines, paired per seed of experts (issue 17's measurement).

Per seed: open the suite and its experts, search ``--trials`` trials on the VALIDATION split
(:func:`samerge.evaluation.search.run_search`, seeded with the seed), then score on TEST, once each: the searched
best configuration, every baseline of :func:`samerge.evaluation.suite.standard_methods` at its defaults, and among
those the "best default" (the baseline with the highest mean normalized validation score: what a user picks without
a search). The table gives the mean normalized test score per seed, the paired difference searched − each row, and
the cost of the search (trials × seconds).

    SAMERGE_CACHE=DIR python benchmarks/search_suites.py --suite text --size full --seeds 0-2 --trials 40 \\
        --out bench/search-text
    python benchmarks/search_suites.py --suite text --size small --seeds 0 --trials 3 \\
        --tasks sentiment,language_id --out /tmp/search-smoke                  # a smoke run: minutes on 2 cores

``--start standard`` runs every baseline at its default as the first trials (the space widened to hold them), so
the searched pick is never below the best default on validation; the trials left (40 − 13 at full size) are TPE's.

Resumable: each seed's results are ``OUT/seed<N>.json`` (written whole when the seed is done; a seed with one is
skipped), its search's outputs ``OUT/seed<N>-search/`` and the studies live in ``OUT/studies.sqlite`` (an
interrupted search continues where it stopped). ``table.md`` is rewritten from the seeds present at the end.
The baselines' scores (validation and test) are kept in ``OUT/scores.jsonl`` under the keys ``samerge suite
report`` uses, each as soon as it is computed; ``--scores FILE`` (repeatable) also reads a suite report's
``scores.jsonl``, so baselines that report already scored on the same experts are not merged or scored again, on
test, on validation, and as the start trials of ``--start standard`` (the file is read, never written). Only scores
made by this very code are taken (each line names its code; see ``samerge.evaluation.scoring.ScoreCache``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import samerge
from samerge.cli import _seed_list
from samerge.errors import SamergeError
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.report import parse_method, score_keys, split_methods
from samerge.evaluation.scoring import ScoreCache
from samerge.evaluation.search import Evaluator, _primary, parse_space, run_search, study_key
from samerge.evaluation.suite import standard_methods
from samerge.io.writer import write_text_atomic
from samerge.methods import get_method

# The space searched unless --space names a YAML/JSON file: the families the suites' leaders come from (task
# arithmetic, TIES, PCB, SA-Merging with its saliency signs and aggregates), each with its step λ, and per-expert
# weights where the method takes them. WUDI (and aggregate=wudi) is left out: one trial costs minutes, not seconds.
SPACE: dict[str, Any] = {
    "task_arithmetic": {"scale": {"low": 0.1, "high": 1.5, "log": True}, "weights": [0.5, 1.5]},
    "ties": {"density": [0.05, 0.6], "scale": {"low": 0.2, "high": 2.0, "log": True},
             "aggregate": {"choices": ["sum", "mean"]}, "weights": [0.5, 1.5]},
    "pcb": {"density": [0.05, 0.5], "scale": {"low": 0.3, "high": 2.0, "log": True}},
    "sa_merging": {"prune_ratio": [0.05, 0.3], "scale": [0.4, 1.5],
                   "saliency_sign": {"choices": ["literal", "own_sign", "own_value", "own_flow"]},
                   "aggregate": {"choices": ["sum", "disjoint_mean"]}},
}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def widened(space_decl: dict[str, Any], starts: list[str]) -> dict[str, Any]:
    """The space, widened just enough to hold every start configuration: a missing method is added at its defaults
    ({}), a parameter a start sets that its method does not search becomes {choices: [default, value, ...]}."""
    out = {m: dict(ps or {}) for m, ps in space_decl.items()}
    for spec in starts:
        name, params = parse_method(spec)
        ps = out.setdefault(name, {})
        defaults = get_method(name).Params()
        for k, v in params.items():
            if k not in ps:
                ps[k] = {"choices": [getattr(defaults, k)]}
            if isinstance(ps[k], dict) and "choices" in ps[k] and v not in ps[k]["choices"]:
                ps[k] = {"choices": [*ps[k]["choices"], v]}  # a new list: SPACE itself stays as declared
    return out


def run_seed(args: argparse.Namespace, seed: int, space_decl: dict[str, Any], out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    tasks = args.tasks.split(",") if args.tasks else None
    suite, data = open_suite(args.suite, args.size, seed, tasks=tasks, progress=args.progress, device=args.device)
    experts = [suite.expert(t) for t in data]
    val = Evaluator.build(suite, experts)
    test = Evaluator.build(suite, experts, split="test")
    starts = standard_methods(args.size) if args.start == "standard" else split_methods(args.start or "")
    space = parse_space(widened(space_decl, starts), len(experts))
    fingerprint = json.dumps({"suite": args.suite, "size": args.size, "seed": seed, "tasks": val.tasks,
                              "version": samerge.__version__}, sort_keys=True)
    parsed = [(spec, *parse_method(spec, suite.merge_methods)) for spec in standard_methods(args.size)]
    keys = {split: score_keys(args.suite, args.size, seed, split, val.tasks, parsed) for split in ("val", "test")}
    own = ScoreCache(out / "scores.jsonl")
    read = [own, *(ScoreCache(Path(f)) for f in args.scores or [])]

    def cached(spec: str, split: str) -> dict[str, Any] | None:
        return next((hit for hit in (c.get(keys[split][spec]) for c in read) if hit is not None), None)

    filled = [(spec, name, get_method(name).Params(**ps)) for spec, name, ps in parsed]  # each baseline's parameters

    def baseline_of(method: str, params: dict[str, Any]) -> str | None:
        """The baseline that is this configuration (same method, same parameters with its defaults filled)."""
        return next((spec for spec, name, model in filled if name == method
                     and model == get_method(name).Params(**params)), None)

    def measured(method: str, params: dict[str, Any]) -> list[float] | None:  # a baseline's cached val scores
        spec = baseline_of(method, params)
        got = cached(spec, "val") if spec is not None else None
        return None if got is None else [_primary(got[t]) for t in val.tasks]

    result = run_search(val, space, n_trials=args.trials, seed=seed, batch=args.batch, n_jobs=args.n_jobs,
                        start=starts, storage=out / "studies.sqlite",
                        study_name=study_key(space, seed, args.batch, fingerprint, start=starts),
                        progress=args.progress, measured=measured)
    result.write_outputs(out / f"seed{seed}-search")
    best = result.best
    if best is None:
        raise SamergeError(f"seed {seed}: no trial of the search completed")

    # with --start standard, slot i ran baseline i on validation: a COMPLETE one gives its score without a second run
    ran = ({r["slot"]: r for r in result.trials if r["state"] == "COMPLETE"} if starts == standard_methods(args.size)
           else {})
    baselines = {}
    for i, (spec, name, params) in enumerate(parsed):
        made: list[dict[str, Any]] = []

        def state() -> dict[str, Any]:  # merged once, and only when a score is missing
            if not made:
                made.append(val.merge(name, params))
            return made[0]

        def scores(ev: Evaluator, split: str) -> list[float]:
            got = cached(spec, split)
            if got is None:
                got = ev.suite.scores(state(), ev.experts)
                own.put(keys[split][spec], got)
            return [_primary(got[t]) for t in ev.tasks]

        v = (ran[i]["value"] if i in ran and ran[i]["method"] == name
             else mean(val.normalized(scores(val, "val"))))
        normalized = test.normalized(scores(test, "test"))
        baselines[spec] = {"val": v, "test": mean(normalized), "test_tasks": dict(zip(test.tasks, normalized))}
        print(f"  seed {seed} {spec}: val {baselines[spec]['val']:.4f} test {baselines[spec]['test']:.4f}",
              flush=True)
    # the pick scored on test once; a pick that is one of the baselines (the same method, the same parameters once
    # filled with its defaults) is that baseline's merge, so its test scores are reused instead of merged again
    same = baseline_of(best.method, best.params)
    if same is None:
        normalized = test.normalized(test.scores(result.best_state()))
        on_test = {"test": mean(normalized), "test_tasks": dict(zip(test.tasks, normalized))}
    else:
        on_test = {k: baselines[same][k] for k in ("test", "test_tasks")}
    searched = {"method": best.method, "params": best.params, "val": best.value, **on_test,
                "same_as": same, "recipe": result.recipe()}
    trial_seconds = [r["seconds"] for r in result.trials]
    return {"suite": args.suite, "size": args.size, "seed": seed, "tasks": val.tasks, "trials": args.trials,
            "batch": args.batch, "searched": searched, "baselines": baselines,
            "best_default": max(baselines, key=lambda s: baselines[s]["val"]),
            "cost": {"trials": len(trial_seconds), "trial_seconds_total": sum(trial_seconds),
                     "trial_seconds_mean": mean(trial_seconds),
                     "states": {s: sum(r["state"] == s for r in result.trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
                     "measured": sum(r["measured"] for r in result.trials),
                     "seed_wall_seconds": time.monotonic() - t0}}


def table(records: list[dict[str, Any]]) -> str:
    """Mean normalized test score per seed, and the paired difference of the searched merge to each row."""
    seeds = [r["seed"] for r in records]
    rows: dict[str, list[float]] = {"searched (validation-selected)": [r["searched"]["test"] for r in records],
                                    "best default (by validation)": [r["baselines"][r["best_default"]]["test"]
                                                                     for r in records],
                                    "best baseline on test (oracle)": [max(b["test"] for b in r["baselines"].values())
                                                                       for r in records]}
    for spec in records[0]["baselines"]:
        rows[f"`{spec}`"] = [r["baselines"][spec]["test"] for r in records]
    searched = rows["searched (validation-selected)"]
    lines = [f"Suite `{records[0]['suite']}` ({records[0]['size']}), tasks {', '.join(records[0]['tasks'])}: mean "
             f"normalized TEST score (balanced metric) per seed of experts; Δ = searched − row, paired per seed.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | Δ mean ± sd | searched ≥ row |",
             "|---" * (len(seeds) + 4) + "|"]
    for label, vals in rows.items():
        diffs = [a - b for a, b in zip(searched, vals)]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {mean(vals):.4f} | "
                     f"{mean(diffs):+.4f} ± {sd:.4f} | {sum(d >= 0 for d in diffs)}/{len(diffs)} |")
    lines += ["", "Chosen per seed: " + "; ".join(
        f"seed {r['seed']}: searched `{r['searched']['method']}` {json.dumps(r['searched']['params'])}, best default "
        f"`{r['best_default']}`" for r in records), ""]
    for r in records:
        c = r["cost"]
        lines.append(f"Cost, seed {r['seed']}: {c['trials']} trials × {c['trial_seconds_mean']:.1f} s = "
                     f"{c['trial_seconds_total']:.0f} s of trials ({c['states']['PRUNED']} pruned, "
                     f"{c['states']['FAIL']} failed"
                     + (f"; {c['measured']} scored from a report's cache, 0 s" if c.get("measured") else "")
                     + f"); the whole seed {c['seed_wall_seconds']:.0f} s wall.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="text, vision or llm-lora")
    p.add_argument("--size", default="full")
    p.add_argument("--seeds", default="0-2")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--space", default=None, help="a YAML/JSON file {method: {param: spec}} (default: SPACE above)")
    p.add_argument("--start", default=None, help="configurations the first trials run: comma-separated method specs, "
                                                 "or 'standard' (every baseline at its default; the space is widened "
                                                 "to hold them, so the search never ends below the best default on "
                                                 "validation). Default: none (the measured vision table)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scores", action="append", default=None,
                   help="a suite report's scores.jsonl to read the baselines' scores from (repeatable; read only)")
    p.add_argument("--out", required=True)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    try:
        space = yaml.safe_load(Path(args.space).read_text(encoding="utf-8")) if args.space else SPACE
        for f in args.scores or []:
            if not Path(f).is_file():
                raise SamergeError(f"--scores {f}: no such file (a suite report's scores.jsonl)")
        seeds = dict.fromkeys(_seed_list(args.seeds))  # the CLI's parser of --seeds, repeats dropped
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for seed in seeds:
            path = out / f"seed{seed}.json"
            if path.exists():
                print(f"seed {seed}: done before ({path}), skipped", flush=True)
            else:
                record = run_seed(args, seed, space, out)
                write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
            records.append(json.loads(path.read_text(encoding="utf-8")))
        text = table(records)
        write_text_atomic(out / "table.md", text)
        print(text)
    except SamergeError as exc:
        print(f"search_suites: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
