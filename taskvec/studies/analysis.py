"""The paper's analyses beyond accuracy: geometry of θ, dominance of θ, and what θ says in words.

- Geometry (Fig. 5, Fig. 9): task vectors from different demonstrations and dummy
  queries cluster by task; within-task cosine distances are far below between-task ones.
- Dominance (Table 2): with demonstrations of task A in the prompt and θ of task B
  patched in, the model follows B.
- Interpretation (Table 3): the mean θ of a task, read through the final norm and the
  unembedding, puts task words among its top tokens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import mechanism
from ..errors import SettingError
from ..models import TaskModel
from ..prompts import sample_prompts
from ..scoring import Scorer, choose_layer, single_token_examples
from ..settings import Protocol
from ..store import read_json
from ..study import Study
from ..tasks import Example, Task


def common_layer(best_layers: pd.Series, saturated: pd.Series | None = None) -> int:
    """One layer for analyses across tasks: the median of the tasks' best dev layers.

    Skipped tasks (layer -1) are ignored, and so are saturated ones (``saturated`` aligned with
    ``best_layers``, True where the query alone does the task): their dev curve is flat, so their
    best layer is arbitrary. If every task is saturated, all non-skipped tasks count.
    """
    valid = best_layers[best_layers >= 0]
    if saturated is not None:
        informative = valid[~saturated.reindex(valid.index).fillna(False).astype(bool)]
        valid = informative if not informative.empty else valid
    if valid.empty:
        raise SettingError("no task has a best layer (all skipped?)")
    return int(np.median(valid))


def _stack(vectors: dict[str, torch.Tensor], layer: int) -> tuple[np.ndarray, np.ndarray]:
    names, rows = [], []
    for task, tensor in vectors.items():
        rows.append(tensor[:, layer, :].float().numpy())
        names += [task] * tensor.shape[0]
    return np.concatenate(rows), np.array(names)


def tsne_embedding(vectors: dict[str, torch.Tensor], layer: int, seed: int = 41, perplexity: float = 30.0) -> pd.DataFrame:
    """2-D t-SNE of every task vector at ``layer`` (cosine metric): columns task, x, y.

    ``vectors``: task -> (n, n_layers, d_model), e.g. ``MainResult.task_vectors``.
    """
    X, names = _stack(vectors, layer)
    perplexity = min(perplexity, max(2.0, (len(X) - 1) / 3))  # t-SNE needs perplexity < n_samples
    xy = TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(X)
    return pd.DataFrame({"task": names, "x": xy[:, 0], "y": xy[:, 1]})


def cosine_distances(vectors: dict[str, torch.Tensor], layer: int) -> pd.DataFrame:
    """Cosine distance of every pair of task vectors at ``layer``: columns task_a, task_b, pair, distance.

    ``pair`` is "within" (same task) or "between" (different tasks).
    """
    X, names = _stack(vectors, layer)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    i, j = np.triu_indices(len(X), k=1)
    return pd.DataFrame({"task_a": names[i], "task_b": names[j],
                         "pair": np.where(names[i] == names[j], "within", "between"), "distance": dist[i, j]})


def cluster_quality(vectors: dict[str, torch.Tensor], layer: int) -> float:
    """Silhouette score of the task labels under cosine distance, in [-1, 1] (1: tight, separate clusters)."""
    X, names = _stack(vectors, layer)
    if len(set(names)) < 2:
        raise SettingError("cluster quality needs task vectors of at least two tasks")
    return float(silhouette_score(X, names, metric="cosine"))


# --- dominance: conflicting tasks ---------------------------------------------------

#: The paper's Table 2 pairs: demonstrations of task A, task vector of task B.
CONFLICT_PAIRS = (
    ("next_letter", "to_upper"),
    ("list_last", "list_first"),
    ("prev_letter", "next_letter"),
    ("present_past", "present_gerund"),
    ("en_es", "en_fr"),
)


def _shared_inputs(a: Task, b: Task) -> tuple[Task, dict[str, Example]]:
    """Task A restricted to inputs that task B also has, and B's examples by input."""
    by_input = {e.input: e for e in b.examples}
    return a.restrict(e for e in a.examples if e.input in by_input), by_input


def conflict_prompts(task_a: Task, task_b: Task, n: int, n_shots: int, seed: int, split: str,
                     n_dummies: int) -> tuple[list, list]:
    """``n`` prompts of A (demonstrations + a query both tasks define) and, for each, a prompt of B to read θ_B.

    B's prompt ``i`` never contains A's query ``i`` (not as a demonstration, query or dummy), so θ_B
    cannot carry the answer to the very query it is patched into.
    """
    shared_a, _ = _shared_inputs(task_a, task_b)
    prompts_a = sample_prompts(shared_a, n, n_shots, seed, f"conflict-{split}-A-{task_b.name}", 0)
    prompts_b = sample_prompts(task_b, n, n_shots, seed, f"conflict-{split}-B-{task_a.name}", n_dummies,
                               exclude=[{p.query.input} for p in prompts_a])
    return prompts_a, prompts_b


#: Columns of conflicting_tasks' table and dev curve.
CONFLICT_COLUMNS = ["task_a", "task_b", "condition", "acc_a", "acc_b", "n", "layer", "n_dev"]
CONFLICT_CURVE_COLUMNS = ["task_a", "task_b", "layer", "acc_a", "acc_b", "b_alone"]
#: The conditions of the table: no patch; θ_B at B's own Hypothesis layer (the paper's rule, the headline);
#: θ_B at the layer tuned in the conflicting setting itself (a sensitivity check).
CONFLICT_CONDITIONS = ("regular", "conflicting", "conflicting_tuned")


def conflicting_tasks(model: TaskModel, task_a: Task, task_b: Task, protocol: Protocol,
                      n_prompts: int = 50, n_shots: int = 4, n_dev: int = 25) -> "PairResult":
    """Table 2 for one pair: accuracy w.r.t. A and B, without (Regular) and with θ_B patched (Conflicting).

    Prompts hold ``n_shots`` demonstrations of A and a query that both tasks define; θ_B comes
    from separate prompts of B (its own demonstrations and dummy queries, never A's query) and is
    patched into the last token of A's full prompt. The layer is the paper's (the original code's
    ``run_overriding_task_vector``): B's own Hypothesis layer, the earliest best layer of θ_B patched into
    B's query-only prompts, on ``n_dev`` dev prompts of B alone. As a sensitivity check the table also
    scores θ_B at the layer tuned in the conflicting setting itself (the earliest best accuracy w.r.t. B on
    ``n_dev`` dev prompts of A with θ_B); the table is scored on ``n_prompts`` held-out test prompts.

    Returns a :class:`PairResult`: ``table`` (one row per condition of :data:`CONFLICT_CONDITIONS`:
    task_a, task_b, condition, acc_a, acc_b, n, layer, n_dev) and ``dev_curve`` (one row per layer: task_a,
    task_b, layer, acc_a and acc_b in the conflicting setting, b_alone: B's own dev accuracy).
    """
    # Both tasks in A's format: θ_B is read from prompts written as A's, and B's answers are
    # scored after A's query line.
    fmt = protocol.format_for(task_a, model.tokenizer)
    if protocol.single_token:
        task_a = single_token_examples(task_a, model.tokenizer, fmt)
        task_b = single_token_examples(task_b, model.tokenizer, fmt)
    _, b_by_input = _shared_inputs(task_a, task_b)
    score_a = Scorer(task_a, model.tokenizer, fmt, protocol.prefix_rule)
    score_b = Scorer(task_b, model.tokenizer, fmt, protocol.prefix_rule)

    def accuracies(ids: torch.Tensor, prompts_a) -> tuple[float, float]:
        ids_list = ids.tolist()
        acc_a = np.mean(score_a(ids_list, [p.query for p in prompts_a]))
        acc_b = np.mean(score_b(ids_list, [b_by_input[p.query.input] for p in prompts_a]))
        return float(acc_a), float(acc_b)

    def theta(prompts_b, phase: str) -> torch.Tensor:
        return mechanism.task_vectors(model, [p.dummy_texts(fmt) for p in prompts_b], protocol.batch_size, phase)

    dev_a, dev_b = conflict_prompts(task_a, task_b, n_dev, n_shots, protocol.seed, "dev", protocol.n_dummies)
    own = sample_prompts(task_b, n_dev, n_shots, protocol.seed, f"conflict-own-B-{task_a.name}", protocol.n_dummies)
    layers = range(model.n_layers)
    own_sweep = mechanism.patched_next_tokens(model, [p.query_text(fmt) for p in own], theta(own, "B alone dev θ"),
                                              layers, protocol.patch_batch_size, "B alone dev sweep")
    b_alone = [float(np.mean(score_b(own_sweep[layer].tolist(), [p.query for p in own]))) for layer in layers]
    sweep = mechanism.patched_next_tokens(model, [p.regular_text(fmt) for p in dev_a], theta(dev_b, "conflict dev θ"),
                                          layers, protocol.batch_size, "conflict dev sweep")
    curve = pd.DataFrame([{"task_a": task_a.name, "task_b": task_b.name, "layer": layer,
                           **dict(zip(("acc_a", "acc_b"), accuracies(sweep[layer], dev_a))), "b_alone": b_alone[layer]}
                          for layer in layers], columns=CONFLICT_CURVE_COLUMNS)
    layer, tuned = choose_layer(b_alone), choose_layer(curve["acc_b"].tolist())

    test_a, test_b = conflict_prompts(task_a, task_b, n_prompts, n_shots, protocol.seed, "test", protocol.n_dummies)
    texts = [p.regular_text(fmt) for p in test_a]
    regular = mechanism.next_tokens(model, texts, protocol.batch_size, "conflict regular")
    patched = mechanism.patched_next_tokens(model, texts, theta(test_b, "conflict θ"), sorted({layer, tuned}),
                                            protocol.batch_size, "conflict patch")
    at = dict(zip(sorted({layer, tuned}), patched))
    rows = []
    for condition, ids, where in (("regular", regular, layer), ("conflicting", at[layer], layer),
                                  ("conflicting_tuned", at[tuned], tuned)):
        acc_a, acc_b = accuracies(ids, test_a)
        rows.append({"task_a": task_a.name, "task_b": task_b.name, "condition": condition, "acc_a": acc_a,
                     "acc_b": acc_b, "n": len(test_a), "layer": where, "n_dev": n_dev})
    return PairResult(pd.DataFrame(rows, columns=CONFLICT_COLUMNS), curve)


@dataclass
class PairResult:
    """One conflicting pair: ``table`` (one row per condition, :data:`CONFLICT_COLUMNS`) and ``dev_curve``
    (one row per layer, :data:`CONFLICT_CURVE_COLUMNS`)."""

    table: pd.DataFrame
    dev_curve: pd.DataFrame

    def save(self, folder: Path) -> None:
        self.table.to_csv(folder / "table.csv", index=False)
        self.dev_curve.to_csv(folder / "dev_curve.csv", index=False)

    @classmethod
    def load(cls, folder: Path) -> "PairResult":
        return cls(pd.read_csv(folder / "table.csv"), pd.read_csv(folder / "dev_curve.csv"))


#: Dominance in the cache: one entry per (model, pair, protocol, sizes).
DOMINANCE = Study("dominance", PairResult, ("studies/analysis.py",))


# --- interpretation: θ in the vocabulary --------------------------------------------

def _top_tokens(model: TaskModel, logits: torch.Tensor, k: int) -> pd.DataFrame:
    values, ids = logits.topk(k)
    return pd.DataFrame({"rank": range(1, k + 1), "token": [model.tokenizer.decode([int(i)]) for i in ids],
                         "logit": values.numpy()})


def project_to_vocab(model: TaskModel, vector: torch.Tensor, k: int = 20) -> pd.DataFrame:
    """Top-``k`` tokens of a residual-stream vector read through the final norm and the unembedding.

    ``vector``: (d_model,). Returns rank, token, logit. The read-out the model applies after its
    last layer, run through :func:`taskvec.mechanism.vocab_logits` (so on NDIF too).
    """
    return _top_tokens(model, mechanism.vocab_logits(model, vector[None, :])[0], k)


#: What is read out per task (column ``view``): ``mean``, the mean θ of its test prompts at its layer; and
#: ``centered``, that mean minus the mean θ over all tasks at the same layer, so a component every task
#: shares (the one that makes most tasks' top tokens the same) does not hide what is particular to one task.
VIEWS = ("mean", "centered")
TOKEN_COLUMNS = ["task", "layer", "view", "rank", "token", "logit"]


def task_vector_tokens(model: TaskModel, vectors: dict[str, torch.Tensor], layers: dict[str, int],
                       k: int = 20) -> pd.DataFrame:
    """Per task and view (:data:`VIEWS`): the top-``k`` tokens of its θ at its layer. Columns as TOKEN_COLUMNS.

    The mean over tasks that ``centered`` subtracts is taken at each task's own layer, over every task with
    test vectors (those without a layer included). All rows are read out together (one request on NDIF).
    """
    kept = [(task, layers[task]) for task, tensor in vectors.items() if layers[task] >= 0 and tensor.shape[0] > 0]
    if not kept:
        return pd.DataFrame(columns=TOKEN_COLUMNS)
    everyone = [tensor for tensor in vectors.values() if tensor.shape[0] > 0]
    means = torch.stack([vectors[task][:, layer, :].mean(dim=0) for task, layer in kept])
    shared = torch.stack([torch.stack([t[:, layer, :].mean(dim=0) for t in everyone]).mean(dim=0) for _, layer in kept])
    logits = mechanism.vocab_logits(model, torch.cat([means, means - shared]))
    frames = [_top_tokens(model, row, k).assign(task=task, layer=layer, view=view)
              for view, block in zip(VIEWS, logits.split(len(kept))) for (task, layer), row in zip(kept, block)]
    return pd.concat(frames, ignore_index=True)[TOKEN_COLUMNS]


def shared_tokens(tokens: pd.DataFrame, min_share: float = 0.5) -> pd.DataFrame:
    """Per view: tokens in the top list of at least ``min_share`` of the tasks (and of at least two), with
    the number of tasks; the sign of one component that all tasks share. Columns view, token, n_tasks, of."""
    rows = []
    for view, group in tokens.groupby("view", sort=False):
        n = group["task"].nunique()
        counts = group.drop_duplicates(["task", "token"])["token"].value_counts()
        for token, count in counts.items():
            if count >= max(2, min_share * n):
                rows.append({"view": view, "token": token, "n_tasks": int(count), "of": n})
    return pd.DataFrame(rows, columns=["view", "token", "n_tasks", "of"])


def answer_tokens(tokens: pd.DataFrame, tasks: dict[str, Task], shown: dict[str, Sequence[str]] | None = None,
                  min_chars: int = 2) -> pd.DataFrame:
    """Per task (and view when given): how many of θ's top tokens start one of the task's answers (e.g.
    ``Europe``, ``Mus``), and how many of those start none of the outputs ``shown`` as demonstrations in
    the prompts θ was read from (an answer every prompt shows is no evidence that θ names the task).

    ``tokens``: the output of :func:`task_vector_tokens`. A token counts when, stripped, it has at least
    ``min_chars`` characters and some accepted answer of the task starts with it. Returns (view,) task,
    n_top, n_answer_tokens, answer_tokens, n_unshown, unshown_tokens.
    """
    keys = ["view", "task"] if "view" in tokens else ["task"]
    shown = shown or {}
    rows = []
    for key, group in tokens.groupby(keys, sort=False):
        task_name = key[-1] if isinstance(key, tuple) else key
        answers = {out for e in tasks[task_name].examples for out in e.outputs}
        seen = set(shown.get(task_name, ()))
        hits = [t for t in group["token"] if len(t.strip()) >= min_chars and any(a.startswith(t.strip()) for a in answers)]
        unshown = [t for t in hits if not any(out.strip().startswith(t.strip()) for out in seen)]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rows.append({**row, "n_top": len(group), "n_answer_tokens": len(hits),
                     "answer_tokens": " ".join(repr(t) for t in hits), "n_unshown": len(unshown),
                     "unshown_tokens": " ".join(repr(t) for t in unshown)})
    return pd.DataFrame(rows, columns=keys + ["n_top", "n_answer_tokens", "answer_tokens", "n_unshown",
                                              "unshown_tokens"])


@dataclass
class TokensResult:
    """Top tokens of each task's θ, both views (rows as :func:`task_vector_tokens` returns them)."""

    tokens: pd.DataFrame

    def save(self, folder: Path) -> None:
        self.tokens.to_json(folder / "tokens.json", orient="records", force_ascii=False)

    @classmethod
    def load(cls, folder: Path) -> "TokensResult":
        return cls(pd.DataFrame(read_json(folder / "tokens.json")))


#: Interpretation in the cache: one entry per (model, task vectors, layers, k).
INTERPRETATION = Study("interpretation", TokensResult, ("studies/analysis.py",))
