"""The paper's suites, for users with internet and a GPU: experts and data from the Hugging Face Hub, pinned.

Three kinds of suite, each defined as data (:class:`SuiteSpec`: model repos + revisions, tasks, dataset sources,
metrics, prompts) and run by one class:

* ``clip`` (:class:`ClipSuite`): a CLIP base (``CLIPModel``) and one fine-tuned vision tower per task
  (``CLIPVisionModel`` checkpoints, FusionBench's ``tanganke/clip-vit-*_<task>``). Only the vision tower is merged;
  every task is scored zero-shot against a head built from class names and templates with the base's frozen text
  tower (:mod:`samerge.evaluation.templates`). Built in: ``clip-vit-b32``, ``clip-vit-b16``, ``clip-vit-l14``.
* ``seq-cls`` (:class:`SeqClsSuite`): a RoBERTa (any ``AutoModelForSequenceClassification``) base and fully
  fine-tuned GLUE experts; the encoder is merged, each expert's classifier is its own head. Built in:
  ``roberta-base-glue`` and ``roberta-large-glue`` (the latter names no experts: no consistent published set was
  found, so it needs a suite file with yours).
* ``seq2seq-lora`` (:class:`Seq2SeqLoraSuite`): a Flan-T5 base and PEFT LoRA experts (FusionBench's
  ``tanganke/flan-t5-base_glue-<task>_lora-16``); each expert is its dense model W0 + s·BA, label words are
  generated (exact match, as FusionBench scores them) or scored by likelihood. Built in: ``flan-t5-base-lora-glue``.

Scores are one number per task (:mod:`samerge.evaluation.metrics`: MCC for CoLA, the mean of Pearson and Spearman
for STS-B with RoBERTa, Spearman for STS-B with Flan-T5 as FusionBench reports it, the mean of accuracy and F1 for
MRPC/QQP, accuracy elsewhere). ``size="full"`` scores the whole evaluation split, ``size="small"`` a seeded
subsample of ``small_examples`` examples per task; nothing is fine-tuned.

Acquisition (:func:`acquire`) goes through ``huggingface_hub.snapshot_download`` for models *and* datasets (a
dataset is its parquet files at one commit), so one code path does pinning, caching and offline use: with
``HF_HUB_OFFLINE=1`` only the local cache is read (no network attempt), and a revision missing from it is a
:class:`~samerge.errors.SamergeError`. Every resolved commit is recorded; after each acquisition
``$SAMERGE_CACHE/hub/<suite>/resolved.json`` and ``pinned.yaml`` (the suite with every revision replaced by the
commit it resolved to) are rewritten, so ``--suite .../pinned.yaml`` reruns exactly the same files. The built-in
definitions pin the commits that could be read off public commit pages (MNIST, SUN397, one ViT-L/14 expert) and
name the branch ``main`` for the rest: a hash nobody verified would be worse than recording the one fetched.

A user's own suite is a YAML or JSON file with the same schema (validated with ``extra="forbid"``: an unknown key,
a repo without revision or an unknown metric is an error naming the place and the valid options). Sources are
either ``{repo, revision[, subfolder]}`` or ``{path}`` (a local directory saved with ``save_pretrained``, or for
data a CSV/JSONL/parquet file or an image folder).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from samerge.device import resolve_device
from samerge.errors import SamergeError, SamergeWarning, invalid
from samerge.evaluation.metrics import METRICS, REGRESSION_METRICS, get_metric
from samerge.evaluation.templates import CLASSNAMES, TEMPLATES, clean_classname, prompts
from samerge.evaluation.text import Expert, cache_root
from samerge.io.writer import write_text_atomic
from samerge.lora import load_adapter

HUB_SUITES = ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "roberta-base-glue", "roberta-large-glue",
              "flan-t5-base-lora-glue")
SUITE_FILE_SUFFIXES = (".yaml", ".yml", ".json")
SIZES = ("small", "full")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# What a model snapshot needs: configs, tokenizer and processor files, safetensors weights (PyTorch pickles are
# fetched only when a repo has no safetensors, and then only the model's own, never training_args.bin).
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
MODEL_PICKLES = ["pytorch_model*.bin", "adapter_model.bin"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_hub_suite(suite: str) -> bool:
    """True for a built-in hub suite name or a suite file path (``.yaml``, ``.yml``, ``.json``)."""
    return suite in HUB_SUITES or suite.lower().endswith(SUITE_FILE_SUFFIXES)


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
                templates = t.templates if t.templates is not None else TEMPLATES.get(t.name)
                if not templates:
                    raise ValueError(f"{where}: give templates (strings with '{{}}' for the class name); built-in "
                                     f"templates exist for: {', '.join(TEMPLATES)}")
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
# Task name -> (expert repo suffix, evaluation dataset repo, its test-split files). Experts: FusionBench's CLIP
# vision towers fine-tuned on the eight Task Arithmetic tasks (only the vision encoder trained, text tower frozen).
_CLIP_TASKS = {
    "sun397": ("sun397", "tanganke/sun397", "data/test-*.parquet"),
    "stanford_cars": ("stanford-cars", "tanganke/stanford_cars", "data/test-*.parquet"),
    "resisc45": ("resisc45", "tanganke/resisc45", "data/test-*.parquet"),
    "eurosat": ("eurosat", "tanganke/eurosat", "data/test-*.parquet"),
    "svhn": ("svhn", "ufldl-stanford/svhn", "cropped_digits/test-*.parquet"),
    "gtsrb": ("gtsrb", "tanganke/gtsrb", "data/test-*.parquet"),
    "mnist": ("mnist", "ylecun/mnist", "mnist/test-*.parquet"),
    "dtd": ("dtd", "tanganke/dtd", "data/test-*.parquet"),
}
_CLIP_MODELS = {"clip-vit-b32": "clip-vit-base-patch32", "clip-vit-b16": "clip-vit-base-patch16",
                "clip-vit-l14": "clip-vit-large-patch14"}
# GLUE task -> (validation files in nyu-mll/glue, text columns, RoBERTa metric). GLUE's test labels are hidden,
# so the validation split is the evaluation split (as in the merging literature).
# The globs match both parquet layouts the repo has had (validation-00000-of-00001.parquet, glue-validation.parquet).
_GLUE = {
    "cola": ("cola/*validation*.parquet", ["sentence"], "mcc"),
    "sst2": ("sst2/*validation*.parquet", ["sentence"], "accuracy"),
    "mrpc": ("mrpc/*validation*.parquet", ["sentence1", "sentence2"], "accuracy_f1"),
    "stsb": ("stsb/*validation*.parquet", ["sentence1", "sentence2"], "pearson_spearman"),
    "qqp": ("qqp/*validation*.parquet", ["question1", "question2"], "accuracy_f1"),
    "mnli": ("mnli/*validation_matched*.parquet", ["premise", "hypothesis"], "accuracy"),
    "qnli": ("qnli/*validation*.parquet", ["question", "sentence"], "accuracy"),
    "rte": ("rte/*validation*.parquet", ["sentence1", "sentence2"], "accuracy"),
}
# The prompts and label words FusionBench's Flan-T5 GLUE LoRA experts were trained with (their typos included:
# the adapters learned these exact strings). Label ids are GLUE's.
_T5_PROMPTS: dict[str, tuple[str, dict[str, str] | None]] = {
    "cola": ("Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere "
             "'acceptable' or 'unacceptable'.", {"0": "unacceptable", "1": "acceptable"}),
    "mnli": ("Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
             "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
             {"0": "entailment", "1": "neutral", "2": "contradiction"}),
    "mrpc": ("Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with "
             "'yes' or 'no'.", {"0": "no", "1": "yes"}),
    "qnli": ("Given the context: '{sentence}', does the question '{question}' have an answer based on the "
             "information provided? Answer with 'yes' or 'no'.", {"0": "yes", "1": "no"}),
    "qqp": ("Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
            {"0": "no", "1": "yes"}),
    "rte": ("Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
            {"0": "yes", "1": "no"}),
    "sst2": ("Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
             {"0": "negative", "1": "positive"}),
    "stsb": ("Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 "
             "(completely similar), rate the similarity.", None),
}
UNPINNED = "main"  # see the module docstring: the resolved commit is recorded and written to pinned.yaml
# Commits read off the repositories' public commit pages (each adds the files used here); every other repo is
# resolved from `main` at first use and recorded.
_PINS = {
    "ylecun/mnist": "77f3279092a1c1579b2250db8eafed0ad422088c",  # "Convert dataset to Parquet (#7)"
    "tanganke/sun397": "9c4afd6174afa3974f209a0ef099dbbe244dfd27",  # "Convert dataset to Parquet (#1)"
    "tanganke/clip-vit-large-patch14_sun397": "3b814ef1bd89d1f4044018d41a09bf468a5e4d34",  # model upload
}


def _src(repo: str, **extra: Any) -> dict[str, Any]:
    return {"repo": repo, "revision": _PINS.get(repo, UNPINNED), **extra}


def _glue_data(task: str) -> dict[str, Any]:
    return _src("nyu-mll/glue", files=[_GLUE[task][0]])


def builtin_spec(name: str) -> SuiteSpec:
    """The definition of a built-in hub suite (data only; nothing is downloaded)."""
    if name in _CLIP_MODELS:
        model = _CLIP_MODELS[name]
        tasks = [{"name": t, "expert": _src(f"tanganke/{model}_{suffix}"), "data": _src(data, files=[files]),
                  "templates": TEMPLATES[t],
                  **({"classnames": CLASSNAMES[t]} if t in CLASSNAMES else {})}
                 for t, (suffix, data, files) in _CLIP_TASKS.items()]
        spec: dict[str, Any] = {"name": name, "kind": "clip", "base": _src(f"openai/{model}"), "tasks": tasks}
    elif name in ("roberta-base-glue", "roberta-large-glue"):
        size = name.split("-")[1]
        # RoBERTa-base GLUE experts fine-tuned with transformers' run_glue (JeremiahZ/roberta-base-<task>); no
        # consistent published RoBERTa-large set was found, so that suite's experts come from a suite file.
        tasks = [{"name": t, "data": _glue_data(t), "text_fields": fields, "metric": metric,
                  **({"expert": _src(f"JeremiahZ/roberta-base-{t}")} if size == "base" else {})}
                 for t, (_, fields, metric) in _GLUE.items()]
        spec = {"name": name, "kind": "seq-cls", "base": _src(f"FacebookAI/roberta-{size}"), "tasks": tasks}
    elif name == "flan-t5-base-lora-glue":
        tasks = []
        for t in _GLUE:
            prompt, targets = _T5_PROMPTS[t]
            task: dict[str, Any] = {"name": t, "data": _glue_data(t), "prompt": prompt,
                                    "expert": _src(f"tanganke/flan-t5-base_glue-{t}_lora-16")}
            if targets is None:  # STS-B: a number with one decimal; FusionBench reports Spearman's rho
                task.update(metric="spearman", target_format="{:.1f}")
            else:
                task.update(metric=_GLUE[t][2], targets=targets)
            tasks.append(task)
        spec = {"name": name, "kind": "seq2seq-lora", "base": _src("google/flan-t5-base"), "tasks": tasks,
                "max_length": 512}
    else:
        raise SamergeError(f"unknown hub suite {name!r}; built-in hub suites: {', '.join(HUB_SUITES)} (or give a "
                           "suite file .yaml/.json)")
    return validate_spec(spec, f"built-in suite {name}")


def write_spec(spec: SuiteSpec | str, path: str | os.PathLike[str]) -> Path:
    """Write a suite (or a built-in's definition, as a template to edit) as YAML, atomically."""
    s = builtin_spec(spec) if isinstance(spec, str) else spec
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, yaml.safe_dump(s.model_dump(exclude_defaults=True), sort_keys=False, width=120))
    return out


# ================================================================================================ acquisition
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass
class Acquired:
    """Where a source's files lie, and what it resolved to (``commit`` is ``None`` for a local path)."""

    path: Path
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None


def acquire(source: ModelSource | DataSource, what: str, *, repo_type: str = "model",
            allow_patterns: Sequence[str] | None = None) -> Acquired:
    """Fetch (or find in the cache) one pinned snapshot and return its directory and resolved commit.

    ``allow_patterns`` restricts what is downloaded. Offline (``HF_HUB_OFFLINE=1``), only the local cache is read:
    a branch resolves through ``refs/<branch>``, a commit hash needs ``snapshots/<commit>``; anything missing is a
    :class:`SamergeError` (and no network is attempted).
    """
    if source.path is not None:
        p = Path(source.path).expanduser()
        if not p.exists():
            raise SamergeError(f"{what}: no such path {p}")
        return Acquired(p)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, rev, cache, offline = str(source.repo), str(source.revision), hub_cache_dir(), hub_offline()
    patterns = list(allow_patterns) if allow_patterns is not None else None
    subfolder = getattr(source, "subfolder", None)
    if subfolder and patterns is not None:
        patterns = [f"{subfolder.strip('/')}/{p}" for p in patterns]
    try:
        folder = Path(snapshot_download(repo, repo_type=repo_type, revision=rev, cache_dir=cache,
                                        allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        kind = "dataset " if repo_type == "dataset" else ""
        raise SamergeError(f"{what}: {kind}{repo} at revision {rev!r} is not in the local Hugging Face cache {cache}"
                           f"{' and HF_HUB_OFFLINE is set' if offline else ' and the Hub cannot be reached'} "
                           "(fetch it once online, or point the suite at a local path)") from None
    except RevisionNotFoundError:
        raise SamergeError(f"{what}: {repo} has no revision {rev!r}") from None
    except RepositoryNotFoundError:
        raise SamergeError(f"{what}: no such {repo_type} repository {repo!r} (or it is private/gated: log in with "
                           "`hf auth login`)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise SamergeError(f"{what}: cannot fetch {repo}@{rev} ({_first_line(exc)})") from None
    commit = folder.name if COMMIT_RE.match(folder.name) else None
    path = folder / subfolder if subfolder else folder
    if not path.exists():
        raise SamergeError(f"{what}: {repo}@{rev} has no subfolder {subfolder!r}")
    return Acquired(path, repo, rev, commit)


def acquire_model(source: ModelSource, what: str) -> Acquired:
    """A model snapshot: configs, tokenizer files and safetensors weights; PyTorch pickles only if needed."""
    acq = acquire(source, what, allow_patterns=MODEL_FILES)
    if source.repo is not None and not any(acq.path.glob("*.safetensors")):
        acq = acquire(source, what, allow_patterns=MODEL_FILES + MODEL_PICKLES)
    return acq


class Provenance:
    """What every source of a suite resolved to; rewrites ``resolved.json`` and ``pinned.yaml`` on each update."""

    def __init__(self, spec: SuiteSpec) -> None:
        self.spec = spec
        self.resolved: dict[str, dict[str, str]] = {}
        self.dir = cache_root() / "hub" / re.sub(r"[^\w.-]", "_", spec.name)
        self._warned = False

    def record(self, role: str, acq: Acquired) -> None:
        if acq.repo is None:
            self.resolved[role] = {"path": str(acq.path)}
        else:
            self.resolved[role] = {"repo": acq.repo, "revision": str(acq.revision), "commit": acq.commit or ""}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "resolved.json", json.dumps(self.resolved, indent=2, sort_keys=True) + "\n")
        write_spec(self.pinned(), self.dir / "pinned.yaml")
        if acq.repo is not None and not COMMIT_RE.match(str(acq.revision)) and not self._warned:
            self._warned = True
            warnings.warn(f"suite {self.spec.name}: {acq.repo} is pinned to {acq.revision!r}, not a commit; it "
                          f"resolved to {acq.commit}. Every resolved commit is recorded in "
                          f"{self.dir / 'pinned.yaml'}: rerun with --suite {self.dir / 'pinned.yaml'} for exactly "
                          "these files", SamergeWarning, stacklevel=3)

    def pinned(self) -> SuiteSpec:
        """The suite with every recorded revision replaced by the commit it resolved to."""
        data = self.spec.model_dump()

        def pin(src: dict[str, Any] | None, role: str) -> None:
            got = self.resolved.get(role, {})
            if src is not None and got.get("commit"):
                src["revision"] = got["commit"]

        pin(data["base"], "base")
        for t in data["tasks"]:
            pin(t["expert"], f"expert:{t['name']}")
            pin(t["data"], f"data:{t['name']}")
        return SuiteSpec.model_validate(data)


# ================================================================================================ data
@dataclass
class HubTask:
    """A task's evaluation examples: ``inputs`` are uint8 images (clip), tuples of texts (seq-cls) or prompts
    (seq2seq); ``labels`` class ids or real values; ``label_names`` the class names (clip, seq-cls when the data
    stores them) or label words (seq2seq); ``source`` the data's ``repo@commit`` or local path."""

    name: str
    spec: TaskSpec
    inputs: list[Any]
    labels: list[float]
    label_names: list[str] = field(default_factory=list)
    source: str = ""


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


# ================================================================================================ suites
def _device(device: str = "auto") -> torch.device:
    """``--device``; when it is ``auto``, the environment's ``SAMERGE_DEVICE`` may name one."""
    if device == "auto":
        device = os.environ.get("SAMERGE_DEVICE") or "auto"
    return resolve_device(device)


def detached_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict that owns its memory, keeping tied tensors tied (one clone per storage)."""
    clones: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in clones:
            clones[key] = v.detach().clone()
        out[k] = clones[key]
    return out


def _check_keys(base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = [k for k in base if k not in state]
    extra = [k for k in state if k not in base]
    if missing or extra:
        detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r} that the base lacks"
        raise SamergeError(f"{what} does not fit the base: it {detail} ({len(missing)} missing, {len(extra)} extra)")
    for k, v in base.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise SamergeError(f"{what} does not fit the base: {k!r} has shape {list(state[k].shape)}, the base "
                               f"{list(v.shape)}")


class HubSuite:
    """What the three kinds share: the spec, provenance, data loading, and the ``run_report`` interface.

    ``run_report`` uses ``name``, ``exclude``, ``base`` (the merged part of the base, a state dict),
    ``expert(task) -> Expert`` (``Expert.encoder`` has exactly ``base``'s keys) and
    ``scores(state, experts) -> {task: score}``.
    """

    exclude: tuple[str, ...] = ()
    base: dict[str, torch.Tensor]

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        if size not in SIZES:
            raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
        self.spec, self.size, self.seed, self.progress = spec, size, seed, progress
        self.name = spec.name
        self.provenance = Provenance(spec)
        self.device = _device(device)
        base = acquire_model(spec.base, f"suite {spec.name}: base")
        self.provenance.record("base", base)
        self.base_dir = base.path

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _batches(self, n: int) -> Iterator[slice]:
        for i in range(0, n, self.spec.batch_size):
            yield slice(i, min(n, i + self.spec.batch_size))

    def _data(self, t: TaskSpec, columns: Sequence[str]) -> tuple[dict[str, list[Any]], list[str] | None, str]:
        acq = acquire(t.data, f"task {t.name!r}: data", repo_type="dataset",
                      allow_patterns=[*t.data.files, "README.md"] if t.data.repo else None)
        self.provenance.record(f"data:{t.name}", acq)
        table, names, _ = read_columns(acq.path, t.data, columns, f"task {t.name!r}: data")
        n = len(table[columns[-1]])
        keep = _subsample(n, self.size, self.spec.small_examples, f"{t.name}:{self.seed}")
        table = {c: [v[i] for i in keep] for c, v in table.items()}
        source = f"{acq.repo}@{acq.commit or acq.revision}" if acq.repo else str(acq.path)
        return table, names, source

    def _expert_source(self, task: HubTask) -> Acquired:
        t = task.spec
        if t.expert is None:
            raise SamergeError(f"suite {self.name}: task {t.name!r} names no expert; write a suite file with "
                               f"'expert: {{repo: ..., revision: ...}}' for it (samerge.evaluation.hub.write_spec"
                               f"({self.name!r}, 'suite.yaml') writes this suite as a template)")
        acq = acquire_model(t.expert, f"task {t.name!r}: expert")
        self.provenance.record(f"expert:{t.name}", acq)
        return acq

    def score_task(self, task: HubTask, preds: Sequence[float]) -> float:
        return get_metric(task.spec.metric)(list(preds), task.labels)

    def load_task(self, t: TaskSpec) -> HubTask:
        """The task's evaluation examples (every kind implements it)."""
        raise NotImplementedError

    def expert(self, task: HubTask) -> Expert:
        """The task's expert: ``encoder`` with exactly ``base``'s keys, ``head`` what scoring needs."""
        raise NotImplementedError

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, float]:
        """One model state (base, expert or merge) scored on every expert's task."""
        raise NotImplementedError


class ClipSuite(HubSuite):
    """CLIP: the vision tower is merged (keys ``vision_model.*``); heads are zero-shot text embeddings."""

    PREFIX = "vision_model."

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(self.base_dir).float().eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        if not (self.base_dir / "preprocessor_config.json").is_file():
            raise SamergeError(f"suite {self.name}: the base has no preprocessor_config.json (CLIP's image "
                               "preprocessing is read from it)")
        self.processor = CLIPImageProcessor.from_pretrained(self.base_dir)
        self.base = detached_copy({self.PREFIX + k: v.cpu() for k, v in self.model.vision_model.state_dict().items()})
        self._heads: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------- data
    def _pixels_u8(self, images: list[Any]) -> torch.Tensor:
        """Resized and center-cropped uint8 images (N, 3, H, W): the processor's geometry, normalization later."""
        out = self.processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
        return torch.as_tensor(out["pixel_values"]).round().clamp(0, 255).to(torch.uint8)

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's input, exactly as the processor rescales and normalizes."""
        mean = torch.tensor(self.processor.image_mean, device=u8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.processor.image_std, device=u8.device).view(1, -1, 1, 1)
        return (u8.float() * float(self.processor.rescale_factor) - mean) / std

    def load_task(self, t: TaskSpec) -> HubTask:
        from PIL import Image

        table, names, source = self._data(t, [t.image_field, t.label_field])
        classnames = t.classnames or ([clean_classname(n) for n in names] if names else None)
        if classnames is None:
            raise SamergeError(f"task {t.name!r}: the data stores no class names; give classnames in the suite")
        if names and len(names) != len(classnames):
            raise SamergeError(f"task {t.name!r}: {len(classnames)} class names for a dataset with {len(names)} "
                               "classes")
        labels = _to_class_ids(table[t.label_field], names or t.classnames, None, f"task {t.name!r}")
        keep = [i for i, y in enumerate(labels) if y >= 0]
        bad = [labels[i] for i in keep if labels[i] >= len(classnames)]
        if bad:
            raise SamergeError(f"task {t.name!r}: label {bad[0]} but only {len(classnames)} class names")
        root = Path(t.data.path) if t.data.path else None
        base_dir = root.parent if root is not None and root.is_file() else root

        def open_image(v: Any) -> Any:
            try:
                if isinstance(v, dict):
                    if v.get("bytes"):
                        return Image.open(io.BytesIO(v["bytes"])).convert("RGB")
                    v = v.get("path")
                p = Path(str(v))
                if not p.is_absolute() and base_dir:
                    p = base_dir / p
                return Image.open(p).convert("RGB")
            except OSError as exc:
                raise SamergeError(f"task {t.name!r}: cannot read an image ({exc})") from None

        bar = self._bar(len(keep), f"preparing {t.name}")
        pixels: list[torch.Tensor] = []
        for sl in self._batches(len(keep)):
            idx = keep[sl]
            pixels.extend(self._pixels_u8([open_image(table[t.image_field][i]) for i in idx]).unbind(0))
            bar.update(len(idx))
        bar.close()
        return HubTask(t.name, t, pixels, [float(labels[i]) for i in keep], classnames, source)

    # ---------------------------------------------------------------------------------------- heads
    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """CLIP's normalized text embeddings (projection of the pooled end-of-text state), batched and padded."""
        out = []
        for sl in self._batches(len(texts)):
            enc = self.tokenizer(texts[sl], padding=True, truncation=True, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[1]
            emb = self.model.text_projection(pooled)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out).float().cpu()

    def zero_shot_head(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """(classes, dim): per class, the normalized mean of its templates' normalized text embeddings."""
        texts = [p for c in classnames for p in prompts(templates, c)]
        emb = self.text_embeddings(texts).view(len(classnames), len(templates), -1).mean(dim=1)
        return emb / emb.norm(dim=-1, keepdim=True)

    def head(self, task: HubTask) -> torch.Tensor:
        if task.name not in self._heads:
            templates = task.spec.templates or TEMPLATES[task.name]
            self._heads[task.name] = self.zero_shot_head(task.label_names, templates)
        return self._heads[task.name]

    # ---------------------------------------------------------------------------------------- experts
    def expert(self, task: HubTask) -> Expert:
        from transformers import AutoConfig, CLIPModel, CLIPVisionModel

        acq = self._expert_source(task)
        kind = getattr(AutoConfig.from_pretrained(acq.path), "model_type", "")
        if kind == "clip":
            vision = CLIPModel.from_pretrained(acq.path).vision_model
        elif kind == "clip_vision_model":
            vision = CLIPVisionModel.from_pretrained(acq.path)
        else:
            raise SamergeError(f"task {task.name!r}: expert {acq.path} is a {kind or 'unknown'} model; a CLIP "
                               "suite takes clip_vision_model or clip checkpoints")
        core = vision.vision_model if isinstance(getattr(vision, "vision_model", None), torch.nn.Module) else vision
        state = detached_copy({self.PREFIX + k: v.float() for k, v in core.state_dict().items()})
        _check_keys(self.base, state, f"task {task.name!r}: expert {acq.path}")
        return Expert(task, state, {"weight": self.head(task)})

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def image_embeddings(self, state: Mapping[str, torch.Tensor], pixels: list[torch.Tensor]) -> torch.Tensor:
        self.model.vision_model.load_state_dict({k[len(self.PREFIX):]: v for k, v in state.items()})
        out = []
        for sl in self._batches(len(pixels)):
            x = self.normalize(torch.stack(pixels[sl]).to(self.device))
            pooled = self.model.vision_model(pixel_values=x)[1]
            emb = self.model.visual_projection(pooled)
            out.append((emb / emb.norm(dim=-1, keepdim=True)).float().cpu())
        return torch.cat(out)

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, float]:
        """Zero-shot accuracy (or the task's metric) of one vision tower on every expert's task."""
        out = {}
        for e in experts:
            logits = self.image_embeddings(state, e.task.inputs) @ e.head["weight"].t()
            out[e.task.name] = self.score_task(e.task, logits.argmax(-1).tolist())
        return out


class SeqClsSuite(HubSuite):
    """Sequence classification (RoBERTa on GLUE): the encoder is merged, each expert keeps its classifier."""

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        # the base is usually a masked-LM checkpoint: its encoder is read into a classifier (new head dropped)
        model, info = self._load(self.base_dir, num_labels=2)
        self.prefix = model.base_model_prefix + "."
        lost = [k for k in info["missing_keys"] if k.startswith(self.prefix)]
        if lost:
            raise SamergeError(f"suite {self.name}: the base checkpoint lacks encoder tensor {lost[0]!r}")
        self.base = detached_copy({k: v for k, v in model.state_dict().items() if k.startswith(self.prefix)})
        self._configs: dict[str, Any] = {}  # task -> its expert's config
        self._models: dict[int, torch.nn.Module] = {}  # one evaluation model per number of outputs

    @staticmethod
    def _load(path: Path, **kw: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kw)
        return model.float().eval(), info

    def load_task(self, t: TaskSpec) -> HubTask:
        fields = list(t.text_fields or [])
        table, names, source = self._data(t, [*fields, t.label_field])
        regression = t.metric in REGRESSION_METRICS
        raw = table[t.label_field]
        labels = [float(v) for v in raw] if regression else [
            float(v) for v in _to_class_ids(raw, names, None, f"task {t.name!r}")]
        keep = [i for i, y in enumerate(labels) if regression or y >= 0]
        if not keep:
            raise SamergeError(f"task {t.name!r}: the split has no labels (GLUE's test splits are unlabeled: use "
                               "validation)")
        inputs = [tuple(str(table[c][i]) for c in fields) for i in keep]
        return HubTask(t.name, t, inputs, [labels[i] for i in keep], names or [], source)

    def expert(self, task: HubTask) -> Expert:
        acq = self._expert_source(task)
        model, info = self._load(acq.path)
        if info["missing_keys"]:
            raise SamergeError(f"task {task.name!r}: expert {acq.path} lacks {info['missing_keys'][0]!r} (not a "
                               "fine-tuned sequence classifier?)")
        sd = model.state_dict()
        encoder = detached_copy({k: v for k, v in sd.items() if k.startswith(self.prefix)})
        head = detached_copy({k: v for k, v in sd.items() if not k.startswith(self.prefix)})
        _check_keys(self.base, encoder, f"task {task.name!r}: expert {acq.path}")
        outputs = int(model.config.num_labels)
        regression = task.spec.metric in REGRESSION_METRICS
        if regression != (outputs == 1):
            raise SamergeError(f"task {task.name!r}: metric {task.spec.metric!r} but the expert has {outputs} "
                               "output(s) (a regression metric needs exactly 1, classification 2 or more)")
        if not regression and task.labels and max(task.labels) >= outputs:
            raise SamergeError(f"task {task.name!r}: label {int(max(task.labels))} but the expert has {outputs} "
                               "classes")
        self._configs[task.name] = model.config
        return Expert(task, encoder, head)

    def _model(self, task: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        cfg = self._configs[task]
        if cfg.num_labels not in self._models:
            self._models[cfg.num_labels] = AutoModelForSequenceClassification.from_config(cfg).float().eval()
        return self._models[cfg.num_labels].to(self.device)

    @torch.no_grad()
    def predict(self, state: Mapping[str, torch.Tensor], expert: Expert) -> list[float]:
        """Class ids (argmax) or, with one output, the regression value, for each of the task's inputs."""
        model = self._model(expert.task.name)
        model.load_state_dict({**state, **expert.head})
        inputs = expert.task.inputs
        out: list[float] = []
        for sl in self._batches(len(inputs)):
            columns = [list(c) for c in zip(*inputs[sl])]
            enc = self.tokenizer(*columns, truncation=True, max_length=self.spec.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            logits = model(**enc).logits.float()
            out += (logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1).float()).tolist()
        return out

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, float]:
        """Each task's metric with one encoder and that task's expert head."""
        return {e.task.name: self.score_task(e.task, self.predict(state, e)) for e in experts}


class Seq2SeqLoraSuite(HubSuite):
    """Flan-T5 + PEFT LoRA experts: dense experts W0 + s·BA merged; label words generated or scored."""

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(self.base_dir).float().eval().to(self.device)
        self.base = detached_copy({k: v.cpu() for k, v in self.model.state_dict().items()})

    def load_task(self, t: TaskSpec) -> HubTask:
        assert t.prompt is not None
        fields = sorted(set(re.findall(r"{(\w+)}", t.prompt)))
        table, names, source = self._data(t, [*[f for f in fields if f != t.label_field], t.label_field])
        regression = t.metric in REGRESSION_METRICS
        raw = table[t.label_field]
        labels = [float(v) for v in raw] if regression else [
            float(v) for v in _to_class_ids(raw, names, None, f"task {t.name!r}")]
        keep = [i for i, y in enumerate(labels) if regression or y >= 0]
        if not keep:
            raise SamergeError(f"task {t.name!r}: the split has no labels")
        try:
            inputs = [t.prompt.format(**{c: table[c][i] for c in table}) for i in keep]
        except (KeyError, IndexError, ValueError) as exc:
            raise SamergeError(f"task {t.name!r}: prompt does not format with the data's columns ({exc})") from None
        words: list[str] = []
        if t.targets is not None:
            ids = sorted(int(k) for k in t.targets)
            if ids != list(range(len(ids))):
                raise SamergeError(f"task {t.name!r}: targets must map label ids 0..n-1, got {sorted(t.targets)}")
            words = [t.targets[str(i)] for i in ids]
            unknown = sorted({int(labels[i]) for i in keep} - set(ids))
            if unknown:
                raise SamergeError(f"task {t.name!r}: label {unknown[0]} has no target word")
        return HubTask(t.name, t, inputs, [labels[i] for i in keep], words, source)

    def expert(self, task: HubTask) -> Expert:
        acq = self._expert_source(task)
        adapter = load_adapter(acq.path)
        state = dict(self.base)  # untouched tensors are the base's own (no copy; ties kept)
        for mod in adapter.modules.values():
            w0 = self.base.get(mod.base_key)
            if w0 is None:
                raise SamergeError(f"task {task.name!r}: adapter module {mod.name!r} has no weight "
                                   f"{mod.base_key!r} in the base")
            delta = mod.delta(torch.float32)
            if tuple(delta.shape) != tuple(w0.shape):
                raise SamergeError(f"task {task.name!r}: adapter module {mod.name!r} makes a {list(delta.shape)} "
                                   f"update for a {list(w0.shape)} weight")
            state[mod.base_key] = (w0.float() + delta).to(w0.dtype)
        return Expert(task, state, {})

    @torch.no_grad()
    def predict(self, state: Mapping[str, torch.Tensor], task: HubTask) -> list[float]:
        """Class ids (a generation matching no label word is -1) or parsed numbers (unparseable: 0.0)."""
        self.model.load_state_dict(dict(state))
        t = task.spec
        out: list[float] = []
        index = {w.strip(): i for i, w in enumerate(task.label_names)}
        for sl in self._batches(len(task.inputs)):
            enc = self.tokenizer(task.inputs[sl], truncation=True, max_length=self.spec.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            if t.decode == "score":
                out += self._rank(enc, task.label_names)
                continue
            gen = self.model.generate(**enc, max_new_tokens=self.spec.max_new_tokens, do_sample=False, num_beams=1)
            for text in self.tokenizer.batch_decode(gen, skip_special_tokens=True):
                text = text.strip()
                if t.target_format is not None:
                    try:
                        out.append(float(text))
                    except ValueError:
                        out.append(0.0)  # FusionBench's convention for an unparseable STS-B generation
                else:
                    out.append(float(index.get(text, -1)))
        return out

    def _rank(self, enc: Mapping[str, torch.Tensor], words: list[str]) -> list[float]:
        """The label word with the highest log-likelihood (sum over its tokens) for each input."""
        n = enc["input_ids"].shape[0]
        scores = []
        for w in words:
            target = self.tokenizer([w] * n, return_tensors="pt", padding=True)["input_ids"].to(self.device)
            labels = target.masked_fill(target == self.tokenizer.pad_token_id, -100)
            logits = self.model(**enc, labels=labels).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((logp * (labels != -100)).sum(-1))
        return torch.stack(scores, dim=-1).argmax(-1).float().tolist()

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, float]:
        """Each task's metric for one model (the base, an expert, or a merge)."""
        return {e.task.name: self.score_task(e.task, self.predict(state, e.task)) for e in experts}


_KINDS: dict[str, type[HubSuite]] = {"clip": ClipSuite, "seq-cls": SeqClsSuite, "seq2seq-lora": Seq2SeqLoraSuite}


def load_hub_suite(suite: str, size: str, seed: int = 0, progress: bool = False,
                   tasks: Sequence[str] | None = None, add_tasks: Mapping[str, str] | None = None,
                   device: str = "auto") -> tuple[HubSuite, list[HubTask]]:
    """The suite object and its tasks' data, for :func:`samerge.evaluation.report.run_report`.

    ``suite`` is a built-in name (:data:`HUB_SUITES`) or a suite file; ``tasks`` selects a subset by name.
    Hub suites take new tasks through a suite file, not ``add_tasks`` (a task needs its published expert).
    """
    if add_tasks:
        raise SamergeError("--add-task fine-tunes an expert, which hub suites do not do; add the task (with its "
                           "expert) to a suite file and pass --suite FILE.yaml")
    spec = builtin_spec(suite) if suite in HUB_SUITES else load_spec_file(suite)
    if size not in SIZES:
        raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
    by_name = {t.name: t for t in spec.tasks}
    names = list(tasks) if tasks else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SamergeError(f"unknown {spec.name} task {unknown[0]!r}; tasks: {', '.join(by_name)}")
    lacking = [n for n in names if by_name[n].expert is None]
    if lacking:
        raise SamergeError(f"suite {spec.name}: task {lacking[0]!r} names no expert (no published set is pinned "
                           f"here); write the suite with samerge.evaluation.hub.write_spec({spec.name!r}, "
                           "'suite.yaml'), add each task's expert {repo, revision} and pass --suite suite.yaml")
    st = _KINDS[spec.kind](spec, size, seed, progress, device)
    return st, [st.load_task(by_name[n]) for n in names]
