"""The paper's published results (taskvec/publishing/paper_data/) load with taskvec's task names and agree with the paper."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from taskvec.publishing import paper
from taskvec.tasks import list_tasks

#: Paper, Table 6, to three decimals (Baseline, Hypothesis, Regular), as the published per-task means give them.
TABLE6_3DP = {
    "GPT-J 6B": (0.119, 0.679, 0.814),
    "LLaMA 7B": (0.132, 0.776, 0.860),
    "Pythia 6.9B": (0.106, 0.712, 0.818),
}
ACCS = ["baseline_acc", "hypothesis_acc", "regular_acc"]


@pytest.fixture(scope="module")
def tasks() -> set[str]:
    return set(list_tasks())


def test_columns():
    assert list(paper.per_task().columns) == [
        "model", "task", "original_task", "baseline_acc", "hypothesis_acc", "regular_acc",
        "best_layer", "n_layers", "best_depth"]
    assert list(paper.dev_curves().columns) == [
        "model", "task", "original_task", "layer", "n_layers", "relative_depth", "dev_acc"]
    assert list(paper.top_tokens().columns) == ["model", "task", "layer", "rank", "token"]
    assert list(paper.conflicting().columns) == [
        "model", "task_a", "task_b", "regular_acc_a", "regular_acc_b", "conflicting_acc_a", "conflicting_acc_b"]
    assert isinstance(paper.SOURCE, str) and "\n" not in paper.SOURCE and "Hendel" in paper.SOURCE


def test_means_reproduce_table6():
    means = paper.per_task().groupby("model")[ACCS].mean()
    assert sorted(means.index) == sorted(paper.PAPER_MODELS) == sorted(TABLE6_3DP)
    table6 = paper.TABLE6_AVERAGES.set_index("model")
    for model, expected in TABLE6_3DP.items():
        got = means.loc[model, ACCS].to_numpy()
        assert got == pytest.approx(expected, abs=5e-4), model
        assert got == pytest.approx(table6.loc[model, ACCS].to_numpy(dtype=float), abs=5e-3), model


def test_layer_counts_match_table6():
    n_layers = paper.per_task().groupby("model")["n_layers"].unique()
    table6 = paper.TABLE6_AVERAGES.set_index("model")["n_layers"]
    for model in paper.PAPER_MODELS:
        assert list(n_layers[model]) == [table6[model]], model


def test_every_model_has_the_18_taskvec_tasks(tasks):
    df = paper.per_task()
    assert len(tasks) == 18
    assert len(df) == 3 * 18
    for model, group in df.groupby("model"):
        assert sorted(group["task"]) == sorted(tasks), model
        assert group["original_task"].is_unique, model
    # The mapping is one-to-one within the per-task file (no two original names fold onto one task).
    assert df.groupby("task")["original_task"].nunique().eq(1).all()


def test_mapping_targets_are_taskvec_tasks(tasks):
    assert set(paper.ORIGINAL_TO_TASKVEC.values()) == tasks


def test_mapping_pairs_by_meaning():
    m = paper.ORIGINAL_TO_TASKVEC
    assert m["linguistic_present_simple_past_simple"] == "present_past"
    assert m["linguistic_present_simple_gerund"] == "present_gerund"
    assert m["inflection_present_simple_past_simple"] == "present_past"
    assert m["linguistic_plural_singular"] == "plural_singular"
    assert m["linguistic_antonyms"] == "antonyms"
    assert m["translation_en_es"] == "en_es" and m["translation_es_en"] == "es_en"
    assert m["translation_fr_en"] == "fr_en" and m["translation_en_fr"] == "en_fr"


def test_unknown_original_name_fails_loudly():
    with pytest.raises(paper.PaperDataError, match="no taskvec name"):
        paper.to_taskvec_name("linguistic_made_up_task")
    assert issubclass(paper.PaperDataError, ValueError)


def test_dev_curve_argmax_is_best_layer():
    """best_layer is the earliest layer with the highest dev accuracy (ties exist: 14 of 54 curves)."""
    dev = paper.dev_curves()
    best = (dev.sort_values(["model", "task", "layer"])
            .loc[lambda d: d["dev_acc"] == d.groupby(["model", "task"])["dev_acc"].transform("max")]
            .groupby(["model", "task"])["layer"].min())
    expected = paper.per_task().set_index(["model", "task"])["best_layer"]
    pd.testing.assert_series_equal(best.sort_index(), expected.sort_index(), check_names=False)


def test_dev_curves_cover_every_layer():
    dev = paper.dev_curves()
    for (model, task), group in dev.groupby(["model", "task"]):
        n = group["n_layers"].iloc[0]
        assert list(group["layer"]) == list(range(n)), (model, task)
    assert len(dev.groupby(["model", "task"])) == 54


def test_depths_in_unit_interval():
    dev = paper.dev_curves()
    assert dev["relative_depth"].between(0, 1).all()
    assert dev["relative_depth"].min() == 0 and dev["relative_depth"].max() == 1
    per = paper.per_task()
    assert per["best_depth"].between(0, 1).all()
    assert (per["best_depth"] == per["best_layer"] / (per["n_layers"] - 1)).all()
    for col in ACCS:
        assert per[col].between(0, 1).all()
    assert dev["dev_acc"].between(0, 1).all()


def test_top_tokens_20_ranks_at_best_layer():
    top = paper.top_tokens()
    ranks = top.groupby(["model", "task"])["rank"].apply(list)
    assert len(ranks) == 54
    assert all(r == list(range(20)) for r in ranks)
    layers = top.groupby(["model", "task"])["layer"].unique()
    best = paper.per_task().set_index(["model", "task"])["best_layer"]
    for key, layer in layers.items():
        assert list(layer) == [best[key]], key
    assert top["token"].map(lambda t: isinstance(t, str)).all()


def test_top_tokens_keep_the_published_strings():
    raw = pd.read_csv(paper.DATA_DIR / "top_tokens_at_best_layer.csv")
    first = raw.iloc[0]
    top = paper.top_tokens()
    mine = top[(top["model"] == first["model"])
               & (top["task"] == paper.to_taskvec_name(first["task"]))].sort_values("rank")
    assert list(mine["token"]) == json.loads(first["top_tokens"])
    # Knowledge tasks project to the answers' words, with the leading space of the tokenizer.
    capitals = top[(top["model"] == "GPT-J 6B") & (top["task"] == "country_capital")]
    assert " Paris" in set(capitals["token"])


def test_conflicting_pairs(tasks):
    conf = paper.conflicting()
    assert set(conf["model"]) == {"LLaMA 13B"}
    assert set(conf["task_a"]) | set(conf["task_b"]) <= tasks
    pairs = set(zip(conf["task_a"], conf["task_b"]))
    assert pairs == {("next_letter", "to_upper"), ("list_last", "list_first"), ("prev_letter", "next_letter"),
                     ("present_past", "present_gerund"), ("en_es", "en_fr")}


def test_conflicting_agrees_with_table2_summary():
    conf = paper.conflicting().set_index(["task_a", "task_b"])
    s = paper.TABLE2_SUMMARY
    assert (conf["regular_acc_a"].min(), conf["regular_acc_a"].max()) == s["regular_on_a"]
    moved = conf.drop(index=("en_es", "en_fr"))
    assert (moved["conflicting_acc_b"].min(), moved["conflicting_acc_b"].max()) == s["conflicting_on_b"]
    pair = conf.loc[("en_es", "en_fr")]
    assert (pair["conflicting_acc_a"], pair["conflicting_acc_b"]) == (
        s["translation_pair"]["acc_a"], s["translation_pair"]["acc_b"])


def test_loaders_return_copies():
    for loader in (paper.per_task, paper.dev_curves, paper.top_tokens, paper.conflicting):
        df = loader()
        df.iloc[0, 0] = "changed"
        assert loader().iloc[0, 0] != "changed", loader.__name__


def test_data_lives_in_the_package():
    assert paper.DATA_DIR.parent == Path(paper.__file__).parent  # shipped beside the module (package data)
    for name in ("main_per_task.csv", "dev_accuracy_by_layer.csv", "top_tokens_at_best_layer.csv",
                 "conflicting_llama_13B.csv", "README.md"):
        assert (paper.DATA_DIR / name).is_file(), name


def test_loader_fails_on_unknown_name_in_a_file(tmp_path, monkeypatch):
    for name in ("main_per_task.csv", "conflicting_llama_13B.csv"):
        (tmp_path / name).write_bytes((paper.DATA_DIR / name).read_bytes())
    conf = tmp_path / "conflicting_llama_13B.csv"
    conf.write_text(conf.read_text().replace("translation_en_fr", "translation_en_de"))
    monkeypatch.setattr(paper, "DATA_DIR", tmp_path)
    paper._per_task.cache_clear()
    paper._conflicting.cache_clear()
    try:
        assert len(paper.per_task()) == 54
        with pytest.raises(paper.PaperDataError, match="translation_en_de"):
            paper.conflicting()
    finally:
        paper._per_task.cache_clear()
        paper._conflicting.cache_clear()


def test_mapping_agrees_with_what_theta_projects_to():
    """The data itself confirms the verb and knowledge mappings: GPT-J's θ for present_gerund projects to
    -ing forms, for present_past to -ed forms, for person_language to language names, for to_upper to capitals."""
    top = paper.top_tokens()
    gptj = top[top["model"] == "GPT-J 6B"].groupby("task")["token"].apply(list)
    n_ending = lambda task, suffix: sum(t.strip().endswith(suffix) for t in gptj[task])  # noqa: E731
    assert n_ending("present_gerund", "ing") >= 10 > n_ending("present_past", "ing")
    assert n_ending("present_past", "ed") >= 10 > n_ending("present_gerund", "ed")
    assert {" French", " English", " German", " Spanish"} <= set(gptj["person_language"])
    assert sum(t.isalpha() and t.isupper() for t in gptj["to_upper"]) >= 15


def test_top_token_strings_repeat_for_llama_only():
    """Different token ids can decode to the same string (LLaMA's SentencePiece with and without the word-start
    marker); the published lists keep both, so (model, task, token) is not unique, (model, task, rank) is."""
    top = paper.top_tokens()
    assert not top.duplicated(["model", "task", "rank"]).any()
    repeats = top[top.duplicated(["model", "task", "token"])]
    assert set(repeats["model"]) == {"LLaMA 7B"}
