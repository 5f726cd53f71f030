"""The pipeline's ``search`` stage (issue 17) on the real ``text`` suite (MiniLM, experts of ``sentiment`` and
``language_id`` fine-tuned once per session into the suite cache): the validation-selected merge, its recipe, its
study, the data-free fallback, and the champion alias of a real MLflow server.

What is checked: ``work/search/recipe.yaml`` run through the installed ``samerge merge --config`` writes
``work/search/model`` byte for byte, and re-scoring that model on the validation split gives the validation score
the stage reported; the same seed picks the same trials and the same best trial in two workdirs; a ``samerge stage
search`` killed by SIGKILL mid-study and run again finishes the same study (the trials it had finished kept, not
run again); an expert replaced under the same name is searched again, not answered from the old study; a search in
which no trial completes is one line; with ``search.enabled: false`` the stage writes the data-free fallback merge,
labelled so in the report, and the evaluate stage before the search is one line; the ``champion`` alias moves only
on a better validation score.

Every workdir starts from one acquisition (hard links of its files), and the space is cheap: task arithmetic's
scale and TIES' density, three trials (a trial merges MiniLM and scores 2 x 64 validation examples, ~2 s).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from samerge.io import open_checkpoint
from samerge.layout import STUDY, Layout
from samerge.stages import run_stage, search_evaluator

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
BIN = Path(sys.executable).parent
TASKS = ["sentiment", "language_id"]
SPACE = {"task_arithmetic": {"scale": [0.1, 1.0]}, "ties": {"density": [0.1, 0.5]}}
OVER: dict[str, Any] = {"acquire.tasks": TASKS, "prune.methods": ["task_arithmetic"], "report.track": False,
                        "search.n_trials": 3, "search.space": SPACE}


@pytest.fixture(scope="module")
def acquired(suite_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``work/acquire`` of the two tasks, made once for the module (experts from the session's suite cache)."""
    wd = tmp_path_factory.mktemp("acquired")
    run_stage("acquire", PARAMS, wd, overrides=OVER, quiet=True)
    return wd / "work" / "acquire"


def _workdir(root: Path, acquired: Path, *stages: str) -> Path:
    """A fresh workdir holding the acquisition (and ``stages``' outputs of the workdir above ``acquired``) as hard
    links: the stages publish new folders and never write into these files."""
    for stage in ("acquire", *stages):
        shutil.copytree(acquired.parent / stage, root / "work" / stage, copy_function=os.link)
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k] for k in ck.keys()}


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _trials(wd: Path) -> list[dict[str, str]]:
    with open(wd / "work" / "search" / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def _sets(over: dict[str, Any]) -> list[str]:
    """``--set SECTION.KEY=VALUE`` options of ``samerge stage`` for ``over`` (values as JSON, which YAML reads)."""
    return [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def searched(acquired: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One search stage run (three trials): its workdir and what run_stage returned."""
    wd = _workdir(tmp_path_factory.mktemp("searched"), acquired)
    return wd, run_stage("search", PARAMS, wd, overrides=OVER, quiet=True)


# ------------------------------------------------------------------------------------------------ the chosen merge


def test_the_recipe_reproduces_the_searched_merge_and_its_validation_score(searched, tmp_path):
    wd, result = searched
    out = wd / "work" / "search"
    summary, best = _json(out / "summary.json"), _json(out / "best.json")["best"]
    assert summary["kind"] == result["kind"] == "validation-selected" and summary["trials"] == 3
    assert summary["method"] == best["method"] in SPACE and summary["best_trial"] == best["number"]
    assert summary["validation_score"] == best["value"] == max(float(r["value"]) for r in _trials(wd))
    assert _json(out / "metrics.json") == {k: summary[k] for k in ("validation_score", "best_trial", "trials",
                                                                   "merge_seconds")}
    # a complete Hugging Face folder, like the prune stage's merges
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= {f.name for f in
                                                                                   (out / "model").iterdir()}
    # the recipe: a `samerge merge --config` file naming the acquired files by absolute path, every parameter spelt out
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    acq = wd / "work" / "acquire"
    assert recipe["base"] == str(acq / "base.safetensors")
    assert recipe["experts"] == [str(acq / "experts" / t / "expert.safetensors") for t in TASKS]
    assert recipe["method"] == summary["method"] and recipe["params"] == summary["params"] == summary["recipe"][
        "params"]
    assert set(best["params"]) < set(recipe["params"])  # the searched ones and the method's defaults
    r = subprocess.run([str(BIN / "samerge"), "merge", "--config", str(out / "recipe.yaml"), "--out",
                        str(tmp_path / "again"), "--quiet"], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open_checkpoint(tmp_path / "again") as again, open_checkpoint(out / "model") as model:
        assert list(again.keys()) == list(model.keys())
        for k in model.keys():
            a, m = again[k], model[k]
            assert a.dtype == m.dtype and a.shape == m.shape and torch.equal(a, m), k
    # the model is the state the best trial scored: merged again in memory, tensor for tensor, and re-scored on the
    # validation split it gives the trial's per-task scores and the stage's validation score
    ev = search_evaluator(Layout(wd))
    assert ev.tasks == TASKS
    model = _state(out / "model")
    scored = ev.merge(best["method"], best["params"])
    assert scored.keys() == model.keys() and all(torch.equal(scored[k], model[k]) for k in model)
    scores = ev.scores(model)
    assert scores == [best["scores"][t] for t in TASKS]
    values = ev.normalized(scores)
    assert values == [best["normalized"][t] for t in TASKS]
    assert sum(values) / len(values) == pytest.approx(summary["validation_score"], abs=1e-12)


def test_a_fixed_seed_picks_the_same_trial_twice(searched, acquired, tmp_path):
    first, _ = searched
    second = _workdir(tmp_path / "second", acquired)
    run_stage("search", PARAMS, second, overrides=OVER, quiet=True)

    def rows(wd: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _trials(wd)]

    assert rows(second) == rows(first) and len(rows(first)) == 3
    assert [r["state"] for r in rows(first)] == ["COMPLETE"] * 3
    assert len({r["params"] for r in rows(first)}) == 3  # three configurations, not one drawn three times
    best = [_json(wd / "work" / "search" / "best.json")["best"] for wd in (first, second)]
    assert best[0] == {**best[1], "recipe": best[0]["recipe"]}  # the recipe names each workdir's own files
    assert best[0]["recipe"]["params"] == best[1]["recipe"]["params"]


# ------------------------------------------------------------------------------------------------ resume


def _finished_slots(db: Path) -> dict[int, int]:
    """slot -> trial number of the study's finished trials (COMPLETE or PRUNED), {} while the study is not there."""
    import optuna

    if not db.exists():
        return {}
    url = f"sqlite:///{db}"
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        (name,) = optuna.study.get_all_study_names(storage=url)
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception:  # not created yet, or busy
        return {}
    S = optuna.trial.TrialState
    return {int(t.user_attrs["slot"]): t.number for t in trials if t.state in (S.COMPLETE, S.PRUNED)}


def test_a_killed_search_stage_resumes_its_study(acquired, tmp_path):
    """`samerge stage search` killed (SIGKILL) after two of six trials, then run again: the same trials as an
    uninterrupted search, the two finished ones kept from the first attempt (not run again), nothing half-written."""
    over = {**OVER, "search.n_trials": 6}
    killed = _workdir(tmp_path / "killed", acquired)
    db = killed / "work" / STUDY
    cmd = [str(BIN / "samerge"), "stage", "search", "--params", str(PARAMS), "--workdir", str(killed), "--quiet",
           *_sets(over)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(before := _finished_slots(db)) < 2:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the search stage finished no two trials in 10 minutes"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _finished_slots(db)  # what the kill left (a trial may have finished meanwhile)
    assert 2 <= len(before) < 6
    assert not (killed / "work" / "search").exists()  # the stage publishes its folder whole or not at all

    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = _workdir(tmp_path / "whole", acquired)
    run_stage("search", PARAMS, whole, overrides=over, quiet=True)

    def key(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
        return [(r["slot"], r["state"], r["method"], r["params"], r["value"]) for r in rows]

    resumed = _trials(killed)
    assert key(resumed) == key(_trials(whole)) and [r["slot"] for r in resumed] == [str(s) for s in range(6)]
    # the trials finished before the kill are the ones the resumed study reports (same trial numbers)
    assert {int(r["slot"]): int(r["number"]) for r in resumed if int(r["slot"]) in before} == before
    assert _json(killed / "work" / "search" / "best.json")["best"]["params"] == _json(
        whole / "work" / "search" / "best.json")["best"]["params"]
    summaries = [_json(wd / "work" / "search" / "summary.json") for wd in (killed, whole)]
    assert summaries[0]["validation_score"] == summaries[1]["validation_score"]
    assert summaries[0]["trials"] == summaries[1]["trials"] == 6
    assert [p.name for p in (killed / "work").iterdir() if p.name.startswith(".")] == []  # no temporary, no lock


def test_a_changed_expert_is_searched_again(acquired, tmp_path):
    """An expert replaced under the same name — `samerge experts add --overwrite` into a registry, then the acquire
    stage (what the watch-experts flow reports as changed and re-merges): the manifest lists the same names and
    tasks, the files differ. The search must score the experts it merges now, not resume the finished study of the
    old ones: the validation score it reports is the current model's."""
    wd = _workdir(tmp_path / "run", acquired)
    run_stage("search", PARAMS, wd, overrides=OVER, quiet=True)
    # the new acquisition: language_id's expert replaced by another fine-tuned encoder of the same base (here
    # sentiment's), its head and task unchanged
    acq = wd / "work" / "acquire" / "experts"
    (acq / "language_id" / "expert.safetensors").unlink()
    shutil.copyfile(acq / "sentiment" / "expert.safetensors", acq / "language_id" / "expert.safetensors")
    run_stage("search", PARAMS, wd, overrides=OVER, quiet=True)
    summary = _json(wd / "work" / "search" / "summary.json")
    ev = search_evaluator(Layout(wd))
    values = ev.normalized(ev.scores(_state(wd / "work" / "search" / "model")))
    assert sum(values) / len(values) == pytest.approx(summary["validation_score"], abs=1e-12), (
        "the search resumed the finished study of the replaced expert (stages.search's study fingerprint names the "
        "experts and their tasks, not their files): add the acquired files' sha256 (samerge.io.sha256_file of "
        "base.safetensors and each expert's expert.safetensors and head.safetensors) to the fingerprint")


def test_a_search_where_no_trial_completes_is_one_line(acquired, tmp_path):
    """Every trial's merge refuses its parameters (breadcrumbs' aggregate=mean needs sign_election, a rule across
    fields that only a trial's merge checks): the stage ends in one line naming the error, publishes nothing."""
    wd = _workdir(tmp_path / "run", acquired)
    over = {**OVER, "search.n_trials": 2, "search.space": {"breadcrumbs": {"aggregate": {"choices": ["mean"]}}}}
    r = subprocess.run([str(BIN / "samerge"), "stage", "search", "--params", str(PARAMS), "--workdir", str(wd),
                        "--quiet", *_sets(over)], capture_output=True, text=True, env=_env(), timeout=600)
    assert "Traceback" not in r.stderr and r.returncode == 2, (
        f"exit {r.returncode}: {r.stderr[-1500:]}\nstages.search takes res.best.method when no trial completed "
        "(res.best is None): raise SamergeError('search: no trial completed (N finished; first error: ...); change "
        "search.space') before writing the outputs")
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("samerge: error:") and "no trial" in line and "sign_election" in line
    assert not (wd / "work" / "search").exists()


# ------------------------------------------------------------------------------------------------ data-free


def test_without_a_search_the_data_free_fallback_is_merged_and_labelled(acquired, tmp_path):
    # SA-Merging (the fallback) with two iterations, to keep the test short; the evaluation on the validation split
    # (a smaller one; the labels are the point here)
    over = {**OVER, "prune.methods": ["sa_merging"], "prune.sa_merging.iterations": 2, "evaluate.split": "val"}
    wd = _workdir(tmp_path / "run", acquired)
    run_stage("prune", PARAMS, wd, method="sa_merging", overrides=over, quiet=True)
    # the evaluation before the search: one line naming the stage to run, through the installed CLI
    r = subprocess.run([str(BIN / "samerge"), "stage", "evaluate", "--params", str(PARAMS), "--workdir", str(wd),
                        "--quiet", *_sets(over)], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["samerge: error: no search merge; run `samerge stage search` first"]

    off = {**over, "search.enabled": False}
    result = run_stage("search", PARAMS, wd, overrides=off, quiet=True)
    out = wd / "work" / "search"
    summary = _json(out / "summary.json")
    assert result["kind"] == summary["kind"] == "data-free" and summary["skipped"] == "search.enabled is false"
    assert summary["method"] == "sa_merging"  # search.fallback, with the prune section's parameters
    assert summary["params"]["iterations"] == 2 and summary["params"]["prune_ratio"] == _json(
        wd / "work" / "prune" / "sa_merging" / "summary.json")["params"]["prune_ratio"]
    assert "validation_score" not in summary and not (out / "trials.csv").exists()
    assert not (wd / "work" / STUDY).exists()  # no study was opened
    merged, fallback = _state(out / "model"), _state(wd / "work" / "prune" / "sa_merging" / "model")
    assert merged.keys() == fallback.keys() and all(torch.equal(merged[k], fallback[k]) for k in merged)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"] == "sa_merging"

    run_stage("evaluate", PARAMS, wd, overrides=off, quiet=True)
    run_stage("report", PARAMS, wd, overrides=off, quiet=True)
    rows = list(csv.DictReader((wd / "work" / "evaluate" / "scores.csv").open()))
    assert list(rows[0]) == ["suite", "method", "task", "score", "accuracy", "normalized"]
    assert {r["method"] for r in rows} == {"base", "expert", "sa_merging", "search"}
    md = (wd / "work" / "report" / "report.md").read_text()
    assert "| method | kind | sentiment | language_id | average |" in md
    labelled = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines()
                if line.startswith("| `")}
    assert labelled == {"`base`": "", "`expert`": "", "`sa_merging`": "data-free", "`search`": "data-free"}
    html = (wd / "work" / "report" / "report.html").read_text()
    assert '<code>search</code> <span class="kind">data-free</span>' in html
    assert "No search (search.enabled is false): the data-free sa_merging merge." in html
    assert not (wd / "work" / "report" / "search_history.png").exists() and "search_history" not in html


# ------------------------------------------------------------------------------------------------ MLflow champion


def test_the_champion_moves_only_on_a_better_validation_score(acquired, tmp_path, mlflow_server, monkeypatch):
    """Two searches registered on a real MLflow server: a weak fixed task arithmetic (scale 0.1), then the
    three-trial search, then the weak one again. The first registration is champion; the better validation score
    moves the alias; the worse one does not. Each search child run holds one nested run per trial. (An equal score
    that does not move it: tests/test_tracking_model.py.)"""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # tracked, registering the repository's default (the search); scored on the validation split (smaller: the
    # registration is the point) and a small saliency sample
    base = {**OVER, "report.track": True, "score.sample": 1000, "evaluate.split": "val"}
    weak = {**base, "search.space": {"task_arithmetic": {"scale": 0.1}}, "search.n_trials": 1}
    w_weak = _workdir(tmp_path / "weak", acquired)
    for stage in ("extract", "score"):
        run_stage(stage, PARAMS, w_weak, overrides=weak, quiet=True)
    run_stage("prune", PARAMS, w_weak, method="task_arithmetic", overrides=weak, quiet=True)
    w_best = _workdir(tmp_path / "best", w_weak / "work" / "acquire", "extract", "score", "prune")

    def pipeline(wd: Path, over: dict[str, Any]) -> dict[str, Any]:
        run_stage("search", PARAMS, wd, overrides=over, quiet=True)
        run_stage("evaluate", PARAMS, wd, overrides=over, quiet=True)
        return run_stage("report", PARAMS, wd, overrides=over, quiet=True)["mlflow"]

    def validation(wd: Path) -> float:
        return _json(wd / "work" / "search" / "summary.json")["validation_score"]

    first = pipeline(w_weak, weak)
    better = pipeline(w_best, base)
    worse = run_stage("report", PARAMS, w_weak, overrides=weak, quiet=True)["mlflow"]  # its merge registered again
    v_weak, v_best = validation(w_weak), validation(w_best)
    assert v_weak < v_best  # the fixed weak merge really is worse on validation than the search's choice

    runs = (first, better, worse)
    assert [r["version"] for r in runs] == ["1", "2", "3"]
    assert all(r["compared_on"] == "samerge.validation_score" for r in runs)  # never the test split's score
    assert [r["validation_score"] for r in runs] == [v_weak, v_best, v_weak]
    assert first["champion"] and first["previous_champion"] is None
    assert better["champion"] and better["previous_champion"] == "1"
    assert not worse["champion"] and worse["previous_champion"] == "2"

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    assert client.get_model_version_by_alias("samerge-text", "champion").version == "2"
    for r in runs:
        tags = client.get_model_version("samerge-text", r["version"]).tags
        assert float(tags["samerge.validation_score"]) == pytest.approx(r["validation_score"], abs=1e-6)
        assert tags["samerge.method"] == "search"
    # the search child run of each pipeline run: one nested run per trial, its parameters and its value
    for r, wd in ((first, w_weak), (better, w_best)):
        search_run = r["children"]["search"]
        nested = client.search_runs([client.get_run(search_run).info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{search_run}'")
        trials = _trials(wd)
        assert len(nested) == len(trials) == (1 if wd == w_weak else 3)
        assert all(n.data.tags["samerge.stage"] == "search-trial" and n.data.tags["samerge.trial.state"] == "COMPLETE"
                   for n in nested)
        assert sorted(n.data.params["method"] for n in nested) == sorted(t["method"] for t in trials)
        assert sorted(n.data.metrics["value"] for n in nested) == sorted(float(t["value"]) for t in trials)
        assert client.get_run(search_run).data.metrics["validation_score"] == pytest.approx(validation(wd))
