"""The pipeline's stages: ONE function per stage, called alike by the CLI (`samerge stage NAME`), `dvc.yaml` and the
Prefect tasks in ``tasks/``. Stages exchange paths under ``WORKDIR/work/``, never tensors:

=========  ======================================  ==============================================================
stage      reads                                   writes
=========  ======================================  ==============================================================
acquire    the suite (or an expert registry)        ``work/acquire/``: base, experts (+ heads, task.json), manifest
extract    ``work/acquire``                         ``work/extract/``: task vectors, norms and cosines, heat map
score      ``work/acquire``, ``work/extract``       ``work/score/``: saliency statistics at t = 1, scatter plot
prune      ``work/acquire``                         ``work/prune/METHOD/``: merged model + card, SA iterations
search     ``work/acquire`` (validation splits)     ``work/search/``: the validation-selected merge + recipe, trials,
                                                   history and importance plots (study: ``work/search-study.db``)
evaluate   ``work/acquire``, ``work/prune``,        ``work/evaluate/``: per-task scores of base, experts, merges
           ``work/search``
report     everything above                        ``work/report/``: report.csv/md, plots; MLflow (``tracking``)
=========  ======================================  ==============================================================

Every stage publishes its output folder atomically (built in a hidden sibling, then renamed into place), so an
interrupted stage leaves the previous complete output or none, never a half-written one. Each output folder holds a
``stage.json`` (parameters, timing, versions) that the MLflow tracking reads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

import samerge
from samerge.api import merge_checkpoints
from samerge.engine import check_derived, plan_merge
from samerge.errors import SamergeError
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.report import write_report
from samerge.evaluation.search import Evaluator, parse_space, run_search, study_key
from samerge.evaluation.scoring import ROW_FIELDS, row_cells, score_models
from samerge.evaluation.suite import Expert, Suite, base_metadata
from samerge.io import open_checkpoint, SafetensorsSink, save_safetensors, sha256_file
from samerge.io.safetensors_format import PlannedTensor
from samerge.io.writer import publish_dir
from samerge.layout import (MANIFEST, SEARCH, STAGES, STUDY, Layout, read_iterations, read_manifest, read_rows,
                            read_search_summary)
from samerge.params import AcquireParams, PipelineParams, load_params
from samerge.saliency import saliency
from samerge.tracking import PENDING, track_pipeline

# the base's config and tokenizer files (work/acquire/hf/), copied next to every merge by the prune stage so that
# work/prune/METHOD/model is a complete Hugging Face folder (from_pretrained, MLflow's transformers flavour)
HF_FILES = "hf"
HF_SIDECARS = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                         "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                         "chat_template.json", "preprocessor_config.json"})

# ------------------------------------------------------------------------------------------------ helpers


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _stage_record(out: Path, stage: str, params: Any, t0: float, **extra: Any) -> None:
    _write_json(out / "stage.json", {
        "stage": stage, "params": params, "seconds": round(time.perf_counter() - t0, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "samerge": samerge.__version__,
        "torch": torch.__version__, **extra})


def _numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """A stage's metrics for `dvc metrics show`: the summary's numbers only (its strings, lists and copies of the
    parameters stay in summary.json)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _task_spec(task: Any, suite: str, size: str, seed: int, path: str | None) -> dict[str, Any]:
    return {"name": task.name, "kind": "file" if path else "builtin", "path": path, "suite": suite, "size": size,
            "seed": seed, "labels": list(task.labels), "source": task.source}


def manifest_suite(manifest: Mapping[str, Any], progress: bool = False, device: str = "auto") -> tuple[Suite, list[Any]]:
    """The suite object and the task data of the experts a manifest lists (deterministic from the specs);
    ``device``: where the suite scores (see :class:`~samerge.params.EvaluateParams`)."""
    specs = [e["task"] for e in manifest["experts"]]
    builtin = [s["name"] for s in specs if s["kind"] == "builtin"]
    files = {s["name"]: s["path"] for s in specs if s["kind"] == "file"}
    st, data = open_suite(manifest["suite"], manifest["size"], manifest["seed"], tasks=builtin or None,
                          add_tasks=files, progress=progress, device=device)
    by = {t.name: t for t in data}  # with no built-in task named, open_suite loads them all: keep the listed ones
    return st, [by[s["name"]] for s in specs]


# ------------------------------------------------------------------------------------------------ acquire


def acquire(params: PipelineParams, layout: Layout, *, quiet: bool = False,
            inputs: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Fine-tune (or load cached) experts of the suite, or take them from a registry; write base + experts.

    ``inputs``: a folder every file the user names (``experts_dir``, ``add_tasks``) must lie in; dvc.yaml passes
    the folder it declares as this stage's dependency, so a new expert or an edited task file re-runs the pipeline
    from here instead of leaving it silently up to date.
    """
    t0 = time.perf_counter()
    p = params.acquire
    if inputs is not None:
        _check_inputs(p, Path(inputs))
    with publish_dir(layout.stage("acquire")) as out:
        (out / "experts").mkdir()
        if p.experts_dir:
            manifest = _acquire_registry(Path(p.experts_dir), out, quiet)
        else:
            st, data = open_suite(p.suite, p.size, p.seed, tasks=p.tasks or None, add_tasks=p.add_tasks,
                                  progress=not quiet)
            save_safetensors(st.base, out / "base.safetensors", metadata=base_metadata(st))
            if st.model_dir is not None:  # the base is a whole transformers model: its config and tokenizer
                (out / HF_FILES).mkdir()
                for f in sorted(st.model_dir.iterdir()):
                    if f.name in HF_SIDECARS and f.is_file():
                        shutil.copy2(f, out / HF_FILES / f.name)
            experts = []
            for task in data:
                _say(f"acquire: expert for task {task.name}", quiet)
                e = st.expert(task)
                d = out / "experts" / task.name
                d.mkdir()
                save_safetensors(e.encoder, d / "expert.safetensors", metadata={"samerge.task": task.name})
                save_safetensors(e.head, d / "head.safetensors")
                path = str(Path(p.add_tasks[task.name]).resolve()) if task.name in p.add_tasks else None
                spec = _task_spec(task, p.suite, p.size, p.seed, path)
                _write_json(d / "task.json", spec)
                experts.append({"name": task.name, "task": spec})
            manifest = {"suite": p.suite, "size": p.size, "seed": p.seed, "exclude": list(st.exclude),
                        "experts": experts}
        _write_json(out / MANIFEST, manifest)
        _stage_record(out, "acquire", p.model_dump(), t0, experts=[e["name"] for e in manifest["experts"]])
    _say(f"acquire: {len(manifest['experts'])} experts of suite {manifest['suite']} in {layout.stage('acquire')}", quiet)
    return {"out": str(layout.stage("acquire")), "experts": [e["name"] for e in manifest["experts"]]}


def _check_inputs(p: AcquireParams, inputs: Path) -> None:
    named = [("acquire.experts_dir", p.experts_dir)] if p.experts_dir else []
    named += [(f"acquire.add_tasks.{n}", path) for n, path in p.add_tasks.items()]
    root = inputs.resolve()
    for where, path in named:
        if not Path(path).resolve().is_relative_to(root):
            raise SamergeError(f"{where} = {path} is outside {inputs}/, the folder dvc.yaml declares as the acquire "
                               f"stage's input: dvc would not re-run the pipeline when it changes; move it under "
                               f"{inputs}/ (or run `samerge stage acquire` without --inputs)")


def _acquire_registry(reg: Path, out: Path, quiet: bool) -> dict[str, Any]:
    manifest = read_registry(reg)
    for e in manifest["experts"]:
        d = out / "experts" / e["name"]
        d.mkdir()
        for f in ("expert.safetensors", "head.safetensors", "task.json"):
            _link_or_copy(reg / "experts" / e["name"] / f, d / f)
    _link_or_copy(reg / "base.safetensors", out / "base.safetensors")
    _say(f"acquire: {len(manifest['experts'])} experts from registry {reg}", quiet)
    return manifest


def read_registry(reg: Path) -> dict[str, Any]:
    """The manifest of an expert registry (its experts are the sub-folders of ``experts/``, sorted by name)."""
    if not (reg / MANIFEST).is_file() or not (reg / "base.safetensors").is_file():
        raise SamergeError(f"{reg}: not an expert registry (no {MANIFEST} or base.safetensors); create one with "
                           "`samerge experts init --registry DIR --suite SUITE`")
    manifest = json.loads((reg / MANIFEST).read_text(encoding="utf-8"))
    experts = []
    for d in sorted((reg / "experts").iterdir()) if (reg / "experts").is_dir() else []:
        if d.name.startswith("."):
            continue  # an expert being added (published atomically by rename)
        missing = [f for f in ("expert.safetensors", "head.safetensors", "task.json") if not (d / f).is_file()]
        if missing:
            raise SamergeError(f"{d}: incomplete expert (missing {', '.join(missing)})")
        spec = json.loads((d / "task.json").read_text(encoding="utf-8"))
        if spec.get("suite") != manifest["suite"]:
            raise SamergeError(f"{d}: expert of suite {spec.get('suite')!r}, registry is for {manifest['suite']!r}")
        experts.append({"name": d.name, "task": spec})
    if not experts:
        raise SamergeError(f"{reg}: the registry has no experts yet (`samerge experts add`)")
    return {**manifest, "experts": experts}


# ------------------------------------------------------------------------------------------------ extract


def _open_inputs(acq: Path) -> tuple[Any, list[Any], dict[str, Any]]:
    manifest = read_manifest(acq)
    base = open_checkpoint(acq / "base.safetensors")
    experts = [open_checkpoint(acq / "experts" / e["name"] / "expert.safetensors") for e in manifest["experts"]]
    return base, experts, manifest


def extract(params: PipelineParams, layout: Layout, *, quiet: bool = False) -> dict[str, Any]:
    """Task vectors tau = expert - base (streamed tensor by tensor), their norms and pairwise cosines."""
    t0 = time.perf_counter()
    base, experts, manifest = _open_inputs(layout.stage("acquire"))
    names = [e["name"] for e in manifest["experts"]]
    try:
        plan = plan_merge(base, experts, manifest.get("exclude", ()))
        keys = [k for k in plan.keys if k in plan.merged_keys]
        n = len(experts)
        gram = torch.zeros(n, n, dtype=torch.float64)
        base_sq = 0.0
        with publish_dir(layout.stage("extract")) as out:
            (out / "task_vectors").mkdir()
            sinks = [SafetensorsSink(out / "task_vectors" / f"{nm}.safetensors",
                                     [PlannedTensor(k, plan.compute_dtypes[k], plan.shapes[k]) for k in keys],
                                     metadata={"samerge.role": "task_vector", "samerge.expert": nm})
                     for nm in names]
            for key in keys:
                b = base[key].to(plan.compute_dtypes[key])
                if not torch.isfinite(b).all():
                    raise SamergeError(f"base tensor {key!r} has NaN or Inf values")
                base_sq += float(b.double().pow(2).sum())
                taus = []
                for i, e in enumerate(experts):
                    tau = e[key].to(plan.compute_dtypes[key]) - b
                    if not torch.isfinite(tau).all():
                        raise SamergeError(f"expert {names[i]!r}: tensor {key!r} has NaN or Inf values")
                    sinks[i].write(key, tau)
                    taus.append(tau.reshape(-1).double())
                t = torch.stack(taus)
                gram += t @ t.T
            for s in sinks:
                s.finish()
            norms = gram.diag().sqrt()
            rel = (norms / math.sqrt(base_sq)).tolist() if base_sq > 0 else [math.inf] * n
            for nm, r in zip(names, rel):
                check_derived(f"expert {nm!r}", r, params.extract.force, to_force="set extract.force: true")
            cos = (gram / torch.outer(norms, norms).clamp_min(1e-300)).tolist()
            summary = {"experts": {nm: {"norm": float(norms[i]), "relative_norm": rel[i]} for i, nm in enumerate(names)},
                       "mean_relative_norm": sum(rel) / n,
                       "mean_pairwise_cosine": (sum(cos[i][j] for i in range(n) for j in range(n) if i != j)
                                                / (n * (n - 1))) if n > 1 else 1.0}
            _write_json(out / "summary.json", summary)
            with open(out / "cosine.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["expert", *names])
                for i, nm in enumerate(names):
                    w.writerow([nm, *(f"{c:.6f}" for c in cos[i])])
            _cosine_plot(out / "task_vector_cosine.png", names, cos)
            _stage_record(out, "extract", params.extract.model_dump(), t0, tensors=len(keys))
    finally:
        base.close()
        for e in experts:
            e.close()
    _say(f"extract: {len(names)} task vectors over {len(keys)} tensors; mean ||tau||/||base|| "
         f"{summary['mean_relative_norm']:.4f}, mean cosine {summary['mean_pairwise_cosine']:.3f}", quiet)
    return {"out": str(layout.stage("extract")), **summary}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cosine_plot(path: Path, names: list[str], cos: list[list[float]]) -> None:
    plt = _plt()
    side = max(3.6, 1.6 + 0.7 * len(names))
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    im = ax.imshow(cos, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cos[i][j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("cosine between task vectors")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ score


class _BasePlusTau(Mapping[str, torch.Tensor]):
    """An expert seen through its task vector: base[k] + tau[k] on the task vector's keys, base elsewhere."""

    def __init__(self, base: Any, tau: Any) -> None:
        self.base, self.tau = base, tau
        self.config = getattr(base, "config", None)

    def __getitem__(self, key: str) -> torch.Tensor:
        b = self.base[key]
        if key in self.tau:
            t = self.tau[key]
            return (b.to(t.dtype) + t).to(b.dtype)
        return b

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def score(params: PipelineParams, layout: Layout, *, quiet: bool = False) -> dict[str, Any]:
    """SA-Merging saliency at t = 1: per-tensor statistics and a saliency-vs-magnitude scatter."""
    t0 = time.perf_counter()
    acq, ext = layout.stage("acquire"), layout.stage("extract")
    manifest = read_manifest(acq)
    if not (ext / "summary.json").is_file():
        raise SamergeError(f"{ext}: no task vectors; run the extract stage first (`samerge stage extract`)")
    names = [e["name"] for e in manifest["experts"]]
    sp, sa = params.score, params.prune.sa_merging
    base = open_checkpoint(acq / "base.safetensors")
    taus = [open_checkpoint(ext / "task_vectors" / f"{nm}.safetensors") for nm in names]
    samples: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    try:
        rows = saliency(base, [_BasePlusTau(base, t) for t in taus], saliency_sign=sa.saliency_sign,
                        qk_rule=sa.qk_rule, graph=sa.graph, sample=sp.sample, samples=samples,
                        exclude=manifest.get("exclude", ()), device=sp.device)
    finally:
        base.close()
        for t in taus:
            t.close()
    with publish_dir(layout.stage("score")) as out:
        with open(out / "saliency.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tensor", "expert", "numel", "nonzero", "negative", "spearman_abs_tau", "spearman_abs_merged"])
            for r in rows:
                name = r.key if r.rows is None else f"{r.key}[{r.rows[0]}:{r.rows[1]}]"
                w.writerow([name, names[r.expert], r.numel, f"{r.nonzero:.6f}", f"{r.negative:.6f}",
                            f"{r.spearman_abs_tau:.6f}", f"{r.spearman_abs_merged:.6f}"])

        def mean(vals: list[float]) -> float:
            vals = [v for v in vals if not math.isnan(v)]
            return sum(vals) / len(vals) if vals else float("nan")

        summary = {"units": len(rows) // max(1, len(names)),
                   "spearman_saliency_vs_abs_tau": mean([r.spearman_abs_tau for r in rows]),
                   "spearman_abs_saliency_vs_abs_merged": mean([r.spearman_abs_merged for r in rows]),
                   "negative_fraction": mean([r.negative for r in rows]),
                   "saliency_sign": sa.saliency_sign}
        _write_json(out / "summary.json", summary)
        _write_json(out / "metrics.json", _numbers(summary))
        _saliency_plot(out / "saliency_vs_magnitude.png", samples, names, sa.saliency_sign)
        _stage_record(out, "score", {**sp.model_dump(), "saliency_sign": sa.saliency_sign, "qk_rule": sa.qk_rule,
                                     "graph": sa.graph}, t0)
    _say(f"score: {summary['units']} mask units; Spearman(S, |tau|) {summary['spearman_saliency_vs_abs_tau']:.3f}, "
         f"Spearman(|S|, |sum tau|) {summary['spearman_abs_saliency_vs_abs_merged']:.3f}", quiet)
    return {"out": str(layout.stage("score")), **summary}


def _saliency_plot(path: Path, samples: list[tuple[str, int, torch.Tensor, torch.Tensor]], names: list[str],
                   sign: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False, sharey=True)
    for n, nm in enumerate(names):
        ax = axes[0][n]
        xs, ys, cs = [], [], []
        for _key, e, tau, s in samples:
            if e != n or tau.numel() == 0:
                continue
            # per-tensor normalisation: masks are per tensor, so only ranks within a tensor matter
            t = tau.abs() / tau.abs().max().clamp_min(1e-30)
            v = s / s.abs().max().clamp_min(1e-30)
            xs.append(t)
            ys.append(v.abs())
            cs.append(v < 0)
        if xs:
            x, y, neg = torch.cat(xs), torch.cat(ys), torch.cat(cs)
            ok = (x > 0) & (y > 0)
            ax.scatter(x[ok & neg], y[ok & neg], s=1, alpha=0.15, label="S < 0 (conflict)", color="tab:red",
                       rasterized=True)
            ax.scatter(x[ok & ~neg], y[ok & ~neg], s=1, alpha=0.15, label="S > 0", color="tab:blue",
                       rasterized=True)
            ax.set(xscale="log", yscale="log")
        ax.set_title(f"{nm} ({float(neg.float().mean()) if xs else 0.0:.0%} of S < 0)", fontsize=9)
        ax.set_xlabel("|tau| / max per tensor")
    axes[0][0].set_ylabel(f"|S| / max per tensor ({sign})")
    axes[0][0].legend(fontsize=6, markerscale=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ prune


def _merge_into(out: Path, params: PipelineParams, layout: Layout, method: str, mp: Mapping[str, Any],
                quiet: bool) -> Any:
    """Merge the acquired experts with ``method`` and ``mp`` into ``out``/model, a complete Hugging Face folder
    where the base is one; the MergeReport."""
    acq = layout.stage("acquire")
    manifest = read_manifest(acq)
    experts = [acq / "experts" / e["name"] / "expert.safetensors" for e in manifest["experts"]]
    rep = merge_checkpoints(acq / "base.safetensors", experts, out / "model", method, params=dict(mp),
                            exclude=manifest.get("exclude", ()), force=params.extract.force,
                            progress=not quiet, max_memory=params.prune.max_memory, device=params.prune.device)
    # merged from base.safetensors (its metadata carries the config the suite report merges with: base_input); the
    # base's config and tokenizer files join the weights afterwards, so the folder loads with from_pretrained
    hf = acq / HF_FILES
    for f in sorted(hf.iterdir()) if hf.is_dir() else []:
        shutil.copy2(f, out / "model" / f.name)
    return rep


def prune(params: PipelineParams, layout: Layout, method: str, *, quiet: bool = False) -> dict[str, Any]:
    """Merge the experts with ``method`` (SA-Merging: the iterative pruning loop) into ``work/prune/METHOD/``."""
    if method not in params.prune.methods:
        raise SamergeError(f"method {method!r} is not in prune.methods ({', '.join(params.prune.methods)})")
    t0 = time.perf_counter()
    manifest = read_manifest(layout.stage("acquire"))
    mp = params.prune.method_params(method)
    with publish_dir(layout.merged(method)) as out:
        rep = _merge_into(out, params, layout, method, mp, quiet)
        with open(out / "iterations.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["iteration", "density", "norm_ratio", "conflict"])
            w.writerow([0, "1.0", "1.0", ""])
            for h in rep.history:
                w.writerow([h.iteration, f"{h.overall_density:.6f}", f"{h.norm_ratio:.6f}", f"{h.conflict:.6f}"])
        summary = {"method": method, "params": rep.params, "seconds": round(rep.seconds, 3),
                   "relative_norms": rep.relative_norms, "merged_tensors": rep.merged_tensors,
                   "copied_tensors": rep.copied_tensors, "device": rep.device, "recipe": rep.recipe}
        if rep.history:
            last = rep.history[-1]
            summary.update(final_density=last.overall_density, final_norm_ratio=last.norm_ratio,
                           final_conflict=last.conflict, iterations=len(rep.history))
        _write_json(out / "summary.json", summary)
        _write_json(out / "metrics.json", _numbers(summary))
        _stage_record(out, "prune", {"method": method, **mp}, t0, experts=[e["name"] for e in manifest["experts"]])
    _say(f"prune: {method} merged {len(manifest['experts'])} experts in {rep.seconds:.1f} s -> "
         f"{layout.merged(method)}", quiet)
    return {"out": str(layout.merged(method)), "method": method, "seconds": rep.seconds}


# ------------------------------------------------------------------------------------------------ search

DATA_FREE, SELECTED = "data-free", "validation-selected"  # the two kinds of merge a report row can be


def _acquired_experts(layout: Layout, manifest: Mapping[str, Any], data: list[Any]) -> list[Expert]:
    acq = layout.stage("acquire")
    out = []
    for e, task in zip(manifest["experts"], data):
        d = acq / "experts" / e["name"]
        out.append(Expert(task, _state(d / "expert.safetensors"), _state(d / "head.safetensors")))
    return out


def _no_validation(data: list[Any]) -> str | None:
    """Why the tasks cannot guide a search (a task without validation examples), or None."""
    missing = [t.name for t in data if not getattr(t, "val", None)]
    return f"task {missing[0]!r} has no validation split" if missing else None


def search_evaluator(layout: Layout, *, progress: bool = False, device: str = "auto") -> Any:
    """The search's :class:`~samerge.evaluation.search.Evaluator` of the acquired experts: their suite's scoring on
    the validation split, merging from the acquired base (a registry's base is not the suite's). Prefect trial tasks
    on other workers rebuild it from the same files."""
    manifest = read_manifest(layout.stage("acquire"))
    return _evaluator(layout, manifest, *manifest_suite(manifest, progress=progress, device=device))


def _evaluator(layout: Layout, manifest: Mapping[str, Any], st: Suite, data: list[Any]) -> Any:
    st.base = _state(layout.stage("acquire") / "base.safetensors")
    return Evaluator.build(st, _acquired_experts(layout, manifest, data))


def search(params: PipelineParams, layout: Layout, *, quiet: bool = False,
           map_trials: Any = None) -> dict[str, Any]:
    """The validation-guided merge (``search`` section): an Optuna study over ``search.space`` scored on every task's
    validation split, then the best trial's merge written to ``work/search/model`` with its recipe, the trials,
    the history and importance plots. Without validation data (or ``search.enabled: false``) the merge is the
    data-free ``search.fallback`` with its ``prune`` section's parameters, labelled so. The study lives in
    ``work/search-study.db``: an interrupted search continues where it stopped. ``map_trials``: runs a batch of
    trials elsewhere (the Prefect flow's trial tasks); by default here, ``search.n_jobs`` at a time."""
    t0 = time.perf_counter()
    sp = params.search
    acq = layout.stage("acquire")
    manifest = read_manifest(acq)
    why = None if sp.enabled else "search.enabled is false"
    if why is None:  # the suite is opened once: its tasks say whether there is validation data
        st, data = manifest_suite(manifest, progress=not quiet, device=params.evaluate.device)
        why = _no_validation(data)
    found: dict[str, Any] = {}
    with publish_dir(layout.stage("search")) as out:
        if why is None:
            evaluator = _evaluator(layout, manifest, st, data)
            space = parse_space(sp.space, n_experts=len(manifest["experts"]))
            # the files' contents too: an expert replaced under the same name is a new search, not the old study
            files = [acq / "base.safetensors", *(acq / "experts" / e["name"] / f for e in manifest["experts"]
                                                for f in ("expert.safetensors", "head.safetensors"))]
            fingerprint = json.dumps({"experts": manifest["experts"], "suite": manifest["suite"],
                                      "size": manifest["size"], "seed": manifest["seed"],
                                      "files": {str(f.relative_to(acq)): sha256_file(f) for f in files},
                                      "samerge": samerge.__version__}, sort_keys=True)
            res = run_search(evaluator, space, n_trials=sp.n_trials, timeout=sp.timeout, seed=sp.seed,
                             batch=sp.batch, n_jobs=sp.n_jobs, storage=layout.work / STUDY,
                             study_name=study_key(space, sp.seed, sp.batch, fingerprint,
                                                  warmup_tasks=sp.warmup_tasks, startup_trials=sp.startup_trials,
                                                  start=sp.start),
                             warmup_tasks=sp.warmup_tasks, startup_trials=sp.startup_trials, progress=not quiet,
                             start=sp.start, map_trials=map_trials)
            res.write_outputs(out)
            if res.best is None:
                errors = [r["error"] for r in res.trials if r["error"]]
                raise SamergeError(f"search: no trial completed ({len(res.trials)} finished"
                                   + (f"; first error: {errors[0]}" if errors else "") + "); change search.space")
            method, mp = res.best.method, dict(res.best.params)
            found = {"kind": SELECTED, "validation_score": res.best.value, "best_trial": res.best.number,
                     "trials": len(res.trials)}
        else:
            method, mp = sp.fallback, params.prune.method_params(sp.fallback)
            found = {"kind": DATA_FREE, "skipped": why}
        rep = _merge_into(out, params, layout, method, mp, quiet)
        (out / "recipe.yaml").write_text(yaml.safe_dump(rep.recipe, sort_keys=False, width=1000), encoding="utf-8")
        summary = {**found, "method": method, "params": rep.params, "merge_seconds": round(rep.seconds, 3),
                   "recipe": rep.recipe}
        _write_json(out / "summary.json", summary)
        _write_json(out / "metrics.json", _numbers(summary))
        _stage_record(out, "search", sp.model_dump(), t0)
    if why is None:
        _say(f"search: {found['trials']} trials; best #{found['best_trial']} {method} validation "
             f"{found['validation_score']:.3f} -> {layout.stage('search')}", quiet)
    else:
        _say(f"search: skipped ({why}); the data-free {method} merge -> {layout.stage('search')}", quiet)
    return {"out": str(layout.stage("search")), "method": method, **found}


# ------------------------------------------------------------------------------------------------ evaluate


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k] for k in ck.keys()}


def evaluate(params: PipelineParams, layout: Layout, *, quiet: bool = False) -> dict[str, Any]:
    """Score the base, every expert on its task, and every merged model on every task."""
    t0 = time.perf_counter()
    acq = layout.stage("acquire")
    manifest = read_manifest(acq)
    st, data = manifest_suite(manifest, progress=not quiet, device=params.evaluate.device)
    missing = [m for m in params.prune.methods if not (layout.merged(m) / "model").exists()]
    if missing:
        raise SamergeError(f"no merged model for {', '.join(missing)}; run `samerge stage prune --method "
                           f"{missing[0]}` first")
    searched = layout.stage("search") / "model"
    if not searched.is_dir():
        raise SamergeError("no search merge; run `samerge stage search` first")
    experts = _acquired_experts(layout, manifest, data)
    models = {m: partial(_state, layout.merged(m) / "model") for m in params.prune.methods}
    models[SEARCH] = partial(_state, searched)
    rows = score_models(st, experts, models, label=manifest["suite"], split=params.evaluate.split,
                        base=partial(_state, acq / "base.safetensors"), say=lambda m: _say(f"evaluate: {m}", quiet))
    with publish_dir(layout.stage("evaluate")) as out:
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow(row_cells(r, 6))
        metrics = {r["method"]: {} for r in rows}
        for r in rows:
            metrics[r["method"]][r["task"]] = round(r["score"], 6)
            if r["task"] == "average":
                metrics[r["method"]]["normalized_average"] = round(r["normalized"], 6)
        _write_json(out / "metrics.json", metrics)
        with open(out / "per_task.csv", "w", newline="") as f:  # long form for `dvc plots` bars
            w = csv.writer(f)
            w.writerow(["method_task", "method", "task", "normalized"])
            for r in rows:
                if r["method"] not in ("base", "expert"):
                    w.writerow([f"{r['method']}:{r['task']}", r["method"], r["task"], f"{r['normalized']:.6f}"])
        _stage_record(out, "evaluate", params.evaluate.model_dump(), t0, methods=params.prune.methods)
    avg = {r["method"]: r["normalized"] for r in rows if r["task"] == "average"}
    _say("evaluate: normalized average " + ", ".join(f"{m} {v:.3f}" for m, v in avg.items()), quiet)
    return {"out": str(layout.stage("evaluate")), "normalized_average": avg}


# ------------------------------------------------------------------------------------------------ report


def report(params: PipelineParams, layout: Layout, *, quiet: bool = False, resend: bool = False) -> dict[str, Any]:
    """report.csv / report.md / plots from the evaluation; then the MLflow record of the whole pipeline.

    ``resend``: only the MLflow record, of the report already written (after the tracking server was unreachable).
    """
    if resend:
        return _resend(params, layout, quiet)
    t0 = time.perf_counter()
    ev = layout.stage("evaluate")
    if not (ev / "scores.csv").is_file():
        raise SamergeError(f"{ev}: no scores; run the evaluate stage first (`samerge stage evaluate`)")
    rows = read_rows(ev / "scores.csv")
    histories = {m: h for m in params.prune.methods if (h := read_iterations(layout.merged(m) / "iterations.csv"))}
    found = read_search_summary(layout)
    kinds = {m: DATA_FREE for m in params.prune.methods}
    recipes = {m: _recipe(layout.merged(m)) for m in params.prune.methods}
    notes = {}
    if found is not None:
        kinds[SEARCH] = found["kind"]
        recipes[SEARCH] = found.get("recipe")
        notes[SEARCH] = (f"The search's choice: trial #{found['best_trial']} of {found['trials']}, {found['method']}, "
                         f"mean normalized validation score {found['validation_score']:.4f}."
                         if found["kind"] == SELECTED else
                         f"No search ({found['skipped']}): the data-free {found['method']} merge.")
    with publish_dir(layout.stage("report")) as out:
        write_report(rows, out, histories, recipes=recipes, notes=notes, kinds=kinds,
                     search=layout.stage("search") if found is not None and found["kind"] == SELECTED else None)
        avg = {r["method"]: r["normalized"] for r in rows if r["task"] == "average"}
        best = max((m for m in avg if m not in ("base", "expert")), key=lambda m: avg[m])
        _write_json(out / "summary.json", {"best_method": best, "best_normalized_average": avg[best],
                                           "normalized_average": avg})
        _stage_record(out, "report", params.report.model_dump(), t0)
    result: dict[str, Any] = {"out": str(layout.stage("report")), "best_method": best}
    if params.report.track:
        tracked = track_pipeline(params, layout)
        result["mlflow"] = tracked
        _say(f"report: MLflow run {tracked['run_id']} at {tracked['tracking_uri']}"
             + (f"; registered {tracked['model_name']} v{tracked['version']}"
                + (" (champion)" if tracked.get("champion") else "") if tracked.get("version") else ""), quiet)
    _say(f"report: {layout.stage('report') / 'report.md'} (best: {best}, normalized {avg[best]:.3f})", quiet)
    return result


def _recipe(stage_dir: Path) -> dict[str, Any] | None:
    """The ``samerge merge --config`` mapping of a stage's merge (as the merge recorded it in the stage's summary),
    for report.html; None when that merge left no summary."""
    summary = stage_dir / "summary.json"
    return json.loads(summary.read_text(encoding="utf-8")).get("recipe") if summary.is_file() else None


def _resend(params: PipelineParams, layout: Layout, quiet: bool) -> dict[str, Any]:
    summary = layout.stage("report") / "summary.json"
    if not summary.is_file():
        raise SamergeError(f"{summary.parent}: no report to send; run the report stage first (`samerge stage report`)")
    if not params.report.track:
        raise SamergeError("report.track is false: nothing is sent to MLflow")
    tracked = track_pipeline(params, layout)
    (layout.stage("report") / PENDING).unlink(missing_ok=True)
    _say(f"report: sent as MLflow run {tracked['run_id']} at {tracked['tracking_uri']}", quiet)
    return {"out": str(layout.stage("report")), "best_method": json.loads(summary.read_text())["best_method"],
            "mlflow": tracked}


# ------------------------------------------------------------------------------------------------ entry points


def run_stage(stage: str, params_path: str | os.PathLike[str] | None = "params.yaml",
              workdir: str | os.PathLike[str] = ".", *, method: str | None = None,
              overrides: dict[str, Any] | None = None, quiet: bool = False, resend: bool = False,
              inputs: str | os.PathLike[str] | None = None, map_trials: Any = None) -> dict[str, Any]:
    """Run one stage by name: the single entry point of the CLI, dvc.yaml and the Prefect tasks. ``resend``
    (report only): send the report already written to MLflow. ``inputs`` (acquire only): the folder the user's
    files must lie in (see :func:`acquire`). ``map_trials`` (search only): runs each batch of trials elsewhere
    (see :func:`search`)."""
    if stage not in STAGES:
        raise SamergeError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_path, overrides)
    layout = Layout(workdir)
    if stage == "prune":
        if method is None:
            raise SamergeError(f"the prune stage needs --method (one of {', '.join(params.prune.methods)})")
        return prune(params, layout, method, quiet=quiet)
    if method is not None:
        raise SamergeError(f"--method applies to the prune stage only, not {stage}")
    if inputs is not None and stage != "acquire":
        raise SamergeError(f"--inputs applies to the acquire stage only, not {stage}")
    if stage == "acquire":
        return acquire(params, layout, quiet=quiet, inputs=inputs)
    if stage == "report":
        return report(params, layout, quiet=quiet, resend=resend)
    if resend:
        raise SamergeError(f"--resend applies to the report stage only, not {stage}")
    if stage == "search":
        return search(params, layout, quiet=quiet, map_trials=map_trials)
    fn = {"extract": extract, "score": score, "evaluate": evaluate}[stage]
    return fn(params, layout, quiet=quiet)


def run_pipeline(params_path: str | os.PathLike[str] | None = "params.yaml", workdir: str | os.PathLike[str] = ".",
                 *, overrides: dict[str, Any] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Every stage in order, in this process (DVC and Prefect run the same functions stage by stage)."""
    params = load_params(params_path, overrides)
    out: dict[str, Any] = {}
    for stage in STAGES:
        if stage == "prune":
            out[stage] = {m: run_stage(stage, params_path, workdir, method=m, overrides=overrides, quiet=quiet)
                          for m in params.prune.methods}
        else:
            out[stage] = run_stage(stage, params_path, workdir, overrides=overrides, quiet=quiet)
    return out
