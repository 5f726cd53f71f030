"""The score step every driver uses (the pipeline's ``evaluate`` stage, ``samerge suite report``): which split is
scored, how each expert is scored, how a score is normalised, and the score cache that lets a report resume.

Rows are ``{suite, method, task, score, accuracy, normalized}``: one per method and task plus the ``average`` row,
with the methods ``base`` (the base with each expert's head) and ``expert`` (each expert on its own task) first.
``score`` is the task's metric (balanced accuracy for the built-in suites' classification tasks, the suite file's
metric for the hub suites), ``accuracy`` plain accuracy beside it (None where the task has none, e.g. regression),
and ``normalized`` is score / expert score on that task (:func:`~samerge.evaluation.metrics.normalized`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from statistics import fmean as mean
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import samerge
from samerge.errors import SamergeError, SamergeWarning
from samerge.evaluation.metrics import normalized
from samerge.evaluation.suite import Expert, Suite

SPLITS = ("test", "val")
State = Mapping[str, torch.Tensor]
TaskScores = Mapping[str, Mapping[str, float]]  # task -> {"score": ..., "accuracy": ...} (Suite.scores)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise SamergeError(f"unknown split {split!r}; choose test or val")


def on_split(experts: Sequence[Expert], split: str) -> list[Expert]:
    """The experts with their tasks' ``split`` examples in the place every suite scores (``task.test``)."""
    check_split(split)
    if split == "test":
        return list(experts)
    out = []
    for e in experts:
        val = getattr(e.task, "val", None)
        if not val:
            raise SamergeError(f"task {e.task.name!r} has no validation split; score the test split")
        out.append(dataclasses.replace(e, task=dataclasses.replace(e.task, test=val)))
    return out


@functools.cache
def code_fingerprint() -> str:
    """What a stored score depends on besides its key: samerge's version, torch's, and a digest of samerge's Python
    sources (any change to the code that merges or scores could change a score)."""
    root = Path(samerge.__file__).resolve().parent
    h = hashlib.sha256(f"{samerge.__version__}\0{torch.__version__}".encode())
    for p in sorted(root.rglob("*.py")):
        h.update(b"\0" + p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


class ScoreCache:
    """A JSON-lines file of scores, each appended and synced as soon as it is computed, so an interrupted run
    resumes where it stopped. Each line names the code that made it (:func:`code_fingerprint`): a line made by
    other code (another samerge or torch, or an edited checkout) is not used but counted in ``other_code`` (a
    warning says so), and its score is computed again; so is a line cut by an interruption, or one in the format of
    an earlier samerge (one number per task, before ``score`` became balanced accuracy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, dict[str, float]]] = {}
        self.other_code = 0  # keys held only by lines of other code (what this code computes again)
        if path.exists():
            code, other = code_fingerprint(), set()
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    if not all(isinstance(v, dict) and "score" in v for v in rec["scores"].values()):
                        continue
                    if rec.get("code") != code:
                        other.add(rec["key"])
                        continue
                    self.done[rec["key"]] = rec["scores"]
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue
            self.other_code = len(other - self.done.keys())
            if self.other_code:
                warnings.warn(SamergeWarning(
                    f"{self.other_code} stored score(s) in {path} were made by other code (another samerge or torch, "
                    "or an edited checkout): they are computed again"), stacklevel=2)

    def get(self, key: str) -> dict[str, dict[str, float]] | None:
        return self.done.get(key)

    def put(self, key: str, scores: dict[str, dict[str, float]]) -> None:
        self.done[key] = scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "scores": scores, "code": code_fingerprint()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def score_models(suite: Suite, experts: Sequence[Expert], models: Mapping[str, Callable[[], State]], *,
                 label: str, split: str = "test", base: Callable[[], State] | None = None,
                 cache: ScoreCache | None = None, keys: Mapping[str, str] | None = None,
                 say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Score the base, every expert on its own task, and each of ``models`` (name -> a function making its state,
    called only when its scores are not cached) on every expert's task of ``split``; the rows described above,
    with ``suite`` = ``label`` (the suite as the user named it). ``base``: makes the base's state (by default the
    suite's own; the pipeline scores the base it acquired, which a registry may have brought).

    ``cache``: scores are read from and written to it under ``keys[name]`` (``name`` itself when absent; the
    keys ``base`` and ``expert`` hold the base's and the experts' scores), so the caller decides what a stored
    score depends on (suite, seed, split, a method's resolved parameters, ...).
    """
    experts = on_split(experts, split)

    def scored(name: str, compute: Callable[[], TaskScores]) -> TaskScores:
        key = (keys or {}).get(name, name)
        got = cache.get(key) if cache is not None else None
        if got is None:
            got = compute()
            if cache is not None:
                cache.put(key, got)
        return got

    expert_scores = scored("expert", lambda: {e.task.name: suite.scores(e.encoder, [e])[e.task.name]
                                               for e in experts})
    rows = score_rows(label, "base", scored("base", lambda: suite.scores(base() if base else suite.base, experts)), expert_scores)
    rows += score_rows(label, "expert", expert_scores, expert_scores)
    for name, make in models.items():
        if say is not None:
            say(name)
        rows += score_rows(label, name, scored(name, lambda make=make: suite.scores(make(), experts)),
                           expert_scores)
    return rows


def score_rows(suite: str, method: str, scores: TaskScores, expert_scores: TaskScores) -> list[dict[str, Any]]:
    """The rows of one method: one per task plus the ``average`` row (normalized = merged score / expert score; the
    average's accuracy only when every task has one)."""
    rows = [{"suite": suite, "method": method, "task": t, "score": v["score"], "accuracy": v.get("accuracy"),
             "normalized": normalized(v["score"], expert_scores[t]["score"])} for t, v in scores.items()]
    accs = [r["accuracy"] for r in rows]
    rows.append({"suite": suite, "method": method, "task": "average", "score": mean(r["score"] for r in rows),
                 "accuracy": mean(accs) if None not in accs else None,
                 "normalized": mean(r["normalized"] for r in rows)})
    return rows


ROW_FIELDS = ("suite", "method", "task", "score", "accuracy", "normalized")
_NUMBERS = ("score", "accuracy", "normalized")


def row_cells(row: Mapping[str, Any], digits: int = 4) -> dict[str, Any]:
    """A row as CSV cells: the numbers with ``digits`` decimals, a missing accuracy as an empty cell."""
    return {**row, **{k: "" if row.get(k) is None else f"{row[k]:.{digits}f}" for k in _NUMBERS}}

