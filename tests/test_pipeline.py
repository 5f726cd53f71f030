"""The pipeline: stage functions, params validation, `dvc repro` in a real git+DVC repo, MLflow against a real server."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import samerge
from samerge.cli import main
from samerge.io import open_checkpoint
from samerge.layout import STUDY, read_rows
from samerge.params import load_params
from samerge.stages import STAGES
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the search stage kept cheap: three trials over task arithmetic's scale and TIES' density (~2 s each)
SMALL = {"acquire.tasks": ["sentiment", "language_id"], "prune.methods": ["task_arithmetic", "sa_merging"],
         "search.n_trials": 3, "search.space": {"task_arithmetic": {"scale": [0.1, 1.0]}, "ties": {"density": [0.1, 0.5]}}}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1", **extra)
    return env


# ------------------------------------------------------------------------------------------------ params


def test_params_file_is_valid_and_names_the_stages():
    p = load_params(REPO / "params.yaml")
    assert set(type(p).model_fields) == set(STAGES)
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)  # the same names in dvc.yaml, params.yaml and the CLI
    for name, stage in dvc["stages"].items():
        assert f"samerge stage {name}" in stage["cmd"]  # deps: test_dvc_deps_cover_every_module_each_stage_runs


@pytest.mark.parametrize("override, message", [
    ({"prune.prune_rate": 0.3}, "parameters: unknown parameter 'prune_rate' at prune; valid parameters: methods, "
                                "max_memory, device, weight_average, task_arithmetic, ties"),
    ({"prune.sa_merging.prune_ratio": 1.5}, "parameters: prune.sa_merging.prune_ratio: input should be less than 1"),
    ({"prune.sa_merging.prune_rate": 0.3}, "unknown parameter 'prune_rate' at prune.sa_merging; valid parameters: "
                                           "preset, iterations, prune_ratio"),
    ({"prune.methods": ["task_arithmetic", "dare"]}, "prune.methods lists 'dare' but there is no prune.dare section"),
    ({"prune.methods": ["tie"]}, "unknown method 'tie'"),
    ({"acquire.size": "huge"}, "parameters: acquire.size: input should be 'small' or 'full' (got 'huge')"),
    ({"bogus.x": 1}, "unknown parameter 'bogus'; valid parameters: acquire, extract, score, prune, search, evaluate, "
                     "report"),
    ({"search.space": {"ties": {"densty": [0.1, 0.5]}}}, "parameters: search.space: search space ties: unknown "
                                                         "parameter 'densty'; valid parameters: density, scale"),
    ({"search.fallback": "tie"}, "parameters: search.fallback: unknown method 'tie'; available methods: "),
    ({"search.start": ["ties[density=0.9]"]}, "parameters: search: search start 'ties[density=0.9]': ties.density = 0.9 "
                                              "lies outside the search space ([0.05, 0.6])"),
    ({"search.n_trials": 0}, "parameters: search.n_trials: input should be greater than or equal to 1 (got 0)"),
])
def test_bad_parameters_are_refused_with_the_valid_options(override, message):
    with pytest.raises(samerge.SamergeError, match=re.escape(message)):
        load_params(REPO / "params.yaml", override)


def test_stage_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("prune:\n  sa_merging: {prune_ratio: 2}\n")
    assert main(["stage", "prune", "--params", str(tmp_path / "params.yaml"), "--method", "ties"]) == 2
    assert capsys.readouterr().err.startswith("samerge: error: parameters: prune.sa_merging.prune_ratio")
    assert main(["stage", "extract", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "run the acquire stage first" in capsys.readouterr().err
    assert main(["stage", "search", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "run the acquire stage first" in capsys.readouterr().err
    assert main(["stage", "search", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path),
                 "--method", "ties"]) == 2
    assert "--method applies to the prune stage only, not search" in capsys.readouterr().err
    assert main(["stage", "prune", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path),
                 "--method", "dare"]) == 2
    assert "not in prune.methods" in capsys.readouterr().err
    assert main(["stage", "score", "--set", "prune_ratio=0.3"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    # under dvc, a task file outside inputs/ is refused before anything runs (dvc would not see it change)
    (tmp_path / "inputs").mkdir()
    assert main(["stage", "acquire", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path), "--inputs",
                 str(tmp_path / "inputs"), "--set", f"acquire.add_tasks={{mine: {tmp_path / 'mine.csv'}}}"]) == 2
    err = capsys.readouterr().err
    assert "acquire.add_tasks.mine" in err and "is outside" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()
    assert main(["stage", "score", "--inputs", "inputs"]) == 2
    assert "--inputs applies to the acquire stage only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ DVC


def _make_repo(dest: Path, params: dict) -> Path:
    """A fresh git + DVC repo with this project's pipeline and library (the stages run its copy of samerge)."""
    shutil.copytree(REPO / "samerge", dest / "samerge", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "inputs/README.md"):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for k, v in params.items():
        *sections, key = k.split(".")
        cur = data
        for s in sections:
            cur = cur[s]
        cur[key] = v
    (dest / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=dest, check=True)
    return dest


def _dvc(repo: Path, *args: str) -> str:
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def _undeclared(repo: Path) -> list[str]:
    """Files under work/ that git would take in but no stage of dvc.lock declares (an out, metric or plot): a
    stage's file DVC does not restore with its other outputs (`dvc checkout`, `dvc exp apply`), so it can belong to
    another run than they do."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    declared = [o["path"].rstrip("/") for st in lock["stages"].values() for o in st.get("outs", [])]
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "work"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.split()
    return [f for f in untracked if Path(f).name != ".gitignore"
            and not any(f == d or f.startswith(d + "/") for d in declared)]


def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(suite_cache, tmp_path):
    repo = _make_repo(tmp_path / "repo", {**SMALL, "report.track": False})
    out = _dvc(repo, "repro")
    undeclared = _undeclared(repo)  # asserted last, so that everything else is checked whatever it holds
    for stage in ("acquire", "extract", "score", "prune@task_arithmetic", "prune@sa_merging", "search", "evaluate",
                  "report"):
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"acquire", "extract", "score", "prune@task_arithmetic", "prune@sa_merging",
                                   "search", "evaluate", "report"}
    assert lock["stages"]["search"]["params"]["params.yaml"]["search"]["n_trials"] == 3
    assert lock["stages"]["prune@sa_merging"]["params"]["params.yaml"]["prune.sa_merging"]["prune_ratio"] == 0.15
    assert any(d["path"] == "samerge/saliency.py" for d in lock["stages"]["score"]["deps"])
    # metrics and plots the stages declare
    metrics = json.loads((repo / "work/evaluate/metrics.json").read_text())
    assert set(metrics) == {"base", "expert", "task_arithmetic", "sa_merging", "search"}
    per_task = list(csv.DictReader((repo / "work/evaluate/scores.csv").read_text().splitlines()))
    score = {(r["method"], r["task"]): float(r["score"]) for r in per_task}
    tasks = sorted({t for _, t in score if t != "average"})
    want = sum(score[("sa_merging", t)] / score[("expert", t)] for t in tasks) / len(tasks)
    assert metrics["sa_merging"]["normalized_average"] == pytest.approx(want, abs=2e-6)
    assert metrics["sa_merging"]["average"] > metrics["base"]["average"]
    shown = _dvc(repo, "metrics", "show", "--json")
    assert "normalized_average" in shown and "final_density" in shown and "validation_score" in shown
    searched = json.loads((repo / "work/search/summary.json").read_text())
    assert searched["kind"] == "validation-selected" and searched["trials"] == 3
    assert "| `search` | validation-selected |" in (repo / "work/report/report.md").read_text()

    def leaves(x):
        return [v for y in x.values() for v in leaves(y)] if isinstance(x, dict) else [x]

    for f in ("work/prune/sa_merging/metrics.json", "work/prune/task_arithmetic/metrics.json",
              "work/score/metrics.json", "work/search/metrics.json", "work/evaluate/metrics.json",
              "work/extract/summary.json"):
        got = leaves(json.loads((repo / f).read_text()))  # dvc metrics: numbers only, no copies of params
        assert got and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got), f
    iters = (repo / "work/prune/sa_merging/iterations.csv").read_text().splitlines()
    assert len(iters) == 1 + 1 + 10  # header, t = 0, ten iterations
    for png in ("work/report/per_task.png", "work/report/sa_iterations.png", "work/score/saliency_vs_magnitude.png",
                "work/extract/task_vector_cosine.png", "work/report/search_history.png", "work/search/history.png"):
        assert (repo / png).stat().st_size > 5000, png
    # the merged artifact: the base's tensors, finite, different from the base
    with open_checkpoint(repo / "work/prune/sa_merging/model") as merged, \
            open_checkpoint(repo / "work/acquire/base.safetensors") as base:
        assert list(merged.keys()) == list(base.keys())
        # the base file carries the model's config, so the graph methods merge with its heads, as the report does
        assert base.config == json.loads((repo / "work/acquire/hf/config.json").read_text())
        k = "encoder.layer.0.attention.self.query.weight"
        assert merged[k].isfinite().all() and not merged[k].equal(base[k])
    assert "sa_merging" in (repo / "work/prune/sa_merging/model/README.md").read_text()
    model_file = repo / "work/prune/sa_merging/model/model.safetensors"
    stamp = model_file.stat().st_mtime_ns

    # a second repro is a no-op
    again = _dvc(repo, "repro")
    assert "Running stage" not in again and "up to date" in again
    assert model_file.stat().st_mtime_ns == stamp

    # touching a library module marks exactly the stages whose code reaches it, and repro reruns those
    with open(repo / "samerge/tracking.py", "a") as f:  # MLflow: the report stage only
        f.write("\n# touched\n")
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"report"}
    assert set(re.findall(r"Running stage '([^']+)'", _dvc(repo, "repro"))) == {"report"}
    with open(repo / "samerge/api.py", "a") as f:  # the merge API: the merges only (the search writes one too)
        f.write("\n# touched\n")
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"prune@task_arithmetic", "prune@sa_merging", "search"}
    with open(repo / "samerge/io/checkpoint.py", "a") as f:  # every stage reads checkpoints
        f.write("\n# touched\n")
    assert set(json.loads(_dvc(repo, "status", "--json"))) == set(lock["stages"])
    subprocess.run(["git", "checkout", "-q", "samerge"], cwd=repo, check=True)
    _dvc(repo, "repro")  # back to the library as it is (report ran on the touched copy)

    # an experiment with another pruning ratio
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "lock"],
                   cwd=repo, check=True)
    exp = _dvc(repo, "exp", "run", "-S", "prune.sa_merging.prune_ratio=0.3")
    ran = set(re.findall(r"Running stage '([^']+)'", exp))
    # not score, not the other merges; the search, since its data-free fallback is SA-Merging with these parameters
    # (its study is complete: it runs no trial again)
    assert ran == {"prune@sa_merging", "search", "evaluate", "report"}, ran
    summary = json.loads((repo / "work/prune/sa_merging/summary.json").read_text())
    assert summary["params"]["prune_ratio"] == 0.3
    assert summary["final_density"] == pytest.approx(0.7 ** 10, rel=0.02)
    import optuna

    url = f"sqlite:///{repo / 'work' / STUDY}"
    (study,) = optuna.study.get_all_study_names(storage=url)
    assert len(optuna.load_study(study_name=study, storage=url).trials) == 3  # the search resumed, ran nothing new
    assert json.loads((repo / "work/search/summary.json").read_text())["best_trial"] == searched["best_trial"]

    # an expert registry under inputs/: the pipeline merges its experts, and adding one re-runs from acquire
    from samerge.registry import add_expert, init_registry

    for name in SMALL["acquire.tasks"]:
        shutil.copytree(repo / "work/acquire/experts" / name, tmp_path / "dropped" / name)
    reg = repo / "inputs" / "registry"
    init_registry(reg, "text")
    add_expert(reg, tmp_path / "dropped" / "sentiment")
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["acquire"]["experts_dir"] = "inputs/registry"
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    _dvc(repo, "repro")
    assert json.loads(_dvc(repo, "status", "--json")) == {}
    assert set(json.loads((repo / "work/evaluate/metrics.json").read_text())["sa_merging"]) == {
        "sentiment", "average", "normalized_average"}
    add_expert(reg, tmp_path / "dropped" / "language_id")
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"acquire"}  # so `dvc repro` re-runs from acquire
    ran = set(re.findall(r"Running stage '([^']+)'", _dvc(repo, "repro", "acquire")))
    assert ran == {"acquire"} and len(json.loads((repo / "work/acquire/manifest.json").read_text())["experts"]) == 2
    assert {"extract", "prune@sa_merging", "evaluate"} <= set(json.loads(_dvc(repo, "status", "--json")))
    # a registry outside inputs/ would leave dvc stale: the stage refuses it, in one line
    shutil.copytree(reg, tmp_path / "elsewhere")
    data["acquire"]["experts_dir"] = str(tmp_path / "elsewhere")
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    r = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "is outside inputs/" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    # every file the stages write is an output dvc.yaml declares, or a record of this workspace git ignores (stage.json,
    # the search's study)
    assert undeclared == [], (
        f"files the stages wrote that dvc.yaml does not declare and git does not ignore: {undeclared}; declare each "
        f"as an out (cache: false) or plot of its stage, or ignore it in .gitignore if it is a record of the workspace "
        f"(the search's study: /work/{STUDY})")


# ------------------------------------------------------------------------------------------------ MLflow


def test_the_stages_and_the_suite_report_score_alike(suite_cache, tmp_path):
    """One pipeline: the stages (acquire -> prune, search -> evaluate, files between them, merges streamed from disk)
    and `samerge suite report` (the same steps in memory) give the same scores for the same methods with the same
    parameters, row for row; the search's merge is scored like its recipe's method and parameters."""
    from samerge.evaluation.report import run_report
    from samerge.stages import run_stage

    params = REPO / "params.yaml"
    over = {**SMALL, "report.track": False}
    run_stage("acquire", params, tmp_path / "run", overrides=over, quiet=True)
    for m in SMALL["prune.methods"]:
        run_stage("prune", params, tmp_path / "run", method=m, overrides=over, quiet=True)
    run_stage("search", params, tmp_path / "run", overrides=over, quiet=True)
    run_stage("evaluate", params, tmp_path / "run", overrides=over, quiet=True)
    staged = {(r["method"], r["task"]): r for r in read_rows(tmp_path / "run" / "work" / "evaluate" / "scores.csv")}
    p = load_params(params, over)

    def spec_of(method, mp):
        return method + "[" + ",".join(f"{k}={v!r}" for k, v in mp.items() if v is not None) + "]"

    spec = {m: spec_of(m, p.prune.method_params(m)) for m in p.prune.methods}
    found = json.loads((tmp_path / "run" / "work" / "search" / "summary.json").read_text())
    spec["search"] = spec_of(found["method"], found["params"])
    rows = run_report("text", "small", tmp_path / "report", methods=list(spec.values()), tasks=SMALL["acquire.tasks"])
    reported = {(r["method"], r["task"]): r for r in rows}
    assert len(staged) == len(reported) == (2 + len(spec)) * 3  # base, expert, the merges; two tasks + average
    assert {m for m, _ in staged} == {"base", "expert", "task_arithmetic", "sa_merging", "search"}
    for (method, task), r in staged.items():
        got = reported[(spec.get(method, method), task)]
        for col in ("score", "accuracy", "normalized"):  # scores.csv: 6 decimals
            assert float(r[col]) == pytest.approx(got[col], abs=1e-6), (method, task, col)
    assert float(staged[("sa_merging", "average")]["normalized"]) > float(staged[("base", "average")]["normalized"])


def test_pipeline_is_tracked_in_a_real_mlflow_server(suite_cache, tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from samerge.stages import run_pipeline, run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = REPO / "params.yaml"
    work = tmp_path / "run"
    # the registered merge: SA-Merging's (prune.methods), whose champion is decided on the evaluation's normalized
    # average (the search's, decided on its validation score: tests/test_search_stage.py)
    small = {**SMALL, "report.register_method": "sa_merging"}
    weak = {**small, "prune.sa_merging.scale": 0.02}  # barely moves from the base

    def remerge(overrides):
        for m in SMALL["prune.methods"]:
            run_stage("prune", params, work, method=m, overrides=overrides, quiet=True)
        run_stage("evaluate", params, work, overrides=overrides, quiet=True)
        return run_stage("report", params, work, overrides=overrides, quiet=True)["mlflow"]

    first = run_pipeline(params, work, overrides=weak, quiet=True)["report"]["mlflow"]
    assert first["version"] == "1" and first["champion"]  # the first merge becomes champion
    assert first["compared_on"] == "samerge.normalized_average" and first["validation_score"] is None
    second = remerge(small)  # the real SA-Merging beats it: champion moves
    assert second["version"] == "2" and second["champion"]
    third = remerge(weak)  # worse again: champion stays
    assert third["version"] == "3" and not third["champion"]

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    exp = client.get_experiment_by_name("samerge")
    parents = client.search_runs([exp.experiment_id], "tags.`samerge.kind` = 'pipeline'")
    assert len(parents) == 3
    parent = client.get_run(second["run_id"])
    assert parent.data.params["prune.sa_merging.prune_ratio"] == "0.15" and parent.data.params["acquire.suite"] == "text"
    assert "prune.ties.density" not in parent.data.params  # the parameters of the merges it made only
    assert parent.data.metrics["normalized_average.sa_merging"] > parent.data.metrics["normalized_average.base"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{second['run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == set(STAGES)
    prune = by_name["prune"]
    hist = client.get_metric_history(prune.info.run_id, "sa_merging.density")
    assert [h.step for h in hist] == list(range(1, 11))
    assert hist[-1].value == pytest.approx(0.85 ** 10, rel=0.05)
    assert all(a.value > b.value for a, b in zip(hist, hist[1:]))
    assert "sa_merging.average" in by_name["evaluate"].data.metrics
    report_files = {a.path for a in client.list_artifacts(by_name["report"].info.run_id, "report")}
    assert {"report/report.csv", "report/report.md", "report/per_task.png"} <= report_files
    plots = {a.path for a in client.list_artifacts(by_name["score"].info.run_id, "plots")}
    assert "plots/saliency_vs_magnitude.png" in plots

    champion = client.get_model_version_by_alias("samerge-text", "champion")
    assert champion.version == "2" and champion.tags["samerge.method"] == "sa_merging"
    assert float(champion.tags["samerge.normalized_average"]) == pytest.approx(second["normalized_average"])
    # the champion is a transformers model (issue 16): MLflow's transformers flavour loads it as a pipeline, and
    # from_pretrained reads the downloaded artifact; both hold the merged tensors exactly and run a forward pass
    from transformers import AutoModel, AutoTokenizer

    assert champion.tags["samerge.flavor"] == "transformers"
    local = Path(mlflow.artifacts.download_artifacts("models:/samerge-text@champion", dst_path=str(tmp_path / "dl")))
    assert "samerge" not in (local / "requirements.txt").read_text()  # loads where samerge is not installed
    assert "# Merged model (sa_merging)" in (local / "model_card.md").read_text()  # the model card travels with it
    run_stage("prune", params, work, method="sa_merging", overrides=small, quiet=True)  # re-merge: same tensors
    merged = work / "work/prune/sa_merging/model"
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= {f.name for f in merged.iterdir()}
    (tmp_path / "pipe").mkdir()  # MLflow downloads there (by default into a temp folder it never removes)
    pipe = mlflow.transformers.load_model("models:/samerge-text@champion", dst_path=str(tmp_path / "pipe"))
    hf = AutoModel.from_pretrained(local / "model").eval()
    tok = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    with open_checkpoint(merged) as ck:
        for model in (pipe.model, hf):
            state = model.state_dict()
            assert all(torch.equal(state[k], ck[k]) for k in ck.keys() if k in state)
            assert {k for k in ck.keys() if k not in state} <= {"embeddings.position_ids"}  # a buffer at most
    features = torch.tensor(pipe("a merged sentence encoder")[0])
    with torch.no_grad():
        hidden = hf(**tok("a merged sentence encoder", return_tensors="pt")).last_hidden_state[0]
    assert features.shape == hidden.shape == (hidden.shape[0], 384)
    torch.testing.assert_close(features, hidden, rtol=1e-4, atol=1e-4)

    # the server unreachable (issue 14): the report stage fails fast with one line, keeps its report and a note of
    # what is pending; `--resend` sends it once the server is back
    from samerge.errors import SamergeError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.time()
    with pytest.raises(SamergeError, match=r"is unreachable .*samerge stage report --resend") as info:
        run_stage("report", params, work, overrides=small, quiet=True)
    assert time.time() - t0 < 30 and "\n" not in str(info.value)
    assert (work / "work/report/report.md").is_file() and (work / "work/report/mlflow-pending.json").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    resent = run_stage("report", params, work, overrides=small, quiet=True, resend=True)["mlflow"]
    assert resent["version"] == "4" and not (work / "work/report/mlflow-pending.json").exists()
    assert len(client.search_runs([exp.experiment_id], "tags.`samerge.kind` = 'pipeline'")) == 4


# ------------------------------------------------------------------------------------------------ expert registry


def _registry(tmp_path, base):
    from samerge.io import save_safetensors

    reg = tmp_path / "registry"
    (reg / "experts").mkdir(parents=True)
    save_safetensors(base, reg / "base.safetensors")
    (reg / "manifest.json").write_text(json.dumps({"suite": "text", "size": "small", "seed": 0, "exclude": []}))
    return reg


def _expert_folder(d, state, suite="text"):
    from samerge.io import save_safetensors

    d.mkdir(parents=True)
    save_safetensors(state, d / "expert.safetensors")
    save_safetensors({"weight": torch.zeros(2, 16), "bias": torch.zeros(2)}, d / "head.safetensors")
    (d / "task.json").write_text(json.dumps({"name": d.name, "kind": "builtin", "suite": suite}))
    return d


def test_registry_accepts_derived_experts_atomically_and_refuses_bad_ones(tmp_path, base, experts, capsys):
    from samerge.registry import add_expert, registry_state

    reg = _registry(tmp_path, base)
    good = _expert_folder(tmp_path / "src" / "alpha", experts[0])
    assert main(["experts", "add", "--registry", str(reg), "--expert", str(good), "--no-event"]) == 0
    assert "added expert alpha" in capsys.readouterr().out
    assert list(registry_state(reg)) == ["alpha"]
    assert not [p for p in (reg / "experts").iterdir() if p.name.startswith(".")]  # no temporary left behind
    cases = [
        (_expert_folder(tmp_path / "src" / "beta", {**experts[1], "layer.0.weight": torch.randn(32, 16) * 10}),
         "does not look fine-tuned"),
        (_expert_folder(tmp_path / "src" / "gamma", {k: v for k, v in experts[1].items() if k != "norm.weight"}),
         "norm.weight"),
        (_expert_folder(tmp_path / "src" / "delta", experts[1], suite="vision"), "registry is for 'text'"),
        (_expert_folder(tmp_path / "src" / "eps", {**experts[1], "layer.1.weight": torch.full((16, 32), float("nan"))}),
         "NaN"),
    ]
    for folder, message in cases:
        assert main(["experts", "add", "--registry", str(reg), "--expert", str(folder), "--no-event"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("samerge: error:") and message in err, err
    assert list(registry_state(reg)) == ["alpha"]  # nothing half-added
    assert main(["experts", "add", "--registry", str(reg), "--expert", str(good), "--no-event"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["experts", "list", "--registry", str(tmp_path)]) == 2
    assert "not an expert registry" in capsys.readouterr().err
    with pytest.raises(samerge.SamergeError, match="expert name"):
        add_expert(reg, good, name="../escape")


def _imports(tree: ast.AST, known: set[str]) -> set[str]:
    """The samerge modules an AST imports, explicitly (a parent package's own imports are not counted)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module in known:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def _module_files() -> dict[str, Path]:
    files = {}
    for f in sorted((REPO / "samerge").rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def _stage_modules(stage: str, files: dict[str, Path]) -> set[str]:
    """The samerge modules the stage's code reaches: the names its function in samerge/stages.py uses (and the
    helpers there it calls, transitively), mapped to the modules they come from, then every module those import
    (explicit imports: a parent package's own imports are not followed). run_stage adds what it always uses
    (params, layout)."""
    known = set(files)
    tree = ast.parse(files["samerge.stages"].read_text())
    origin = {}  # a name imported at the top of stages.py -> its module
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in known:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                origin[a.asname or a.name] = sub if sub in known else node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    origin[(a.asname or a.name).split(".")[0]] = a.name
    local = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    modules, seen, todo = {"samerge.params", "samerge.layout"}, set(), [stage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(local[name]):
            if isinstance(node, ast.Name):
                if node.id in local and node.id != name:
                    todo.append(node.id)
                elif node.id in origin:
                    modules.add(origin[node.id])
        modules |= _imports(local[name], known)  # imports inside the function
    graph = {m: _imports(ast.parse(f.read_text()), known) for m, f in files.items()}
    todo = list(modules)
    while todo:
        for dep in graph[todo.pop()] - modules:
            modules.add(dep)
            todo.append(dep)
    return modules | {"samerge.stages"}  # the stage's own code (what stages.py imports for other stages aside)


def test_dvc_deps_cover_every_module_each_stage_runs():
    """A stage's deps in dvc.yaml must name every library file its code reaches through the import graph, or an
    edit there leaves `dvc repro` stale (the check that let `score` miss engine.py and io/ before)."""
    files = _module_files()
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage in STAGES:
        deps = [d for d in dvc["stages"][stage]["deps"] if d.startswith("samerge")]
        for d in deps:
            assert (REPO / d).exists(), f"{stage}: dep {d} does not exist"
        rel = {str(files[m].relative_to(REPO)) for m in _stage_modules(stage, files)}
        missing = sorted(p for p in rel if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them as deps"


def test_the_deps_check_finds_a_module_a_stage_reaches():
    """The check above is not vacuous: score reaches the saliency kernels and the checkpoint reader, evaluate the
    suites, and a stage's own function is what decides (prune reaches the merge API, score does not)."""
    files = _module_files()
    assert {"samerge.kernels", "samerge.io.checkpoint", "samerge.graphs.walker"} <= _stage_modules("score", files)
    assert {"samerge.evaluation.text", "samerge.evaluation.llm"} <= _stage_modules("evaluate", files)
    assert "samerge.api" in _stage_modules("prune", files)
    assert "samerge.tracking" in _stage_modules("report", files) and "samerge.tracking" not in _stage_modules(
        "score", files)
