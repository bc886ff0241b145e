"""One call per result, for the book's section notebooks; everything heavy goes through the cache.

Each function takes the notebook's parameters and returns tidy tables. Results shared
between sections (the main experiment's θ and accuracies per model) are computed once
and read back from the :class:`~taskvec.store.Store`; models are loaded only when
something is missing from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pandas as pd

from . import analysis, stats
from ..errors import SettingError, positive_int
from ..experiment import MainResult, Protocol, main_keys, run_main_experiment
from ..models import TaskModel, load_model, placement
from ..prompts import TooFewExamples
from ..remote import is_remote
from ..remote import setting as remote_setting
from ..store import ANALYSIS_MODULES, Store, make_key, model_fingerprint
from ..tasks import load_task, load_tasks

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
def _model(name: str, remote: bool | str, dtype: str | None) -> TaskModel:
    if remote:
        from nnsight import CONFIG

        CONFIG.APP.REMOTE_LOGGING = False  # nnsight's per-request status lines would fill the book's pages
        return load_model(name, remote=remote)
    return load_model(name, dtype=dtype)


def model(name: str, remote: bool | str = False, dtype: str | None = None) -> TaskModel:
    """The loaded model, shared by all calls in one process (a notebook); ``remote``: served by NDIF
    (True or "true" for nnsight's configured host, or a host URL), weights never loaded here;
    ``dtype``: the protocol's (None: the model's default)."""
    return _model(name, remote_setting(remote), dtype)


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A list of names from a list, or from one string (comma-separated), as ``papermill -p`` passes them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def main_results(models: str | Sequence[str], tasks: str | Sequence[str] | None, protocol: Protocol,
                 cache_dir: str | None = None, progress: bool = True,
                 remote: bool | str = False, beside: dict | None = None) -> dict[str, MainResult]:
    """The main experiment per model (cached per task); ``tasks`` empty or None means all 18.

    ``models`` and ``tasks`` may be lists or comma-separated strings; ``remote`` runs them on NDIF.
    ``beside`` adds other runs whose results are already cached (see :func:`beside_runs`), after
    this run's models; they are read, never computed.
    """
    models, tasks, remote = as_list(models), as_list(tasks), remote_setting(remote)
    task_list = load_tasks(tasks or None)
    store = store_for(cache_dir)
    # The model loads only if a task is missing from the cache, through the notebook-wide model()
    # so later sections (dominance, interpretation) reuse it.
    results = {name: run_main_experiment(name, task_list, protocol, progress=progress, store=store,
                                         loader=lambda n: model(n, remote, protocol.dtype), remote=remote)
               for name in models}
    for label, (name, setting, _) in beside_runs(beside, tasks, protocol, cache_dir).items():
        if label not in results:
            results[label] = run_main_experiment(name, task_list, protocol, progress=False, store=store,
                                                 loader=_never_load, remote=setting)
    return results


def _never_load(name: str):
    raise AssertionError(f"{name}: a run shown beside is read from the cache, never computed")


def beside_label(name: str, setting: bool | str) -> str:
    """How a run shown beside this one is named in tables and charts: ``name (NDIF)`` for a remote one."""
    return f"{name} (NDIF)" if is_remote(setting) else name


def beside_runs(beside: dict | None, tasks: str | Sequence[str] | None, protocol: Protocol,
                cache_dir: str | None = None) -> dict[str, tuple[str, bool | str, dict[str, str]]]:
    """The runs of ``beside`` (model name -> remote setting: true, a host URL, or false) whose every
    task is in the cache under ``protocol``: label -> (model, setting, cache key per task).

    This is how the section pages show, say, the paper's models run on NDIF beside the embedded
    model: a run that is not (completely) cached is left out, and nothing is loaded or sent to
    find out (the keys need no weights and no network).
    """
    if not beside:
        return {}
    if not isinstance(beside, dict):
        raise SettingError(f"beside must map model names to a remote setting (true, false or a host URL), "
                           f"got {beside!r}")
    store, task_list = store_for(cache_dir), load_tasks(as_list(tasks) or None)
    present = {}
    for name, value in beside.items():
        setting = remote_setting(value)
        keys = main_keys(name, task_list, protocol, remote=setting)
        if all(store.has("main", name, key) for key in keys.values()):
            present[beside_label(name, setting)] = (name, setting, keys)
    return present


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


def intervals(results: dict[str, MainResult]) -> pd.DataFrame:
    """Per model, task and condition: accuracy, n prompts and its 95% Wilson interval (lo, hi),
    with the task's category, format, best layer and saturation (see :mod:`taskvec.studies.stats`)."""
    frames = []
    for name, result in results.items():
        if result.predictions.empty:
            continue
        info = result.accuracy.set_index("task")[["category", "format", "best_layer", "saturated"]]
        table = stats.task_intervals(result.predictions).join(info, on="task")
        frames.append(table.assign(model=name))
    columns = ["model", "task", "category", "format", "condition", "n", "accuracy", "lo", "hi", "best_layer",
               "saturated"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def mean_intervals(results: dict[str, MainResult], seed: int = 0) -> pd.DataFrame:
    """Per model and condition: the mean over tasks with its 95% bootstrap interval over tasks."""
    rows = []
    for name, result in results.items():
        for condition in ("baseline", "hypothesis", "regular"):
            mean, lo, hi = stats.mean_interval(result.accuracy[f"{condition}_acc"], seed=seed)
            rows.append({"model": name, "condition": condition, "mean": mean, "lo": lo, "hi": hi,
                         "n_tasks": int(result.accuracy[f"{condition}_acc"].notna().sum())})
    return pd.DataFrame(rows)


def seed_means(models: str | Sequence[str], tasks: str | Sequence[str] | None, protocol: Protocol,
               seeds: Sequence[int], cache_dir: str | None = None, remote: bool | str = False) -> pd.DataFrame:
    """Per seed, model and condition: the mean over tasks with its bootstrap interval; each seed is a
    full main experiment with other prompts (cached like the first)."""
    frames = []
    for seed in seeds:
        runs = main_results(models, tasks, replace(protocol, seed=int(seed)), cache_dir, progress=False, remote=remote)
        frames.append(mean_intervals(runs, seed=int(seed)).assign(seed=int(seed)))
    table = pd.concat(frames, ignore_index=True)
    return table[["seed"] + [c for c in table.columns if c != "seed"]]


def hypothesis_vs_regular(results: dict[str, MainResult], seed: int = 0) -> dict[str, pd.DataFrame]:
    """The paired comparison of Hypothesis with Regular (same test prompts), per model:
    ``by_task`` (McNemar's exact test per task) and ``overall`` (mean per-task difference with its
    bootstrap interval, Wilcoxon signed-rank test over tasks)."""
    by_task, overall = [], []
    for name, result in results.items():
        if result.predictions.empty:
            continue
        by_task.append(stats.paired_by_task(result.predictions).assign(model=name))
        overall.append({"model": name, **stats.paired_over_tasks(result.accuracy, seed=seed)})
    return {"by_task": pd.concat(by_task, ignore_index=True) if by_task else pd.DataFrame(),
            "overall": pd.DataFrame(overall)}


def analysis_layers(result: MainResult) -> tuple[dict[str, int], int]:
    """The layer each task's θ is read at outside the main experiment, and the common layer.

    A task's own best dev layer, except for saturated tasks (the query alone already does them,
    so their flat dev curve makes the argmax arbitrary): they use the common layer, the median
    best layer of the other tasks (:func:`taskvec.studies.analysis.common_layer`).
    """
    acc = result.accuracy.set_index("task")
    common = analysis.common_layer(acc["best_layer"], acc["saturated"])
    layers = {t: (common if row.saturated and row.best_layer >= 0 else int(row.best_layer))
              for t, row in acc.iterrows()}
    return layers, common


def geometry(result: MainResult, seed: int = 41, perplexity: float = 30.0) -> dict:
    """t-SNE points, pairwise cosine distances and the silhouette score at the common layer
    (median best layer of the non-saturated tasks)."""
    _, layer = analysis_layers(result)
    vectors = {t: v for t, v in result.task_vectors.items() if v.shape[0] > 1}
    categories = result.accuracy.set_index("task")["category"]
    points = analysis.tsne_embedding(vectors, layer, seed, perplexity)
    points["category"] = points["task"].map(categories)
    points["saturated"] = points["task"].map(result.accuracy.set_index("task")["saturated"]).astype(bool)
    distances = analysis.cosine_distances(vectors, layer)
    summary = distances.groupby("pair")["distance"].agg(["mean", "median", "count"]).reset_index()
    return {"layer": layer, "points": points, "distances": distances, "distance_summary": summary,
            "silhouette": analysis.cluster_quality(vectors, layer)}


def dominance(name: str, protocol: Protocol, pairs: Sequence[Sequence[str]], n_prompts: int, n_shots: int,
              n_dev: int, cache_dir: str | None = None, remote: bool | str = False) -> dict[str, pd.DataFrame]:
    """The conflicting-tasks table for ``pairs`` (task A, task B) on model ``name``, cached per pair.

    The layer θ_B is patched at is chosen per pair on ``n_dev`` dev prompts of the conflicting
    setting itself (accuracy w.r.t. B), then the table is scored on ``n_prompts`` test prompts.
    Returns ``table`` and ``dev_curve`` (see :func:`taskvec.studies.analysis.conflicting_tasks`), and
    ``skipped``: the pairs this model's tokenizer leaves too few shared single-token examples for one
    prompt (found before any forward pass), with the reason.
    """
    store, remote = store_for(cache_dir), remote_setting(remote)
    tables, curves, skipped = [], [], []
    for a_name, b_name in pairs:
        task_a, task_b = load_task(a_name), load_task(b_name)
        key = make_key(ANALYSIS_MODULES, kind="dominance", model=name, weights=model_fingerprint(name),
                       placement=placement(name, dtype=protocol.dtype, remote=remote),
                       a=task_a.identity(), b=task_b.identity(), protocol=protocol,
                       n_prompts=n_prompts, n_shots=n_shots, n_dev=n_dev)
        folder = store.path("dominance", name, key)
        if not store.has("dominance", name, key):
            try:
                out = analysis.conflicting_tasks(model(name, remote, protocol.dtype), task_a, task_b, protocol,
                                                 n_prompts, n_shots, n_dev)
            except TooFewExamples as error:  # too few shared examples for this tokenizer: raised before compute
                skipped.append({"task_a": a_name, "task_b": b_name, "reason": str(error)})
                continue

            def write(f, out=out):
                out["table"].to_csv(f / "table.csv", index=False)
                out["dev_curve"].to_csv(f / "dev_curve.csv", index=False)
            folder = store.save("dominance", name, key, write)
        tables.append(pd.read_csv(folder / "table.csv"))
        curves.append(pd.read_csv(folder / "dev_curve.csv"))
    empty = {"table": analysis.CONFLICT_COLUMNS, "dev_curve": analysis.CONFLICT_CURVE_COLUMNS}
    return {"table": pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=empty["table"]),
            "dev_curve": pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=empty["dev_curve"]),
            "skipped": pd.DataFrame(skipped, columns=["task_a", "task_b", "reason"])}


def interpretation(name: str, result: MainResult, top_k: int, cache_dir: str | None = None,
                   remote: bool | str = False, cached_only: bool = False) -> pd.DataFrame | None:
    """Top tokens of each task's mean θ at its analysis layer (cached); see :func:`analysis_layers`.

    Columns task, layer, rank, token, logit, saturated. With ``cached_only`` (a run shown beside
    this one) nothing is computed: None when the tokens are not in the cache.
    """
    store, remote = store_for(cache_dir), remote_setting(remote)
    layers, _ = analysis_layers(result)
    key = make_key(ANALYSIS_MODULES, kind="interpretation", model=name, weights=model_fingerprint(name),
                   placement=placement(name, dtype=result.protocol.dtype, remote=remote), layers=layers, k=top_k,
                   vectors={t: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                            for t, v in result.task_vectors.items()})
    folder = store.path("interpretation", name, key)
    if not store.has("interpretation", name, key):
        if cached_only:
            return None
        table = analysis.task_vector_tokens(model(name, remote, result.protocol.dtype), result.task_vectors, layers, top_k)
        folder = store.save("interpretation", name, key,
                            lambda f: table.to_json(f / "tokens.json", orient="records", force_ascii=False))
    tokens = pd.DataFrame(json.loads((folder / "tokens.json").read_text()))
    saturated = result.accuracy.set_index("task")["saturated"]
    return tokens.assign(saturated=tokens["task"].map(saturated).fillna(False).astype(bool))


def prefix_scoring(results: dict[str, MainResult]) -> pd.DataFrame:
    """Prefix (knowledge) tasks scored both ways from the same predictions: per model, task and
    condition, accuracy under the ``first_token`` rule and under the original ``lenient`` rule."""
    frames = []
    for name, result in results.items():
        preds = result.predictions
        if preds.empty:
            continue
        compare = {t.name: t.compare for t in load_tasks(list(preds["task"].unique()))}
        prefix = preds[preds["task"].map(compare) == "prefix"]
        if prefix.empty:
            continue
        table = prefix.groupby(["task", "condition"], sort=False)[["correct_first_token", "correct_lenient"]].mean()
        frames.append(table.reset_index().rename(columns={"correct_first_token": "first_token",
                                                          "correct_lenient": "lenient"}).assign(model=name))
    if not frames:
        return pd.DataFrame(columns=["model", "task", "condition", "first_token", "lenient"])
    return pd.concat(frames, ignore_index=True)[["model", "task", "condition", "first_token", "lenient"]]


def layer_peaks(curves: pd.DataFrame) -> pd.DataFrame:
    """Per model: the layer with the best mean dev accuracy over tasks, its relative depth and accuracy,
    the mean accuracy at the first and last layers (``edge_acc``), and the saturated tasks (the query
    alone does them) with the layer the paper's rule gave them (``saturated_layers``)."""
    rows = []
    for name, group in curves.groupby("model", sort=False):
        mean = group.groupby("layer")["dev_acc"].mean()
        peak = int(mean.idxmax())
        n_layers = int(group["n_layers"].iloc[0])
        saturated = group[group["saturated"]].groupby("task", sort=False)["dev_acc"].apply(
            lambda s: int(s.to_numpy().argmax()))
        rows.append({"model": name, "n_layers": n_layers, "n_tasks": group["task"].nunique(), "peak_layer": peak,
                     "peak_depth": peak / max(n_layers - 1, 1), "peak_acc": float(mean.max()),
                     "edge_acc": float((mean.iloc[0] + mean.iloc[-1]) / 2),
                     "saturated_layers": ", ".join(f"{t} (L={l})" for t, l in saturated.items()) or "none"})
    return pd.DataFrame(rows)


def answer_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per task: top tokens of θ that begin one of the task's answers (see analysis.answer_tokens)."""
    names = list(dict.fromkeys(tokens["task"]))
    return analysis.answer_tokens(tokens, {t.name: t for t in load_tasks(names)})


def long_answers(name: str, tasks: str | Sequence[str], protocol: Protocol, max_new_tokens: int, n_dev: int,
                 n_test: int, cache_dir: str | None = None, remote: bool | str = False):
    """Beyond one token on model ``name`` (:func:`taskvec.studies.long_answers.run`, cached per task): the
    protocol's shots, dummies, seed and format with ``n_dev`` dev and ``n_test`` test prompts."""
    from . import long_answers as study

    proto = replace(protocol, n_dev=n_dev, n_test=n_test)
    setting = remote_setting(remote)
    return study.run(name, load_tasks(as_list(tasks)), proto, max_new_tokens,
                     store_for(cache_dir), loader=lambda n: model(n, setting, protocol.dtype), remote=setting,
                     progress=False)


def theta_needs(name: str, result: MainResult, tasks: str | Sequence[str], sizes, cache_dir: str | None = None,
                remote: bool | str = False):
    """What θ needs on model ``name`` (:func:`taskvec.studies.context.run`, cached per task), at each task's
    analysis layer from the main experiment (:func:`analysis_layers`); ``tasks`` the main experiment
    skipped (too few single-token examples) are left out."""
    from . import context as study

    layers, _ = analysis_layers(result)
    chosen = load_tasks(as_list(tasks))
    outside = [t.name for t in chosen if t.name not in layers]
    if outside:
        raise SettingError(f"task(s) {', '.join(outside)} are not in the main experiment of {name} "
                           f"(its tasks: {', '.join(layers)}); their layer would be unknown")
    ran = [t for t in chosen if layers[t.name] >= 0]
    setting = remote_setting(remote)
    return study.run(name, ran, result.protocol, {t.name: layers[t.name] for t in ran}, sizes, store_for(cache_dir),
                     loader=lambda n: model(n, setting, result.protocol.dtype), remote=setting, progress=False)


def _run_on(params: dict) -> list[str]:
    """The models a section runs on: ``run_on`` (a subset of ``models``), or all of ``models``."""
    models, chosen = as_list(params["models"]), as_list(params.get("run_on"))
    outside = [m for m in chosen if m not in models]
    if outside:
        raise SettingError(f"run_on names model(s) outside the profile's models ({', '.join(models)}): "
                           f"{', '.join(outside)}")
    return chosen or models


def check_beyond(params: dict) -> list[str]:
    """The Beyond one token page's parameters, checked before any compute; returns the models it runs on."""
    from .long_answers import check_max_new_tokens

    check_max_new_tokens(params["max_new_tokens"])
    for name in ("n_dev", "n_test"):
        positive_int(name, params[name])
    if not as_list(params["long_tasks"]):
        raise SettingError("long_tasks must name at least one task")
    load_tasks(as_list(params["long_tasks"]))  # an unknown name is an error here
    return _run_on(params)


def check_needs(params: dict):
    """The What θ needs page's parameters, checked before any compute; returns (models it runs on, tasks,
    sizes). ``needs_tasks`` empty: :data:`taskvec.studies.context.DEFAULT_TASKS`, those the main experiment runs."""
    from .context import DEFAULT_TASKS, Sizes

    sizes = Sizes(tuple(params["shots"]), tuple(params["contexts"]), params["n_prompts"], params["pool"],
                  params["max_groups"], params["n_queries"])
    main_tasks = as_list(params["tasks"])
    chosen = as_list(params["needs_tasks"])
    if not chosen:
        chosen = [t for t in DEFAULT_TASKS if not main_tasks or t in main_tasks]
        if not chosen:
            raise SettingError(f"none of the default tasks ({', '.join(DEFAULT_TASKS)}) is among the main "
                               f"experiment's ({', '.join(main_tasks)}): set needs_tasks")
    load_tasks(chosen)
    outside = [t for t in chosen if main_tasks and t not in main_tasks]
    if outside:
        raise SettingError(f"needs_tasks {', '.join(outside)} are not among the main experiment's tasks "
                           f"({', '.join(main_tasks)}): their layer would be unknown")
    return _run_on(params), chosen, sizes


#: Value checks of sections that have them, run by the book runner before any compute (and by the
#: notebooks themselves, for papermill by hand): notebook name -> check(parameters).
CHECKS = {"beyond": check_beyond, "needs": check_needs}
