"""Figures reported in the paper, for side-by-side comparison in the book (not results of this code).

Hendel, Geva, Globerson 2023, Table 6 means over the 18 tasks, and Table 2 (LLaMA 13B); and, as data, the
per-task, per-layer and conflicting-task results the authors published with their code
(``taskvec/publishing/paper_data/``, see its README), with loaders that give taskvec's task names:
:func:`per_task`, :func:`dev_curves`, :func:`top_tokens`, :func:`conflicting`.
"""

import json
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ..errors import TaskvecError

#: Paper, Table 6: mean accuracy over the 18 tasks (Baseline / Hypothesis / Regular).
TABLE6_AVERAGES = pd.DataFrame(
    [
        ("GPT-J 6B", 28, 0.12, 0.68, 0.81),
        ("LLaMA 7B", 32, 0.13, 0.78, 0.86),
        ("LLaMA 13B", 40, 0.15, 0.79, 0.87),
        ("LLaMA 30B", 60, 0.16, 0.78, 0.90),
        ("Pythia 2.8B", 32, 0.13, 0.72, 0.83),
        ("Pythia 6.9B", 32, 0.11, 0.71, 0.82),
        ("Pythia 12B", 36, 0.11, 0.73, 0.82),
    ],
    columns=["model", "n_layers", "baseline_acc", "hypothesis_acc", "regular_acc"],
)

#: Paper, Section 5 / Fig. 3: the best layer sits in the middle of the network.
BEST_LAYER_RELATIVE_DEPTH = (0.3, 0.5)

#: Paper, Table 2 (LLaMA 13B), as summarized in ../shared/PAPER.md: Regular on A 0.51-0.98;
#: Conflicting on B 0.74-0.97 for 4 of 5 pairs; English->Spanish vs English->French stays on A.
TABLE2_SUMMARY = {"regular_on_a": (0.51, 0.98), "conflicting_on_b": (0.74, 0.97),
                  "translation_pair": {"acc_a": 0.91, "acc_b": 0.07}}


# --- The authors' published per-task / per-layer results (taskvec/publishing/paper_data/) ----------------------------

#: Where the per-task, per-layer and conflicting-task numbers come from, for chart captions.
SOURCE = ("Hendel, Geva & Globerson (2023), result files published with the authors' code "
          "(camera-ready runs; conflicting pairs = Table 2)")

#: The three models the authors published per-task and per-layer results for.
PAPER_MODELS = ("GPT-J 6B", "LLaMA 7B", "Pythia 6.9B")

#: The original code's task names (as in the CSVs) -> taskvec's task names.
ORIGINAL_TO_TASKVEC = {
    "algorithmic_list_first": "list_first",
    "algorithmic_list_last": "list_last",
    "algorithmic_next_letter": "next_letter",
    "algorithmic_prev_letter": "prev_letter",
    "algorithmic_to_lower": "to_lower",
    "algorithmic_to_upper": "to_upper",
    "translation_en_es": "en_es",
    "translation_en_fr": "en_fr",
    "translation_es_en": "es_en",
    "translation_fr_en": "fr_en",
    "linguistic_antonyms": "antonyms",
    "linguistic_plural_singular": "plural_singular",
    "linguistic_present_simple_gerund": "present_gerund",
    "linguistic_present_simple_past_simple": "present_past",
    # The conflicting-task file calls the two verb tasks "inflection_" instead of "linguistic_".
    "inflection_present_simple_gerund": "present_gerund",
    "inflection_present_simple_past_simple": "present_past",
    "knowledge_country_capital": "country_capital",
    "knowledge_location_continent": "location_continent",
    "knowledge_location_religion": "location_religion",
    "knowledge_person_language": "person_language",
}

DATA_DIR = Path(__file__).parent / "paper_data"


class PaperDataError(TaskvecError, ValueError):
    """A file under taskvec/publishing/paper_data/ that does not have the expected content."""


def to_taskvec_name(original: str) -> str:
    """taskvec's name for a task name of the original code; raises PaperDataError on an unknown name."""
    try:
        return ORIGINAL_TO_TASKVEC[original]
    except KeyError:
        raise PaperDataError(
            f"task {original!r} in taskvec/publishing/paper_data/ has no taskvec name; add it to "
            f"taskvec.publishing.paper.ORIGINAL_TO_TASKVEC") from None


def _read(name: str) -> pd.DataFrame:
    path = DATA_DIR / name
    if not path.is_file():
        raise PaperDataError(f"missing paper data file {path}")
    return pd.read_csv(path)


@lru_cache(maxsize=None)
def _per_task() -> pd.DataFrame:
    raw = _read("main_per_task.csv")
    df = pd.DataFrame({
        "model": raw["model"],
        "task": raw["task"].map(to_taskvec_name),
        "original_task": raw["task"],
        "baseline_acc": raw["baseline_acc"].astype(float),
        "hypothesis_acc": raw["hypothesis_acc"].astype(float),
        "regular_acc": raw["regular_acc"].astype(float),
        "best_layer": raw["best_layer"].astype(int),
        "n_layers": raw["n_layers_swept"].astype(int),
    })
    df["best_depth"] = df["best_layer"] / (df["n_layers"] - 1)
    return df


def per_task() -> pd.DataFrame:
    """The paper's accuracies per model and task: GPT-J 6B, LLaMA 7B, Pythia 6.9B x 18 tasks (54 rows).

    Columns: ``model``, ``task`` (taskvec's name), ``original_task`` (the original code's name),
    ``baseline_acc``, ``hypothesis_acc``, ``regular_acc`` (test accuracy, 50 prompts, 5 shots),
    ``best_layer`` (0-based; earliest argmax of the dev sweep), ``n_layers`` (layers swept = the model's
    layers) and ``best_depth`` = best_layer / (n_layers - 1). The per-model means are Table 6 of the paper.
    Returns a fresh copy; see :data:`SOURCE`.
    """
    return _per_task().copy()


@lru_cache(maxsize=None)
def _dev_curves() -> pd.DataFrame:
    raw = _read("dev_accuracy_by_layer.csv")
    n_layers = _per_task().set_index(["model", "original_task"])["n_layers"]
    keys = pd.MultiIndex.from_arrays([raw["model"], raw["task"]])
    missing = sorted(set(keys) - set(n_layers.index))
    if missing:
        raise PaperDataError(f"dev_accuracy_by_layer.csv has (model, task) pairs not in "
                             f"main_per_task.csv: {missing}")
    df = pd.DataFrame({
        "model": raw["model"],
        "task": raw["task"].map(to_taskvec_name),
        "original_task": raw["task"],
        "layer": raw["layer"].astype(int),
        "n_layers": n_layers.reindex(keys).to_numpy().astype(int),
    })
    df["relative_depth"] = df["layer"] / (df["n_layers"] - 1)
    df["dev_acc"] = raw["dev_acc"].astype(float)
    return df.sort_values(["model", "task", "layer"], kind="stable").reset_index(drop=True)


def dev_curves() -> pd.DataFrame:
    """The paper's layer sweep (Fig. 3): dev accuracy of the Hypothesis procedure with θ patched after each layer.

    One row per model, task and layer (layers 0 .. n_layers-1). Columns: ``model``, ``task`` (taskvec's
    name), ``original_task``, ``layer`` (0-based), ``n_layers``, ``relative_depth`` = layer / (n_layers - 1)
    and ``dev_acc`` (50 dev prompts). The earliest layer with the highest ``dev_acc`` is ``best_layer`` in
    :func:`per_task`. Sorted by model, task, layer; returns a fresh copy.
    """
    return _dev_curves().copy()


@lru_cache(maxsize=None)
def _top_tokens() -> pd.DataFrame:
    raw = _read("top_tokens_at_best_layer.csv")
    rows = []
    for model, original, layer, tokens in raw[["model", "task", "layer", "top_tokens"]].itertuples(index=False):
        task = to_taskvec_name(original)
        parsed = json.loads(tokens)
        if not isinstance(parsed, list) or not all(isinstance(t, str) for t in parsed):
            raise PaperDataError(f"top_tokens of {model} / {original} is not a JSON list of strings")
        rows.extend((model, task, int(layer), rank, token) for rank, token in enumerate(parsed))
    return pd.DataFrame(rows, columns=["model", "task", "layer", "rank", "token"])


def top_tokens() -> pd.DataFrame:
    """The 20 vocabulary tokens θ projects to most strongly at the best layer (Table 3 of the paper).

    One row per model, task and token. Columns: ``model``, ``task`` (taskvec's name), ``layer`` (the best
    layer), ``rank`` (0-based, 0 = strongest) and ``token`` (the decoded string as in the published JSON
    list, leading space included). Token strings can repeat within one list (LLaMA 7B: different token ids
    that decode alike); (model, task, rank) is the key. Returns a fresh copy.
    """
    return _top_tokens().copy()


@lru_cache(maxsize=None)
def _conflicting() -> pd.DataFrame:
    raw = _read("conflicting_llama_13B.csv")
    return pd.DataFrame({
        "model": raw["model"],
        "task_a": raw["task_a"].map(to_taskvec_name),
        "task_b": raw["task_b"].map(to_taskvec_name),
        "regular_acc_a": raw["regular_acc_a"].astype(float),
        "regular_acc_b": raw["regular_acc_b"].astype(float),
        "conflicting_acc_a": raw["conflicting_acc_a"].astype(float),
        "conflicting_acc_b": raw["conflicting_acc_b"].astype(float),
    })


def conflicting() -> pd.DataFrame:
    """Table 2 of the paper (LLaMA 13B): demonstrations of task A with θ of task B patched in.

    One row per pair, 5 pairs, all present: next_letter|to_upper, list_last|list_first,
    prev_letter|next_letter, present_past|present_gerund and en_es|en_fr (the one pair where the output stays
    on A). Columns: ``model``, ``task_a``, ``task_b`` (taskvec's names), ``regular_acc_a``,
    ``regular_acc_b`` (Regular: demonstrations of A, nothing patched, judged against A's / B's answers),
    ``conflicting_acc_a``, ``conflicting_acc_b`` (Conflicting: θ of B patched, judged against A's / B's
    answers). Returns a fresh copy.
    """
    return _conflicting().copy()
