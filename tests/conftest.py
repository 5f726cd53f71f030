from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from tests import servers

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (``timeout``, a CI runner's cancel) ends like Ctrl-C: pytest tears the fixtures
    down, so the servers the tests started in their own process groups (MLflow, Prefect) are stopped, not left
    running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(scope="session")
def suite_cache(tmp_path_factory):
    """Experts are fine-tuned once per test session into a private cache shared by every suite and pipeline test
    (the user's cache is never touched)."""
    d = tmp_path_factory.mktemp("samerge-cache")
    old = os.environ.get("SAMERGE_CACHE")
    os.environ["SAMERGE_CACHE"] = str(d)
    yield d
    if old is None:
        del os.environ["SAMERGE_CACHE"]
    else:
        os.environ["SAMERGE_CACHE"] = old


def make_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small model-like state dict: 2-D weights, 1-D biases/norms, an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 16, generator=g).to(dtype),
        "layer.0.weight": torch.randn(32, 16, generator=g).to(dtype),
        "layer.0.bias": torch.randn(32, generator=g).to(dtype),
        "layer.1.weight": torch.randn(16, 32, generator=g).to(dtype),
        "norm.weight": (1 + 0.1 * torch.randn(16, generator=g)).to(dtype),
        "position_ids": torch.arange(12).view(1, 12),
    }


def make_experts(base: dict[str, torch.Tensor], n: int, seed: int = 1, rel: float = 0.05
                 ) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(n):
        e = {}
        for k, v in base.items():
            if v.is_floating_point():
                e[k] = (v.float() + rel * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
            else:
                e[k] = v.clone()
        experts.append(e)
    return experts


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    return make_base()


@pytest.fixture
def experts(base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return make_experts(base, 3)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 for one test; its URL (tests/servers.py)."""
    yield from servers.mlflow_server(tmp_path / "mlflow-server")
