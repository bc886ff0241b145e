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
from typing import Mapping, Sequence

import torch

from .. import mechanism
from ..models import TaskModel
from ..prompts import FewShotPrompt
from ..scoring import answer_start
from ..tasks import Example


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
    projection (:func:`taskvec.mechanism.head_contributions`)."""
    if not heads:
        raise ValueError("a function vector needs at least one head")
    values = [means[layer][head] for layer, head in heads]
    return mechanism.head_contributions(model, list(heads), values).sum(dim=0)
