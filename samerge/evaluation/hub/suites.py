"""The hub suites' classes: one per kind over :class:`HubSuite`, and :func:`load_hub_suite`, the way in.

:class:`HubSuite` holds what the kinds share (the spec, the provenance record, the base's snapshot, the evaluation
data as :class:`HubTask`, scoring with the task's metric); :class:`ClipSuite`, :class:`SeqClsSuite` and
:class:`Seq2SeqLoraSuite` each load their base, read their tasks' inputs, turn a published expert into a state dict
with exactly the base's keys, and score a state on every task. Nothing is fine-tuned; ``transformers`` is imported
where a model is loaded, so the schema and the built-ins read without it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samerge.device import resolve_device
from samerge.errors import SamergeError
from samerge.evaluation.hub.download import Acquired, Provenance, acquire, acquire_model
from samerge.evaluation.hub.readers import _subsample, _to_class_ids, read_columns
from samerge.evaluation.hub.spec import (HUB_SUITES, SUITE_FILE_SUFFIXES, SuiteSpec, TaskSpec, builtin_spec,
                                        load_spec_file)
from samerge.evaluation.metrics import REGRESSION_METRICS, accuracy, get_metric
from samerge.evaluation.suite import Expert, SuiteBase
from samerge.evaluation.templates import builtin_templates, clean_classname, prompts
from samerge.lora import load_adapter

SIZES = ("small", "full")


def is_hub_suite(suite: str) -> bool:
    """True for a built-in hub suite name or a suite file path (``.yaml``, ``.yml``, ``.json``)."""
    return suite in HUB_SUITES or suite.lower().endswith(SUITE_FILE_SUFFIXES)


@dataclass
class HubTask:
    """A task's evaluation examples: ``inputs`` are uint8 images (clip), tuples of texts (seq-cls) or prompts
    (seq2seq); ``labels`` class ids or real values; ``label_names`` the class names (clip, seq-cls when the data
    stores them) or label words (seq2seq); ``source`` the data's ``repo@commit`` or local path."""

    name: str
    spec: TaskSpec
    inputs: list[Any]
    labels: list[float]
    label_names: list[str] = field(default_factory=list)
    source: str = ""


def _device(device: str = "auto") -> torch.device:
    """``--device``; when it is ``auto``, the environment's ``SAMERGE_DEVICE`` may name one."""
    if device == "auto":
        device = os.environ.get("SAMERGE_DEVICE") or "auto"
    return resolve_device(device)


def detached_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict that owns its memory, keeping tied tensors tied (one clone per storage)."""
    clones: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in clones:
            clones[key] = v.detach().clone()
        out[k] = clones[key]
    return out


def _check_keys(base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = [k for k in base if k not in state]
    extra = [k for k in state if k not in base]
    if missing or extra:
        detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r} that the base lacks"
        raise SamergeError(f"{what} does not fit the base: it {detail} ({len(missing)} missing, {len(extra)} extra)")
    for k, v in base.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise SamergeError(f"{what} does not fit the base: {k!r} has shape {list(state[k].shape)}, the base "
                               f"{list(v.shape)}")


def _labelled(t: TaskSpec, table: Mapping[str, list[Any]], names: list[str] | None) -> tuple[list[float], list[int]]:
    """A text task's labels (class ids, or numbers for a regression metric) and the rows that have one."""
    regression = t.metric in REGRESSION_METRICS
    raw = table[t.label_field]
    labels = [float(v) for v in raw] if regression else [
        float(v) for v in _to_class_ids(raw, names, None, f"task {t.name!r}")]
    keep = [i for i, y in enumerate(labels) if regression or y >= 0]
    if not keep:
        raise SamergeError(f"task {t.name!r}: the split has no labels (GLUE's test splits are unlabeled: use "
                           "validation)")
    return labels, keep


class HubSuite(SuiteBase):
    """What the three kinds share: the spec, provenance, data loading, and the suite interface
    (:class:`~samerge.evaluation.suite.Suite`; :class:`~samerge.evaluation.suite.SuiteBase` gives samerge's standard
    methods and no merges of its own).

    The report uses ``name`` (the spec's), ``exclude``, ``base`` (the merged part of the base, a state dict),
    ``expert(task) -> Expert`` (``Expert.encoder`` has exactly ``base``'s keys) and
    ``scores(state, experts) -> {task: score}``.
    """

    exclude: tuple[str, ...] = ()
    base: dict[str, torch.Tensor]

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        if size not in SIZES:
            raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
        self.spec, self.size, self.seed, self.progress = spec, size, seed, progress
        self.name = spec.name  # per instance: one class runs every suite of its kind
        self.provenance = Provenance(spec)
        self.device = _device(device)
        base = acquire_model(spec.base, f"suite {spec.name}: base")
        self.provenance.record("base", base)
        self.base_dir = base.path

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _batches(self, n: int) -> Iterator[slice]:
        for i in range(0, n, self.spec.batch_size):
            yield slice(i, min(n, i + self.spec.batch_size))

    def _data(self, t: TaskSpec, columns: Sequence[str]) -> tuple[dict[str, list[Any]], list[str] | None, str]:
        acq = acquire(t.data, f"task {t.name!r}: data", repo_type="dataset",
                      allow_patterns=[*t.data.files, "README.md"] if t.data.repo else None)
        self.provenance.record(f"data:{t.name}", acq)
        table, names, _ = read_columns(acq.path, t.data, columns, f"task {t.name!r}: data")
        n = len(table[columns[-1]])
        keep = _subsample(n, self.size, self.spec.small_examples, f"{t.name}:{self.seed}")
        table = {c: [v[i] for i in keep] for c, v in table.items()}
        source = f"{acq.repo}@{acq.commit or acq.revision}" if acq.repo else str(acq.path)
        return table, names, source

    def _expert_source(self, task: HubTask) -> Acquired:
        t = task.spec
        if t.expert is None:
            raise SamergeError(f"suite {self.name}: task {t.name!r} names no expert; write a suite file with "
                               f"'expert: {{repo: ..., revision: ...}}' for it (samerge.evaluation.hub.write_spec"
                               f"({self.name!r}, 'suite.yaml') writes this suite as a template)")
        acq = acquire_model(t.expert, f"task {t.name!r}: expert")
        self.provenance.record(f"expert:{t.name}", acq)
        return acq

    def score_task(self, task: HubTask, preds: Sequence[float]) -> dict[str, float]:
        """The task's metric as its ``score`` (what ``normalized`` divides: the paper's per-task number), and, for
        a classification task, plain ``accuracy`` beside it."""
        out = {"score": get_metric(task.spec.metric)(list(preds), task.labels)}
        if task.spec.metric not in REGRESSION_METRICS:
            out["accuracy"] = accuracy(list(preds), task.labels)
        return out

    def load_task(self, t: TaskSpec) -> HubTask:
        """The task's evaluation examples (every kind implements it)."""
        raise NotImplementedError

    def expert(self, task: HubTask) -> Expert:
        """The task's expert: ``encoder`` with exactly ``base``'s keys, ``head`` what scoring needs."""
        raise NotImplementedError

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """One model state (base, expert or merge) scored on every expert's task."""
        raise NotImplementedError


class ClipSuite(HubSuite):
    """CLIP: the vision tower is merged (keys ``vision_model.*``); heads are zero-shot text embeddings."""

    PREFIX = "vision_model."

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(self.base_dir).float().eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        if not (self.base_dir / "preprocessor_config.json").is_file():
            raise SamergeError(f"suite {self.name}: the base has no preprocessor_config.json (CLIP's image "
                               "preprocessing is read from it)")
        self.processor = CLIPImageProcessor.from_pretrained(self.base_dir)
        self.base = detached_copy({self.PREFIX + k: v.cpu() for k, v in self.model.vision_model.state_dict().items()})
        self._heads: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------- data
    def _pixels_u8(self, images: list[Any]) -> torch.Tensor:
        """Resized and center-cropped uint8 images (N, 3, H, W): the processor's geometry, normalization later."""
        out = self.processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
        return torch.as_tensor(out["pixel_values"]).round().clamp(0, 255).to(torch.uint8)

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's input, exactly as the processor rescales and normalizes."""
        mean = torch.tensor(self.processor.image_mean, device=u8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.processor.image_std, device=u8.device).view(1, -1, 1, 1)
        return (u8.float() * float(self.processor.rescale_factor) - mean) / std

    def load_task(self, t: TaskSpec) -> HubTask:
        from PIL import Image

        table, names, source = self._data(t, [t.image_field, t.label_field])
        classnames = t.classnames or ([clean_classname(n) for n in names] if names else None)
        if classnames is None:
            raise SamergeError(f"task {t.name!r}: the data stores no class names; give classnames in the suite")
        if names and len(names) != len(classnames):
            raise SamergeError(f"task {t.name!r}: {len(classnames)} class names for a dataset with {len(names)} "
                               "classes")
        labels = _to_class_ids(table[t.label_field], names or t.classnames, None, f"task {t.name!r}")
        keep = [i for i, y in enumerate(labels) if y >= 0]
        bad = [labels[i] for i in keep if labels[i] >= len(classnames)]
        if bad:
            raise SamergeError(f"task {t.name!r}: label {bad[0]} but only {len(classnames)} class names")
        root = Path(t.data.path) if t.data.path else None
        base_dir = root.parent if root is not None and root.is_file() else root

        def open_image(v: Any) -> Any:
            try:
                if isinstance(v, dict):
                    if v.get("bytes"):
                        return Image.open(io.BytesIO(v["bytes"])).convert("RGB")
                    v = v.get("path")
                p = Path(str(v))
                if not p.is_absolute() and base_dir:
                    p = base_dir / p
                return Image.open(p).convert("RGB")
            except OSError as exc:
                raise SamergeError(f"task {t.name!r}: cannot read an image ({exc})") from None

        bar = self._bar(len(keep), f"preparing {t.name}")
        pixels: list[torch.Tensor] = []
        for sl in self._batches(len(keep)):
            idx = keep[sl]
            pixels.extend(self._pixels_u8([open_image(table[t.image_field][i]) for i in idx]).unbind(0))
            bar.update(len(idx))
        bar.close()
        return HubTask(t.name, t, pixels, [float(labels[i]) for i in keep], classnames, source)

    # ---------------------------------------------------------------------------------------- heads
    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """CLIP's normalized text embeddings (projection of the pooled end-of-text state), batched and padded."""
        out = []
        for sl in self._batches(len(texts)):
            enc = self.tokenizer(texts[sl], padding=True, truncation=True, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[1]
            emb = self.model.text_projection(pooled)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out).float().cpu()

    def zero_shot_head(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        """(classes, dim): per class, the normalized mean of its templates' normalized text embeddings."""
        texts = [p for c in classnames for p in prompts(templates, c)]
        emb = self.text_embeddings(texts).view(len(classnames), len(templates), -1).mean(dim=1)
        return emb / emb.norm(dim=-1, keepdim=True)

    def head(self, task: HubTask) -> torch.Tensor:
        if task.name not in self._heads:
            templates = task.spec.templates or builtin_templates()[task.name]
            self._heads[task.name] = self.zero_shot_head(task.label_names, templates)
        return self._heads[task.name]

    # ---------------------------------------------------------------------------------------- experts
    def expert(self, task: HubTask) -> Expert:
        from transformers import AutoConfig, CLIPModel, CLIPVisionModel

        acq = self._expert_source(task)
        kind = getattr(AutoConfig.from_pretrained(acq.path), "model_type", "")
        if kind == "clip":
            vision = CLIPModel.from_pretrained(acq.path).vision_model
        elif kind == "clip_vision_model":
            vision = CLIPVisionModel.from_pretrained(acq.path)
        else:
            raise SamergeError(f"task {task.name!r}: expert {acq.path} is a {kind or 'unknown'} model; a CLIP "
                               "suite takes clip_vision_model or clip checkpoints")
        core = vision.vision_model if isinstance(getattr(vision, "vision_model", None), torch.nn.Module) else vision
        state = detached_copy({self.PREFIX + k: v.float() for k, v in core.state_dict().items()})
        _check_keys(self.base, state, f"task {task.name!r}: expert {acq.path}")
        return Expert(task, state, {"weight": self.head(task)})

    # ---------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def image_embeddings(self, state: Mapping[str, torch.Tensor], pixels: list[torch.Tensor]) -> torch.Tensor:
        self.model.vision_model.load_state_dict({k[len(self.PREFIX):]: v for k, v in state.items()})
        out = []
        for sl in self._batches(len(pixels)):
            x = self.normalize(torch.stack(pixels[sl]).to(self.device))
            pooled = self.model.vision_model(pixel_values=x)[1]
            emb = self.model.visual_projection(pooled)
            out.append((emb / emb.norm(dim=-1, keepdim=True)).float().cpu())
        return torch.cat(out)

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """Zero-shot accuracy (or the task's metric) of one vision tower on every expert's task."""
        out = {}
        for e in experts:
            logits = self.image_embeddings(state, e.task.inputs) @ e.head["weight"].t()
            out[e.task.name] = self.score_task(e.task, logits.argmax(-1).tolist())
        return out


class SeqClsSuite(HubSuite):
    """Sequence classification (RoBERTa on GLUE): the encoder is merged, each expert keeps its classifier."""

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        # the base is usually a masked-LM checkpoint: its encoder is read into a classifier (new head dropped)
        model, info = self._load(self.base_dir, num_labels=2)
        self.prefix = model.base_model_prefix + "."
        lost = [k for k in info["missing_keys"] if k.startswith(self.prefix)]
        if lost:
            raise SamergeError(f"suite {self.name}: the base checkpoint lacks encoder tensor {lost[0]!r}")
        self.base = detached_copy({k: v for k, v in model.state_dict().items() if k.startswith(self.prefix)})
        self._configs: dict[str, Any] = {}  # task -> its expert's config
        self._models: dict[int, torch.nn.Module] = {}  # one evaluation model per number of outputs

    @staticmethod
    def _load(path: Path, **kw: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kw)
        return model.float().eval(), info

    def load_task(self, t: TaskSpec) -> HubTask:
        fields = list(t.text_fields or [])
        table, names, source = self._data(t, [*fields, t.label_field])
        labels, keep = _labelled(t, table, names)
        inputs = [tuple(str(table[c][i]) for c in fields) for i in keep]
        return HubTask(t.name, t, inputs, [labels[i] for i in keep], names or [], source)

    def expert(self, task: HubTask) -> Expert:
        acq = self._expert_source(task)
        model, info = self._load(acq.path)
        if info["missing_keys"]:
            raise SamergeError(f"task {task.name!r}: expert {acq.path} lacks {info['missing_keys'][0]!r} (not a "
                               "fine-tuned sequence classifier?)")
        sd = model.state_dict()
        encoder = detached_copy({k: v for k, v in sd.items() if k.startswith(self.prefix)})
        head = detached_copy({k: v for k, v in sd.items() if not k.startswith(self.prefix)})
        _check_keys(self.base, encoder, f"task {task.name!r}: expert {acq.path}")
        outputs = int(model.config.num_labels)
        regression = task.spec.metric in REGRESSION_METRICS
        if regression != (outputs == 1):
            raise SamergeError(f"task {task.name!r}: metric {task.spec.metric!r} but the expert has {outputs} "
                               "output(s) (a regression metric needs exactly 1, classification 2 or more)")
        if not regression and task.labels and max(task.labels) >= outputs:
            raise SamergeError(f"task {task.name!r}: label {int(max(task.labels))} but the expert has {outputs} "
                               "classes")
        self._configs[task.name] = model.config
        return Expert(task, encoder, head)

    def _model(self, task: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        cfg = self._configs[task]
        if cfg.num_labels not in self._models:
            self._models[cfg.num_labels] = AutoModelForSequenceClassification.from_config(cfg).float().eval()
        return self._models[cfg.num_labels].to(self.device)

    @torch.no_grad()
    def predict(self, state: Mapping[str, torch.Tensor], expert: Expert) -> list[float]:
        """Class ids (argmax) or, with one output, the regression value, for each of the task's inputs."""
        model = self._model(expert.task.name)
        model.load_state_dict({**state, **expert.head})
        inputs = expert.task.inputs
        out: list[float] = []
        for sl in self._batches(len(inputs)):
            columns = [list(c) for c in zip(*inputs[sl])]
            enc = self.tokenizer(*columns, truncation=True, max_length=self.spec.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            logits = model(**enc).logits.float()
            out += (logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1).float()).tolist()
        return out

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """Each task's metric with one encoder and that task's expert head."""
        return {e.task.name: self.score_task(e.task, self.predict(state, e)) for e in experts}


class Seq2SeqLoraSuite(HubSuite):
    """Flan-T5 + PEFT LoRA experts: dense experts W0 + s·BA merged; label words generated or scored."""

    def __init__(self, spec: SuiteSpec, size: str, seed: int, progress: bool, device: str = "auto") -> None:
        super().__init__(spec, size, seed, progress, device)
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(self.base_dir).float().eval().to(self.device)
        self.base = detached_copy({k: v.cpu() for k, v in self.model.state_dict().items()})

    def load_task(self, t: TaskSpec) -> HubTask:
        assert t.prompt is not None
        fields = sorted(set(re.findall(r"{(\w+)}", t.prompt)))
        table, names, source = self._data(t, [*[f for f in fields if f != t.label_field], t.label_field])
        labels, keep = _labelled(t, table, names)
        try:
            inputs = [t.prompt.format(**{c: table[c][i] for c in table}) for i in keep]
        except (KeyError, IndexError, ValueError) as exc:
            raise SamergeError(f"task {t.name!r}: prompt does not format with the data's columns ({exc})") from None
        words: list[str] = []
        if t.targets is not None:
            ids = sorted(int(k) for k in t.targets)
            if ids != list(range(len(ids))):
                raise SamergeError(f"task {t.name!r}: targets must map label ids 0..n-1, got {sorted(t.targets)}")
            words = [t.targets[str(i)] for i in ids]
            unknown = sorted({int(labels[i]) for i in keep} - set(ids))
            if unknown:
                raise SamergeError(f"task {t.name!r}: label {unknown[0]} has no target word")
        return HubTask(t.name, t, inputs, [labels[i] for i in keep], words, source)

    def expert(self, task: HubTask) -> Expert:
        acq = self._expert_source(task)
        adapter = load_adapter(acq.path)
        state = dict(self.base)  # untouched tensors are the base's own (no copy; ties kept)
        for mod in adapter.modules.values():
            w0 = self.base.get(mod.base_key)
            if w0 is None:
                raise SamergeError(f"task {task.name!r}: adapter module {mod.name!r} has no weight "
                                   f"{mod.base_key!r} in the base")
            delta = mod.delta(torch.float32)
            if tuple(delta.shape) != tuple(w0.shape):
                raise SamergeError(f"task {task.name!r}: adapter module {mod.name!r} makes a {list(delta.shape)} "
                                   f"update for a {list(w0.shape)} weight")
            state[mod.base_key] = (w0.float() + delta).to(w0.dtype)
        return Expert(task, state, {})

    @torch.no_grad()
    def predict(self, state: Mapping[str, torch.Tensor], task: HubTask) -> list[float]:
        """Class ids (a generation matching no label word is -1) or parsed numbers (unparseable: 0.0)."""
        self.model.load_state_dict(dict(state))
        t = task.spec
        out: list[float] = []
        index = {w.strip(): i for i, w in enumerate(task.label_names)}
        for sl in self._batches(len(task.inputs)):
            enc = self.tokenizer(task.inputs[sl], truncation=True, max_length=self.spec.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            if t.decode == "score":
                out += self._rank(enc, task.label_names)
                continue
            gen = self.model.generate(**enc, max_new_tokens=self.spec.max_new_tokens, do_sample=False, num_beams=1)
            for text in self.tokenizer.batch_decode(gen, skip_special_tokens=True):
                text = text.strip()
                if t.target_format is not None:
                    try:
                        out.append(float(text))
                    except ValueError:
                        out.append(0.0)  # FusionBench's convention for an unparseable STS-B generation
                else:
                    out.append(float(index.get(text, -1)))
        return out

    def _rank(self, enc: Mapping[str, torch.Tensor], words: list[str]) -> list[float]:
        """The label word with the highest log-likelihood (sum over its tokens) for each input."""
        n = enc["input_ids"].shape[0]
        scores = []
        for w in words:
            target = self.tokenizer([w] * n, return_tensors="pt", padding=True)["input_ids"].to(self.device)
            labels = target.masked_fill(target == self.tokenizer.pad_token_id, -100)
            logits = self.model(**enc, labels=labels).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((logp * (labels != -100)).sum(-1))
        return torch.stack(scores, dim=-1).argmax(-1).float().tolist()

    def scores(self, state: Mapping[str, torch.Tensor], experts: list[Expert]) -> dict[str, dict[str, float]]:
        """Each task's metric for one model (the base, an expert, or a merge)."""
        return {e.task.name: self.score_task(e.task, self.predict(state, e.task)) for e in experts}


_KINDS: dict[str, type[HubSuite]] = {"clip": ClipSuite, "seq-cls": SeqClsSuite, "seq2seq-lora": Seq2SeqLoraSuite}


def load_hub_suite(suite: str, size: str, seed: int = 0, progress: bool = False,
                   tasks: Sequence[str] | None = None, add_tasks: Mapping[str, str] | None = None,
                   device: str = "auto") -> tuple[HubSuite, list[HubTask]]:
    """The suite object and its tasks' data, for :func:`samerge.evaluation.report.run_report`.

    ``suite`` is a built-in name (:data:`HUB_SUITES`) or a suite file; ``tasks`` selects a subset by name.
    Hub suites take new tasks through a suite file, not ``add_tasks`` (a task needs its published expert).
    """
    if add_tasks:
        raise SamergeError("--add-task fine-tunes an expert, which hub suites do not do; add the task (with its "
                           "expert) to a suite file and pass --suite FILE.yaml")
    spec = builtin_spec(suite) if suite in HUB_SUITES else load_spec_file(suite)
    if size not in SIZES:
        raise SamergeError(f"unknown suite size {size!r}; choose from: {', '.join(SIZES)}")
    by_name = {t.name: t for t in spec.tasks}
    names = list(tasks) if tasks else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SamergeError(f"unknown {spec.name} task {unknown[0]!r}; tasks: {', '.join(by_name)}")
    lacking = [n for n in names if by_name[n].expert is None]
    if lacking:
        raise SamergeError(f"suite {spec.name}: task {lacking[0]!r} names no expert (no published set is pinned "
                           f"here); write the suite with samerge.evaluation.hub.write_spec({spec.name!r}, "
                           "'suite.yaml'), add each task's expert {repo, revision} and pass --suite suite.yaml")
    st = _KINDS[spec.kind](spec, size, seed, progress, device)
    return st, [st.load_task(by_name[n]) for n in names]
