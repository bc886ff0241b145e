"""Scoring: knowledge answers by their first token in context, the original lenient rule beside it,
saturated tasks, and predictions that round-trip any string through the cache."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from taskvec.errors import SettingError
from taskvec.experiment import TaskResult, run_main_experiment
from taskvec.scoring import Scorer, is_saturated
from taskvec.settings import Protocol
from taskvec.store import read_records, write_records
from taskvec.models import embedded_path
from taskvec.prompts import PromptFormat
from taskvec.store import Store
from taskvec.tasks import Example, Task, load_tasks


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path("gemma-3-270m")[0])


CONTINENT = Task("continent", "knowledge", "d", "prefix",
                 tuple(Example(x, (y,)) for x, y in [("France", "Europe"), ("Peru", "South America"),
                                                       ("Cairo", "Africa"), ("Laos", "Asia")] * 3))


def test_first_token_rule_rejects_one_letter_that_the_lenient_rule_accepts(gemma_tokenizer):
    tok = gemma_tokenizer
    peru, cairo = CONTINENT.examples[1], CONTINENT.examples[2]
    score = Scorer(CONTINENT, tok, PromptFormat(), "first_token")
    south = tok("example:Peru->South America").input_ids[len(tok("example:Peru->").input_ids)]
    assert score.first_tokens(peru) == {south} and tok.decode([south]) == "South"
    one_letter = [tok.convert_tokens_to_ids(t) for t in ("S", "▁S", "A", "▁A")]
    texts = [tok.decode([i]) for i in one_letter]
    examples = [peru, peru, cairo, cairo]
    # The original rule counts "S" for South America and "A" for Africa; the first-token rule does not.
    assert score.lenient(one_letter, examples) == [True, True, True, True]
    assert score(one_letter, examples) == [False, False, False, False]
    assert score([south], [peru]) == [True]
    lenient = Scorer(CONTINENT, tok, PromptFormat(), "lenient")
    assert lenient(one_letter, examples) == [True] * 4


def test_exact_tasks_score_the_same_under_both_rules(gemma_tokenizer):
    task = Task("t", "linguistic", "d", "exact", tuple(Example(x, (y,)) for x, y in [("go", "went"), ("see", "saw")] * 5))
    tok = gemma_tokenizer
    ids = [tok.convert_tokens_to_ids("went"), tok.convert_tokens_to_ids("saw")]
    texts = [tok.decode([i]) for i in ids]
    for rule in ("first_token", "lenient"):
        assert Scorer(task, tok, PromptFormat(), rule)(ids, [task.examples[0], task.examples[0]]) == [True, False]


def test_unknown_prefix_rule_is_rejected_before_compute():
    with pytest.raises(SettingError, match="prefix_rule"):
        Protocol(prefix_rule="loose")


def test_saturated_means_the_query_alone_already_does_the_task():
    assert is_saturated(0.96, 1.0)  # list_first on Gemma
    assert not is_saturated(0.0, 0.06)  # the model cannot do it at all: not saturated
    assert not is_saturated(0.24, 0.66)  # antonyms: ICL adds a lot
    assert not is_saturated(0.55, 0.80)
    assert not is_saturated(math.nan, 1.0)


def test_predictions_round_trip_any_string(tmp_path):
    """Gemma has a '\\r' token: a CSV split that row in two on reload."""
    import torch

    odd = ["\r", "a,b", '"q"', "\n", " x\r\ny ", "\u2028", "é"]
    preds = pd.DataFrame({"task": "t", "condition": "regular", "query": odd, "expected": odd, "predicted": odd,
                          "token_id": list(range(len(odd))), "correct": [True, False] * 3 + [True]})
    result = TaskResult("t", 3, [0.1, 0.5], 0.5, 0.4, 0.1, preds, torch.zeros(1, 2, 4), 1.0)
    result.save(tmp_path)
    back = TaskResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.predictions, preds)
    write_records(tmp_path / "p.jsonl", preds)
    assert len(read_records(tmp_path / "p.jsonl")) == len(odd)


def test_every_prediction_carries_both_rules(tiny_gpt2):
    result = run_main_experiment(tiny_gpt2, load_tasks(["next_letter"]), Protocol(n_dev=3, n_test=3, n_baseline=3,
                                                                                   single_token=False), progress=False)
    preds = result.predictions
    assert {"correct", "correct_first_token", "correct_lenient"} <= set(preds.columns)
    assert "saturated" in result.accuracy and "saturated" in result.dev_curve


def test_a_skipped_task_is_cached_so_a_warm_rerun_loads_no_model(tiny_gpt2, tmp_path, monkeypatch):
    store = Store(tmp_path)
    tasks = load_tasks(["en_fr", "next_letter"])  # the character tokenizer leaves en_fr too small
    protocol = Protocol(n_dev=3, n_test=3, n_baseline=3)
    with pytest.warns(UserWarning, match="skipping task 'en_fr'"):
        first = run_main_experiment(tiny_gpt2, tasks, protocol, progress=False, store=store)

    def nothing_to_filter(*args, **kwargs):
        raise AssertionError("a task was filtered again although every task is cached")

    monkeypatch.setattr("taskvec.settings.single_token_examples", nothing_to_filter)
    again = run_main_experiment(tiny_gpt2, tasks, protocol, progress=False, store=store)
    assert sorted(again.meta["cached_tasks"]) == ["en_fr", "next_letter"]
    pd.testing.assert_frame_equal(first.accuracy.drop(columns="seconds"), again.accuracy.drop(columns="seconds"))


def test_saturated_tasks_are_read_at_the_common_layer_outside_the_main_experiment():
    from taskvec.experiment import MainResult
    from taskvec.publishing.sections import analysis_layers

    acc = pd.DataFrame({"task": ["list_first", "a", "b", "c", "skipped"],
                        "best_layer": [2, 9, 11, 10, -1],
                        "saturated": [True, False, False, False, False]})
    result = MainResult(acc, pd.DataFrame(), pd.DataFrame(), {}, "m", 18, Protocol())
    layers, common = analysis_layers(result)
    assert common == 10  # median of 9, 11, 10: the saturated task's 2 does not pull it down
    assert layers == {"list_first": 10, "a": 9, "b": 11, "c": 10, "skipped": -1}
