"""Prefect tasks, one per pipeline stage and named exactly like it: each calls :func:`samerge.stages.run_stage`.

The tasks are thin on purpose: the CLI (``samerge stage NAME``), ``dvc.yaml`` and these tasks run the same function,
so no logic is written twice. A task takes paths and parameter overrides and returns the stage's small JSON-able
summary (paths and metrics); the tensors stay in ``WORKDIR/work/<stage>/`` on the storage the work pools share.

Arguments every task takes:

- ``params_path``: the ``params.yaml`` to read, relative to the flow run's working directory (the repository root
  that the deployments' pull step changes into), or absolute.
- ``workdir``: the pipeline's work directory; ``None`` = ``$SAMERGE_WORKDIR`` of the worker running the task, else
  the working directory. Leave it ``None`` when the CPU and GPU workers mount the shared volume at different paths.
- ``overrides``: dotted parameter overrides, e.g. ``{"prune.sa_merging.prune_ratio": 0.3}`` (validated like
  ``params.yaml``).

Retries: a task is retried (twice, after 10 s and 60 s) only after a transient failure, an :class:`OSError` such as
a broken connection, a timeout or a hiccup of the shared file system (see :func:`is_transient`). A
:class:`~samerge.errors.SamergeError` is a user mistake (bad parameter, missing input) and fails at once.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from prefect import Task, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from samerge.errors import SamergeError
from samerge.layout import MANIFEST, Layout
from samerge.params import load_params
from samerge.stages import run_stage, search_evaluator

RETRIES = 2
RETRY_DELAYS_S = [10, 60]
# OSErrors that retrying cannot fix: the path or its permissions are wrong, not the moment.
_PERMANENT_OS_ERRORS = (PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Whether a stage that raised ``exc`` may succeed when run again unchanged.

    ``True`` for :class:`OSError` (which covers :class:`ConnectionError`, :class:`TimeoutError` and the errors of
    ``requests``, e.g. an MLflow server restarting) except :class:`PermissionError`, :class:`FileExistsError`,
    :class:`IsADirectoryError` and :class:`NotADirectoryError`; ``False`` for everything else, and always for a
    :class:`~samerge.errors.SamergeError`, even one that subclasses :class:`OSError`.
    """
    if isinstance(exc, SamergeError):
        return False
    return isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS)


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn`` of every stage task: retry only when the failure's exception :func:`is_transient`."""
    exc = state.data  # the engine passes Failed(data=<the exception>)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # an unreadable result: no evidence that a retry could help
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


def workdir_or_env(workdir: str | None) -> str:
    """``workdir``, else ``$SAMERGE_WORKDIR``, else ``"."`` (the flow run's working directory)."""
    return workdir or os.environ.get("SAMERGE_WORKDIR") or "."


def _run(stage: str, params_path: str, workdir: str | None, overrides: dict[str, Any] | None,
         method: str | None = None) -> dict[str, Any]:
    return run_stage(stage, params_path, workdir_or_env(workdir), method=method, overrides=overrides)


# Stages read files that change between runs under the same arguments: never cache their results by input.
_OPTIONS: dict[str, Any] = {"retries": RETRIES, "retry_delay_seconds": RETRY_DELAYS_S,
                            "retry_condition_fn": retry_if_transient, "cache_policy": NO_CACHE, "log_prints": True}


@task(name="acquire", task_run_name="acquire", **_OPTIONS)
def acquire(params_path: str = "params.yaml", workdir: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Experts of the suite (fine-tuned or cached) or of ``acquire.experts_dir`` -> ``work/acquire``."""
    return _run("acquire", params_path, workdir, overrides)


@task(name="extract", task_run_name="extract", **_OPTIONS)
def extract(params_path: str = "params.yaml", workdir: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Task vectors, their norms and cosines -> ``work/extract``."""
    return _run("extract", params_path, workdir, overrides)


@task(name="score", task_run_name="score", **_OPTIONS)
def score(params_path: str = "params.yaml", workdir: str | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SA-Merging saliency statistics at t = 1 -> ``work/score`` (a GPU stage)."""
    return _run("score", params_path, workdir, overrides)


@task(name="prune", task_run_name="prune-{method}", **_OPTIONS)
def prune(method: str, params_path: str = "params.yaml", workdir: str | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merge with ``method`` (one of ``prune.methods``) -> ``work/prune/<method>`` (a GPU stage)."""
    return _run("prune", params_path, workdir, overrides, method=method)


@task(name="search", task_run_name="search", **_OPTIONS)
def search(params_path: str = "params.yaml", workdir: str | None = None, overrides: dict[str, Any] | None = None,
           fan_out: bool = False) -> dict[str, Any]:
    """The validation-guided merge -> ``work/search`` (a GPU stage). ``fan_out``: each batch of trials
    (``search.batch`` of them) runs as ``search-trial`` task runs, one per trial, instead of ``search.n_jobs``
    threads in this task; the result is the same (it depends on the seed, ``n_trials`` and ``batch`` only)."""
    wd = workdir_or_env(workdir)
    if not fan_out:
        return run_stage("search", params_path, wd, overrides=overrides)
    device = load_params(params_path, overrides).evaluate.device
    return run_stage("search", params_path, wd, overrides=overrides,
                     map_trials=lambda specs: [f.result() for f in search_trial.map(
                         specs, workdir=unmapped(wd), device=unmapped(device))])


@task(name="search-trial", task_run_name="search-trial-{spec.number}", **_OPTIONS)
def search_trial(spec: Any, workdir: str, device: str = "auto") -> Any:
    """One trial of the search: its merge scored on every task's validation split (a GPU each, on the worker that
    runs it; the worker builds the evaluator from ``workdir`` once)."""
    from samerge.evaluation.search import evaluate_trial

    layout = Layout(workdir)
    manifest = (layout.stage("acquire") / MANIFEST).stat()
    return evaluate_trial(_evaluator(str(layout.root), device, (manifest.st_mtime_ns, manifest.st_size)), spec)


@functools.lru_cache(maxsize=1)
def _evaluator(root: str, device: str, acquired: tuple[int, int]) -> Any:
    """The worker's evaluator of the experts acquired under ``root`` (``acquired``: the manifest's stamp, so a new
    acquisition is never scored with the experts of an earlier one)."""
    return search_evaluator(Layout(root), device=device)


@task(name="evaluate", task_run_name="evaluate", **_OPTIONS)
def evaluate(params_path: str = "params.yaml", workdir: str | None = None,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-task scores of the base, the experts and every merge -> ``work/evaluate`` (a GPU stage)."""
    return _run("evaluate", params_path, workdir, overrides)


@task(name="report", task_run_name="report", **_OPTIONS)
def report(params_path: str = "params.yaml", workdir: str | None = None,
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.csv/md and plots -> ``work/report``; the MLflow record when ``report.track`` is true."""
    return _run("report", params_path, workdir, overrides)


STAGE_TASKS: dict[str, Task[..., dict[str, Any]]] = {
    t.name: t for t in (acquire, extract, score, prune, search, evaluate, report)}
