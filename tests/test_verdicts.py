"""Each verdict the book prints flips when the planted numbers cross its threshold."""

from __future__ import annotations

import pandas as pd
import pytest

from taskvec.studies import verdicts as V


@pytest.mark.parametrize("difference, lo, hi, significant, start", [
    (-0.1, -0.2, -0.05, True, "Both say Hypothesis is below"),
    (0.1, 0.05, 0.2, True, "Both say Hypothesis is above"),
    (-0.01, -0.05, 0.03, False, "Neither separates them: over these tasks there is no detectable difference"),
    (-0.1, -0.2, 0.01, True, "The two disagree: the signed-rank test"),
    (-0.1, -0.2, -0.01, False, "The two disagree: the interval on the mean difference puts Hypothesis below"),
])
def test_paired_verdict_flips_with_the_interval_and_the_test(difference, lo, hi, significant, start):
    assert V.paired_verdict(difference, lo, hi, significant).startswith(start)


def test_depth_verdict_flips_at_both_ends_of_the_paper_range():
    assert V.depth_verdict(0.4, 0.3, 0.5) == "inside"
    assert V.depth_verdict(0.3, 0.3, 0.5) == "inside"  # the range is closed
    assert V.depth_verdict(0.51, 0.3, 0.5) == "later than"
    assert V.depth_verdict(0.29, 0.3, 0.5) == "earlier than"


def test_averaging_verdict_needs_the_interval_to_leave_zero():
    assert V.averaging_verdict(0.01, 0.2).startswith("averaging helps")
    assert V.averaging_verdict(-0.2, -0.01).startswith("averaging hurts")
    assert V.averaging_verdict(-0.05, 0.03).startswith("averaging makes no detectable difference")
    assert V.averaging_verdict(0.0, 0.1).startswith("averaging makes no detectable")  # zero itself is not above zero


def test_within_and_below_the_paper_range():
    theirs = pd.DataFrame({"GPT-J": [0.8, 0.5], "LLaMA": [0.9, 0.6]}, index=["a", "b"])
    ours = pd.Series({"a": 0.94, "b": 0.44, "c": 0.1})  # c: not in the paper
    assert V.within_paper(ours, theirs) == ["a"]  # 0.94 <= 0.9 + 0.05; 0.44 < 0.5 - 0.05
    assert V.below_paper(ours, theirs) == ["b"]
    assert V.within_paper(ours.replace(0.44, 0.46), theirs) == ["a", "b"]
    assert V.below_paper(ours.replace(0.44, 0.46), theirs) == []


def test_follows_splits_pairs_by_the_task_the_model_follows():
    table = pd.DataFrame({"task_a": ["x", "y"], "task_b": ["p", "q"], "acc_a": [0.2, 0.6], "acc_b": [0.7, 0.6]})
    follow_b, stay_a = V.follows(table)
    assert list(follow_b["task_a"]) == ["x"] and list(stay_a["task_a"]) == ["y"]  # a tie stays with A
    flipped = table.assign(acc_b=[0.1, 0.61])
    follow_b, stay_a = V.follows(flipped)
    assert list(follow_b["task_a"]) == ["y"] and list(stay_a["task_a"]) == ["x"]


def test_same_side_as_paper_counts_only_pairs_with_both_numbers():
    assert V.same_side_as_paper([(0.1, 0.9, 0.2, 0.8), (0.9, 0.1, 0.2, 0.8), (0.1, 0.9, None, None)]) == 1
    assert V.same_side_as_paper([(0.1, 0.9, 0.8, 0.2)]) == 0
    assert V.same_side_as_paper([(0.9, 0.1, float("nan"), float("nan"))]) == 0  # a table's missing cell


def test_a_pair_without_regular_doing_a_holds_no_conflict():
    regular = pd.DataFrame({"task_a": ["prev_letter", "list_last"], "task_b": ["next_letter", "list_first"],
                            "acc_a": [0.04, 1.0]})
    assert V.with_conflict(regular) == {("list_last", "list_first")}
    assert V.with_conflict(regular.assign(acc_a=[0.5, 1.0])) == {("prev_letter", "next_letter"), ("list_last", "list_first")}


def test_control_verdict_flips_with_the_test_and_names_no_mechanism():
    assert "more whole answers" in V.control_verdict(0.8, 0.2, 40, 0.001)
    assert "fewer whole answers" in V.control_verdict(0.2, 0.8, 40, 0.001)
    null = V.control_verdict(0.3, 0.25, 40, 0.6)
    assert "no detectable difference" in null and "not a proof" in null
    assert "No query qualifies" in V.control_verdict(float("nan"), float("nan"), 0, 1.0)
    for text in (V.control_verdict(0.8, 0.2, 40, 0.001), null):
        assert "cache" not in text and "because" not in text


def test_paired_accuracy_verdict_flips_with_the_test():
    assert V.paired_accuracy_verdict("the FV", "Baseline", 0.6, 0.1, 50, 1e-6).startswith("The FV gets more answers right")
    assert "gets fewer answers right" in V.paired_accuracy_verdict("FV", "Baseline", 0.1, 0.6, 50, 1e-6)
    assert V.paired_accuracy_verdict("θ added", "Hypothesis", 0.1, 0.6, 50, 1e-6).startswith("θ added gets fewer")
    null = V.paired_accuracy_verdict("FV", "Baseline", 0.14, 0.1, 50, 0.5)
    assert "no detectable difference" in null and "not a proof" in null
    assert "No query" in V.paired_accuracy_verdict("FV", "Baseline", float("nan"), float("nan"), 0, 1.0)


def test_top_head_share_counts_the_tasks_a_head_tops():
    assert V.top_head_share({"a": (9, 3), "b": (9, 3), "c": (5, 0)}) == ((9, 3), 2)
    assert V.top_head_share({"a": (9, 3), "b": (5, 0), "c": (5, 0)}) == ((5, 0), 2)  # flips with the data
    assert V.top_head_share({"a": (9, 3), "b": (5, 0)}) == ((5, 0), 1)  # a tie goes to the earlier layer
    assert V.top_head_share({}) == (None, 0)


def test_grade_layer_flips_at_the_paper_range_and_the_middle():
    assert V.grade_layer(0.4, 0.6, 0.3, 0.5) == "reproduced"  # overlaps
    assert V.grade_layer(0.6, 0.7, 0.3, 0.5) == "partly"  # later, still in the middle
    assert V.grade_layer(0.92, 1.0, 0.3, 0.5) == "not reproduced"  # at the top
    assert V.grade_layer(0.0, 0.05, 0.3, 0.5) == "not reproduced"
    assert V.grade_layer(float("nan"), float("nan"), 0.3, 0.5) == "no evidence"


def test_grade_share_flips_at_the_paper_minimum_and_at_most():
    assert V.grade_share(0.80, 0.95, 0.84, 0.91) == "reproduced"
    assert V.grade_share(0.60, 0.83, 0.84, 0.91) == "partly"
    assert V.grade_share(0.45, 0.83, 0.84, 0.91) == "not reproduced"
    assert V.grade_share(float("nan"), 0.9, 0.84, 0.91) == "no evidence"


def test_grade_clusters_needs_within_below_between_and_a_silhouette():
    assert V.grade_clusters(0.6, 0.1, 0.3) == "reproduced"
    assert V.grade_clusters(0.3, 0.1, 0.3) == "partly"
    assert V.grade_clusters(0.2, 0.1, 0.3) == "not reproduced"
    assert V.grade_clusters(0.6, 0.3, 0.3) == "not reproduced"  # no closer within a task


def test_grade_dominance_and_tokens_count_their_cases():
    assert [V.grade_dominance(n, 3) for n in (3, 1, 0)] == ["reproduced", "partly", "not reproduced"]
    assert V.grade_dominance(0, 0) == "no evidence"
    assert [V.grade_tokens(n, 18) for n in (9, 8, 0)] == ["reproduced", "partly", "not reproduced"]
    assert V.grade_tokens(0, 0) == "no evidence"
