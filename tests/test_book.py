"""The whole book on the tiny profile, through the runner users use: every notebook executes, the
book builds with warnings as errors, every chart renders in a browser with the network cut, nothing
is requested from outside, and a second run reuses everything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from browser import require_chromium
from glue_check import check_glue, glue_roles
from taskvec import book, runner, sections

ROOT = Path(__file__).parent.parent
CHART_PAGES = {"data": 1, "finding_L": 2, "accuracy": 2, "geometry": 2, "dominance": 2, "comparison": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("_build", "sections", "vega-offline.js"))
    (root / "tasks").mkdir()
    shutil.copy(ROOT / "tasks" / "README.md", root / "tasks" / "README.md")
    record = runner.run("tiny", book_root=root, log=lambda *_: None)
    return root, record


def test_every_notebook_executes_without_errors(built):
    root, record = built
    assert set(record["notebooks"]) == set(runner.NOTEBOOKS)
    for name in runner.NOTEBOOKS:
        nb = nbformat.read(root / "book" / "sections" / f"{name}.ipynb", as_version=4)
        assert nb.metadata["taskvec"]["key"]
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, name
        assert nb.cells[0].source.startswith("# "), f"{name} needs a title heading"


def test_book_is_offline_and_every_chart_renders(built):
    root, record = built
    html = Path(record["html"])
    assert book.check_offline(html) == []
    require_chromium()  # skips without the browser; fails on CI (tests/browser.py)
    for page in ["intro", "method", "ndif"] + [f"sections/{n}" for n in runner.NOTEBOOKS]:
        result = book.render_check(html / "book" / f"{page}.html")
        name = page.split("/")[-1]
        assert result["charts"] == CHART_PAGES.get(name, 0), (page, result)
        assert result["rendered"] == result["charts"], (page, result)
        assert result["outside_requests"] == [], (page, result)
        assert result["exceptions"] == [], (page, result)


@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_every_glued_value_sits_at_its_place(built, name):
    """Each {glue:text} role of the executed notebook, in order, against the i-th glued span of its page
    (tests/glue_check.py): a swapped, stale or unglued number fails, wherever else it appears on the page."""
    root, record = built
    notebook = root / "book" / "sections" / f"{name}.ipynb"
    page = Path(record["html"]) / "book" / "sections" / f"{name}.html"
    problems = check_glue(notebook, page)
    assert problems == [], f"{name}:\n" + "\n".join(problems)


def test_numbers_in_the_prose_come_from_the_results(built):
    """The accuracy page's glued means are the ones the results give, computed here independently."""
    root, record = built
    default, profiles = runner.load_experiments(ROOT / "experiments.yaml")
    tiny = profiles["tiny"]
    results = sections.main_results(tiny.models, tiny.tasks, sections.protocol_from(tiny.protocol), progress=False)
    avg = sections.averages(results).iloc[0]
    shown = {}
    for role in glue_roles(root / "book" / "sections" / "accuracy.ipynb"):
        shown.setdefault(role.name, []).append((role.fmt, role.expected))
    for col in ("baseline_acc", "hypothesis_acc", "regular_acc"):
        assert shown.get(col), f"accuracy.ipynb's prose no longer shows {col}"
        for fmt, text in shown[col]:
            assert text == format(float(avg[col]), fmt), (col, fmt, text)
    # and the page shows them where the roles are (the check above is on the notebook, this on the page)
    assert check_glue(root / "book" / "sections" / "accuracy.ipynb",
                      Path(record["html"]) / "book" / "sections" / "accuracy.html") == []


def test_second_run_reuses_everything(built):
    root, _ = built
    record = runner.run("tiny", book_root=root, build=False, log=lambda *_: None)
    cached = {name: info["cached"] for name, info in record["notebooks"].items()}
    assert cached == {name: name != "provenance" for name in runner.NOTEBOOKS}
    log = json.loads((root / "book" / "sections" / "run_log.json").read_text())
    assert log["profile"] == "tiny"


def test_a_notebook_reexecutes_by_hand_with_papermill(built, tmp_path):
    """The papermill habit: one section, parameters on the command line (a plain -p string for models)."""
    import subprocess
    import sys

    import yaml

    _, profiles = runner.load_experiments(ROOT / "experiments.yaml")
    tiny = profiles["tiny"]
    out = tmp_path / "accuracy.ipynb"
    cmd = [str(Path(sys.executable).parent / "papermill"), str(ROOT / "nb" / "accuracy.ipynb"), str(out),
           "-k", "python3", "-p", "models", tiny.models[0],
           "-y", yaml.safe_dump({"tasks": tiny.tasks, "protocol": tiny.protocol})]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
