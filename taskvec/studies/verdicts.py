"""Verdicts: every sentence of the book that concludes (which side wins, where a number falls against the paper's)
is computed here from the numbers, never assembled by ``if`` in a notebook cell. Each function has a test on
planted inputs where its verdict flips (tests/test_verdicts.py).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd


def paired_verdict(difference: float, lo: float, hi: float, significant: bool) -> str:
    """Hypothesis against Regular over tasks, from the mean per-task difference with its interval (``lo``,
    ``hi``) and the Wilcoxon signed-rank test's ``significant``: both separate them, neither does ("no
    detectable difference", not equivalence), or the two disagree."""
    excludes = hi < 0 or lo > 0
    side = "below" if difference < 0 else "above"
    if excludes and significant:
        return f"Both say Hypothesis is {side} Regular over tasks."
    if not excludes and not significant:
        return ("Neither separates them: over these tasks there is no detectable difference between Hypothesis and "
                "Regular (which is not a proof that they are equal).")
    if significant:
        return (f"The two disagree: the signed-rank test, which ranks the tasks' differences by size and weighs each "
                f"by its rank, puts Hypothesis {side} Regular, while the interval on the mean difference includes zero.")
    return (f"The two disagree: the interval on the mean difference puts Hypothesis {side} Regular, while the "
            "rank test does not separate them at the 5% level.")


def depth_verdict(depth: float, lo: float, hi: float) -> str:
    """Where a relative depth falls against the paper's range [lo, hi]: "inside", "later than" or
    "earlier than"."""
    if lo <= depth <= hi:
        return "inside"
    return "later than" if depth > hi else "earlier than"


def range_verdict(first: float, last: float, lo: float, hi: float) -> str:
    """Where a range of relative depths [first, last] (a plateau) falls against the paper's [lo, hi]: "inside",
    "overlapping", "later than" or "earlier than"."""
    if lo <= first and last <= hi:
        return "inside"
    if last < lo:
        return "earlier than"
    if first > hi:
        return "later than"
    return "overlapping"


def averaging_verdict(gain_lo: float, gain_hi: float) -> str:
    """What averaging θ over prompts does, from the interval of the change in accuracy (many prompts minus
    one): helps (interval above zero), hurts (below zero), or no detectable difference (not equivalence)."""
    if gain_lo > 0:
        return ("averaging helps: the mean over prompts scores higher than the θ of one prompt, beyond the noise between "
                "tasks, so the θ of a single prompt is the task plus something particular to that prompt")
    if gain_hi < 0:
        return ("averaging hurts: the mean over prompts scores lower than the θ of one prompt, so what a prompt adds to "
                "the task helps its own queries")
    return ("averaging makes no detectable difference on these tasks: the interval of the change holds zero, which "
            "does not show that the θ of one prompt is as good as the mean of many, only that these sizes cannot tell "
            "them apart")


def within_paper(ours: pd.Series, theirs: pd.DataFrame, tolerance: float = 0.05) -> list[str]:
    """Tasks whose accuracy here (``ours``: task -> accuracy) lies within the range of the paper's models
    (``theirs``: task x model), widened by ``tolerance`` on each side."""
    return [t for t in ours.index if t in theirs.index
            and theirs.loc[t].min() - tolerance <= ours.loc[t] <= theirs.loc[t].max() + tolerance]


def below_paper(ours: pd.Series, theirs: pd.DataFrame, tolerance: float = 0.05) -> list[str]:
    """Tasks whose accuracy here lies more than ``tolerance`` below every one of the paper's models."""
    return [t for t in ours.index if t in theirs.index and ours.loc[t] < theirs.loc[t].min() - tolerance]


#: Regular must do task A at least this well for a pair to hold a conflict for θ of B to override.
MIN_REGULAR_A = 0.5


def with_conflict(regular: pd.DataFrame, min_acc: float = MIN_REGULAR_A) -> set[tuple[str, str]]:
    """The pairs (task_a, task_b) whose Regular condition does task A (accuracy w.r.t. A at least ``min_acc``):
    only there is a conflict, so only there can following B mean that θ overrode the demonstrations."""
    return {(a, b) for a, b, acc in regular[["task_a", "task_b", "acc_a"]].itertuples(index=False) if acc >= min_acc}


def follows(conflicting: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The conflicting condition's pairs split by which task the model follows: (those whose accuracy with
    respect to B exceeds that with respect to A, the others)."""
    mask = conflicting["acc_b"] > conflicting["acc_a"]
    return conflicting[mask], conflicting[~mask]


def same_side_as_paper(pairs: Sequence[tuple[float, float, float | None, float | None]]) -> int:
    """How many pairs (paper's A, paper's B, this run's A, this run's B) follow the same task here as in the
    paper; pairs this run has no number for (None or NaN) are not counted."""
    return sum(1 for pa, pb, oa, ob in pairs if not (pd.isna(oa) or pd.isna(ob)) and (pb > pa) == (ob > oa))


def control_verdict(every: float, once: float, n: int, p_value: float, alpha: float = 0.05) -> str:
    """The every-position control against θ written once, from McNemar's exact test on the same ``n`` queries:
    which writes more whole answers right, or no detectable difference. It names no mechanism: writing θ at a
    generated position also replaces that token's own state there, so a difference has more than one reading."""
    if n == 0:
        return "No query qualifies for the control (no multi-token answer on a task the model does in context)."
    if p_value < alpha:
        side = "more" if every > once else "fewer"
        return (f"Writing θ at every generated position gets {side} whole answers right than writing it once "
                f"({every:.2f} against {once:.2f} on {n} queries, McNemar p = {p_value:.2g}).")
    return (f"On these {n} queries there is no detectable difference between writing θ once and at every generated "
            f"position ({once:.2f} against {every:.2f}, McNemar p = {p_value:.2g}); that is not a proof that they "
            "are equal.")


def paired_accuracy_verdict(a: str, b: str, acc_a: float, acc_b: float, n: int, p_value: float,
                            alpha: float = 0.05) -> str:
    """Condition ``a`` against condition ``b`` on the same ``n`` queries, from McNemar's exact test: which gets
    more answers right, or no detectable difference (not equivalence). The names are written as they read
    mid-sentence; the first is capitalised where it opens one."""
    if n == 0:
        return f"No query was scored under both {a} and {b}."
    if p_value < alpha:
        side = "more" if acc_a > acc_b else "fewer"
        opening = a[:1].upper() + a[1:] if a[:1].isascii() else a  # "θ added" stays lower case
        return (f"{opening} gets {side} answers right than {b} ({acc_a:.2f} against {acc_b:.2f} on {n} "
                f"queries, McNemar p = {p_value:.2g}).")
    return (f"On these {n} queries there is no detectable difference between {a} and {b} ({acc_a:.2f} against "
            f"{acc_b:.2f}, McNemar p = {p_value:.2g}); that is not a proof that they are equal.")


def top_head_share(top: dict[str, tuple[int, int]]) -> tuple[tuple[int, int] | None, int]:
    """The head that tops the most tasks' indirect effects (``top``: task -> its top (layer, head)) and the
    number of tasks it tops; ties go to the earlier layer, then head. (None, 0) without tasks."""
    if not top:
        return None, 0
    counts: dict[tuple[int, int], int] = {}
    for head in top.values():
        counts[tuple(head)] = counts.get(tuple(head), 0) + 1
    best = min(counts, key=lambda h: (-counts[h], h))
    return best, counts[best]


# --- grades: one word per experiment and model for the book's findings table ----------------------------
# Each takes the numbers its page reports and says whether this model reproduces the paper's claim:
# "reproduced", "partly" or "not reproduced"; "no evidence" where the run holds nothing to judge by.

GRADES = ("reproduced", "partly", "not reproduced", "no evidence")


def grade_layer(first: float, last: float, lo: float, hi: float) -> str:
    """Finding L: the plateau of relative depths [first, last] against the paper's [lo, hi]. Reproduced when
    the plateau meets the paper's range; partly when it lies elsewhere but inside the network's middle
    (strictly between 0.1 and 0.9: θ lives at an intermediate layer, not the paper's); else not reproduced."""
    if any(pd.isna(v) for v in (first, last)):
        return "no evidence"
    if range_verdict(first, last, lo, hi) in ("inside", "overlapping"):
        return "reproduced"
    return "partly" if 0.1 < first and last < 0.9 else "not reproduced"


def grade_share(share_lo: float, share_hi: float, paper_min: float, paper_max: float, most: float = 0.5) -> str:
    """Accuracy: the share of Regular's accuracy that Hypothesis keeps, by its interval [share_lo, share_hi],
    against the paper's range of shares. Reproduced when the interval reaches the paper's lowest share;
    partly when it lies below it but above ``most`` (θ keeps most of ICL, less than the paper's models);
    not reproduced when it reaches down to ``most`` or below."""
    if any(pd.isna(v) for v in (share_lo, share_hi)):
        return "no evidence"
    if share_hi >= paper_min:
        return "reproduced"
    return "partly" if share_lo > most else "not reproduced"


#: Silhouette conventions (Kaufman and Rousseeuw): above 0.5 a reasonable structure, above 0.25 a weak one.
SILHOUETTE_CLEAR, SILHOUETTE_WEAK = 0.5, 0.25


def grade_clusters(silhouette: float, within: float, between: float) -> str:
    """Geometry: θ cluster by task. Reproduced when the tasks' θ are closer within a task than between tasks
    and the silhouette by task shows a reasonable structure; partly when it shows a weak one; else not."""
    if any(pd.isna(v) for v in (silhouette, within, between)):
        return "no evidence"
    if within >= between or silhouette <= SILHOUETTE_WEAK:
        return "not reproduced"
    return "reproduced" if silhouette > SILHOUETTE_CLEAR else "partly"


def grade_dominance(n_follow_b: int, n_conflict: int) -> str:
    """Dominance: of the pairs with a conflict to override (Regular does A), how many follow θ of B. All:
    reproduced; some: partly; none: not reproduced; no such pair: no evidence."""
    if n_conflict == 0:
        return "no evidence"
    if n_follow_b == n_conflict:
        return "reproduced"
    return "partly" if n_follow_b > 0 else "not reproduced"


def grade_tokens(n_naming: int, n_tasks: int) -> str:
    """Interpretation: in how many tasks θ (centered) has a top token that begins an answer no demonstration
    showed. At least half the tasks: reproduced; some: partly; none: not reproduced."""
    if n_tasks == 0:
        return "no evidence"
    if n_naming * 2 >= n_tasks:
        return "reproduced"
    return "partly" if n_naming > 0 else "not reproduced"
