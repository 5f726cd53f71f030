"""What every suite is: the :class:`Suite` protocol, the pieces suites share, and the one fine-tuning loop.

A suite holds a base state, makes (or loads) one expert per task, and scores any state on every expert's task.
The report and the pipeline's stages only ever talk to a suite through :class:`Suite`; the catalogue of suites by
name is :mod:`samerge.evaluation.catalog`. Embedded suites (``text``, ``vision``, ``llm-lora``) fine-tune their
experts with :func:`finetune` and cache them on disk (``$SAMERGE_CACHE`` or ``~/.cache/samerge``) with
:func:`cached_expert`, so a report re-runs in seconds.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from samerge.errors import SamergeError
from samerge.io import Checkpoint, open_checkpoint, save_safetensors
from samerge.io.checkpoint import CONFIG_METADATA_KEY, read_config
from samerge.io.writer import publish_dir, remove_path


@dataclass
class Expert:
    task: Any  # the suite's task data (TaskData, ImageTask, HubTask)
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # the task's own classifier, never merged


@runtime_checkable
class Suite(Protocol):
    """A suite as the report and the stages use it."""

    name: str
    size: str
    exclude: tuple[str, ...]  # patterns of base keys that are never merged (per-task heads)
    merge_methods: tuple[str, ...]  # the suite's own merges (``prefix:name``), run by :meth:`merge`
    base: Mapping[str, torch.Tensor]
    # the base's Hugging Face folder (config.json, tokenizer) when ``base`` is that whole transformers model, so a
    # merge plus these files loads with ``from_pretrained``; None otherwise (vision, the hub suites' towers)
    model_dir: Path | None

    def expert(self, task: Any) -> Expert: ...

    def scores(self, state: Mapping[str, torch.Tensor], experts: Sequence[Expert]) -> dict[str, dict[str, float]]:
        """Per expert's task: ``{"score": the task's metric (what ``normalized`` divides), "accuracy": ...}``
        (``accuracy`` may be absent, e.g. for a regression task)."""
        ...

    def default_methods(self) -> list[str]: ...

    def merge(self, method: str, params: Mapping[str, Any], experts: Sequence[Expert]) -> dict[str, torch.Tensor]: ...


@functools.lru_cache(maxsize=16)
def _config_json(model_dir: Path) -> str | None:
    """The model folder's config.json as canonical JSON text (read once per folder and process: every merge of a
    report or search asks for it)."""
    config = read_config(model_dir)
    return None if config is None else json.dumps(config, sort_keys=True)


def base_input(suite: Suite) -> Mapping[str, torch.Tensor]:
    """The suite's base as a merge input: with the model's config.json where ``base`` is a whole transformers model
    (``model_dir``), so a method that builds the connectivity graph reads the attention heads instead of guessing
    them from the shapes; the plain state otherwise. The acquire stage stores the same config in base.safetensors
    (:func:`base_metadata`), so the pipeline's merges and the report's are the same merge."""
    text = _config_json(suite.model_dir) if suite.model_dir is not None else None
    return suite.base if text is None else Checkpoint.from_state(suite.base, f"{suite.name} base",
                                                                config=json.loads(text))


def base_metadata(suite: Suite) -> dict[str, str]:
    """The safetensors metadata of the suite's base written to a file: its role, and its config (see
    :func:`base_input`) where it has one."""
    text = _config_json(suite.model_dir) if suite.model_dir is not None else None
    return {"samerge.role": "base", **({CONFIG_METADATA_KEY: text} if text else {})}


def standard_methods(size: str) -> list[str]:
    """The methods a report compares when neither the user nor the suite names others."""
    wudi = "wudi" if size == "full" else "wudi[iterations=20]"  # 300 Adam steps per weight: minutes on a CPU
    return ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "consensus", "pcb", wudi,
            "ties[density_rule=tadrop]", "dare[density_rule=tadrop]", "sa_merging",
            "sa_merging[saliency_sign=own_sign]", "sa_merging[saliency_sign=own_value]"]


class SuiteBase:
    """Defaults of the :class:`Suite` protocol: samerge's standard methods, no suite-specific merges."""

    name: ClassVar[str]
    size: str
    merge_methods: tuple[str, ...] = ()
    model_dir: Path | None = None

    def default_methods(self) -> list[str]:
        return standard_methods(self.size)

    def merge(self, method: str, params: Mapping[str, Any], experts: Sequence[Expert]) -> dict[str, torch.Tensor]:
        raise SamergeError(f"the {self.name} suite has no method {method!r} of its own"
                           + (f"; its methods: {', '.join(self.merge_methods)}" if self.merge_methods else ""))


class EmbeddedSuite(SuiteBase):
    """A suite whose tasks ship with samerge (built-in by name) or come from the user's files (``add_tasks``)."""

    builtin_tasks: ClassVar[tuple[str, ...]]
    load_task: ClassVar[Callable[[str, str, int], Any]]  # (name, size, seed) -> a built-in task's data
    load_file_task: ClassVar[Callable[[str, str, str, int], Any]]  # (name, path, size, seed) -> a user's task


def cache_root() -> Path:
    return Path(os.environ.get("SAMERGE_CACHE", Path.home() / ".cache" / "samerge"))


def require_cpu(suite: str, device: str) -> None:
    """For suites that fine-tune and score on the CPU only: refuse any other device, before anything loads."""
    if device not in ("auto", "cpu"):
        raise SamergeError(f"--device {device}: the {suite} suite runs on the CPU; llm-lora and the hub suites "
                           "fine-tune or score on a GPU")


def cached_expert(suite: str, size: str, seed: int, task: Any, key: str,
                  finetune: Callable[[], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> Expert:
    """Load the expert for (suite, size, seed, task, key) from the cache, or fine-tune it and store it."""
    d = cache_root() / "suites" / suite / size / f"seed{seed}" / f"{task.name}-{key}"
    enc_path, head_path = d / "expert.safetensors", d / "head.safetensors"
    if enc_path.exists() and head_path.exists():
        with open_checkpoint(enc_path) as e, open_checkpoint(head_path) as h:
            return Expert(task, {k: e[k] for k in e.keys()}, {k: h[k] for k in h.keys()})
    encoder, head = finetune()
    if enc_path.exists() and head_path.exists():  # published by another process meanwhile
        return Expert(task, encoder, head)
    if d.is_dir():
        remove_path(d)  # a partial entry of a version that wrote the files in place (entries are published whole)
    with publish_dir(d, keep_existing=True) as tmp:
        save_safetensors(encoder, tmp / enc_path.name, metadata={"task": task.name})
        save_safetensors(head, tmp / head_path.name)
        (tmp / "task.json").write_text(json.dumps({"task": task.name, "labels": task.labels, "source": task.source,
                                                   "train": len(task.train), "seed": seed}))
    return Expert(task, encoder, head)


def finetune(params: Iterable[torch.nn.Parameter], batch_loss: Callable[[list[int]], torch.Tensor], examples: int, *,
             epochs: int, batch: int, lr: float, weight_decay: float, order_seed: str, desc: str, progress: bool,
             clip: float | None = None, linear_decay: bool = False) -> None:
    """The fine-tuning loop every embedded suite uses: AdamW over ``epochs`` passes of the examples in a seeded
    shuffled order (``random.Random(order_seed)``), ``batch`` at a time; ``batch_loss(indices)`` is the mean loss of
    those training examples. ``clip``: the gradients' global norm bound; ``linear_decay``: the learning rate falls
    linearly to 0 over the steps. A progress bar shows the steps."""
    from tqdm.auto import tqdm

    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * ((examples + batch - 1) // batch)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, steps)))
             if linear_decay else None)
    order = list(range(examples))
    rng = random.Random(order_seed)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        rng.shuffle(order)
        for i in range(0, examples, batch):
            loss = batch_loss(order[i:i + batch])
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
    bar.close()
