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

import dataclasses
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
from ..prompts import FewShotPrompt, PromptFormat, TooFewExamples, sample_prompts, sample_queries
from ..scoring import Scorer, answer_start
from ..settings import Count, Protocol, Settings
from ..errors import SettingError
from ..store import Store, read_json, read_records, write_json, write_records
from ..study import ModelRef, Skip, Study, cached
from . import stats
from ..tasks import Example, Task


#: The book's default tasks (a word translation, a semantic relation, a fact, a letter rule): few, for the
#: default book's time; a profile can run all.
DEFAULT_TASKS = ("en_es", "antonyms", "country_capital", "next_letter")


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
    broken by layer, then head); NaN cells (no such head) are never chosen."""
    if effect.dim() != 2:
        raise ValueError(f"effect must be (n_layers, n_heads), got {tuple(effect.shape)}")
    if not 0 < k <= effect.numel():
        raise ValueError(f"k must be in 1..{effect.numel()}, got {k}")
    n_heads, values = effect.shape[1], effect.flatten().tolist()
    present = [i for i, v in enumerate(values) if v == v]  # NaN: a layer with fewer heads has none there
    if k > len(present):
        raise ValueError(f"k must be at most the {len(present)} heads the map has, got {k}")
    flat = sorted(present, key=lambda i: (-values[i], i))
    return [(i // n_heads, i % n_heads) for i in flat[:k]]


def function_vector(model: TaskModel, means: Sequence[torch.Tensor], heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(d_model,): the sum over ``heads`` of what each head's mean output adds to the residual stream, as
    Todd et al. define it on GPT-J and Llama (the mean put through its layer's output projection:
    :func:`taskvec.mechanism.head_contributions`).

    In families that normalise the attention output before adding it to the stream (``arch.head_norm``:
    Gemma 2 to 4's post-attention norm, OLMo 2's post-norm), the projected mean is not yet what a head adds:
    the norm divides all heads together by the root mean square of their sum. There a head's share is its
    projected mean times the norm's weight, over the scale of all heads' projected means together (every
    head at its mean, ``means``), so the shares of all heads sum to the norm's output for the mean heads.
    """
    if not heads:
        raise ValueError("a function vector needs at least one head")
    values = [means[layer][head] for layer, head in heads]
    return mechanism.head_contributions(model, list(heads), values, context=means).sum(dim=0)


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
    corrupt_means: list[torch.Tensor]  #: per layer (n_heads, head_dim): the means over the shuffled-label prompts

    def save(self, folder: Path) -> None:
        torch.save({"means": [m.contiguous() for m in self.means], "effect": self.effect.contiguous(),
                    "corrupt_means": [m.contiguous() for m in self.corrupt_means]}, folder / "heads.pt")
        write_json(folder / "regular.json", [bool(x) for x in self.regular])

    @classmethod
    def load(cls, folder: Path) -> "HeadsTaskResult":
        saved = torch.load(folder / "heads.pt", weights_only=True)
        return cls(list(saved["means"]), saved["effect"], [bool(x) for x in read_json(folder / "regular.json")],
                   list(saved["corrupt_means"]))


#: The heads study in the cache: one entry per (model, task, protocol, sizes).
HEADS = Study("heads", HeadsTaskResult, ("studies/heads.py",))


def task_heads(model: TaskModel, task: Task, protocol: Protocol, sizes: HeadSizes) -> HeadsTaskResult:
    """Mean head outputs over ``sizes.n_mean`` in-context prompts of ``task`` (the protocol's shots and
    format), each head's indirect effect on ``sizes.n_corrupt`` shuffled-label prompts (other queries), and
    the heads' means over those shuffled-label prompts."""
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
    corrupt_means = mean_head_outputs(model, bad, protocol.batch_size, "heads corrupt mean")
    return HeadsTaskResult(means, effect, list(regular), corrupt_means)


def run(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, sizes: HeadSizes = HeadSizes(),
        store: Store | None = None, loader=load_model, remote: bool | str = False,
        progress: bool = True) -> dict[str, HeadsTaskResult]:
    """:func:`task_heads` for every task, each cached in ``store`` when given; skipped tasks are left out."""
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    return _heads_per_task(ref, tasks, protocol, sizes, store, progress)[0]


def _heads_per_task(ref: ModelRef, tasks: Sequence[Task], protocol: Protocol, sizes: HeadSizes, store: Store | None,
                    progress: bool) -> tuple[dict[str, HeadsTaskResult], dict[str, float]]:
    out, seconds = {}, {}
    for task in tqdm(tasks, desc=f"heads ({ref.name})", unit="task", disable=not progress):
        outcome = cached(HEADS, ref, task.name, lambda m, task=task: task_heads(m, task, protocol, sizes), store,
                         task=task.identity(), protocol=protocol, sizes=sizes)
        if not outcome.skipped:
            out[task.name], seconds[task.name] = outcome.result, outcome.seconds
    return out, seconds


# --- the function vector beside θ -----------------------------------------------------------------------

def fv_dev_sweep(model: TaskModel, task: Task, protocol: Protocol, vectors: Mapping[int, torch.Tensor],
                 n_dev: int = 20, exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Accuracy of each function vector (``vectors[k]``, (d_model,), from the top ``k`` heads) added at the
    last token after every layer of ``n_dev`` dev queries alone. One row per (k, layer, query): k, layer,
    query, correct. Every layer of one k is one batched sweep on cached prefixes. Dev queries avoid the
    inputs in ``exclude`` (the test queries) while at least ``n_dev`` examples are left without them."""
    fmt, usable = protocol.usable(task, model.tokenizer)
    kept = tuple(e for e in usable.examples if e.input not in set(exclude))
    pool = dataclasses.replace(usable, examples=kept) if len(kept) >= n_dev else usable
    queries = sample_queries(pool, n_dev, protocol.seed, "heads-dev")
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
CONDITIONS = ("baseline", "regular", "hypothesis", "theta_added", "fv_query", "fv_shuffled", "hypothesis_ablated",
              "hypothesis_ablated_other")


def heads_test_prompts(task: Task, protocol: Protocol, tokenizer, n_test: int) -> list[FewShotPrompt]:
    """The ``n_test`` prompts the comparisons use (the protocol's shots, dummies and seed; their own split)."""
    _, usable = protocol.usable(task, tokenizer)
    return sample_prompts(usable, n_test, protocol.n_shots, protocol.seed, "heads-test", protocol.n_dummies)


@dataclass
class TestPass:
    """What :func:`side_by_side`, :func:`theta_fv_cosine` and :func:`in_words` share on the test prompts,
    computed once (:func:`test_pass`): θ of each prompt, its Regular answer, and the query alone's states and
    answer (Baseline)."""

    __test__ = False  # not a pytest test class, whatever its name

    prompts: list[FewShotPrompt]
    theta: torch.Tensor  #: (n, n_layers, d_model)
    regular: torch.Tensor  #: (n,) token ids
    alone: torch.Tensor  #: (n, n_layers, d_model): the query alone's last-token states
    baseline: torch.Tensor  #: (n,) token ids: the query alone's answer


def test_pass(model: TaskModel, task: Task, protocol: Protocol, n_test: int) -> TestPass:
    """θ and Regular of the ``n_test`` test prompts (their demonstrations computed once), and the queries alone."""
    fmt, _ = protocol.usable(task, model.tokenizer)
    prompts = heads_test_prompts(task, protocol, model.tokenizer, n_test)
    theta, regular = mechanism.task_vectors_and_answers(model, [p.dummy_texts(fmt) for p in prompts],
                                                        [p.regular_text(fmt) for p in prompts], protocol.batch_size,
                                                        "heads extract + regular")
    alone, baseline = mechanism.prompt_states(model, [[p.query_text(fmt)] for p in prompts], protocol.batch_size,
                                              "heads query alone")
    return TestPass(prompts, theta, regular, alone[:, 0], baseline[:, 0])


test_pass.__test__ = False  # a function named test_*: not a pytest test either


def side_by_side(model: TaskModel, task: Task, protocol: Protocol, layer: int, fv: torch.Tensor, fv_layer: int,
                 n_test: int = 25, ablate: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
                 ablate_other: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
                 test: TestPass | None = None) -> pd.DataFrame:
    """The test queries of ``n_test`` prompts under every condition of :data:`CONDITIONS`: Baseline (the
    query alone), Regular (the prompt), Hypothesis (θ of the prompt replacing the query's state after
    ``layer``, the paper), θ added there instead, the FV added after ``fv_layer`` to the query alone, and
    to the prompt with its answers shuffled; with ``ablate`` (layer -> (heads, values), as
    :func:`taskvec.mechanism.task_vectors` takes it), Hypothesis with θ read while those heads' last-token
    outputs are set to the values, and with ``ablate_other`` the same for other heads (the control). One row
    per (query, condition): query, condition, correct. ``test``: the test prompts' :func:`test_pass`, if
    already computed."""
    fmt, _ = protocol.usable(task, model.tokenizer)
    test = test or test_pass(model, task, protocol, n_test)
    prompts, theta = test.prompts, test.theta
    queries = [p.query_text(fmt) for p in prompts]
    shuffled = [shuffled_labels(p, protocol.seed).regular_text(fmt) for p in prompts]
    fvs = torch.zeros(len(prompts), model.n_layers, model.d_model)
    fvs[:, fv_layer] = fv
    ids = {
        "baseline": test.baseline,
        "regular": test.regular,
        "hypothesis": mechanism.patched_next_tokens(model, queries, theta, [layer], protocol.patch_batch_size,
                                                    "heads hypothesis")[0],
        "theta_added": mechanism.patched_next_tokens(model, queries, theta, [layer], protocol.patch_batch_size,
                                                     "heads theta added", add=True)[0],
        "fv_query": mechanism.patched_next_tokens(model, queries, fvs, [fv_layer], protocol.patch_batch_size,
                                                  "heads fv", add=True)[0],
        "fv_shuffled": mechanism.patched_next_tokens(model, shuffled, fvs, [fv_layer], protocol.patch_batch_size,
                                                     "heads fv shuffled", add=True)[0],
    }
    for condition, heads in (("hypothesis_ablated", ablate), ("hypothesis_ablated_other", ablate_other)):
        if heads:
            ablated = mechanism.task_vectors(model, [p.dummy_texts(fmt) for p in prompts], protocol.batch_size,
                                             "heads extract, heads ablated", heads=heads)
            ids[condition] = mechanism.patched_next_tokens(model, queries, ablated, [layer], protocol.patch_batch_size,
                                                           "heads hypothesis ablated")[0]
    score = Scorer(task, model.tokenizer, fmt, protocol.prefix_rule)
    examples = [p.query for p in prompts]
    rows = [{"query": i, "condition": condition, "correct": bool(ok)}
            for condition in CONDITIONS if condition in ids
            for i, ok in enumerate(score(ids[condition].tolist(), examples))]
    return pd.DataFrame(rows, columns=["query", "condition", "correct"])


def theta_fv_cosine(model: TaskModel, task: Task, protocol: Protocol, layer: int, fv: torch.Tensor,
                    n_prompts: int = 25, test: TestPass | None = None) -> float:
    """How much of θ the function vector points along: the cosine between θ minus the query-only state
    (both after ``layer``, averaged over ``n_prompts`` test prompts, or ``test``'s) and the FV."""
    test = test or test_pass(model, task, protocol, n_prompts)
    difference = (test.theta[:, layer] - test.alone[:, layer]).mean(dim=0)
    return float(torch.nn.functional.cosine_similarity(difference, fv.float(), dim=0))


# --- in words instead of example:x-> ------------------------------------------------------------------------

#: A query in words for the tasks where one reads naturally (Todd et al.'s portability test): ``{x}`` is the
#: input, the answer follows after a space. Tasks without one are not tested in words.
TEMPLATES = {
    "en_es": "The word '{x}' in Spanish is",
    "en_fr": "The word '{x}' in French is",
    "es_en": "The Spanish word '{x}' in English is",
    "fr_en": "The French word '{x}' in English is",
    "antonyms": "The opposite of '{x}' is",
    "country_capital": "The capital of {x} is",
    "location_continent": "{x} is on the continent of",
    "present_past": "The past tense of '{x}' is",
    "present_gerund": "The -ing form of '{x}' is",
    "plural_singular": "The singular of '{x}' is",
    "next_letter": "In the alphabet, the letter after {x} is",
    "prev_letter": "In the alphabet, the letter before {x} is",
}


@dataclass(frozen=True)
class WordsFormat(PromptFormat):
    """A query in words (:data:`TEMPLATES`, with ``{y}`` appended): the input as it is, the answer after a space."""

    def _x(self, x: str) -> str:
        return x

    def answer(self, y: str) -> str:
        return " " + y


def words_format(task_name: str) -> WordsFormat | None:
    """The task's query in words, or None where :data:`TEMPLATES` has none."""
    template = TEMPLATES.get(task_name)
    return WordsFormat(template=template + "{y}") if template else None


#: The conditions of :func:`in_words`, in the book's order.
WORDS_CONDITIONS = ("words", "words_theta", "words_fv")


def in_words(model: TaskModel, task: Task, protocol: Protocol, layer: int, fv: torch.Tensor, fv_layer: int,
             n_test: int = 25, test: TestPass | None = None) -> pd.DataFrame:
    """The test prompts' queries in words (:func:`words_format`) under :data:`WORDS_CONDITIONS`: alone, with θ of
    the prompt (read in the protocol's format) replacing the state after ``layer``, and with the FV added after
    ``fv_layer``; scored by first token as the main experiment scores. One row per (query, condition); empty
    for a task without a template. ``test``: the test prompts' :func:`test_pass`, if already computed."""
    words = words_format(task.name)
    if words is None:
        return pd.DataFrame(columns=["query", "condition", "correct"])
    test = test or test_pass(model, task, protocol, n_test)
    prompts, theta = test.prompts, test.theta
    texts = [words.query(p.query.input) for p in prompts]
    fvs = torch.zeros(len(prompts), model.n_layers, model.d_model)
    fvs[:, fv_layer] = fv
    ids = {"words": mechanism.next_tokens(model, texts, protocol.batch_size, "heads words"),
           "words_theta": mechanism.patched_next_tokens(model, texts, theta, [layer], protocol.patch_batch_size,
                                                        "heads words θ")[0],
           "words_fv": mechanism.patched_next_tokens(model, texts, fvs, [fv_layer], protocol.patch_batch_size,
                                                     "heads words fv", add=True)[0]}
    score = Scorer(task, model.tokenizer, words, protocol.prefix_rule)
    examples = [p.query for p in prompts]
    rows = [{"query": i, "condition": condition, "correct": bool(ok)}
            for condition in WORDS_CONDITIONS for i, ok in enumerate(score(ids[condition].tolist(), examples))]
    return pd.DataFrame(rows, columns=["query", "condition", "correct"])


# --- the function vector beside θ, one task, cached ------------------------------------------------------

class FvSizes(Settings):
    """How the function vector is chosen and tested per task (Todd et al. sweep the layer; k = 10 heads)."""

    ks: list[Count] = Field([1, 3, 5, 10], min_length=1, description="top-k heads summed into the function "
                                                                     "vector, each tried on dev queries")
    n_fv_dev: Count = Field(20, description="dev queries k and the FV's layer are chosen on")
    n_fv_test: Count = Field(25, description="test prompts the conditions are compared on")
    n_ablate: Count = Field(10, description="top heads set to their shuffled-label means while θ is read")


@dataclass
class FvTaskResult:
    """One task: the FV's dev sweep, the chosen (k, layer), the conditions on the test queries and the cosine
    of the FV with θ minus the query-only state."""

    dev: pd.DataFrame  #: fv_dev_sweep's rows
    side: pd.DataFrame  #: side_by_side's rows
    k: int
    fv_layer: int
    cosine: float
    words: pd.DataFrame  #: in_words' rows (none for a task without a template)

    def save(self, folder: Path) -> None:
        write_records(folder / "dev.jsonl", self.dev)
        write_records(folder / "side.jsonl", self.side)
        write_records(folder / "words.jsonl", self.words)
        write_json(folder / "fv.json", {"k": self.k, "fv_layer": self.fv_layer, "cosine": self.cosine})

    @classmethod
    def load(cls, folder: Path) -> "FvTaskResult":
        chosen = read_json(folder / "fv.json")
        words = read_records(folder / "words.jsonl")
        return cls(read_records(folder / "dev.jsonl"), read_records(folder / "side.jsonl"), int(chosen["k"]),
                   int(chosen["fv_layer"]), float(chosen["cosine"]),
                   words if len(words) else pd.DataFrame(columns=["query", "condition", "correct"]))


#: The function vector beside θ in the cache: one entry per (model, task, protocol, layer, heads, sizes).
HEADS_FV = Study("heads_fv", FvTaskResult, ("studies/heads.py",))


def task_fv(model: TaskModel, task: Task, protocol: Protocol, layer: int, heads: HeadsTaskResult,
            ranking: Sequence[tuple[int, int]], sizes: FvSizes) -> FvTaskResult:
    """The FV of ``task`` from its own mean head outputs (``heads``) over the model's top heads (``ranking``,
    the average indirect effect's order): k and the layer chosen on dev queries (not the test queries), then
    every condition of :data:`CONDITIONS` on the test prompts with θ at ``layer``, the top
    ``sizes.n_ablate`` heads set to their shuffled-label means for the ablated Hypothesis (and as many other
    heads, drawn seeded from the rest, for its control), the cosine, and the test queries in words."""
    try:
        prompts = heads_test_prompts(task, protocol, model.tokenizer, sizes.n_fv_test)
    except TooFewExamples as error:
        raise Skip(str(error)) from None
    ks = sorted({k for k in sizes.ks if k <= len(ranking)})
    if not ks:
        raise ValueError(f"no k in {list(sizes.ks)} fits the {len(ranking)} ranked heads")
    vectors = {k: function_vector(model, heads.means, ranking[:k]) for k in ks}
    dev = fv_dev_sweep(model, task, protocol, vectors, sizes.n_fv_dev, exclude=[p.query.input for p in prompts])
    k, fv_layer = choose_fv(dev)
    top = list(ranking[:sizes.n_ablate])
    others = [(l, h) for l, layer_means in enumerate(heads.corrupt_means) for h in range(layer_means.shape[0])
              if (l, h) not in top]
    other = random.Random(f"heads-control:{protocol.seed}:{task.name}").sample(others, min(len(top), len(others)))
    test = test_pass(model, task, protocol, sizes.n_fv_test)  # θ of the test prompts, read once for all three
    side = side_by_side(model, task, protocol, layer, vectors[k], fv_layer, sizes.n_fv_test,
                        _set_to(top, heads.corrupt_means), _set_to(other, heads.corrupt_means), test)
    cosine = theta_fv_cosine(model, task, protocol, layer, vectors[k], test=test)
    words = in_words(model, task, protocol, layer, vectors[k], fv_layer, test=test)
    return FvTaskResult(dev, side, k, fv_layer, cosine, words)


def _set_to(heads: Sequence[tuple[int, int]], means: Sequence[torch.Tensor]) -> dict[int, tuple[list[int], torch.Tensor]]:
    """``heads`` set to their ``means``, grouped by layer as :func:`taskvec.mechanism.task_vectors` takes them."""
    out: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for layer, head in sorted(heads):
        out.setdefault(layer, ([], []))
        out[layer][0].append(head)
        out[layer][1].append(means[layer][head])
    return {layer: (ids, torch.stack(values)) for layer, (ids, values) in out.items()}


@dataclass
class HeadsRun:
    """The heads study on one model: per task its heads and its FV beside θ, the model's ranking of heads
    (over the tasks it does in context) and the seconds each task's computation took."""

    heads: dict[str, HeadsTaskResult]
    fv: dict[str, FvTaskResult]
    ranking: list[tuple[int, int]]
    does_icl: dict[str, bool]
    ranked_on: list[str]  #: the tasks the ranking averages over: those done in context, or all if none is
    layers: dict[str, int]
    seconds: dict[str, float]


#: Regular accuracy over the heads' in-context prompts above which a task counts as done in context.
DOES_ICL = 0.5


def run_all(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol, layers: Mapping[str, int],
            sizes: HeadSizes = HeadSizes(), fv_sizes: FvSizes = FvSizes(), store: Store | None = None,
            loader=load_model, remote: bool | str = False, progress: bool = True) -> HeadsRun:
    """:func:`run` for every task, the ranking of heads by the average indirect effect over the tasks done in
    context (Regular above :data:`DOES_ICL`; over all tasks when the model does none, ``ranked_on`` says
    which), then :func:`task_fv` for every task at its θ layer
    ``layers[task]``, each cached."""
    missing = [t.name for t in tasks if t.name not in layers]
    if missing:
        raise SettingError(f"no layer given for task(s) {', '.join(missing)}")
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    heads, seconds = _heads_per_task(ref, tasks, protocol, sizes, store, progress)
    if not heads:
        raise SettingError(f"the heads study ran no task on {ref.name}: every task was skipped")
    does_icl = {name: sum(r.regular) / len(r.regular) > DOES_ICL for name, r in heads.items()}
    ranked_on = [name for name in heads if does_icl[name]] or list(heads)
    aie = average_indirect_effect({name: r.effect.mean(dim=0) for name, r in heads.items()},
                                  {name: name in ranked_on for name in heads})
    ranking = top_heads(aie, min(aie.numel(), max(max(fv_sizes.ks), fv_sizes.n_ablate)))
    fv = {}
    for task in tasks:
        if task.name not in heads:
            continue
        layer = int(layers[task.name])
        outcome = cached(HEADS_FV, ref, task.name,
                         lambda m, task=task, layer=layer: task_fv(m, task, protocol, layer, heads[task.name], ranking,
                                                                  fv_sizes),
                         store, task=task.identity(), protocol=protocol, layer=layer, sizes=sizes, fv_sizes=fv_sizes,
                         ranking=[list(h) for h in ranking])
        if not outcome.skipped:
            fv[task.name] = outcome.result
            seconds[task.name] = seconds.get(task.name, 0.0) + outcome.seconds
    return HeadsRun(heads, fv, ranking, does_icl, ranked_on, {t: int(layers[t]) for t in heads}, seconds)


# --- tables for the page ------------------------------------------------------------------------------------

def effect_table(result: HeadsRun) -> pd.DataFrame:
    """One row per (task, layer, head): the mean indirect effect over the task's shuffled-label prompts, and
    rows of task "average" for the average the ranking is over (``ranked_on``)."""
    rows = []
    for name, r in result.heads.items():
        mean = r.effect.mean(dim=0)
        rows += [{"task": name, "layer": l, "head": h, "effect": float(mean[l, h])}
                 for l in range(mean.shape[0]) for h in range(mean.shape[1])]
    aie = average_indirect_effect({n: r.effect.mean(dim=0) for n, r in result.heads.items()},
                                  {n: n in result.ranked_on for n in result.heads})
    rows += [{"task": "average", "layer": l, "head": h, "effect": float(aie[l, h])}
             for l in range(aie.shape[0]) for h in range(aie.shape[1])]
    return pd.DataFrame(rows, columns=["task", "layer", "head", "effect"])


def _rows(result: HeadsRun, part: str) -> pd.DataFrame:
    """Every task's rows of ``part`` ("side": :func:`side_by_side`, "words": :func:`in_words`), with a task column."""
    frames = [getattr(r, part).assign(task=name) for name, r in result.fv.items() if len(getattr(r, part))]
    if not frames:
        return pd.DataFrame(columns=["query", "condition", "correct", "task"])
    return pd.concat(frames, ignore_index=True)


def conditions_table(result: HeadsRun, part: str = "side") -> pd.DataFrame:
    """Per task and condition (and "all" tasks pooled): n, accuracy and its Wilson interval."""
    side = _rows(result, part)
    pooled = side.assign(task="all")
    return stats.task_intervals(pd.concat([side, pooled], ignore_index=True))


def paired(result: HeadsRun, a: str, b: str, part: str = "side") -> dict:
    """McNemar's exact test of conditions ``a`` and ``b`` on the same test queries, pooled over tasks (each
    (task, query) one pair), with both accuracies: n, a_only, b_only, difference, p_value, a, b."""
    side = _rows(result, part)
    if side.empty:
        return {"n": 0, "a_only": 0, "b_only": 0, "difference": float("nan"), "p_value": 1.0, "a": float("nan"),
                "b": float("nan")}
    wide = side.pivot_table(index=["task", "query"], columns="condition", values="correct", aggfunc="first")
    test = stats.mcnemar(wide[a].to_numpy(bool), wide[b].to_numpy(bool))
    return {**test, "a": float(wide[a].mean()), "b": float(wide[b].mean())}
