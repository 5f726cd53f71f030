"""A hub suite's evaluation data as columns: parquet (the Hub's format), CSV, JSONL or an image folder.

:func:`read_columns` reads the named columns of a split's files, and the label column's class names where the
``datasets`` library stored them (ClassLabel metadata in the parquet schema); the suites then subsample the rows
(:func:`_subsample`, seeded) and turn labels into class ids (:func:`_to_class_ids`).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samerge.errors import SamergeError
from samerge.evaluation.hub.spec import DataSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _files(root: Path, data: DataSource, what: str) -> list[Path]:
    if root.is_file():
        return [root]
    patterns = data.files or ["**/*.parquet", "**/*.csv", "**/*.jsonl"]
    found = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    if not found:
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:8]
        raise SamergeError(f"{what}: no files match {patterns} under {root} (present: {', '.join(present) or 'none'})")
    return found


def _format_of(files: list[Path], data: DataSource, root: Path) -> str:
    if data.format != "auto":
        return data.format
    if root.is_dir() and not data.files and not any(root.glob("**/*.parquet")) and any(
            p.is_dir() for p in root.iterdir()):
        return "imagefolder"
    suffixes = {p.suffix.lower() for p in files}
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes == {".csv"}:
        return "csv"
    if suffixes <= {".jsonl", ".json"}:
        return "jsonl"
    raise SamergeError(f"cannot tell the format of {', '.join(sorted(suffixes))} files; set data.format to one of "
                       "parquet, csv, jsonl, imagefolder")


def _class_label_names(schema_metadata: Mapping[bytes, bytes] | None, column: str) -> list[str] | None:
    """ClassLabel names that the ``datasets`` library stores in a parquet file's schema metadata."""
    if not schema_metadata or b"huggingface" not in schema_metadata:
        return None
    try:
        info = json.loads(schema_metadata[b"huggingface"])
        feat = info.get("info", {}).get("features", {}).get(column, {})
    except (ValueError, AttributeError):
        return None
    names = feat.get("names") if isinstance(feat, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def read_columns(root: Path, data: DataSource, columns: Sequence[str], what: str
                 ) -> tuple[dict[str, list[Any]], list[str] | None, list[Path]]:
    """The named columns of a dataset's files, the label column's ClassLabel names when stored, and the files.

    Parquet (the Hub's format; images are ``{"bytes", "path"}`` structs), CSV (header row) and JSONL; an image
    folder (``root/<class>/<image>``) has the columns ``image`` (paths) and ``label`` (class ids of the sorted
    folder names, which are the class names).
    """
    files = _files(root, data, what) if not (root.is_dir() and data.format == "imagefolder") else []
    fmt = _format_of(files, data, root)
    names: list[str] | None = None
    if fmt == "imagefolder":
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        rows = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                if f.suffix.lower() in IMAGE_SUFFIXES]
        if not rows:
            raise SamergeError(f"{what}: no images under {root}/<class>/")
        table: dict[str, list[Any]] = {"image": [r[0] for r in rows], "label": [r[1] for r in rows]}
        names = classes
        files = [root]
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in files]
        missing = [c for c in columns if c not in tables[0].column_names]
        if missing:
            raise SamergeError(f"{what}: column {missing[0]!r} not in {files[0].name} (columns: "
                               f"{', '.join(tables[0].column_names)})")
        merged = pa.concat_tables([t.select(list(columns)) for t in tables], promote_options="default")
        table = {c: merged.column(c).to_pylist() for c in columns}
        names = _class_label_names(tables[0].schema.metadata, columns[-1])
    else:
        records: list[dict[str, Any]] = []
        try:
            for f in files:
                if fmt == "csv":
                    with open(f, newline="", encoding="utf-8") as fh:
                        records += list(csv.DictReader(fh))
                else:
                    records += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()
                                if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SamergeError(f"{what}: cannot read {files[0]} ({exc})") from None
        if not records:
            raise SamergeError(f"{what}: {files[0]} has no rows")
        missing = [c for c in columns if c not in records[0]]
        if missing:
            raise SamergeError(f"{what}: column {missing[0]!r} not in {files[0].name} (columns: "
                               f"{', '.join(records[0])})")
        table = {c: [r[c] for r in records] for c in columns}
    return table, names, files


def _subsample(n: int, size: str, small: int, key: str) -> list[int]:
    """Row indices: all at ``full``; a seeded sample of ``small`` (in file order) at ``small``."""
    if size == "full" or n <= small:
        return list(range(n))
    return sorted(random.Random(key).sample(range(n), small))


def _to_class_ids(values: list[Any], names: list[str] | None, label2id: Mapping[str, int] | None, what: str
                  ) -> list[int]:
    """Labels as class ids: ints as they are, otherwise names looked up (in ``names``, then ``label2id``)."""
    out: list[int] = []
    lookup = {n: i for i, n in enumerate(names or [])}
    lower = {str(k).lower(): int(v) for k, v in (label2id or {}).items()}
    for v in values:
        if isinstance(v, bool):
            out.append(int(v))
        elif isinstance(v, int):
            out.append(v)
        elif isinstance(v, float) and v.is_integer():
            out.append(int(v))
        elif isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
            out.append(int(v))
        elif isinstance(v, str) and v in lookup:
            out.append(lookup[v])
        elif isinstance(v, str) and v.lower() in lower:
            out.append(lower[v.lower()])
        else:
            known = list(lookup) or list(lower)
            raise SamergeError(f"{what}: label {v!r} is neither a class id nor a known label"
                               f"{' (' + ', '.join(known[:10]) + ')' if known else ''}")
    return out
