"""Where the pipeline's stages keep their outputs (``WORKDIR/work/STAGE/``) and the readers of the files they
exchange: the part of the pipeline layer that :mod:`samerge.stages` and :mod:`samerge.tracking` both use."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from samerge.errors import SamergeError

STAGES = ("acquire", "extract", "score", "prune", "search", "evaluate", "report")
SEARCH = "search"  # the search stage; its merge's name in the evaluation's rows and in report.register_method
STUDY = "search-study.db"  # in work/: the search's Optuna study, outside the stage's published folder (resumable)
MANIFEST = "manifest.json"


class Layout:
    """Paths of the stages' outputs under ``root/work``."""

    def __init__(self, root: str | os.PathLike[str] = ".") -> None:
        self.root = Path(root).resolve()
        self.work = self.root / "work"

    def stage(self, name: str) -> Path:
        return self.work / name

    def merged(self, method: str) -> Path:
        return self.work / "prune" / method


def read_manifest(d: Path) -> dict[str, Any]:
    p = d / MANIFEST
    if not p.is_file():
        raise SamergeError(f"{d}: no {MANIFEST}; run the acquire stage first (`samerge stage acquire`)")
    return json.loads(p.read_text(encoding="utf-8"))


def read_search_summary(layout: Layout) -> dict[str, Any] | None:
    """The search stage's ``summary.json`` (its kind, choice, validation score and recipe), None before it ran."""
    p = layout.stage(SEARCH) / "summary.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def parse_row(cells: dict[str, str]) -> dict[str, Any]:
    """A row of scores.csv/report.csv read back (the numbers as floats; an empty accuracy cell, or a file without
    the accuracy column from an earlier samerge, as None)."""
    return {**cells, **{k: float(cells[k]) if cells.get(k) not in (None, "") else None
                        for k in ("score", "accuracy", "normalized")}}


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [parse_row(r) for r in csv.DictReader(f)]


def read_iterations(path: Path) -> list[SimpleNamespace]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [SimpleNamespace(iteration=int(r["iteration"]), overall_density=float(r["density"]),
                                norm_ratio=float(r["norm_ratio"]), conflict=float(r["conflict"]))
                for r in csv.DictReader(f) if r["conflict"] != ""]
