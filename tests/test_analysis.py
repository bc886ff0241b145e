"""taskvec.studies.analysis against hand-computed values: common layer, distances, clusters, t-SNE, vocabulary read-out.

The vocabulary tests use the planted model (tests/planted.py), whose unembedding is
known: read through the final norm, a residual vector ``h`` gives lowercase ``c`` the
logit ``Q_c`` and uppercase ``C`` the logit ``Q_c + 0.5 GT`` (G0), ``Q_c + T1 - 0.5 GT``
(G1) or ``Q_c + T2 - 0.5 GT`` (G2); ``?`` gets 0.25 from the final norm's bias; every other token 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_limits

from taskvec import mechanism
from taskvec.studies.analysis import (answer_tokens, cluster_quality, common_layer, cosine_distances, project_to_vocab,
                                      shared_tokens, task_vector_tokens, tsne_embedding)
from taskvec.errors import SettingError
from taskvec.prompts import PromptFormat
from taskvec.tasks import Example, Task

from planted import D_MODEL, GROUPS, GT, LETTERS, N_LAYERS, Q, T1, T2, planted_model, prompt


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def _vectors(rows_by_layer: list[list[list[float]]]) -> torch.Tensor:
    """(n, n_layers, d) from a list over layers of (n, d) rows."""
    return torch.tensor(rows_by_layer, dtype=torch.float32).transpose(0, 1)


# --- common layer ----------------------------------------------------------------------

def test_common_layer_is_the_median_of_best_layers_without_skipped_tasks():
    assert common_layer(pd.Series({"a": 3, "b": -1, "c": 5, "d": 10})) == 5  # median of 3, 5, 10
    assert common_layer(pd.Series({"a": 2, "b": 4, "c": -1})) == 3  # median of 2, 4
    assert common_layer(pd.Series({"a": 7, "b": -1, "c": -1})) == 7
    assert common_layer(pd.Series([0, 0, 9])) == 0  # layer 0 is a layer, not a skip


def test_common_layer_with_every_task_skipped_is_an_error():
    with pytest.raises(SettingError, match="no task has a best layer"):
        common_layer(pd.Series({"a": -1, "b": -1}))
    with pytest.raises(SettingError):
        common_layer(pd.Series([], dtype=int))


# --- geometry ----------------------------------------------------------------------------

def test_cosine_distances_by_hand():
    vectors = {
        # layer 0: A = (1, 0), (3, 3); B = (0, 2).   layer 1: A = (1, 0), (2, 0); B = (-1, 0).
        "A": _vectors([[[1, 0], [3, 3]], [[1, 0], [2, 0]]]),
        "B": _vectors([[[0, 2]], [[-1, 0]]]),
    }
    at0 = cosine_distances(vectors, 0)
    assert list(at0.columns) == ["task_a", "task_b", "pair", "distance"]
    assert at0[["task_a", "task_b", "pair"]].values.tolist() == [
        ["A", "A", "within"], ["A", "B", "between"], ["A", "B", "between"]]
    # 45 degrees apart: 1 - cos 45; 90 degrees: 1; (3, 3) to (0, 2): 45 degrees again.
    assert at0["distance"].tolist() == pytest.approx([1 - math.sqrt(0.5), 1.0, 1 - math.sqrt(0.5)], abs=1e-6)
    at1 = cosine_distances(vectors, 1)
    # Same direction (lengths differ): 0; opposite: 2.
    assert at1["distance"].tolist() == pytest.approx([0.0, 2.0, 2.0], abs=1e-6)
    summary = at1.groupby("pair")["distance"].mean()
    assert summary["within"] == pytest.approx(0.0, abs=1e-6) and summary["between"] == pytest.approx(2.0)


def _at_angles(degrees: list[float], radii: list[float]) -> torch.Tensor:
    rows = [[r * math.cos(math.radians(d)), r * math.sin(math.radians(d))] for d, r in zip(degrees, radii)]
    return _vectors([rows])


def test_cluster_quality_is_the_cosine_silhouette():
    # A at 0 and 30 degrees, B at 90 and 120 (lengths vary: only angles count under the cosine metric).
    vectors = {"A": _at_angles([0, 30], [1, 3]), "B": _at_angles([90, 120], [2, 0.5])}
    within = 1 - math.cos(math.radians(30))  # a(i): distance to the one other member, for every point
    # b(i): mean distance to the other cluster; the outer points (0, 120) see 90 and 120 degrees, the inner 60 and 90.
    outer = (1 - math.cos(math.radians(90)) + 1 - math.cos(math.radians(120))) / 2  # 1.25
    inner = (1 - math.cos(math.radians(60)) + 1 - math.cos(math.radians(90))) / 2  # 0.75
    expected = ((outer - within) / outer + (inner - within) / inner) / 2  # about 0.857
    assert cluster_quality(vectors, 0) == pytest.approx(expected, abs=1e-6)
    # Identical directions within each task, orthogonal between: a = 0, b = 1, silhouette 1.
    tight = {"A": _at_angles([0, 0], [1, 2]), "B": _at_angles([90, 90], [3, 1])}
    assert cluster_quality(tight, 0) == pytest.approx(1.0)


def test_cluster_quality_needs_two_tasks():
    with pytest.raises(SettingError, match="at least two tasks"):
        cluster_quality({"A": _at_angles([0, 30, 60], [1, 1, 1])}, 0)


def test_tsne_embedding_keeps_separated_tasks_apart_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    d = 8
    centre = {"A": torch.eye(d)[0], "B": torch.eye(d)[1]}
    vectors = {task: (c + 0.05 * torch.randn(10, d, generator=gen))[:, None, :].repeat(1, 2, 1)
               for task, c in centre.items()}
    # One OpenMP thread: on a shared, busy machine t-SNE's threads can spin for many seconds.
    with threadpool_limits(limits=1, user_api="openmp"):
        frame = tsne_embedding(vectors, layer=1, seed=3)
        again = tsne_embedding(vectors, layer=1, seed=3)
    assert list(frame.columns) == ["task", "x", "y"] and frame.shape == (20, 3)
    assert frame["task"].tolist() == ["A"] * 10 + ["B"] * 10
    pd.testing.assert_frame_equal(frame, again)
    xy = frame[["x", "y"]].to_numpy()
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    labels = frame["task"].to_numpy()
    assert (labels[dist.argmin(axis=1)] == labels).all()  # every point's nearest neighbour is of its own task
    same = labels[:, None] == labels[None]
    np.fill_diagonal(dist, 0)
    assert dist[~same].min() > dist[same].max()  # the two clusters do not overlap in the plane


# --- interpretation: the vocabulary -----------------------------------------------------

def _residual(**features: float) -> torch.Tensor:
    dims = {"GT": GT, "T1": T1, "T2": T2, **{f"Q_{c}": Q[c] for c in LETTERS}}
    v = torch.zeros(D_MODEL)
    for name, value in features.items():
        v[dims[name]] = value
    return v


# GT + 3 Q_b + 2 Q_g + Q_k: B (G0) 3 + 0.5, b 3, g 2, G (G1, no T1) 2 - 0.5, k 1; next come 0.5 (C, D, F, K).
KNOWN = _residual(GT=1, Q_b=3, Q_g=2, Q_k=1)
KNOWN_TOP = (["B", "b", "g", "G", "k"], [3.5, 3.0, 2.0, 1.5, 1.0])


def test_project_to_vocab_reads_through_the_final_norm_and_unembedding(planted):
    table = project_to_vocab(planted, KNOWN, k=5)
    assert list(table.columns) == ["rank", "token", "logit"]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert table["token"].tolist() == KNOWN_TOP[0]
    assert table["logit"].tolist() == pytest.approx(KNOWN_TOP[1], abs=1e-4)


def test_task_vector_tokens_uses_each_tasks_mean_at_its_layer(planted):
    other = torch.randn(2, N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(1))
    up = other.clone()
    push = _residual(Q_q=5)  # each row alone would rank q first; their mean is KNOWN
    up[:, 1] = torch.stack([KNOWN + push, KNOWN - push])
    vectors = {"up": up, "skipped": other, "empty": torch.zeros(0, N_LAYERS, D_MODEL)}
    table = task_vector_tokens(planted, vectors, {"up": 1, "skipped": -1, "empty": 2}, k=5)
    assert list(table.columns) == ["task", "layer", "view", "rank", "token", "logit"]
    mean = table[table["view"] == "mean"]
    assert mean["task"].tolist() == ["up"] * 5 and mean["layer"].tolist() == [1] * 5
    assert mean["token"].tolist() == KNOWN_TOP[0]
    assert mean["logit"].tolist() == pytest.approx(KNOWN_TOP[1], abs=1e-4)
    assert (table["view"] == "centered").sum() == 5
    none = task_vector_tokens(planted, {"skipped": other}, {"skipped": -1})
    assert none.empty and list(none.columns) == ["task", "layer", "view", "rank", "token", "logit"]


def test_centered_view_removes_what_all_tasks_share(planted):
    """Two tasks whose θ is a large shared part (q) plus a small own part (b, or k): the mean view ranks the
    shared q first for both; the centered view (minus the mean over tasks at the same layer) ranks each one's
    own letter first, and the shared token is no longer there."""
    shared = _residual(Q_q=10)
    one = torch.zeros(3, N_LAYERS, D_MODEL)
    two = torch.zeros(3, N_LAYERS, D_MODEL)
    one[:, 2] = shared + _residual(Q_b=2)
    two[:, 2] = shared + _residual(Q_k=2)
    table = task_vector_tokens(planted, {"one": one, "two": two}, {"one": 2, "two": 2}, k=2)
    top = table.groupby(["view", "task"])["token"].apply(set)
    assert top["mean", "one"] == top["mean", "two"] == {"q", "Q"}
    assert top["centered", "one"] == {"b", "B"} and top["centered", "two"] == {"k", "K"}
    common = shared_tokens(table)
    assert set(common.loc[common["view"] == "mean", "token"]) == {"q", "Q"}
    assert common[common["view"] == "centered"].empty


def test_shared_tokens_need_half_the_tasks_and_at_least_two():
    tokens = pd.DataFrame({"view": "mean", "task": ["a", "a", "b", "c", "d"], "token": ["x", "y", "x", "y", "z"]})
    assert shared_tokens(tokens).set_index("token")["n_tasks"].to_dict() == {"x": 2, "y": 2}  # 2 of 4 tasks
    assert shared_tokens(tokens, min_share=0.75).empty  # 3 of 4 needed: none
    one = pd.DataFrame({"view": "mean", "task": ["a", "a"], "token": ["x", "y"]})
    assert shared_tokens(one).empty  # one task shares nothing


def test_the_planted_task_vector_names_the_task(planted):
    """θ after layer 2 holds both task signals and no query: its top tokens are the 12 uppercase letters (0.5 each).

    Then comes ``?`` at 0.25: the final norm's bias, there only if the read-out goes through the final norm.
    """
    fmt = PromptFormat()
    prompts = [prompt("bcdfg|h|ij"), prompt("knoqb|c|dg")]
    theta = mechanism.task_vectors(planted, [p.dummy_texts(fmt) for p in prompts])
    table = task_vector_tokens(planted, {"planted_upper": theta}, {"planted_upper": 2}, k=14)
    table = table[table["view"] == "mean"].reset_index(drop=True)
    assert set(table["token"][:12]) == set(LETTERS.upper()) and table["token"][12] == "?"
    assert table["logit"].tolist() == pytest.approx([0.5] * 12 + [0.25, 0.0], abs=1e-4)
    # After layer 1 only signal 1 is there: G0 and G1 uppercase (0.5), G2 uppercase drop to -0.5.
    table = task_vector_tokens(planted, {"planted_upper": theta}, {"planted_upper": 1}, k=8)
    table = table[table["view"] == "mean"]
    assert set(table["token"]) == set((GROUPS[0] + GROUPS[1]).upper())


def test_answer_tokens_counts_tokens_that_start_an_answer():
    capital = Task("capital", "knowledge", "d", "prefix", (Example("France", ("Paris",)), Example("Peru", ("Lima",)),
                                                           Example("Japan", ("Tokyo",))))
    upper = Task("upper", "algorithmic", "d", "exact", (Example("a", ("A",)), Example("b", ("B", "Bee"))))
    tokens = pd.DataFrame({
        "task": ["upper"] * 3 + ["capital"] * 6,
        "token": ["A", "Be", "x", " Paris", "P", "Li", "London", "Lim", " Tok"],
    })
    tasks = {"capital": capital, "upper": upper}
    table = answer_tokens(tokens, tasks).set_index("task")
    assert list(table.index) == ["upper", "capital"]  # the order of the token table
    # min_chars 2: "A" and "P" are too short; "Be" starts the alternative "Bee"; " Paris", "Li", "Lim", " Tok" count.
    assert table.loc["upper", ["n_top", "n_answer_tokens"]].tolist() == [3, 1]
    assert table.loc["upper", "answer_tokens"] == "'Be'"
    assert table.loc["capital", ["n_top", "n_answer_tokens"]].tolist() == [6, 4]
    assert table.loc["capital", "answer_tokens"] == "' Paris' 'Li' 'Lim' ' Tok'"
    loose = answer_tokens(tokens, tasks, min_chars=1).set_index("task")["n_answer_tokens"]
    assert loose.to_dict() == {"upper": 2, "capital": 5}
    # Answers the prompts showed as demonstrations are not evidence: Paris and Lima shown, Tokyo never.
    seen = answer_tokens(tokens, tasks, shown={"capital": ["Paris", "Lima"]}).set_index("task")
    assert seen.loc["capital", ["n_answer_tokens", "n_unshown"]].tolist() == [4, 1]
    assert seen.loc["capital", "unshown_tokens"] == "' Tok'"
    assert seen.loc["upper", "n_unshown"] == 1  # nothing shown for upper: every hit counts
    by_view = answer_tokens(tokens.assign(view="mean"), tasks)
    assert list(by_view.columns[:2]) == ["view", "task"] and set(by_view["view"]) == {"mean"}
