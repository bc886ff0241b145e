"""Beyond one token: does θ carry a task through a whole answer?

The paper scores only the first token of an answer, so it drops every example whose answer is several
tokens. Here every example is usable. Per task: choose ``L`` as the main experiment does (the dev prompts'
first-token accuracy of the patched query, every layer swept), then generate greedily, up to
``max_new_tokens``, for the same test queries under three conditions: Regular (demonstrations + query),
Hypothesis (the query alone, θ of the prompt's own demonstrations patched after ``L`` at its last token,
that position staying in the key/value cache) and Baseline (the query alone). Each answer is scored two
ways: its first token (the paper's rule for exact tasks, extended to answers of several tokens: the first
generated token's text, stripped, equals the stripped text of an accepted answer's first token) and the
whole answer (the generated text up to the separator, stripped, equals an accepted answer).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from .. import mechanism
from ..errors import positive_int
from ..experiment import Protocol, Scorer, model_identity, read_records, write_records
from ..models import TaskModel, load_model
from ..prompts import PromptFormat, sample_prompts
from ..remote import where as remote_where
from ..store import LONG_ANSWER_MODULES, Store, make_key
from ..tasks import Example, Task

CONDITIONS = ("baseline", "hypothesis", "regular")


def check_max_new_tokens(value) -> int:
    """``max_new_tokens`` as an int >= 1, or a SettingError that names it."""
    return positive_int("max_new_tokens", value)


def answer_text(tokenizer, ids, separator: str) -> str:
    """The generated answer: the decoded ids up to the first ``separator``, stripped."""
    return tokenizer.decode(list(ids)).split(separator, 1)[0].strip()


def answer_tokens(tokenizer, fmt: PromptFormat, example: Example) -> int:
    """How many tokens the canonical answer takes right after its query line (what the model must
    produce before the separator)."""
    context = tokenizer(fmt.query(example.input)).input_ids
    full = tokenizer(fmt.query(example.input) + fmt.answer(example.output)).input_ids
    start = next((j for j, (a, b) in enumerate(zip(context, full)) if a != b), len(context))
    return len(full) - start


def full_match(text: str, example: Example) -> bool:
    """The whole answer is right: the stripped text equals an accepted answer."""
    return bool(text) and text in {answer.strip() for answer in example.outputs}


@dataclass
class LongAnswerResult:
    """One task: its layer, the dev curve (first-token accuracy per layer) and every generated answer."""

    task: str
    best_layer: int
    dev_accuracy: list[float]
    predictions: pd.DataFrame
    seconds: float
    format: str


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

    def first_ok(ids, examples) -> list[bool]:  # the first token's text, stripped, starts an accepted answer
        out = []
        for i, ex in zip(ids, examples):
            firsts = {model.tokenizer.decode([t]).strip() for t in score.first_tokens(ex)}
            text = model.tokenizer.decode([int(i)]).strip()
            out.append(bool(text) and text in firsts)
        return out

    dev_vectors = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in dev], p.batch_size, "dev extract")
    sweep = mechanism.patched_next_tokens(model, [q.query_text(fmt) for q in dev], dev_vectors,
                                          range(model.n_layers), p.patch_batch_size, "dev sweep")
    dev_accuracy = [sum(first_ok(sweep[layer].tolist(), [q.query for q in dev])) / len(dev)
                    for layer in range(model.n_layers)]
    best = max(range(model.n_layers), key=lambda layer: (dev_accuracy[layer], -layer))

    theta = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in test], p.batch_size, "test extract")
    queries = [q.query_text(fmt) for q in test]
    separator = p.separator
    generated = {
        "regular": mechanism.generate(model, [q.regular_text(fmt) for q in test], max_new_tokens, stop=separator,
                                      batch_size=p.batch_size, phase="regular generate"),
        "hypothesis": mechanism.generate(model, queries, max_new_tokens, theta[:, best], best, stop=separator,
                                         batch_size=p.batch_size, phase="hypothesis generate"),
        "baseline": mechanism.generate(model, queries, max_new_tokens, stop=separator, batch_size=p.batch_size,
                                       phase="baseline generate"),
    }
    examples = [q.query for q in test]
    lengths = [answer_tokens(model.tokenizer, fmt, ex) for ex in examples]
    stops = set(mechanism.stop_token_ids(model, separator))  # generate keeps the token that ended an answer
    rows = []
    for condition in CONDITIONS:
        outputs = generated[condition]
        firsts = first_ok([ids[0] for ids in outputs], examples)
        for i, (ids, ex) in enumerate(zip(outputs, examples)):
            text = answer_text(model.tokenizer, ids, separator)
            rows.append({"task": task.name, "condition": condition, "prompt": i, "query": ex.input,
                         "expected": ex.output, "answer_tokens": lengths[i], "generated": text,
                         "n_generated": len(ids), "stopped": ids[-1] in stops,
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


def task_key(model: TaskModel | str, task: Task, protocol: Protocol, max_new_tokens: int,
             remote: bool | str = False) -> str:
    """Cache key of one task's result: the model's identity, the task's data, the protocol, the token limit
    and the code of the method and of this module."""
    return make_key(LONG_ANSWER_MODULES, kind="long_answers", **model_identity(model, protocol, remote),
                    task=task.identity(), protocol=protocol, max_new_tokens=max_new_tokens)


def run(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, max_new_tokens: int,
        store: Store | None = None, loader=load_model, remote: bool | str = False, progress: bool = True) -> LongAnswers:
    """:func:`run_task` on every task, each result read from / written to ``store`` when given (so an
    interrupted run resumes, and ``model`` may be a name loaded only if some task is missing)."""
    check_max_new_tokens(max_new_tokens)
    name = model if isinstance(model, str) else model.name
    loaded: list[TaskModel] = [] if isinstance(model, str) else [model]
    preds, curves, layers, seconds = [], [], {}, {}
    for task in tqdm(tasks, desc=f"long answers ({name})", unit="task", disable=not progress):
        key = task_key(model, task, protocol, max_new_tokens, remote) if store else ""
        if store and store.has("long_answers", name, key):
            folder = store.path("long_answers", name, key)
            info = json.loads((folder / "result.json").read_text())
            predictions = read_records(folder / "predictions.jsonl")
        else:
            if not loaded:
                loaded.append(loader(model))
            with remote_where(task=task.name):
                result = run_task(loaded[0], task, protocol, max_new_tokens)
            info = {"task": task.name, "best_layer": result.best_layer, "dev_accuracy": result.dev_accuracy,
                    "seconds": round(result.seconds, 2), "format": result.format}
            predictions = result.predictions
            if store:
                def write(folder, info=info, predictions=predictions):
                    (folder / "result.json").write_text(json.dumps(info, indent=1))
                    write_records(folder / "predictions.jsonl", predictions)
                store.save("long_answers", name, key, write)
        preds.append(predictions)
        layers[task.name], seconds[task.name] = info["best_layer"], info["seconds"]
        curves += [{"task": task.name, "layer": layer, "dev_acc": acc} for layer, acc in enumerate(info["dev_accuracy"])]
    predictions = pd.concat(preds, ignore_index=True)
    return LongAnswers(predictions=predictions, accuracy=wide_table(predictions, layers),
                       dev_curve=pd.DataFrame(curves), seconds=seconds, model=name, max_new_tokens=max_new_tokens)
