"""`samerge suite report`: every method on a suite, scored per task, written as CSV, Markdown and plots.

:func:`run_report` drives the same steps as the pipeline's stages, in memory and over several seeds: acquire
(:func:`~samerge.evaluation.catalog.open_suite` and each task's cached expert), merge (:func:`merged_state`),
score (:func:`~samerge.evaluation.scoring.score_models`: splits, normalisation, the score cache) and report
(:func:`write_report`, which the pipeline's ``report`` stage also writes with).

``report.csv`` has the columns ``suite,method,task,score,accuracy,normalized``: one row per method and task plus a
row with task ``average``; ``method`` is the exact method string asked for (e.g. ``ties[aggregate=mean,scale=1.0]``),
and the rows ``base`` and ``expert`` give the base with each expert's head and each expert on its own task.
``score`` is the task's metric (balanced accuracy on the built-in suites), ``accuracy`` plain accuracy beside it, and
``normalized`` is score / expert score on that task. ``report.html`` holds the whole report on one static page
(tables, the plots embedded, SA-Merging's iteration curves and every merge's recipe; :mod:`samerge.evaluation.html`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

import samerge
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.html import render_report
from samerge.evaluation.scoring import ROW_FIELDS, ScoreCache, check_split, row_cells, score_models
from samerge.evaluation.suite import Expert, Suite, base_input
from samerge.io.writer import write_text_atomic
from samerge.methods import get_method
from samerge.overrides import parse_method

# what the score columns of report.md hold (report.csv has plain accuracy beside it)
_METRIC = "Score (balanced accuracy; a hub suite task: its own metric)"


def split_methods(text: str) -> list[str]:
    """Split a comma-separated list, keeping commas inside [...] together."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A samerge method's parameters with its defaults filled in (as JSON values); a suite's own method's, or
    invalid ones (the merge itself reports them), as given."""
    if name in samerge.available_methods():
        try:
            return get_method(name).Params(**params).model_dump(mode="json")
        except Exception:  # invalid parameters are reported by the merge itself
            pass
    return dict(params)


def score_keys(suite: str, size: str, seed: int, split: str, tasks: Sequence[str],
               parsed: Sequence[tuple[str, str, dict[str, Any]]], files: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """The score cache's key of the base, the experts (``"base"``, ``"expert"``) and each ``(spec, name, params)``
    of ``parsed`` on one seed of a suite: where (suite, size, seed, split, tasks, the added tasks' file hashes
    ``files``) and, for a method, what decides its result besides the experts (its resolved parameters, defaults
    included). The report and benchmarks/search_suites.py read and write scores under these keys."""
    where = json.dumps({"suite": suite, "size": size, "seed": seed, "split": split, "tasks": list(tasks),
                        "files": dict(files or {})}, sort_keys=True)
    return {"base": where + "base", "expert": where + "expert",
            **{spec: where + json.dumps({"spec": spec, "name": name, "params": resolved_params(name, params),
                                         "version": samerge.__version__}, sort_keys=True, default=str)
               for spec, name, params in parsed}}


def method_recipe(name: str, params: Mapping[str, Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The ``samerge merge --config`` mapping of one merge of a report (its base and experts are the suite's, in
    memory: ``--base``/``--expert`` name them on the command line)."""
    return {"method": name, "params": resolved_params(name, params), **({"exclude": list(exclude)} if exclude else {})}


def merged_state(suite: Suite, experts: Sequence[Expert], name: str, params: Mapping[str, Any],
                 history: list[Any] | None = None) -> dict[str, torch.Tensor]:
    """The merge step: the experts merged by samerge's method ``name`` (SA-Merging's iterations appended to
    ``history``), or by the suite's own method (an item of its ``merge_methods``)."""
    if name in suite.merge_methods:
        return suite.merge(name, params, experts)
    kw = {"history": history} if name == "sa_merging" and history is not None else {}
    return samerge.merge(base_input(suite), [e.encoder for e in experts], name, exclude=suite.exclude, **params, **kw)


def run_report(suite: str, size: str, out: str | Path, *, methods: Sequence[str] | None = None,
               tasks: Sequence[str] | None = None, add_tasks: dict[str, str] | None = None, seed: int = 0,
               seeds: Sequence[int] | None = None, split: str = "test", against: str | None = None,
               progress: bool = False, device: str = "auto") -> list[dict[str, Any]]:
    """Every method on the suite; writes ``out``/report.csv, report.md and plots (see the module docstring).

    ``methods``: method strings (``name`` or ``name[key=value,...]``); by default the suite's
    ``default_methods()``. A suite may add its own merges: names in its ``merge_methods`` (``prefix:name``) are run
    by its ``merge(name, params, experts) -> state dict`` (e.g. llm-lora's rank-wise ``lora:ties``).

    ``seeds``: several seeds of experts (and data splits); every method is scored on the same experts of each seed
    (paired), report.csv holds the mean over seeds, ``seeds.csv`` every seed, and with ``against`` the report gives
    each method's per-seed difference to that method (``paired.csv``, ``paired.png``). ``split="val"`` scores the
    tasks' validation examples instead of their test examples (for choosing configurations without test data).
    Scores are kept in ``scores.jsonl`` as they are computed: re-running into the same ``out`` resumes.
    ``device``: where the llm-lora and hub suites fine-tune and score (``auto``: CUDA when available; for the hub
    suites, then ``$SAMERGE_DEVICE``); text and vision run on the CPU and refuse any device but ``auto``/``cpu``.
    """
    seeds = list(dict.fromkeys(seeds)) if seeds else [seed]
    check_split(split)  # fail fast, before the suite loads
    for s in [*(methods or ()), *([against] if against else [])]:  # fail fast on a typo, before the suite loads
        if ":" not in s.partition("[")[0]:
            parse_method(s)
    out = Path(out)
    cache = ScoreCache(out / "scores.jsonl")
    add_tasks = dict(add_tasks or {})
    files = {n: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for n, p in add_tasks.items()
             if Path(p).is_file()}  # an added task's file is part of what a stored score depends on
    per_seed: dict[int, list[dict[str, Any]]] = {}
    histories: dict[str, list[Any]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for sd in seeds:
        # acquire: the suite, its tasks and one expert per task (fine-tuned once, then cached)
        st, data = open_suite(suite, size, sd, tasks=tasks, add_tasks=add_tasks, progress=progress, device=device)
        experts = [st.expert(t) for t in data]
        specs = list(methods) if methods else st.default_methods()
        if against and against not in specs:
            specs.append(against)
        parsed = [(s, *parse_method(s, st.merge_methods)) for s in specs]
        for spec, name, params in parsed:
            recipes.setdefault(spec, method_recipe(name, params, st.exclude))
            if name in st.merge_methods:
                notes[spec] = f"A merge of the {suite} suite's own (not samerge merge): its parameters as given."
        keys = score_keys(suite, size, sd, split, [d.name for d in data], parsed, files)
        hists: dict[str, list[Any]] = {spec: [] for spec, _, _ in parsed}
        # merge (when a method's scores are not cached) and score, on the split asked for
        models = {spec: partial(merged_state, st, experts, name, params, hists[spec]) for spec, name, params in parsed}
        per_seed[sd] = score_models(st, experts, models, label=suite, split=split, cache=cache, keys=keys)
        for spec, hist in hists.items():
            if hist and spec not in histories:
                histories[spec] = hist
        del st, data, experts, models
    # report
    rows = _mean_rows(per_seed)
    write_report(rows, out, histories, per_seed=per_seed if len(seeds) > 1 or split != "test" else None,
                 split=split, against=against, recipes=recipes, notes=notes)
    return rows


def _mean_rows(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds (same method/task order as the first seed)."""
    first = next(iter(per_seed.values()))
    out = []
    for i, r in enumerate(first):
        group = [rows[i] for rows in per_seed.values()]
        accs = [g.get("accuracy") for g in group]
        out.append({**r, "score": sum(g["score"] for g in group) / len(group),
                    "accuracy": sum(accs) / len(accs) if None not in accs else None,
                    "normalized": sum(g["normalized"] for g in group) / len(group)})
    return out


def paired_differences(per_seed: dict[int, list[dict[str, Any]]], against: str) -> list[dict[str, Any]]:
    """Per method: the per-seed difference of the average normalized score to ``against``, its mean and spread."""
    import statistics

    avg = {sd: {r["method"]: r["normalized"] for r in rows if r["task"] == "average"} for sd, rows in per_seed.items()}
    methods = list(next(iter(avg.values())))
    out = []
    for m in methods:
        diffs = [avg[sd][m] - avg[sd][against] for sd in avg]
        vals = [avg[sd][m] for sd in avg]
        out.append({"method": m, "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "diff_mean": statistics.fmean(diffs), "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "wins": sum(d > 0 for d in diffs), "diffs": dict(zip(avg, diffs)),
                    "values": dict(zip(avg, vals))})
    return out


def _write_csv(path: Path, header: list[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file written whole or not at all."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_report(rows: list[dict[str, Any]], out: Path, histories: Mapping[str, Sequence[Any]], *,
                 per_seed: dict[int, list[dict[str, Any]]] | None = None, split: str = "test",
                 against: str | None = None, recipes: Mapping[str, Mapping[str, Any] | None] | None = None,
                 notes: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None,
                 search: Path | None = None) -> None:
    """``out``/report.csv, report.md, plots and report.html (the whole report as one page, the plots embedded).

    ``histories``: per method string, SA-Merging's iteration records (``iteration``, ``overall_density``,
    ``norm_ratio``, ``conflict``); ``recipes``: per method string, the ``samerge merge --config`` mapping of its
    merge, shown on the page (``notes``: a line under a recipe); ``per_seed``: the rows of each seed (``seeds.csv``,
    and with ``against`` the paired comparison); ``kinds``: per method string, data-free or validation-selected
    (a column of report.md, a label on the page); ``search``: a search's output folder, whose history and importance
    plots and trials join the report (``search_*``).
    """
    out.mkdir(parents=True, exist_ok=True)
    if search is not None:
        for name in ("history.png", "importances.png", "trials.csv"):
            if (search / name).is_file():
                shutil.copyfile(search / name, out / f"search_{name}")
    _write_csv(out / "report.csv", list(ROW_FIELDS), ([row_cells(r)[k] for k in ROW_FIELDS] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "average"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["task"]): r for r in rows}
    lines = [f"# samerge suite report: {rows[0]['suite']}", "",
             f"{_METRIC} per task (normalized = merged / expert in parentheses).", "",
             "| method | " + ("kind | " if kinds else "") + " | ".join(tasks) + " | average |",
             "|---" * (len(tasks) + 2 + bool(kinds)) + "|"]
    for m in methods:
        vals = [f"{cell[(m, t)]['score']:.3f} ({cell[(m, t)]['normalized']:.2f})" for t in tasks + ["average"]]
        kind = [kinds.get(m, "")] if kinds else []
        lines.append(f"| `{m}` | " + " | ".join(kind + vals) + " |")
    pairs = None
    if per_seed:
        lines[2] = (f"{_METRIC} per task on the {split} split, mean over seeds {', '.join(map(str, per_seed))} "
                    "(normalized = merged / expert in parentheses).")
        _write_seeds(per_seed, out, split)
        if against:
            pairs = paired_differences(per_seed, against)
            lines += ["", *_paired_lines(pairs, list(per_seed), against, out)]
    if search is not None and (out / "search_history.png").is_file():
        lines += ["", "## Search", "", "Each trial's mean normalized validation score and the best so far; how much "
                  "each parameter decided it (`search_trials.csv`: every trial).", "",
                  "![search history](search_history.png)", "![parameter importances](search_importances.png)"]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    _plots(rows, out, tasks, methods, histories)
    page = render_report(suite=rows[0]["suite"], rows=rows, tasks=tasks, methods=methods, out=out,
                         generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                         version=samerge.__version__, split=split, per_seed=per_seed, pairs=pairs, against=against,
                         histories=histories, recipes=recipes, notes=notes, kinds=kinds)
    write_text_atomic(out / "report.html", page)


def _write_seeds(per_seed: dict[int, list[dict[str, Any]]], out: Path, split: str) -> None:
    fields = ["suite", "seed", "split", *ROW_FIELDS[1:]]
    _write_csv(out / "seeds.csv", fields, ([row_cells({**r, "seed": sd, "split": split})[k] for k in fields]
                                           for sd, rows in per_seed.items() for r in rows))


def _paired_lines(pairs: list[dict[str, Any]], seeds: list[int], against: str, out: Path) -> list[str]:
    """The paired comparison to ``against`` (:func:`paired_differences`): Markdown lines, ``paired.csv`` and
    ``paired.png``."""
    _write_csv(out / "paired.csv",
               ["method", "mean_normalized", "std", *[f"diff_seed{sd}" for sd in seeds], "diff_mean", "diff_std",
                "wins"],
               ([p["method"], f"{p['mean']:.4f}", f"{p['std']:.4f}", *[f"{p['diffs'][sd]:+.4f}" for sd in seeds],
                 f"{p['diff_mean']:+.4f}", f"{p['diff_std']:.4f}", p["wins"]] for p in pairs))
    lines = [f"Average normalized score per seed of experts, and the paired difference to `{against}` "
             "(same experts for every method).", "",
             "| method | mean ± std | " + " | ".join(f"Δ seed {sd}" for sd in seeds) + " | Δ mean ± std | wins |",
             "|---" * (len(seeds) + 4) + "|"]
    for p in pairs:
        lines.append(f"| `{p['method']}` | {p['mean']:.3f} ± {p['std']:.3f} | "
                     + " | ".join(f"{p['diffs'][sd]:+.3f}" for sd in seeds)
                     + f" | {p['diff_mean']:+.3f} ± {p['diff_std']:.3f} | {p['wins']}/{len(seeds)} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in pairs if p["method"] not in ("expert", against)]
    fig, ax = plt.subplots(figsize=(8.0, 0.9 + 0.32 * len(shown)))
    ys = list(range(len(shown)))[::-1]
    ax.barh(ys, [p["diff_mean"] for p in shown], color=["tab:green" if p["diff_mean"] >= 0 else "tab:red"
                                                       for p in shown], alpha=0.6)
    for y, p in zip(ys, shown):
        ax.plot(list(p["diffs"].values()), [y] * len(seeds), "k.", ms=5)
    ax.set_yticks(ys, [p["method"] for p in shown], fontsize=7)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"Δ normalized score vs {against}\n(bars: mean over seeds {', '.join(map(str, seeds))}; "
                  "dots: each seed)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "paired.png", dpi=120)
    plt.close(fig)
    return lines


def _plots(rows: list[dict[str, Any]], out: Path, tasks: list[str], methods: list[str],
           histories: dict[str, list[Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(r["method"], r["task"]): r["normalized"] for r in rows}
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 1.6 * (len(tasks) + 1)), 5.0))
    width = 0.8 / max(1, len(methods))
    colors = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        ax.bar([t + i * width for t in range(len(tasks) + 1)], [cell[(m, t)] for t in tasks + ["average"]],
               width, label=m, color=colors(i % 20))
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks) + 1)], tasks + ["average"], rotation=20)
    ax.set_ylabel("normalized score (merged / expert)")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "per_task.png", dpi=120, bbox_inches="tight")  # the legend of long method strings included
    plt.close(fig)
    if histories:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.6))
        for spec, hist in histories.items():
            t = [0, *(h.iteration for h in hist)]  # iteration 0: nothing pruned yet (density and norm ratio 1)
            a1.plot(t, [1.0, *(h.overall_density for h in hist)], marker="o", ms=3, label=spec)
            a2.plot(t, [1.0, *(h.norm_ratio for h in hist)], marker="o", ms=3, label=spec)
            a3.plot(t[1:], [h.conflict for h in hist], marker="o", ms=3, label=spec)
        a1.set(xlabel="iteration", ylabel="density (alive / initial)", yscale="log")
        a2.set(xlabel="iteration", ylabel=r"$\|\Sigma\,\tau^{(t)}\| \;/\; \|\Sigma\,\tau\|$")
        a3.set(xlabel="iteration", ylabel="sign conflicts among survivors")
        a1.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "sa_iterations.png", dpi=120)
        plt.close(fig)
