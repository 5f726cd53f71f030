"""The validation-guided merge search: an Optuna study (TPE, seeded) over merge methods and their parameters, each
trial scored on the tasks' **validation** examples; objective = the mean normalized validation score.

The pieces, in the order a search uses them:

* :func:`parse_space` turns ``{method: {param: spec}}`` into a :class:`SearchSpace`, every spec checked against the
  method's own ``Params`` model. A spec is ``[low, high]`` (a numeric range; an integer range when the field is an
  integer and both ends are integers), ``{low, high, log}``, ``{choices: [...]}`` or a scalar (fixed, not
  searched). ``weights: [low, high]`` on a method with a ``weights`` field searches one weight per expert, each in
  that range. A method with an empty mapping is searched at its defaults (only the method choice). The study's
  parameters are ``method`` (only when there are several) and ``METHOD.PARAM`` (``METHOD.weights.I`` per expert), so
  two methods' parameters never share a distribution.
* :class:`Evaluator` holds the suite, the experts on their validation split and each expert's validation score;
  :func:`evaluate_trial` merges one :class:`TrialSpec` and scores it task by task into a :class:`TrialResult`.
  Both ends are plain picklable data: a caller may run trials anywhere (``map_trials``: the Prefect flow runs each
  trial as a task on a worker that builds its own evaluator).
* :func:`run_search` drives the study and returns a :class:`SearchResult` (best trial, rows, recipe, outputs).

Determinism (the design point). Trials are asked in batches of ``batch`` *slots* (slot = the trial's place in the
search: 0, 1, 2, ...; batch k holds slots ``[k*batch, (k+1)*batch)``). Every trial of a batch is sampled by a fresh
``TPESampler(seed=hash(seed, slot))`` in a scratch in-memory study that holds exactly the trials of the slots before
the batch (finished, in slot order), and the pruning thresholds of the batch come from those same trials. So a
trial's parameters depend only on (seed, slot, the history before its batch): the same seed, ``n_trials`` and
``batch`` give the same trials and the same best trial whether the batch runs on one thread, ``n_jobs`` threads or
other machines, and a resumed study (see below) gives the same trials as an uninterrupted one. (A sampler on the
real study would also see the running trials of its batch and the trials a kill left behind.) The parameters found
this way (or, for the first slots, the ``start`` configurations as given) are enqueued into the real study
(``enqueue_trial``), so the study records them with their distributions
(plots, importances) and is written only through Optuna. A ``timeout`` stops the search between batches: its result
then depends on how many batches ran (on the machine's speed), which no seed can fix.

Two savings. A trial whose merge refused its parameters (FAIL) is shown to the sampler as the worst kind of trial,
so TPE stops drawing what fails (Optuna's TPE ignores FAIL trials). A configuration drawn again (e.g. a method
searched at its defaults) is not run again: its trial copies the result of the first trial of that configuration
finished before its batch, cut by its own pruning thresholds (user attribute ``copied_from``; 0 seconds).

Pruning. Step ``j`` of a trial is task ``j`` (0-based, the experts' order); its intermediate value is the running
mean of the normalized scores of tasks ``0..j`` (reported with the trial). After task ``j`` with
``warmup_tasks <= j + 1 < n_tasks`` (``warmup_tasks``: the tasks scored before the first check, default 2; nothing
is saved by a check after the last task), a trial is pruned when its running mean is below the median running mean at step ``j``
of the trials COMPLETE before its batch began, once at least ``startup_trials`` (default 5) such trials exist.

Resuming. With ``storage`` (an SQLite file) and a ``study_name`` (:func:`study_key` makes one from what decides the
result), an existing study continues to ``n_trials`` finished trials. A trial a kill left RUNNING (or an enqueued
one never run) is marked FAIL without an ``error`` attribute (an *interrupted attempt*, not counted) and its slot is
run again with its exact parameters. A slot's trial is its last attempt; a FAIL with an ``error`` attribute (the
merge refused its parameters) counts as finished. The study's settings (space, seed, batch, pruning, tasks) are
stored with it and a resume with other settings is refused.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.evaluation.metrics import normalized
from samerge.evaluation.report import merged_state, method_recipe
from samerge.evaluation.scoring import on_split
from samerge.evaluation.suite import Expert, Suite
from samerge.io.writer import OutputLock, write_text_atomic
from samerge.space import SearchSpace, _number, parse_space, parse_start

SEARCH_FORMAT = 1  # bump when a change makes stored studies incomparable (what a study key and its settings mean)


def _primary(v: Any) -> float:
    """A task's primary score from a suite's ``scores`` value: ``v["score"]`` (the ``{score, accuracy}`` mapping)
    or the plain float of suites that return one number per task."""
    return float(v["score"]) if isinstance(v, Mapping) else float(v)


def _optuna() -> Any:
    # deferred: the CLI imports the evaluation modules at start-up, and optuna (with SQLAlchemy) costs ~1 s to import
    try:
        import optuna
    except ImportError:
        raise SamergeError("the merge search needs optuna (pip install 'samerge[suites]')") from None
    return optuna


@contextlib.contextmanager
def _quiet(optuna: Any) -> Iterator[None]:
    """Optuna's INFO lines (a study created, each trial finished) off while samerge drives it: the progress bar
    and the result say what happened."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def study_key(space: SearchSpace, seed: int, batch: int, fingerprint: str, *, warmup_tasks: int = 2,
              startup_trials: int = 5, start: Sequence[str] = ()) -> str:
    """A short name for the study of this search (16 hex digits): the same key exactly when everything that decides
    its trials is the same — the space, the seed, the batch, the pruning settings, the configurations it starts from
    and ``fingerprint`` (the caller's description of the suite, tasks and experts, e.g. their content hashes)."""
    blob = json.dumps({"space": space.to_dict(), "seed": seed, "batch": batch, "fingerprint": fingerprint,
                       "warmup_tasks": warmup_tasks, "startup_trials": startup_trials, "format": SEARCH_FORMAT,
                       **({"start": list(start)} if start else {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class TrialSpec:
    """One trial to evaluate (picklable): the study's trial ``number``, its ``slot`` (place in the search), the merge
    (``method`` and its ``params``, ``weights`` as a list) and the pruning threshold of each step (task index;
    None: no check there), or None when the trial is never pruned."""

    number: int
    slot: int
    method: str
    params: dict[str, Any]
    thresholds: tuple[float | None, ...] | None = None


@dataclass(frozen=True)
class TrialResult:
    """What evaluating a :class:`TrialSpec` gave (picklable): per task in order the normalized validation score
    (``values``) and the primary score (``scores``), both cut after the step where the trial was ``pruned``; the
    wall time; ``error``: the one line of the SamergeError the merge raised (the trial FAILED)."""

    number: int
    values: tuple[float, ...] = ()
    scores: tuple[float, ...] = ()
    pruned: bool = False
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Evaluator:
    """The suite, its experts on the validation split (``task.test`` holds the validation examples) and each
    expert's primary validation score on its own task (what a merge's score is normalized by).

    Merges may run on several threads; the suite's ``scores`` runs under one lock, since a suite may keep one model
    whose weights every call replaces (llm-lora does)."""

    suite: Suite
    experts: list[Expert]
    expert_scores: list[float]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def build(cls, suite: Suite, experts: Sequence[Expert], *, split: str = "val") -> Evaluator:
        """The evaluator of ``experts`` as the suite gives them (moved to ``split`` here; ``"test"`` scores a chosen
        configuration once, after the search). An expert that scores 0 on its own task is refused: its task's
        normalized score would be undefined."""
        if not experts:
            raise SamergeError("the search needs at least one expert")
        moved = on_split(experts, split)
        ev = cls(suite, moved, [])
        for e in moved:
            s = ev.score_one(e.encoder, e)
            if not s:
                raise SamergeError(f"the expert of task {e.task.name!r} scores 0 on its own {split} examples: its "
                                   "normalized score is undefined")
            ev.expert_scores.append(s)
        return ev

    @property
    def tasks(self) -> list[str]:
        return [e.task.name for e in self.experts]

    def merge(self, method: str, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The merged state of one configuration (exactly what a trial of it scores)."""
        return merged_state(self.suite, self.experts, method, dict(params))

    def score_one(self, state: Mapping[str, torch.Tensor], expert: Expert) -> float:
        with self._lock:
            return _primary(self.suite.scores(state, [expert])[expert.task.name])

    def scores(self, state: Mapping[str, torch.Tensor]) -> list[float]:
        """The primary score of ``state`` on every task, in task order (one call of the suite)."""
        with self._lock:
            got = self.suite.scores(state, self.experts)
        return [_primary(got[t]) for t in self.tasks]

    def normalized(self, scores: Sequence[float]) -> list[float]:
        """Each task's score / its expert's score (the first ``len(scores)`` tasks)."""
        return [normalized(s, e) for s, e in zip(scores, self.expert_scores)]


def evaluate_trial(evaluator: Evaluator, spec: TrialSpec) -> TrialResult:
    """Merge ``spec``'s configuration and score it on the validation split, task by task when it may be pruned."""
    t0 = time.perf_counter()
    try:
        state = evaluator.merge(spec.method, spec.params)
        if spec.thresholds is None:
            scores = evaluator.scores(state)
            values, pruned = evaluator.normalized(scores), False
        else:
            scores, values, pruned = [], [], False
            for j, e in enumerate(evaluator.experts):
                scores.append(evaluator.score_one(state, e))
                values.append(normalized(scores[-1], evaluator.expert_scores[j]))
                if _stops(values, spec.thresholds):
                    pruned = True
                    break
    except SamergeError as exc:
        return TrialResult(spec.number, seconds=time.perf_counter() - t0, error=str(exc))
    return TrialResult(spec.number, tuple(values), tuple(scores), pruned, time.perf_counter() - t0)


def _stops(values: Sequence[float], thresholds: Sequence[float | None] | None) -> bool:
    """Whether the running mean after the last of ``values`` is below the threshold of that step."""
    j = len(values) - 1
    th = thresholds[j] if thresholds is not None and j < len(thresholds) else None
    return th is not None and sum(values) / len(values) < th


def _replay(spec: TrialSpec, earlier: Any) -> TrialResult:
    """``spec``'s result from a finished trial of the same configuration (COMPLETE, or FAIL with an error): merges
    and scores are deterministic, so evaluating it again would give these values, cut where ``spec``'s thresholds
    prune it (or the same error). Its seconds are 0: nothing ran."""
    if "error" in earlier.user_attrs:
        return TrialResult(spec.number, error=earlier.user_attrs["error"])
    return _cut(spec, earlier.user_attrs["normalized"], earlier.user_attrs["scores"])


def _cut(spec: TrialSpec, values: Sequence[float], scores: Sequence[float]) -> TrialResult:
    """The result of a trial whose whole scores are known (nothing runs): cut where ``spec``'s thresholds prune it,
    as :func:`evaluate_trial` would have."""
    for j in range(len(values)):
        if _stops(values[:j + 1], spec.thresholds):
            return TrialResult(spec.number, tuple(values[:j + 1]), tuple(scores[:j + 1]), True)
    return TrialResult(spec.number, tuple(values), tuple(scores))


def _config_key(method: str, params: Mapping[str, Any]) -> str:
    return json.dumps([method, params], sort_keys=True, default=str)


def _running_means(values: Sequence[float]) -> list[float]:
    """The intermediate value of each step: the mean over the tasks scored so far (the last one is the objective)."""
    return [sum(values[:j + 1]) / (j + 1) for j in range(len(values))]


# ---------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BestTrial:
    number: int
    slot: int
    method: str
    params: dict[str, Any]
    value: float  # mean normalized validation score
    scores: dict[str, float]  # primary validation score per task
    normalized: dict[str, float]  # normalized validation score per task


@dataclass
class SearchResult:
    """A finished search: the Optuna ``study``, one row per slot (its final trial, in slot order) in ``trials``,
    and the ``best`` COMPLETE trial (highest value; the lowest slot among equals), or None when none completed."""

    study: Any
    evaluator: Evaluator
    space: SearchSpace
    trials: list[dict[str, Any]]
    best: BestTrial | None
    seconds: float  # wall time of this call of run_search
    storage: Path | None = None

    def _need_best(self) -> BestTrial:
        if self.best is None:
            errors = [r["error"] for r in self.trials if r["error"]]
            raise SamergeError(f"no trial of the search completed ({len(self.trials)} finished"
                               + (f"; first error: {errors[0]}" if errors else "") + ")")
        return self.best

    def recipe(self, exclude: Sequence[str] | None = None) -> dict[str, Any]:
        """The ``samerge merge --config`` mapping of the best trial's merge (``exclude``: by default the suite's)."""
        best = self._need_best()
        return method_recipe(best.method, best.params,
                             self.evaluator.suite.exclude if exclude is None else tuple(exclude))

    def best_state(self) -> dict[str, torch.Tensor]:
        """The best trial's merged state, made again (merges are deterministic: the state the trial scored)."""
        best = self._need_best()
        return self.evaluator.merge(best.method, best.params)

    def write_outputs(self, out_dir: str | Path) -> Path:
        """Write into ``out_dir`` (made if missing; other files there are left alone), each file whole or not at
        all: ``trials.csv`` (one row per slot), ``best.json`` (the best trial and its recipe), ``history.png`` (the
        objective per trial and the best so far), ``importances.csv`` and ``importances.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["number", "slot", "state", "method", "value", "seconds", "params", "error"])
        for r in self.trials:
            w.writerow([r["number"], r["slot"], r["state"], r["method"],
                        "" if r["value"] is None else repr(r["value"]), f"{r['seconds']:.3f}",
                        json.dumps(r["params"], sort_keys=True), r["error"] or ""])
        write_text_atomic(out / "trials.csv", buf.getvalue())
        best = None if self.best is None else {
            **{k: getattr(self.best, k) for k in ("number", "slot", "method", "params", "value", "scores",
                                                  "normalized")}, "recipe": self.recipe()}
        states = {s: sum(r["state"] == s for r in self.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
        write_text_atomic(out / "best.json", json.dumps({
            "best": best, "study_name": self.study.study_name, "tasks": self.evaluator.tasks,
            "n_trials": len(self.trials), "states": states, "settings": self.study.user_attrs.get("samerge_search"),
            "seconds": sum(r["seconds"] for r in self.trials)}, indent=2, default=str) + "\n")
        write_text_atomic(out / "history.png", _history_plot(self.trials))
        try:
            rows, note = self.importances()
        except (ValueError, RuntimeError) as exc:  # fANOVA on degenerate values: say so on the plot
            rows, note = [], f"importances unavailable: {str(exc).splitlines()[0]}"
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["param", "importance", "over"])
        w.writerows([r["param"], f"{r['importance']:.6f}", r["over"]] for r in rows)
        write_text_atomic(out / "importances.csv", buf.getvalue())
        write_text_atomic(out / "importances.png", _importance_plot(rows, note))
        return out

    def importances(self) -> tuple[list[dict[str, Any]], str | None]:
        """Parameter importances: of the best method's searched parameters, Optuna's fANOVA (seeded) over the
        COMPLETE trials of that method, normalized to sum 1; of ``method`` (several methods), the share of the
        objective's variance over all COMPLETE trials that the method choice explains (η², what fANOVA gives a lone
        categorical parameter). Returns the rows and a note where there is too little to say."""
        optuna = _optuna()
        done = [r for r in self.trials if r["state"] == "COMPLETE"]
        rows: list[dict[str, Any]] = []
        notes = []
        if len(self.space.methods) > 1 and len(done) >= 2:
            ys = [r["value"] for r in done]
            mean = statistics.fmean(ys)
            total = sum((y - mean) ** 2 for y in ys)
            groups: dict[str, list[float]] = {}
            for r in done:
                groups.setdefault(r["method"], []).append(r["value"])
            between = sum(len(g) * (statistics.fmean(g) - mean) ** 2 for g in groups.values())
            rows.append({"param": "method", "importance": between / total if total > 0 else 0.0,
                         "over": f"all {len(done)} complete trials (variance share)"})
        if self.best is None:
            return rows, "no trial completed"
        names = self.space.searched(self.best.method)
        own = [r for r in done if r["method"] == self.best.method]
        if not names:
            notes.append(f"{self.best.method} is searched at fixed parameters")
        elif len(own) < 2:
            notes.append(f"{len(own)} complete {self.best.method} trial(s): too few for importances")
        else:
            keep = {r["number"] for r in own}
            with _quiet(optuna):
                scratch = optuna.create_study(direction="maximize")
                scratch.add_trials([t for t in self.study.get_trials(deepcopy=False) if t.number in keep])
                imp = optuna.importance.get_param_importances(
                    scratch, params=names, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            rows += [{"param": p, "importance": float(v), "over": f"{len(own)} complete {self.best.method} trials"}
                     for p, v in imp.items()]
        return rows, "; ".join(notes) or None


def _history_plot(trials: Sequence[Mapping[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    methods = list(dict.fromkeys(r["method"] for r in trials))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        done = [r for r in trials if r["method"] == m and r["state"] == "COMPLETE"]
        ax.plot([r["slot"] for r in done], [r["value"] for r in done], "o", color=cmap(i % 10), ms=5,
                label=m if done else None)
        pruned = [r for r in trials if r["method"] == m and r["state"] == "PRUNED" and r["value"] is not None]
        ax.plot([r["slot"] for r in pruned], [r["value"] for r in pruned], "x", color=cmap(i % 10), ms=6,
                label=f"{m} (pruned: running mean)" if pruned else None)
    values = [r["value"] for r in trials if r["state"] == "COMPLETE"]
    failed = [r for r in trials if r["state"] == "FAIL"]
    if failed:
        floor = min(values) if values else 0.0
        ax.plot([r["slot"] for r in failed], [floor] * len(failed), "v", color="tab:red", ms=6, label="failed")
    best, xs, ys = -math.inf, [], []
    for r in trials:
        if r["state"] == "COMPLETE" and r["value"] > best:
            best = r["value"]
        if best > -math.inf:
            xs.append(r["slot"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="k", lw=1.2, label="best so far")
    ax.set_xlabel("trial (slot)")
    ax.set_ylabel("mean normalized validation score")
    if not trials:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    if trials:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")  # the legend beside the axes included
    plt.close(fig)
    return png.getvalue()


def _importance_plot(rows: Sequence[Mapping[str, Any]], note: str | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 1.4 + 0.3 * len(rows)))
    if rows:
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r["importance"] for r in rows], color="tab:blue", alpha=0.7)
        ax.set_yticks(ys, [r["param"] for r in rows], fontsize=8)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("importance (method: variance share over all trials; others: fANOVA within the best method)",
                      fontsize=7)
    else:
        ax.set_axis_off()
    if note:
        ax.set_title(note, fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


# ---------------------------------------------------------------------------------------------------- the driver
def _slot_seed(seed: int, slot: int) -> int:
    return int.from_bytes(hashlib.sha256(f"samerge-search:{seed}:{slot}".encode()).digest()[:4], "little")


def _storage_path(storage: str | Path | None) -> Path | None:
    """The SQLite file of ``storage`` (None: in memory, or an SQLAlchemy URL such as the MLflow backend's)."""
    if storage is None or "://" in str(storage):
        return None
    path = Path(storage)
    if path.is_dir():
        raise SamergeError(f"search storage {path} is a folder; give the path of an SQLite file")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _open_study(optuna: Any, storage: str | Path | None, path: Path | None, study_name: str) -> Any:
    if storage is None:
        return optuna.create_study(study_name=study_name, direction="maximize")
    url = f"sqlite:///{path.resolve()}" if path is not None else str(storage)
    try:
        study = optuna.create_study(storage=url, study_name=study_name, direction="maximize", load_if_exists=True)
    except Exception as exc:  # a file that is not an SQLite database, a URL that does not answer
        raise SamergeError(f"cannot open the search storage {storage}: {str(exc).splitlines()[0]}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SamergeError(f"study {study_name!r} in {storage} minimizes; it is not a samerge search")
    return study


def _finished(t: Any, optuna: Any) -> bool:
    S = optuna.trial.TrialState
    return t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs)


def _last_attempts(study: Any) -> dict[int, Any]:
    """The last attempt of each slot (trials in number order; later attempts replace earlier ones)."""
    out: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if "slot" in t.user_attrs:
            out[int(t.user_attrs["slot"])] = t
    return out


def _recover(study: Any, optuna: Any) -> None:
    """Mark what an interrupted run left as interrupted attempts (FAIL without ``error``): RUNNING trials, and
    enqueued ones never asked (popped here, so that the next ``ask`` gets the trial the driver enqueues)."""
    S = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        study.tell(t.number, state=S.FAIL)
    while study.get_trials(deepcopy=False, states=(S.WAITING,)):
        trial = study.ask()
        study.tell(trial, state=S.FAIL)


def _thresholds(history: Sequence[Any], n_tasks: int, warmup_tasks: int,
                startup_trials: int) -> tuple[float | None, ...] | None:
    """Per step, the median running mean of the COMPLETE trials in ``history`` (None where no check is made), or
    None when fewer than ``startup_trials`` trials completed."""
    done = [t for t in history if t.state.name == "COMPLETE"]
    if len(done) < startup_trials:
        return None
    out = tuple(statistics.median(t.intermediate_values[j] for t in done) if warmup_tasks <= j + 1 < n_tasks
                else None for j in range(n_tasks))
    return out if any(x is not None for x in out) else None


def _as_seen(t: Any, optuna: Any) -> Any:
    """A finished trial as the sampler sees it: COMPLETE and PRUNED as they are; a FAIL (the merge refused its
    parameters) as pruned before its first task, which TPE ranks below every other trial — so it learns to avoid
    what fails instead of drawing it again (Optuna's TPE ignores FAIL trials); None for one without parameters."""
    S = optuna.trial.TrialState
    if t.state in (S.COMPLETE, S.PRUNED):
        return t
    if not t.params:
        return None
    return optuna.trial.create_trial(state=S.PRUNED, params=t.params, distributions=t.distributions,
                                     user_attrs=t.user_attrs)


def _sample(optuna: Any, space: SearchSpace, history: Sequence[Any], seed: int, slot: int) -> dict[str, Any]:
    """The study parameters of ``slot``: a fresh seeded TPE over exactly ``history`` (see the module docstring)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # group=True: TPE splits the conditional space (each method's parameters) into groups it models jointly
        sampler = optuna.samplers.TPESampler(seed=_slot_seed(seed, slot), multivariate=True, group=True,
                                             constant_liar=False)
        scratch = optuna.create_study(direction="maximize", sampler=sampler)
        scratch.add_trials(list(history))
        trial = scratch.ask()
        space.suggest(trial)
    return dict(trial.params)


def _row(t: Any, space: SearchSpace, tasks: Sequence[str]) -> dict[str, Any]:
    return {"number": t.number, "slot": int(t.user_attrs["slot"]), "state": t.state.name,
            "method": t.user_attrs.get("method", t.params.get("method", next(iter(space.methods)))),
            "value": t.value, "params": t.user_attrs.get("params"), "seconds": float(t.user_attrs.get("seconds", 0.0)),
            "error": t.user_attrs.get("error"), "measured": bool(t.user_attrs.get("measured")),
            "scores": dict(zip(tasks, t.user_attrs.get("scores", []))),
            "normalized": dict(zip(tasks, t.user_attrs.get("normalized", [])))}


def run_search(evaluator: Evaluator, space: Mapping[str, Any] | SearchSpace, *, n_trials: int,
               timeout: float | None = None, seed: int = 0, batch: int = 1, n_jobs: int = 1,
               storage: str | Path | None = None, study_name: str = "samerge-search", warmup_tasks: int = 2,
               startup_trials: int = 5, progress: bool = False, start: Sequence[str] = (),
               map_trials: Callable[[list[TrialSpec]], Sequence[TrialResult]] | None = None,
               measured: Callable[[str, dict[str, Any]], Sequence[float] | None] | None = None) -> SearchResult:
    """Search ``space`` on ``evaluator``'s validation tasks until the study holds ``n_trials`` finished trials
    (slots ``0..n_trials-1``; those already in ``storage`` count), or until ``timeout`` seconds have passed (checked
    before each batch). The result covers every finished slot of the study.

    ``batch`` trials are sampled together and evaluated on ``n_jobs`` threads, or by ``map_trials`` (a list of
    :class:`TrialSpec` -> their :class:`TrialResult`, e.g. one task each on other workers), then told in slot order.
    ``start``: configurations (method specs such as ``wudi`` or ``sa_merging[saliency_sign=own_value]``, the
    method's defaults for the rest) that the first slots run instead of sampling, so the search knows them and its
    best trial is never below theirs on validation; each must lie in ``space``.
    ``storage``: an SQLite file (or an SQLAlchemy URL) holding the study ``study_name`` (see :func:`study_key`);
    None keeps it in memory. ``warmup_tasks``/``startup_trials``: pruning (module docstring). ``progress``: a bar
    with the best value so far and its method. The result is a function of (seed, n_trials, batch, space, pruning
    settings, experts) whatever ``n_jobs`` or ``map_trials`` — not of ``timeout``, which cuts the search short.
    Trials run in parallel only within a batch (``n_jobs`` above ``batch`` gains nothing); a larger ``batch``
    samples more trials from the same history (TPE learns less per trial). One driver per study: a second one on
    the same SQLite file fails at once (an SQLAlchemy URL is not locked: do not drive one study twice).
    ``measured(method, params)``: the primary validation scores (task order) of a configuration already scored on
    these experts and tasks elsewhere (e.g. a suite report's score cache), or None; such a trial is not run (its
    seconds are 0, its user attribute ``measured`` is set). Scores are deterministic, so the study is the one it
    would be without it — if the scores given are this code's on these experts.
    """
    for name, value, least in (("n_trials", n_trials, 1), ("batch", batch, 1), ("n_jobs", n_jobs, 1),
                               ("startup_trials", startup_trials, 1), ("warmup_tasks", warmup_tasks, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SamergeError(f"search: {name} must be an integer >= {least}, got {value!r}")
    if timeout is not None and not (_number(timeout) and timeout > 0):
        raise SamergeError(f"search: timeout must be a positive number of seconds, got {timeout!r}")
    if map_trials is not None and n_jobs > 1:
        raise SamergeError("search: give n_jobs or map_trials, not both (map_trials decides where trials run)")
    space = parse_space(space, len(evaluator.experts))
    starts = parse_start(space, start)
    if len(starts) > n_trials:
        raise SamergeError(f"search: {len(starts)} start configurations need n_trials >= {len(starts)}, got {n_trials}")
    optuna = _optuna()
    S = optuna.trial.TrialState
    tasks = evaluator.tasks
    settings = {"space": space.to_dict(), "seed": seed, "batch": batch, "warmup_tasks": warmup_tasks,
                "startup_trials": startup_trials, "tasks": tasks, "format": SEARCH_FORMAT,
                **({"start": list(start)} if start else {})}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet(optuna))
        path = _storage_path(storage)
        if path is not None:
            stack.enter_context(OutputLock(path))  # one driver per study file: a second one fails at once
        study = _open_study(optuna, storage, path, study_name)
        stored = study.user_attrs.get("samerge_search")
        if stored is None:
            if study.get_trials(deepcopy=False):
                raise SamergeError(f"study {study_name!r} in {storage} holds trials samerge's search did not make; "
                                   "choose another study name")
            study.set_user_attr("samerge_search", settings)
        elif stored != settings:
            diff = [k for k in settings if stored.get(k) != settings[k]]
            raise SamergeError(f"study {study_name!r} in {storage} was made with other settings ({', '.join(diff)}); "
                               "use the same settings or another study name")
        _recover(study, optuna)
        return _drive(optuna, S, study, evaluator, space, n_trials=n_trials, timeout=timeout, seed=seed,
                      batch=batch, n_jobs=n_jobs, warmup_tasks=warmup_tasks, startup_trials=startup_trials,
                      progress=progress, map_trials=map_trials, path=path, starts=starts, measured=measured)


def _drive(optuna: Any, S: Any, study: Any, evaluator: Evaluator, space: SearchSpace, *, n_trials: int,
           timeout: float | None, seed: int, batch: int, n_jobs: int, warmup_tasks: int, startup_trials: int,
           progress: bool, map_trials: Callable[[list[TrialSpec]], Sequence[TrialResult]] | None,
           path: Path | None, starts: Sequence[dict[str, Any]] = (),
           measured: Callable[[str, dict[str, Any]], Sequence[float] | None] | None = None) -> SearchResult:
    from tqdm.auto import tqdm

    tasks = evaluator.tasks
    t0 = time.monotonic()
    slots = _last_attempts(study)
    done = {s: t for s, t in slots.items() if _finished(t, optuna)}
    bar = tqdm(total=n_trials, initial=sum(s < n_trials for s in done), desc="search", disable=not progress)

    def show() -> None:
        best = [t for t in done.values() if t.state == S.COMPLETE]
        if best:
            b = max(best, key=lambda t: (t.value, -int(t.user_attrs["slot"])))
            bar.set_postfix_str(f"best {b.value:.4f} ({b.user_attrs.get('method')})")

    show()
    pool = ThreadPoolExecutor(n_jobs) if map_trials is None and n_jobs > 1 else None
    try:
        while timeout is None or time.monotonic() - t0 < timeout:
            missing = [s for s in range(n_trials) if s not in done]
            if not missing:
                break
            start = missing[0] // batch * batch  # the batch of the lowest slot not finished
            todo = [s for s in range(start, min(start + batch, n_trials)) if s not in done]
            history = [_as_seen(done[s], optuna) for s in sorted(done) if s < start]
            history = [t for t in history if t is not None]
            thresholds = _thresholds(history, len(tasks), warmup_tasks, startup_trials)
            known: dict[str, Any] = {}  # configuration -> its first trial with a whole result, before this batch
            for s in sorted(done):
                t = done[s]
                if s < start and (t.state == S.COMPLETE or (t.state == S.FAIL and "error" in t.user_attrs)):
                    known.setdefault(_config_key(t.user_attrs["method"], t.user_attrs["params"]), t)
            specs, trials, replayed = [], {}, []
            for s in todo:
                old = slots.get(s)  # an interrupted attempt: its exact parameters again
                params = (dict(old.params) if old is not None and space.complete(old.params)
                          else dict(starts[s]) if s < len(starts) else _sample(optuna, space, history, seed, s))
                study.enqueue_trial(params, user_attrs={"slot": s})
                trial = study.ask()
                method, mparams = space.suggest(trial)
                trial.set_user_attr("method", method)
                trial.set_user_attr("params", mparams)
                trials[trial.number] = trial
                spec = TrialSpec(trial.number, s, method, mparams, thresholds)
                earlier = known.get(_config_key(method, mparams))
                if earlier is not None:  # e.g. a method searched at its defaults, drawn again: not run again
                    trial.set_user_attr("copied_from", int(earlier.user_attrs["slot"]))
                    replayed.append(_replay(spec, earlier))
                elif measured is not None and (got := measured(method, dict(mparams))) is not None:
                    if len(got) != len(tasks):
                        raise SamergeError(f"search: measured scores of {method} give {len(got)} scores for "
                                           f"{len(tasks)} tasks")
                    trial.set_user_attr("measured", True)
                    replayed.append(_cut(spec, evaluator.normalized(got), [float(x) for x in got]))
                specs.append(spec)
            run = [sp for sp in specs if sp.number not in {r.number for r in replayed}]
            if not run:
                results = []
            elif map_trials is not None:
                results = list(map_trials(run))
            elif pool is not None:
                results = list(pool.map(lambda sp: evaluate_trial(evaluator, sp), run))
            else:
                results = [evaluate_trial(evaluator, sp) for sp in run]
            by_number = {r.number: r for r in [*results, *replayed]}
            missing = [sp.number for sp in specs if sp.number not in by_number]
            if missing:
                raise SamergeError(f"search: map_trials returned no result for trial(s) {missing}")
            for sp in specs:  # told in slot order
                r, trial = by_number[sp.number], trials[sp.number]
                trial.set_user_attr("seconds", r.seconds)
                means = _running_means(r.values)
                if r.error is None and not all(math.isfinite(v) for v in means):
                    r = TrialResult(r.number, r.values, r.scores, r.pruned, r.seconds, "the objective is not finite")
                if r.error is not None:
                    trial.set_user_attr("error", r.error)
                    frozen = study.tell(trial, state=S.FAIL)
                else:
                    trial.set_user_attr("scores", list(r.scores))
                    trial.set_user_attr("normalized", list(r.values))
                    for j, m in enumerate(means):
                        trial.report(m, j)
                    frozen = (study.tell(trial, state=S.PRUNED) if r.pruned and len(r.values) < len(tasks)
                              else study.tell(trial, means[-1]))
                done[sp.slot] = slots[sp.slot] = frozen
                bar.update(1)
            show()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    final = [slots[s] for s in sorted(slots) if s in done]
    rows = [_row(t, space, tasks) for t in final]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = None
    if complete:
        b = max(complete, key=lambda r: (r["value"], -r["slot"]))
        best = BestTrial(b["number"], b["slot"], b["method"], b["params"], b["value"], b["scores"], b["normalized"])
    return SearchResult(study, evaluator, space, rows, best, time.monotonic() - t0, path)
