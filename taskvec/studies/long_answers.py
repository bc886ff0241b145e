"""Beyond one token: does θ carry a task through a whole answer?

The paper scores only the first token of an answer, so it drops every example whose answer is several
tokens. Here every example is usable. Per task: choose ``L`` as the main experiment does (the dev prompts'
first-token accuracy of the patched query, every layer swept), then generate greedily, up to
``max_new_tokens``, for the same test queries under four conditions: Regular (demonstrations + query),
Hypothesis (the query alone, θ of the prompt's own demonstrations patched after ``L`` at its last token,
that position staying in the key/value cache), Every (a control: the same θ also written after ``L`` at
each generated token as it is fed back) and Baseline (the query alone). Each answer is scored two
ways: its first token (the paper's rule for exact tasks, extended to answers of several tokens: the first
generated token's text, stripped, equals the stripped text of an accepted answer's first token) and the
whole answer (the generated text up to the separator, stripped, equals an accepted answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from pydantic import Field
from tqdm import tqdm

from .. import mechanism
from ..errors import positive_int
from ..models import TaskModel, load_model
from ..prompts import sample_prompts
from ..scoring import Scorer, answer_length, choose_layer, full_match
from ..settings import Count, Protocol, Settings
from ..store import Store, read_json, read_records, write_json, write_records
from ..tasks import Task
from ..study import ModelRef, Study, cached

CONDITIONS = ("baseline", "hypothesis", "every", "regular")


def check_max_new_tokens(value) -> int:
    """``max_new_tokens`` as an int >= 1, or a SettingError that names it."""
    return positive_int("max_new_tokens", value)


def answer_text(tokenizer, ids, separator: str) -> str:
    """The generated answer: the decoded ids up to the first ``separator``, stripped."""
    return tokenizer.decode(list(ids)).split(separator, 1)[0].strip()


def stopped(ids, stop_ids) -> bool:
    """Whether a generated answer ended on a stop token (its last id is one), rather than at the token limit."""
    return bool(len(ids)) and int(ids[-1]) in set(stop_ids)


class LongAnswerParams(Settings):
    """Sizes of the long-answer study beside the protocol's shots, dummies, seed and format."""

    max_new_tokens: Count = Field(8, description="longest answer generated, in tokens (the separator included)")
    n_dev: Count = Field(20, description="dev prompts per task on which L is chosen (first-token accuracy of the patched query)")
    n_test: Count = Field(32, description="test prompts per task, answered under all four conditions")


@dataclass
class LongAnswerResult:
    """One task: its layer, the dev curve (first-token accuracy per layer) and every generated answer."""

    task: str
    best_layer: int
    dev_accuracy: list[float]
    predictions: pd.DataFrame
    seconds: float
    format: str

    def save(self, folder: Path) -> None:
        write_json(folder / "result.json", {"task": self.task, "best_layer": self.best_layer,
                                            "dev_accuracy": self.dev_accuracy, "seconds": round(self.seconds, 2),
                                            "format": self.format})
        write_records(folder / "predictions.jsonl", self.predictions)

    @classmethod
    def load(cls, folder: Path) -> "LongAnswerResult":
        return cls(**read_json(folder / "result.json"), predictions=read_records(folder / "predictions.jsonl"))


#: The long-answer study in the cache: one entry per (model, task, protocol, token limit).
LONG_ANSWERS = Study("long_answers", LongAnswerResult, ("studies/long_answers.py",))


def run_task(model: TaskModel, task: Task, protocol: Protocol, max_new_tokens: int) -> LongAnswerResult:
    """The experiment on one task (every example usable: no single-token filter).

    ``protocol`` gives the shots, dummies, seed, format rule and the numbers of dev and test prompts;
    Baseline is scored on the test prompts' own queries, so the three conditions answer the same queries.
    """
    check_max_new_tokens(max_new_tokens)
    start = time.perf_counter()
    p = protocol
    fmt = p.format_for(task, model.tokenizer)
    dev = sample_prompts(task, p.n_dev, p.n_shots, p.seed, "dev", p.n_dummies)
    test = sample_prompts(task, p.n_test, p.n_shots, p.seed, "test", p.n_dummies)
    score = Scorer(task, model.tokenizer, fmt)

    dev_vectors = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in dev], p.batch_size, "dev extract")
    sweep = mechanism.patched_next_tokens(model, [q.query_text(fmt) for q in dev], dev_vectors,
                                          range(model.n_layers), p.patch_batch_size, "dev sweep")
    dev_accuracy = [sum(score.first_token_text(sweep[layer].tolist(), [q.query for q in dev])) / len(dev)
                    for layer in range(model.n_layers)]
    best = choose_layer(dev_accuracy)

    theta = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in test], p.batch_size, "test extract")
    queries = [q.query_text(fmt) for q in test]
    separator = p.separator
    generated = {
        "regular": mechanism.generate(model, [q.regular_text(fmt) for q in test], max_new_tokens, stop=separator,
                                      batch_size=p.batch_size, phase="regular generate"),
        "hypothesis": mechanism.generate(model, queries, max_new_tokens, theta[:, best], best, stop=separator,
                                         batch_size=p.batch_size, phase="hypothesis generate"),
        "every": mechanism.generate(model, queries, max_new_tokens, theta[:, best], best, stop=separator,
                                    batch_size=p.batch_size, phase="every generate", patch="every"),
        "baseline": mechanism.generate(model, queries, max_new_tokens, stop=separator, batch_size=p.batch_size,
                                       phase="baseline generate"),
    }
    examples = [q.query for q in test]
    lengths = [answer_length(model.tokenizer, fmt, ex) for ex in examples]
    stops = mechanism.stop_token_ids(model, separator)  # generate keeps the token that ended an answer
    rows = []
    for condition in CONDITIONS:
        outputs = generated[condition]
        firsts = score.first_token_text([ids[0] for ids in outputs], examples)
        for i, (ids, ex) in enumerate(zip(outputs, examples)):
            text = answer_text(model.tokenizer, ids, separator)
            rows.append({"task": task.name, "condition": condition, "prompt": i, "query": ex.input,
                         "expected": ex.output, "answer_tokens": lengths[i], "generated": text,
                         "n_generated": len(ids), "stopped": stopped(ids, stops),
                         "first_token_correct": bool(firsts[i]), "full_correct": full_match(text, ex)})
    return LongAnswerResult(task=task.name, best_layer=best, dev_accuracy=dev_accuracy,
                            predictions=pd.DataFrame(rows), seconds=time.perf_counter() - start, format=fmt.name)


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per task and condition: first-token and full-answer accuracy, prompts scored, mean answer length."""
    return (predictions.groupby(["task", "condition"], sort=False)
            .agg(first_token_acc=("first_token_correct", "mean"), full_answer_acc=("full_correct", "mean"),
                 n=("full_correct", "size"), answer_tokens=("answer_tokens", "mean"))
            .reset_index())


def wide_table(predictions: pd.DataFrame, best_layers: dict[str, int]) -> pd.DataFrame:
    """One row per task: ``{condition}_first_token_acc`` and ``{condition}_full_answer_acc`` for the three
    conditions, the layer and the mean answer length in tokens (the CLI's table)."""
    long = accuracy_table(predictions)
    wide = long.pivot(index="task", columns="condition", values=["first_token_acc", "full_answer_acc"])
    wide.columns = [f"{condition}_{metric}" for metric, condition in wide.columns]
    order = [f"{c}_{m}" for c in CONDITIONS for m in ("first_token_acc", "full_answer_acc")]
    wide = wide[order].reset_index()
    lengths = long.groupby("task")["answer_tokens"].first()
    wide.insert(1, "best_layer", wide["task"].map(best_layers))
    wide.insert(2, "answer_tokens", wide["task"].map(lengths).round(2))
    tasks = list(dict.fromkeys(predictions["task"]))
    return wide.set_index("task").loc[tasks].reset_index()


#: A task counts as one the model does in context when Regular gets at least this share of its answers whole.
MIN_REGULAR_WHOLE = 0.5


def long_by_task(predictions: pd.DataFrame, min_tokens: int = 3, min_regular: float = MIN_REGULAR_WHOLE) -> pd.DataFrame:
    """Hypothesis against Regular on whole answers, per task, over the test queries whose expected answer has at
    least ``min_tokens`` tokens: n, each condition's share right, McNemar's exact test on the same queries, and
    ``regular_does_it`` (Regular gets at least ``min_regular`` of the task's answers whole, all lengths): only on
    such tasks can a gap say anything about θ rather than about the model."""
    from . import stats

    whole = predictions.groupby(["task", "condition"])["full_correct"].mean().unstack("condition")
    long = predictions[predictions["answer_tokens"] >= min_tokens]
    rows = []
    for task, group in long.groupby("task", sort=False):
        hyp = group[group["condition"] == "hypothesis"].set_index("prompt")["full_correct"].sort_index()
        reg = group[group["condition"] == "regular"].set_index("prompt")["full_correct"].sort_index()
        test = stats.mcnemar(hyp.to_numpy(), reg.to_numpy())
        rows.append({"task": task, "n": test["n"], "hypothesis": float(hyp.mean()), "regular": float(reg.mean()),
                     "p_value": test["p_value"], "regular_does_it": bool(whole.loc[task, "regular"] >= min_regular)})
    return pd.DataFrame(rows, columns=["task", "n", "hypothesis", "regular", "p_value", "regular_does_it"])


def control_test(predictions: pd.DataFrame, min_tokens: int = 2, min_regular: float = MIN_REGULAR_WHOLE) -> dict:
    """The control, θ written at every generated position (Every) against once (Hypothesis): whole answers on
    the same test queries whose expected answer has at least ``min_tokens`` tokens (where later tokens
    matter), pooled over the tasks Regular does (see :func:`long_by_task`). Returns the tasks, n, each
    condition's share right and McNemar's exact test (``every_only``, ``once_only``, ``p_value``)."""
    from . import stats

    whole = predictions.groupby(["task", "condition"])["full_correct"].mean().unstack("condition")
    tasks = [t for t in dict.fromkeys(predictions["task"]) if whole.loc[t, "regular"] >= min_regular]
    rows = predictions[predictions["task"].isin(tasks) & (predictions["answer_tokens"] >= min_tokens)]

    def outcome(condition):
        return rows[rows["condition"] == condition].sort_values(["task", "prompt"])["full_correct"].to_numpy()

    every, once = outcome("every"), outcome("hypothesis")
    test = stats.mcnemar(every, once)
    return {"tasks": tasks, "min_tokens": min_tokens, "n": test["n"],
            "every": float(every.mean()) if len(every) else float("nan"),
            "once": float(once.mean()) if len(once) else float("nan"),
            "every_only": test["a_only"], "once_only": test["b_only"], "p_value": test["p_value"]}


def by_length(predictions: pd.DataFrame, longest: int = 5) -> pd.DataFrame:
    """Full-answer accuracy per condition against the answer's length in tokens (``longest`` and more
    pooled as ``longest+``), over all tasks; with the prompts counted."""
    frame = predictions.assign(length=predictions["answer_tokens"].clip(upper=longest))
    table = (frame.groupby(["length", "condition"])
             .agg(full_answer_acc=("full_correct", "mean"), first_token_acc=("first_token_correct", "mean"),
                  n=("full_correct", "size"))
             .reset_index())
    table["length_label"] = table["length"].map(lambda n: f"{n}+" if n == longest else str(n))
    return table



@dataclass
class LongAnswers:
    """The experiment over tasks: every generated answer, the per-task table and the dev curves."""

    predictions: pd.DataFrame
    accuracy: pd.DataFrame  # one row per task (see wide_table)
    dev_curve: pd.DataFrame  # task, layer, dev_acc (first token of the patched query)
    seconds: dict[str, float]
    model: str
    max_new_tokens: int


def run(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, max_new_tokens: int,
        store: Store | None = None, loader=load_model, remote: bool | str = False, progress: bool = True) -> LongAnswers:
    """:func:`run_task` on every task, each result read from / written to ``store`` when given (so an
    interrupted run resumes, and ``model`` may be a name loaded only if some task is missing)."""
    check_max_new_tokens(max_new_tokens)
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    results: list[LongAnswerResult] = []
    for task in tqdm(tasks, desc=f"long answers ({ref.name})", unit="task", disable=not progress):
        results.append(cached(LONG_ANSWERS, ref, task.name,
                              lambda m, task=task: run_task(m, task, protocol, max_new_tokens), store,
                              task=task.identity(), protocol=protocol, max_new_tokens=max_new_tokens).result)
    predictions = pd.concat([r.predictions for r in results], ignore_index=True)
    curves = [{"task": r.task, "layer": layer, "dev_acc": acc} for r in results for layer, acc in enumerate(r.dev_accuracy)]
    return LongAnswers(predictions=predictions, accuracy=wide_table(predictions, {r.task: r.best_layer for r in results}),
                       dev_curve=pd.DataFrame(curves), seconds={r.task: round(r.seconds, 2) for r in results},
                       model=ref.name, max_new_tokens=max_new_tokens)
