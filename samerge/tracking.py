"""MLflow record of one pipeline execution (imported only by callers that track: the report stage).

One parent run per execution, one nested child run per stage (named exactly like the stage), holding that stage's
parameters, timing, metrics (SA-Merging's per-iteration density / norm ratio / conflicts with ``step`` = iteration)
and plots. The registered method's merged model is logged as an MLflow model of the ``prune`` child run (the
``transformers`` flavour where it is a complete Hugging Face folder, else a models-from-code pyfunc: see
:func:`log_merged_model`) and registered as a new version of ``samerge-<suite>``; the alias ``champion`` moves to it
only when its suite average of normalized scores beats the current champion's (stored as a version tag).

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it, a SQLite store ``mlflow.db`` in the work root.
"""

from __future__ import annotations

import csv
import json
import os
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from samerge.errors import SamergeError
from samerge.io.writer import write_text_atomic
from samerge.layout import (SEARCH, STAGES, Layout, read_iterations, read_manifest, read_rows,
                            read_search_summary)
from samerge.params import PipelineParams

CHAMPION = "champion"
SCORE_TAG = "samerge.normalized_average"
VALIDATION_TAG = "samerge.validation_score"  # the search's mean normalized validation score of a registered merge
PENDING = "mlflow-pending.json"  # in work/report: a report MLflow has not received (`samerge stage report --resend`)
PROBE_TIMEOUT_S = 5.0  # an unreachable tracking server is reported after this, not after minutes of retries


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be reached (None when it answers, whatever it answers)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (a proxy asking for credentials, an older server without /health)
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def tracking_uri(layout: Layout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, (list, dict)) else str(obj)
    return out


def _stage_json(d: Path) -> dict[str, Any]:
    p = d / "stage.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def track_pipeline(params: PipelineParams, layout: Layout) -> dict[str, Any]:
    """Log the finished pipeline under ``layout`` to MLflow; register the merged model; move ``champion``."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise SamergeError("MLflow tracking needs mlflow (pip install 'samerge[pipeline]'); or set report.track: "
                           "false") from None
    uri = tracking_uri(layout)
    why = _unreachable(uri)
    if why is not None:
        report_dir = layout.stage("report")
        if report_dir.is_dir():
            write_text_atomic(report_dir / PENDING, json.dumps({"tracking_uri": uri, "error": why, "at": datetime.now(
                timezone.utc).isoformat(timespec="seconds")}, indent=2))
        raise SamergeError(f"MLflow at {uri} is unreachable ({why}); the report is kept in {report_dir}: send it "
                           "once the server is back with `samerge stage report --resend`")
    # a server that goes away later fails within minutes, not after MLflow's default seven backed-off retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    manifest = read_manifest(layout.stage("acquire"))
    suite = manifest["suite"]
    rows = read_rows(layout.stage("evaluate") / "scores.csv")
    avg = {r["method"]: r["normalized"] for r in rows if r["task"] == "average"}
    try:
        mlflow.set_experiment(params.report.experiment)
    except MlflowException as exc:
        raise SamergeError(f"MLflow at {uri}: {exc.message}") from None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    result: dict[str, Any] = {"tracking_uri": uri}
    with mlflow.start_run(run_name=f"{suite} pipeline {stamp}") as parent:
        result["run_id"] = parent.info.run_id
        mlflow.set_tags({"samerge.suite": suite, "samerge.size": manifest["size"], "samerge.kind": "pipeline",
                         "samerge.experts": ",".join(e["name"] for e in manifest["experts"])})
        mlflow.log_params(_flat("", params.logged(), {}))
        mlflow.log_metrics({f"normalized_average.{m}": v for m, v in avg.items()})
        children: dict[str, str] = {}
        for stage in STAGES:
            with mlflow.start_run(run_name=stage, nested=True) as child:
                children[stage] = child.info.run_id
                mlflow.set_tag("samerge.stage", stage)
                _log_stage(mlflow, stage, params, layout, rows)
        result["children"] = children
        method = params.report.register_method
        if method:
            if method == SEARCH:
                found = read_search_summary(layout)
                val = found.get("validation_score") if found else None
                result.update(_register(mlflow, client, params, suite, method, children[SEARCH], avg[method],
                                        layout.stage(SEARCH) / "model", val))
            elif method in params.prune.methods:
                result.update(_register(mlflow, client, params, suite, method, children["prune"], avg[method],
                                        layout.merged(method) / "model", None))
            else:
                raise SamergeError(f"report.register_method: {method!r} is neither search nor in prune.methods "
                                   f"({', '.join(params.prune.methods)})")
    return result


def _log_search(mlflow: Any, layout: Layout) -> None:
    """The search stage's child run: its choice, its plots and recipe, and one nested run per trial (its parameters,
    its validation scores, its state)."""
    d = layout.stage(SEARCH)
    found = read_search_summary(layout) or {}
    mlflow.set_tags({"samerge.search.kind": found.get("kind", ""), "samerge.search.method": found.get("method", "")})
    mlflow.log_metrics({k: float(found[k]) for k in ("validation_score", "best_trial", "trials") if k in found})
    for f in ("history.png", "importances.png"):
        if (d / f).is_file():
            mlflow.log_artifact(str(d / f), artifact_path="plots")
    for f in ("trials.csv", "best.json", "recipe.yaml", "importances.csv"):
        if (d / f).is_file():
            mlflow.log_artifact(str(d / f))
    if not (d / "trials.csv").is_file():
        return
    with open(d / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    for t in trials:
        with mlflow.start_run(run_name=f"trial {t['number']}", nested=True):
            mlflow.set_tags({"samerge.stage": "search-trial", "samerge.trial.state": t.get("state", ""),
                             "samerge.trial.method": t.get("method", "")})
            try:
                trial_params = json.loads(t.get("params") or "{}")
            except json.JSONDecodeError:
                trial_params = {}
            mlflow.log_params(_flat("", {"method": t.get("method"), **trial_params}, {}))
            numbers = {}
            for k, v in t.items():
                if k in ("number", "params", "state", "method") or v in (None, ""):
                    continue
                try:
                    numbers[k] = float(v)
                except ValueError:
                    continue
            if numbers:
                mlflow.log_metrics(numbers)


def _log_stage(mlflow: Any, stage: str, params: PipelineParams, layout: Layout, rows: list[dict[str, Any]]) -> None:
    if stage == "prune":
        for m in params.prune.methods:
            d = layout.merged(m)
            rec = _stage_json(d)
            mlflow.log_params(_flat(m, rec.get("params", {}), {}))
            mlflow.log_metric(f"{m}.seconds", rec.get("seconds", 0.0))
            for h in read_iterations(d / "iterations.csv"):
                mlflow.log_metrics({f"{m}.density": h.overall_density, f"{m}.norm_ratio": h.norm_ratio,
                                    f"{m}.conflict": h.conflict}, step=h.iteration)
            mlflow.log_artifact(str(d / "iterations.csv"), artifact_path=f"iterations/{m}")
            card = d / "model" / "README.md"
            if card.is_file():
                mlflow.log_artifact(str(card), artifact_path=f"model_cards/{m}")
        return
    d = layout.stage(stage)
    rec = _stage_json(d)
    if rec.get("params"):
        mlflow.log_params(_flat("", rec["params"], {}))
    if "seconds" in rec:
        mlflow.log_metric("seconds", rec["seconds"])
    if stage == "extract":
        summary = json.loads((d / "summary.json").read_text())
        mlflow.log_metrics({"mean_relative_norm": summary["mean_relative_norm"],
                            "mean_pairwise_cosine": summary["mean_pairwise_cosine"],
                            **{f"relative_norm.{k}": v["relative_norm"] for k, v in summary["experts"].items()}})
        mlflow.log_artifact(str(d / "task_vector_cosine.png"), artifact_path="plots")
    elif stage == "score":
        summary = json.loads((d / "summary.json").read_text())
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(d / "saliency_vs_magnitude.png"), artifact_path="plots")
        mlflow.log_artifact(str(d / "saliency.csv"))
    elif stage == "evaluate":
        mlflow.log_metrics({f"{r['method']}.{r['task']}": r["score"] for r in rows})
        mlflow.log_metrics({f"{r['method']}.{r['task']}.accuracy": r["accuracy"] for r in rows
                            if r.get("accuracy") is not None})
        mlflow.log_metrics({f"{r['method']}.{r['task']}.normalized": r["normalized"] for r in rows})
    elif stage == "report":
        for f in ("report.csv", "report.md", "report.html", "per_task.png", "sa_iterations.png"):
            if (d / f).is_file():
                mlflow.log_artifact(str(d / f), artifact_path="report")
    elif stage == "acquire":
        mlflow.log_dict(read_manifest(d), "manifest.json")
    elif stage == SEARCH:
        _log_search(mlflow, layout)


def _register(mlflow: Any, client: Any, params: PipelineParams, suite: str, method: str, stage_run: str,
              score: float, model_dir: Path, validation: float | None) -> dict[str, Any]:
    """Register the merge in ``model_dir`` (logged in the stage's child run ``stage_run``) and move ``champion`` to
    it when it beats the current champion: on the validation score when this merge has one (the search's choice),
    so a re-merge promotes only a real improvement and the test split stays out of the decision; else on the
    evaluation's normalized average, as before the search existed. A champion without the tag compared counts as
    -inf."""
    from mlflow.exceptions import MlflowException

    name = params.report.model_name or f"samerge-{suite}"
    with mlflow.start_run(run_id=stage_run, nested=True):
        info, flavor = log_merged_model(mlflow, model_dir, name)
    v = str(info.registered_model_version)
    # exact (repr): a tag rounded to 6 decimals would lose to the same merge registered again
    client.set_model_version_tag(name, v, SCORE_TAG, repr(float(score)))
    if validation is not None:
        client.set_model_version_tag(name, v, VALIDATION_TAG, repr(float(validation)))
    client.set_model_version_tag(name, v, "samerge.method", method)
    client.set_model_version_tag(name, v, "samerge.suite", suite)
    client.set_model_version_tag(name, v, "samerge.flavor", flavor)
    tag, mine = (VALIDATION_TAG, validation) if validation is not None else (SCORE_TAG, score)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        current_score = float(current.tags.get(tag, "-inf"))
    except MlflowException:
        current, current_score = None, float("-inf")
    champion = current is None or mine > current_score
    if champion:
        client.set_registered_model_alias(name, CHAMPION, v)
    return {"model_name": name, "version": v, "champion": champion, "normalized_average": score,
            "validation_score": validation, "compared_on": tag, "flavor": flavor,
            "previous_champion": None if current is None else str(current.version),
            "previous_champion_score": None if current is None else current_score}


# the pipeline task of a transformers architecture, by its class name's ending (a bare encoder: its features)
TASKS = (("ForCausalLM", "text-generation"), ("ForMaskedLM", "fill-mask"),
         ("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
         ("ForConditionalGeneration", "text2text-generation"), ("Model", "feature-extraction"))


def transformers_task(model_dir: Path) -> tuple[str, str] | None:
    """(architecture, pipeline task) of a complete Hugging Face folder (config.json, a tokenizer, the weights) whose
    architecture is a class of the installed transformers; None for anything else."""
    cfg = model_dir / "config.json"
    if not cfg.is_file() or not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        import transformers
    except ImportError:
        return None
    archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    arch = archs[0] if archs else ""
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return None  # never remote code: the class must be transformers' own
    return next(((arch, task) for end, task in TASKS if arch.endswith(end)), None)


def log_merged_model(mlflow: Any, model_dir: Path, name: str) -> tuple[Any, str]:
    """Log the merged model folder as the MLflow model ``merged_model`` of the active run, registered as ``name``.

    A complete Hugging Face folder of a transformers architecture (the text and llm-lora suites: the prune stage puts
    the base's config and tokenizer next to the weights) is logged with the ``transformers`` flavour, so
    ``mlflow.transformers.load_model`` gives a pipeline and ``from_pretrained`` reads the artifact's ``model/``
    folder; anything else as a models-from-code pyfunc (:mod:`samerge.mlflow_model`, a tensor lookup; no pickle).
    Neither requires samerge where it is loaded. Returns (the ModelInfo, the flavour)."""
    found = transformers_task(model_dir)
    card = model_dir / "README.md"
    if found is not None:
        import transformers
        from huggingface_hub import ModelCard

        arch, task = found
        # a pipeline of the loaded model, not the folder's path: MLflow 3's local-checkpoint logging fails on
        # transformers 5 (pipelines.check_task gives the class as a string); the weights are saved again by
        # save_pretrained, the same tensors
        model = getattr(transformers, arch).from_pretrained(model_dir, use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name="merged_model", task=task,
            model_card=ModelCard.load(card) if card.is_file() else None,
            pip_requirements=mlflow.transformers.get_default_pip_requirements(model),
            registered_model_name=name)
        return info, "transformers"
    info = mlflow.pyfunc.log_model(
        name="merged_model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
        artifacts={"checkpoint": str(model_dir)},
        pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "safetensors", "numpy"],
        registered_model_name=name)
    return info, "code"
