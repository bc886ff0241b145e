"""What θ needs: how many demonstrations, and how many prompts, make a task vector.

The paper reads θ from one prompt of 5 demonstrations. Two curves ask how much of that context θ needs,
both patched at the layer ``L`` the main experiment chose for the task and scored like it (single-token
answers, the protocol's scoring rule):

* **Shots.** θ from prompts of 1, 2, 3, 5, 8 and 12 demonstrations: Hypothesis (θ patched into the
  query alone) and Regular (the same prompt with the real query) against the number of shots.
* **Contexts.** θ averaged over ``k`` different prompts of the task (k = 1, 2, 4, 8, 16; the original
  code has this option but never reports it), patched into held-out queries: queries that no prompt of
  the pool contains, so the mean cannot have seen them. Baseline (the held-out query alone) is the floor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from .. import mechanism
from ..errors import SettingError
from ..models import TaskModel, load_model
from ..prompts import TooFewExamples, sample_prompts
from ..scoring import Scorer
from ..settings import Count, Protocol, Settings
from ..store import Store, read_records, write_records
from ..study import ModelRef, Study, cached
from ..tasks import Task

SHOTS = (1, 2, 3, 5, 8, 12)
CONTEXTS = (1, 2, 4, 8, 16)
#: The book's default tasks: one or two per category, sized for its time goal.
DEFAULT_TASKS = ("next_letter", "en_es", "fr_en", "antonyms", "present_past", "country_capital")


def check_counts(name: str, values: Sequence[int]) -> list[int]:
    """A non-empty list of distinct integers >= 1, sorted; otherwise a SettingError naming ``name``."""
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise SettingError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    if len(set(values)) != len(values):
        raise SettingError(f"{name} must not repeat a value, got {values!r}")
    return sorted(values)


def shots_curve(model: TaskModel, task: Task, protocol: Protocol, layer: int, shots: Sequence[int] = SHOTS,
                n_prompts: int = 20) -> pd.DataFrame:
    """Per number of shots: Hypothesis (θ of the prompt, patched after ``layer`` into its query alone) and
    Regular (the prompt with its query) on ``n_prompts`` prompts. One row per prompt and condition:
    task, shots, condition, prompt, correct. A shot count the task has too few examples for is left out."""
    shots = check_counts("shots", shots)
    fmt, usable = protocol.usable(task, model.tokenizer)
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    rows = []
    for n_shots in shots:
        try:
            prompts = sample_prompts(usable, n_prompts, n_shots, protocol.seed, f"shots-{n_shots}", protocol.n_dummies)
        except TooFewExamples:
            continue
        theta, regular = mechanism.task_vectors_and_answers(
            model, [q.dummy_texts(fmt) for q in prompts], [q.regular_text(fmt) for q in prompts], protocol.batch_size,
            "shots extract + regular")
        hypothesis = mechanism.patched_next_tokens(model, [q.query_text(fmt) for q in prompts], theta, [layer],
                                                   protocol.patch_batch_size, "shots patch")[0]
        examples = [q.query for q in prompts]
        for condition, ids in (("hypothesis", hypothesis), ("regular", regular)):
            for i, ok in enumerate(score(ids.tolist(), examples)):
                rows.append({"task": task.name, "shots": n_shots, "condition": condition, "prompt": i, "correct": ok})
    return pd.DataFrame(rows, columns=["task", "shots", "condition", "prompt", "correct"])


#: The pool of examples the context prompts are drawn from keeps at least this many times what one prompt
#: needs, so that different prompts are more than permutations of the same few examples.
POOL_FACTOR = 2


def held_out_split(task: Task, n_queries: int, need: int, seed: int) -> tuple[list, list]:
    """``n_queries`` held-out examples, at most what leaves :data:`POOL_FACTOR` times ``need`` (the examples
    of one prompt) for the pool, and the rest. A task of 25 letters and prompts of 8 holds out 9, not 17:
    otherwise every "different prompt" would be a permutation of the same 8 letters."""
    examples = list(task.examples)
    random.Random(f"{seed}:{task.name}:held-out").shuffle(examples)
    n = min(n_queries, len(examples) - POOL_FACTOR * need)
    if n < 1:
        raise TooFewExamples(f"task {task.name!r} has {len(examples)} examples: none left to hold out "
                             f"beside a pool of {POOL_FACTOR} x {need} (the examples of one prompt)")
    return examples[:n], examples[n:]


def contexts_curve(model: TaskModel, task: Task, protocol: Protocol, layer: int,
                   contexts: Sequence[int] = CONTEXTS, pool: int = 32, max_groups: int = 8,
                   n_queries: int = 25) -> pd.DataFrame:
    """Multi-context θ: the mean of θ over ``k`` prompts, patched after ``layer`` into held-out queries.

    ``pool`` prompts (the protocol's shots and dummies) are drawn from the examples left after holding
    out the queries; for each ``k``, up to ``max_groups`` disjoint groups of ``k`` prompts each give
    one mean θ, scored on every held-out query. Baseline: each held-out query alone. One row per
    (k, group, query) and for the baseline per query: task, k, group, condition, query, correct
    (Baseline rows have k = 0).
    """
    contexts = check_counts("contexts", contexts)
    if max(contexts) > pool:
        raise SettingError(f"the largest context count ({max(contexts)}) exceeds the pool of {pool} prompts")
    fmt, usable = protocol.usable(task, model.tokenizer)
    need = protocol.n_shots + 1 + protocol.n_dummies
    held, rest = held_out_split(usable, n_queries, need, protocol.seed)
    prompts = sample_prompts(usable.restrict(rest), pool, protocol.n_shots, protocol.seed, "contexts",
                             protocol.n_dummies)
    theta = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in prompts], protocol.batch_size,
                                   "contexts extract")[:, layer]
    plan = [(k, g) for k in contexts for g in range(min(max_groups, pool // k))]
    means = torch.stack([theta[g * k:(g + 1) * k].mean(dim=0) for k, g in plan])  # disjoint groups
    queries = [fmt.query(ex.input) for ex in held]
    texts = [q for _ in plan for q in queries]
    vectors = torch.zeros(len(texts), model.n_layers, model.d_model)
    vectors[:, layer] = means.repeat_interleave(len(queries), dim=0)
    ids = mechanism.patched_next_tokens(model, texts, vectors, [layer], protocol.patch_batch_size, "contexts patch")[0]
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    correct = score(ids.tolist(), held * len(plan))
    rows = [{"task": task.name, "k": k, "group": g, "condition": "hypothesis", "query": i,
             "correct": correct[j * len(queries) + i]}
            for j, (k, g) in enumerate(plan) for i in range(len(queries))]
    base = score(mechanism.next_tokens(model, queries, protocol.batch_size, "contexts baseline").tolist(), held)
    rows += [{"task": task.name, "k": 0, "group": 0, "condition": "baseline", "query": i, "correct": ok}
             for i, ok in enumerate(base)]
    return pd.DataFrame(rows)


def averaging_gain(contexts: pd.DataFrame, seed: int = 0) -> dict:
    """What averaging θ over prompts changes, paired at the level of (task, held-out query): for each, the
    accuracy of the mean θ over the most prompts minus that of one prompt's θ (each averaged over its
    groups). Returns the two context counts, the mean change with its bootstrap interval over the (task,
    query) pairs, the number of pairs and of tasks, and the Wilcoxon signed-rank p-value of the changes."""
    from . import stats

    hyp = contexts[contexts["condition"] == "hypothesis"]
    k_lo, k_hi = int(hyp["k"].min()), int(hyp["k"].max())
    by_query = hyp.groupby(["task", "query", "k"])["correct"].mean().unstack("k")
    change = (by_query[k_hi] - by_query[k_lo]).dropna()
    mean, lo, hi = stats.mean_interval(change, seed=seed)
    nonzero = change[change != 0]
    from scipy.stats import wilcoxon

    p = float(wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return {"k_lo": k_lo, "k_hi": k_hi, "difference": mean, "lo": lo, "hi": hi, "n_pairs": int(len(change)),
            "n_tasks": int(change.index.get_level_values("task").nunique()), "p_value": p}


def held_out_counts(contexts: pd.DataFrame) -> pd.Series:
    """Per task: how many held-out queries its contexts curve was scored on."""
    return contexts[contexts["condition"] == "baseline"].groupby("task", sort=False)["query"].nunique()


def curve_summary(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """Accuracy per task, ``x`` and condition, and the mean over tasks (task ``mean``)."""
    per_task = frame.groupby(["task", x, "condition"])["correct"].mean().rename("accuracy").reset_index()
    mean = per_task.groupby([x, "condition"])["accuracy"].mean().reset_index().assign(task="mean")
    return pd.concat([per_task, mean[per_task.columns]], ignore_index=True)


class Sizes(Settings):
    """How large the two curves are (see :func:`shots_curve` and :func:`contexts_curve`)."""

    shots: list[int] = Field(list(SHOTS), description="demonstrations per prompt, for the shots curve")
    contexts: list[int] = Field(list(CONTEXTS), description="prompts averaged into θ, for the contexts curve")
    n_prompts: Count = Field(16, description="prompts per shot count")
    pool: Count = Field(32, description="prompts whose θ the context means are drawn from (at least the largest of contexts)")
    max_groups: Count = Field(4, description="disjoint groups of prompts per context count")
    n_queries: Count = Field(25, description="held-out queries each mean θ is scored on")

    @field_validator("shots", "contexts")
    @classmethod
    def _counts(cls, values: list[int], info) -> list[int]:
        return check_counts(info.field_name, values)

    @model_validator(mode="after")
    def _pool_holds_contexts(self) -> "Sizes":
        if max(self.contexts) > self.pool:
            raise SettingError(f"the largest context count ({max(self.contexts)}) exceeds pool ({self.pool})")
        return self


@dataclass
class ContextTaskResult:
    """One task's two curves (rows as :func:`shots_curve` and :func:`contexts_curve` return them)."""

    shots: pd.DataFrame
    contexts: pd.DataFrame

    def save(self, folder: Path) -> None:
        write_records(folder / "shots.jsonl", self.shots)
        write_records(folder / "contexts.jsonl", self.contexts)

    @classmethod
    def load(cls, folder: Path) -> "ContextTaskResult":
        return cls(read_records(folder / "shots.jsonl"), read_records(folder / "contexts.jsonl"))


#: What θ needs in the cache: one entry per (model, task, protocol, layer, sizes).
CONTEXT = Study("context", ContextTaskResult, ("studies/context.py",))


@dataclass
class ContextResult:
    shots: pd.DataFrame  # one row per task, shot count, condition and prompt (see shots_curve)
    contexts: pd.DataFrame  # one row per task, k, group, condition and query (see contexts_curve)
    layers: dict[str, int]
    seconds: dict[str, float]


def run(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, layers: dict[str, int],
        sizes: Sizes = Sizes(), store: Store | None = None, loader=load_model, remote: bool | str = False,
        progress: bool = True) -> ContextResult:
    """Both curves for every task at its layer ``layers[task]``, each task cached in ``store`` when given."""
    missing = [t.name for t in tasks if t.name not in layers]
    if missing:
        raise SettingError(f"no layer given for task(s) {', '.join(missing)}")
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    shots, contexts, seconds = [], [], {}
    for task in tqdm(tasks, desc=f"what θ needs ({ref.name})", unit="task", disable=not progress):
        layer = int(layers[task.name])

        def compute(m: TaskModel, task=task, layer=layer) -> ContextTaskResult:
            return ContextTaskResult(
                shots_curve(m, task, protocol, layer, sizes.shots, sizes.n_prompts),
                contexts_curve(m, task, protocol, layer, sizes.contexts, sizes.pool, sizes.max_groups,
                               sizes.n_queries))

        outcome = cached(CONTEXT, ref, task.name, compute, store, task=task.identity(), protocol=protocol,
                         layer=layer, sizes=sizes)
        shots.append(outcome.result.shots)
        contexts.append(outcome.result.contexts)
        seconds[task.name] = outcome.seconds
    return ContextResult(shots=pd.concat(shots, ignore_index=True), contexts=pd.concat(contexts, ignore_index=True),
                         layers={t.name: int(layers[t.name]) for t in tasks}, seconds=seconds)
