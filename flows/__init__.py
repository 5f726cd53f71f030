"""Prefect 3 flows of the samerge pipeline; their deployments are declared in ``prefect.yaml``.

- ``flows/pipeline.py``: ``samerge-pipeline`` (acquire and extract on the ``cpu`` pool, the GPU stages as the
  ``samerge-gpu-stages/gpu-stages`` deployment on the ``gpu`` pool, then report), ``samerge-gpu-stages`` (score,
  prune for each method, evaluate) and ``samerge-remerge`` (the pipeline over an expert registry, triggered by the
  event ``samerge.expert.added``).
- ``flows/watch.py``: ``watch-experts``, which polls an expert registry (and optionally a Hugging Face Hub
  organisation) and emits ``samerge.expert.added`` for new or changed experts.

Deployments load these files by path (``flows/pipeline.py:pipeline``) from the repository root, which is on
``sys.path`` then; the flows import the tasks as ``tasks.stages``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from samerge.errors import SamergeError
from samerge.io.writer import write_text_atomic


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary sibling and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def registry_or_env(registry: str | None) -> Path:
    """``registry``, else ``$SAMERGE_EXPERTS`` (the watched registry of a team install), as an absolute path.

    Raises :class:`SamergeError` when neither is given or the folder is not an expert registry.
    """
    reg = registry or os.environ.get("SAMERGE_EXPERTS")
    if not reg:
        raise SamergeError("no expert registry: pass the flow parameter `registry` or set SAMERGE_EXPERTS "
                           "(create one with `samerge experts init --registry DIR --suite SUITE`)")
    path = Path(reg).expanduser().resolve()
    if not (path / "manifest.json").is_file():
        raise SamergeError(f"{path}: not an expert registry (no manifest.json); create one with "
                           f"`samerge experts init --registry {path} --suite SUITE`")
    return path
