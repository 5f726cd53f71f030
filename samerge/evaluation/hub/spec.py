"""What a hub suite is, as data: the schema of a suite file, its validation, and the built-in definitions.

A suite (:class:`SuiteSpec`) names its kind, its base model, and per task the expert, the evaluation data, the metric
and (per kind) how inputs become predictions. A user's own suite is a YAML or JSON file with this schema (validated
with ``extra="forbid"``: an unknown key, a repo without revision or an unknown metric is an error naming the place and
the valid options). Sources are either ``{repo, revision[, subfolder]}`` or ``{path}`` (a local directory saved with
``save_pretrained``, or for data a CSV/JSONL/parquet file or an image folder).

The built-in suites are files of that same schema, ``builtin/<name>.yaml`` (a user can copy one as a template, or
write it with :func:`write_spec`); their comments say where the experts come from and why each revision is a commit
or the branch ``main``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from samerge.errors import SamergeError, invalid
from samerge.evaluation.metrics import METRICS, REGRESSION_METRICS
from samerge.evaluation.templates import builtin_templates
from samerge.io.writer import write_text_atomic

BUILTIN_DIR = Path(__file__).with_name("builtin")
# The order help texts and error messages list the built-ins in (the CLIP suites by model, then the GLUE ones); a
# file added to builtin/ that is not named here follows them, alphabetically.
_ORDER = ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "roberta-base-glue", "roberta-large-glue",
          "flan-t5-base-lora-glue")
HUB_SUITES = tuple(sorted((p.stem for p in BUILTIN_DIR.glob("*.yaml")),
                          key=lambda name: (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)))
SUITE_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ================================================================================================ schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """A model: ``repo`` + ``revision`` on the Hugging Face Hub (optionally a ``subfolder``), or a local ``path``."""

    repo: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of repo (a Hugging Face Hub id, with revision) or path (a local "
                             "directory)")
        if self.repo is not None and not self.revision:
            raise ValueError(f"missing revision for repo {self.repo!r}: pin a commit hash (or a tag or branch)")
        if self.path is not None and (self.revision or self.subfolder):
            raise ValueError("revision and subfolder apply to repo sources only")
        return self


class DataSource(_Strict):
    """A dataset: a Hub dataset repo at a revision, or a local path; ``files`` are globs inside it."""

    repo: str | None = None
    revision: str | None = None
    path: str | None = None
    files: list[str] = Field(default_factory=list)
    format: Literal["auto", "parquet", "csv", "jsonl", "imagefolder"] = "auto"

    @field_validator("files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of repo (a Hugging Face Hub dataset id, with revision) or path (a "
                             "local file or directory)")
        if self.repo is not None and not self.revision:
            raise ValueError(f"missing revision for dataset repo {self.repo!r}: pin a commit hash (or a tag or "
                             "branch)")
        if self.repo is not None and not self.files:
            raise ValueError(f"dataset repo {self.repo!r}: give files (globs of the split's files, e.g. "
                             "'data/test-*.parquet')")
        if self.path is not None and self.revision:
            raise ValueError("revision applies to repo sources only")
        return self


class TaskSpec(_Strict):
    """One task: its expert, its evaluation data, its metric and (per suite kind) how inputs become predictions."""

    name: str
    expert: ModelSource | None = None
    data: DataSource
    metric: str = "accuracy"
    label_field: str = "label"
    # clip: zero-shot head from class names (default: the dataset's) and templates ("{}" = the class name)
    image_field: str = "image"
    templates: list[str] | None = None
    classnames: list[str] | None = None
    # seq-cls: one or two text columns
    text_fields: list[str] | None = None
    # seq2seq-lora: an input prompt (str.format over the row's columns), then label words or a number format
    prompt: str | None = None
    targets: dict[str, str] | None = None
    target_format: str | None = None
    decode: Literal["generate", "score"] = "generate"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v):
            raise ValueError(f"task name {v!r}: use letters, digits, '_', '-', '.'")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; valid metrics: {', '.join(METRICS)}")
        return v


class SuiteSpec(_Strict):
    """A whole suite: kind, base model, tasks, and evaluation settings."""

    name: str
    kind: Literal["clip", "seq-cls", "seq2seq-lora"]
    base: ModelSource
    tasks: list[TaskSpec] = Field(min_length=1)
    small_examples: int = Field(500, gt=0)  # examples per task at size "small"
    batch_size: int = Field(64, gt=0)
    max_length: int = Field(256, gt=0)  # input tokens (seq-cls, seq2seq-lora)
    max_new_tokens: int = Field(8, gt=0)  # generated tokens (seq2seq-lora, decode: generate)

    @model_validator(mode="after")
    def _kind_rules(self) -> SuiteSpec:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is defined twice")
        for t in self.tasks:
            where = f"task {t.name!r}"
            regression = t.metric in REGRESSION_METRICS
            if self.kind == "clip":
                if regression:
                    raise ValueError(f"{where}: a clip task is classification; metric {t.metric!r} does not apply")
                templates = t.templates if t.templates is not None else builtin_templates().get(t.name)
                if not templates:
                    raise ValueError(f"{where}: give templates (strings with '{{}}' for the class name); built-in "
                                     f"templates exist for: {', '.join(builtin_templates())}")
                bad = [s for s in templates if "{}" not in s]
                if bad:
                    raise ValueError(f"{where}: template {bad[0]!r} has no '{{}}' for the class name")
            elif self.kind == "seq-cls":
                if not t.text_fields or len(t.text_fields) > 2:
                    raise ValueError(f"{where}: give text_fields, one or two column names")
            else:
                if not t.prompt:
                    raise ValueError(f"{where}: give prompt (the input text, with {{column}} placeholders)")
                if regression != (t.target_format is not None) or (t.targets is not None) == regression:
                    raise ValueError(f"{where}: a classification metric needs targets (label id -> label word); "
                                     "a regression metric (pearson, spearman, pearson_spearman) needs target_format "
                                     "(e.g. '{:.1f}')")
                if regression and t.decode == "score":
                    raise ValueError(f"{where}: decode 'score' ranks label words; a regression task must generate")
        return self


# ================================================================================================ validation
def validate_spec(data: Any, source: str) -> SuiteSpec:
    """A :class:`SuiteSpec` from parsed YAML/JSON, or a :class:`SamergeError` naming the first problem."""
    if not isinstance(data, Mapping):
        raise SamergeError(f"{source}: a suite file is a mapping with keys {', '.join(SuiteSpec.model_fields)}")
    try:
        return SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid(source, exc, SuiteSpec) from None


def load_spec_file(path: str | os.PathLike[str]) -> SuiteSpec:
    """Read and validate a suite file (YAML or JSON). Relative local paths are taken relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise SamergeError(f"no such suite file {p} (built-in hub suites: {', '.join(HUB_SUITES)})")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SamergeError(f"{p}: cannot parse the suite file ({_first_line(exc)})") from None
    spec = validate_spec(data, str(p))
    for src in [spec.base, *(t.expert for t in spec.tasks), *(t.data for t in spec.tasks)]:
        if src is not None and src.path is not None and not Path(src.path).expanduser().is_absolute():
            src.path = str((p.parent / src.path).resolve())
    return spec


# ================================================================================================ built-ins
def builtin_spec(name: str) -> SuiteSpec:
    """The definition of a built-in hub suite, ``builtin/<name>.yaml`` (data only; nothing is downloaded)."""
    if name not in HUB_SUITES:
        raise SamergeError(f"unknown hub suite {name!r}; built-in hub suites: {', '.join(HUB_SUITES)} (or give a "
                           "suite file .yaml/.json)")
    data = yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    return validate_spec(data, f"built-in suite {name}")


def write_spec(spec: SuiteSpec | str, path: str | os.PathLike[str]) -> Path:
    """Write a suite (or a built-in's definition, as a template to edit) as YAML, atomically."""
    s = builtin_spec(spec) if isinstance(spec, str) else spec
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, yaml.safe_dump(s.model_dump(exclude_defaults=True), sort_keys=False, width=120))
    return out

