"""Issue 17, step 0: every built-in task's splits are balanced where the corpus allows (classes counted), and the
balanced metric (balanced accuracy) checked on hand cases and against its definition."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from samerge.evaluation.metrics import accuracy, balanced_accuracy
from samerge.evaluation.tasks import BUILTIN_TEXT_TASKS, SIZES, load_builtin, stratified_split


def _counts(split) -> Counter:
    return Counter(y for _, y in split)


def _balanced_where_allowed(task, corpus: Counter) -> None:
    """test, then val, then train: each split's classes differ by at most one, except a class the corpus has run out
    of (all its examples already in this or an earlier split)."""
    used: Counter = Counter()
    for split in (task.test, task.val, task.train):
        c = _counts(split)
        used += c
        top = max(c.values())
        for k in range(len(task.labels)):
            if c.get(k, 0) < top - 1:
                assert used[k] == corpus[k], (task.name, k, dict(c), dict(corpus))


@pytest.mark.parametrize("name", BUILTIN_TEXT_TASKS)
@pytest.mark.parametrize("size", list(SIZES))
def test_text_tasks_are_balanced_where_the_corpus_allows(name, size):
    task = load_builtin(name, size, 0)
    full = load_builtin(name, size, 0)  # the same split twice: deterministic
    assert (task.train, task.val, task.test) == (full.train, full.val, full.test)
    n_train, n_val, n_test = SIZES[size]
    assert (len(task.test), len(task.val)) == (n_test, n_val)  # the sizes keep their totals
    assert len(task.train) == n_train
    # the corpus' class counts: every example it has, as the split saw them (sizes large enough to hold all)
    corpus = Counter(y for s in (task.train, task.val, task.test) for _, y in s)
    if name == "subjectivity":  # ~1.1k objective against 12.8k subjective: test and val exactly balanced
        assert len(set(_counts(task.test).values())) == 1 and len(set(_counts(task.val).values())) == 1
    _balanced_where_allowed(task, corpus if name != "subjectivity" else _corpus_counts(name, size))


def _corpus_counts(name: str, size: str) -> Counter:
    """Class counts of the whole corpus (a split of a huge size takes everything)."""
    import samerge.evaluation.tasks as tasks

    old = dict(tasks.SIZES)
    tasks.SIZES[size] = (10**9, 0, 0)
    try:
        t = load_builtin(name, size, 0)
    finally:
        tasks.SIZES.clear()
        tasks.SIZES.update(old)
    return Counter(y for _, y in t.train + t.val + t.test)


def test_stratified_split_balances_an_imbalanced_corpus_and_keeps_prefixes_balanced():
    labels = [0] * 900 + [1] * 60 + [2] * 40
    train, val, test = stratified_split(labels, (300, 60, 90), random.Random(1))
    assert len({*train, *val, *test}) == len(train) + len(val) + len(test)  # disjoint
    assert Counter(labels[i] for i in test) == {0: 30, 1: 30, 2: 30}
    assert Counter(labels[i] for i in val) == {0: 25, 1: 25, 2: 10}  # class 2 ran out (40 = 30 + 10)
    assert Counter(labels[i] for i in train) == {0: 295, 1: 5}  # class 1 ran out too; the total is kept
    assert Counter(labels[i] for i in test[:30]) == {0: 10, 1: 10, 2: 10}  # a prefix is balanced


def test_balanced_accuracy_hand_cases():
    y = [0] * 9 + [1]
    assert accuracy([0] * 10, y) == 0.9
    assert balanced_accuracy([0] * 10, y) == 0.5  # one class answered: 1 / classes
    assert balanced_accuracy(y, y) == 1.0
    assert balanced_accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx((1 + 1 + 0.5) / 3)
    # on balanced labels it is the accuracy
    rng = random.Random(0)
    yb = [k for k in range(4) for _ in range(25)]
    p = [rng.randrange(4) for _ in yb]
    assert balanced_accuracy(p, yb) == pytest.approx(accuracy(p, yb))


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "digits"])
def test_vision_tasks_are_balanced(name):
    from samerge.evaluation.vision import load_vision_task

    task = load_vision_task(name, "small", 0)
    for split in (task.test, task.val, task.train):
        c = _counts(split)
        assert len(c) == len(task.labels) and max(c.values()) - min(c.values()) <= 1, (name, dict(c))


def test_llm_tasks_keep_the_balance_in_their_shorter_splits():
    """llm-lora takes prefixes of the text tasks' splits (LIMITS): the round-robin order keeps them balanced."""
    from samerge.evaluation.llm import load_llm_task

    task = load_llm_task("subjectivity", "full", 0)
    assert _counts(task.test) == {0: len(task.test) // 2, 1: len(task.test) // 2}
    assert _counts(task.val) == {0: len(task.val) // 2, 1: len(task.val) // 2}
