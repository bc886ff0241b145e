"""The book reads offline: a throwaway Jupyter Book built with the real book's _config.yml.

Builds (about 10 s) a book of one markdown page and one pre-executed notebook with Altair charts,
then checks statically (taskvec.publishing.book.check_offline) and in headless Chromium driven by Playwright
(tests/browser.py: every request outside file:/data:/blob: recorded and aborted) that every chart
renders from the book's own files, answers the mouse (tooltip, legend selection), and that nothing
is fetched from outside; copies of the chart page with a planted CDN script, or planted faults, prove
the browser check sees them. The browser parts are skipped when /usr/bin/chromium is absent
(scripts/ensure_chromium.sh installs it), and fail instead on CI (tests/browser.py). The page also
glues numbers into its prose, to test tests/glue_check.py on a real build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from browser import BLOCKED, WIDTH, chromium, png_size  # noqa: F401 (chromium: a fixture)
from glue_check import check_glue, glue_roles, pasted_texts
from taskvec.publishing.book import VEGA_JS, build_book, check_offline

REPO = Path(__file__).resolve().parents[1]
CDN = "https://cdn.jsdelivr.net/npm/vega@6"

CHART_CELL = '''import altair as alt
import pandas as pd

df = pd.DataFrame({"layer": [1, 2, 3, 4, 5, 6], "accuracy": [0.10, 0.35, 0.80, 0.72, 0.55, 0.40],
                   "method": ["task vector"] * 6})
points = alt.Chart(df).mark_point(size=300, filled=True).encode(
    x="layer:Q", y="accuracy:Q", tooltip=["layer", "accuracy", "method"])
points'''
# A legend bound to a selection, as the book's charts have: clicking "early" dims the late points.
SECOND_CHART_CELL = '''pick = alt.selection_point(fields=["half"], bind="legend")
halves = df.assign(half=["early"] * 3 + ["late"] * 3)
line = alt.Chart(df).mark_line().encode(x="layer:Q", y="accuracy:Q")
dots = alt.Chart(halves).mark_point(size=200, filled=True).encode(
    x="layer:Q", y="accuracy:Q", color="half:N",
    opacity=alt.condition(pick, alt.value(1.0), alt.value(0.1))).add_params(pick)
(line + dots).properties(title="θ by layer")'''
TABLE_CELL = '''print("θ extracted at layer", 3)
df.head(3)'''
# Glued values, placed by the markdown below: two numbers the page also shows elsewhere (the table
# holds 0.10 and 0.35), a string to escape, a percentage, and a heading the sidebar's contents repeat.
GLUE_CELL = '''from myst_nb import glue
glue("low", 0.10, display=False)
glue("high", 0.35, display=False)
glue("label", "θ <&> vector", display=False)
glue("share", 0.875, display=False)
glue("n_layers", 6)'''
GLUE_PROSE = ("## Over {glue:text}`n_layers` layers\n\n"
              "Accuracy rises from {glue:text}`low:.2f` to {glue:text}`high:.2f` for the {glue:text}`label`, "
              "{glue:text}`share:.0%` of the way; ``{glue:text}`low` `` quoted in code is not a role.\n\n"
              ":::{note}\nStill {glue:text}`n_layers:d` layers.\n:::\n")


def _write_notebook(path: Path) -> None:
    """A notebook executed now, as the real ones are before the build (kernel python3)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Chart page\n\nAccuracy by layer; hover a point for its tooltip."),
        nbformat.v4.new_code_cell(CHART_CELL),
        nbformat.v4.new_code_cell(SECOND_CHART_CELL),
        nbformat.v4.new_code_cell(TABLE_CELL),
        nbformat.v4.new_code_cell(GLUE_CELL),
        nbformat.v4.new_markdown_cell(GLUE_PROSE),
    ]
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(html folder, build seconds) of a minimal book using the real book's settings."""
    root = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    config["title"] = "taskvec offline test book"
    (root / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "_toc.yml").write_text(yaml.safe_dump(
        {"format": "jb-book", "root": "book/intro", "chapters": [{"file": "book/sections/chart"}]}))
    (root / "book" / "sections").mkdir(parents=True)
    (root / "book" / "_static").mkdir()
    shutil.copy(REPO / "book" / "_static" / "taskvec.css", root / "book" / "_static")  # named by _config.yml
    (root / "book" / "intro.md").write_text(
        "# Intro\n\nThe task vector θ costs $5 and $6: dollars stay dollars, no math typesetting. "
        "A [link](https://arxiv.org/abs/2310.15916) to the paper is fine offline.\n")
    _write_notebook(root / "book" / "sections" / "chart.ipynb")
    # Folders the real config excludes must never be read: a broken page in one would fail -W.
    for skipped in ("nb", "tests", "results"):
        (root / skipped).mkdir()
        (root / skipped / "broken.md").write_text("no title, {unknown-role}`x` and a [dangling](nowhere.md)\n")
    t0 = time.monotonic()
    html = build_book(root)
    return html, time.monotonic() - t0


def test_book_builds_with_local_vega(built):
    html, seconds = built
    assert (html / "book" / "sections" / "chart.html").is_file()
    assert (html / "_static" / VEGA_JS).is_file()
    assert not list(html.rglob("broken.html")), "excluded folders were built"
    page = (html / "book" / "sections" / "chart.html").read_text()
    assert f"_static/{VEGA_JS}" in page
    assert page.count('id="altair-viz-') == 2
    print(f"book built in {seconds:.1f} s")


def test_book_is_offline_statically(built):
    html, _ = built
    assert check_offline(html) == []
    for page in html.rglob("*.html"):
        text = page.read_text().lower()
        assert not re.search(r"<script[^>]*mathjax|mathjax\.js|tex-[a-z-]*\.js", text), f"{page} loads MathJax"
        assert "thebe" not in text, f"{page} carries Thebe"
    assert "$5 and $6" in (html / "book" / "intro.html").read_text()


def test_charts_render_offline(built, chromium):
    html, _ = built
    shots = html.parent / "screenshots"
    report = chromium.render_check(html / "book" / "sections" / "chart.html", timeout_s=60,
                                   screenshot=shots / "book__sections__chart.png")
    print(report.summary())
    assert report.faults() == [], report.summary()
    assert report.charts == report.rendered == 2, report.summary()
    assert all(n > 0 for n in report.marks), report.summary()
    assert report.tooltip and "accuracy" in report.tooltip, f"tooltip did not show: {report.summary()}"
    assert report.selections == {"chart 1: half_legend_symbols": True}, report.summary()
    assert report.versions["vegaLite"] == report.vega_debug["vegalite_version"], report.summary()
    assert any(f"/_static/{VEGA_JS}" in u for u in report.requests), report.requests  # the local bundle
    assert png_size(report.screenshot)[0] == WIDTH and report.screenshot.stat().st_size > 5000, report.screenshot
    intro = chromium.render_check(html / "book" / "intro.html", timeout_s=60, screenshot=shots / "book__intro.png")
    assert intro.faults() == [] and intro.charts == 0, intro.summary()


@pytest.fixture(scope="module")
def cdn_page(built, tmp_path_factory):
    """A copy of the built site whose chart page also pulls a script from a CDN."""
    html, _ = built
    site = tmp_path_factory.mktemp("cdn") / "html"
    shutil.copytree(html, site)
    page = site / "book" / "sections" / "chart.html"
    text = page.read_text()
    page.write_text(text.replace("</head>", f'<script src="{CDN}"></script>\n</head>', 1))
    return site, page


def test_check_offline_reports_cdn_script(cdn_page):
    site, _ = cdn_page
    problems = check_offline(site)
    assert len(problems) == 1 and CDN in problems[0] and "book/sections/chart.html" in problems[0], problems


def test_render_check_reports_cdn_request(cdn_page, chromium):
    """The CDN script is requested, recorded and aborted (never fetched); the rest of the page is fine."""
    _, page = cdn_page
    report = chromium.render_check(page, timeout_s=30)
    assert report.outside_requests == [CDN], report.summary()
    assert report.aborted == [CDN], report.summary()
    assert report.failed_requests.get(CDN, "").startswith(BLOCKED), report.failed_requests
    assert f"outside request: {CDN}" in report.faults(), report.summary()
    assert not [f for f in report.faults() if "NOT aborted" in f or "chart" in f or "JS exception" in f], \
        report.summary()
    assert report.rendered == report.charts == 2, report.summary()  # the local bundle still draws the charts


def planted_chart_page(html: Path, tmp_path: Path, head: str, before_chart: str) -> Path:
    """A copy of the built book whose chart page has ``head`` at the end of its <head> and ``before_chart``
    just before its first chart."""
    site = tmp_path / "html"
    shutil.copytree(html, site)
    page = site / "book" / "sections" / "chart.html"
    text = page.read_text().replace("</head>", head + "</head>", 1)
    page.write_text(text.replace('<div id="altair-viz-', before_chart + '<div id="altair-viz-', 1))
    return page


def test_render_check_reports_planted_faults(built, chromium, tmp_path):
    """A copy of the chart page with an exception, a chart container nothing draws, and charts the mouse
    cannot reach: each one is a fault of the report, so a passing page means none of these happened."""
    html, _ = built
    page = planted_chart_page(html, tmp_path, (
        '<style>.vega-embed svg { pointer-events: none !important; }</style>\n'
        '<script>window.addEventListener("load", () => { throw new Error("planted failure"); });</script>\n'),
        '<div id="altair-viz-planted"></div>\n')
    report = chromium.render_check(page, timeout_s=10)
    faults = "\n".join(report.faults())
    for expected in ["JS exception: Error: planted failure", "only 2 of 3 charts drawn",
                     "timed out waiting for every chart drawn", "no tooltip with the mouse on a data mark",
                     "legend selection did not change the marks (chart 2: half_legend_symbols)"]:
        assert expected in faults, f"{expected!r} not reported:\n{report.summary()}"
    assert report.outside_requests == [], report.summary()


def test_check_offline_catches_each_kind(tmp_path):
    """Every way of loading from outside is reported; plain links are not."""
    (tmp_path / "page.html").write_text(
        '<html><head><link rel="stylesheet" href="//fonts.example.org/a.css">'
        '<link rel="canonical" href="https://example.org/page.html">'
        '<style>body { background: url("https://img.example.org/bg.png"); }</style></head><body>'
        '<a href="https://arxiv.org/abs/2310.15916">paper</a>'
        '<img src="http://img.example.org/x.png"><iframe src="https://embed.example.org/"></iframe>'
        "<script>fetch('https://api.example.org/data.json')</script>"
        '<div style="background-image:url(https://img.example.org/y.png)"></div></body></html>')
    (tmp_path / "app.js").write_text('var s = document.createElement("script"); s.src = "https://unpkg.com/x.js";\n'
                                     'const docs = "https://vega.github.io/vega/docs/";\n')
    (tmp_path / "style.css").write_text('@import "https://fonts.example.org/b.css";\n.a { color: red }\n')
    problems = "\n".join(check_offline(tmp_path))
    for url in ["//fonts.example.org/a.css", "https://img.example.org/bg.png", "http://img.example.org/x.png",
                "https://embed.example.org/", "https://api.example.org/data.json", "https://img.example.org/y.png",
                "https://unpkg.com/x.js", "https://fonts.example.org/b.css"]:
        assert url in problems, f"{url} not reported:\n{problems}"
    for url in ["arxiv.org", "https://example.org/page.html", "vega.github.io"]:
        assert url not in problems, f"{url} wrongly reported:\n{problems}"


def test_check_offline_needs_local_vega_for_altair(built, tmp_path):
    """An Altair page without the local bundle would fetch vega from a CDN: reported."""
    html, _ = built
    (tmp_path / "chart.html").write_text((html / "book" / "sections" / "chart.html").read_text())
    problems = check_offline(tmp_path)
    assert any("vega-lite@" in p and "CDN" in p for p in problems), problems


def _chart_page(built) -> tuple[Path, Path]:
    """The executed chart notebook and its built page (the book's html is <root>/book/_build/html)."""
    html, _ = built
    return html.parents[1] / "sections" / "chart.ipynb", html / "book" / "sections" / "chart.html"


def test_glued_values_sit_at_their_place(built):
    """tests/glue_check.py on a real build: every {glue:text} role, in order, against the page's spans."""
    notebook, page = _chart_page(built)
    roles = [(r.name, r.expected) for r in glue_roles(notebook)]
    assert roles == [("n_layers", "6"), ("low", "0.10"), ("high", "0.35"), ("label", "θ <&> vector"),
                     ("share", "88%"), ("n_layers", "6")], roles
    assert page.read_text().count('class="pasted-text"') > len(roles)  # the sidebar's contents repeat the heading
    assert pasted_texts(page) == [expected for _, expected in roles]  # ... and are not counted
    assert check_glue(notebook, page) == []


def test_glue_check_catches_a_misplaced_value(built):
    """Two glued numbers swapped on the page: both still appear on it (a substring search passes), yet
    each is at the wrong place."""
    notebook, page = _chart_page(built)
    text = page.read_text()
    low, high = '<span class="pasted-text">0.10</span>', '<span class="pasted-text">0.35</span>'
    assert text.count(low) == text.count(high) == 1
    swapped = text.replace(low, "@LOW@").replace(high, low).replace("@LOW@", high)
    assert "0.10" in swapped and "0.35" in swapped
    problems = check_glue(notebook, swapped)
    assert len(problems) == 2, problems
    assert "`low:.2f`" in problems[0] and "'0.35'" in problems[0] and "'0.10'" in problems[0], problems
    assert "`high:.2f`" in problems[1], problems
    # A value that lost its span (written as plain text) shifts every later one and changes the count.
    unglued = text.replace(low, "0.10")
    problems = check_glue(notebook, unglued)
    assert problems and "6 {glue:text} roles in the notebook but 5 glued values on the page" in problems[-1], problems
    # A stale value (the page from an older run) is caught too.
    assert check_glue(notebook, text.replace(high, '<span class="pasted-text">0.36</span>'))


def test_ensure_chromium_fails_on_ci_when_it_cannot_install(tmp_path):
    """On CI a missing browser must stop the run (tests would fail anyway); elsewhere it only warns."""
    script = REPO / "scripts" / "ensure_chromium.sh"
    missing = str(tmp_path / "no-chromium")
    for ci, rc in [("true", 1), ("1", 1), ("", 0), ("false", 0), ("0", 0)]:
        env = {**os.environ, "CI": ci, "TASKVEC_CHROMIUM": missing}
        run = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == rc, (ci, run.stdout, run.stderr)
        assert missing in run.stdout + run.stderr, (ci, run.stdout, run.stderr)
        assert ("error:" in run.stderr) == (rc == 1), (ci, run.stdout, run.stderr)


def test_render_check_reports_what_a_reader_should_never_see(built, chromium, tmp_path):
    """Planted on a copy of the chart page: a written-out NaN, a folder of the build machine, a table wider than
    its column, legend swatches that draw nothing, and (at 390 px) a chart drawn wider than the screen."""
    html, _ = built
    page = planted_chart_page(html, tmp_path, (
        '<style>g[class*="_legend_symbols"] path { fill: none !important; stroke: none !important; }\n'
        'html body .cell_output .vega-embed svg.marks.marks { max-width: none !important; width: 900px !important; }'
        '</style>\n'),
        '<p>mean accuracy nan, read from /tmp/build-42/run_log.json</p><div class="cell_output">'
        '<table style="display: block; overflow-x: auto; max-width: 100%"><tr><td style="white-space: nowrap">'
        + "0.88 [0.53, 0.98] " * 80 + "</td></tr></table></div>")
    faults = "\n".join(chromium.render_check(page, timeout_s=30, tooltip=False, selections=False).faults())
    for expected in ["a missing value written out", "mean accuracy nan, read from", "a folder of the build machine",
                     "table wider than its column", "legend entry without a swatch"]:
        assert expected in faults, f"{expected!r} not reported:\n{faults}"
    phone = "\n".join(chromium.render_check(page, timeout_s=30, tooltip=False, selections=False, width=390).faults())
    assert "chart wider than the 390 px viewport" in phone, phone
