"""The pipeline: stage functions, params validation, `dvc repro` in a real git+DVC repo, MLflow against a real server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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
from samerge.params import load_params
from samerge.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = {"acquire.tasks": ["sentiment", "language_id"], "prune.methods": ["task_arithmetic", "sa_merging"]}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ params


def test_params_file_is_valid_and_names_the_stages():
    p = load_params(REPO / "params.yaml")
    assert set(type(p).model_fields) == set(STAGES)
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)  # the same names in dvc.yaml, params.yaml and the CLI
    for name, stage in dvc["stages"].items():
        assert f"samerge stage {name}" in stage["cmd"]
        assert any(d.startswith("samerge/") for d in stage["deps"]), name  # library modules are deps


@pytest.mark.parametrize("override, message", [
    ({"prune.prune_rate": 0.3}, "prune.prune_rate: unknown parameter; valid: methods, iterations, prune_ratio"),
    ({"prune.prune_ratio": 1.5}, "prune.prune_ratio"),
    ({"prune.methods": ["tie"]}, "unknown method 'tie'"),
    ({"acquire.size": "huge"}, "acquire.size"),
    ({"bogus.x": 1}, "bogus: unknown parameter; valid: acquire, extract, score, prune, evaluate, report"),
])
def test_bad_parameters_are_refused_with_the_valid_options(override, message):
    with pytest.raises(samerge.SamergeError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_params(REPO / "params.yaml", override)


def test_stage_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("prune:\n  prune_ratio: 2\n")
    assert main(["stage", "prune", "--params", str(tmp_path / "params.yaml"), "--method", "ties"]) == 2
    assert capsys.readouterr().err.startswith("samerge: error: parameters: prune.prune_ratio")
    assert main(["stage", "extract", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "run the acquire stage first" in capsys.readouterr().err
    assert main(["stage", "prune", "--params", str(REPO / "params.yaml"), "--workdir", str(tmp_path),
                 "--method", "dare"]) == 2
    assert "not in prune.methods" in capsys.readouterr().err
    assert main(["stage", "score", "--set", "prune_ratio=0.3"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ DVC


def _make_repo(dest: Path, params: dict) -> Path:
    """A fresh git + DVC repo with this project's pipeline and library (the stages run its copy of samerge)."""
    shutil.copytree(REPO / "samerge", dest / "samerge", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for k, v in params.items():
        section, key = k.split(".")
        data[section][key] = v
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


def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(suite_cache, tmp_path):
    repo = _make_repo(tmp_path / "repo", {**SMALL, "report.track": False})
    out = _dvc(repo, "repro")
    for stage in ("acquire", "extract", "score", "prune@task_arithmetic", "prune@sa_merging", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"acquire", "extract", "score", "prune@task_arithmetic", "prune@sa_merging",
                                   "evaluate", "report"}
    assert lock["stages"]["prune@sa_merging"]["params"]["params.yaml"]["prune"]["prune_ratio"] == 0.15
    assert any(d["path"] == "samerge/saliency.py" for d in lock["stages"]["score"]["deps"])
    # metrics and plots the stages declare
    metrics = json.loads((repo / "work/evaluate/metrics.json").read_text())
    assert set(metrics) == {"base", "expert", "task_arithmetic", "sa_merging"}
    assert metrics["expert"]["normalized_average"] == pytest.approx(1.0)
    assert metrics["sa_merging"]["average"] > metrics["base"]["average"]
    shown = _dvc(repo, "metrics", "show", "--json")
    assert "normalized_average" in shown and "final_density" in shown
    iters = (repo / "work/prune/sa_merging/iterations.csv").read_text().splitlines()
    assert len(iters) == 1 + 1 + 10  # header, t = 0, ten iterations
    for png in ("work/report/per_task.png", "work/report/sa_iterations.png", "work/score/saliency_vs_magnitude.png",
                "work/extract/task_vector_cosine.png"):
        assert (repo / png).stat().st_size > 5000, png
    # the merged artifact: the base's tensors, finite, different from the base
    with open_checkpoint(repo / "work/prune/sa_merging/model") as merged, \
            open_checkpoint(repo / "work/acquire/base.safetensors") as base:
        assert list(merged.keys()) == list(base.keys())
        k = "encoder.layer.0.attention.self.query.weight"
        assert merged[k].isfinite().all() and not merged[k].equal(base[k])
    assert "sa_merging" in (repo / "work/prune/sa_merging/model/README.md").read_text()
    model_file = repo / "work/prune/sa_merging/model/model.safetensors"
    stamp = model_file.stat().st_mtime_ns

    # a second repro is a no-op
    again = _dvc(repo, "repro")
    assert "Running stage" not in again and "up to date" in again
    assert model_file.stat().st_mtime_ns == stamp

    # touching a library module marks exactly the stages that depend on it, and repro reruns it
    with open(repo / "samerge/saliency.py", "a") as f:
        f.write("\n# touched\n")
    status = _dvc(repo, "status", "--json")
    changed = set(json.loads(status))
    assert {"score", "prune@sa_merging", "prune@task_arithmetic"} <= changed
    assert not changed & {"acquire", "extract"}
    rerun = _dvc(repo, "repro", "score")
    assert "Running stage 'score'" in rerun and "Running stage 'acquire'" not in rerun
    subprocess.run(["git", "checkout", "-q", "samerge/saliency.py"], cwd=repo, check=True)

    # an experiment with another pruning ratio
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "lock"],
                   cwd=repo, check=True)
    exp = _dvc(repo, "exp", "run", "-S", "prune.prune_ratio=0.3")
    assert "Running stage 'prune@sa_merging'" in exp and "Running stage 'acquire'" not in exp
    summary = json.loads((repo / "work/prune/sa_merging/summary.json").read_text())
    assert summary["params"]["prune_ratio"] == 0.3
    assert summary["final_density"] == pytest.approx(0.7 ** 10, rel=0.02)


# ------------------------------------------------------------------------------------------------ MLflow


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    d = tmp_path / "mlflow-server"
    d.mkdir()
    log = open(d / "server.log", "w")  # noqa: SIM115 - closed in the finaliser
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
        cwd=d, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError("mlflow server did not start:\n" + (d / "server.log").read_text()[-3000:])
        time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_pipeline_is_tracked_in_a_real_mlflow_server(suite_cache, tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from samerge.stages import run_pipeline, run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = REPO / "params.yaml"
    work = tmp_path / "run"
    weak = {**SMALL, "prune.params": {"sa_merging": {"scale": 0.02}}}  # barely moves from the base

    def remerge(overrides):
        for m in SMALL["prune.methods"]:
            run_stage("prune", params, work, method=m, overrides=overrides, quiet=True)
        run_stage("evaluate", params, work, overrides=overrides, quiet=True)
        return run_stage("report", params, work, overrides=overrides, quiet=True)["mlflow"]

    first = run_pipeline(params, work, overrides=weak, quiet=True)["report"]["mlflow"]
    assert first["version"] == "1" and first["champion"]  # the first merge becomes champion
    second = remerge(SMALL)  # the real SA-Merging beats it: champion moves
    assert second["version"] == "2" and second["champion"]
    third = remerge(weak)  # worse again: champion stays
    assert third["version"] == "3" and not third["champion"]

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    exp = client.get_experiment_by_name("samerge")
    parents = client.search_runs([exp.experiment_id], "tags.`samerge.kind` = 'pipeline'")
    assert len(parents) == 3
    parent = client.get_run(second["run_id"])
    assert parent.data.params["prune.prune_ratio"] == "0.15" and parent.data.params["acquire.suite"] == "text"
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
    # the registered artifact is the merged model itself, byte for byte
    local = Path(mlflow.artifacts.download_artifacts("models:/samerge-text@champion", dst_path=str(tmp_path / "dl")))
    got = next(local.rglob("model.safetensors"))
    run_stage("prune", params, work, method="sa_merging", overrides=SMALL, quiet=True)  # re-merge: same bytes
    assert got.read_bytes() == (work / "work/prune/sa_merging/model/model.safetensors").read_bytes()
    assert (got.parent / "README.md").exists()  # the model card travels with it
    model = mlflow.pyfunc.load_model("models:/samerge-text@champion")
    key = "encoder.layer.0.attention.self.value.weight"
    with open_checkpoint(got) as ck:
        assert (model.unwrap_python_model().predict(None, [key])[key] == ck[key].numpy()).all()

    # the server unreachable (issue 14): the report stage fails fast with one line, keeps its report and a note of
    # what is pending; `--resend` sends it once the server is back
    from samerge.errors import SamergeError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    t0 = time.time()
    with pytest.raises(SamergeError, match=r"is unreachable .*samerge stage report --resend") as info:
        run_stage("report", params, work, overrides=SMALL, quiet=True)
    assert time.time() - t0 < 30 and "\n" not in str(info.value)
    assert (work / "work/report/report.md").is_file() and (work / "work/report/mlflow-pending.json").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    resent = run_stage("report", params, work, overrides=SMALL, quiet=True, resend=True)["mlflow"]
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
