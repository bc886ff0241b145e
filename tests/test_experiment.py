"""The main experiment as one call: tidy output, explicit prompt sets, determinism (tiny model)."""

from __future__ import annotations

import pandas as pd

from taskvec.experiment import PromptSet, Protocol, run_main_experiment
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
