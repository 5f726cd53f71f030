"""The suites by name: the embedded ones (one module each) and the hub's (built-in names and suite files).

``open_suite`` is how the report, the pipeline's acquire stage and the expert registry all get a suite and its
tasks; adding an embedded suite is one module with an :class:`~samerge.evaluation.suite.EmbeddedSuite` subclass and
one entry in :data:`EMBEDDED`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from samerge.errors import SamergeError
from samerge.evaluation.hub import HUB_SUITES, is_hub_suite, load_hub_suite
from samerge.evaluation.llm import LlmLoraSuite
from samerge.evaluation.suite import EmbeddedSuite, Suite
from samerge.evaluation.text import TextSuite
from samerge.evaluation.vision import VisionSuite

EMBEDDED: dict[str, type[EmbeddedSuite]] = {s.name: s for s in (TextSuite, VisionSuite, LlmLoraSuite)}
SUITES = tuple(EMBEDDED)


def open_suite(suite: str, size: str, seed: int, *, tasks: Sequence[str] | None = None,
               add_tasks: Mapping[str, str] | None = None, progress: bool = False,
               device: str = "auto") -> tuple[Suite, list[Any]]:
    """The suite object and its task data: the built-in tasks (or the subset ``tasks``) plus the user's file tasks
    ``add_tasks`` (name -> path), each loaded for ``size`` and ``seed`` (the data split's seed)."""
    cls = EMBEDDED.get(suite)
    if cls is None:
        if is_hub_suite(suite):  # the paper's suites (experts and data from the Hugging Face Hub) or a suite file
            return load_hub_suite(suite, size, seed, progress, tasks, dict(add_tasks or {}), device)
        raise SamergeError(f"unknown suite {suite!r}; available here: {', '.join(SUITES)}, the hub suites "
                           f"{', '.join(HUB_SUITES)} or a suite file .yaml/.json")
    names = list(tasks) if tasks else list(cls.builtin_tasks)
    unknown = [t for t in names if t not in cls.builtin_tasks]
    if unknown:
        raise SamergeError(f"unknown {suite} task {unknown[0]!r}; built-in tasks: {', '.join(cls.builtin_tasks)}")
    data = [cls.load_task(t, size, seed) for t in names]
    for name, path in (add_tasks or {}).items():
        if name in names:
            raise SamergeError(f"added task {name!r} clashes with a built-in task name")
        data.append(cls.load_file_task(name, path, size, seed))
    return cls(size, seed, progress, device=device), data
