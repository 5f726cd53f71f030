"""The real servers the tests start on 127.0.0.1 (MLflow here; Prefect's in tests/test_prefect.py) and the one free
port finder they share. The ``mlflow_server`` fixture (tests/conftest.py) runs :func:`mlflow_server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent  # the environment's console scripts (mlflow, dvc, prefect)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlflow_server(d: Path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend and artifacts under ``d``): yields its URL, and
    stops it (its whole process group) after. A server that does not answer /health within 240 s is an error
    with the tail of its log."""
    port = free_port()
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MLFLOW_DISABLE_TELEMETRY="true")
    with open(d / "server.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
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
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
