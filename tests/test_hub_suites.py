"""The paper's hub suites on tiny local stand-ins saved in the real formats, and the metrics against oracles.

Stand-ins are real ``transformers`` models built from their config classes (CLIP, RoBERTa, T5 + a PEFT LoRA
adapter) with real tokenizers, saved with ``save_pretrained``; datasets are small parquet (with the ``datasets``
library's ClassLabel metadata), CSV, JSONL files and an image folder. The hub path runs against a Hugging Face
cache populated by hand under ``HF_HUB_OFFLINE=1``, with every socket connection refused. Independent oracles:
scikit-learn / SciPy for the metrics, ``CLIPModel(...).logits_per_image`` for CLIP zero-shot accuracy,
``from_pretrained`` classifiers for RoBERTa, PEFT's own ``merge_and_unload`` and ``generate`` for the LoRA path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import samerge
from samerge.cli import main
from samerge.errors import SamergeError, SamergeWarning
from samerge.evaluation import metrics
from samerge.evaluation.hub import (HUB_SUITES, ClipSuite, builtin_spec, clean_classname, load_hub_suite,
                                    load_spec_file, write_spec)
from samerge.evaluation.report import run_report

COLORS = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 210)}


# ==================================================================================================== metrics
def test_metrics_match_scikit_learn_and_scipy():
    from scipy import stats
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    for trial in range(20):
        n, k = int(rng.integers(5, 60)), int(rng.integers(2, 5))
        y, p = rng.integers(0, k, n), rng.integers(0, k, n)
        if trial % 3 == 0:
            p = np.where(rng.random(n) < 0.7, y, p)  # correlated predictions
        assert metrics.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
        assert metrics.mcc(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
        yb, pb = y % 2, p % 2
        assert metrics.f1(pb, yb) == pytest.approx(skm.f1_score(yb, pb, zero_division=0), abs=1e-12)
        assert metrics.accuracy_f1(pb, yb) == pytest.approx(
            (skm.accuracy_score(yb, pb) + skm.f1_score(yb, pb, zero_division=0)) / 2, abs=1e-12)
        a = rng.normal(size=n)
        b = np.round(a + rng.normal(size=n), 1 if trial % 2 else 3)  # rounding makes ties for the ranks
        a = np.round(a, 1) if trial % 4 == 0 else a
        assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)
        assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-10)
        assert metrics.pearson_spearman(a, b) == pytest.approx(
            (stats.pearsonr(a, b)[0] + stats.spearmanr(a, b)[0]) / 2, abs=1e-10)
    # degenerate inputs: one stated convention (0.0) instead of NaN; scikit-learn agrees for MCC
    assert metrics.mcc([1, 1, 1], [0, 1, 0]) == skm.matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0
    assert metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert metrics.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
    assert metrics.f1([0, 0], [0, 0]) == 0.0
    assert metrics.accuracy([-1, 1], [0, 1]) == 0.5  # an unparseable generation (-1) is wrong
    with pytest.raises(SamergeError, match="2 predictions for 3 labels"):
        metrics.accuracy([0, 1], [0, 1, 1])


def test_report_rows_normalize_each_task_by_its_expert_and_average_the_ratios():
    """The one normalisation every report and the pipeline's evaluate stage use (scoring.score_rows): per task
    merged / expert, the average row the mean of those ratios (not the ratio of the means), NaN where an expert
    scores 0."""
    from samerge.evaluation.scoring import score_rows

    def sc(**kw):
        return {t: {"score": v, "accuracy": v + 0.1} for t, v in kw.items()}

    rows = score_rows("s", "m", sc(a=0.5, b=0.9), sc(a=1.0, b=0.9, c=0.3))
    got = {r["task"]: (r["score"], r["normalized"]) for r in rows}
    assert got["a"] == (0.5, 0.5) and got["b"] == (0.9, 1.0)
    assert got["average"][0] == pytest.approx(0.7) and got["average"][1] == pytest.approx(0.75)
    acc = {r["task"]: r["accuracy"] for r in rows}  # accuracy is carried beside, never normalized
    assert acc["a"] == pytest.approx(0.6) and acc["average"] == pytest.approx(0.8)
    zero = {r["task"]: r["normalized"] for r in score_rows("s", "m", sc(a=0.2, b=0.4), sc(a=0.0, b=0.8))}
    assert math.isnan(zero["a"]) and zero["b"] == 0.5 and math.isnan(zero["average"])
    # a task without accuracy (regression): the average has none either
    mixed = score_rows("s", "m", {"a": {"score": 0.5}, "b": {"score": 0.9, "accuracy": 0.9}}, sc(a=1.0, b=0.9))
    assert [r["accuracy"] for r in mixed] == [None, 0.9, None]
    with pytest.raises(SamergeError, match="unknown metric 'auc'; valid metrics: accuracy"):
        metrics.get_metric("auc")


# ==================================================================================================== stand-ins
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private samerge cache and Hugging Face home, offline; the user's caches are never touched."""
    root = tmp_path_factory.mktemp("hub-suites")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over a shared CPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMERGE_CACHE", str(root / "samerge-cache"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("SAMERGE_DEVICE", "cpu")
        yield root
    torch.set_num_threads(threads)


def _png(rgb: tuple[int, int, int], rng: random.Random, side: int = 20) -> bytes:
    from PIL import Image

    arr = np.clip(np.array(rgb, dtype=np.int32)[None, None, :] + np.array(
        [[[rng.randint(-40, 40) for _ in range(3)] for _ in range(side)] for _ in range(side)]), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_parquet(path: Path, names: list[str], n: int, seed: int) -> None:
    """An image-classification split as the ``datasets`` library writes it (Image structs, ClassLabel names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    labels = [i % len(names) for i in range(n)]
    images = [{"bytes": _png(COLORS[names[y]], rng), "path": None} for y in labels]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, type=struct), "label": pa.array(labels, type=pa.int64())})
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": names, "_type": "ClassLabel"}}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), path)


def make_clip(root: Path) -> dict[str, Path]:
    """A tiny CLIP base (model, BPE tokenizer, image processor) and two vision-tower experts in both layouts."""
    from safetensors.torch import save_file
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    base = root / "clip-base"
    CLIPModel(cfg).save_pretrained(base)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(base)
    vision = CLIPModel.from_pretrained(base).vision_model.state_dict()
    out = {"base": base}
    for i, task in enumerate(("colors", "shapes")):
        g = torch.Generator().manual_seed(10 + i)
        expert = CLIPVisionModel(cfg.vision_config)
        expert.load_state_dict({k: v + 0.05 * v.float().std() * torch.randn(v.shape, generator=g)
                                for k, v in vision.items()})
        d = root / f"clip-{task}"
        if i == 0:
            expert.save_pretrained(d)
        else:  # the layout transformers 4 wrote (FusionBench's experts): keys under vision_model.
            d.mkdir()
            cfg.vision_config.save_pretrained(d)
            save_file({"vision_model." + k: v.contiguous() for k, v in expert.state_dict().items()},
                      str(d / "model.safetensors"), metadata={"format": "pt"})
        out[task] = d
    return out


@pytest.fixture(scope="module")
def clip_files(env):
    root = env / "clip"
    files = make_clip(root)
    write_image_parquet(root / "colors" / "data" / "test-00000-of-00001.parquet", ["red", "green", "blue"], 12, 1)
    rng = random.Random(2)
    for name in ("red_things", "blue_things"):  # an image folder: class = folder name (cleaned: "red things")
        (root / "shapes" / name).mkdir(parents=True)
        for j in range(5):
            (root / "shapes" / name / f"{j}.png").write_bytes(_png(COLORS[name.split("_")[0]], rng))
    suite = {"name": "tiny-clip", "kind": "clip", "base": {"path": str(files["base"])},
             "tasks": [{"name": "colors", "expert": {"path": str(files["colors"])},
                        "data": {"path": str(root / "colors" / "data" / "test-00000-of-00001.parquet")},
                        "templates": ["a photo of a {}."]},
                       {"name": "shapes", "expert": {"path": str(files["shapes"])},
                        "data": {"path": str(root / "shapes"), "format": "imagefolder"},
                        "templates": ["a photo of a {}.", "a drawing of the {}!"]}]}
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return {**files, "suite": path, "root": root}


# ==================================================================================================== CLIP
def test_zero_shot_head_equals_text_embeddings_by_hand(clip_files):
    from transformers import AutoTokenizer, CLIPModel

    st, tasks = load_hub_suite(str(clip_files["suite"]), "full")
    assert isinstance(st, ClipSuite) and [t.name for t in tasks] == ["colors", "shapes"]
    assert tasks[0].label_names == ["red", "green", "blue"]  # ClassLabel names from the parquet metadata
    assert tasks[1].label_names == ["blue things", "red things"]  # image-folder names, sorted and cleaned
    classes, templates = ["red", "dark green", "blue"], ["a photo of a {}.", "a blurry photo of the {}, zoomed."]
    head = st.zero_shot_head(classes, templates)

    model = CLIPModel.from_pretrained(clip_files["base"]).eval()
    tok = AutoTokenizer.from_pretrained(clip_files["base"])
    eos = model.config.text_config.eos_token_id
    rows = []
    with torch.no_grad():
        for c in classes:
            embs = []
            for t in templates:  # one prompt at a time, no padding; pool the end-of-text state by hand
                ids = tok(t.format(c), return_tensors="pt")["input_ids"]
                hidden = model.text_model(input_ids=ids).last_hidden_state[0]
                e = model.text_projection(hidden[ids[0].tolist().index(eos)])
                embs.append(e / e.norm())
            m = torch.stack(embs).mean(0)
            rows.append(m / m.norm())
    assert torch.allclose(head, torch.stack(rows), atol=1e-5)
    assert clean_classname("/a/apartment_building/outdoor") == "apartment building outdoor"


def test_clip_vision_towers_merge_through_run_report(clip_files, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    methods = ["task_arithmetic", "ties[density=0.5]", "sa_merging[iterations=2]"]
    rows = run_report(str(clip_files["suite"]), "full", tmp_path / "report", methods=methods)
    got = {(r["method"], r["task"]): r for r in rows}
    assert {m for m, _ in got} == {"base", "expert", *methods}
    assert {t for _, t in got} == {"colors", "shapes", "average"}
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert got[("expert", "colors")]["normalized"] == pytest.approx(1.0)
    for m in ("base", "expert", *methods):
        assert got[(m, "average")]["score"] == pytest.approx((got[(m, "colors")]["score"] +
                                                              got[(m, "shapes")]["score"]) / 2)
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 5 * 3
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "per_task.png").is_file()

    # oracle: the expert's zero-shot accuracy with transformers' own CLIP forward (processor + logits_per_image)
    import pyarrow.parquet as pq

    table = pq.read_table(clip_files["root"] / "colors" / "data" / "test-00000-of-00001.parquet").to_pylist()
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in table]
    clip = CLIPModel.from_pretrained(clip_files["base"]).eval()
    clip.vision_model.load_state_dict(CLIPVisionModel.from_pretrained(clip_files["colors"]).state_dict())
    tok = AutoTokenizer.from_pretrained(clip_files["base"])
    text = tok([f"a photo of a {c}." for c in ("red", "green", "blue")], padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(clip_files["base"])(images=images, return_tensors="pt")
    with torch.no_grad():
        logits = clip(**text, pixel_values=pixels["pixel_values"]).logits_per_image
    oracle = float((logits.argmax(-1) == torch.tensor([r["label"] for r in table])).float().mean())
    assert got[("expert", "colors")]["score"] == pytest.approx(oracle)


# ==================================================================================================== RoBERTa
def _roberta_tokenizer(path: Path) -> None:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(path)


def _finetune(model: torch.nn.Module, batches: list[dict], steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        loss = model(**batches[s % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def roberta_files(env):
    """RoBERTa: a masked-LM base and two experts (CoLA: 2 classes, MCC; STS-B: regression), briefly trained."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    root = env / "roberta"
    base = root / "roberta-base"
    _roberta_tokenizer(base)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2)
    RobertaForMaskedLM(cfg).save_pretrained(base)
    rng = random.Random(0)
    good, bad = ["the cat sat", "a dog ran far", "birds sing", "we like tea"], ["sat cat the", "ran far dog a"]
    cola = [(rng.choice(good) + f" {i}", 1) if i % 2 else (rng.choice(bad) + f" {i}", 0) for i in range(24)]
    with open(root / "cola.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label", "idx"])
        w.writerows([(s, y, i) for i, (s, y) in enumerate(cola)])
    stsb = []
    for i in range(24):
        a = rng.choice(good)
        b = a if i % 3 == 0 else rng.choice(bad)
        stsb.append({"sentence1": a, "sentence2": b + f" {i % 5}", "label": round(5.0 if a == b else rng.random(), 2)})
    (root / "stsb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stsb))
    for task, labels in (("cola", 2), ("stsb", 1)):
        torch.manual_seed(1)
        m = RobertaForSequenceClassification.from_pretrained(base, num_labels=labels)
        if task == "cola":
            enc = tok([s for s, _ in cola], padding=True, return_tensors="pt")
            batches = [{**enc, "labels": torch.tensor([y for _, y in cola])}]
        else:
            enc = tok([r["sentence1"] for r in stsb], [r["sentence2"] for r in stsb], padding=True,
                      return_tensors="pt")
            batches = [{**enc, "labels": torch.tensor([r["label"] for r in stsb])}]
        _finetune(m, batches, 30, 3e-3)
        m.save_pretrained(root / f"roberta-{task}")
    suite = {"name": "tiny-roberta-glue", "kind": "seq-cls", "base": {"path": "roberta-base"},
             "tasks": [{"name": "cola", "expert": {"path": "roberta-cola"}, "data": {"path": "cola.csv"},
                        "text_fields": ["sentence"], "metric": "mcc"},
                       {"name": "stsb", "expert": {"path": "roberta-stsb"}, "data": {"path": "stsb.jsonl"},
                        "text_fields": ["sentence1", "sentence2"], "metric": "pearson_spearman"}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))  # relative paths: resolved against the file
    return {"root": root, "suite": root / "suite.yaml", "cola": cola, "stsb": stsb}


def test_roberta_glue_cola_mcc_and_stsb_regression(roberta_files, tmp_path):
    from scipy import stats
    from sklearn.metrics import matthews_corrcoef
    from transformers import AutoTokenizer, RobertaForSequenceClassification

    rows = run_report(str(roberta_files["suite"]), "full", tmp_path / "r", methods=["task_arithmetic", "ties"])
    got = {(r["method"], r["task"]): r["score"] for r in rows}
    assert set(got) == {(m, t) for m in ("base", "expert", "task_arithmetic", "ties")
                        for t in ("cola", "stsb", "average")}

    root = roberta_files["root"]
    tok = AutoTokenizer.from_pretrained(root / "roberta-base")
    with torch.no_grad():
        cola = roberta_files["cola"]
        m = RobertaForSequenceClassification.from_pretrained(root / "roberta-cola").eval()
        preds = m(**tok([s for s, _ in cola], padding=True, return_tensors="pt")).logits.argmax(-1).numpy()
        stsb = roberta_files["stsb"]
        r = RobertaForSequenceClassification.from_pretrained(root / "roberta-stsb").eval()
        values = r(**tok([x["sentence1"] for x in stsb], [x["sentence2"] for x in stsb], padding=True,
                         return_tensors="pt")).logits[:, 0].numpy()
    gold = np.array([x["label"] for x in stsb])
    assert len(set(preds.tolist())) == 2  # the trained expert is not a constant predictor: MCC is informative
    assert got[("expert", "cola")] == pytest.approx(matthews_corrcoef([y for _, y in cola], preds), abs=1e-6)
    oracle = (stats.pearsonr(values, gold)[0] + stats.spearmanr(values, gold)[0]) / 2
    assert got[("expert", "stsb")] == pytest.approx(oracle, abs=1e-5)


# ==================================================================================================== Flan-T5
@pytest.fixture(scope="module")
def t5_files(env):
    """A tiny T5 base (Unigram tokenizer) and PEFT LoRA adapters (q, v) trained briefly on label words."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    root = env / "t5"
    base = root / "flan-t5-base"
    words = ["▁" + w for w in "yes no positive negative good bad film is review rate the sentence".split()]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'?:")
    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[(w, -1.0) for w in words],
                             ("▁", -2.0), *[(c, -3.0) for c in chars]], extra_ids=0)
    tok.save_pretrained(base)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8)
    T5ForConditionalGeneration(cfg).save_pretrained(base)
    rng = random.Random(0)
    sst = [{"sentence": f"{rng.choice(['good', 'bad'])} film {i}", "label": 0} for i in range(16)]
    for r in sst:
        r["label"] = int(r["sentence"].startswith("good"))
    (root / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sst))
    prompts = {"sst2": "review: {sentence}. is the film good?", "stsb": "rate: {sentence1} ? {sentence2}"}
    words_of = {"sst2": {"0": "negative", "1": "positive"}}
    stsb = [{"sentence1": f"good film {i}", "sentence2": f"{'good' if i % 2 else 'bad'} film {i % 3}",
             "label": 4.0 if i % 2 else 1.0} for i in range(12)]
    (root / "stsb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stsb))
    for task, rows in (("sst2", sst), ("stsb", stsb)):
        torch.manual_seed(3)
        pm = get_peft_model(T5ForConditionalGeneration.from_pretrained(base),
                            LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, target_modules=["q", "v"]))
        inputs = tok([prompts[task].format(**r) for r in rows], padding=True, return_tensors="pt")
        targets = [words_of[task][str(r["label"])] if task == "sst2" else f"{r['label']:.1f}" for r in rows]
        labels = tok(targets, padding=True, return_tensors="pt")["input_ids"]
        _finetune(pm, [{**inputs, "labels": labels.masked_fill(labels == 0, -100)}], 60, 2e-2)
        pm.save_pretrained(root / f"lora-{task}")
    suite = {"name": "tiny-flan-t5-lora", "kind": "seq2seq-lora", "base": {"path": str(base)}, "max_new_tokens": 4,
             "tasks": [{"name": "sst2", "expert": {"path": str(root / "lora-sst2")},
                        "data": {"path": str(root / "sst2.jsonl")}, "prompt": prompts["sst2"],
                        "targets": words_of["sst2"]},
                       {"name": "sst2_scored", "expert": {"path": str(root / "lora-sst2")},
                        "data": {"path": str(root / "sst2.jsonl")}, "prompt": prompts["sst2"],
                        "targets": words_of["sst2"], "decode": "score"},
                       {"name": "stsb", "expert": {"path": str(root / "lora-stsb")},
                        "data": {"path": str(root / "stsb.jsonl")}, "prompt": prompts["stsb"],
                        "metric": "spearman", "target_format": "{:.1f}"}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return {"root": root, "suite": root / "suite.yaml", "sst": sst, "prompt": prompts["sst2"], "base": base}


def test_flan_t5_lora_experts_are_dense_and_scored_like_peft(t5_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    root = t5_files["root"]
    st, tasks = load_hub_suite(str(t5_files["suite"]), "full", tasks=["sst2", "sst2_scored"])
    expert = st.expert(tasks[0])
    merged = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(t5_files["base"]),
                                       root / "lora-sst2").merge_and_unload().state_dict()
    assert set(expert.encoder) == set(st.base)
    for k, v in expert.encoder.items():  # W0 + (alpha / r) B A exactly where PEFT puts it, the base elsewhere
        assert torch.allclose(v, merged[k], atol=1e-6), k
    assert any(not torch.equal(expert.encoder[k], st.base[k]) for k in st.base)

    # oracle: PEFT's model generating and ranking label words itself
    tok = AutoTokenizer.from_pretrained(t5_files["base"])
    peft = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(t5_files["base"]),
                                     root / "lora-sst2").eval()
    sst = t5_files["sst"]
    enc = tok([t5_files["prompt"].format(**r) for r in sst], padding=True, return_tensors="pt")
    words = ["negative", "positive"]
    with torch.no_grad():
        texts = tok.batch_decode(peft.generate(**enc, max_new_tokens=4, do_sample=False), skip_special_tokens=True)
        nll = []
        for w in words:
            lab = tok([w] * len(sst), return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(peft(**enc, labels=lab).logits, -1).gather(-1, lab.unsqueeze(-1))[..., 0]
            nll.append(logp.sum(-1))
    gold = [r["label"] for r in sst]
    generated = np.mean([words.index(t.strip()) == y if t.strip() in words else False for t, y in zip(texts, gold)])
    ranked = np.mean((torch.stack(nll, -1).argmax(-1).numpy() == np.array(gold)))
    scores = st.scores(expert.encoder, [expert, st.expert(tasks[1])])
    assert scores["sst2"]["score"] == pytest.approx(float(generated))
    assert scores["sst2_scored"]["score"] == pytest.approx(float(ranked))
    assert ranked > 0.5  # the adapter learned its label words

    rows = run_report(str(t5_files["suite"]), "full", tmp_path / "t5", methods=["task_arithmetic"])
    got = {(r["method"], r["task"]): r["score"] for r in rows}
    assert set(got) == {(m, t) for m in ("base", "expert", "task_arithmetic")
                        for t in ("sst2", "sst2_scored", "stsb", "average")}
    assert got[("expert", "sst2")] == pytest.approx(float(generated))
    assert got[("expert", "stsb")] > 0.5  # numbers generated, parsed and correlated with the gold scores
    assert all(np.isfinite(v) for v in got.values())


# ==================================================================================================== hub path
def _populate(cache: Path, repo: str, src: Path, commit: str, kind: str = "models", ref: str = "main") -> None:
    """The layout huggingface_hub writes: <kind>--org--name/snapshots/<commit>/..., refs/<ref> -> commit."""
    folder = cache / f"{kind}--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    if src.is_dir():
        shutil.copytree(src, snap)
    else:
        (snap / "data").mkdir(parents=True)
        shutil.copy(src, snap / "data" / "test-00000-of-00001.parquet")
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def no_network(monkeypatch):
    """Refuse (and record) every socket connection."""
    attempts: list[object] = []

    def refuse(self, address, *a, **kw):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_hub_path_offline_from_a_populated_cache(clip_files, env, tmp_path, no_network):
    cache = env / "hf-home" / "hub"
    commits = {name: f"{i + 1:x}" * 40 for i, name in enumerate(("base", "colors", "data"))}
    _populate(cache, "tiny-org/clip-vit-tiny", clip_files["base"], commits["base"])
    _populate(cache, "tiny-org/clip-vit-tiny_colors", clip_files["colors"], commits["colors"])
    _populate(cache, "tiny-org/colors", clip_files["root"] / "colors" / "data" / "test-00000-of-00001.parquet",
              commits["data"], kind="datasets")
    suite = {"name": "tiny-clip-hub", "kind": "clip",
             "base": {"repo": "tiny-org/clip-vit-tiny", "revision": commits["base"]},  # pinned to a commit
             "tasks": [{"name": "colors", "expert": {"repo": "tiny-org/clip-vit-tiny_colors", "revision": "main"},
                        "data": {"repo": "tiny-org/colors", "revision": "main", "files": "data/test-*.parquet"},
                        "templates": ["a photo of a {}."]}]}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(suite))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = run_report(str(path), "full", tmp_path / "out", methods=["task_arithmetic"])
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in ("base", "expert", "task_arithmetic")
                                                       for t in ("colors", "average")}
    unpinned = [w for w in caught if issubclass(w.category, SamergeWarning) and "not a commit" in str(w.message)]
    assert len(unpinned) == 1 and "pinned.yaml" in str(unpinned[0].message)  # one warning per suite
    record = Path(env / "samerge-cache" / "hub" / "tiny-clip-hub")
    resolved = json.loads((record / "resolved.json").read_text())
    assert resolved["base"]["commit"] == commits["base"]
    assert resolved["expert:colors"] == {"repo": "tiny-org/clip-vit-tiny_colors", "revision": "main",
                                         "commit": commits["colors"]}
    assert resolved["data:colors"]["commit"] == commits["data"]
    pinned = load_spec_file(record / "pinned.yaml")
    assert pinned.tasks[0].expert.revision == commits["colors"] and pinned.tasks[0].data.revision == commits["data"]

    # a pinned revision absent from the cache: a clear error, and still no network attempt
    suite["base"]["revision"] = "0" * 40
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(SamergeError, match=r"tiny-org/clip-vit-tiny at revision '0{40}' is not in the local "
                                           r"Hugging Face cache .* HF_HUB_OFFLINE is set"):
        run_report(str(path), "full", tmp_path / "out2", methods=["task_arithmetic"])
    suite["base"]["revision"], suite["tasks"][0]["data"]["revision"] = commits["base"], "v2"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(SamergeError, match="dataset tiny-org/colors at revision 'v2' is not in the local"):
        run_report(str(path), "full", tmp_path / "out3", methods=["task_arithmetic"])
    assert no_network == []


# ==================================================================================================== definitions
def test_builtin_definitions_name_the_published_experts():
    # one file per built-in (hub/builtin/<name>.yaml), each naming itself, listed in a fixed order
    assert HUB_SUITES == ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "roberta-base-glue", "roberta-large-glue",
                          "flan-t5-base-lora-glue")
    assert [builtin_spec(s).name for s in HUB_SUITES] == list(HUB_SUITES)
    b32 = builtin_spec("clip-vit-b32")
    assert b32.base.repo == "openai/clip-vit-base-patch32" and len(b32.tasks) == 8
    assert [t.expert.repo for t in b32.tasks][:2] == ["tanganke/clip-vit-base-patch32_sun397",
                                                      "tanganke/clip-vit-base-patch32_stanford-cars"]
    assert builtin_spec("clip-vit-l14").tasks[-1].expert.repo == "tanganke/clip-vit-large-patch14_dtd"
    mnist = next(t for t in b32.tasks if t.name == "mnist")
    assert (mnist.data.repo, mnist.data.files) == ("ylecun/mnist", ["mnist/test-*.parquet"])
    assert len(mnist.data.revision) == 40  # a verified commit; unverified repos say "main" and get recorded
    gtsrb = next(t for t in b32.tasks if t.name == "gtsrb")
    assert len(gtsrb.classnames) == 43 and len(gtsrb.templates) == 3
    glue = builtin_spec("roberta-base-glue")
    assert {t.name: t.metric for t in glue.tasks} == {
        "cola": "mcc", "sst2": "accuracy", "mrpc": "accuracy_f1", "stsb": "pearson_spearman", "qqp": "accuracy_f1",
        "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    t5 = builtin_spec("flan-t5-base-lora-glue")
    assert t5.tasks[0].expert.repo == "tanganke/flan-t5-base_glue-cola_lora-16"
    assert next(t for t in t5.tasks if t.name == "stsb").target_format == "{:.1f}"
    assert all(src.revision for s in HUB_SUITES for t in builtin_spec(s).tasks
               for src in (t.expert, t.data) if src is not None)
    with pytest.raises(SamergeError, match="task 'cola' names no expert .*write_spec"):
        load_hub_suite("roberta-large-glue", "small")  # before any download
    with pytest.raises(SamergeError, match="--add-task fine-tunes an expert"):
        load_hub_suite("clip-vit-b32", "small", add_tasks={"x": "x.csv"})


def test_suite_files_are_validated_with_clear_messages(tmp_path):
    out = write_spec("roberta-base-glue", tmp_path / "glue.yaml")
    assert load_spec_file(out) == builtin_spec("roberta-base-glue")
    good = yaml.safe_load(out.read_text())

    def check(mutate, pattern):
        data = json.loads(json.dumps(good))
        mutate(data)
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(SamergeError, match=pattern):
            load_spec_file(p)

    check(lambda d: d.update(colour="red"), r"unknown key 'colour'; valid keys: name, kind, base")
    check(lambda d: d["tasks"][1].update(metrc="mcc"),
          r"unknown key 'metrc' at tasks\[1\]; valid keys: name, expert, data, metric")
    check(lambda d: d["tasks"][0]["expert"].update(rev="x"), r"unknown key 'rev' at tasks\[0\]\.expert; valid "
                                                             r"keys: repo, revision, subfolder, path")
    check(lambda d: d["tasks"][0]["expert"].pop("revision"),
          r"tasks\[0\]\.expert: missing revision for repo 'JeremiahZ/roberta-base-cola'")
    check(lambda d: d["base"].pop("revision"), r"base: missing revision for repo 'FacebookAI/roberta-base'")
    check(lambda d: d["tasks"][2].update(metric="auroc"),
          r"tasks\[2\]\.metric: unknown metric 'auroc'; valid metrics: accuracy, balanced_accuracy, f1")
    check(lambda d: d.update(kind="vision"), r"kind: .*'clip', 'seq-cls' or 'seq2seq-lora'.*got 'vision'")
    check(lambda d: d.pop("tasks"), r"missing key 'tasks'")
    check(lambda d: d["tasks"][0].pop("text_fields"), r"task 'cola': give text_fields")

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: clip\nbase: {repo: a/b}\ntasks: []\n")
    assert main(["suite", "report", "--suite", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert main(["suite", "report", "--suite", "no-such-suite", "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_unknown_suite_message_lists_hub_suites(capsys, tmp_path):
    assert main(["suite", "report", "--suite", "clip-vit-b99", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "samerge: error: unknown suite 'clip-vit-b99'" in err and "clip-vit-b32" in err and ".yaml" in err
    assert samerge.available_methods()  # the report's methods are importable alongside
