"""The main experiment on a model with a planted, known answer (tests/planted.py).

Every expected number here is worked out in planted.py's docstrings from the model's
construction, not read off a run. On a random model every accuracy is 0 and every dev
curve flat, so these are the tests that fail if the best layer were the latest or the
worst one, chosen on test prompts, if a scorer never said yes, or if a condition ran
on the wrong prompts.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from taskvec import experiment, mechanism
from taskvec.experiment import PromptSet, run_main_experiment, run_task
from taskvec.settings import Protocol
from taskvec.store import Store

from planted import BASELINE_CORRECT, CORRECT, GROUPS, LETTERS, N_LAYERS, T1, T2, group, planted_model, \
    planted_prompts, planted_task, prompt

TASK = "planted_upper"
# Sizes of planted_prompts(); with explicit prompts they only enter the cache key.
SIZES = Protocol(n_dev=4, n_test=4, n_baseline=5)

# Hand-computed from planted.py (dev queries G0 G1 G1 G1, test G0 G1 G1 G2, baseline 2 of 5 in G0).
DEV_CURVE = [0.25, 1.0, 1.0, 0.0]
BEST_LAYER = 1  # the earliest of the tied layers 1 and 2; the latest would be 2, argmin 3
TEST_CURVE = [0.25, 0.75, 1.0, 0.0]  # would give layer 2 if L were chosen on the test prompts
EXPECTED = {"best_layer": 1, "baseline_acc": 0.4, "hypothesis_acc": 0.75, "regular_acc": 1.0}
PREDICTED = {  # test queries c j g k; baseline queries d h f n q
    "hypothesis": ["C", "J", "G", "k"],  # layer 1 carries signal 1 only: the G2 query k stays lowercase
    "regular": ["C", "J", "G", "K"],
    "baseline": ["D", "h", "F", "n", "q"],  # no demonstrations: only G0 letters are upper-cased
}


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def _fmt():
    return SIZES.format


def test_the_planted_model_behaves_as_designed(planted):
    """The model itself, per letter and per layer, before any pipeline code is trusted."""
    fmt = _fmt()
    letters = list(LETTERS)
    # Query alone: G0 letters upper-cased, the rest copied.
    base = mechanism.next_tokens(planted, [fmt.query(c) for c in letters], return_logits=True)
    words = [planted.tokenizer.decode([int(i)]) for i in base.argmax(-1)]
    assert words == [c.upper() if group(c) == 0 else c for c in letters]
    assert base.max(-1).values.tolist() == pytest.approx([1.5 if group(c) == 0 else 1.0 for c in letters], abs=1e-4)
    # With demonstrations (the first five other letters; the next two are dummies): every letter upper-cased.
    others = {c: [d for d in letters if d != c] for c in letters}
    prompts = [prompt("".join(others[c][:5]) + f"|{c}|" + "".join(others[c][5:7])) for c in letters]
    regular = mechanism.next_tokens(planted, [p.regular_text(fmt) for p in prompts])
    assert [planted.tokenizer.decode([int(i)]) for i in regular] == [c.upper() for c in letters]
    # θ patched at each layer: right exactly where CORRECT says.
    theta = mechanism.task_vectors(planted, [p.dummy_texts(fmt) for p in prompts])
    sweep = mechanism.patched_next_tokens(planted, [p.query_text(fmt) for p in prompts], theta, range(N_LAYERS))
    for layer in range(N_LAYERS):
        right = [planted.tokenizer.decode([int(i)]) == c.upper() for i, c in zip(sweep[layer], letters)]
        assert right == [bool(CORRECT[group(c)][layer]) for c in letters], layer


def test_main_experiment_gives_the_planted_numbers(planted):
    result = run_main_experiment(planted, [planted_task()], SIZES, prompts={TASK: planted_prompts()}, progress=False)
    row = result.accuracy.set_index("task").loc[TASK]
    assert {key: row[key] for key in EXPECTED} == EXPECTED
    assert result.dev_curve.query("task == @TASK")["dev_acc"].tolist() == DEV_CURVE
    assert result.dev_curve["layer"].tolist() == list(range(N_LAYERS))
    for condition, words in PREDICTED.items():
        got = result.predictions.query("condition == @condition")["predicted"].tolist()
        assert got == words, condition
    # Test vectors are the test prompts' own θ: signal 1 from layer 1 on, signal 2 from layer 2 on.
    theta = result.task_vectors[TASK]
    assert theta.shape == (4, N_LAYERS, planted.d_model)
    assert theta[:, :, T1].round().tolist() == [[0, 1, 1, 1]] * 4
    assert theta[:, :, T2].round().tolist() == [[0, 0, 1, 1]] * 4


def test_best_layer_is_chosen_on_dev_prompts_not_test(planted):
    """The test prompts' own curve peaks at layer 2; the layer used for them must still be dev's (1)."""
    fmt = _fmt()
    sets = planted_prompts()
    task = planted_task()
    theta = mechanism.task_vectors(planted, [p.dummy_texts(fmt) for p in sets.test])
    sweep = mechanism.patched_next_tokens(planted, [p.query_text(fmt) for p in sets.test], theta, range(N_LAYERS))
    test_curve = [sum(planted.tokenizer.decode([int(i)]) == p.query.output for i, p in zip(sweep[layer], sets.test))
                  / len(sets.test) for layer in range(N_LAYERS)]
    assert test_curve == TEST_CURVE
    result = run_task(planted, task, SIZES, sets)
    assert result.dev_accuracy == DEV_CURVE
    assert result.best_layer == BEST_LAYER
    assert result.hypothesis_acc == TEST_CURVE[BEST_LAYER] == 0.75
    assert (result.regular_acc, result.baseline_acc) == (1.0, 0.4)


def test_sampled_prompts_follow_the_planted_rule(planted):
    """With the protocol's own sampling, every number follows from the groups of the sampled queries."""
    protocol = Protocol(n_dev=10, n_test=10, n_baseline=12)
    task = planted_task()
    sets = PromptSet.sample(task, protocol)
    dev_groups = [group(p.query.input) for p in sets.dev]
    expected_curve = [sum(CORRECT[g][layer] for g in dev_groups) / len(dev_groups) for layer in range(N_LAYERS)]
    best = max(range(N_LAYERS), key=lambda layer: (expected_curve[layer], -layer))  # earliest argmax
    result = run_main_experiment(planted, [task], protocol, progress=False)
    row = result.accuracy.iloc[0]
    assert result.dev_curve["dev_acc"].tolist() == pytest.approx(expected_curve)
    assert row["best_layer"] == best
    assert row["hypothesis_acc"] == pytest.approx(sum(CORRECT[group(p.query.input)][best] for p in sets.test) / 10)
    assert row["baseline_acc"] == pytest.approx(sum(BASELINE_CORRECT[group(p.query.input)] for p in sets.baseline) / 12)
    assert row["regular_acc"] == 1.0
    assert 0.0 < row["baseline_acc"] < row["hypothesis_acc"] <= row["regular_acc"]


def test_cache_round_trip_returns_the_planted_numbers(planted, tmp_path, monkeypatch):
    store = Store(tmp_path)
    first = run_main_experiment(planted, [planted_task()], SIZES, prompts={TASK: planted_prompts()}, progress=False,
                                store=store)
    assert first.meta["cached_tasks"] == []

    def no_compute(*args, **kwargs):
        raise AssertionError("a cached task was computed again")

    monkeypatch.setattr(experiment, "run_task", no_compute)
    second = run_main_experiment(planted, [planted_task()], SIZES, prompts={TASK: planted_prompts()}, progress=False,
                                 store=store)
    assert second.meta["cached_tasks"] == [TASK]
    for result in (first, second):
        row = result.accuracy.iloc[0]
        assert {key: row[key] for key in EXPECTED} == EXPECTED
        assert result.dev_curve["dev_acc"].tolist() == DEV_CURVE
    pd.testing.assert_frame_equal(first.accuracy.drop(columns="seconds"), second.accuracy.drop(columns="seconds"))
    pd.testing.assert_frame_equal(first.dev_curve, second.dev_curve)
    pd.testing.assert_frame_equal(first.predictions, second.predictions, check_dtype=False)
    torch.testing.assert_close(first.task_vectors[TASK], second.task_vectors[TASK], rtol=0, atol=0)
    # Different prompts are a different key: computed, not served from the cache.
    other = planted_prompts()
    other.dev = other.dev[:1]  # dev is the single G0 query b: a flat [1, 1, 1, 0] curve, best layer 0
    monkeypatch.setattr(experiment, "run_task", run_task)
    third = run_main_experiment(planted, [planted_task()], SIZES, prompts={TASK: other}, progress=False, store=store)
    assert third.meta["cached_tasks"] == [] and third.accuracy["best_layer"].tolist() == [0]
    assert third.accuracy["hypothesis_acc"].tolist() == [0.25]  # layer 0 on test: only the G0 query c


def test_groups_partition_the_task():
    assert sorted("".join(GROUPS)) == sorted(LETTERS) and len(set(LETTERS)) == 12
    assert not set(LETTERS) & set("example")


def test_the_books_intervals_and_paired_test_read_the_planted_predictions(planted):
    """sections.intervals / hypothesis_vs_regular on the planted run: hypothesis 3 of 4, regular 4 of 4,
    baseline 2 of 5; the one prompt they disagree on is the G2 query (k), Regular right, Hypothesis wrong."""
    from taskvec.publishing import sections
    from taskvec.studies import stats

    result = run_main_experiment(planted, [planted_task()], SIZES, prompts={TASK: planted_prompts()}, progress=False)
    spans = sections.intervals({"planted": result}).set_index("condition")
    assert spans.loc["hypothesis", ["n", "accuracy"]].tolist() == [4, 0.75]
    assert (spans.loc["hypothesis", "lo"], spans.loc["hypothesis", "hi"]) == pytest.approx(stats.wilson(3, 4))
    assert spans.loc["baseline", ["n", "accuracy"]].tolist() == [5, 0.4]
    paired = sections.hypothesis_vs_regular({"planted": result})["by_task"].iloc[0]
    assert (paired["a_only"], paired["b_only"], paired["p_value"]) == (0, 1, 1.0)
    assert paired["difference"] == pytest.approx(-0.25)
