"""Task metrics of the paper's suites, and the normalized score.

Every metric maps ``(predictions, labels)`` to one float; larger is better. Classification metrics take integer
class ids (a prediction of ``-1`` — an unparseable generation — is simply wrong); correlation metrics take real
values. Degenerate inputs follow one stated convention instead of returning NaN: a correlation or MCC whose
denominator is zero (constant predictions or constant labels) is ``0.0`` — a constant predictor carries no
information about the labels — which keeps a report's averages finite. (scikit-learn does the same for MCC; SciPy
returns NaN for a constant input.)

GLUE's usual single numbers (as the merging literature reports them): CoLA ``mcc``; STS-B ``pearson_spearman``
(the mean of Pearson and Spearman); MRPC and QQP ``accuracy_f1`` (the mean of accuracy and binary F1); the others
``accuracy``.

The normalized score (Yadav et al.; Yang et al.) is merged score / expert score per task (:func:`normalized`),
averaged over tasks by the report (:func:`samerge.evaluation.scoring.score_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from samerge.errors import SamergeError

ArrayLike = Sequence[float] | Sequence[int] | np.ndarray


def _pair(preds: ArrayLike, labels: ArrayLike, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds, dtype=dtype).ravel(), np.asarray(labels, dtype=dtype).ravel()
    if p.shape != y.shape:
        raise SamergeError(f"metric: {p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise SamergeError("metric: no examples to score")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches."""
    p, y = _pair(preds, labels, np.int64)
    return float((p == y).mean())


def balanced_accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Mean over the classes present in ``labels`` of each class's recall: a classifier that answers one class
    scores 1 / (number of classes), however imbalanced the examples are."""
    p, y = _pair(preds, labels, np.int64)
    classes = np.unique(y)
    return float(np.mean([(p[y == c] == c).mean() for c in classes]))


def class_scores(preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """What a classification task of the built-in suites reports: balanced accuracy as its ``score`` (the number
    ``normalized`` divides, so a merge that answers one class of an imbalanced split gains nothing from it) and plain
    ``accuracy`` beside it."""
    return {"score": balanced_accuracy(preds, labels), "accuracy": accuracy(preds, labels)}


def f1(preds: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class ``positive`` (0.0 when it is never predicted nor present)."""
    p, y = _pair(preds, labels, np.int64)
    tp = float(((p == positive) & (y == positive)).sum())
    denom = float((p == positive).sum() + (y == positive).sum())
    return 2.0 * tp / denom if denom else 0.0


def mcc(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004); binary MCC when there are two classes."""
    p, y = _pair(preds, labels, np.int64)
    classes = np.union1d(p, y)
    idx_p, idx_y = np.searchsorted(classes, p), np.searchsorted(classes, y)
    k = classes.size
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (idx_y, idx_p), 1.0)
    n = conf.sum()
    correct = np.trace(conf)
    t, q = conf.sum(axis=1), conf.sum(axis=0)  # true and predicted counts per class
    cov = correct * n - float(t @ q)
    denom = np.sqrt((n * n - float(q @ q)) * (n * n - float(t @ t)))
    return float(cov / denom) if denom > 0 else 0.0


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson's r (0.0 when either side is constant)."""
    p, y = _pair(preds, labels, np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt(float(dp @ dp) * float(dy @ dy))
    return float(np.clip(float(dp @ dy) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (0.0 when either side is constant)."""
    p, y = _pair(preds, labels, np.float64)
    return pearson(_average_ranks(p), _average_ranks(y))


def pearson_spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Mean of Pearson's r and Spearman's ρ: GLUE's single STS-B number."""
    return 0.5 * (pearson(preds, labels) + spearman(preds, labels))


def accuracy_f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Mean of accuracy and binary F1: GLUE's single MRPC / QQP number."""
    return 0.5 * (accuracy(preds, labels) + f1(preds, labels))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1": f1,
    "accuracy_f1": accuracy_f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
    "pearson_spearman": pearson_spearman,
}
REGRESSION_METRICS = frozenset({"pearson", "spearman", "pearson_spearman"})


def get_metric(name: str) -> Callable[[ArrayLike, ArrayLike], float]:
    try:
        return METRICS[name]
    except KeyError:
        raise SamergeError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}") from None


def normalized(score: float, expert_score: float) -> float:
    """The normalized score of one task: merged score / expert score; NaN where the expert scores 0 (undefined:
    nothing to keep), which propagates to the average so that a report never hides it."""
    return score / expert_score if expert_score else float("nan")
