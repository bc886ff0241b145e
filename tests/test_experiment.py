"""The main experiment as one call: tidy output, explicit prompt sets, determinism (tiny model)."""

from __future__ import annotations

import pandas as pd
import pytest

from taskvec.experiment import PromptSet, run_main_experiment
from taskvec.settings import Protocol
from taskvec.prompts import read_jsonl, write_jsonl
from taskvec.tasks import load_tasks

TINY = Protocol(n_dev=6, n_test=5, n_baseline=7, single_token=False)


def test_tidy_tables(tiny_gpt2):
    tasks = load_tasks(["next_letter", "to_upper"])
    result = run_main_experiment(tiny_gpt2, tasks, TINY, progress=False)
    acc = result.accuracy
    assert list(acc["task"]) == ["next_letter", "to_upper"]
    assert {"best_layer", "baseline_acc", "hypothesis_acc", "regular_acc", "n_usable"} <= set(acc.columns)
    assert acc[["baseline_acc", "hypothesis_acc", "regular_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert len(result.dev_curve) == 2 * tiny_gpt2.n_layers
    best = result.dev_curve.loc[result.dev_curve.groupby("task")["dev_acc"].idxmax()].set_index("task")["layer"]
    assert best.to_dict() == acc.set_index("task")["best_layer"].to_dict()
    counts = result.predictions.groupby(["task", "condition"]).size()
    assert counts[("next_letter", "baseline")] == 7 and counts[("next_letter", "hypothesis")] == 5
    assert result.task_vectors["to_upper"].shape == (5, tiny_gpt2.n_layers, tiny_gpt2.d_model)


def test_explicit_prompt_sets_reproduce_sampled_run(tiny_gpt2, tmp_path):
    tasks = load_tasks(["next_letter"])
    sampled = run_main_experiment(tiny_gpt2, tasks, TINY, progress=False)
    sets = PromptSet.sample(tasks[0], TINY).as_dict()
    loaded = read_jsonl(write_jsonl(tmp_path / "prompts.jsonl", sets))["next_letter"]
    explicit = run_main_experiment(tiny_gpt2, tasks, TINY, prompts={"next_letter": PromptSet(**loaded)},
                                   progress=False)
    pd.testing.assert_frame_equal(sampled.predictions, explicit.predictions)
    pd.testing.assert_frame_equal(sampled.accuracy.drop(columns="seconds"), explicit.accuracy.drop(columns="seconds"))


def test_conditions_are_wired_to_the_right_inputs(tiny_gpt2):
    """Regular = demonstrations + query; Hypothesis = the test prompt's own θ at the best dev layer
    patched into the query alone; Baseline = the query alone."""
    from taskvec import mechanism

    task = load_tasks(["next_letter"])[0]
    result = run_main_experiment(tiny_gpt2, [task], TINY, progress=False)
    sets = PromptSet.sample(task, TINY)
    fmt = TINY.format
    layer = int(result.accuracy["best_layer"][0])
    theta = mechanism.task_vectors(tiny_gpt2, [p.dummy_texts(fmt) for p in sets.test])
    want = {
        "regular": mechanism.next_tokens(tiny_gpt2, [p.regular_text(fmt) for p in sets.test]),
        "hypothesis": mechanism.patched_next_tokens(tiny_gpt2, [p.query_text(fmt) for p in sets.test], theta, [layer])[0],
        "baseline": mechanism.next_tokens(tiny_gpt2, [p.query_text(fmt) for p in sets.baseline]),
    }
    for condition, ids in want.items():
        got = result.predictions.query("condition == @condition")["token_id"].tolist()
        assert got == ids.tolist(), condition


def test_task_too_small_for_the_tokenizer_is_skipped_not_fatal(tiny_gpt2):
    import pytest

    tasks = load_tasks(["en_fr", "next_letter"])  # the character tokenizer makes every French word multi-token
    with pytest.warns(UserWarning, match=r"skipping task 'en_fr': \d usable examples"):
        result = run_main_experiment(tiny_gpt2, tasks, Protocol(n_dev=4, n_test=4, n_baseline=4), progress=False)
    acc = result.accuracy.set_index("task")
    assert acc.loc["en_fr", "best_layer"] == -1 and pd.isna(acc.loc["en_fr", "hypothesis_acc"])
    assert acc.loc["next_letter", "best_layer"] >= 0
    assert result.summary().notna().all()


def test_single_token_filter_keeps_only_one_token_answers():
    from conftest import char_tokenizer
    from taskvec.scoring import single_token_examples
    from taskvec.prompts import PromptFormat
    from taskvec.tasks import Example, Task

    task = Task("t", "linguistic", "d", "exact", (
        Example("a", ("b",)), Example("c", ("de",)), Example("f", ("g", "hi")), Example("j", ("kl", "m"))))
    kept = single_token_examples(task, char_tokenizer(), PromptFormat())
    assert kept.examples == (Example("a", ("b",)), Example("f", ("g",)))


def test_a_protocols_dtype_is_checked_keyed_and_matched_to_the_loaded_model(tiny_gpt2):
    from taskvec.errors import SettingError
    from taskvec.experiment import main_keys

    with pytest.raises(SettingError, match="Protocol.dtype must be one of"):
        Protocol(dtype="float8")
    tasks = load_tasks(["next_letter"])
    assert main_keys("gemma-3-270m", tasks, Protocol(dtype="bfloat16")) != main_keys("gemma-3-270m", tasks, Protocol())
    with pytest.raises(SettingError, match="asks for bfloat16 weights, tiny-gpt2 is loaded in float32"):
        run_main_experiment(tiny_gpt2, tasks, Protocol(dtype="bfloat16", n_dev=2, n_test=2, n_baseline=2), progress=False)
