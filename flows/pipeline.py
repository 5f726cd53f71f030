"""The pipeline as Prefect flows: CPU stages on the ``cpu`` work pool, GPU stages as their own deployment.

``samerge-pipeline`` (deployment ``pipeline``, pool ``cpu``, nightly):
  acquire -> extract -> [``samerge-gpu-stages/gpu-stages`` on the ``gpu`` pool: score -> prune x methods ->
  search (its trials as mapped ``search-trial`` tasks, a batch at a time) -> evaluate] -> report. With
  ``gpu_deployment=None`` the GPU stages run in this process as a subflow, so the flow
  also runs without workers (``python -c "from flows.pipeline import pipeline; pipeline(gpu_deployment=None)"``).
``samerge-gpu-stages`` (deployment ``gpu-stages``, pool ``gpu``): score, prune for each method, search,
  evaluate.
``samerge-remerge`` (deployment ``remerge``, pool ``cpu``): the pipeline over an expert registry; triggered by the
  event ``samerge.expert.added`` (``samerge experts add`` or the ``watch-experts`` flow emits it).

The flows pass paths and parameter overrides, never tensors: every stage reads and writes ``WORKDIR/work/`` on the
storage the pools share (``$SAMERGE_WORKDIR`` on each worker when the ``workdir`` parameter is left empty).
Parameters are validated before any stage runs, so a misspelt override fails the run at once with the valid keys.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows import registry_or_env, write_json_atomic
from samerge.params import load_params
from samerge.registry import read_registry_or_empty
from samerge.layout import Layout
from tasks.stages import acquire, evaluate, extract, prune, report, score, search, workdir_or_env

GPU_DEPLOYMENT = "samerge-gpu-stages/gpu-stages"
REMERGED = "remerged.json"  # in a re-merge's workdir: the registry state it merged last (for de-duplication)


class GpuStagesFailed(RuntimeError):
    """The ``gpu-stages`` flow run did not complete (its own logs say why)."""


def _with_experts_dir(overrides: dict[str, Any] | None, experts_dir: str | None) -> dict[str, Any]:
    out = dict(overrides or {})
    if experts_dir:
        out["acquire.experts_dir"] = experts_dir
    return out


@flow(name="samerge-gpu-stages", log_prints=True)
def gpu_stages(params_path: str = "params.yaml", workdir: str | None = None,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """score, then prune for every method of ``prune.methods``, then search, then evaluate (the stages that want
    a GPU).

    Reads ``work/acquire`` and ``work/extract`` (written by the ``cpu`` pool) and writes ``work/score``,
    ``work/prune/<method>`` and ``work/evaluate``. Returns the stages' summaries.
    """
    params = load_params(params_path, overrides)
    out: dict[str, Any] = {"score": score(params_path, workdir, overrides)}
    out["prune"] = {m: prune(m, params_path, workdir, overrides) for m in params.prune.methods}
    out["search"] = search(params_path, workdir, overrides, fan_out=True)
    out["evaluate"] = evaluate(params_path, workdir, overrides)
    return out


@flow(name="samerge-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", workdir: str | None = None, overrides: dict[str, Any] | None = None,
             experts_dir: str | None = None, gpu_deployment: str | None = GPU_DEPLOYMENT,
             gpu_timeout_s: float = 12 * 3600) -> dict[str, Any]:
    """Every stage in order; the GPU stages as a run of ``gpu_deployment`` (``None``: in this process).

    Args:
        params_path: ``params.yaml``, relative to the flow run's working directory (the repository root).
        workdir: the work directory (``None``: ``$SAMERGE_WORKDIR`` of each worker, else the working directory).
        overrides: dotted overrides of ``params.yaml``, e.g. ``{"prune.methods": ["ties", "sa_merging"]}``.
        experts_dir: merge the experts of this registry instead of the suite's (sets ``acquire.experts_dir``).
        gpu_deployment: ``FLOW/DEPLOYMENT`` that runs :func:`gpu_stages` on the ``gpu`` pool; ``None`` runs them
            here as a subflow (no GPU worker needed).
        gpu_timeout_s: how long to wait for the GPU flow run before failing this one.

    Returns: ``{"workdir", "acquire", "extract", "gpu", "report"}`` (paths and metrics; ``gpu`` is the GPU flow
    run's id and state, or the in-process subflow's summaries).
    Raises: :class:`~samerge.errors.SamergeError` for invalid parameters (before any stage runs);
    :class:`GpuStagesFailed` when the GPU flow run fails, crashes, is cancelled or times out.
    """
    ov = _with_experts_dir(overrides, experts_dir)
    load_params(params_path, ov)  # fail fast, before the first stage takes a worker's time
    out: dict[str, Any] = {"workdir": str(Layout(workdir_or_env(workdir)).root)}
    out["acquire"] = acquire(params_path, workdir, ov)
    out["extract"] = extract(params_path, workdir, ov)
    out["gpu"] = _gpu(params_path, workdir, ov, gpu_deployment, gpu_timeout_s)
    out["report"] = report(params_path, workdir, ov)
    return out


def _gpu(params_path: str, workdir: str | None, overrides: dict[str, Any], deployment: str | None,
         timeout_s: float) -> dict[str, Any]:
    if deployment is None:
        return gpu_stages(params_path, workdir, overrides)
    logger = get_run_logger()
    logger.info("GPU stages: a run of deployment %s", deployment)
    run = run_deployment(deployment, parameters={"params_path": params_path, "workdir": workdir,
                                                 "overrides": overrides}, timeout=timeout_s)
    state = run.state
    if state is None or not state.is_completed():
        why = "did not finish in time" if state is None or not state.is_final() else f"ended {state.name}"
        raise GpuStagesFailed(f"{deployment}: flow run {run.name} ({run.id}) {why}"
                              + (f": {state.message}" if state is not None and state.message else ""))
    return {"flow_run": str(run.id), "name": run.name, "state": state.name}


@flow(name="samerge-remerge", log_prints=True)
def remerge(registry: str | None = None, params_path: str = "params.yaml", workdir: str | None = None,
            overrides: dict[str, Any] | None = None, gpu_deployment: str | None = GPU_DEPLOYMENT,
            force: bool = False) -> dict[str, Any]:
    """Merge the experts of ``registry`` again (what the ``samerge.expert.added`` trigger runs).

    ``registry`` defaults to ``$SAMERGE_EXPERTS``; ``workdir`` to ``<$SAMERGE_WORKDIR or .>/remerge/<registry
    folder name>``, so a re-merge never overwrites the scheduled pipeline's outputs. Events arriving while a
    re-merge runs queue up (the deployment's concurrency limit is 1); a queued run whose registry is unchanged since
    the last completed re-merge under the same parameters (``remerged.json`` in its workdir) returns at once
    unless ``force``.

    Returns: ``{"registry", "workdir", "experts", "skipped"}`` plus the pipeline's summary when it ran.
    """
    logger = get_run_logger()
    reg = registry_or_env(registry)
    state = read_registry_or_empty(reg)  # a SamergeError when ``reg`` is not a registry
    wd = Path(workdir) if workdir else Path(workdir_or_env(None)) / "remerge" / reg.name
    marker = wd / REMERGED
    # what a re-merge depends on: the experts (names and fingerprints) and the effective parameters
    merged = {"state": state, "params": load_params(params_path, _with_experts_dir(overrides, str(reg))).model_dump()}
    out: dict[str, Any] = {"registry": str(reg), "workdir": str(wd.resolve()), "experts": sorted(state)}
    if not force and marker.is_file():
        last = json.loads(marker.read_text(encoding="utf-8"))
        if {k: last.get(k) for k in merged} == merged:
            logger.info("registry %s unchanged since the last re-merge (same parameters): nothing to do", reg)
            return {**out, "skipped": True}
    logger.info("re-merging %d experts of %s into %s", len(state), reg, wd)
    out["pipeline"] = pipeline(params_path, str(wd), overrides, experts_dir=str(reg), gpu_deployment=gpu_deployment)
    write_json_atomic(marker, {"registry": str(reg), **merged,
                               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return {**out, "skipped": False}
