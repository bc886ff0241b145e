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
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm  # not tqdm.auto: no widget warning inside notebooks

from . import mechanism
from .errors import SettingError
from .models import TaskModel, load_model, placement
from .remote import is_remote as remote_is_remote
from .remote import where as remote_where
from .store import Store, make_key, model_fingerprint
from .prompts import FewShotPrompt, PromptFormat, sample_prompts, sample_queries
from .tasks import Example, Task


#: Scoring rules for "prefix" tasks (knowledge: answers of several tokens, only the first is predicted).
#: ``first_token`` (the default): the predicted token must be the answer's first token as the tokenizer
#: writes it after the query line, so ``S`` is not ``South America``. ``lenient`` (the original code's
#: rule): an accepted answer starts with the stripped predicted text, so one letter can count.
PREFIX_RULES = ("first_token", "lenient")

#: How word tasks are spelled: ``rule`` (the original implementation's, :meth:`Protocol.format_for`)
#: or ``bare`` (every task as ``example:cat->gato``).
WORD_FORMATS = ("rule", "bare")
#: Weight dtypes a protocol may ask for (None: the model's default, see taskvec.models.placement).
DTYPES = (None, "float32", "bfloat16")
#: The categories the spacing rule applies to (word lists scored by exact match).
WORD_CATEGORIES = ("translation", "linguistic")
#: Spaced when it keeps at least this share of the single-token answers the bare form has.
SPACE_RATIO = 0.7

#: A task is *saturated* when the query alone already does it about as well as in-context learning:
#: Baseline at least SATURATED_MIN_BASELINE and within SATURATED_GAP of Regular. Its dev curve is then
#: flat (patching anything anywhere keeps the query's own answer), so its best layer says nothing
#: about where θ lives; tables and charts mark it.
SATURATED_MIN_BASELINE = 0.5
SATURATED_GAP = 0.1


def is_saturated(baseline_acc: float, regular_acc: float) -> bool:
    """Whether the query alone already does the task about as well as ICL (see SATURATED_GAP)."""
    if math.isnan(baseline_acc) or math.isnan(regular_acc):
        return False
    return baseline_acc >= SATURATED_MIN_BASELINE and regular_acc - baseline_acc < SATURATED_GAP


@dataclass(frozen=True)
class Protocol:
    """Sizes and settings of the main experiment; defaults are the paper's."""

    n_shots: int = 5  # demonstrations per prompt
    n_dev: int = 50  # prompts used to choose L
    n_test: int = 50  # prompts scored for Regular and Hypothesis
    n_baseline: int = 100  # query-only prompts scored for Baseline
    n_dummies: int = 2  # dummy queries averaged into each task vector
    seed: int = 41  # prompt sampling seed (the original code used 41)
    template: str = "example:{x}->{y}"  # one demonstration; the query line ends before {y}
    separator: str = "\n"  # between demonstrations
    single_token: bool = True  # keep only examples whose answer is one token ("exact" tasks)
    word_format: str = "rule"  # word tasks' spelling: "rule" (the original code's, see format_for) or "bare"
    dtype: str | None = None  # weights' dtype, "float32" or "bfloat16"; None: the model's default (float32 on a CPU)
    prefix_rule: str = "first_token"  # how "prefix" (knowledge) tasks are scored: see Scorer
    batch_size: int = 64  # rows per forward pass for full prompts
    patch_batch_size: int = 256  # rows per forward pass in the layer sweep (short query-only prompts)

    def __post_init__(self) -> None:
        for name in ("n_shots", "n_dev", "n_test", "n_baseline", "n_dummies", "batch_size", "patch_batch_size"):
            if int(getattr(self, name)) < 1:
                raise SettingError(f"Protocol.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.prefix_rule not in PREFIX_RULES:
            raise SettingError(f"Protocol.prefix_rule must be one of {', '.join(PREFIX_RULES)}, got {self.prefix_rule!r}")
        if self.dtype not in DTYPES:
            raise SettingError(f"Protocol.dtype must be one of {', '.join(map(str, DTYPES))}, got {self.dtype!r}")
        if self.word_format not in WORD_FORMATS:
            raise SettingError(f"Protocol.word_format must be one of {', '.join(WORD_FORMATS)}, got {self.word_format!r}")
        PromptFormat(self.template, self.separator)  # validates the template

    @property
    def format(self) -> PromptFormat:
        """The bare format: every task's with ``word_format="bare"``, and algorithmic and knowledge tasks'."""
        return PromptFormat(self.template, self.separator)

    def format_for(self, task: Task, tokenizer) -> PromptFormat:
        """The format ``task`` is written in for this tokenizer (demonstrations, dummies, query, scoring).

        The original implementation's rule, per word task (translation and linguistic, exact match):
        with a space before input and answer (``example: cat-> gato``) when, so written, at least
        :data:`SPACE_RATIO` as many canonical answers are single tokens as written bare; otherwise
        bare. Algorithmic tasks (letters, letter lists) and knowledge tasks (prefix-matched) are
        always bare, as there. ``word_format="bare"`` writes every task bare (taskvec's first form).
        """
        bare = self.format
        if self.word_format == "bare" or task.category not in WORD_CATEGORIES or task.compare != "exact":
            return bare
        spaced = replace(bare, space=True)
        n_spaced = len(single_token_examples(task, tokenizer, spaced))
        return spaced if n_spaced >= SPACE_RATIO * len(single_token_examples(task, tokenizer, bare)) else bare


def single_token_examples(task: Task, tokenizer, fmt: PromptFormat) -> Task:
    """``task`` restricted to examples whose canonical answer is one token right after the query.

    The check tokenizes the query line with and without the answer, so merges across
    the ``->`` boundary count. Accepted alternatives that are not single tokens are
    dropped (they could never match one predicted token). "prefix" tasks are kept
    whole: only the first token of their answer is compared.
    """
    if task.compare == "prefix":
        return task

    def one_token(x: str, y: str) -> bool:
        context = tokenizer(fmt.query(x)).input_ids
        full = tokenizer(fmt.query(x) + fmt.answer(y)).input_ids
        return len(full) == len(context) + 1 and full[: len(context)] == context

    kept = []
    for ex in task.examples:
        outputs = tuple(y for y in ex.outputs if one_token(ex.input, y))
        if outputs and outputs[0] == ex.output:
            kept.append(Example(ex.input, outputs))
    return task.restrict(kept)


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


def write_records(path: Path, frame: pd.DataFrame) -> None:
    """One JSON object per row: round-trips any string (``\\r``, ``,``, quotes) and keeps types."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in frame.to_dict(orient="records"):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_records(path: Path) -> pd.DataFrame:
    """The table :func:`write_records` wrote."""
    with open(path, encoding="utf-8") as handle:
        return pd.DataFrame([json.loads(line) for line in handle.read().split("\n") if line])


@dataclass
class TaskResult:
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

    _FIELDS = ("task", "best_layer", "dev_accuracy", "regular_acc", "hypothesis_acc", "baseline_acc", "seconds",
               "format")

    def save(self, folder: Path) -> None:
        (folder / "result.json").write_text(json.dumps({k: getattr(self, k) for k in self._FIELDS}, indent=1))
        write_records(folder / "predictions.jsonl", self.predictions)
        save_file({"test_vectors": self.test_vectors.contiguous()}, folder / "test_vectors.safetensors")

    @classmethod
    def load(cls, folder: Path) -> "TaskResult":
        fields_ = json.loads((folder / "result.json").read_text())
        predictions = read_records(folder / "predictions.jsonl")
        vectors = load_file(folder / "test_vectors.safetensors")["test_vectors"]
        return cls(**fields_, predictions=predictions, test_vectors=vectors)


def _decode(model: TaskModel, ids: torch.Tensor) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


class Scorer:
    """Scores predicted next tokens of one task against accepted answers.

    ``exact`` tasks: the decoded token, stripped, equals an accepted answer (the single-token
    filter guarantees the answer is one token). ``prefix`` tasks, under ``rule``:
    ``first_token`` compares token ids with the first token of each accepted answer as the
    tokenizer writes it right after the query line (``example:France->`` + ``Paris``), so a
    predicted ``S`` or `` S`` is not ``South America``; ``lenient`` is the original rule, an
    accepted answer starting with the stripped predicted text.
    """

    def __init__(self, task: Task, tokenizer, fmt: PromptFormat, rule: str = "first_token") -> None:
        if rule not in PREFIX_RULES:
            raise SettingError(f"unknown prefix rule {rule!r} (expected one of {', '.join(PREFIX_RULES)})")
        self.task, self.tokenizer, self.fmt, self.rule = task, tokenizer, fmt, rule
        self._first: dict[tuple[str, tuple[str, ...]], frozenset[int]] = {}

    def first_tokens(self, example: Example) -> frozenset[int]:
        """Token ids that start an accepted answer of ``example`` after its query line."""
        key = (example.input, example.outputs)
        if key not in self._first:
            context = self.fmt.query(example.input)
            ctx_ids = self.tokenizer(context).input_ids
            firsts = set()
            for answer in example.outputs:
                full = self.tokenizer(context + self.fmt.answer(answer)).input_ids
                # The first position where the answer's tokens start (a merge across the boundary
                # would change the context's last token: the answer then starts there).
                i = next((j for j, (a, b) in enumerate(zip(ctx_ids, full)) if a != b), len(ctx_ids))
                if i < len(full):
                    firsts.add(int(full[i]))
            self._first[key] = frozenset(firsts)
        return self._first[key]

    def lenient(self, texts: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """The text rule: exact match, or for prefix tasks an answer starting with the prediction."""
        return [self.task.is_correct(text, ex) for text, ex in zip(texts, examples)]

    def first_token(self, ids: Sequence[int], texts: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """The token rule for prefix tasks (exact tasks: as :meth:`lenient`)."""
        if self.task.compare != "prefix":
            return self.lenient(texts, examples)
        return [int(i) in self.first_tokens(ex) for i, ex in zip(ids, examples)]

    def __call__(self, ids: Sequence[int], texts: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """Correct or not under this scorer's rule."""
        if self.rule == "lenient":
            return self.lenient(texts, examples)
        return self.first_token(ids, texts, examples)


def run_task(model: TaskModel, task: Task, protocol: Protocol, prompts: PromptSet | None = None,
             on_phase=None, fmt: PromptFormat | None = None) -> TaskResult:
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
    dev_correct = torch.tensor([score(sweep[layer].tolist(), _decode(model, sweep[layer]), dev_queries)
                                for layer in range(model.n_layers)], dtype=torch.float32)
    dev_accuracy = dev_correct.mean(dim=1)
    best_layer = int(dev_accuracy.argmax())  # earliest layer among ties

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
        texts, tokens, queries = _decode(model, ids), ids.tolist(), [q.query for q in group]
        by_rule = {"first_token": score.first_token(tokens, texts, queries), "lenient": score.lenient(texts, queries)}
        for i, prompt in enumerate(group):
            rows.append({"task": task.name, "condition": condition, "prompt": i, "query": prompt.query.input,
                         "expected": prompt.query.output, "predicted": texts[i], "token_id": tokens[i],
                         "correct": by_rule[p.prefix_rule][i], "correct_first_token": by_rule["first_token"][i],
                         "correct_lenient": by_rule["lenient"][i]})
    predictions = pd.DataFrame(rows)
    acc = predictions.groupby("condition")["correct"].mean()
    return TaskResult(
        task=task.name, best_layer=best_layer, dev_accuracy=dev_accuracy.tolist(),
        regular_acc=float(acc["regular"]), hypothesis_acc=float(acc["hypothesis"]),
        baseline_acc=float(acc["baseline"]), predictions=predictions, test_vectors=test_vectors,
        seconds=time.perf_counter() - start, format=fmt.name,
    )


@dataclass
class MainResult:
    """Tidy tables of the main experiment.

    ``accuracy``: one row per task (task, category, n_usable, best_layer, baseline_acc,
    hypothesis_acc, regular_acc, saturated, seconds). ``dev_curve``: one row per task and layer
    (task, layer, relative_depth, dev_acc, saturated). ``saturated`` marks tasks the query alone
    already does (see :func:`is_saturated`): their best layer is not evidence of where θ lives. ``predictions``: one row per scored prompt.
    ``task_vectors``: task -> (n_test, n_layers, d_model) θ of the test prompts.
    """

    accuracy: pd.DataFrame
    dev_curve: pd.DataFrame
    predictions: pd.DataFrame
    task_vectors: dict[str, torch.Tensor]
    model: str
    n_layers: int
    protocol: Protocol
    meta: dict = field(default_factory=dict)

    def summary(self) -> pd.Series:
        """Mean accuracy over tasks per condition (the paper's Table 6 averages); skipped tasks are left out."""
        return self.accuracy[["baseline_acc", "hypothesis_acc", "regular_acc"]].mean()


def task_key(model_name: str, weights: str, task: Task, protocol: Protocol, prompts: PromptSet | None = None,
             *, device: str | None = None, dtype: str | None = None) -> str:
    """Cache key of one task's main-experiment result: model weights, device type and dtype, task data,
    protocol, prompts, code. ``device``/``dtype`` left out: where ``load_model(model_name)`` puts it."""
    if device is None or dtype is None:
        device, dtype = placement(model_name, device, dtype)
    return make_key(kind="main", model=model_name, weights=weights, device=device, dtype=dtype,
                    task=task.identity(),
                    protocol=protocol,
                    prompts=None if prompts is None else {k: [p.to_json() for p in v] for k, v in prompts.as_dict().items()})


def main_keys(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol,
              prompts: dict[str, PromptSet] | None = None, remote: bool | str = False) -> dict[str, str]:
    """Cache key of each task's result (:func:`task_key`) for a loaded model, or for a model name as
    ``load_model(name, remote=remote)`` would load it, without loading anything."""
    ident = model_identity(model, protocol, remote)
    prompts = prompts or {}
    return {t.name: task_key(ident["model"], ident["weights"], t, protocol, prompts.get(t.name), device=ident["device"],
                             dtype=ident["dtype"]) for t in tasks}


def model_identity(model: TaskModel | str, protocol: Protocol, remote: bool | str = False) -> dict[str, str]:
    """What a cache key holds of a model: name, weights hash, device type and dtype (for a name, where
    ``load_model(name, remote=remote)`` with the protocol's dtype would put it), without loading it."""
    name = model if isinstance(model, str) else model.name
    weights = model_fingerprint(model) if isinstance(model, str) else model.weights_sha256
    if not weights:
        raise ValueError(f"model {name!r} has no weights hash; caching needs one (TaskModel.weights_sha256)")
    device, dtype = placement(name, dtype=protocol.dtype, remote=remote) if isinstance(model, str) else model.placement
    return {"model": name, "weights": weights, "device": device, "dtype": dtype}


def run_main_experiment(model: TaskModel | str, tasks: Sequence[Task], protocol: Protocol | None = None,
                        prompts: dict[str, PromptSet] | None = None, progress: bool = True,
                        store: Store | None = None, loader=load_model, remote: bool | str = False) -> MainResult:
    """Run the main experiment on ``tasks``; ``prompts`` (task name -> PromptSet) overrides sampling.

    With a ``store``, each task's result is read from the cache when its key (see
    :func:`task_key`) is there and written to it when computed; ``model`` may then be
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
    name = model if isinstance(model, str) else model.name
    if not isinstance(model, str) and protocol.dtype and not remote_is_remote(model.remote) \
            and model.placement[1] != protocol.dtype:
        raise SettingError(f"the protocol asks for {protocol.dtype} weights, {name} is loaded in {model.placement[1]}")
    keys = main_keys(model, tasks, protocol, prompts, remote) if store else {}
    cached = {t.name for t in tasks if store and store.has("main", name, keys[t.name])}
    loaded: list[TaskModel] = [] if isinstance(model, str) else [model]

    def get_model() -> TaskModel:
        if not loaded:
            loaded.append(loader(model))
        return loaded[0]

    # Filter every task to be computed before any forward pass, so a task this tokenizer leaves
    # too small is reported up front and skipped (a row of NaN) instead of aborting the run halfway.
    # Each task's format is decided on the whole task (Protocol.format_for), then filtered in it.
    usable_tasks, formats = {}, {}
    for task in tasks:
        if task.name in cached:
            continue
        fmt = formats[task.name] = protocol.format_for(task, get_model().tokenizer)
        usable = single_token_examples(task, get_model().tokenizer, fmt) if protocol.single_token else task
        usable_tasks[task.name] = usable
        if len(usable) < need and task.name not in prompts:
            warnings.warn(f"skipping task {task.name!r}: {len(usable)} usable examples for this tokenizer, "
                          f"a prompt needs {need}", stacklevel=2)
    acc_rows, curve_rows, preds, vectors = [], [], [], {}
    n_layers = None
    bar = tqdm(tasks, desc=f"main experiment ({name})", unit="task", disable=not progress)
    for task in bar:
        task_prompts = prompts.get(task.name)
        skipped = {"task": task.name, "category": task.category, "n_examples": len(task), "best_layer": -1,
                   "baseline_acc": math.nan, "hypothesis_acc": math.nan, "regular_acc": math.nan,
                   "saturated": False, "seconds": 0.0, "format": formats.get(task.name, protocol.format).name}
        if task.name in cached:
            folder = store.path("main", name, keys[task.name])
            meta_ = json.loads((folder / "meta.json").read_text())
            n_usable = meta_["n_usable"]
            if meta_.get("skipped"):  # too small for this tokenizer: cached too, so a rerun loads no model
                acc_rows.append({**skipped, "n_usable": n_usable, "format": meta_.get("format", "bare")})
                continue
            result = TaskResult.load(folder)
        else:
            usable = usable_tasks[task.name]
            n_usable = len(usable)
            if task_prompts is None and n_usable < need:
                acc_rows.append({**skipped, "n_usable": n_usable})
                if store:
                    store.save("main", name, keys[task.name], lambda folder, n=n_usable, f=skipped["format"]: (
                        folder / "meta.json").write_text(json.dumps({"n_usable": n, "model": name, "skipped": True,
                                                                     "format": f})))
                continue
            with remote_where(task=task.name):
                result = run_task(get_model(), usable, protocol, task_prompts,
                                  on_phase=lambda phase, t=task.name: bar.set_postfix_str(f"{t}: {phase}"),
                                  fmt=formats[task.name])
            if store:
                def write(folder, result=result, n_usable=n_usable):
                    result.save(folder)
                    (folder / "meta.json").write_text(json.dumps({"n_usable": n_usable, "model": name}))
                store.save("main", name, keys[task.name], write)
        n_layers = len(result.dev_accuracy)
        saturated = is_saturated(result.baseline_acc, result.regular_acc)
        acc_rows.append({
            "task": task.name, "category": task.category, "n_examples": len(task), "n_usable": n_usable,
            "best_layer": result.best_layer, "baseline_acc": result.baseline_acc,
            "hypothesis_acc": result.hypothesis_acc, "regular_acc": result.regular_acc,
            "saturated": saturated, "seconds": round(result.seconds, 2), "format": result.format,
        })
        for layer, value in enumerate(result.dev_accuracy):
            curve_rows.append({"task": task.name, "layer": layer, "relative_depth": layer / max(n_layers - 1, 1),
                               "dev_acc": value, "saturated": saturated})
        preds.append(result.predictions)
        vectors[task.name] = result.test_vectors
    meta = {"weights_sha256": loaded[0].weights_sha256 if loaded else model_fingerprint(name),
            "cached_tasks": sorted(cached), "protocol": asdict(protocol)}
    if loaded:
        meta.update(loaded[0].info)
        n_layers = loaded[0].n_layers
    return MainResult(
        accuracy=pd.DataFrame(acc_rows), dev_curve=pd.DataFrame(curve_rows),
        predictions=pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(),
        task_vectors=vectors, model=name, n_layers=n_layers or 0, protocol=protocol, meta=meta,
    )
