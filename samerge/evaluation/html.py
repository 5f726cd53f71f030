"""The report as one static HTML page (``report.html``): tables, plots, SA-Merging's iteration curves and the recipe
of every merge, readable offline and mailable as one file.

Built with the standard library only: string formatting, every user string (task names, method strings, paths)
through :func:`html.escape`, inline CSS, no script, no font or stylesheet from anywhere, and the plots embedded as
``data:`` URIs. The page is a pure function of its inputs; :func:`render_report` takes the generation time as an
argument, and nothing else in it varies between runs.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --alt: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--fg);
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 56px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
p { margin: 6px 0 10px; }
.meta, .note, .kind, figcaption, footer { color: var(--muted); }
.kind { font-weight: normal; font-size: 12px; }
.meta span + span::before { content: " \\00b7  "; }
nav { margin: 14px 0 0; padding: 8px 0; border-top: 1px solid var(--line); border-bottom: 1px solid var(--line); }
nav a { margin-right: 16px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
            font-size: 12.5px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 14px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; white-space: nowrap; }
thead th { background: var(--alt); font-weight: 600; text-align: center; }
tbody th { text-align: left; font-weight: normal; }
td { text-align: right; }
tr.reference th, tr.reference td { color: var(--muted); background: var(--alt); }
td.best { font-weight: 700; }
td.avg, th.avg { border-left: 2px solid #9aa5b1; }
.summary { background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
figure { margin: 10px 0 22px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
pre { background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      margin: 4px 0 14px; }
.tables { display: flex; flex-wrap: wrap; gap: 0 28px; }
.recipes { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 4px 20px; }
footer { margin-top: 40px; padding-top: 8px; border-top: 1px solid var(--line); font-size: 12px; }
"""

REFERENCE_ROWS = ("base", "expert")


def esc(value: Any) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def image_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """A recipe as the YAML of a ``samerge merge --config`` file (the model card writes it the same way)."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, width=1000).strip()


def _heat(v: float) -> str:
    """Background of a normalized score: red at 0.5 and below, through yellow, to green at 1.0 and above."""
    x = min(1.0, max(0.0, (v - 0.5) / 0.5))
    return f"hsl({round(120 * x)}, 65%, 88%)"


def _table(head: Sequence[str], body: Sequence[str], caption_id: str) -> str:
    cols = "".join(head)
    return (f'<div class="scroll"><table id="{caption_id}"><thead><tr>{cols}</tr></thead>'
            f'<tbody>\n{"".join(body)}</tbody></table></div>\n')


def _method_cell(m: str, kind: str | None = None) -> str:
    label = f' <span class="kind">{esc(kind)}</span>' if kind else ""
    return f'<th scope="row"><code>{esc(m)}</code>{label}</th>'


def _row_class(reference: bool) -> str:
    """Rows that are not merges (base, expert, the method compared against) are greyed."""
    return ' class="reference"' if reference else ""


def _task_table(key: str, tasks: Sequence[str], methods: Sequence[str], cell: Mapping[tuple[str, str], Any],
                heat: bool, table_id: str, kinds: Mapping[str, str] | None = None) -> str:
    """Methods x (tasks, average): ``key`` of each row, the best merge of each column in bold."""
    cols = [*tasks, "average"]
    merges = [m for m in methods if m not in REFERENCE_ROWS]
    best = {t: max(cell[(m, t)][key] for m in merges) for t in cols} if merges else {}
    head = ["<th>method</th>", *(f"<th>{esc(t)}</th>" for t in tasks), '<th class="avg">average</th>']
    body = []
    for m in methods:
        tds = []
        for t in cols:
            v = cell[(m, t)][key]
            cls = ["avg"] if t == "average" else []
            if m not in REFERENCE_ROWS and v == best.get(t):
                cls.append("best")
            shade = heat and m not in REFERENCE_ROWS
            style = f' style="background:{_heat(cell[(m, t)]["normalized"])}"' if shade else ""
            cls_attr = f' class="{" ".join(cls)}"' if cls else ""
            tds.append(f"<td{cls_attr}{style}>{v:.3f}</td>")
        body.append(f"<tr{_row_class(m in REFERENCE_ROWS)}>{_method_cell(m, (kinds or {}).get(m))}"
                    f"{''.join(tds)}</tr>\n")
    return _table(head, body, table_id)


def _seed_table(per_seed: Mapping[int, Sequence[Mapping[str, Any]]], methods: Sequence[str],
                pairs: Sequence[Mapping[str, Any]] | None, against: str | None) -> str:
    """Average normalized score per seed of experts; with ``against``, the paired differences as report.md has."""
    seeds = list(per_seed)
    avg = {sd: {r["method"]: r["normalized"] for r in rows if r["task"] == "average"} for sd, rows in per_seed.items()}
    if pairs is None:
        head = ["<th>method</th>", *(f"<th>seed {esc(sd)}</th>" for sd in seeds)]
        body = [f"<tr{_row_class(m in REFERENCE_ROWS)}>{_method_cell(m)}"
                + "".join(f"<td>{avg[sd][m]:.3f}</td>" for sd in seeds) + "</tr>\n" for m in methods]
        return _table(head, body, "seeds")
    head = ["<th>method</th>", *(f"<th>seed {esc(sd)}</th>" for sd in seeds), '<th class="avg">mean ± std</th>',
            *(f"<th>Δ seed {esc(sd)}</th>" for sd in seeds), '<th class="avg">Δ mean ± std</th>', "<th>wins</th>"]
    body = []
    for p in pairs:
        m = p["method"]
        body.append(f"<tr{_row_class(m in REFERENCE_ROWS or m == against)}>{_method_cell(m)}"
                    + "".join(f"<td>{p['values'][sd]:.3f}</td>" for sd in seeds)
                    + f'<td class="avg">{p["mean"]:.3f} ± {p["std"]:.3f}</td>'
                    + "".join(f"<td>{p['diffs'][sd]:+.3f}</td>" for sd in seeds)
                    + f'<td class="avg">{p["diff_mean"]:+.3f} ± {p["diff_std"]:.3f}</td>'
                    + f"<td>{p['wins']}/{len(seeds)}</td></tr>\n")
    return _table(head, body, "paired")


def _iteration_table(spec: str, hist: Sequence[Any], index: int) -> str:
    head = ["<th>iteration</th>", "<th>density</th>", "<th>‖Σ τ⁽ᵗ⁾‖ / ‖Σ τ‖</th>", "<th>sign conflicts</th>"]
    body = ["<tr><th scope=\"row\">0</th><td>1.0000</td><td>1.0000</td><td>–</td></tr>\n"]
    body += [f"<tr><th scope=\"row\">{int(h.iteration)}</th><td>{h.overall_density:.4f}</td>"
             f"<td>{h.norm_ratio:.4f}</td><td>{h.conflict:.4f}</td></tr>\n" for h in hist]
    return f"<div><h3><code>{esc(spec)}</code></h3>\n" + _table(head, body, f"iterations-{index}") + "</div>"


def _figure(path: Path, alt: str, caption: str) -> str:
    return (f'<figure><img src="{image_uri(path)}" alt="{esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>\n")


def render_report(*, suite: str, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], methods: Sequence[str],
                  out: Path, generated: str, version: str, split: str = "test",
                  per_seed: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
                  pairs: Sequence[Mapping[str, Any]] | None = None, against: str | None = None,
                  histories: Mapping[str, Sequence[Any]] | None = None,
                  recipes: Mapping[str, Mapping[str, Any] | None] | None = None,
                  notes: Mapping[str, str] | None = None, kinds: Mapping[str, str] | None = None) -> str:
    """The page of one report, its plots read from ``out`` (``per_task.png``, ``paired.png``,
    ``sa_iterations.png``, ``search_history.png``, ``search_importances.png`` where they exist) and embedded; the
    other files of ``out`` are linked relatively.

    ``recipes``: per method string, the ``samerge merge --config`` mapping that reproduces its merge (``None`` where
    there is none); ``notes``: per method string, a line shown under its recipe; ``kinds``: per method string, which
    kind of merge it is (data-free / validation-selected), shown next to its name.
    """
    cell = {(r["method"], r["task"]): r for r in rows}
    histories = histories or {}
    recipes = recipes or {}
    notes = notes or {}
    merges = [m for m in methods if m not in REFERENCE_ROWS]
    sections: list[tuple[str, str, str]] = []  # (id, title, body)

    meta = [f"<span>suite <code>{esc(suite)}</code></span>", f"<span>{esc(split)} split</span>",
            f"<span>{len(tasks)} task{'s' if len(tasks) != 1 else ''}</span>",
            f"<span>{len(merges)} merge method{'s' if len(merges) != 1 else ''}</span>"]
    if per_seed:
        meta.append(f"<span>mean over seeds {esc(', '.join(map(str, per_seed)))}</span>")

    summary = ""
    if merges:
        best = max(merges, key=lambda m: cell[(m, "average")]["normalized"])
        summary = (f'<p class="summary">Best merge by normalized average: <code>{esc(best)}</code> '
                   f'({cell[(best, "average")]["normalized"]:.3f}; average score {cell[(best, "average")]["score"]:.3f}'
                   + (f', the experts\' {cell[("expert", "average")]["score"]:.3f}' if ("expert", "average") in cell
                      else "") + ").</p>\n")

    sections.append(("normalized", "Normalized score (merged / expert)",
                     "<p>Each merged model's score on a task divided by that task's expert on its own task; "
                     "the best merge of each column in bold.</p>\n"
                     + _task_table("normalized", tasks, methods, cell, True, "normalized-table", kinds)))
    sections.append(("scores", "Score per task",
                     "<p>The task's metric (balanced accuracy: the mean of the classes' recalls; a hub suite task: "
                     "its own metric) of the base with each expert's head, each expert on its own task, and every "
                     "merge.</p>\n" + _task_table("score", tasks, methods, cell, False, "scores-table")))
    if all(r.get("accuracy") is not None for r in rows):
        sections.append(("accuracy", "Accuracy per task",
                         "<p>Plain accuracy (the fraction of examples right), beside the balanced score above.</p>\n"
                         + _task_table("accuracy", tasks, methods, cell, False, "accuracy-table")))
    if per_seed:
        if pairs is not None and against is not None:
            text = (f"<p>Average normalized score per seed of experts, and the paired difference to "
                    f"<code>{esc(against)}</code> (the same experts for every method).</p>\n")
        else:
            text = "<p>Average normalized score per seed of experts.</p>\n"
        sections.append(("seeds", "Per seed" + (" and paired comparison" if pairs is not None else ""),
                         text + _seed_table(per_seed, methods, pairs, against)))

    plots = ""
    if (out / "per_task.png").is_file():
        plots += _figure(out / "per_task.png", "normalized score per task and method",
                         "Normalized score per task and method (the line: the expert).")
    if (out / "paired.png").is_file() and pairs is not None:
        plots += _figure(out / "paired.png", f"difference to {against} per seed",
                         f"Difference of the normalized average to <code>{esc(against)}</code>: bars the mean over "
                         "seeds, dots each seed.")
    if plots:
        sections.append(("plots", "Plots", plots))

    if (out / "search_history.png").is_file():
        body = ("<p>The validation-guided search: each trial's mean normalized validation score (pruned trials "
                "stopped after their first tasks) with the best so far, and how much each parameter decided the "
                "score (Optuna's importance over the completed trials).</p>\n"
                + _figure(out / "search_history.png", "search history", "Objective per trial and best so far."))
        if (out / "search_importances.png").is_file():
            body += _figure(out / "search_importances.png", "parameter importances", "Parameter importances.")
        sections.append(("search", "Search", body))

    if histories:
        body = ("<p>SA-Merging's pruning, iteration by iteration: the density (entries alive / initially non-zero, "
                "over the experts), the norm of the merged task vector against its unpruned norm, and the fraction "
                "of surviving entries whose sign differs from the merged sign. Iteration 0 is the unpruned start"
                + ("; with several seeds, the first seed's merge" if per_seed else "") + ".</p>\n")
        if (out / "sa_iterations.png").is_file():
            body += _figure(out / "sa_iterations.png",
                            "SA-Merging density, norm ratio and sign conflicts per iteration",
                            "Density, ‖Σ τ⁽ᵗ⁾‖ / ‖Σ τ‖ and sign conflicts per iteration.")
        body += ('<div class="tables">' + "".join(_iteration_table(spec, hist, i)
                                                  for i, (spec, hist) in enumerate(histories.items())) + "</div>\n")
        sections.append(("iterations", "SA-Merging iterations", body))

    shown = [m for m in merges if recipes.get(m) is not None]
    if shown:
        body = ("<p>Each merge as the YAML file <code>samerge merge --config recipe.yaml</code> takes: the method and "
                "its parameters resolved (defaults included).</p>\n<div class=\"recipes\">")
        for m in shown:
            note = f'<p class="note">{esc(notes[m])}</p>' if m in notes else ""
            body += (f"<div class=\"recipe\"><h3><code>{esc(m)}</code></h3>{note}"
                     f"<pre><code>{esc(recipe_yaml(recipes[m]))}</code></pre></div>\n")
        sections.append(("recipes", "Recipes", body + "</div>\n"))

    written = ["report.csv", "report.md", *(["seeds.csv"] if per_seed else []),
               *(["paired.csv"] if pairs is not None else []), "per_task.png",
               *(["paired.png"] if pairs is not None else []), *(["sa_iterations.png"] if histories else []),
               "search_history.png", "search_importances.png", "search_trials.csv"]
    files = [f for f in written if (out / f).is_file()]  # this report's files (not an older report's in ``out``)
    sections.append(("files", "Files", "<p>Next to this page: "
                     + ", ".join(f'<a href="{esc(f)}">{esc(f)}</a>' for f in files) + ".</p>\n"))

    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>\n{content}</section>\n'
                   for sid, title, content in sections)
    title = f"samerge report: {suite}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{esc(title)}</h1>\n<p class=\"meta\">{''.join(meta)}</p>\n"
            f"<nav>{nav}</nav></header>\n{summary}{body}"
            f"<footer>Written by samerge {esc(version)} on <time>{esc(generated)}</time>.</footer>\n"
            "</main>\n</body>\n</html>\n")
