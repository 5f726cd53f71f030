"""The validation-guided merge search (samerge.evaluation.search) on a tiny real suite: a two-layer MLP base, one
expert per task fine-tuned by real SGD on synthetic separable data, scored by real balanced accuracy; plus one
short search on the real ``text`` suite.

What is checked: the same seed gives the same trials and best trial, whatever the threads; a search killed by
SIGKILL and resumed ends with the trials of an uninterrupted one; the best trial's recipe, run through
``samerge merge --config``, writes the state the trial scored byte for byte; a hopeless trial is pruned; a merge
that refuses its parameters fails only its trial; every mistake in a space is one line; the output files parse.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from samerge.errors import SamergeError
from samerge.evaluation.metrics import accuracy, balanced_accuracy
from samerge.evaluation.search import (
    Evaluator, SearchSpace, TrialSpec, evaluate_trial, parse_space, run_search, study_key,
)
from samerge.evaluation.suite import Expert
from samerge.methods import get_method

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "ties": {"density": [0.1, 0.9], "scale": {"low": 0.2, "high": 2.0, "log": True},
             "aggregate": {"choices": ["sum", "mean"]}, "weights": [0.5, 1.5]},
    "task_arithmetic": {"scale": [0.1, 1.5]},
    "weight_average": {},
}


# ------------------------------------------------------------------------------------------------ a tiny real suite
@dataclass
class TinyTask:
    name: str
    labels: list[str]
    train: list[tuple[torch.Tensor, int]]
    val: list[tuple[torch.Tensor, int]]
    test: list[tuple[torch.Tensor, int]]
    source: str = "synthetic: labels = argmax of a random linear teacher"


@dataclass
class TinySuite:
    """The :class:`~samerge.evaluation.suite.Suite` protocol on an MLP ``x -> relu(W0 x + b0) -> W1 . + b1``; each
    task's head (never merged) reads the 8 outputs. ``delay``: seconds slept per ``scores`` call (lets a test kill a
    search while it runs; the scores do not change)."""

    n_tasks: int = 3
    seed: int = 0
    delay: float = 0.0
    name: str = "tiny"
    size: str = "small"
    exclude: tuple[str, ...] = ()
    merge_methods: tuple[str, ...] = ()
    model_dir: Any = None
    base: dict[str, torch.Tensor] = field(init=False)
    tasks: list[TinyTask] = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.base = {"layer0.weight": 0.8 * torch.randn(16, 8, generator=g), "layer0.bias": torch.zeros(16),
                     "layer1.weight": 0.6 * torch.randn(8, 16, generator=g), "layer1.bias": torch.zeros(8)}
        self.tasks = []
        for t in range(self.n_tasks):
            k = 2 + t % 2
            teacher = torch.randn(8, k, generator=g)
            x = torch.randn(240, 8, generator=g)
            y = (x @ teacher).argmax(1)
            ex = [(x[i], int(y[i])) for i in range(240)]
            self.tasks.append(TinyTask(f"task{t}", [f"c{c}" for c in range(k)], ex[:144], ex[144:192], ex[192:]))

    @staticmethod
    def features(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ state["layer0.weight"].T + state["layer0.bias"])
        return h @ state["layer1.weight"].T + state["layer1.bias"]

    def expert(self, task: TinyTask) -> Expert:
        """The encoder fine-tuned by 100 steps of full-batch SGD under the task's fixed random head (so the task
        lives in the encoder and merges interfere, as with real experts); ||expert - base|| / ||base|| ~ 0.2."""
        g = torch.Generator().manual_seed(100 + self.tasks.index(task))
        head = {"weight": torch.randn(len(task.labels), 8, generator=g), "bias": torch.zeros(len(task.labels))}
        enc = {k: v.clone().requires_grad_(True) for k, v in self.base.items()}
        x = torch.stack([a for a, _ in task.train])
        y = torch.tensor([b for _, b in task.train])
        opt = torch.optim.SGD(list(enc.values()), lr=0.1)
        for _ in range(100):
            loss = torch.nn.functional.cross_entropy(self.features(enc, x) @ head["weight"].T + head["bias"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return Expert(task, {k: v.detach().clone() for k, v in enc.items()}, head)

    def scores(self, state: dict[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        if self.delay:
            time.sleep(self.delay)
        out = {}
        with torch.no_grad():
            for e in experts:
                x = torch.stack([a for a, _ in e.task.test])
                y = [b for _, b in e.task.test]
                pred = (self.features(state, x) @ e.head["weight"].T + e.head["bias"]).argmax(1).tolist()
                out[e.task.name] = {"score": balanced_accuracy(pred, y), "accuracy": accuracy(pred, y)}
        return out

    def default_methods(self) -> list[str]:
        return ["task_arithmetic"]

    def merge(self, method: str, params: Any, experts: Any) -> dict[str, torch.Tensor]:
        raise SamergeError(f"the tiny suite has no method {method!r} of its own")


def tiny(n_tasks: int = 3, delay: float = 0.0) -> tuple[TinySuite, list[Expert]]:
    suite = TinySuite(n_tasks=n_tasks, delay=delay)
    return suite, [suite.expert(t) for t in suite.tasks]


def _child(db: str, n_trials: int) -> None:
    """The search the kill test interrupts (run with ``python -c``)."""
    suite, experts = tiny(delay=0.1)
    run_search(Evaluator.build(suite, experts), SPACE, n_trials=n_trials, seed=3, batch=2, storage=db,
               study_name="kill", startup_trials=3)


def signature(result: Any) -> list[tuple[Any, ...]]:
    """What must repeat: each slot's state, method, parameters and value."""
    return [(r["slot"], r["state"], r["method"], json.dumps(r["params"], sort_keys=True), r["value"])
            for r in result.trials]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: the tiny suite's tensors are far too small to share out, and on a busy 2-core machine
    two threads waiting on each other made its fine-tuning 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _tiny_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    if "suite_cache" in request.fixturenames:  # the real text suite keeps the default
        yield
    else:
        with one_thread():
            yield


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    with one_thread():
        suite, experts = tiny()
        return Evaluator.build(suite, experts)


# ------------------------------------------------------------------------------------------------ tests
def test_tiny_suite_is_a_fair_test_bed(evaluator: Evaluator) -> None:
    """The experts learned their tasks (validation balanced accuracy well above chance) and a merge loses some."""
    assert all(s > 0.7 for s in evaluator.expert_scores), evaluator.expert_scores
    merged = evaluator.merge("task_arithmetic", {"scale": 1.0})
    values = evaluator.normalized(evaluator.scores(merged))
    assert len(values) == 3 and min(values) < 0.9


def test_same_seed_same_trials_whatever_the_threads(evaluator: Evaluator) -> None:
    a = run_search(evaluator, SPACE, n_trials=10, seed=7, startup_trials=3)
    b = run_search(evaluator, SPACE, n_trials=10, seed=7, startup_trials=3)
    assert signature(a) == signature(b)
    assert a.best is not None and a.best == b.best
    assert len(a.trials) == 10 and [r["slot"] for r in a.trials] == list(range(10))
    assert {r["method"] for r in a.trials} >= {"ties", "task_arithmetic"}
    weights = [r["params"]["weights"] for r in a.trials if r["method"] == "ties"]
    assert weights and all(len(w) == 3 and all(0.5 <= x <= 1.5 for x in w) for w in weights)
    # the objective is the mean of the per-task normalized validation scores, and each step's running mean is stored
    for r, t in zip(a.trials, sorted(a.study.trials, key=lambda t: t.number)):
        if r["state"] == "COMPLETE":
            assert r["value"] == pytest.approx(sum(r["normalized"].values()) / 3, abs=1e-12)
            assert len(t.intermediate_values) == 3 and t.intermediate_values[2] == r["value"]
    other = run_search(evaluator, SPACE, n_trials=10, seed=8, startup_trials=3)
    assert signature(other) != signature(a)  # the seed decides
    one = run_search(evaluator, SPACE, n_trials=10, seed=7, batch=2, n_jobs=1, startup_trials=3)
    two = run_search(evaluator, SPACE, n_trials=10, seed=7, batch=2, n_jobs=2, startup_trials=3)
    assert signature(one) == signature(two) and one.best == two.best


def test_resume_after_a_kill_completes_the_same_study(evaluator: Evaluator, tmp_path: Path) -> None:
    import optuna

    db = tmp_path / "search.db"
    n = 12
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", f"from tests.test_search import _child; _child({str(db)!r}, {n})"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    S = optuna.trial.TrialState
    url = f"sqlite:///{db}"
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            if db.exists():
                try:
                    trials = optuna.load_study(study_name="kill", storage=url).get_trials(deepcopy=False)
                except Exception:  # not created yet, or busy
                    trials = []
                finished = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
                if len(finished) >= 4 and any(t.state == S.RUNNING for t in trials):
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = optuna.load_study(study_name="kill", storage=url).get_trials(deepcopy=False)
    assert 4 <= sum(t.state in (S.COMPLETE, S.PRUNED) for t in killed) < n
    assert any(t.state == S.RUNNING for t in killed)

    resumed = run_search(evaluator, SPACE, n_trials=n, seed=3, batch=2, storage=db, study_name="kill",
                         startup_trials=3)
    whole = run_search(evaluator, SPACE, n_trials=n, seed=3, batch=2, startup_trials=3)
    assert len(resumed.trials) == n and signature(resumed) == signature(whole)
    assert resumed.best == whole.best or (resumed.best.slot, resumed.best.value) == (whole.best.slot, whole.best.value)
    # the killed attempts stay in the study as FAIL without an error; their slots were run again
    interrupted = [t for t in resumed.study.trials if t.state == S.FAIL and "error" not in t.user_attrs]
    assert interrupted and all(t.user_attrs["slot"] in {r["slot"] for r in resumed.trials} for t in interrupted)
    # resuming a finished study runs nothing more; other settings are refused in one line
    again = run_search(evaluator, SPACE, n_trials=n, seed=3, batch=2, storage=db, study_name="kill",
                       startup_trials=3)
    assert len(again.study.trials) == len(resumed.study.trials) and signature(again) == signature(whole)
    with pytest.raises(SamergeError, match=r"other settings \(seed\)") as err:
        run_search(evaluator, SPACE, n_trials=n, seed=4, batch=2, storage=db, study_name="kill", startup_trials=3)
    assert "\n" not in str(err.value)


def test_best_recipe_reproduces_the_scored_merge_byte_for_byte(evaluator: Evaluator, tmp_path: Path) -> None:
    from samerge.cli import main
    from samerge.io import open_checkpoint, save_safetensors

    result = run_search(evaluator, SPACE, n_trials=8, seed=1, startup_trials=3)
    best = result.best
    assert best is not None and best.value == max(r["value"] for r in result.trials if r["state"] == "COMPLETE")
    state = result.best_state()
    # it is the state the trial scored: the same validation scores
    assert evaluator.scores(state) == [best.scores[t] for t in evaluator.tasks]
    recipe = result.recipe()
    assert recipe["method"] == best.method
    assert recipe["params"] == get_method(best.method).Params(**best.params).model_dump(mode="json")
    # the recipe as a `samerge merge --config` file, base and experts as files
    suite = evaluator.suite
    save_safetensors(suite.base, tmp_path / "base.safetensors")
    paths = []
    for i, e in enumerate(evaluator.experts):
        save_safetensors(e.encoder, tmp_path / f"e{i}.safetensors")
        paths += ["--expert", str(tmp_path / f"e{i}.safetensors")]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", "--config", str(tmp_path / "recipe.yaml"), "--base", str(tmp_path / "base.safetensors"),
                 *paths, "--out", str(tmp_path / "merged.safetensors"), "--quiet"]) == 0
    with open_checkpoint(tmp_path / "merged.safetensors") as ck:
        written = {k: ck[k] for k in ck.keys()}
    assert written.keys() == state.keys()
    for k in state:
        assert written[k].dtype == state[k].dtype and written[k].numpy().tobytes() == state[k].numpy().tobytes(), k


def test_a_hopeless_trial_is_pruned(evaluator: Evaluator) -> None:
    """scale 10 wrecks the first task: once three trials completed, a trial at scale 10 stops after that task."""
    sound = evaluate_trial(evaluator, TrialSpec(0, 0, "task_arithmetic", {"scale": 0.5}))
    hopeless = evaluate_trial(evaluator, TrialSpec(1, 1, "task_arithmetic", {"scale": 10.0},
                                                   thresholds=(sound.values[0] - 0.05, None, None)))
    assert not sound.pruned and len(sound.values) == 3
    assert hopeless.pruned and len(hopeless.values) == len(hopeless.scores) == 1
    assert hopeless.values[0] < sound.values[0] - 0.05
    # in a search: each pruned trial's running mean fell below the median of the trials complete before its batch
    space = {"task_arithmetic": {"scale": {"choices": [0.9, 1.0, 1.1, 10.0]}}}
    result = run_search(evaluator, space, n_trials=14, seed=3, startup_trials=3, warmup_tasks=1)
    trials = sorted(result.study.trials, key=lambda t: t.number)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    wrecks = [t for t in trials if t.params["task_arithmetic.scale"] == 10.0]
    assert wrecks and all(t.state.name == "PRUNED" and len(t.intermediate_values) == 1 for t in wrecks)
    for t in pruned:
        before = [u for u in trials if u.user_attrs["slot"] < t.user_attrs["slot"] and u.state.name == "COMPLETE"]
        step = max(t.intermediate_values)
        assert len(before) >= 3 and step < 2
        median = sorted(u.intermediate_values[step] for u in before)
        mid = (median[(len(median) - 1) // 2] + median[len(median) // 2]) / 2
        assert t.intermediate_values[step] < mid
        assert t.value == t.intermediate_values[step]
    assert {r["state"] for r in result.trials} == {"COMPLETE", "PRUNED"}


def test_the_search_starts_from_the_given_configurations(evaluator: Evaluator) -> None:
    """``start``: the first slots run exactly these configurations (each method's defaults for the rest), scored as
    any trial is; the best trial is never below them; each one outside the space is one line."""
    space = {"task_arithmetic": {"scale": [0.1, 1.0]}, "ties": {"density": [0.05, 0.6], "scale": [0.3, 1.5]},
             "pcb": {}}
    start = ["pcb", "ties[density=0.3]", "task_arithmetic[scale=0.5]"]
    result = run_search(evaluator, space, n_trials=5, seed=0, start=start)
    ties_scale = get_method("ties").Params().scale  # not given: the method's default
    want = [("pcb", {}), ("ties", {"density": 0.3, "scale": ties_scale}), ("task_arithmetic", {"scale": 0.5})]
    for r, (method, params) in zip(result.trials[:3], want):
        assert (r["method"], r["params"]) == (method, params)
        direct = evaluator.normalized(evaluator.scores(evaluator.merge(method, params)))  # the oracle: merged by hand
        assert r["value"] == pytest.approx(sum(direct) / len(direct), abs=1e-12)
    assert result.best is not None and result.best.value >= max(r["value"] for r in result.trials[:3])
    assert len(result.trials) == 5 and result.trials[3]["slot"] == 3  # then TPE, as without a start
    for bad, message in [
        (["ties[density=0.9]"], r"search start 'ties\[density=0.9\]': ties.density = 0.9 lies outside the search "
                                r"space \(\[0.05, 0.6\]\)$"),
        (["wudi"], r"search start 'wudi': method 'wudi' is not in the search space \(task_arithmetic, ties, pcb\); "
                   r"add it \(e.g. wudi: \{\} searches it at its defaults\)$"),
        (["ties[aggregate=mean]"], r"ties.aggregate is not searched, so a trial merges it at its default 'sum'; add "
                                   r"it to the space or leave it out$"),
        (["pcb[density=2]"], r"search start 'pcb\[density=2\]'.*density"),
        (["pcb", "ties", "pcb", "ties", "pcb", "ties"], r"6 start configurations need n_trials >= 6, got 5$"),
        ("pcb", r"start must be a list of method specs"),
    ]:
        with pytest.raises(SamergeError, match=message):
            run_search(evaluator, space, n_trials=5, seed=0, start=bad)


def test_a_failing_merge_fails_only_its_trial(evaluator: Evaluator) -> None:
    # breadcrumbs refuses aggregate=mean without sign_election (a rule across fields, left to each trial's merge):
    # those trials fail, the others complete
    space = {"breadcrumbs": {"aggregate": {"choices": ["sum", "mean"]}, "density": [0.2, 0.8]}}
    result = run_search(evaluator, space, n_trials=8, seed=0)
    states = {r["params"]["aggregate"]: r["state"] for r in result.trials}
    assert states == {"sum": "COMPLETE", "mean": "FAIL"}
    failed = [r for r in result.trials if r["state"] == "FAIL"]
    assert all("sign_election" in r["error"] and r["value"] is None for r in failed)
    assert result.best is not None and result.best.params["aggregate"] == "sum"
    result = run_search(evaluator, {"breadcrumbs": {"aggregate": {"choices": ["mean"]}}}, n_trials=2)
    assert [r["state"] for r in result.trials] == ["FAIL", "FAIL"] and result.best is None
    with pytest.raises(SamergeError, match="no trial of the search completed"):
        result.recipe()


@pytest.mark.parametrize("space, message", [
    ({}, "search space is empty"),
    ({"tiez": {}}, "unknown method 'tiez'; available methods: weight_average"),
    ({"ties": {"dens": [0.1, 0.2]}}, "search space ties: unknown parameter 'dens'; valid parameters: density, scale"),
    ({"ties": {"density": [0.5, 0.1]}}, "search space ties.density: low 0.5 is above high 0.1"),
    ({"ties": {"density": [0.1, 1.5]}}, r"search space ties.density = 1.5: density: .*less than or equal to 1"),
    ({"ties": {"aggregate": {"choices": ["sum", "median"]}}}, r"search space ties.aggregate = 'median'"),
    ({"ties": {"scale": {"low": 0.0, "high": 1.0, "log": True}}}, "ties.scale: a log range needs low > 0"),
    ({"ties": {"scale": {"low": 0.1, "hi": 1.0}}}, "ties.scale: a range is {low, high}"),
    ({"ties": {"scale": [0.1, 0.5, 0.9]}}, r"ties.scale: a range is \[low, high\]"),
    ({"ties": {"weights": 1.0}}, "ties.weights: give a range"),
    ({"pcb": {"weights": [0.5, 1.5]}}, "search space pcb: unknown parameter 'weights'"),
    ({"sa_merging": {"iterations": [2.0, 5]}}, "sa_merging.iterations: an integer parameter takes an integer range"),
    ({"ties": {"aggregate": "median"}}, "search space ties: aggregate"),
    ({"breadcrumbs": {"aggregate": "mean"}}, "search space breadcrumbs: .*needs sign_election=true"),
    ({"ties": {"weights": [-2.0, float("inf")]}}, "ties.weights: a range needs two finite numbers"),
])
def test_space_mistakes_are_one_line(space: dict[str, Any], message: str) -> None:
    with pytest.raises(SamergeError, match=message) as err:
        parse_space(space, 3)
    assert "\n" not in str(err.value)


def test_space_parsing() -> None:
    s = parse_space({**SPACE, "sa_merging": {"iterations": [3, 8], "saliency_sign": "own_sign"}, "pcb": None}, 3)
    assert isinstance(s, SearchSpace) and list(s.methods) == ["ties", "task_arithmetic", "weight_average",
                                                              "sa_merging", "pcb"]
    assert s.methods["sa_merging"]["iterations"].kind == "int"
    assert s.methods["sa_merging"]["saliency_sign"].kind == "fixed"
    assert s.methods["ties"]["scale"].log and s.methods["ties"]["weights"].per_expert
    assert s.searched("ties") == ["ties.density", "ties.scale", "ties.aggregate", "ties.weights.0",
                                  "ties.weights.1", "ties.weights.2"]
    assert s.searched("pcb") == []
    key = study_key(s, 0, 1, "tiny")
    same = parse_space({**SPACE, "sa_merging": {"iterations": [3, 8], "saliency_sign": "own_sign"}, "pcb": {}}, 3)
    assert len(key) == 16 and key == study_key(same, 0, 1, "tiny")
    assert len({key, study_key(s, 1, 1, "tiny"), study_key(s, 0, 2, "tiny"), study_key(s, 0, 1, "other")}) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"n_trials": 0}, "n_trials must be an integer >= 1"),
    ({"n_trials": 2, "batch": 0}, "batch must be an integer >= 1"),
    ({"n_trials": 2, "timeout": -1}, "timeout must be a positive number"),
    ({"n_trials": 2, "n_jobs": 2, "map_trials": list}, "give n_jobs or map_trials, not both"),
])
def test_search_mistakes_are_one_line(evaluator: Evaluator, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SamergeError, match=message) as err:
        run_search(evaluator, SPACE, **kwargs)
    assert "\n" not in str(err.value)


def test_a_task_without_validation_split() -> None:
    suite, experts = tiny(n_tasks=2)
    experts[1].task.val = []
    with pytest.raises(SamergeError, match="task 'task1' has no validation split"):
        Evaluator.build(suite, experts)


def test_map_trials_runs_the_batch_elsewhere(evaluator: Evaluator) -> None:
    """A caller's map_trials (here: each spec pickled and evaluated in a separate call, as a worker would) gives
    the same search as the local threads."""
    import pickle

    seen: list[int] = []

    def remote(specs: list[TrialSpec]) -> list[Any]:
        seen.append(len(specs))
        out = [pickle.loads(pickle.dumps(evaluate_trial(evaluator, pickle.loads(pickle.dumps(s)))))
               for s in reversed(specs)]  # any order: results are matched by trial number
        return out

    mapped = run_search(evaluator, SPACE, n_trials=6, seed=5, batch=3, map_trials=remote, startup_trials=3)
    local = run_search(evaluator, SPACE, n_trials=6, seed=5, batch=3, startup_trials=3)
    copies = sum("copied_from" in t.user_attrs for t in mapped.study.trials)  # not handed out: nothing to run
    assert len(seen) == 2 and all(n <= 3 for n in seen) and sum(seen) == 6 - copies
    assert signature(mapped) == signature(local)


def test_outputs(evaluator: Evaluator, tmp_path: Path) -> None:
    result = run_search(evaluator, SPACE, n_trials=10, seed=2, startup_trials=3)
    out = result.write_outputs(tmp_path / "search")
    names = {p.name for p in out.iterdir()}
    assert names == {"trials.csv", "best.json", "history.png", "importances.png", "importances.csv"}
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["slot"]) for r in rows] == [r["slot"] for r in result.trials]
    assert [r["state"] for r in rows] == [r["state"] for r in result.trials]
    assert [json.loads(r["params"]) for r in rows] == [r["params"] for r in result.trials]
    best = json.loads((out / "best.json").read_text())
    assert best["best"]["number"] == result.best.number and best["best"]["value"] == result.best.value
    assert best["best"]["recipe"] == result.recipe() and best["tasks"] == evaluator.tasks
    imp = list(csv.DictReader((out / "importances.csv").open()))
    assert imp and all(0.0 <= float(r["importance"]) <= 1.0 for r in imp)
    assert "method" in {r["param"] for r in imp}
    for png in ("history.png", "importances.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a single method at its defaults: nothing to weigh, the plot says so
    single = run_search(evaluator, {"task_arithmetic": {}}, n_trials=2)
    out2 = single.write_outputs(tmp_path / "single")
    assert list(csv.DictReader((out2 / "importances.csv").open())) == []
    assert single.best is not None and single.best.params == {} and not math.isnan(single.best.value)


def test_search_on_the_text_suite(suite_cache: Path) -> None:
    """Four trials on the real text suite (MiniLM, two tasks): validation scores, a best trial, its recipe."""
    from samerge.evaluation.catalog import open_suite

    suite, data = open_suite("text", "small", 0, tasks=["sentiment", "language_id"])
    experts = [suite.expert(t) for t in data]
    ev = Evaluator.build(suite, experts)
    space = {"ties": {"density": [0.1, 0.5], "scale": [0.3, 1.2]}, "task_arithmetic": {"scale": [0.1, 1.0]}}
    result = run_search(ev, space, n_trials=4, seed=0)
    assert len(result.trials) == 4 and result.best is not None
    assert all(r["state"] == "COMPLETE" and 0.0 < r["value"] <= 1.5 for r in result.trials)
    assert set(result.best.scores) == {"sentiment", "language_id"}
    assert ev.scores(result.best_state()) == [result.best.scores[t] for t in ev.tasks]
    assert result.recipe()["method"] == result.best.method


def test_a_configuration_drawn_again_is_not_run_again(evaluator: Evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods at their defaults: two configurations, so two merges; every other trial copies one's result."""
    merges: list[str] = []
    original = Evaluator.merge

    def counting(self: Evaluator, method: str, params: Any) -> Any:
        merges.append(method)
        return original(self, method, params)

    result = run_search(evaluator, {"task_arithmetic": {}, "weight_average": {}}, n_trials=6, seed=0)
    trials = sorted(result.study.trials, key=lambda t: t.number)
    copies = [t for t in trials if "copied_from" in t.user_attrs]
    assert len(copies) == 6 - len({t.params["method"] for t in trials}) >= 3
    by_slot = {t.user_attrs["slot"]: t for t in trials}
    for t in copies:
        first = by_slot[t.user_attrs["copied_from"]]
        assert first.params == t.params and "copied_from" not in first.user_attrs
        assert t.value == first.value and t.user_attrs["scores"] == first.user_attrs["scores"]
    monkeypatch.setattr(Evaluator, "merge", counting)  # the real merge, counted
    again = run_search(evaluator, {"task_arithmetic": {}, "weight_average": {}}, n_trials=6, seed=0)
    assert sorted(merges) == sorted({t.params["method"] for t in trials}) and signature(again) == signature(result)


def test_measured_scores_stand_in_for_a_trial(evaluator: Evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``measured``: a configuration whose validation scores were measured elsewhere is not merged again, and the
    study is the one made without it (the scores here are measured by hand, the oracle); a wrong count is one line."""
    space = {"task_arithmetic": {"scale": [0.1, 1.0]}, "pcb": {}}
    plain = run_search(evaluator, space, n_trials=6, seed=0, start=["pcb"])
    by_hand = evaluator.scores(evaluator.merge("pcb", {}))
    asked: list[tuple[str, dict[str, Any]]] = []

    def measured(method: str, params: dict[str, Any]) -> list[float] | None:
        asked.append((method, params))
        return by_hand if (method, params) == ("pcb", {}) else None

    merges: list[str] = []
    original = Evaluator.merge
    monkeypatch.setattr(Evaluator, "merge", lambda self, m, p: merges.append(m) or original(self, m, p))
    given = run_search(evaluator, space, n_trials=6, seed=0, start=["pcb"], measured=measured)
    assert signature(given) == signature(plain) and given.trials[0]["method"] == "pcb"
    assert "pcb" not in merges and ("pcb", {}) in asked
    assert len(merges) == 6 - sum(r["method"] == "pcb" for r in given.trials)
    assert given.study.trials[0].user_attrs.get("measured") is True and given.trials[0]["seconds"] == 0.0
    with pytest.raises(SamergeError, match=r"^search: measured scores of pcb give 1 scores for \d+ tasks$"):
        run_search(evaluator, space, n_trials=2, seed=0, start=["pcb"], measured=lambda m, p: [0.5])


def test_one_driver_per_study_file(evaluator: Evaluator, tmp_path: Path) -> None:
    from samerge.io.writer import OutputLock

    db = tmp_path / "study.db"
    with OutputLock(db):  # another driver holds the study file
        with pytest.raises(SamergeError, match="another samerge process is writing this output now"):
            run_search(evaluator, SPACE, n_trials=1, storage=db)
    assert len(run_search(evaluator, SPACE, n_trials=1, storage=db).trials) == 1
    # the outputs go next to the study without touching it (files are written one by one, never the folder)
    run_search(evaluator, SPACE, n_trials=1, storage=db).write_outputs(tmp_path)
    assert (tmp_path / "trials.csv").is_file() and len(run_search(evaluator, SPACE, n_trials=2, storage=db).trials) == 2
