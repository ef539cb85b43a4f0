"""Task metrics as GLUE defines them, from true and predicted values (numpy only).

Classification metrics take class ids; ``positive`` is the id of the positive class for F1
(GLUE's MRPC and QQP score F1 of class 1, "equivalent"/"duplicate"). Regression metrics take
real values (STS-B: Pearson and Spearman correlation). Every metric is a number in the task's
natural scale (accuracy 0-1, correlations -1..1); the suite table prints them x100 as the GLUE
papers do. Checked against scikit-learn and scipy in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CLASSIFICATION = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION = ("pearson", "spearman", "mse")
NAMES = {"accuracy": "Acc", "f1": "F1", "macro_f1": "macro F1", "mcc": "MCC",
         "pearson": "Pearson", "spearman": "Spearman", "mse": "MSE"}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """``confusion[true, pred]`` counts."""
    c = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(c, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return c


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def f1_positive(y_true: np.ndarray, y_pred: np.ndarray, positive: int = 1) -> float:
    """F1 of the ``positive`` class (scikit-learn's binary ``f1_score``); 0 when the class is
    neither predicted nor present."""
    t, p = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
    tp = float((t & p).sum())
    denom = float(t.sum() + p.sum())
    return 2 * tp / denom if denom else 0.0


def macro_f1_from_confusion(c: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's
    ``f1_score(average="macro")`` with its default label set)."""
    tp = np.diag(c).astype(np.float64)
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    return float(f1[present].mean())


def matthews(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004, scikit-learn's
    ``matthews_corrcoef``); 0 when it is undefined (a constant prediction or label)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    c = confusion(y_true, y_pred, k)
    t, p = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_tp = correct * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    denom = np.sqrt(cov_pp * cov_tt)
    return float(cov_tp / denom) if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (as scipy's ``pearsonr``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson of the tie-averaged ranks (scipy's ``spearmanr``)."""
    return pearson(rankdata(x), rankdata(y))


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    d = np.asarray(y_true, dtype=np.float64) - np.asarray(y_pred, dtype=np.float64)
    return float((d * d).mean()) if len(d) else float("nan")


_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1_positive, "mcc": matthews,
    "macro_f1": lambda t, p: macro_f1_from_confusion(
        confusion(t, p, int(max(np.max(t, initial=0), np.max(p, initial=0))) + 1)),
    "pearson": pearson, "spearman": spearman, "mse": mse,
}


def compute(names: list[str] | tuple[str, ...], y_true: np.ndarray, y_pred: np.ndarray,
            ) -> dict[str, float]:
    """Each named metric of the predictions."""
    return {n: _FNS[n](y_true, y_pred) for n in names}


def defaults(kind: str) -> tuple[str, ...]:
    """The metrics a task reports when it names none: accuracy and macro F1, or the two
    correlations."""
    return ("accuracy", "macro_f1") if kind == "classification" else ("pearson", "spearman")
