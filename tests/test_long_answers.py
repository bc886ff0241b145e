"""Answers longer than one token: generation against plain PyTorch, its invariants, scoring, caching, the
command line, and the effect on the embedded model.

Golden: ``mechanism.generate`` (nnsight, HF generate with a key/value cache, left-padded batches) against a
plain loop that recomputes the whole sequence at every step, a forward hook writing θ at the query's last
position each time. Equal token ids on tiny random models of every supported family.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from taskvec import cli, mechanism
from taskvec.studies import long_answers as LA
from taskvec.errors import SettingError
from taskvec.settings import Protocol
from taskvec.prompts import PromptFormat
from taskvec.scoring import Scorer, answer_length, full_match
from taskvec.store import Store
from taskvec.study import ModelRef, key_of
from taskvec.tasks import Example, Task, load_task, load_tasks

from plain import plain_generate

TEXTS = ["example:a->b\nexample:c->", "example:hot->cold\nexample:up->down\nexample:big->", "example:x->"]
STEPS = 6


def test_generate_matches_a_plain_loop_with_a_hook(tiny):
    torch.manual_seed(1)
    vectors = torch.randn(len(TEXTS), tiny.d_model) * 5
    stop = set(mechanism.stop_token_ids(tiny))
    for layer in (0, tiny.n_layers - 2):
        got = mechanism.generate(tiny, TEXTS, STEPS, vectors, layer, batch_size=8)
        for i, text in enumerate(TEXTS):
            assert got[i] == plain_generate(tiny, text, STEPS, layer, vectors[i], stop), (tiny.name, layer, i)
    clean = mechanism.generate(tiny, TEXTS, STEPS)
    assert clean == [plain_generate(tiny, t, STEPS, stop_ids=stop) for t in TEXTS]
    # The patch does something (guards against a silent no-op on both sides).
    assert got != clean


def test_generate_every_matches_a_plain_loop_that_writes_theta_at_every_new_position(tiny):
    """The control: θ at the prompt's last position and at every generated one. The run makes every step
    (no early stop inside nnsight's step loop); each row is still cut at its first stop token."""
    torch.manual_seed(2)
    vectors = torch.randn(len(TEXTS), tiny.d_model) * 5
    stop = set(mechanism.stop_token_ids(tiny))
    layer = 1
    every = mechanism.generate(tiny, TEXTS, STEPS, vectors, layer, batch_size=8, patch="every")
    for i, text in enumerate(TEXTS):
        assert every[i] == plain_generate(tiny, text, STEPS, layer, vectors[i], stop, every=True), (tiny.name, i)
    once = mechanism.generate(tiny, TEXTS, STEPS, vectors, layer, batch_size=8)
    assert [ids[0] for ids in every] == [ids[0] for ids in once]  # the first token sees the same θ
    assert every != once  # and the later ones do not (guards against a silent no-op)
    one_by_one = [mechanism.generate(tiny, [t], STEPS, vectors[i:i + 1], layer, patch="every")[0]
                  for i, t in enumerate(TEXTS)]
    assert every == one_by_one


def test_every_stops_rows_at_their_stop_token(tiny_gpt2):
    """Without early stopping in the run, a row that reached a stop token still ends there: the stop string
    is taken from what row 0 generates unstopped, so that row must end on it."""
    vectors = torch.randn(len(TEXTS), tiny_gpt2.d_model, generator=torch.Generator().manual_seed(3)) * 5
    free = mechanism.generate(tiny_gpt2, TEXTS, 12, vectors, 2, patch="every", stop="\x00")
    stop_text = tiny_gpt2.tokenizer.decode([free[0][2]])
    generated = mechanism.generate(tiny_gpt2, TEXTS, 12, vectors, 2, patch="every", stop=stop_text)
    stop = set(mechanism.stop_token_ids(tiny_gpt2, stop_text))
    assert len(generated[0]) <= 3 and generated[0][-1] in stop
    for ids, unstopped in zip(generated, free):
        assert all(t not in stop for t in ids[:-1])
        assert ids == unstopped[:len(ids)]  # the same greedy tokens up to the stop


def test_a_batch_generates_what_its_prompts_generate_one_by_one(tiny):
    torch.manual_seed(2)
    vectors = torch.randn(len(TEXTS), tiny.d_model) * 5
    batch = mechanism.generate(tiny, TEXTS, STEPS, vectors, 1, batch_size=len(TEXTS))
    single = [mechanism.generate(tiny, [t], STEPS, vectors[i:i + 1], 1)[0] for i, t in enumerate(TEXTS)]
    assert batch == single


def test_the_first_generated_token_is_the_one_token_patch(tiny_gpt2):
    torch.manual_seed(3)
    vectors = torch.randn(len(TEXTS), tiny_gpt2.n_layers, tiny_gpt2.d_model) * 5
    layer = 2
    generated = mechanism.generate(tiny_gpt2, TEXTS, 3, vectors[:, layer], layer)
    patched = mechanism.patched_next_tokens(tiny_gpt2, TEXTS, vectors, [layer])[0]
    assert [ids[0] for ids in generated] == patched.tolist()


def test_generation_stops_at_the_separator_and_keeps_it(tiny_gpt2):
    stop = set(mechanism.stop_token_ids(tiny_gpt2))
    newline = tiny_gpt2.tokenizer.convert_tokens_to_ids("\n")
    assert newline in stop and tiny_gpt2.tokenizer.eos_token_id in stop
    for ids in mechanism.generate(tiny_gpt2, TEXTS, 40):
        ends = [i for i, t in enumerate(ids) if t in stop]
        assert ends in ([], [len(ids) - 1]), ids  # nothing after the first stop token
        assert len(ids) <= 40


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 3, "layer": 1}, "both vectors and layer"),
    ({"max_new_tokens": 3, "layer": 1, "vectors": torch.zeros(2, 32)}, "vectors must be"),
    ({"max_new_tokens": 3, "layer": 9, "vectors": torch.zeros(3, 32)}, "out of range"),
    ({"max_new_tokens": 3, "patch": "all"}, "patch must be one of prompt, every"),
])
def test_generate_rejects_bad_arguments(tiny_gpt2, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mechanism.generate(tiny_gpt2, TEXTS, **kwargs)


def test_answers_are_cut_at_the_separator_and_matched_whole(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ids = tok("c a t\nexample").input_ids[1:]  # without <bos>
    assert LA.answer_text(tok, ids, "\n") == "c a t"
    example = Example("cat", ("c a t", "C A T"))
    assert full_match("c a t", example) and full_match("C A T", example)
    assert not full_match("c a", example) and not full_match("", example)
    # One character per token here: "c a t" is 5 tokens after the query line; spaced adds one.
    assert answer_length(tok, PromptFormat(), example) == 5
    assert answer_length(tok, PromptFormat(space=True), example) == 6


def test_an_answer_stopped_only_when_its_last_token_is_a_stop_token(tiny_gpt2):
    stops = mechanism.stop_token_ids(tiny_gpt2, "\n")
    newline = tiny_gpt2.tokenizer.convert_tokens_to_ids("\n")
    letter = tiny_gpt2.tokenizer.convert_tokens_to_ids("a")
    assert newline in stops and letter not in stops
    assert LA.stopped([letter, newline], stops)
    assert not LA.stopped([newline, letter], stops)  # a separator earlier, but the limit cut the answer
    assert not LA.stopped([], stops)


def test_first_token_of_a_generated_answer_is_scored_by_its_text(tiny_gpt2):
    """The generation rule compares the first generated token's stripped text with an accepted answer's first
    token, for every task alike: planted ids fire it (right first letter, any later letters) or not."""
    tok = tiny_gpt2.tokenizer
    task = Task("t", "knowledge", "d", "prefix", (Example("fr", ("Paris",)), Example("pe", ("Lima", "Lim"))))
    score = Scorer(task, tok, PromptFormat())
    ids = [tok.convert_tokens_to_ids(c) for c in ("P", "L", "x", " ")]
    examples = [task.examples[0], task.examples[1], task.examples[1], task.examples[0]]
    assert score.first_token_text(ids, examples) == [True, True, False, False]  # a blank token never counts
    swapped = [task.examples[1], task.examples[0], task.examples[1], task.examples[0]]
    assert score.first_token_text(ids, swapped) == [False, False, False, False]


def test_max_new_tokens_is_checked():
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(SettingError, match="max_new_tokens"):
            LA.check_max_new_tokens(bad)


def _letters_task() -> Task:
    return load_task("next_letter")


def test_the_study_scores_every_condition_on_the_same_queries_and_caches(tiny_gpt2, tmp_path, monkeypatch):
    protocol = Protocol(n_dev=4, n_test=5)
    tasks = [_letters_task(), load_task("list_reverse")]
    store = Store(tmp_path)
    computed, real = [], LA.run_task
    monkeypatch.setattr(LA, "run_task", lambda model, task, *a: computed.append(task.name) or real(model, task, *a))
    first = LA.run(tiny_gpt2, tasks, protocol, 4, store=store, progress=False)
    assert computed == ["next_letter", "list_reverse"]
    preds = first.predictions
    assert set(preds["condition"]) == set(LA.CONDITIONS)
    queries = {c: list(g["query"]) for c, g in preds[preds["task"] == "list_reverse"].groupby("condition")}
    assert queries["baseline"] == queries["hypothesis"] == queries["regular"]
    assert (preds["n_generated"] <= 4).all()
    assert list(first.accuracy.columns[3:]) == [f"{c}_{m}" for c in LA.CONDITIONS
                                                for m in ("first_token_acc", "full_answer_acc")]
    assert len(first.dev_curve) == len(tasks) * tiny_gpt2.n_layers

    again = LA.run(tiny_gpt2, tasks, protocol, 4, store=store, progress=False)
    assert computed == ["next_letter", "list_reverse"]  # nothing computed again
    pd.testing.assert_frame_equal(again.predictions, first.predictions, check_dtype=False)
    # Another token limit is another result.
    key = lambda limit: key_of(LA.LONG_ANSWERS, ModelRef(tiny_gpt2), task=tasks[0].identity(), protocol=protocol,
                               max_new_tokens=limit)
    assert key(4) != key(5)


def test_the_command_line_writes_first_token_and_full_answer_columns(tmp_path, capsys):
    from conftest import CONFIGS, char_tokenizer
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"](), dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["main", "--model", str(folder), "--tasks", "next_letter,spell_word", "--max-new-tokens", "4",
            "--n-dev", "3", "--n-test", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    table = pd.read_csv(out / "accuracy.csv")
    assert list(table["task"]) == ["next_letter", "spell_word"]
    for condition in LA.CONDITIONS:
        assert {f"{condition}_first_token_acc", f"{condition}_full_answer_acc"} <= set(table.columns)
    assert json.loads((out / "meta.json").read_text())["max_new_tokens"] == 4
    assert cli.main(argv[:-4] + ["--max-new-tokens", "0", "--out", str(out)]) == 2
    assert "max_new_tokens must be an integer >= 1" in capsys.readouterr().err


def test_the_sequence_tasks_are_not_among_the_paper_s():
    names = [t.name for t in load_tasks()]
    assert len(names) == 18 and "spell_word" not in names and "list_reverse" not in names
    spell, reverse = load_task("spell_word"), load_task("list_reverse")
    assert all(ex.output == " ".join(ex.input) for ex in spell.examples)
    assert all(ex.output == " ".join(reversed(ex.input.split(" "))) for ex in reverse.examples)
    assert all(3 <= len(ex.input.split(" ")) <= 5 for ex in reverse.examples)


def test_theta_carries_whole_answers_on_the_real_model(real_model):
    # Observed (seed 41, n_dev 12, n_test 16, CPU float32): full-answer accuracy baseline / hypothesis /
    # regular: country_capital .00/.50/.38, antonyms .12/.50/.88 (first token .00/.50/.38, .06/.56/.88);
    # 4 of 10 capitals of two tokens or more generated whole under Hypothesis.
    # Asserted: Hypothesis above Baseline on whole answers for both tasks, by .2 on average (observed .44).
    protocol = Protocol(n_dev=12, n_test=16)
    result = LA.run(real_model, load_tasks(["country_capital", "antonyms"]), protocol, 6, progress=False)
    acc = result.accuracy.set_index("task")
    gain = acc["hypothesis_full_answer_acc"] - acc["baseline_full_answer_acc"]
    assert (gain > 0).all() and gain.mean() >= 0.2, acc
    assert (acc["regular_full_answer_acc"] > acc["baseline_full_answer_acc"]).all(), acc
    # Capitals of several tokens exist and some are generated whole under Hypothesis.
    hyp = result.predictions[(result.predictions["condition"] == "hypothesis")
                             & (result.predictions["answer_tokens"] >= 2)]
    assert len(hyp) and hyp["full_correct"].any(), hyp


def test_long_answers_are_compared_per_task_only_where_regular_does_them():
    def rows(task, tokens, hyp, reg):
        return [{"task": task, "condition": c, "prompt": i, "answer_tokens": tokens, "full_correct": ok}
                for c, oks in (("hypothesis", hyp), ("regular", reg)) for i, ok in enumerate(oks)]

    frame = pd.DataFrame(rows("capitals", 3, [True] * 4 + [False] * 6, [True] * 10)
                         + rows("spell", 5, [False] * 10, [True] + [False] * 9)
                         + rows("short", 1, [True] * 10, [True] * 10))
    table = LA.long_by_task(frame).set_index("task")
    assert list(table.index) == ["capitals", "spell"]  # one-token answers are not long
    assert table.loc["capitals", "regular_does_it"] and not table.loc["spell", "regular_does_it"]
    assert table.loc["capitals", "p_value"] < 0.05 and table.loc["spell", "p_value"] == 1.0
    assert (table.loc["capitals", "hypothesis"], table.loc["capitals", "regular"]) == (0.4, 1.0)


def planted_predictions(every_right: int, once_right: int, n: int = 20, regular: float = 1.0) -> pd.DataFrame:
    """Two tasks of ``n`` two-token answers: "does" (Regular right at rate ``regular``) with Every right on the
    first ``every_right`` queries and Hypothesis on the first ``once_right``; "cannot" (Regular never right)
    where Every is always right, so counting it would tip any test."""
    rows = []
    for task, reg in (("does", regular), ("cannot", 0.0)):
        for i in range(n):
            right = {"regular": i < reg * n, "hypothesis": i < once_right and task == "does",
                     "every": i < every_right if task == "does" else True, "baseline": False}
            rows += [{"task": task, "condition": c, "prompt": i, "answer_tokens": 2, "full_correct": ok}
                     for c, ok in right.items()]
    return pd.DataFrame(rows)


def test_the_control_pairs_queries_on_tasks_the_model_does_and_its_verdict_flips():
    from taskvec.studies import verdicts as V

    better = LA.control_test(planted_predictions(every_right=18, once_right=2))
    assert better["tasks"] == ["does"] and better["n"] == 20  # "cannot" is left out
    assert (better["every"], better["once"], better["every_only"], better["once_only"]) == (0.9, 0.1, 16, 0)
    assert better["p_value"] < 0.001
    assert "more whole answers" in V.control_verdict(better["every"], better["once"], better["n"], better["p_value"])
    same = LA.control_test(planted_predictions(every_right=10, once_right=9))
    assert same["p_value"] == 1.0
    assert "no detectable difference" in V.control_verdict(same["every"], same["once"], same["n"], same["p_value"])
    short = LA.control_test(planted_predictions(every_right=18, once_right=2), min_tokens=3)
    assert short["n"] == 0  # two-token answers only: none qualifies
    none = LA.control_test(planted_predictions(every_right=18, once_right=2, regular=0.25))
    assert none["tasks"] == [] and none["n"] == 0
