"""report.html: one static page per report (tables, embedded plots, SA-Merging's iteration curves, recipes).

The rows are synthetic (a real suite run fine-tunes experts for minutes; these tests check the page, not the
results); the SA-Merging history and the recipes come from real merges of a small MLP, and each recipe read back from
the page must merge the same tensors again. The browser test renders the page in headless Chromium (Debian's
``chromium`` driven by Playwright through ``executable_path``; ``make setup`` installs it) and checks the tables and
images are laid out and the screenshot is not blank there.
"""

from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

import samerge
from samerge.cli import MergeConfig
from samerge.evaluation.report import _mean_rows, method_recipe, paired_differences, write_report

HOSTILE = "<img src=x onerror=alert(1)>&\"'t"
TASKS = ["sentiment", HOSTILE]
CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def mlp(seed: int = 0, dims=(24, 32, 16)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(len(dims) - 1):
        out[f"fc{i}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) / math.sqrt(dims[i])
        out[f"fc{i}.bias"] = 0.1 * torch.randn(dims[i + 1], generator=g)
    return out


def perturbed(base: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
            for _ in range(n)]


SPECS = {"task_arithmetic": ("task_arithmetic", {}), "ties[aggregate=mean]": ("ties", {"aggregate": "mean"}),
         "sa_merging[prune_ratio=0.3]": ("sa_merging", {"prune_ratio": 0.3})}


def synthetic_rows(seed: int) -> list[dict]:
    """base, expert and each method on TASKS plus the average, like score_models' rows (made-up scores)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    expert = {t: 0.8 + 0.1 * i for i, t in enumerate(TASKS)}
    for m in ["base", "expert", *SPECS]:
        scores = {t: expert[t] if m == "expert" else float(0.3 + 0.5 * torch.rand(1, generator=g)) for t in TASKS}
        rows += [{"suite": "text", "method": m, "task": t, "score": s, "normalized": s / expert[t]}
                 for t, s in scores.items()]
        rows.append({"suite": "text", "method": m, "task": "average", "score": sum(scores.values()) / len(TASKS),
                     "normalized": sum(scores[t] / expert[t] for t in TASKS) / len(TASKS)})
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = mlp()
    experts = perturbed(base, 3)
    hist: list = []
    samerge.merge(base, experts, "sa_merging", history=hist, prune_ratio=0.3)
    assert len(hist) >= 3
    per_seed = {0: synthetic_rows(0), 1: synthetic_rows(1)}
    rows = _mean_rows(per_seed)
    recipes = {spec: method_recipe(name, params) for spec, (name, params) in SPECS.items()}
    out = tmp_path_factory.mktemp("report")
    histories = {"sa_merging[prune_ratio=0.3]": hist}
    write_report(rows, out, histories, per_seed=per_seed, against="task_arithmetic", recipes=recipes)
    return {"out": out, "rows": rows, "per_seed": per_seed, "hist": hist, "recipes": recipes, "base": base,
            "experts": experts, "histories": histories}


class Page(HTMLParser):
    """Tags, tables (id -> rows of cell texts), images and <pre> texts of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.pres: list[str] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "pre":
            self._pre = []
        elif tag == "a":
            self.links.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


def test_page_holds_tables_images_curves_and_recipes(report):
    out, rows = report["out"], report["rows"]
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    # static and self-contained: no script, no stylesheet or font fetched, images embedded
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert not re.search(r"(?:src|href)=\"?(?:https?:)?//", text) and "@import" not in text and "url(" not in text
    assert all(h.startswith("#") or (out / h).is_file() for h in page.links)  # relative links to the report's files
    embedded = [base64.b64decode(i["src"].removeprefix("data:image/png;base64,")) for i in page.images]
    assert embedded == [(out / f).read_bytes() for f in ("per_task.png", "paired.png", "sa_iterations.png")]
    # the hostile task name is text, never markup: escaped in the source, exact in the parsed header
    assert HOSTILE not in text and "<img src=x" not in text
    cell = {(r["method"], r["task"]): r for r in rows}
    for table, key in (("normalized-table", "normalized"), ("scores-table", "score")):
        head, *body = page.tables[table]
        assert head == ["method", *TASKS, "average"]
        assert [b[0] for b in body] == ["base", "expert", *SPECS]
        for b in body:
            for t, v in zip([*TASKS, "average"], b[1:]):
                assert float(v) == pytest.approx(cell[(b[0], t)][key], abs=5e-4)
    # per seed and paired, as report.md has them
    head, *body = page.tables["paired"]
    assert head[:3] == ["method", "seed 0", "seed 1"] and head[-1] == "wins"
    for p, b in zip(paired_differences(report["per_seed"], "task_arithmetic"), body, strict=True):
        assert b[0] == p["method"]
        assert float(b[1]) == pytest.approx(p["values"][0], abs=5e-4)
        assert float(b[5]) == pytest.approx(p["diffs"][1], abs=5e-4) and b[-1] == f"{p['wins']}/2"
    # SA-Merging's iterations: density and norm ratio per iteration, from 1 (nothing pruned) at iteration 0
    head, *body = page.tables["iterations-0"]
    assert head[:3] == ["iteration", "density", "‖Σ τ⁽ᵗ⁾‖ / ‖Σ τ‖"]
    assert body[0][:3] == ["0", "1.0000", "1.0000"] and len(body) == len(report["hist"]) + 1
    for h, b in zip(report["hist"], body[1:], strict=True):
        assert int(b[0]) == h.iteration and float(b[1]) == pytest.approx(h.overall_density, abs=5e-5)
        assert float(b[2]) == pytest.approx(h.norm_ratio, abs=5e-5)
    assert report["hist"][-1].overall_density < 0.5  # the curve goes somewhere: pruned below half


def test_recipes_on_the_page_merge_the_same_tensors(report):
    pres = Page((report["out"] / "report.html").read_text(encoding="utf-8")).pres
    assert len(pres) == len(SPECS)
    for text, (spec, (name, params)) in zip(pres, SPECS.items(), strict=True):
        cfg = MergeConfig(**yaml.safe_load(text))  # what `samerge merge --config` reads
        assert cfg.method == name and cfg.params == report["recipes"][spec]["params"]
        again = samerge.merge(report["base"], report["experts"], cfg.method, **cfg.params)
        first = samerge.merge(report["base"], report["experts"], name, **params)
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_page_is_deterministic_but_for_its_time(report, tmp_path):
    write_report(report["rows"], tmp_path, report["histories"], per_seed=report["per_seed"],
                 against="task_arithmetic", recipes=report["recipes"])
    strip = lambda p: re.sub(r"<time>[^<]*</time>", "", p.read_text(encoding="utf-8"))  # noqa: E731
    assert strip(tmp_path / "report.html") == strip(report["out"] / "report.html")


def _playwright():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian's chromium package; `make setup` installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    return sync_playwright


def test_page_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    sync_playwright = _playwright()
    url = (report["out"] / "report.html").resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, timeout=120_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            tables = page.locator("table")
            assert tables.count() == 4  # normalized, scores, paired, one iteration table
            assert all(tables.nth(i).is_visible() for i in range(4))
            images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert len(images) == 3 and all(ok and w > 0 and h > 0 for ok, w, h in images)
            assert all(page.locator("img").nth(i).is_visible() for i in range(3))
            # laid-out boxes in page coordinates (the full-page screenshot's)
            boxes = page.evaluate("""[...document.querySelectorAll('table, img')].map(e => {
                const r = e.getBoundingClientRect();
                return [e.tagName, r.x + window.scrollX, r.y + window.scrollY, r.width, r.height]; })""")
            assert page.locator("thead th", has_text="onerror").first.inner_text() == HOSTILE
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # nothing fetched from anywhere
    im = Image.open(shot).convert("RGB")
    assert im.width >= 1280 and im.height > 900
    assert [tag for tag, *_ in boxes] == ["TABLE"] * 3 + ["IMG"] * 3 + ["TABLE"]  # in the page's order
    for tag, x, y, w, h in boxes:
        assert w > 50 and h > 20 and x + w <= im.width + 1 and y + h <= im.height + 1, (tag, x, y, w, h)
        region = im.crop((int(x), int(y), int(x + w), int(y + h)))
        colours = region.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 8, f"{tag} at ({x}, {y}) is blank in the screenshot"


def test_search_rows_are_labelled_and_its_plots_join_the_page(tmp_path):
    """The pipeline's report with a search (issue 17): each row labelled data-free or validation-selected (report.md's
    kind column, a label on the page), the search's history and importance plots embedded in a Search section and
    its trials beside the page, plain accuracy in its own table, and the search's recipe merging its state again. A
    real search: the tiny suite of tests/test_search.py, scored for real."""
    from samerge.evaluation.scoring import score_models
    from samerge.evaluation.search import Evaluator, run_search
    from tests.test_search import one_thread, tiny

    with one_thread():
        suite, experts = tiny()
        result = run_search(Evaluator.build(suite, experts), {"task_arithmetic": {"scale": [0.1, 1.5]},
                                                              "ties": {"density": [0.1, 0.9]}}, n_trials=6, seed=0,
                            startup_trials=3)
        searched = result.write_outputs(tmp_path / "search")
        rows = score_models(suite, experts, {"task_arithmetic": lambda: samerge.merge(
            suite.base, [e.encoder for e in experts], "task_arithmetic"), "search": result.best_state}, label="tiny")
    kinds = {"task_arithmetic": "data-free", "search": "validation-selected"}
    recipes = {"task_arithmetic": method_recipe("task_arithmetic", {}), "search": result.recipe()}
    out = tmp_path / "report"
    write_report(rows, out, {}, recipes=recipes, kinds=kinds, search=searched,
                 notes={"search": "The search's choice."})
    for name in ("history.png", "importances.png", "trials.csv"):  # the search's files beside the page
        assert (out / f"search_{name}").read_bytes() == (searched / name).read_bytes()
    tasks = [t.name for t in suite.tasks]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert f"| method | kind | {' | '.join(tasks)} | average |" in md
    labelled = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines()
                if line.startswith("| `")}
    assert labelled == {"`base`": "", "`expert`": "", "`task_arithmetic`": "data-free",
                        "`search`": "validation-selected"}

    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    embedded = [base64.b64decode(i["src"].removeprefix("data:image/png;base64,")) for i in page.images]
    assert embedded == [(out / f).read_bytes() for f in ("per_task.png", "search_history.png",
                                                          "search_importances.png")]
    assert '<section id="search"><h2>Search</h2>' in text and "search_trials.csv" in page.links
    cell = {(r["method"], r["task"]): r for r in rows}
    for table, key in (("normalized-table", "normalized"), ("accuracy-table", "accuracy")):
        head, *body = page.tables[table]
        assert head == ["method", *tasks, "average"]
        names = ["base", "expert", "task_arithmetic", "search"]
        labels = [n + (f" {kinds[n]}" if n in kinds and table == "normalized-table" else "") for n in names]
        assert [b[0] for b in body] == labels
        for n, b in zip(names, body):
            for t, v in zip([*tasks, "average"], b[1:]):
                assert float(v) == pytest.approx(cell[(n, t)][key], abs=5e-4)
    assert any(r["accuracy"] != r["score"] for r in rows)  # two metrics: the table above is not the score's
    assert "The search&#x27;s choice." in text or "The search's choice." in text
    # the search's recipe, read back from the page, merges the state its best trial scored
    cfg = MergeConfig(**yaml.safe_load(page.pres[1]))
    assert cfg.method == result.best.method
    again = samerge.merge(suite.base, [e.encoder for e in experts], cfg.method, **cfg.params)
    best = result.best_state()
    assert again.keys() == best.keys() and all(torch.equal(again[k], best[k]) for k in best)
