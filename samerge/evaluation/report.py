"""`samerge suite report`: every method on a suite, scored per task, written as CSV, Markdown and plots.

``report.csv`` has the columns ``suite,method,task,score,normalized``: one row per method and task plus a row with
task ``average``; ``method`` is the exact method string asked for (e.g. ``ties[aggregate=mean,scale=1.0]``), and
the rows ``base`` and ``expert`` give the base with each expert's head and each expert on its own task.
``normalized`` is score / expert score on that task.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import samerge
from samerge.errors import SamergeError
from samerge.evaluation.hub import HUB_SUITES, is_hub_suite

SUITES = ("text", "vision", "llm-lora")


def default_methods(size: str) -> list[str]:
    wudi = "wudi" if size == "full" else "wudi[iterations=20]"  # 300 Adam steps per weight: minutes on a CPU
    return ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "consensus", "pcb", wudi,
            "ties[density_rule=tadrop]", "dare[density_rule=tadrop]", "sa_merging",
            "sa_merging[saliency_sign=own_sign]", "sa_merging[saliency_sign=own_value]"]


def parse_method(spec: str, extra: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """``"ties[aggregate=mean,scale=1.0]"`` -> ``("ties", {"aggregate": "mean", "scale": 1.0})``.

    ``extra``: method names a suite adds to samerge's own (``prefix:name``, e.g. ``lora:ties``; see run_report).
    """
    m = re.fullmatch(r"\s*([A-Za-z_]\w*(?::[A-Za-z_]\w*)?)\s*(?:\[(.*)\])?\s*", spec)
    if not m:
        raise SamergeError(f"cannot parse method {spec!r} (expected name or name[key=value,...])")
    params: dict[str, Any] = {}
    if m.group(2):
        for item in m.group(2).split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SamergeError(f"method {spec!r}: expected key=value, got {item!r}")
            params[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    name = m.group(1)
    if name not in samerge.available_methods() and name not in extra:
        raise SamergeError(f"unknown method {name!r} in {spec!r}; available methods: "
                           f"{', '.join([*samerge.available_methods(), *extra])}")
    return name, params


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


def _suite(suite: str, size: str, seed: int, progress: bool, tasks: Sequence[str] | None,
           add_tasks: dict[str, str]) -> tuple[Any, list[Any]]:
    """The suite object and its task data (built-ins, or the given subset, plus added file tasks)."""
    if suite == "text":
        from samerge.evaluation.tasks import BUILTIN_TEXT_TASKS as builtin
        from samerge.evaluation.tasks import load_builtin as load
        from samerge.evaluation.tasks import load_file_task as load_file
        from samerge.evaluation.text import TextSuite as cls
    elif suite == "vision":
        from samerge.evaluation.vision import BUILTIN_VISION_TASKS as builtin  # type: ignore[assignment]
        from samerge.evaluation.vision import VisionSuite as cls  # type: ignore[assignment]
        from samerge.evaluation.vision import load_image_csv_task as load_file  # type: ignore[assignment]
        from samerge.evaluation.vision import load_vision_task as load  # type: ignore[assignment]
    elif suite == "llm-lora":
        from samerge.evaluation.llm import BUILTIN_LLM_TASKS as builtin  # type: ignore[assignment]
        from samerge.evaluation.llm import LlmLoraSuite as cls  # type: ignore[assignment]
        from samerge.evaluation.llm import load_llm_file_task as load_file  # type: ignore[assignment]
        from samerge.evaluation.llm import load_llm_task as load  # type: ignore[assignment]
    elif is_hub_suite(suite):  # the paper's suites (experts and data from the Hugging Face Hub) or a suite file
        from samerge.evaluation.hub import load_hub_suite

        return load_hub_suite(suite, size, seed, progress, tasks, add_tasks)
    else:
        raise SamergeError(f"unknown suite {suite!r}; available here: {', '.join(SUITES)}, the hub suites "
                           f"{', '.join(HUB_SUITES)} or a suite file .yaml/.json")
    names = list(tasks) if tasks else list(builtin)
    unknown = [t for t in names if t not in builtin]
    if unknown:
        raise SamergeError(f"unknown {suite} task {unknown[0]!r}; built-in tasks: {', '.join(builtin)}")
    data = [load(t, size, seed) for t in names]
    for name, path in add_tasks.items():
        if name in names:
            raise SamergeError(f"added task {name!r} clashes with a built-in task name")
        data.append(load_file(name, path, size, seed))
    return cls(size, seed, progress), data


def run_report(suite: str, size: str, out: str | Path, *, methods: Sequence[str] | None = None,
               tasks: Sequence[str] | None = None, add_tasks: dict[str, str] | None = None, seed: int = 0,
               progress: bool = False) -> list[dict[str, Any]]:
    """Every method on the suite; writes ``out``/report.csv, report.md and plots (see the module docstring).

    A suite may add its own merges: names in its ``merge_methods`` (``prefix:name``) are run by its
    ``merge(name, params, experts) -> state dict`` (e.g. llm-lora's rank-wise ``lora:ties``), and its
    ``default_methods()``, when present, replaces :func:`default_methods` as the default list.
    """
    for s in methods or ():  # fail fast on a typo in samerge's own methods, before the suite loads
        if ":" not in s.partition("[")[0]:
            parse_method(s)
    st, data = _suite(suite, size, seed, progress, tasks, dict(add_tasks or {}))
    suite_methods = tuple(getattr(st, "merge_methods", ()))
    specs = list(methods) if methods else (st.default_methods() if hasattr(st, "default_methods")
                                           else default_methods(size))
    parsed = [(s, *parse_method(s, suite_methods)) for s in specs]
    experts = [st.expert(t) for t in data]
    rows: list[dict[str, Any]] = []
    expert_scores = {e.task.name: st.scores(e.encoder, [e])[e.task.name] for e in experts}

    def add(method: str, scores: dict[str, float]) -> None:
        for task, score in scores.items():
            rows.append({"suite": suite, "method": method, "task": task, "score": score,
                         "normalized": score / expert_scores[task] if expert_scores[task] else float("nan")})
        rows.append({"suite": suite, "method": method, "task": "average",
                     "score": sum(scores.values()) / len(scores),
                     "normalized": sum(score / expert_scores[t] if expert_scores[t] else float("nan")
                                       for t, score in scores.items()) / len(scores)})

    add("base", st.scores(st.base, experts))
    add("expert", expert_scores)
    histories: dict[str, list[Any]] = {}
    for spec, name, params in parsed:
        hist: list[Any] = []
        if name in suite_methods:
            merged = st.merge(name, params, experts)
        else:
            kw = {"history": hist} if name == "sa_merging" else {}
            merged = samerge.merge(st.base, [e.encoder for e in experts], name, exclude=st.exclude, **params, **kw)
        if hist:
            histories[spec] = hist
        add(spec, st.scores(merged, experts))
    write_report(rows, Path(out), histories)
    return rows


def write_report(rows: list[dict[str, Any]], out: Path, histories: dict[str, list[Any]]) -> None:
    from samerge.io.writer import _write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["suite", "method", "task", "score", "normalized"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": f"{r['score']:.4f}", "normalized": f"{r['normalized']:.4f}"})
    tmp.replace(out / "report.csv")
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "average"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["task"]): r for r in rows}
    lines = [f"# samerge suite report: {rows[0]['suite']}", "",
             "Accuracy per task (normalized = merged / expert in parentheses).", "",
             "| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods:
        vals = [f"{cell[(m, t)]['score']:.3f} ({cell[(m, t)]['normalized']:.2f})" for t in tasks + ["average"]]
        lines.append(f"| `{m}` | " + " | ".join(vals) + " |")
    _write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    _plots(rows, out, tasks, methods, histories)


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
    ax.set_ylabel("normalized accuracy (merged / expert)")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "per_task.png", dpi=120)
    plt.close(fig)
    if histories:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for spec, hist in histories.items():
            t = [h.iteration for h in hist]
            a1.plot(t, [h.overall_density for h in hist], marker="o", label=spec)
            a2.plot(t, [h.conflict for h in hist], marker="o", label=spec)
        a1.set(xlabel="iteration", ylabel="density (alive / initial)", yscale="log")
        a2.set(xlabel="iteration", ylabel="sign conflicts among survivors")
        a1.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "sa_iterations.png", dpi=120)
        plt.close(fig)
