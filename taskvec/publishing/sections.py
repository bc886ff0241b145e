"""The book's section notebooks' facade: their settings, and one cached call per result.

Each section has one settings model (:data:`SECTIONS`): the parameters its notebook declares, typed, with
their defaults and descriptions. The same model checks a profile of the experiment file before any compute
(:mod:`taskvec.publishing.runner`), checks the parameters papermill injected at the top of the notebook
(:func:`settings`), and is what ``book/experiments.md`` documents. The functions below take settings and
return tidy tables; everything heavy goes through the studies' cache (:mod:`taskvec.study`), and models
load only when something is missing from it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, ClassVar, Sequence, Union

import pandas as pd
from pydantic import Field, StringConstraints, field_validator, model_validator

from ..errors import SettingError
from ..experiment import MainResult, main_keys, run_main_experiment
from ..models import TaskModel, load_model
from ..prompts import TooFewExamples
from ..remote import is_remote
from ..remote import setting as remote_setting
from ..scoring import is_saturated
from ..settings import Count, Protocol, Settings
from ..store import Store
from ..study import ModelRef, Skip, cached, key_of
from ..studies import analysis, stats
from ..studies.context import DEFAULT_TASKS, Sizes
from ..studies.heads import DEFAULT_TASKS as HEADS_DEFAULT_TASKS
from ..studies.heads import FvSizes, HeadSizes
from ..studies.long_answers import LongAnswerParams
from ..tasks import load_task, load_tasks

class _Settings(Settings):
    """A section's parameters; a protocol given as a mapping of overrides becomes a :class:`Protocol`."""

    @field_validator("protocol", mode="before", check_fields=False)
    @classmethod
    def _protocol(cls, value):
        return Protocol(**value) if isinstance(value, dict) else value

    @field_validator("models", "tasks", "run_on", "long_tasks", "needs_tasks", "heads_tasks", "compare_tasks", mode="before",
                     check_fields=False)
    @classmethod
    def _names(cls, value):
        """A list of names, or one comma-separated string as ``papermill -p models a,b`` passes it."""
        return as_list(value) if isinstance(value, str) else value

    @field_validator("tasks", check_fields=False)
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        load_tasks(value or None)  # an unknown name is an error here, before any compute
        return value


#: Where a model runs: False (here), True (NDIF, nnsight's configured host) or an NDIF host URL.
Remote = Union[bool, Annotated[str, StringConstraints(pattern=r"^https?://")]]


class Section(_Settings):
    """What every section takes from the profile."""

    #: The notebook (``nb/<notebook>.ipynb``) these are the parameters of.
    notebook: ClassVar[str] = ""
    #: A section that reads what this run itself produced (its log, the other pages) runs every time.
    reads_the_run: ClassVar[bool] = False

    models: list[str] = Field(["gemma-3-270m"], min_length=1,
                              description="models: embedded names, local folders or hub ids")
    protocol: Protocol = Field(Protocol(), description="overrides of taskvec.Protocol fields (n_shots, n_dev, "
                                                       "n_test, n_baseline, seed, ...)")
    cache_dir: str = Field("", description="results cache folder; empty means $TASKVEC_CACHE/results")
    remote: Remote = Field(False, description="NDIF: true (nnsight's configured host, NDIF_HOST) or a host URL; "
                                              "false runs here")

    def store(self) -> Store:
        return store_for(self.cache_dir)


class _Tasks(_Settings):
    tasks: list[str] = Field([], description="task names; an empty list means all 18 tasks")


class _Beside(_Settings):
    beside: dict[str, Remote] = Field({}, description="cached runs shown beside this one: model -> remote (true or "
                                                      "a host URL); never computed")


class _RunOn(_Settings):
    run_on: list[str] = Field([], description="the models this section runs on, a subset of models; empty: all "
                                              "of them")

    @model_validator(mode="after")
    def _subset(self):
        outside = [m for m in self.run_on if m not in self.models]
        if outside:
            raise SettingError(f"run_on names model(s) outside the profile's models ({', '.join(self.models)}): "
                               f"{', '.join(outside)}")
        return self

    @property
    def runs_on(self) -> list[str]:
        """The models this section runs on: ``run_on``, or all of ``models``."""
        return list(self.run_on) or list(self.models)


class _Chosen(_Settings):
    """A section that runs some of the main experiment's tasks: ``chosen_setting`` names its list (empty: those
    of ``default_tasks`` the main experiment runs), checked with the profile's tasks before any compute."""

    chosen_setting: ClassVar[str] = ""
    default_tasks: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _chosen(self):
        self.chosen_tasks()
        return self

    def chosen_tasks(self) -> list[str]:
        """The chosen tasks, or the default tasks the main experiment runs; each must be among its tasks."""
        return _chosen_tasks(list(self.tasks), list(getattr(self, self.chosen_setting)), self.default_tasks,
                             self.chosen_setting)

    def part(self, settings: type[Settings]) -> Settings:
        """The fields of ``settings`` (a sizes model this section's parameters include) as that model."""
        return settings(**{name: getattr(self, name) for name in settings.model_fields})


class Data(Section, _Tasks):
    notebook: ClassVar[str] = "data"
    compare_tasks: list[str] = Field([], description="word tasks also run written bare, for the side-by-side; "
                                                     "empty: every translation and linguistic task of the run")


class FindingL(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "finding_L"


class Accuracy(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "accuracy"
    seeds: list[int] = Field([], description="further prompt seeds, each a full main experiment beside "
                                             "protocol.seed (empty: one seed)")


class Geometry(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "geometry"
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity (capped below the number of vectors)")


class Dominance(Section):
    notebook: ClassVar[str] = "dominance"
    pairs: list[list[str]] = Field([list(p) for p in analysis.CONFLICT_PAIRS],
                                   description="(task A in the prompt, task B whose θ is patched)")
    n_prompts: Count = Field(50, description="prompts per pair")
    n_shots: Count = Field(4, description="demonstrations of task A per prompt (the paper used 4 here)")
    n_dev: Count = Field(20, description="dev prompts per pair on which the layer of θ_B is chosen (then "
                                         "n_prompts held-out test prompts)")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, value: list[list[str]]) -> list[list[str]]:
        bad = [p for p in value if len(p) != 2]
        if bad:
            raise SettingError(f"each pair names two tasks (A, B), got {bad!r}")
        load_tasks([t for p in value for t in p])
        return value


class Interpretation(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "interpretation"
    top_k: Count = Field(20, description="tokens listed per task")


class Beyond(Section, _RunOn, LongAnswerParams):
    notebook: ClassVar[str] = "beyond"
    long_tasks: list[str] = Field(["country_capital", "location_continent", "en_es", "spell_word", "list_reverse"],
                                  min_length=1, description="tasks to generate for")

    @field_validator("long_tasks")
    @classmethod
    def _long_tasks(cls, value: list[str]) -> list[str]:
        load_tasks(value)
        return value


class Needs(Section, _Tasks, _RunOn, _Chosen, Sizes):
    notebook: ClassVar[str] = "needs"
    chosen_setting: ClassVar[str] = "needs_tasks"
    default_tasks: ClassVar[tuple[str, ...]] = tuple(DEFAULT_TASKS)
    needs_tasks: list[str] = Field([], description="tasks of the main experiment to run; empty: "
                                                   "taskvec.studies.context.DEFAULT_TASKS that the main experiment runs")

    @property
    def sizes(self) -> Sizes:
        return self.part(Sizes)


def _chosen_tasks(main_tasks: list[str], chosen: list[str], defaults: Sequence[str], setting: str) -> list[str]:
    """``chosen``, or those of ``defaults`` the main experiment runs (``main_tasks``, empty: all); each must be
    among the main experiment's tasks, since a page reads its layer from there."""
    if not chosen:
        chosen = [t for t in defaults if not main_tasks or t in main_tasks]
        if not chosen:
            raise SettingError(f"none of the default tasks ({', '.join(defaults)}) is among the main "
                               f"experiment's ({', '.join(main_tasks)}): set {setting}")
    load_tasks(chosen)
    outside = [t for t in chosen if main_tasks and t not in main_tasks]
    if outside:
        raise SettingError(f"{setting} {', '.join(outside)} are not among the main experiment's tasks "
                           f"({', '.join(main_tasks)}): their layer would be unknown")
    return chosen


class Heads(Section, _Tasks, _RunOn, _Chosen, HeadSizes, FvSizes):
    notebook: ClassVar[str] = "heads"
    chosen_setting: ClassVar[str] = "heads_tasks"
    default_tasks: ClassVar[tuple[str, ...]] = tuple(HEADS_DEFAULT_TASKS)
    heads_tasks: list[str] = Field([], description="tasks of the main experiment to run; empty: "
                                                   "taskvec.studies.heads.DEFAULT_TASKS that the main experiment runs")

    @property
    def sizes(self) -> HeadSizes:
        return self.part(HeadSizes)

    @property
    def fv_sizes(self) -> FvSizes:
        return self.part(FvSizes)


class Comparison(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "comparison"


class Provenance(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "provenance"
    reads_the_run: ClassVar[bool] = True
    run_log: str = Field("", description="path of the runner's run_log.json (written by python -m taskvec book)")


class Intro(Section, _Tasks, _Beside):
    notebook: ClassVar[str] = "intro"
    reads_the_run: ClassVar[bool] = True
    sections_dir: str = Field("", description="folder of the executed sections whose findings the intro reads "
                                              "(set by python -m taskvec book)")


#: Each section's settings, by notebook name, in the order they run: the intro reads every other section's
#: finding, so it runs last (the table of contents puts it first).
SECTIONS: dict[str, type[Section]] = {cls.notebook: cls for cls in (
    Data, FindingL, Accuracy, Geometry, Dominance, Interpretation, Beyond, Needs, Heads, Comparison, Provenance, Intro)}

#: The pages whose findings the intro's table lists, in reading order.
FINDING_PAGES = ("finding_L", "accuracy", "geometry", "dominance", "interpretation", "beyond", "needs", "heads")


def _literal(value) -> str:
    """A default as the parameters cell writes it (JSON style for containers and strings, Python for booleans)."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, Protocol):
        return "{}"  # overrides of the protocol's defaults: none
    return json.dumps(value, ensure_ascii=False)


def parameters_cell(notebook: str) -> str:
    """The parameters cell of ``nb/<notebook>.ipynb``, written from its section's settings model: one line per
    setting, its default and its description (what ``papermill --help-notebook`` shows)."""
    fields = SECTIONS[notebook].model_fields
    first = [n for n in ("models", "tasks", "protocol", "cache_dir", "remote", "beside", "run_on") if n in fields]
    order = first + [n for n in fields if n not in first]
    return "\n".join(f"{name} = {_literal(fields[name].default)}  # {fields[name].description}" for name in order)


def settings(notebook: str, namespace: dict) -> Section:
    """The section's settings from a notebook's namespace (the parameters cell, with what papermill injected),
    checked before any compute: a bad value is one SettingError naming the parameter."""
    model = SECTIONS[notebook]
    return model(**{name: namespace[name] for name in model.model_fields if name in namespace})


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
        runs = main_results(models, tasks, protocol.replace(seed=int(seed)), cache_dir, progress=False, remote=remote)
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

    A task's own best dev layer, except for tasks whose dev curve is no evidence of where θ lives
    (:func:`no_evidence`: saturated, the query alone already does them, or flat, no layer does them; the
    argmax of such a curve is arbitrary): they use the common layer, the median best layer of the other
    tasks (:func:`taskvec.studies.analysis.common_layer`).
    """
    acc = result.accuracy.set_index("task")
    flags = no_evidence(result.dev_curve).set_index("task")["no_evidence"] if len(result.dev_curve) else pd.Series(dtype=bool)
    arbitrary = flags.reindex(acc.index).fillna(False).astype(bool) | acc["saturated"].astype(bool)
    common = analysis.common_layer(acc["best_layer"], arbitrary)
    layers = {t: (common if arbitrary[t] and row.best_layer >= 0 else int(row.best_layer)) for t, row in acc.iterrows()}
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


def _ref(name: str, remote: bool | str, dtype: str | None) -> ModelRef:
    """``name`` as the studies take it: loaded (through :func:`model`, shared by the notebook) only if needed."""
    return ModelRef(name, lambda n: model(n, remote, dtype), dtype=dtype, remote=remote)


def dominance(name: str, protocol: Protocol, pairs: Sequence[Sequence[str]], n_prompts: int, n_shots: int,
              n_dev: int, cache_dir: str | None = None, remote: bool | str = False) -> dict[str, pd.DataFrame]:
    """The conflicting-tasks table for ``pairs`` (task A, task B) on model ``name``, cached per pair.

    θ_B is patched at B's own Hypothesis layer (the paper's rule) and, as a sensitivity check, at the layer
    tuned in the conflicting setting, both chosen on ``n_dev`` dev prompts; the table is scored on
    ``n_prompts`` test prompts.
    Returns ``table`` and ``dev_curve`` (see :func:`taskvec.studies.analysis.conflicting_tasks`), and
    ``skipped``: the pairs this model's tokenizer leaves too few shared single-token examples for one
    prompt (found before any forward pass, and cached like a result), with the reason.
    """
    store, remote = store_for(cache_dir), remote_setting(remote)
    ref = _ref(name, remote, protocol.dtype)
    tables, curves, skipped = [], [], []
    for a_name, b_name in pairs:
        task_a, task_b = load_task(a_name), load_task(b_name)

        def compute(m: TaskModel, task_a=task_a, task_b=task_b):
            try:
                return analysis.conflicting_tasks(m, task_a, task_b, protocol, n_prompts, n_shots, n_dev)
            except TooFewExamples as error:  # too few shared examples for this tokenizer: raised before compute
                raise Skip(str(error)) from None

        outcome = cached(analysis.DOMINANCE, ref, f"{a_name} | {b_name}", compute, store, a=task_a.identity(),
                         b=task_b.identity(), protocol=protocol, n_prompts=n_prompts, n_shots=n_shots, n_dev=n_dev)
        if outcome.skipped:
            skipped.append({"task_a": a_name, "task_b": b_name, "reason": outcome.result.reason})
            continue
        tables.append(outcome.result.table)
        curves.append(outcome.result.dev_curve)
    empty = {"table": analysis.CONFLICT_COLUMNS, "dev_curve": analysis.CONFLICT_CURVE_COLUMNS}
    return {"table": pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=empty["table"]),
            "dev_curve": pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=empty["dev_curve"]),
            "skipped": pd.DataFrame(skipped, columns=["task_a", "task_b", "reason"])}


def interpretation(name: str, result: MainResult, top_k: int, cache_dir: str | None = None,
                   remote: bool | str = False, cached_only: bool = False) -> pd.DataFrame | None:
    """Top tokens of each task's θ at its analysis layer (cached), both views of
    :func:`taskvec.studies.analysis.task_vector_tokens`; see :func:`analysis_layers`.

    Columns task, layer, view, rank, token, logit, saturated. With ``cached_only`` (a run shown beside
    this one) nothing is computed: None when the tokens are not in the cache.
    """
    store, remote = store_for(cache_dir), remote_setting(remote)
    layers, _ = analysis_layers(result)
    ref = _ref(name, remote, result.protocol.dtype)
    parts = dict(layers=layers, k=top_k, vectors={t: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                                                   for t, v in result.task_vectors.items()})
    if cached_only and not store.has(analysis.INTERPRETATION.kind, name, key_of(analysis.INTERPRETATION, ref, **parts)):
        return None
    outcome = cached(analysis.INTERPRETATION, ref, "all tasks", lambda m: analysis.TokensResult(
        analysis.task_vector_tokens(m, result.task_vectors, layers, top_k)), store, **parts)
    tokens = outcome.result.tokens
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


def no_evidence(curves: pd.DataFrame) -> pd.DataFrame:
    """Per task (and model, when ``curves`` has one): whether its dev curve says nothing about where θ lives:
    ``saturated`` (the query alone does the task, the curve is flat at the query's own accuracy) or ``flat``
    (no layer does it: the best dev accuracy is 0, so the paper's rule picks an arbitrary layer)."""
    keys = [k for k in ("model", "task") if k in curves.columns]
    table = curves.groupby(keys, sort=False).agg(saturated=("saturated", "first"), best=("dev_acc", "max"))
    table["flat"] = table["best"] <= 0
    table["no_evidence"] = table["saturated"].astype(bool) | table["flat"]
    return table.reset_index()


def layer_peaks(curves: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per model, over the tasks whose dev curve is evidence of where θ lives (:func:`no_evidence` leaves out
    saturated and flat tasks; all tasks if none is left): the layer with the best mean dev accuracy, its
    relative depth and accuracy, the plateau (the layers within the noise of that best,
    :func:`taskvec.studies.stats.plateau`) with its first and last relative depth, the mean accuracy at the
    first and last layers, and the tasks left out with the layer the paper's rule gave them."""
    rows = []
    flags = no_evidence(curves).set_index(["model", "task"])
    for name, group in curves.groupby("model", sort=False):
        n_layers = int(group["n_layers"].iloc[0])
        mine = flags.loc[name]
        kept = [t for t in group["task"].unique() if not mine.loc[t, "no_evidence"]] or list(group["task"].unique())
        per_task = group[group["task"].isin(kept)].pivot(index="task", columns="layer", values="dev_acc")
        found = stats.plateau(per_task, seed=seed)
        mean, peak, depth = found["mean"], int(found["peak"]), max(n_layers - 1, 1)

        def argmax_layers(tasks) -> str:
            best = group[group["task"].isin(tasks)].groupby("task", sort=False)["dev_acc"].apply(
                lambda s: int(s.to_numpy().argmax()))
            return ", ".join(f"{t} (L={l})" for t, l in best.items()) or "none"

        rows.append({"model": name, "n_layers": n_layers, "n_tasks": len(kept), "peak_layer": peak,
                     "peak_depth": peak / depth, "peak_acc": float(mean.max()),
                     "plateau": stats.spans(found["layers"]), "plateau_first": min(found["layers"]) / depth,
                     "plateau_last": max(found["layers"]) / depth,
                     "edge_acc": float((mean.iloc[0] + mean.iloc[-1]) / 2),
                     "saturated_layers": argmax_layers([t for t in mine.index if mine.loc[t, "saturated"]]),
                     "flat_layers": argmax_layers([t for t in mine.index if mine.loc[t, "flat"]
                                                   and not mine.loc[t, "saturated"]])})
    return pd.DataFrame(rows)


def paper_peaks(seed: int = 0) -> pd.DataFrame:
    """:func:`layer_peaks` of the paper authors' published per-layer results, by the same rule as this run's
    (their saturated tasks, from their Baseline and Regular accuracies, and flat tasks left out)."""
    from . import paper

    theirs = paper.dev_curves()
    per_task = paper.per_task().set_index(["model", "task"])
    saturated = {key: is_saturated(row.baseline_acc, row.regular_acc) for key, row in per_task.iterrows()}
    theirs = theirs.assign(saturated=[saturated.get(key, False) for key in zip(theirs["model"], theirs["task"])])
    return layer_peaks(theirs, seed)


def answer_tokens(tokens: pd.DataFrame, result: MainResult | None = None) -> pd.DataFrame:
    """Per view and task: top tokens of θ that begin one of the task's answers, and those that begin none of
    the answers ``result``'s test prompts show as demonstrations (see analysis.answer_tokens)."""
    names = list(dict.fromkeys(tokens["task"]))
    shown = result.shown_outputs if result is not None else None
    return analysis.answer_tokens(tokens, {t.name: t for t in load_tasks(names)}, shown)


def long_answers(name: str, tasks: str | Sequence[str], protocol: Protocol, max_new_tokens: int, n_dev: int,
                 n_test: int, cache_dir: str | None = None, remote: bool | str = False):
    """Beyond one token on model ``name`` (:func:`taskvec.studies.long_answers.run`, cached per task): the
    protocol's shots, dummies, seed and format with ``n_dev`` dev and ``n_test`` test prompts."""
    from ..studies import long_answers as study

    proto = protocol.replace(n_dev=n_dev, n_test=n_test)
    setting = remote_setting(remote)
    return study.run(name, load_tasks(as_list(tasks)), proto, max_new_tokens,
                     store_for(cache_dir), loader=lambda n: model(n, setting, protocol.dtype), remote=setting,
                     progress=False)


def _at_layers(name: str, result: MainResult, tasks: str | Sequence[str]):
    """The tasks of ``tasks`` the main experiment of model ``name`` ran, and each one's analysis layer there
    (:func:`analysis_layers`); a task it does not have is an error (its layer would be unknown), one it
    skipped (too few single-token examples) is left out."""
    layers, _ = analysis_layers(result)
    chosen = load_tasks(as_list(tasks))
    outside = [t.name for t in chosen if t.name not in layers]
    if outside:
        raise SettingError(f"task(s) {', '.join(outside)} are not in the main experiment of {name} "
                           f"(its tasks: {', '.join(layers)}); their layer would be unknown")
    ran = [t for t in chosen if layers[t.name] >= 0]
    return ran, {t.name: layers[t.name] for t in ran}


def theta_needs(name: str, result: MainResult, tasks: str | Sequence[str], sizes, cache_dir: str | None = None,
                remote: bool | str = False):
    """What θ needs on model ``name`` (:func:`taskvec.studies.context.run`, cached per task), at each task's
    analysis layer from the main experiment (:func:`_at_layers`)."""
    from ..studies import context as study

    ran, layers = _at_layers(name, result, tasks)
    setting = remote_setting(remote)
    return study.run(name, ran, result.protocol, layers, sizes, store_for(cache_dir),
                     loader=lambda n: model(n, setting, result.protocol.dtype), remote=setting, progress=False)


def heads_study(name: str, result: MainResult, tasks: str | Sequence[str], sizes: HeadSizes, fv_sizes: FvSizes,
                cache_dir: str | None = None, remote: bool | str = False):
    """Attention heads and function vectors on model ``name`` (:func:`taskvec.studies.heads.run_all`, cached
    per task), θ at each task's analysis layer from the main experiment (:func:`_at_layers`)."""
    from ..studies import heads as study

    ran, layers = _at_layers(name, result, tasks)
    setting = remote_setting(remote)
    return study.run_all(name, ran, result.protocol, layers, sizes, fv_sizes, store_for(cache_dir),
                         loader=lambda n: model(n, setting, result.protocol.dtype), remote=setting, progress=False)
