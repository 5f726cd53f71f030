"""The Prefect flows on a REAL Prefect server: work pools, `prefect deploy` of prefect.yaml, workers, the event trigger.

A module fixture starts `prefect server start` on a free loopback port (PREFECT_HOME in a temporary folder,
analytics off), creates the process work pools `cpu` and `gpu`, deploys every deployment of the repository's
prefect.yaml with `prefect --no-prompt deploy --all` and starts one worker per pool; finalisers stop them all.
The pipeline runs the `small` text suite on two tasks, so its experts come from the suite cache (fine-tuned there
on first use, about a minute per task on two cores).

The first tests need no server: the tasks are named like the stages, and only transient failures are retried.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect", reason="prefect is not installed (samerge[pipeline])")
httpx = pytest.importorskip("httpx")

from prefect.states import Completed, Failed  # noqa: E402

from samerge.errors import SamergeError  # noqa: E402
from samerge.stages import STAGES  # noqa: E402
from tasks.stages import STAGE_TASKS, acquire, is_transient, retry_if_transient  # noqa: E402
from tests.servers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
SAMERGE = str(BIN / "samerge")
TASKS = ["sentiment", "language_id"]
# Small but real: two experts, two methods (one of them SA-Merging's iterative loop), a search of one batch of two
# trials (two search-trial tasks) over a cheap space, no MLflow.
SMALL = {"acquire.tasks": TASKS, "prune.methods": ["task_arithmetic", "sa_merging"], "prune.sa_merging.iterations": 2,
         "score.sample": 1000, "report.track": False, "search.n_trials": 2, "search.batch": 2,
         "search.space": {"task_arithmetic": {"scale": [0.1, 1.0]}, "ties": {"density": [0.1, 0.5]}}}
RUN_TIMEOUT_S = 600


# --- no server ---------------------------------------------------------------------------------------------------

def test_each_stage_task_runs_the_stage_it_is_named_after(monkeypatch) -> None:
    """The task registered as a stage's name calls samerge's run_stage for that stage (and prune for its method):
    the task's own function is called with run_stage recording what it was asked to run."""
    import tasks.stages as task_module

    assert tuple(STAGE_TASKS) == STAGES
    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(task_module, "run_stage",
                        lambda stage, params, workdir, method=None, overrides=None: calls.append((stage, method)) or {})
    for name, t in STAGE_TASKS.items():
        t.fn(*(["ties"] if name == "prune" else []), params_path="p.yaml")
        assert calls[-1] == (name, "ties" if name == "prune" else None)
        assert t.retries == 2 and t.retry_condition_fn is retry_if_transient


def test_only_transient_failures_are_retried() -> None:
    user_mistakes = [SamergeError("parameters: prune.prune_ratio: too large"), ValueError("x"),
                     PermissionError(13, "denied"), NotADirectoryError(20, "not a directory")]
    transient = [ConnectionResetError(104, "reset by peer"), TimeoutError("timed out"), OSError(5, "I/O error"),
                 BrokenPipeError(32, "broken pipe")]
    assert not any(is_transient(e) for e in user_mistakes)
    assert all(is_transient(e) for e in transient)

    class SamergeOSError(SamergeError, OSError):  # a user mistake stays one whatever else it is
        pass

    assert not is_transient(SamergeOSError("bad path"))
    # what the task engine hands the retry condition: a Failed state holding the exception
    cond: Any = acquire.retry_condition_fn
    assert [cond(acquire, None, Failed(data=e)) for e in user_mistakes] == [False] * len(user_mistakes)
    assert [cond(acquire, None, Failed(data=e)) for e in transient] == [True] * len(transient)
    assert cond(acquire, None, Completed(data={"out": "x"})) is False


def test_watch_experts_reports_new_and_changed_experts_once_emitted(expert_folders: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.watch import STATE_FILE, diff_states, poll_registry
    from samerge.registry import add_expert, init_registry

    assert diff_states({"a": "1", "b": "2"}, {"b": "3", "c": "4"}) == {"added": ["c"], "changed": ["b"],
                                                                       "removed": ["a"]}
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no Prefect API: no event can be sent
    reg = init_registry(tmp_path / "registry", "text")
    add_expert(reg, expert_folders / "experts" / TASKS[0])
    first = poll_registry(reg)
    assert first["first_run"] and first["added"] == [TASKS[0]] and first["emitted"] == first["not_emitted"] == []
    saved = json.loads((reg / STATE_FILE).read_text())
    assert list(saved["experts"]) == [TASKS[0]]
    assert poll_registry(reg)["added"] == []  # nothing new

    add_expert(reg, expert_folders / "experts" / TASKS[1])
    second = poll_registry(reg)
    assert second["added"] == [TASKS[1]] and second["not_emitted"] == [TASKS[1]]
    # its event was not sent, so it is not recorded as seen: the next poll reports it again
    assert list(json.loads((reg / STATE_FILE).read_text())["experts"]) == [TASKS[0]]
    assert poll_registry(reg)["added"] == [TASKS[1]]
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(SamergeError, match="not a watch-experts state file"):
        poll_registry(reg, tmp_path / "bad.json")
    with pytest.raises(SamergeError, match="not an expert registry"):
        poll_registry(tmp_path)


# --- a real server, pools, deployments and workers ------------------------------------------------------------------

@dataclass
class Server:
    url: str
    env: dict[str, str]
    home: Path
    log: Path

    def api(self, method: str, path: str, **kw: Any) -> Any:
        # 503 is the server's "try again" (its SQLite database busy under load: seen once in a full CI run)
        for attempt in range(5):
            r = httpx.request(method, f"{self.url}{path}", timeout=30, **kw)
            if r.status_code != 503:
                break
            time.sleep(1.0 + attempt)
        r.raise_for_status()
        return r.json() if r.content else None


@dataclass
class Deployed:
    server: Server
    workdir: Path  # $SAMERGE_WORKDIR of both workers
    logs: dict[str, Path]

    def diagnostics(self) -> str:
        parts = []
        for name, path in {"server": self.server.log, **self.logs}.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"----- {name} ({path}) -----\n{text[-6000:]}")
        return "\n".join(parts)


def _start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:  # the child keeps its own handle
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process groups this module started (a worker and the flow-run processes it spawned), all at
    once; a group still running after 10 s is killed (a Prefect worker may take longer to shut down gracefully, and
    nothing of it is needed once the tests are done)."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in running:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _cli(args: list[str], env: dict[str, str], timeout: float = 180, cwd: Path = ROOT) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (f"{' '.join(args[:4])} ... exit {out.returncode}:\n{out.stdout[-4000:]}\n"
                                 f"{out.stderr[-4000:]}")
    return out.stdout


def _deployment_run(d: Deployed, name: str, **params: Any) -> str:
    """``prefect deployment run NAME --param KEY=JSON ...``; the flow run's id."""
    args = [a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    out = _cli([PREFECT, "deployment", "run", name, *args], d.server.env)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert found, out
    return found.group(1)


@pytest.fixture(scope="module")
def expert_folders(suite_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``work/acquire`` of the two tasks (their experts fine-tuned into the cache on first use)."""
    from samerge.stages import run_stage

    wd = tmp_path_factory.mktemp("acquired")
    assert os.environ["SAMERGE_CACHE"] == str(suite_cache)  # what the session fixture promises
    run_stage("acquire", ROOT / "params.yaml", wd, overrides={"acquire.tasks": TASKS}, quiet=True)
    return wd / "work" / "acquire"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, suite_cache: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "SAMERGE_", "MLFLOW_"))}  # nothing of the caller's own setup
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="true", PREFECT_SERVER_UI_ENABLED="false",
               # the nightly cron and the 10-minute poll must not start runs of their own during the test
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2",
               SAMERGE_CACHE=str(suite_cache), TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = home / "server.log"
    proc = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log, home)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not become healthy:\n{_tail(log)}")
            time.sleep(1)
        yield Server(url, env, home, log)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    for pool in ("cpu", "gpu"):
        _cli([PREFECT, "work-pool", "create", pool, "--type", "process"], server.env)
    # SAMERGE_CODE_DIR is unset here, so the pull step's placeholder reaches the workers unresolved
    _cli([PREFECT, "--no-prompt", "deploy", "--all"], server.env, timeout=300)
    workdir = tmp_path_factory.mktemp("shared-workdir")
    env = {**server.env, "SAMERGE_CODE_DIR": str(ROOT), "SAMERGE_WORKDIR": str(workdir)}
    logs = {f"worker-{pool}": server.home / f"worker-{pool}.log" for pool in ("cpu", "gpu")}
    procs = []
    try:
        for pool in ("cpu", "gpu"):
            procs.append(_start([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env,
                                logs[f"worker-{pool}"], server.home))
        yield Deployed(server, workdir, logs)
    finally:
        _stop(*procs)


def _wait_final(d: Deployed, flow_run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = d.server.api("GET", f"/flow_runs/{flow_run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run['name']} still {run['state_type']} after {timeout} s\n{d.diagnostics()}")
        time.sleep(2)


def _runs_of(d: Deployed, deployment: str) -> list[dict[str, Any]]:
    dep = d.server.api("GET", f"/deployments/name/{deployment}")
    return d.server.api("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}}})


def _run_logs(d: Deployed, flow_run_id: str) -> str:
    logs = d.server.api("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                      "sort": "TIMESTAMP_ASC", "limit": 200})
    return "\n".join(f"{x['level']:>3} {x['message']}" for x in logs)


def _wait_log(d: Deployed, flow_run_id: str, text: str, timeout: float = 60) -> None:
    """Logs reach the server in batches, possibly after the run's final state: wait for ``text``."""
    deadline = time.monotonic() + timeout
    while text not in (logs := _run_logs(d, flow_run_id)):
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id} never logged {text!r}:\n{logs[-6000:]}")
        time.sleep(1)


def _assert_completed(d: Deployed, run: dict[str, Any]) -> None:
    assert run["state_type"] == "COMPLETED", (
        f"flow run {run['name']}: {run['state_type']} {run['state']['message']}\n"
        f"----- its logs -----\n{_run_logs(d, run['id'])[-8000:]}\n{d.diagnostics()}")


def _assert_merged(workdir: Path, methods: list[str]) -> None:
    from samerge.io import open_checkpoint

    work = workdir / "work"
    with open_checkpoint(work / "acquire" / "base.safetensors") as base:
        base_keys = set(base.keys())
    for m in methods:
        with open_checkpoint(work / "prune" / m / "model") as merged:
            assert set(merged.keys()) == base_keys, m
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    assert set(methods) <= set(metrics) and set(metrics[methods[0]]) >= set(TASKS)
    assert (work / "report" / "report.md").is_file()


def test_prefect_yaml_declares_schedules_and_the_trigger(deployed: Deployed) -> None:
    s = deployed.server
    deps = {f"{x['name']}": x for x in s.api("POST", "/deployments/filter", json={})}
    assert set(deps) == {"pipeline", "gpu-stages", "watch-experts", "remerge"}
    pools = {name: d["work_pool_name"] for name, d in deps.items()}
    assert pools == {"pipeline": "cpu", "gpu-stages": "gpu", "watch-experts": "cpu", "remerge": "cpu"}
    assert [x["schedule"]["cron"] for x in deps["pipeline"]["schedules"]] == ["0 2 * * *"]
    assert [x["schedule"]["interval"] for x in deps["watch-experts"]["schedules"]] == [600.0]
    for d in deps.values():
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": "{{ $SAMERGE_CODE_DIR }}"}}]
    (auto,) = [a for a in s.api("POST", "/automations/filter", json={})
               if any(x.get("deployment_id") == deps["remerge"]["id"] for x in a["actions"])]
    assert auto["trigger"]["expect"] == ["samerge.expert.added"]
    assert auto["trigger"]["match"] == {"prefect.resource.id": "samerge.registry.*"}
    (action,) = auto["actions"]
    assert action["type"] == "run-deployment"
    assert "event.payload.registry" in json.dumps(action["parameters"]["registry"])


def test_stage_tasks_retry_transient_failures_only_in_real_runs(server: Server, tmp_path: Path) -> None:
    from prefect import Task, flow
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    calls: list[int] = []

    def flaky() -> str:  # a dropped connection the first time, then fine
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    # the stage tasks' retry policy, without their retry delays
    transient = Task(flaky, name="flaky", retries=acquire.retries, retry_delay_seconds=0,
                     retry_condition_fn=acquire.retry_condition_fn)
    fast_acquire = acquire.with_options(retry_delay_seconds=0)

    @flow
    def probe() -> tuple[Any, Any]:
        return (fast_acquire(str(tmp_path / "missing.yaml"), str(tmp_path), return_state=True),
                transient(return_state=True))

    with temporary_settings({PREFECT_API_URL: server.url, PREFECT_HOME: server.home}):
        user_mistake, recovered = probe()
        APILogWorker.drain_all(timeout=10)  # send the logs now, not at exit when the server is gone
    assert user_mistake.is_failed() and recovered.is_completed() and len(calls) == 2
    with pytest.raises(SamergeError, match="no such parameters file"):
        user_mistake.result()
    runs = {x: server.api("GET", f"/task_runs/{st.state_details.task_run_id}")["run_count"]
            for x, st in (("acquire", user_mistake), ("flaky", recovered))}
    assert runs == {"acquire": 1, "flaky": 2}


def test_pipeline_deployment_runs_on_the_cpu_and_gpu_pools(deployed: Deployed, expert_folders: Path,
                                                           tmp_path: Path) -> None:
    wd = tmp_path / "pipeline"
    flow_run_id = _deployment_run(deployed, "samerge-pipeline/pipeline", workdir=str(wd), overrides=SMALL)
    run = _wait_final(deployed, flow_run_id)
    _assert_completed(deployed, run)
    # the GPU stages ran as their own deployment on the gpu pool, as a child of this run
    (gpu,) = _runs_of(deployed, "samerge-gpu-stages/gpu-stages")
    _assert_completed(deployed, gpu)
    assert gpu["parameters"]["overrides"] == SMALL and gpu["parameters"]["workdir"] == str(wd)
    assert gpu["work_pool_name"] == "gpu" and run["work_pool_name"] == "cpu"
    _assert_merged(wd, SMALL["prune.methods"])
    task_runs = deployed.server.api("POST", "/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [flow_run_id, gpu["id"]]}}})
    # (the other task run is the placeholder linking the gpu-stages run to this one as its subflow)
    names = sorted(t["name"] for t in task_runs if t["state_type"] == "COMPLETED" and t["name"].startswith(STAGES))
    assert names == sorted(["acquire", "extract", "report", "score", "prune-task_arithmetic", "prune-sa_merging",
                            "search", "search-trial-0", "search-trial-1", "evaluate"]), names
    # the search ran on the gpu pool, its batch of two trials mapped over search-trial tasks of that flow run
    on_gpu = sorted(t["name"] for t in task_runs if t["flow_run_id"] == gpu["id"] and t["state_type"] == "COMPLETED")
    assert {"search", "search-trial-0", "search-trial-1"} <= set(on_gpu), on_gpu
    found = json.loads((wd / "work" / "search" / "summary.json").read_text())
    assert found["kind"] == "validation-selected" and found["trials"] == 2
    trials = (wd / "work" / "search" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3 and all(",COMPLETE," in t for t in trials[1:])
    assert "search" in json.loads((wd / "work" / "evaluate" / "metrics.json").read_text())


def test_new_expert_event_triggers_a_remerge(deployed: Deployed, expert_folders: Path, tmp_path: Path) -> None:
    from flows.watch import poll_registry

    s = deployed.server
    reg = tmp_path / "registry"
    offline = {k: v for k, v in s.env.items() if k != "PREFECT_API_URL"}
    _cli([SAMERGE, "experts", "init", "--registry", str(reg), "--suite", "text", "--size", "small"], offline)
    _cli([SAMERGE, "experts", "add", "--registry", str(reg), "--expert", str(expert_folders / "experts" / TASKS[0])],
         offline)
    assert _runs_of(deployed, "samerge-remerge/remerge") == []
    state_file = tmp_path / "watch-state.json"
    assert poll_registry(reg, state_file)["first_run"]  # the watcher's first poll: one expert, recorded silently
    # keep the triggered re-merge small: one method, and the GPU stages in the same flow run
    dep = s.api("GET", "/deployments/name/samerge-remerge/remerge")
    small = {**SMALL, "prune.methods": ["task_arithmetic"]}
    s.api("PATCH", f"/deployments/{dep['id']}", json={"parameters": {**dep["parameters"], "overrides": small,
                                                                    "gpu_deployment": None}})

    out = _cli([SAMERGE, "experts", "add", "--registry", str(reg), "--expert",
                str(expert_folders / "experts" / TASKS[1])], s.env)
    assert "emitted Prefect event samerge.expert.added" in out, out
    deadline = time.monotonic() + 120
    while not (runs := _runs_of(deployed, "samerge-remerge/remerge")):
        if time.monotonic() > deadline:
            pytest.fail(f"no re-merge was triggered within 120 s of the event\n{deployed.diagnostics()}")
        time.sleep(2)
    (run,) = runs
    assert run["parameters"]["registry"] == str(reg.resolve())
    run = _wait_final(deployed, run["id"])
    _assert_completed(deployed, run)
    wd = deployed.workdir / "remerge" / reg.name
    manifest = json.loads((wd / "work" / "acquire" / "manifest.json").read_text())
    assert sorted(e["name"] for e in manifest["experts"]) == sorted(TASKS)
    _assert_merged(wd, ["task_arithmetic"])
    marker = (wd / "remerged.json").read_text()
    assert json.loads(marker)["state"].keys() == set(TASKS)

    # The polling flow on the cpu pool sees the expert added since its last poll (one expert, polled above) and
    # emits the event again; the triggered re-merge finds the registry as it merged it last and skips the stages.
    watch = _wait_final(deployed, _deployment_run(deployed, "watch-experts/watch-experts", registry=str(reg),
                                                  state_file=str(state_file)))
    _assert_completed(deployed, watch)
    _wait_log(deployed, watch["id"], f"emitted samerge.expert.added for expert {TASKS[1]}")
    assert sorted(json.loads(state_file.read_text())["experts"]) == sorted(TASKS)
    deadline = time.monotonic() + 120
    while len(runs := _runs_of(deployed, "samerge-remerge/remerge")) < 2:
        if time.monotonic() > deadline:
            pytest.fail(f"no re-merge triggered by watch-experts within 120 s\n{deployed.diagnostics()}")
        time.sleep(2)
    (again,) = [r for r in runs if r["id"] != run["id"]]
    _assert_completed(deployed, _wait_final(deployed, again["id"]))
    _wait_log(deployed, again["id"], "unchanged since the last re-merge")
    assert (wd / "remerged.json").read_text() == marker
