"""Prompt sampling and the prompt format."""

from __future__ import annotations

import pytest

from taskvec.prompts import FewShotPrompt, PromptFormat, read_jsonl, sample_prompts, sample_queries, write_jsonl
from taskvec.tasks import load_task


def test_paper_format():
    task = load_task("antonyms")
    prompt = sample_prompts(task, 1, n_shots=2, seed=0)[0]
    fmt = PromptFormat()
    d1, d2 = prompt.demonstrations
    assert prompt.regular_text(fmt) == f"example:{d1.input}->{d1.output}\nexample:{d2.input}->{d2.output}\nexample:{prompt.query.input}->"
    assert prompt.query_text(fmt) == f"example:{prompt.query.input}->"
    assert [t.splitlines()[-1] for t in prompt.dummy_texts(fmt)] == [f"example:{d.input}->" for d in prompt.dummy_queries]
    assert PromptFormat("{x} = {y}", " | ").few_shot(prompt.demonstrations[:1], "q") == f"{d1.input} = {d1.output} | q = "
    with pytest.raises(ValueError, match="end with"):
        PromptFormat("{y} <- {x}")


def test_examples_within_a_prompt_are_distinct():
    for name in ("next_letter", "list_first", "en_fr"):
        for prompt in sample_prompts(load_task(name), 50, n_shots=5, seed=41):
            used = [e.input for e in prompt.demonstrations] + [prompt.query.input] + [e.input for e in prompt.dummy_queries]
            assert len(used) == 8 and len(set(used)) == 8


def test_same_seed_same_prompts_other_seed_other_prompts():
    task = load_task("antonyms")
    a = sample_prompts(task, 20, seed=41)
    assert a == sample_prompts(task, 20, seed=41)
    assert a != sample_prompts(task, 20, seed=42)
    assert a != sample_prompts(task, 20, seed=41, split="dev")
    # Growing the set keeps its prefix: sizes can change without reshuffling what was there.
    assert sample_prompts(task, 30, seed=41)[:20] == a


def test_baseline_queries_cover_a_small_pool_evenly():
    task = load_task("next_letter")  # 25 inputs
    queries = [p.query.input for p in sample_queries(task, 100, seed=41)]
    assert len(queries) == 100
    assert all(queries.count(x) == 4 for x in set(queries)) and len(set(queries)) == 25


def test_jsonl_round_trip(tmp_path):
    task = load_task("en_fr")
    sets = {"dev": sample_prompts(task, 3, split="dev"), "test": sample_prompts(task, 4), "baseline": sample_queries(task, 5)}
    path = write_jsonl(tmp_path / "p.jsonl", sets)
    assert read_jsonl(path) == {"en_fr": sets}


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    row = FewShotPrompt("t", (), load_task("next_letter").examples[0]).to_json("test")
    path.write_text(__import__("json").dumps(row) + "\n{\"task\": 1}\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a prompt record"):
        read_jsonl(path)


def test_too_small_task_is_rejected():
    task = load_task("next_letter").restrict(load_task("next_letter").examples[:7])
    with pytest.raises(ValueError, match="has 7 examples; a prompt needs 8"):
        sample_prompts(task, 1)
