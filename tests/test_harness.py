"""The test harness itself: a run stopped from outside leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import os, signal, subprocess, time
import pytest

@pytest.fixture
def server():
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)  # like tests/servers.py: its own group
    with open(os.environ["SERVER_PID"], "w") as f:
        f.write(str(proc.pid))
    yield
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()

def test_runs_until_stopped(server):
    time.sleep(600)
'''


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_run_stopped_with_sigterm_stops_the_servers_its_fixtures_started(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    pid_file = tmp_path / "server.pid"
    env = dict(os.environ, SERVER_PID=str(pid_file), PYTHONPATH=str(ROOT))
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", os.devnull,
                            "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = None
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            if run.poll() is not None or time.time() > deadline:  # stopped first: reading a live run's output blocks
                run.kill()
                pytest.fail("the inner run never started its server:\n" + run.communicate()[0].decode())
            time.sleep(0.2)
        server = int(pid_file.read_text())
        assert _running(server)
        time.sleep(1)  # inside the test's sleep
        run.send_signal(signal.SIGTERM)
        out = run.communicate(timeout=60)[0].decode()
        assert run.returncode != 0, out
        assert not _running(server), f"the fixture's server outlived the stopped run:\n{out}"
    finally:
        if run.poll() is None:
            run.kill()
        if server is not None and _running(server):
            os.killpg(server, signal.SIGKILL)
