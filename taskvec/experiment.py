"""The paper's main experiment (Fig. 3, Fig. 4, Table 6) as one call.

Per task: choose the layer ``L`` with the best Hypothesis accuracy on dev prompts
(a sweep over every layer), then score three conditions on held-out prompts:
Regular (demonstrations + query), Hypothesis (θ from the prompt's own
demonstrations and dummy queries, patched at ``L`` into the query alone) and
Baseline (the query alone). Results are tidy pandas tables.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm  # not tqdm.auto: no widget warning inside notebooks

from . import mechanism
from .errors import SettingError
from .models import TaskModel, load_model
from .prompts import FewShotPrompt, sample_prompts, sample_queries
from .remote import is_remote as remote_is_remote
from .scoring import Scorer, choose_layer, is_saturated, single_token_examples
from .settings import Protocol
from .store import Store, read_json, read_records, write_json, write_records
from .study import ModelRef, Skip, Skipped, Study, cached, key_of
from .tasks import Task


def usable_counts(tasks: Sequence[Task], tokenizer, protocol: "Protocol | None" = None) -> pd.DataFrame:
    """Per task: examples in the file, the format the protocol writes it in for this tokenizer
    (:meth:`Protocol.format_for`), and the examples usable so written, bare and spaced."""
    protocol = protocol or Protocol()
    bare = protocol.format
    spaced = replace(bare, space=True)
    rows = []
    for task in tasks:
        fmt = protocol.format_for(task, tokenizer)
        rows.append({"task": task.name, "category": task.category, "compare": task.compare,
                     "n_examples": len(task), "format": fmt.name,
                     "n_usable": len(single_token_examples(task, tokenizer, fmt)),
                     "n_usable_bare": len(single_token_examples(task, tokenizer, bare)),
                     "n_usable_spaced": len(single_token_examples(task, tokenizer, spaced))})
    return pd.DataFrame(rows)


@dataclass
class PromptSet:
    """The prompts of one task: dev (choose L), test (Regular, Hypothesis), baseline (query only)."""

    dev: list[FewShotPrompt]
    test: list[FewShotPrompt]
    baseline: list[FewShotPrompt]

    @classmethod
    def sample(cls, task: Task, protocol: Protocol) -> "PromptSet":
        p = protocol
        return cls(
            dev=sample_prompts(task, p.n_dev, p.n_shots, p.seed, "dev", p.n_dummies),
            test=sample_prompts(task, p.n_test, p.n_shots, p.seed, "test", p.n_dummies),
            baseline=sample_queries(task, p.n_baseline, p.seed, "baseline"),
        )

    def as_dict(self) -> dict[str, list[FewShotPrompt]]:
        return {"dev": self.dev, "test": self.test, "baseline": self.baseline}


@dataclass
class TaskResult:
    """One task of the main experiment: its layer, dev curve, accuracies, predictions and test θ."""

    task: str
    best_layer: int
    dev_accuracy: list[float]  # per layer
    regular_acc: float
    hypothesis_acc: float
    baseline_acc: float
    predictions: pd.DataFrame
    test_vectors: torch.Tensor  # (n_test, n_layers, d_model), CPU float32
    seconds: float
    format: str = "bare"  # how the task was written: "bare" or "spaced" (PromptFormat.name)
    n_usable: int = 0  # examples usable with this tokenizer (single-token answers for exact tasks)
    shown_outputs: list[str] = field(default_factory=list)  # answers the test prompts show as demonstrations

    _FIELDS = ("task", "best_layer", "dev_accuracy", "regular_acc", "hypothesis_acc", "baseline_acc", "seconds",
               "format", "n_usable", "shown_outputs")

    def save(self, folder: Path) -> None:
        write_json(folder / "result.json", {k: getattr(self, k) for k in self._FIELDS})
        write_records(folder / "predictions.jsonl", self.predictions)
        save_file({"test_vectors": self.test_vectors.contiguous()}, folder / "test_vectors.safetensors")

    @classmethod
    def load(cls, folder: Path) -> "TaskResult":
        fields_ = read_json(folder / "result.json")
        predictions = read_records(folder / "predictions.jsonl")
        vectors = load_file(folder / "test_vectors.safetensors")["test_vectors"]
        return cls(**fields_, predictions=predictions, test_vectors=vectors)


#: The main experiment in the cache: one entry per (model, task, protocol, prompts).
MAIN = Study("main", TaskResult)


def run_task(model: TaskModel, task: Task, protocol: Protocol, prompts: PromptSet | None = None,
             on_phase=None, fmt=None, n_usable: int = 0) -> TaskResult:
    """Choose L on dev prompts and score Baseline / Hypothesis / Regular on held-out prompts.

    ``fmt``: how the task is written; default :meth:`Protocol.format_for` of ``task`` (decide it
    on the whole task, before any single-token filtering, as :func:`run_main_experiment` does).
    """
    start = time.perf_counter()
    p = protocol
    fmt = fmt or protocol.format_for(task, model.tokenizer)
    prompts = prompts or PromptSet.sample(task, protocol)
    phase = on_phase or (lambda name: None)

    phase("dev: extract θ")
    dev_vectors = mechanism.task_vectors(model, [q.dummy_texts(fmt) for q in prompts.dev], p.batch_size, "dev extract")
    phase("dev: layer sweep")
    sweep = mechanism.patched_next_tokens(
        model, [q.query_text(fmt) for q in prompts.dev], dev_vectors, range(model.n_layers), p.patch_batch_size, "dev sweep")
    score = Scorer(task, model.tokenizer, fmt, p.prefix_rule)
    dev_queries = [q.query for q in prompts.dev]
    dev_correct = torch.tensor([score(sweep[layer].tolist(), dev_queries) for layer in range(model.n_layers)],
                               dtype=torch.float32)
    dev_accuracy = dev_correct.mean(dim=1).tolist()
    best_layer = choose_layer(dev_accuracy)

    phase("test: extract θ, regular")
    # The dummy prompts and the Regular prompt share their demonstrations: one pass gives θ and Regular.
    test_vectors, reg_ids = mechanism.task_vectors_and_answers(
        model, [q.dummy_texts(fmt) for q in prompts.test], [q.regular_text(fmt) for q in prompts.test], p.batch_size,
        "test extract + regular")
    phase("test: hypothesis")
    hyp_ids = mechanism.patched_next_tokens(
        model, [q.query_text(fmt) for q in prompts.test], test_vectors, [best_layer], p.patch_batch_size, "hypothesis")[0]
    phase("baseline")
    base_ids = mechanism.next_tokens(model, [q.query_text(fmt) for q in prompts.baseline], p.batch_size, "baseline")

    rows = []
    for condition, ids, group in (("hypothesis", hyp_ids, prompts.test), ("regular", reg_ids, prompts.test),
                                  ("baseline", base_ids, prompts.baseline)):
        texts, tokens, queries = score.decode(ids), ids.tolist(), [q.query for q in group]
        by_rule = score.by_rule(tokens, queries)
        for i, prompt in enumerate(group):
            rows.append({"task": task.name, "condition": condition, "prompt": i, "query": prompt.query.input,
                         "expected": prompt.query.output, "predicted": texts[i], "token_id": tokens[i],
                         "correct": by_rule[p.prefix_rule][i], "correct_first_token": by_rule["first_token"][i],
                         "correct_lenient": by_rule["lenient"][i]})
    predictions = pd.DataFrame(rows)
    acc = predictions.groupby("condition")["correct"].mean()
    return TaskResult(
        task=task.name, best_layer=best_layer, dev_accuracy=dev_accuracy,
        regular_acc=float(acc["regular"]), hypothesis_acc=float(acc["hypothesis"]),
        baseline_acc=float(acc["baseline"]), predictions=predictions, test_vectors=test_vectors,
        seconds=time.perf_counter() - start, format=fmt.name, n_usable=n_usable,
        shown_outputs=sorted({d.output for q in prompts.test for d in q.demonstrations}),
    )


@dataclass
class MainResult:
    """Tidy tables of the main experiment.

    ``accuracy``: one row per task (task, category, n_usable, best_layer, baseline_acc,
    hypothesis_acc, regular_acc, saturated, seconds). ``dev_curve``: one row per task and layer
    (task, layer, relative_depth, dev_acc, saturated). ``saturated`` marks tasks the query alone
    already does (see :func:`is_saturated`): their best layer is not evidence of where θ lives. ``predictions``: one row per scored prompt.
    ``task_vectors``: task -> (n_test, n_layers, d_model) θ of the test prompts. ``shown_outputs``: task ->
    the answers those prompts show as demonstrations.
    """

    accuracy: pd.DataFrame
    dev_curve: pd.DataFrame
    predictions: pd.DataFrame
    task_vectors: dict[str, torch.Tensor]
    model: str
    n_layers: int
    protocol: Protocol
    meta: dict = field(default_factory=dict)
    shown_outputs: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> pd.Series:
        """Mean accuracy over tasks per condition (the paper's Table 6 averages); skipped tasks are left out."""
        return self.accuracy[["baseline_acc", "hypothesis_acc", "regular_acc"]].mean()


def _key_parts(task: Task, protocol: Protocol, prompts: PromptSet | None) -> dict:
    return {"task": task.identity(), "protocol": protocol,
            "prompts": None if prompts is None else {k: [p.to_json() for p in v] for k, v in prompts.as_dict().items()}}


def main_keys(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol,
              prompts: dict[str, PromptSet] | None = None, remote: bool | str = False) -> dict[str, str]:
    """Cache key of each task's result for a loaded model, or for a model name as
    ``load_model(name, dtype=protocol.dtype, remote=remote)`` would load it, without loading anything:
    model weights, device type and dtype (or NDIF host), task data, protocol, prompts, code."""
    ref = ModelRef(model, dtype=protocol.dtype, remote=remote)
    prompts = prompts or {}
    return {t.name: key_of(MAIN, ref, **_key_parts(t, protocol, prompts.get(t.name))) for t in tasks}


def _skipped_row(task: Task, n_usable: int, fmt_name: str) -> dict:
    return {"task": task.name, "category": task.category, "n_examples": len(task), "n_usable": n_usable,
            "best_layer": -1, "baseline_acc": math.nan, "hypothesis_acc": math.nan, "regular_acc": math.nan,
            "saturated": False, "seconds": 0.0, "format": fmt_name}


def run_main_experiment(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol | None = None,
                        prompts: dict[str, PromptSet] | None = None, progress: bool = True,
                        store: Store | None = None, loader=load_model, remote: bool | str = False) -> MainResult:
    """Run the main experiment on ``tasks``; ``prompts`` (task name -> PromptSet) overrides sampling.

    With a ``store``, each task's result is read from the cache when its key (see
    :func:`main_keys`) is there and written to it when computed; ``model`` may then be
    a name, loaded (with ``loader``) only if some task is missing, so a warm rerun loads no weights.
    ``remote`` says, for a model given by name, that ``loader`` will return it served by NDIF
    (True or a host URL): its results are then keyed on the host, not on a device and dtype.

    With ``protocol.single_token`` (the default) exact-match tasks are first
    restricted to examples whose answer is one token for this model's tokenizer; a
    task left with too few examples for one prompt is skipped with a warning (NaN row,
    ``best_layer`` -1), and the skip is cached like a result.
    """
    protocol = protocol or Protocol()
    need = protocol.n_shots + 1 + protocol.n_dummies
    prompts = prompts or {}
    ref = ModelRef(model, loader, dtype=protocol.dtype, remote=remote)
    if ref.loaded is not None and protocol.dtype and not remote_is_remote(ref.loaded.remote) \
            and ref.loaded.placement[1] != protocol.dtype:
        raise SettingError(f"the protocol asks for {protocol.dtype} weights, {ref.name} is loaded in "
                           f"{ref.loaded.placement[1]}")
    acc_rows, curve_rows, preds, vectors, cached_tasks = [], [], [], {}, []
    shown: dict[str, list[str]] = {}
    n_layers = None
    bar = tqdm(tasks, desc=f"main experiment ({ref.name})", unit="task", disable=not progress)
    for task in bar:
        task_prompts = prompts.get(task.name)

        def compute(loaded: TaskModel, task=task, task_prompts=task_prompts) -> TaskResult:
            # Each task's format is decided on the whole task (Protocol.format_for), then filtered in it.
            fmt, usable = protocol.usable(task, loaded.tokenizer)
            if task_prompts is None and len(usable) < need:
                warnings.warn(f"skipping task {task.name!r}: {len(usable)} usable examples for this tokenizer, "
                              f"a prompt needs {need}", stacklevel=4)
                raise Skip(f"{len(usable)} usable examples, a prompt needs {need}", n_usable=len(usable),
                           format=fmt.name)
            return run_task(loaded, usable, protocol, task_prompts, fmt=fmt, n_usable=len(usable),
                            on_phase=lambda phase: bar.set_postfix_str(f"{task.name}: {phase}"))

        outcome = cached(MAIN, ref, task.name, compute, store, **_key_parts(task, protocol, task_prompts))
        if outcome.from_cache:
            cached_tasks.append(task.name)
        if isinstance(outcome.result, Skipped):
            info = outcome.result.info
            acc_rows.append(_skipped_row(task, info.get("n_usable", 0), info.get("format", protocol.format.name)))
            continue
        result: TaskResult = outcome.result
        n_layers = len(result.dev_accuracy)
        saturated = is_saturated(result.baseline_acc, result.regular_acc)
        acc_rows.append({
            "task": task.name, "category": task.category, "n_examples": len(task), "n_usable": result.n_usable,
            "best_layer": result.best_layer, "baseline_acc": result.baseline_acc,
            "hypothesis_acc": result.hypothesis_acc, "regular_acc": result.regular_acc,
            "saturated": saturated, "seconds": round(result.seconds, 2), "format": result.format,
        })
        for layer, value in enumerate(result.dev_accuracy):
            curve_rows.append({"task": task.name, "layer": layer, "relative_depth": layer / max(n_layers - 1, 1),
                               "dev_acc": value, "saturated": saturated})
        preds.append(result.predictions)
        vectors[task.name] = result.test_vectors
        shown[task.name] = result.shown_outputs
    meta = {"weights_sha256": ref.identity()["weights"], "cached_tasks": sorted(cached_tasks),
            "protocol": protocol.as_dict()}
    if ref.loaded is not None:
        meta.update(ref.loaded.info)
        n_layers = ref.loaded.n_layers
    return MainResult(
        accuracy=pd.DataFrame(acc_rows), dev_curve=pd.DataFrame(curve_rows),
        predictions=pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(),
        task_vectors=vectors, model=ref.name, n_layers=n_layers or 0, protocol=protocol, meta=meta,
        shown_outputs=shown,
    )
