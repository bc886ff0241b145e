"""The intro's findings table: what sections record is what the intro reads back, and the parameters line that
replaces papermill's injected cell on each page."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from taskvec.publishing import findings as F
from taskvec.publishing.runner import _summarize_parameters, parameters_line

GEMMA = F.Row("gemma-3-270m", "Hypothesis keeps 91% [85%, 96%] of Regular", "reproduced")
SMOL = F.Row("smollm2-135m", "Hypothesis keeps 60% [50%, 70%] of Regular", "partly")


def glued_notebook(path: Path, text: str | None) -> None:
    """An executed notebook as myst_nb's glue leaves it: a display_data output with the record mime type."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("glue(...)")
    if text is not None:
        cell.outputs = [nbformat.v4.new_output("display_data", data={
            "application/papermill.record/text/plain": repr(text), "text/plain": repr(text)},
            metadata={"scrapbook": {"name": F.KEY, "mime_prefix": "application/papermill.record/"}})]
    nb.cells = [cell]
    nbformat.write(nb, path)


def test_a_recorded_finding_is_read_back_in_page_order(tmp_path):
    accuracy = F.Finding("accuracy", "Accuracy", "θ keeps most of ICL", (GEMMA, SMOL))
    layer = F.Finding("finding_L", "Finding L", "an intermediate layer", (F.Row("gemma-3-270m", "0.65", "partly"),))
    glued_notebook(tmp_path / "accuracy.ipynb", F.record(accuracy))
    glued_notebook(tmp_path / "finding_L.ipynb", F.record(layer))
    glued_notebook(tmp_path / "geometry.ipynb", None)  # executed, records nothing: left out
    got = F.collect(tmp_path, ["finding_L", "accuracy", "geometry", "dominance"])  # dominance: not executed
    assert got == [layer, accuracy]


def test_the_table_links_each_page_and_marks_a_model_a_page_lacks():
    table = F.table([F.Finding("accuracy", "Accuracy", "claim", (GEMMA, SMOL)),
                     F.Finding("finding_L", "Finding L", "claim L", (F.Row("gemma-3-270m", "0.65", "partly"),))])
    assert list(table.columns) == ["experiment", "the paper's claim", "gemma-3-270m", "smollm2-135m"]
    assert table.loc[0, "experiment"] == '<a href="accuracy.html">Accuracy</a>'
    assert table.loc[0, "smollm2-135m"] == "<b>partly</b>: Hypothesis keeps 60% [50%, 70%] of Regular"
    assert table.loc[1, "smollm2-135m"] == "–"
    assert "nan" not in table.to_string().lower()


def test_a_record_that_cannot_be_read_names_its_notebook(tmp_path):
    glued_notebook(tmp_path / "accuracy.ipynb", json.dumps({"page": "accuracy"}))  # no experiment, claim, rows
    with pytest.raises(F.FindingsError, match="accuracy.ipynb: its recorded finding cannot be read"):
        F.collect(tmp_path, ["accuracy"])


def test_a_grade_outside_the_rules_is_refused():
    with pytest.raises(ValueError, match="grade must be one of"):
        F.Row("m", "1.0", "mostly")


def test_parameters_are_counted_without_weights(tmp_path):
    from conftest import tiny_model

    model = tiny_model("llama")
    model.hf.save_pretrained(tmp_path / "tiny")
    assert F.parameter_count(str(tmp_path / "tiny")) == sum(p.numel() for p in model.hf.parameters())
    assert F.paper_parameters("LLaMA 13B") == 13e9 and F.paper_parameters("Pythia 2.8B") == 2.8e9
    with pytest.raises(ValueError, match="no size"):
        F.paper_parameters("GPT-J")


def test_the_parameters_line_says_what_ran_and_no_machine_path():
    line = parameters_line({"models": ["gemma-3-270m", "smollm2-135m"], "protocol": {"n_test": 6},
                            "cache_dir": "/tmp/x", "remote": False, "beside": {"meta-llama/Llama-2-7b-hf": True},
                            "run_log": "/tmp/build/run_log.json", "top_k": 20, "tasks": []}, [])
    assert line == ("*Parameters:* models gemma-3-270m, smollm2-135m · protocol: n_test 6 · runs here · "
                    "runs beside: none cached · top_k 20.")
    shown = parameters_line({"models": ["m"], "remote": "http://127.0.0.1:8001", "beside": {"a": True}}, ["a (NDIF)"])
    assert "runs on NDIF (http://127.0.0.1:8001)" in shown and "runs beside: a (NDIF)" in shown


def test_the_injected_cell_is_hidden_and_summarized():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("models = []", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("models = ['x']", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("1")]
    _summarize_parameters(nb, "*Parameters:* models x.")
    assert "remove-cell" in nb.cells[2].metadata["tags"]
    assert nb.cells[3].cell_type == "markdown" and nb.cells[3].source == "*Parameters:* models x."
    assert len(nb.cells) == 5


def test_a_token_shows_its_spaces_and_names_what_draws_nothing():
    from taskvec.publishing.charts import show_token

    assert show_token(" Paris") == "' Paris'"
    assert show_token("\u202aab") == "'⟨U+202A⟩ab'"
    assert show_token("\n") == "'⟨U+000A⟩'"
    assert show_token("了承") == "'了承'"  # a real character stays itself


def test_by_model_gives_one_table_per_model_and_none_repeats_the_model(capsys):
    import pandas as pd

    from taskvec.publishing.charts import by_model

    frame = pd.DataFrame({"model": ["a", "a", "b"], "task": ["x", "y", "x"], "hypothesis_acc": [0.5, None, 0.25]})
    one = by_model(frame[frame["model"] == "a"])
    html = one.to_html()
    assert "model" not in html and "Hypothesis" in html and "–" in html  # readable name, a dash for the gap
    assert by_model(frame) is None  # several models: each table shown in turn
    shown = capsys.readouterr().out
    assert shown.count("Styler") == 2 and shown.count("<IPython.core.display.HTML") == 2
