"""One call per result, for the book's section notebooks; everything heavy goes through the cache.

Each function takes the notebook's parameters and returns tidy tables. Results shared
between sections (the main experiment's θ and accuracies per model) are computed once
and read back from the :class:`~taskvec.store.Store`; models are loaded only when
something is missing from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pandas as pd

from . import analysis
from .errors import SettingError
from .experiment import MainResult, Protocol, run_main_experiment
from .models import TaskModel, load_model
from .store import ANALYSIS_MODULES, Store, make_key, model_fingerprint
from .tasks import load_task, load_tasks

PROTOCOL_FIELDS = {f.name for f in fields(Protocol)}


def protocol_from(params: dict) -> Protocol:
    """A :class:`Protocol` from a notebook's parameters (unknown protocol keys are an error)."""
    unknown = set(params) - PROTOCOL_FIELDS
    if unknown:
        raise SettingError(f"unknown protocol setting(s): {', '.join(sorted(unknown))}")
    return Protocol(**params)


def store_for(cache_dir: str | None) -> Store:
    return Store(Path(cache_dir) if cache_dir else None)


@lru_cache(maxsize=4)
def _model(name: str) -> TaskModel:
    return load_model(name)


def model(name: str) -> TaskModel:
    """The loaded model, shared by all calls in one process (a notebook)."""
    return _model(name)


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A list of names from a list, or from one string (comma-separated), as ``papermill -p`` passes them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def main_results(models: str | Sequence[str], tasks: str | Sequence[str] | None, protocol: Protocol,
                 cache_dir: str | None = None, progress: bool = True) -> dict[str, MainResult]:
    """The main experiment per model (cached per task); ``tasks`` empty or None means all 18.

    ``models`` and ``tasks`` may be lists or comma-separated strings.
    """
    models, tasks = as_list(models), as_list(tasks)
    task_list = load_tasks(tasks or None)
    store = store_for(cache_dir)
    # The model loads only if a task is missing from the cache, through the notebook-wide model()
    # so later sections (dominance, interpretation) reuse it.
    return {name: run_main_experiment(name, task_list, protocol, progress=progress, store=store, loader=model)
            for name in models}


def accuracy_table(results: dict[str, MainResult]) -> pd.DataFrame:
    """Per model and task: baseline_acc, hypothesis_acc, regular_acc, best_layer, n_usable."""
    return pd.concat([r.accuracy.assign(model=m) for m, r in results.items()], ignore_index=True)


def dev_curves(results: dict[str, MainResult]) -> pd.DataFrame:
    """Per model, task and layer: dev accuracy, with layer and relative depth."""
    return pd.concat([r.dev_curve.assign(model=m, n_layers=r.n_layers) for m, r in results.items()],
                     ignore_index=True)


def averages(results: dict[str, MainResult]) -> pd.DataFrame:
    """Per model: mean Baseline / Hypothesis / Regular over the tasks that ran, and tasks counted."""
    rows = []
    for name, result in results.items():
        acc = result.accuracy.dropna(subset=["hypothesis_acc"])
        rows.append({"model": name, "n_tasks": len(acc), "baseline_acc": acc["baseline_acc"].mean(),
                     "hypothesis_acc": acc["hypothesis_acc"].mean(), "regular_acc": acc["regular_acc"].mean()})
    table = pd.DataFrame(rows)
    table["hypothesis_over_regular"] = table["hypothesis_acc"] / table["regular_acc"]
    return table


def geometry(result: MainResult, seed: int = 41, perplexity: float = 30.0) -> dict:
    """t-SNE points, pairwise cosine distances and the silhouette score at the median best layer."""
    layer = analysis.common_layer(result.accuracy["best_layer"])
    vectors = {t: v for t, v in result.task_vectors.items() if v.shape[0] > 1}
    categories = result.accuracy.set_index("task")["category"]
    points = analysis.tsne_embedding(vectors, layer, seed, perplexity)
    points["category"] = points["task"].map(categories)
    distances = analysis.cosine_distances(vectors, layer)
    summary = distances.groupby("pair")["distance"].agg(["mean", "median", "count"]).reset_index()
    return {"layer": layer, "points": points, "distances": distances, "distance_summary": summary,
            "silhouette": analysis.cluster_quality(vectors, layer)}


def dominance(name: str, result: MainResult, protocol: Protocol, pairs: Sequence[Sequence[str]],
              n_prompts: int, n_shots: int, cache_dir: str | None = None) -> pd.DataFrame:
    """The conflicting-tasks table for ``pairs`` (task A, task B) on model ``name``, cached.

    θ_B is patched at task B's best dev layer from the main experiment.
    """
    store = store_for(cache_dir)
    best = result.accuracy.set_index("task")["best_layer"]
    frames = []
    for a_name, b_name in pairs:
        if best.get(b_name, -1) < 0:
            raise SettingError(f"dominance pair ({a_name}, {b_name}): task {b_name!r} has no best layer "
                               "in the main experiment (add it to the profile's tasks)")
        task_a, task_b = load_task(a_name), load_task(b_name)
        layer = int(best[b_name])
        key = make_key(ANALYSIS_MODULES, kind="dominance", model=name, weights=model_fingerprint(name),
                       a=task_a.identity(), b=task_b.identity(), layer=layer, protocol=protocol,
                       n_prompts=n_prompts, n_shots=n_shots)
        folder = store.path("dominance", name, key)
        if not store.has("dominance", name, key):
            table = analysis.conflicting_tasks(model(name), task_a, task_b, layer, protocol, n_prompts, n_shots)
            folder = store.save("dominance", name, key, lambda f, t=table: t.to_csv(f / "table.csv", index=False))
        frames.append(pd.read_csv(folder / "table.csv"))
    return pd.concat(frames, ignore_index=True)


def interpretation(name: str, result: MainResult, top_k: int, cache_dir: str | None = None) -> pd.DataFrame:
    """Top tokens of each task's mean θ at its best layer (cached)."""
    store = store_for(cache_dir)
    layers = result.accuracy.set_index("task")["best_layer"].to_dict()
    key = make_key(ANALYSIS_MODULES, kind="interpretation", model=name, weights=model_fingerprint(name), layers=layers, k=top_k,
                   vectors={t: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                            for t, v in result.task_vectors.items()})
    folder = store.path("interpretation", name, key)
    if not store.has("interpretation", name, key):
        table = analysis.task_vector_tokens(model(name), result.task_vectors, layers, top_k)
        folder = store.save("interpretation", name, key,
                            lambda f: table.to_json(f / "tokens.json", orient="records", force_ascii=False))
    return pd.DataFrame(json.loads((folder / "tokens.json").read_text()))


def layer_peaks(curves: pd.DataFrame) -> pd.DataFrame:
    """Per model: the layer with the best mean dev accuracy over tasks, its relative depth and accuracy,
    and the mean accuracy at the first and last layers (``edge_acc``)."""
    rows = []
    for name, group in curves.groupby("model", sort=False):
        mean = group.groupby("layer")["dev_acc"].mean()
        peak = int(mean.idxmax())
        n_layers = int(group["n_layers"].iloc[0])
        rows.append({"model": name, "n_layers": n_layers, "n_tasks": group["task"].nunique(), "peak_layer": peak,
                     "peak_depth": peak / max(n_layers - 1, 1), "peak_acc": float(mean.max()),
                     "edge_acc": float((mean.iloc[0] + mean.iloc[-1]) / 2)})
    return pd.DataFrame(rows)


def answer_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per task: top tokens of θ that begin one of the task's answers (see analysis.answer_tokens)."""
    names = list(dict.fromkeys(tokens["task"]))
    return analysis.answer_tokens(tokens, {t.name: t for t in load_tasks(names)})
