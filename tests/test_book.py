"""The whole book on the tiny profile, through the runner users use: every notebook executes, the
book builds with warnings as errors, every page opens in a browser (tests/browser.py) with every chart
drawn and answering the mouse, no JS error and nothing requested from outside, each page leaves a
screenshot in the build folder, and a second run reuses everything."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from browser import WIDTH, chromium, png_size  # noqa: F401 (chromium: a fixture)
from glue_check import check_glue, glue_roles
from taskvec.publishing import book, runner
from taskvec.publishing import sections
from taskvec.settings import Protocol

ROOT = Path(__file__).parent.parent
CHART_PAGES = {"intro": 1, "data": 1, "finding_L": 2, "accuracy": 2, "geometry": 2, "dominance": 2, "beyond": 2, "needs": 2, "heads": 3,
               "comparison": 1}  # charts per page; every other page has none
SELECTION_PAGES = {"finding_L", "accuracy", "geometry"}  # a legend bound to a selection (taskvec/publishing/charts.py)
# The root index.html is nothing but this redirect, so the browser opens book/intro.html instead.
INDEX_REDIRECT = re.compile(r'\s*<meta http-equiv="Refresh" content="0; url=book/sections/intro.html" />\s*')
MIN_SCREENSHOT_BYTES = 5000
PHONE = 390  # px: the width a phone gives the page


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


def _toc_pages() -> set[str]:
    """Every page _toc.yml names (without suffix)."""
    def files(node):
        if isinstance(node, dict):
            yield from ([node["file"]] if "file" in node else [])
            for value in node.values():
                yield from files(value)
        elif isinstance(node, list):
            for item in node:
                yield from files(item)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {toc["root"], *files(toc)}


def _html_pages(html: Path) -> list[Path]:
    """The book's html pages: all but the theme's fragments in _static/ and the root index.html (a redirect)."""
    return sorted(p for p in html.rglob("*.html")
                  if p.relative_to(html).parts[0] != "_static" and p.relative_to(html) != Path("index.html"))


def test_book_is_offline_statically(built):
    _, record = built
    assert book.check_offline(Path(record["html"])) == []


def test_every_page_in_the_browser_with_a_screenshot(built, chromium):
    """Every html page (search and genindex included) in Chromium: the expected charts, all drawn, the
    tooltip and legend selections working, no JS error, no request outside the book; and its full-page
    screenshot, 1280 px wide, at <build folder>/screenshots/<page path, / as __>.png for a reviewer."""
    _, record = built
    html = Path(record["html"])
    assert INDEX_REDIRECT.fullmatch((html / "index.html").read_text()), \
        "index.html is no longer a bare redirect to book/sections/intro.html: open it in the browser too"
    pages = _html_pages(html)
    names = {p.relative_to(html).with_suffix("").as_posix() for p in pages}
    assert _toc_pages() | {"search", "genindex"} <= names, sorted(names)
    shots = html.parent / "screenshots"
    problems = []
    numbers = {"Figure": [], "Table": []}  # caption numbers as the pages show them, book-wide
    for page in pages:
        rel = page.relative_to(html).with_suffix("").as_posix()
        report = chromium.render_check(page, screenshot=shots / f"{rel.replace('/', '__')}.png")
        print(report.summary())
        faults = report.faults()
        if report.charts != CHART_PAGES.get(page.stem, 0):
            faults.append(f"{report.charts} charts, expected {CHART_PAGES.get(page.stem, 0)}")
        if not all(n > 0 for n in report.marks):
            faults.append(f"a drawn chart without data marks: {report.marks}")
        if bool(report.selections) != (page.stem in SELECTION_PAGES):
            faults.append(f"legend selections {report.selections}, expected "
                          f"{'some' if page.stem in SELECTION_PAGES else 'none'}")
        shot = report.screenshot
        if shot is None or not shot.is_file():
            faults.append(f"no screenshot at {shot}")
        else:
            width, height = png_size(shot)
            if width != WIDTH or shot.stat().st_size <= MIN_SCREENSHOT_BYTES:
                faults.append(f"screenshot {shot} is {width}x{height} px, {shot.stat().st_size} bytes "
                              f"(expected {WIDTH} px wide, over {MIN_SCREENSHOT_BYTES} bytes)")
        problems += [f"{rel}: {fault}" for fault in faults]
        for kind, number in re.findall(r"(?m)^(Figure|Table) (\d+)\. ", report.text):
            numbers[kind].append((int(number), rel))
    for stem in CHART_PAGES:  # on a phone, every chart fits the screen (scaled down, not cut)
        page = next(p for p in pages if p.stem == stem)
        report = chromium.render_check(page, tooltip=False, selections=False, width=PHONE)
        problems += [f"{page.relative_to(html).with_suffix('').as_posix()} at {PHONE} px: {fault}"
                     for fault in report.faults()]
    for kind, found in numbers.items():  # one numbering for the book: 1, 2, ... each number once
        got = sorted(n for n, _ in found)
        if got != list(range(1, len(got) + 1)):
            problems.append(f"{kind} numbers are not 1..{len(got)} once each: {sorted(found)}")
    print(f"{len(pages)} screenshots in {shots}")
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(f"{n.replace('/', '__')}.png" for n in names)
    assert problems == [], "\n".join(problems)


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
    results = sections.main_results(tiny.models, tiny.tasks, Protocol(**tiny.protocol_settings()), progress=False)
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
    assert cached == {name: name not in ("provenance", "intro") for name in runner.NOTEBOOKS}  # both read the run itself
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
           "-y", yaml.safe_dump({"tasks": tiny.tasks, "protocol": tiny.protocol_settings()})]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
