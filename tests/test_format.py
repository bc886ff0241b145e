"""How tasks are written: the original implementation's leading-space rule for word tasks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from taskvec.errors import SettingError
from taskvec.experiment import main_keys, usable_counts
from taskvec.scoring import Scorer, single_token_examples
from taskvec.settings import Protocol
from taskvec.prompts import FewShotPrompt, PromptFormat
from taskvec.tasks import Example, Task, load_tasks


def test_the_spaced_form_is_the_original_codes():
    spaced = PromptFormat(space=True)
    prompt = FewShotPrompt("t", (Example("cat", ("gato",)), Example("dog", ("perro",))), Example("red", ("rojo",)))
    assert prompt.regular_text(spaced) == "example: cat-> gato\nexample: dog-> perro\nexample: red->"
    assert prompt.query_text(spaced) == "example: red->"
    assert prompt.regular_text(PromptFormat()) == "example:cat->gato\nexample:dog->perro\nexample:red->"
    assert (spaced.name, PromptFormat().name) == ("spaced", "bare")


class WordTokenizer:
    """Greedy longest match over ``vocab``, else one token per character: which answers are one token,
    bare and after a space, is set by the test."""

    def __init__(self, vocab):
        self.vocab = sorted(vocab, key=len, reverse=True)
        self.pieces: list[str] = []

    def id(self, piece: str) -> int:
        if piece not in self.pieces:
            self.pieces.append(piece)
        return self.pieces.index(piece)

    def __call__(self, text):
        ids, i = [], 0
        while i < len(text):
            word = next((w for w in self.vocab if text.startswith(w, i)), text[i])
            ids.append(self.id(word))
            i += len(word)
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


ANSWERS = [f"w{i}x" for i in range(10)]
WORDS = Task("words", "translation", "d", "exact", tuple(Example(f"q{i}", (a,)) for i, a in enumerate(ANSWERS)))


@pytest.mark.parametrize("n_spaced, expected", [(10, "spaced"), (7, "spaced"), (6, "bare"), (0, "bare")])
def test_a_word_task_is_spaced_when_that_keeps_70_percent_of_its_single_token_answers(n_spaced, expected):
    tokenizer = WordTokenizer(ANSWERS + [" " + a for a in ANSWERS[:n_spaced]])
    fmt = Protocol().format_for(WORDS, tokenizer)
    assert fmt.name == expected
    usable = single_token_examples(WORDS, tokenizer, fmt)
    assert len(usable) == (n_spaced if expected == "spaced" else 10)


def test_algorithmic_and_knowledge_tasks_are_bare_and_the_bare_setting_is_honoured():
    tokenizer = WordTokenizer(ANSWERS + [" " + a for a in ANSWERS])
    for category, compare in (("algorithmic", "exact"), ("knowledge", "prefix")):
        task = Task("t", category, "d", compare, WORDS.examples)
        assert Protocol().format_for(task, tokenizer).name == "bare"
    assert Protocol(word_format="bare").format_for(WORDS, tokenizer).name == "bare"
    with pytest.raises(SettingError, match="word_format must be one of rule, bare"):
        Protocol(word_format="spaces")


def test_a_spaced_answer_token_scores_as_the_answer():
    tokenizer = WordTokenizer([" " + a for a in ANSWERS])
    spaced = PromptFormat(space=True)
    score = Scorer(WORDS, tokenizer, spaced)
    ids = [tokenizer.id(" w0x"), tokenizer.id(" w9x")]
    assert score(ids, list(WORDS.examples[:2])) == [True, False]
    knowledge = Task("k", "knowledge", "d", "prefix", (Example("France", ("Paris",)),))
    pieces = WordTokenizer([" Pa", "Pa"])
    first = Scorer(knowledge, pieces, spaced).first_tokens(knowledge.examples[0])
    assert first == {pieces.id(" Pa")}  # after a spaced query line the answer starts with its space


def test_gemma_writes_word_tasks_spaced_and_keeps_four_times_the_spanish(real_model):
    """The issue's counts: en_es 76 usable bare, 308 spaced; en_fr 128 and 285 (Gemma 3 270M)."""
    table = usable_counts(load_tasks(["en_es", "en_fr", "antonyms", "next_letter", "country_capital"]),
                          real_model.tokenizer).set_index("task")
    assert table.loc[["en_es", "en_fr", "antonyms"], "format"].eq("spaced").all()
    assert table.loc[["next_letter", "country_capital"], "format"].eq("bare").all()
    assert table.loc["en_es", ["n_usable_bare", "n_usable_spaced", "n_usable"]].tolist() == [76, 308, 308]
    assert table.loc["en_fr", ["n_usable_bare", "n_usable"]].tolist() == [128, 285]


def test_the_format_setting_is_part_of_the_cache_key():
    tasks = load_tasks(["en_es"])
    assert main_keys("gemma-3-270m", tasks, Protocol()) != main_keys("gemma-3-270m", tasks, Protocol(word_format="bare"))
