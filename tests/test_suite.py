"""The text suite end to end: real fine-tuned experts on packaged data, every method, the report files."""

from __future__ import annotations

import csv
import functools
import json
import random
import warnings

import pytest
import torch

import samerge
from samerge.cli import main
from samerge.errors import SamergeWarning
from samerge.evaluation.report import parse_method, split_methods
from samerge.evaluation.scoring import code_fingerprint
from samerge.evaluation.tasks import BUILTIN_TEXT_TASKS, load_builtin, load_file_task


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_method_specs_parse_with_parameters():
    assert parse_method("ties[aggregate=mean,scale=1.0]") == ("ties", {"aggregate": "mean", "scale": 1.0})
    assert parse_method("sa_merging") == ("sa_merging", {})
    assert split_methods("ties[aggregate=mean,scale=1.0],sa_merging,sa_merging[preset_x=1]") == [
        "ties[aggregate=mean,scale=1.0]", "sa_merging", "sa_merging[preset_x=1]"]
    with pytest.raises(samerge.SamergeError, match="unknown method 'tie'"):
        parse_method("tie[density=0.2]")
    with pytest.raises(samerge.SamergeError, match="expected key=value"):
        parse_method("ties[density]")


def test_builtin_tasks_load_deterministically_from_packaged_data():
    for name in BUILTIN_TEXT_TASKS:
        a, b = load_builtin(name, "small", 0), load_builtin(name, "small", 0)
        assert a.train == b.train and len(a.labels) >= 2 and len(a.test) > 50
        assert not {x for x, _ in a.train} & {x for x, _ in a.test}  # no leakage between splits
    assert load_builtin("fortune_topic", "small", 1).train != load_builtin("fortune_topic", "small", 0).train
    assert load_builtin("language_id", "small", 0).labels == ["english", "german", "italian", "spanish"]
    assert len(load_builtin("fortune_topic", "small", 0).labels) == 8
    assert len(load_builtin("supersense", "small", 0).labels) == 10


def test_every_suite_is_opened_by_name_through_one_catalogue(suite_cache):
    """The catalogue opens each embedded suite by name with its tasks (all, a subset, or an unknown one refused in
    one line naming the valid ones); every suite, hub suites included, satisfies the Suite protocol and names its
    own default methods (llm-lora adds its rank-wise LoRA merges, the others take samerge's standard list)."""
    from samerge.errors import SamergeError
    from samerge.evaluation.catalog import EMBEDDED, open_suite
    from samerge.evaluation.hub import HubSuite
    from samerge.evaluation.llm import LlmLoraSuite
    from samerge.evaluation.suite import EmbeddedSuite, Suite, base_input, standard_methods

    assert set(EMBEDDED) == {"text", "vision", "llm-lora"}
    for name, cls in EMBEDDED.items():
        assert issubclass(cls, EmbeddedSuite) and cls.name == name and cls.builtin_tasks
        with pytest.raises(SamergeError, match=f"unknown {name} task 'nope'; built-in tasks: {cls.builtin_tasks[0]}"):
            open_suite(name, "small", 0, tasks=["nope"])
    st, data = open_suite("text", "small", 0, tasks=["language_id", "sentiment"])
    assert isinstance(st, Suite) and [t.name for t in data] == ["language_id", "sentiment"]
    assert st.default_methods() == standard_methods("small") and st.merge_methods == ()
    # the report merges MiniLM with its config: its 12 heads of width 32, not the shapes' guess (6 of width 64)
    assert base_input(st).config["num_attention_heads"] == st.config.num_attention_heads == 12
    assert base_input(st).keys() == st.base.keys()
    with pytest.raises(SamergeError, match="the text suite has no method 'lora:ties' of its own"):
        st.merge("lora:ties", {}, [])
    _, every = open_suite("text", "small", 0)
    assert [t.name for t in every] == list(BUILTIN_TEXT_TASKS)
    llm_like = LlmLoraSuite.__new__(LlmLoraSuite)  # its method list needs no model loaded
    llm_like.size = "small"
    assert llm_like.default_methods() == [*standard_methods("small"), "lora:sa_merging", "lora:ties"]
    assert all(hasattr(HubSuite, a) for a in ("default_methods", "merge", "merge_methods", "scores", "expert"))
    with pytest.raises(SamergeError, match="unknown suite 'nope'; available here: text, vision, llm-lora"):
        open_suite("nope", "small", 0)


def _write_csv(path, n=240, seed=0):
    rng = random.Random(seed)
    weather = ["sunny", "rain", "cloudy", "storm", "snow", "breeze", "humid", "forecast"]
    money = ["stocks", "bonds", "market", "prices", "inflation", "shares", "dividend", "trading"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = "weather" if i % 2 else "finance"
            words = rng.sample(weather if i % 2 else money, 3) + rng.sample(["today", "again", "this week",
                                                                             "in town", "for now"], 2)
            w.writerow([f"{words[0]} and {words[1]} {words[3]}, {words[2]} {words[4]} ({i})", label])


def test_bring_your_own_csv_task_runs_through_suite_and_report(suite_cache, tmp_path):
    _write_csv(tmp_path / "mine.csv")
    task = load_file_task("mine", tmp_path / "mine.csv", "small")
    assert task.labels == ["finance", "weather"]
    out = tmp_path / "report"
    code = main(["suite", "report", "--suite", "text", "--size", "small", "--tasks", "sentiment",
                 "--add-task", f"mine={tmp_path / 'mine.csv'}", "--methods",
                 "task_arithmetic,ties[aggregate=mean,scale=1.0]", "--out", str(out), "--quiet"])
    assert code == 0
    rows = read_rows(out / "report.csv")
    assert set(rows[0]) == {"suite", "method", "task", "score", "accuracy", "normalized"}
    methods = {r["method"] for r in rows}
    assert methods == {"base", "expert", "task_arithmetic", "ties[aggregate=mean,scale=1.0]"}
    assert {r["task"] for r in rows} == {"sentiment", "mine", "average"}
    cell = {(r["method"], r["task"]): float(r["score"]) for r in rows}
    assert cell[("expert", "mine")] >= 0.9  # the task is easy: the fine-tuned expert must have learned it
    assert cell[("expert", "mine")] > cell[("base", "mine")]
    assert (out / "report.md").exists() and (out / "per_task.png").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,y\nhello,1\n")
    code = main(["suite", "report", "--tasks", "sentiment", "--add-task", f"x={bad}", "--out", str(out)])
    assert code == 2


def test_small_text_suite_every_default_method(suite_cache, tmp_path):
    """Every default method through the suite and its report, on the two tasks whose experts the other tests
    fine-tune too (that the suite's default tasks are all the built-in ones is checked by the catalogue test)."""
    out = tmp_path / "small"
    code = main(["suite", "report", "--suite", "text", "--size", "small", "--tasks", "sentiment,language_id",
                 "--out", str(out), "--quiet"])
    assert code == 0
    rows = read_rows(out / "report.csv")
    from samerge.evaluation.suite import standard_methods

    assert {r["method"] for r in rows} == {"base", "expert", *standard_methods("small")}
    assert {r["task"] for r in rows} == {"sentiment", "language_id", "average"}
    avg = {r["method"]: float(r["normalized"]) for r in rows if r["task"] == "average"}
    assert avg["base"] < 0.8  # heads alone on the base encoder are far from the experts
    assert max(v for m, v in avg.items() if m not in ("base", "expert")) > avg["base"]
    assert (out / "sa_iterations.png").exists() and "sa_merging" in (out / "report.md").read_text()


def test_vision_tasks_load_from_packaged_data():
    from samerge.evaluation.vision import BUILTIN_VISION_TASKS, load_vision_task

    for name in BUILTIN_VISION_TASKS:
        t = load_vision_task(name, "small", 0)
        assert len(t.labels) == 10 and t.train[0][0].shape == (3, 64, 64) and t.train[0][0].dtype.is_floating_point is False


def test_small_vision_suite_with_a_bring_your_own_image_task(suite_cache, tmp_path):
    """EfficientNet-Lite0 experts; SA-Merging uses the chain graph (convolutions, depthwise, BatchNorm)."""
    from PIL import Image

    rng = random.Random(0)
    rows = ["image,label"]
    (tmp_path / "img").mkdir()
    for i in range(120):  # bright vs dark squares
        label = "bright" if i % 2 else "dark"
        v = rng.randint(170, 255) if i % 2 else rng.randint(0, 80)
        Image.new("RGB", (20, 20), (v, v, v)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label}")
    (tmp_path / "squares.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "vision"
    code = main(["suite", "report", "--suite", "vision", "--size", "small",
                 "--add-task", f"squares={tmp_path / 'squares.csv'}", "--methods",
                 "task_arithmetic,ties,pcb,sa_merging,sa_merging[saliency_sign=own_value]", "--out", str(out),
                 "--quiet"])
    assert code == 0
    rows_out = read_rows(out / "report.csv")
    cell = {(r["method"], r["task"]): float(r["score"]) for r in rows_out}
    assert {r["task"] for r in rows_out} == {"fashion_mnist", "mnist", "digits", "squares", "average"}
    assert cell[("expert", "squares")] >= 0.9 and cell[("expert", "digits")] > cell[("base", "digits")]
    assert ("sa_merging", "average") in cell


def test_several_seeds_on_the_validation_split_paired_and_resumable(suite_cache, tmp_path, monkeypatch):
    """--seeds/--split val/--against: every seed's experts scored on their validation examples, report.csv the mean
    over seeds, paired differences per seed; a second run into the same folder computes nothing again."""
    from samerge.evaluation.report import run_report
    from samerge.evaluation.text import TextSuite

    calls = []
    real_scores = TextSuite.scores

    def counting(self, state, experts):
        calls.append(self.seed)
        return real_scores(self, state, experts)

    monkeypatch.setattr(TextSuite, "scores", counting)
    out = tmp_path / "seeds"
    ref = "ties[aggregate=mean,scale=1.0]"
    code = main(["suite", "report", "--suite", "text", "--size", "small", "--tasks", "sentiment,language_id",
                 "--seeds", "0-1", "--split", "val", "--methods", "task_arithmetic", "--against", ref,
                 "--out", str(out), "--quiet"])
    assert code == 0
    first = len(calls)
    assert first > 0
    seeds = read_rows(out / "seeds.csv")
    assert {r["seed"] for r in seeds} == {"0", "1"} and {r["split"] for r in seeds} == {"val"}
    assert {r["method"] for r in seeds} == {"base", "expert", "task_arithmetic", ref}
    # the expert rows are each expert's balanced accuracy (and accuracy) on its task's validation examples, computed
    # here from its predictions independently (the mean of the classes' recalls)
    st = TextSuite("small", 1)
    task = load_builtin("language_id", "small", 1)
    e = st.expert(task)
    pred, gold = st.predict(e.encoder, e.head, task.val), torch.tensor([y for _, y in task.val])
    recalls = [float((pred[gold == c] == c).float().mean()) for c in gold.unique()]
    cell = {(r["seed"], r["method"], r["task"]): r for r in seeds}
    assert float(cell[("1", "expert", "language_id")]["score"]) == pytest.approx(sum(recalls) / len(recalls), abs=1e-4)
    assert float(cell[("1", "expert", "language_id")]["accuracy"]) == pytest.approx(
        float((pred == gold).float().mean()), abs=1e-4)
    # report.csv: the mean over seeds, with the usual columns
    mean = {(r["method"], r["task"]): float(r["normalized"]) for r in read_rows(out / "report.csv")}
    for m in ("task_arithmetic", ref):
        per = [float(r["normalized"]) for r in seeds if r["method"] == m and r["task"] == "average"]
        assert mean[(m, "average")] == pytest.approx(sum(per) / 2, abs=2e-4)
    paired = {r["method"]: r for r in read_rows(out / "paired.csv")}
    for sd in ("0", "1"):
        want = (next(float(r["normalized"]) for r in seeds if (r["seed"], r["method"], r["task"]) == (sd, "task_arithmetic", "average"))
                - next(float(r["normalized"]) for r in seeds if (r["seed"], r["method"], r["task"]) == (sd, ref, "average")))
        assert float(paired["task_arithmetic"][f"diff_seed{sd}"]) == pytest.approx(want, abs=2e-4)
    assert float(paired[ref]["diff_mean"]) == 0.0 and (out / "paired.png").exists()
    assert "paired difference" in (out / "report.md").read_text()
    # resume: nothing is scored twice; a new method is the only work
    run_report("text", "small", out, methods=["task_arithmetic"], tasks=["sentiment", "language_id"], seeds=[0, 1],
               split="val", against=ref)
    assert len(calls) == first
    both = functools.partial(run_report, "text", "small", out, methods=["task_arithmetic", "weight_average"],
                             tasks=["sentiment", "language_id"], seeds=[0, 1], split="val", against=ref)
    both()
    assert len(calls) == first + 2  # weight_average, once per seed
    # a stored score made by other code (here: another samerge's fingerprint on one line) is computed again, and
    # a warning says how many were set aside
    lines = (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()
    i = next(i for i, line in enumerate(lines) if '\\"weight_average\\"' in line and '\\"seed\\": 1' in line)
    assert json.loads(lines[i])["code"] == code_fingerprint()
    lines[i] = json.dumps({**json.loads(lines[i]), "code": "0" * 16})
    (out / "scores.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(SamergeWarning, match=r"^1 stored score\(s\) in .*scores.jsonl were made by other code"):
        both()
    assert calls[first + 2:] == [1]  # weight_average of seed 1, and nothing else
    with warnings.catch_warnings():  # scored again by this code: the old line no longer counts, no warning
        warnings.simplefilter("error", SamergeWarning)
        both()
    assert calls[first + 2:] == [1]
    assert main(["suite", "report", "--seeds", "0,x", "--out", str(out)]) == 2
