"""Uncertainty of the numbers the book reads: intervals on accuracies, paired tests between conditions.

All from scipy (``binomtest`` for Wilson intervals and the exact McNemar test, ``bootstrap`` for
intervals on means over tasks, ``wilcoxon`` for the paired test over tasks). Inputs are the main
experiment's prediction rows (one per scored prompt: task, condition, prompt, correct).

- Per task and condition: accuracy with a 95% Wilson score interval over its prompts.
- Per task, Hypothesis against Regular: the same test prompts are scored under both, so the test is
  paired: McNemar's exact test on the prompts where exactly one condition is right.
- Over tasks: the mean with a 95% percentile-bootstrap interval that resamples tasks (how much the
  mean depends on which tasks were picked; the prompt-level noise is in the per-task intervals), and
  for Hypothesis against Regular the mean paired difference, its bootstrap interval and the Wilcoxon
  signed-rank test of the per-task differences.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95  # every interval in the book
ALPHA = 0.05  # the tests' significance level
RESAMPLES = 10_000


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes out of ``n`` (NaN, NaN when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def task_intervals(predictions: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per task and condition: n, accuracy, and its Wilson interval (lo, hi)."""
    if predictions.empty:
        return pd.DataFrame(columns=["task", "condition", "n", "accuracy", "lo", "hi"])
    grouped = predictions.groupby(["task", "condition"], sort=False)["correct"].agg(["sum", "count"]).reset_index()
    rows = []
    for task, condition, k, n in grouped.itertuples(index=False):
        lo, hi = wilson(int(k), int(n), level)
        rows.append({"task": task, "condition": condition, "n": int(n), "accuracy": k / n, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of paired outcomes ``a`` and ``b`` (booleans, same prompts).

    Returns n, a_only and b_only (prompts only one condition gets right), the difference of
    accuracies and the two-sided p-value (1.0 when the conditions never disagree).
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same prompts, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = sps.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    difference = float(a.mean() - b.mean()) if a.size else float("nan")
    return {"n": int(a.size), "a_only": a_only, "b_only": b_only, "difference": difference, "p_value": float(p)}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of ``p_values`` for testing them all (family-wise error at most the level):
    the i-th smallest p is multiplied by (m - i), the adjusted values made non-decreasing and capped at 1."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def query_reuse(predictions: pd.DataFrame, condition: str = "hypothesis") -> pd.DataFrame:
    """Per task: the prompts scored under ``condition`` and the distinct queries among them. Where queries
    repeat (letter tasks have 25-26 inputs for 50 prompts), prompts are not independent draws and an interval
    that treats them so (Wilson's) is too narrow."""
    rows = predictions[predictions["condition"] == condition]
    table = rows.groupby("task", sort=False).agg(n_prompts=("prompt", "size"), n_queries=("query", "nunique"))
    return table.reset_index()


def paired_by_task(predictions: pd.DataFrame, a: str = "hypothesis", b: str = "regular") -> pd.DataFrame:
    """Per task: condition ``a`` against ``b`` on the same prompts (:func:`mcnemar`), the p-value adjusted
    for testing every task (:func:`holm`, ``p_holm``), and whether the difference is significant at
    :data:`ALPHA` after that adjustment. Rows are paired by their ``prompt`` index."""
    rows = []
    for task, group in predictions.groupby("task", sort=False):
        left = group[group["condition"] == a].set_index("prompt")["correct"].sort_index()
        right = group[group["condition"] == b].set_index("prompt")["correct"].sort_index()
        if left.empty or right.empty:
            continue
        if not left.index.equals(right.index):
            raise ValueError(f"task {task!r}: {a} and {b} were not scored on the same prompts")
        rows.append({"task": task, **mcnemar(left.to_numpy(), right.to_numpy())})
    table = pd.DataFrame(rows, columns=["task", "n", "a_only", "b_only", "difference", "p_value"])
    table["p_holm"] = holm(table["p_value"]) if len(table) else []
    table["significant"] = table["p_holm"] < ALPHA
    return table


def mean_interval(values, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (NaN dropped) with a percentile-bootstrap interval over them: (mean, lo, hi)."""
    x = np.asarray(pd.Series(values, dtype=float).dropna())
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean()), float(x.mean())
    ci = sps.bootstrap((x,), np.mean, confidence_level=level, n_resamples=RESAMPLES, method="percentile",
                       random_state=np.random.default_rng(seed)).confidence_interval
    return float(x.mean()), float(ci.low), float(ci.high)


def share_interval(accuracy: pd.DataFrame, a: str = "hypothesis_acc", b: str = "regular_acc", level: float = LEVEL,
                   seed: int = 0) -> tuple[float, float, float]:
    """The share mean(a) / mean(b) over tasks (how much of Regular's accuracy Hypothesis keeps) with a
    percentile-bootstrap interval that resamples tasks, each task's pair kept together: (share, lo, hi)."""
    pairs = accuracy[[a, b]].dropna().to_numpy(dtype=float)
    if len(pairs) == 0 or pairs[:, 1].sum() == 0:
        return math.nan, math.nan, math.nan
    share = float(pairs[:, 0].mean() / pairs[:, 1].mean())
    if len(pairs) == 1:
        return share, share, share

    def ratio(x, y, axis=-1):
        return x.mean(axis=axis) / np.where(y.mean(axis=axis) == 0, np.nan, y.mean(axis=axis))

    ci = sps.bootstrap((pairs[:, 0], pairs[:, 1]), ratio, paired=True, vectorized=True, confidence_level=level,
                       n_resamples=RESAMPLES, method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    return share, float(ci.low), float(ci.high)


def paired_over_tasks(accuracy: pd.DataFrame, a: str = "hypothesis_acc", b: str = "regular_acc",
                      seed: int = 0) -> dict:
    """Condition ``a`` against ``b`` over tasks: mean per-task difference, its bootstrap interval, and
    the Wilcoxon signed-rank p-value (tasks with no difference are left out of the ranks)."""
    diff = (accuracy[a] - accuracy[b]).dropna()
    mean, lo, hi = mean_interval(diff, seed=seed)
    nonzero = diff[diff != 0]
    p = float(sps.wilcoxon(nonzero).pvalue) if len(nonzero) >= 1 else 1.0
    return {"n_tasks": int(len(diff)), "difference": mean, "lo": lo, "hi": hi, "p_value": p,
            "significant": p < ALPHA}


CONDITIONS = ("baseline", "hypothesis", "regular")


def with_intervals(accuracy: pd.DataFrame, predictions: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """The main experiment's per-task table with, beside each ``{condition}_acc``, its prompts
    ``{condition}_n`` and its Wilson interval ``{condition}_lo`` and ``{condition}_hi`` (NaN for a
    skipped task): an accuracy of 1.00 from 6 prompts then reads [0.61, 1.00], not as a fact."""
    spans = task_intervals(predictions, level).set_index(["task", "condition"])
    table = accuracy.copy()
    for condition in CONDITIONS:
        where = table.columns.get_loc(f"{condition}_acc") + 1
        for offset, column in enumerate(("n", "lo", "hi")):
            values = [spans[column].get((task, condition), math.nan) for task in table["task"]]
            table.insert(where + offset, f"{condition}_{column}", values)
    return table


def means_with_intervals(accuracy: pd.DataFrame, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per condition: the mean accuracy over tasks (skipped ones left out), its bootstrap interval over tasks
    and the tasks counted."""
    rows = []
    for condition in CONDITIONS:
        mean, lo, hi = mean_interval(accuracy[f"{condition}_acc"], level, seed)
        rows.append({"condition": condition, "mean": mean, "lo": lo, "hi": hi,
                     "n_tasks": int(accuracy[f"{condition}_acc"].notna().sum())})
    return pd.DataFrame(rows)


def shown(value: float, lo: float, hi: float) -> str:
    """``0.62 [0.48, 0.74]``; a dash for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def plateau(per_task: pd.DataFrame, level: float = LEVEL, seed: int = 0) -> dict:
    """The best layer of a mean dev curve and the layers within its noise.

    ``per_task``: one row per task, one column per layer (dev accuracy). The peak is the layer with the best
    mean over tasks (the earliest among ties); the plateau is every layer whose mean is not detectably below
    the peak's: the bootstrap interval over tasks of the paired difference (peak minus layer) reaches zero.
    Returns ``peak``, ``layers`` (the plateau, sorted, the peak among them) and the mean curve ``mean``.
    """
    mean = per_task.mean(axis=0)
    peak = mean.index[int(np.argmax(mean.to_numpy()))]
    layers = [layer for layer in per_task.columns
              if mean_interval(per_task[peak] - per_task[layer], level, seed)[1] <= 0]
    return {"peak": peak, "layers": sorted(layers), "mean": mean}


def spans(values) -> str:
    """Sorted integers as ranges: ``[9, 10, 11, 14]`` -> ``9-11, 14``."""
    values, parts = sorted(int(v) for v in values), []
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in parts)
