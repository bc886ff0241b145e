"""Scoring: where an answer starts after its query line, whether a predicted token is right, which layer wins.

Every study scores through this module, so "the answer's first token", "a single-token answer" and "the best
layer" mean one thing everywhere. The answer's position is found by tokenizing the query line with and
without the answer (:func:`answer_start`), so a merge across the ``->`` boundary counts.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import SettingError
from .prompts import PromptFormat
from .tasks import Example, Task

#: Scoring rules for "prefix" tasks (knowledge: answers of several tokens, only the first is predicted).
#: ``first_token`` (the default): the predicted token must be the answer's first token as the tokenizer
#: writes it after the query line, so ``S`` is not ``South America``. ``lenient`` (the original code's
#: rule): an accepted answer starts with the stripped predicted text, so one letter can count.
PREFIX_RULES = ("first_token", "lenient")

#: A task is *saturated* when the query alone already does it about as well as in-context learning:
#: Baseline at least SATURATED_MIN_BASELINE and within SATURATED_GAP of Regular. Its dev curve is then
#: flat (patching anything anywhere keeps the query's own answer), so its best layer says nothing
#: about where θ lives; tables and charts mark it.
SATURATED_MIN_BASELINE = 0.5
SATURATED_GAP = 0.1


def answer_start(tokenizer, fmt: PromptFormat, query: str, answer: str) -> tuple[list[int], int]:
    """The ids of ``query``'s line followed by ``answer`` and the position where the answer's tokens start.

    The context's own ids are compared with the full line's: the first position where they differ is where
    the answer begins (a merge across the boundary changes the context's last token; the answer then starts
    there). When the answer adds nothing, the start is the full line's length.
    """
    context = tokenizer(fmt.query(query)).input_ids
    full = tokenizer(fmt.query(query) + fmt.answer(answer)).input_ids
    start = next((j for j, (a, b) in enumerate(zip(context, full)) if a != b), len(context))
    return list(full), start


def answer_length(tokenizer, fmt: PromptFormat, example: Example) -> int:
    """How many tokens the canonical answer takes right after its query line."""
    full, start = answer_start(tokenizer, fmt, example.input, example.output)
    return len(full) - start


def is_single_token(tokenizer, fmt: PromptFormat, query: str, answer: str) -> bool:
    """Whether ``answer`` is exactly one token appended to the query line's own tokens (no merge)."""
    context = tokenizer(fmt.query(query)).input_ids
    full, start = answer_start(tokenizer, fmt, query, answer)
    return start == len(context) and len(full) == len(context) + 1


def single_token_examples(task: Task, tokenizer, fmt: PromptFormat) -> Task:
    """``task`` restricted to examples whose canonical answer is one token right after the query.

    Accepted alternatives that are not single tokens are dropped (they could never match one predicted
    token). "prefix" tasks are kept whole: only the first token of their answer is compared.
    """
    if task.compare == "prefix":
        return task
    kept = []
    for ex in task.examples:
        outputs = tuple(y for y in ex.outputs if is_single_token(tokenizer, fmt, ex.input, y))
        if outputs and outputs[0] == ex.output:
            kept.append(Example(ex.input, outputs))
    return task.restrict(kept)


def choose_layer(accuracies: Sequence[float]) -> int:
    """The layer with the best accuracy, the earliest among ties (the paper's criterion for L)."""
    if not len(accuracies):
        raise SettingError("choose_layer needs at least one layer's accuracy")
    values = [float(a) for a in accuracies]
    return max(range(len(values)), key=lambda layer: (values[layer], -layer))


def is_saturated(baseline_acc: float, regular_acc: float) -> bool:
    """Whether the query alone already does the task about as well as ICL (see SATURATED_GAP)."""
    if math.isnan(baseline_acc) or math.isnan(regular_acc):
        return False
    return baseline_acc >= SATURATED_MIN_BASELINE and regular_acc - baseline_acc < SATURATED_GAP


class Scorer:
    """Scores predicted tokens of one task against accepted answers; it decodes the ids itself.

    ``exact`` tasks: the decoded token, stripped, equals an accepted answer (the single-token filter
    guarantees the answer is one token). ``prefix`` tasks, under ``rule``: ``first_token`` compares
    token ids with the first token of each accepted answer as the tokenizer writes it right after the
    query line (``example:France->`` + ``Paris``), so a predicted ``S`` or `` S`` is not ``South
    America``; ``lenient`` is the original rule, an accepted answer starting with the stripped
    predicted text.
    """

    def __init__(self, task: Task, tokenizer, fmt: PromptFormat, rule: str = "first_token") -> None:
        if rule not in PREFIX_RULES:
            raise SettingError(f"unknown prefix_rule {rule!r} (expected one of {', '.join(PREFIX_RULES)})")
        self.task, self.tokenizer, self.fmt, self.rule = task, tokenizer, fmt, rule
        self._first: dict[tuple[str, tuple[str, ...]], frozenset[int]] = {}

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Each id as its own text."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def first_tokens(self, example: Example) -> frozenset[int]:
        """Token ids that start an accepted answer of ``example`` after its query line."""
        key = (example.input, example.outputs)
        if key not in self._first:
            firsts = set()
            for answer in example.outputs:
                full, start = answer_start(self.tokenizer, self.fmt, example.input, answer)
                if start < len(full):
                    firsts.add(int(full[start]))
            self._first[key] = frozenset(firsts)
        return self._first[key]

    def lenient(self, ids: Sequence[int], examples: Sequence[Example]) -> list[bool]:
        """The text rule: exact match, or for prefix tasks an answer starting with the prediction."""
        return [self.task.is_correct(text, ex) for text, ex in zip(self.decode(ids), examples)]

    def first_token(self, ids: Sequence[int], examples: Sequence[Example]) -> list[bool]:
        """The token rule for prefix tasks (exact tasks: as :meth:`lenient`)."""
        if self.task.compare != "prefix":
            return self.lenient(ids, examples)
        return [int(i) in self.first_tokens(ex) for i, ex in zip(ids, examples)]

    def first_token_text(self, ids: Sequence[int], examples: Sequence[Example]) -> list[bool]:
        """The rule for the first token of a *generated* answer of any length, every task alike: its text,
        stripped, equals the stripped text of an accepted answer's first token. Text, not ids, because a
        generated token and the answer's token may differ only in a leading space."""
        out = []
        for text, ex in zip(self.decode(ids), examples):
            firsts = {t.strip() for t in self.decode(sorted(self.first_tokens(ex)))}
            out.append(bool(text.strip()) and text.strip() in firsts)
        return out

    def __call__(self, ids: Sequence[int], examples: Sequence[Example]) -> list[bool]:
        """Correct or not under this scorer's rule."""
        if self.rule == "lenient":
            return self.lenient(ids, examples)
        return self.first_token(ids, examples)

    def by_rule(self, ids: Sequence[int], examples: Sequence[Example]) -> dict[str, list[bool]]:
        """Correct or not under both rules: ``{"first_token": [...], "lenient": [...]}``."""
        return {"first_token": self.first_token(ids, examples), "lenient": self.lenient(ids, examples)}


def full_match(text: str, example: Example) -> bool:
    """A whole generated answer is right: the stripped text equals an accepted answer."""
    return bool(text) and text in {answer.strip() for answer in example.outputs}
