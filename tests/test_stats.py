"""Intervals and paired tests (taskvec.studies.stats) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from taskvec.studies import stats


def test_wilson_matches_the_formula():
    k, n, z = 7, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)
    lo, hi = stats.wilson(0, 50)
    assert lo == 0 and 0.06 < hi < 0.08  # never a zero-width interval at 0 of 50
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


def test_mcnemar_counts_only_discordant_prompts():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    test = stats.mcnemar(a, b)
    assert (test["a_only"], test["b_only"], test["n"]) == (6, 0, 10)
    assert test["p_value"] == pytest.approx(2 * 0.5**6)  # exact binomial, two-sided: 0.03125
    assert test["difference"] == pytest.approx(0.6)
    assert stats.mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same prompts"):
        stats.mcnemar(a, b[:5])


def predictions(task: str, hyp, reg) -> pd.DataFrame:
    rows = [{"task": task, "condition": c, "prompt": i, "correct": bool(v)}
            for c, values in (("hypothesis", hyp), ("regular", reg)) for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_paired_by_task_pairs_rows_by_prompt_not_by_order():
    frame = predictions("t", [1, 0, 1, 0], [1, 1, 1, 1])
    shuffled = pd.concat([frame[frame.condition == "hypothesis"], frame[frame.condition == "regular"].iloc[::-1]])
    table = stats.paired_by_task(shuffled)
    assert table.loc[0, ["a_only", "b_only"]].tolist() == [0, 2]
    broken = frame[~((frame.condition == "regular") & (frame.prompt == 3))]
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_by_task(broken)


def test_task_intervals_and_the_bootstrap_mean():
    frame = predictions("t", [1, 1, 1, 0], [1, 1, 1, 1])
    table = stats.task_intervals(frame).set_index("condition")
    assert table.loc["hypothesis", ["n", "accuracy"]].tolist() == [4, 0.75]
    assert table.loc["hypothesis", "lo"] < 0.75 < table.loc["hypothesis", "hi"]
    mean, lo, hi = stats.mean_interval([0.2, 0.4, 0.6, 0.8, float("nan")])
    assert mean == pytest.approx(0.5) and 0.2 <= lo < 0.5 < hi <= 0.8
    assert stats.mean_interval([0.3, 0.3]) == (0.3, 0.3, 0.3)
    assert stats.mean_interval([0.1, 0.5, 0.9], seed=1) == stats.mean_interval([0.1, 0.5, 0.9], seed=1)


def test_paired_over_tasks():
    acc = pd.DataFrame({"hypothesis_acc": [0.5, 0.6, 0.7, 0.8, 0.9, 0.4], "regular_acc": [0.6, 0.8, 0.9, 0.9, 1.0, 0.4]})
    result = stats.paired_over_tasks(acc)
    assert result["difference"] == pytest.approx(-0.1166666, abs=1e-6)
    assert result["hi"] < 0 and result["n_tasks"] == 6
    assert result["p_value"] == pytest.approx(0.0625)  # 5 non-zero differences, all negative: 2/2**5


def test_holm_adjusts_step_down_and_keeps_the_order():
    from taskvec.studies.stats import holm

    # Three tests: the smallest p times 3, the next times 2, the largest times 1, made non-decreasing.
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])
    # Planted: one task at p = .02 is significant alone, not among 18 tests.
    assert holm([0.02]).tolist() == [0.02] and holm([0.02] + [0.9] * 17)[0] > 0.05


def test_a_difference_significant_alone_is_not_after_holm():
    from taskvec.studies.stats import paired_by_task

    def rows(task, a_right, b_right):
        return [{"task": task, "condition": c, "prompt": i, "correct": ok}
                for c, oks in (("hypothesis", a_right), ("regular", b_right)) for i, ok in enumerate(oks)]

    # 8 prompts only Regular gets right: McNemar p = 2/256 < .05 on one task; with 17 null tasks beside it,
    # Holm multiplies it by 18 and it no longer counts.
    strong = rows("t0", [False] * 8, [True] * 8)
    null = [r for k in range(1, 18) for r in rows(f"t{k}", [True, False] * 4, [True, False] * 4)]
    alone = paired_by_task(pd.DataFrame(strong)).set_index("task")
    assert alone.loc["t0", "p_value"] < 0.05 and alone.loc["t0", "significant"]
    many = paired_by_task(pd.DataFrame(strong + null)).set_index("task")
    assert many.loc["t0", "p_value"] < 0.05 and not many.loc["t0", "significant"]
    assert many.loc["t0", "p_holm"] == pytest.approx(min(1.0, 18 * many.loc["t0", "p_value"]))


def test_query_reuse_counts_distinct_queries_per_task():
    from taskvec.studies.stats import query_reuse

    frame = pd.DataFrame({"task": ["a"] * 4 + ["b"] * 2, "condition": ["hypothesis"] * 6, "prompt": [0, 1, 2, 3, 0, 1],
                          "query": ["x", "y", "x", "y", "p", "q"]})
    table = query_reuse(frame).set_index("task")
    assert (table.loc["a", "n_prompts"], table.loc["a", "n_queries"]) == (4, 2)
    assert (table.loc["b", "n_prompts"], table.loc["b", "n_queries"]) == (2, 2)


def test_plateau_holds_the_layers_within_the_noise_of_the_peak():
    from taskvec.studies.stats import plateau, spans

    # Six tasks, five layers: layer 3 peaks, layer 2 is a hair below, layer 1 is below with tasks that disagree,
    # layers 0 and 4 are far below on every task.
    rows = [[0.0, 0.5, 0.9, 0.9, 0.1], [0.0, 0.9, 0.8, 0.8, 0.0], [0.1, 0.6, 0.9, 0.9, 0.0],
            [0.0, 0.9, 0.7, 0.8, 0.1], [0.0, 0.4, 0.9, 0.9, 0.0], [0.1, 0.9, 0.8, 0.8, 0.1]]
    found = plateau(pd.DataFrame(rows))
    assert found["peak"] == 3 and found["layers"] == [1, 2, 3]
    # Planted: every task clearly worse at layer 1 than at the peak, and it leaves the plateau.
    worse = pd.DataFrame([[r[0], r[2] - 0.4, r[2], r[3], r[4]] for r in rows])
    assert plateau(worse)["layers"] == [2, 3]
    assert spans([9, 10, 11, 14]) == "9-11, 14" and spans([3]) == "3"


def test_range_verdict_against_the_paper_range():
    from taskvec.studies.verdicts import range_verdict

    assert range_verdict(0.35, 0.45, 0.3, 0.5) == "inside"
    assert range_verdict(0.45, 0.65, 0.3, 0.5) == "overlapping"
    assert range_verdict(0.55, 0.65, 0.3, 0.5) == "later than"
    assert range_verdict(0.1, 0.2, 0.3, 0.5) == "earlier than"


def test_share_interval_resamples_tasks_with_their_pairs():
    acc = pd.DataFrame({"hypothesis_acc": [0.4, 0.8, 0.6, 0.2, 0.9, 0.5], "regular_acc": [0.5, 0.9, 0.8, 0.4, 1.0, 0.6]})
    share, lo, hi = stats.share_interval(acc, seed=0)
    assert share == pytest.approx(acc["hypothesis_acc"].mean() / acc["regular_acc"].mean())
    assert lo < share < hi <= 1.0  # Hypothesis below Regular on every task: no resample exceeds 1
    # Pairs kept together: a task where both are high cannot be split from its Regular.
    same = pd.DataFrame({"hypothesis_acc": [0.2, 0.9], "regular_acc": [0.2, 0.9]})
    assert stats.share_interval(same)[1:] == pytest.approx((1.0, 1.0))
    assert all(math.isnan(v) for v in stats.share_interval(acc.iloc[:0]))
