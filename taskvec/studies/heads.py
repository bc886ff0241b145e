"""Attention heads and function vectors (Todd et al., ICLR 2024) beside θ, on the same prompts.

Todd et al. found that a few attention heads carry an in-context task: each head's output at the last
token, averaged over in-context prompts of the task, raises the probability of the right answer when it
replaces that head's output in a prompt whose demonstrations have their answers shuffled (the head's
*indirect effect*); the sum of the top heads' mean outputs, put through their output projections, is a
*function vector* (FV) that makes the model do the task when added to the residual stream of a query
alone. This module computes those quantities with taskvec's mechanism (each head's output before the
attention output projection, :func:`taskvec.mechanism.head_outputs`; one row per (prompt, head) on a cached
prefix, :func:`taskvec.mechanism.head_sweep_probs`), so that the FV and θ meet on the same model, tasks
and prompts.

* :func:`shuffled_labels`: the corrupted prompt, the same demonstrations with their answers permuted
  among themselves so that no demonstration keeps its own answer (where the answers differ).
* :func:`mean_head_outputs`: each head's last-token output averaged over in-context prompts.
* :func:`indirect_effects`: per corrupted prompt and head, the rise of the right answer's probability
  when that head alone is set to its mean.
* :func:`average_indirect_effect`: the mean over the tasks the model does in context (Todd et al.'s
  "average indirect effect"), :func:`top_heads` its ranking.
* :func:`function_vector`: the sum of the top heads' projected mean outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from pydantic import Field
from tqdm import tqdm

from .. import mechanism
from ..models import TaskModel, load_model
from ..prompts import FewShotPrompt, TooFewExamples, sample_prompts, sample_queries
from ..scoring import Scorer, answer_start
from ..settings import Count, Protocol, Settings
from ..store import Store, read_json, write_json
from ..study import ModelRef, Skip, Study, cached
from ..tasks import Example, Task


def shuffled_labels(prompt: FewShotPrompt, seed: int | str = 0) -> FewShotPrompt:
    """``prompt`` with its demonstrations' answers permuted among themselves, query and dummies unchanged.

    The permutation is seeded, and it is a derangement when one exists: no demonstration keeps its own
    answer unless every other demonstration has the same one (then nothing can move it).
    """
    demos = list(prompt.demonstrations)
    outputs = [d.outputs for d in demos]
    rng = random.Random(f"shuffled-labels:{seed}:{prompt.task}:{prompt.query.input}")
    order = list(range(len(demos)))
    movable = len({o for o in outputs}) > 1
    for _ in range(1000):
        rng.shuffle(order)
        if not movable or all(outputs[order[i]] != outputs[i] or _all_same(outputs, i) for i in range(len(demos))):
            break
    shuffled = tuple(Example(d.input, outputs[order[i]]) for i, d in enumerate(demos))
    return FewShotPrompt(prompt.task, shuffled, prompt.query, prompt.dummy_queries)


def _all_same(outputs: Sequence[tuple[str, ...]], i: int) -> bool:
    """Whether every other demonstration has demonstration ``i``'s answer (so no permutation moves it)."""
    return all(o == outputs[i] for j, o in enumerate(outputs) if j != i)


def answer_token(tokenizer, fmt, example: Example) -> int:
    """The first token of ``example``'s canonical answer after its query line (its only one, for the
    single-token examples the protocol keeps)."""
    full, start = answer_start(tokenizer, fmt, example.input, example.output)
    if start >= len(full):
        raise ValueError(f"the answer {example.output!r} adds no token after {example.input!r}")
    return int(full[start])


def mean_head_outputs(model: TaskModel, texts: Sequence[str], batch_size: int = 64,
                      phase: str = "heads mean") -> list[torch.Tensor]:
    """Each head's output at the last token, averaged over ``texts``: one (n_heads, head_dim) per layer."""
    return [layer.mean(dim=0) for layer in mechanism.head_outputs(model, texts, batch_size=batch_size, phase=phase)]


def indirect_effects(model: TaskModel, texts: Sequence[str], targets: Sequence[int], means: Sequence[torch.Tensor],
                     batch_size: int = 256, phase: str = "heads effect") -> torch.Tensor:
    """(n_texts, n_layers, n_heads): for each (corrupted) text and head, the probability of the text's target
    with that head's last-token output set to ``means`` minus the probability without (its indirect effect)."""
    clean, patched = mechanism.head_sweep_probs(model, texts, targets, means, batch_size=batch_size, phase=phase)
    return patched - clean[:, None, None]


def average_indirect_effect(effects: Mapping[str, torch.Tensor], does_icl: Mapping[str, bool]) -> torch.Tensor:
    """The mean over tasks of each task's (n_layers, n_heads) mean effect, over the tasks the model does in
    context only (``does_icl``): a task it cannot do says nothing about which heads carry one. Raises if
    there is none."""
    chosen = [task for task in effects if does_icl.get(task, False)]
    if not chosen:
        raise ValueError("no task the model does in context: the average indirect effect is undefined")
    return torch.stack([effects[task].float() for task in chosen]).mean(dim=0)


def top_heads(effect: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs of largest effect in an (n_layers, n_heads) map, largest first (ties
    broken by layer, then head)."""
    if effect.dim() != 2:
        raise ValueError(f"effect must be (n_layers, n_heads), got {tuple(effect.shape)}")
    if not 0 < k <= effect.numel():
        raise ValueError(f"k must be in 1..{effect.numel()}, got {k}")
    n_heads = effect.shape[1]
    flat = sorted(range(effect.numel()), key=lambda i: (-float(effect.flatten()[i]), i))
    return [(i // n_heads, i % n_heads) for i in flat[:k]]


def function_vector(model: TaskModel, means: Sequence[torch.Tensor], heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(d_model,): the sum over ``heads`` of each head's mean output put through its layer's output
    projection (:func:`taskvec.mechanism.head_contributions`), as Todd et al. define it on GPT-J and Llama.

    In families that normalise the attention output before adding it to the residual stream (Gemma 2 and
    3's post-attention norm), the projected output is not yet what the head adds to the stream: that norm
    acts on all heads together, so a single head's share is not defined by the projection alone.
    """
    if not heads:
        raise ValueError("a function vector needs at least one head")
    values = [means[layer][head] for layer, head in heads]
    return mechanism.head_contributions(model, list(heads), values).sum(dim=0)


# --- one task, cached ---------------------------------------------------------------------------------

class HeadSizes(Settings):
    """How many prompts the per-task head study uses (Todd et al.: 100 for the means, 25 corrupted)."""

    n_mean: Count = Field(20, description="in-context prompts each head's mean output is taken over")
    n_corrupt: Count = Field(10, description="shuffled-label prompts the indirect effect is averaged over")


@dataclass
class HeadsTaskResult:
    """One task: each head's mean output, its indirect effect per corrupted prompt, and whether the model
    answers the in-context prompts the means come from (Regular, per prompt)."""

    means: list[torch.Tensor]  #: per layer (n_heads, head_dim)
    effect: torch.Tensor  #: (n_corrupt, n_layers, n_heads)
    regular: list[bool]  #: per in-context prompt: its answer is right

    def save(self, folder: Path) -> None:
        torch.save({"means": [m.contiguous() for m in self.means], "effect": self.effect.contiguous()},
                   folder / "heads.pt")
        write_json(folder / "regular.json", [bool(x) for x in self.regular])

    @classmethod
    def load(cls, folder: Path) -> "HeadsTaskResult":
        saved = torch.load(folder / "heads.pt", weights_only=True)
        return cls(list(saved["means"]), saved["effect"], [bool(x) for x in read_json(folder / "regular.json")])


#: The heads study in the cache: one entry per (model, task, protocol, sizes).
HEADS = Study("heads", HeadsTaskResult, ("studies/heads.py",))


def task_heads(model: TaskModel, task: Task, protocol: Protocol, sizes: HeadSizes) -> HeadsTaskResult:
    """Mean head outputs over ``sizes.n_mean`` in-context prompts of ``task`` (the protocol's shots and
    format) and each head's indirect effect on ``sizes.n_corrupt`` shuffled-label prompts (other queries)."""
    fmt, usable = protocol.usable(task, model.tokenizer)
    try:
        clean = sample_prompts(usable, sizes.n_mean, protocol.n_shots, protocol.seed, "heads-mean", 0)
        corrupt = sample_prompts(usable, sizes.n_corrupt, protocol.n_shots, protocol.seed, "heads-corrupt", 0)
    except TooFewExamples as error:
        raise Skip(str(error)) from None
    texts = [p.regular_text(fmt) for p in clean]
    means = mean_head_outputs(model, texts, protocol.batch_size)
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    regular = score(mechanism.next_tokens(model, texts, protocol.batch_size, "heads regular").tolist(),
                    [p.query for p in clean])
    bad = [shuffled_labels(p, protocol.seed).regular_text(fmt) for p in corrupt]
    targets = [answer_token(model.tokenizer, fmt, p.query) for p in corrupt]
    effect = indirect_effects(model, bad, targets, means, protocol.patch_batch_size)
    return HeadsTaskResult(means, effect, list(regular))


def run(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, sizes: HeadSizes = HeadSizes(),
        store: Store | None = None, loader=load_model, remote: bool | str = False,
        progress: bool = True) -> dict[str, HeadsTaskResult]:
    """:func:`task_heads` for every task, each cached in ``store`` when given; skipped tasks are left out."""
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    out = {}
    for task in tqdm(tasks, desc=f"heads ({ref.name})", unit="task", disable=not progress):
        outcome = cached(HEADS, ref, task.name, lambda m, task=task: task_heads(m, task, protocol, sizes), store,
                         task=task.identity(), protocol=protocol, sizes=sizes)
        if not outcome.skipped:
            out[task.name] = outcome.result
    return out


# --- the function vector beside θ -----------------------------------------------------------------------

def fv_dev_sweep(model: TaskModel, task: Task, protocol: Protocol, vectors: Mapping[int, torch.Tensor],
                 n_dev: int = 20) -> pd.DataFrame:
    """Accuracy of each function vector (``vectors[k]``, (d_model,), from the top ``k`` heads) added at the
    last token after every layer of ``n_dev`` dev queries alone. One row per (k, layer, query): k, layer,
    query, correct. Every layer of one k is one batched sweep on cached prefixes."""
    fmt, usable = protocol.usable(task, model.tokenizer)
    queries = sample_queries(usable, n_dev, protocol.seed, "heads-dev")
    texts = [q.query_text(fmt) for q in queries]
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    rows = []
    for k, fv in vectors.items():
        patch = fv.reshape(1, 1, -1).expand(len(texts), model.n_layers, -1)
        ids = mechanism.patched_next_tokens(model, texts, patch, range(model.n_layers), protocol.patch_batch_size,
                                            "fv dev sweep", add=True)
        for layer in range(model.n_layers):
            for i, ok in enumerate(score(ids[layer].tolist(), [q.query for q in queries])):
                rows.append({"k": int(k), "layer": layer, "query": i, "correct": bool(ok)})
    return pd.DataFrame(rows, columns=["k", "layer", "query", "correct"])


def choose_fv(dev: pd.DataFrame) -> tuple[int, int]:
    """(k, layer) of the best dev accuracy in :func:`fv_dev_sweep`'s rows; ties go to fewer heads, then to
    the earlier layer."""
    accuracy = dev.groupby(["k", "layer"])["correct"].mean().reset_index()
    best = accuracy.sort_values(["correct", "k", "layer"], ascending=[False, True, True]).iloc[0]
    return int(best["k"]), int(best["layer"])


#: The conditions of :func:`side_by_side`, in the order the book shows them.
CONDITIONS = ("baseline", "regular", "hypothesis", "theta_added", "fv_query", "fv_shuffled")


def side_by_side(model: TaskModel, task: Task, protocol: Protocol, layer: int, fv: torch.Tensor, fv_layer: int,
                 n_test: int = 25) -> pd.DataFrame:
    """The test queries of ``n_test`` prompts under every condition of :data:`CONDITIONS`: Baseline (the
    query alone), Regular (the prompt), Hypothesis (θ of the prompt replacing the query's state after
    ``layer``, the paper), θ added there instead, the FV added after ``fv_layer`` to the query alone, and
    to the prompt with its answers shuffled. One row per (query, condition): query, condition, correct."""
    fmt, usable = protocol.usable(task, model.tokenizer)
    prompts = sample_prompts(usable, n_test, protocol.n_shots, protocol.seed, "heads-test", protocol.n_dummies)
    queries = [p.query_text(fmt) for p in prompts]
    shuffled = [shuffled_labels(p, protocol.seed).regular_text(fmt) for p in prompts]
    theta, regular = mechanism.task_vectors_and_answers(model, [p.dummy_texts(fmt) for p in prompts],
                                                        [p.regular_text(fmt) for p in prompts], protocol.batch_size,
                                                        "heads extract + regular")
    fvs = torch.zeros(len(prompts), model.n_layers, model.d_model)
    fvs[:, fv_layer] = fv
    ids = {
        "baseline": mechanism.next_tokens(model, queries, protocol.batch_size, "heads baseline"),
        "regular": regular,
        "hypothesis": mechanism.patched_next_tokens(model, queries, theta, [layer], protocol.patch_batch_size,
                                                    "heads hypothesis")[0],
        "theta_added": mechanism.patched_next_tokens(model, queries, theta, [layer], protocol.patch_batch_size,
                                                     "heads theta added", add=True)[0],
        "fv_query": mechanism.patched_next_tokens(model, queries, fvs, [fv_layer], protocol.patch_batch_size,
                                                  "heads fv", add=True)[0],
        "fv_shuffled": mechanism.patched_next_tokens(model, shuffled, fvs, [fv_layer], protocol.patch_batch_size,
                                                     "heads fv shuffled", add=True)[0],
    }
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    examples = [p.query for p in prompts]
    rows = [{"query": i, "condition": condition, "correct": bool(ok)}
            for condition in CONDITIONS for i, ok in enumerate(score(ids[condition].tolist(), examples))]
    return pd.DataFrame(rows, columns=["query", "condition", "correct"])


def theta_fv_cosine(model: TaskModel, task: Task, protocol: Protocol, layer: int, fv: torch.Tensor,
                    n_prompts: int = 25) -> float:
    """How much of θ the function vector points along: the cosine between θ minus the query-only state
    (both after ``layer``, averaged over ``n_prompts`` prompts) and the FV."""
    fmt, usable = protocol.usable(task, model.tokenizer)
    prompts = sample_prompts(usable, n_prompts, protocol.n_shots, protocol.seed, "heads-test", protocol.n_dummies)
    theta = mechanism.task_vectors(model, [p.dummy_texts(fmt) for p in prompts], protocol.batch_size,
                                   "heads cosine extract")[:, layer].mean(dim=0)
    alone = mechanism.hidden_states(model, [p.query_text(fmt) for p in prompts], protocol.batch_size,
                                    "heads cosine query")[:, layer].mean(dim=0)
    return float(torch.nn.functional.cosine_similarity(theta - alone, fv.float(), dim=0))
