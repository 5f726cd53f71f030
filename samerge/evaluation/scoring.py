"""The score step every driver uses (the pipeline's ``evaluate`` stage, ``samerge suite report``): which split is
scored, how each expert is scored, how a score is normalised, and the score cache that lets a report resume.

Rows are ``{suite, method, task, score, normalized}``: one per method and task plus the ``average`` row, with the
methods ``base`` (the base with each expert's head) and ``expert`` (each expert on its own task) first;
``normalized`` is score / expert score on that task (:func:`~samerge.evaluation.metrics.normalized`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.evaluation.metrics import normalized
from samerge.evaluation.suite import Expert, Suite

SPLITS = ("test", "val")
State = Mapping[str, torch.Tensor]


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


class ScoreCache:
    """A JSON-lines file of scores, each appended and synced as soon as it is computed, so an interrupted run
    resumes where it stopped; a line cut by an interruption is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, float]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.done[rec["key"]] = rec["scores"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict[str, float] | None:
        return self.done.get(key)

    def put(self, key: str, scores: dict[str, float]) -> None:
        self.done[key] = scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "scores": scores}) + "\n")
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

    def scored(name: str, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
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


def score_rows(suite: str, method: str, scores: Mapping[str, float],
               expert_scores: Mapping[str, float]) -> list[dict[str, Any]]:
    """The rows of one method: one per task plus the ``average`` row (normalized = merged / expert)."""
    rows = [{"suite": suite, "method": method, "task": t, "score": v, "normalized": normalized(v, expert_scores[t])}
            for t, v in scores.items()]
    rows.append({"suite": suite, "method": method, "task": "average", "score": sum(scores.values()) / len(scores),
                 "normalized": sum(r["normalized"] for r in rows) / len(rows)})
    return rows
