"""The book in a browser: headless Chromium driven by Playwright, and the one rule for these checks:
without Chromium they skip on a workstation and FAIL on CI.

CI is any environment where ``CI`` is set to something other than empty, ``false`` or ``0`` (GitHub
Actions, GitLab and ``.ci/run`` set ``CI=true``); there, scripts/ensure_chromium.sh must have
installed it, so a missing browser is a broken setup, not a reason to check less.

:meth:`Browser.render_check` opens a built page the way a reader does, from ``file:``, in Debian's
Chromium (:data:`CHROMIUM`, given to Playwright as ``executable_path``: Playwright's own browser
download is never used). One launch serves many pages; each page gets a fresh context (no cache, no
state from the page before). What it proves about a page:

* **Nothing leaves the book.** Every request goes through ``BrowserContext.route``: ``file:``,
  ``data:`` and ``blob:`` go on, anything else is recorded and aborted (``net::ERR_BLOCKED_BY_CLIENT``),
  so it is reported and never reaches the network. WebSockets are recorded and closed the same way
  (``route_web_socket``), and service workers are blocked so that none can fetch behind the route.
* **No JavaScript error.** Uncaught exceptions (``pageerror``) and ``console.error`` messages are kept.
* **Every chart is drawn.** After ``load`` it waits until every chart container (``div[id^=altair-viz]``
  / ``.vega-embed``, outermost only) holds vega's ``svg.marks``/``canvas.marks`` or shows an error,
  then until the network is idle, so a late request is still seen.
* **The charts answer the reader.** The mouse hovers a data mark of the first drawn chart (vega-tooltip's
  element must show), and clicks the first entry of every legend bound to a selection (vega-lite names
  those ``<field>_legend_symbols``): the opacity of the chart's marks must change.

Before the mouse moves, a full-page screenshot 1280 px wide is saved where asked, for a reviewer to
look at without a browser.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

# Debian's chromium (scripts/ensure_chromium.sh); TASKVEC_CHROMIUM points elsewhere (a missing path skips the checks).
CHROMIUM = os.environ.get("TASKVEC_CHROMIUM", "/usr/bin/chromium")
WIDTH = 1280  # viewport and screenshot width, px
HEIGHT = 1000
LOCAL_SCHEMES = ("file", "data", "blob")  # what a page of the book may load; everything else is aborted
BLOCKED = "net::ERR_BLOCKED_BY_CLIENT"  # how an aborted request fails (route.abort("blockedbyclient")): a prefix


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0", "no")


def require_chromium() -> None:
    """Returns when Chromium is there, else skips the test (or fails it on CI)."""
    if Path(CHROMIUM).exists():
        return
    if on_ci():
        pytest.fail(f"{CHROMIUM} missing on CI (CI={os.environ['CI']!r}): scripts/ensure_chromium.sh should have "
                    "installed it; the browser checks cannot be skipped there", pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed (run scripts/ensure_chromium.sh as root): browser checks skipped")


# --------------------------------------------------------------------------------------------
# What the page shows, read in the page

_CHARTS = "[...new Set(document.querySelectorAll('div[id^=\"altair-viz\"], .vega-embed'))]" \
          ".filter((e, _, all) => !all.some(o => o !== e && o.contains(e)))"

_CHART_STATE_JS = rf"""() => {{
  const charts = {_CHARTS};
  const rendered = charts.filter(e => e.querySelector('svg.marks, canvas.marks'));
  const errors = charts.filter(e => e.querySelector('.error') || /Error/.test(e.textContent || ''))
                       .map(e => (e.textContent || '').slice(0, 300));
  return {{
    ready: document.readyState, charts: charts.length, rendered: rendered.length, errors,
    marks: rendered.map(e => e.querySelectorAll('.role-mark > *').length),
    legends: charts.map(e => e.querySelectorAll('g[class*="_legend_symbols"]').length > 0),
    versions: {{vega: window.vega && window.vega.version, vegaLite: window.vegaLite && window.vegaLite.version,
               vegaEmbed: window.vegaEmbed && window.vegaEmbed.version}},
    vega_debug: (typeof VEGA_DEBUG == "undefined") ? null : VEGA_DEBUG,
  }};
}}"""

_CHARTS_SETTLED_JS = rf"""() => {{
  const s = ({_CHART_STATE_JS})();
  return s.ready === 'complete' && s.rendered + s.errors.length >= s.charts;
}}"""

# Centre of a data mark of the first drawn (SVG) chart that the mouse really hits there
# (elementFromPoint: not a hollow point's empty middle nor a line's bounding box), scrolled into view;
# filled shapes first.
_MARK_POINT_JS = rf"""() => {{
  const svg = ({_CHARTS}).map(c => c.querySelector('svg.marks')).find(s => s);
  if (!svg) return null;
  const marks = [...svg.querySelectorAll('.mark-symbol.role-mark > *, .mark-rect.role-mark > *, .mark-arc.role-mark > *'),
                 ...svg.querySelectorAll('.role-mark > *')].slice(0, 400);
  for (const el of marks) {{
    let r = el.getBoundingClientRect();
    if (!(r.width > 0 && r.height > 0)) continue;
    if (r.top < 0 || r.bottom > window.innerHeight || r.left < 0 || r.right > window.innerWidth) {{
      el.scrollIntoView({{block: 'center', inline: 'center', behavior: 'instant'}});
      r = el.getBoundingClientRect();
    }}
    const x = r.x + r.width / 2, y = r.y + r.height / 2;
    if (document.elementFromPoint(x, y) === el) return {{x, y}};
  }}
  return null;
}}"""

_TOOLTIP_SHOWN_JS = """() => { const t = document.getElementById('vg-tooltip-element');
                              return t && t.classList.contains('visible') ? t.textContent : null; }"""

# What a selection changes: the opacities of chart i's data marks, as one string.
_MARK_OPACITIES_JS = rf"""(i) => [...({_CHARTS})[i].querySelectorAll('.role-mark > *')]
  .map(e => ['opacity', 'fill-opacity', 'stroke-opacity'].map(a => e.getAttribute(a)).join()).join('|')"""

_FIRST_LEGEND_ENTRY_JS = rf"""(i) => {{
  const sym = ({_CHARTS})[i].querySelector('g[class*="_legend_symbols"] > *');
  if (!sym) return null;
  sym.scrollIntoView({{block: 'center', inline: 'center', behavior: 'instant'}});
  const r = sym.getBoundingClientRect();
  return {{x: r.x + r.width / 2, y: r.y + r.height / 2,
          legend: [...sym.parentElement.classList].find(c => c.endsWith('_legend_symbols'))}};
}}"""

_SELECTION_CHANGED_JS = f"([i, before]) => ({_MARK_OPACITIES_JS})(i) !== before"

# What a reader reads: the article's text, and each output table's width against the width it is given.
_READER_JS = """() => {
  const main = document.querySelector('main') || document.body;
  const tables = [...main.querySelectorAll('.cell_output table')].map(t => ({
    scroll: t.scrollWidth, client: t.clientWidth,
    head: [...t.querySelectorAll('th')].slice(0, 3).map(th => th.innerText.trim()).join(' | ')}));
  const charts = [...document.querySelectorAll('.vega-embed')].filter(e => !e.parentElement.closest('.vega-embed'))
    .map(e => { const r = (e.querySelector('svg.marks, canvas.marks') || e).getBoundingClientRect();
                return {left: Math.round(r.left), right: Math.round(r.right), width: Math.round(r.width)}; });
  // A legend entry whose swatch draws nothing (no fill, no stroke, or fully transparent) explains no mark.
  const blank = [...document.querySelectorAll('g[class*="_legend_symbols"] path')].filter(p => {
      const cs = getComputedStyle(p);
      const paints = [cs.fill, cs.stroke].some(v => v && v !== 'none' && v !== 'transparent' && !/rgba\(.*,\s*0\)$/.test(v));
      return !paints || parseFloat(cs.opacity || '1') === 0;
    }).map(p => ((p.closest('g[class*="_legend_symbols"]') || {}).parentElement || {}).textContent || '?').slice(0, 20);
  return {text: main.innerText, tables, charts, viewport: window.innerWidth, blank};
}"""

#: A value that did not exist, and a folder of the machine that built the book: neither belongs on a page.
NAN_TEXT = re.compile(r"(?<![\w'])(nan|NaN|None)(?![\w'])")
MACHINE_PATH = re.compile(r"(?<![\w.~])/(tmp|root|home|work|Users|private)/")


@dataclass
class PageReport:
    """What :meth:`Browser.render_check` saw on one page."""

    file: Path
    charts: int = 0  # chart containers (outermost)
    rendered: int = 0  # ... holding vega's drawn marks
    chart_errors: list[str] = field(default_factory=list)  # text of charts that show an error
    marks: list[int] = field(default_factory=list)  # data marks per drawn chart
    versions: dict = field(default_factory=dict)  # vega, vegaLite, vegaEmbed as loaded
    vega_debug: dict | None = None  # Altair's VEGA_DEBUG, as the page declares it
    requests: list[str] = field(default_factory=list)  # every URL requested (file: ones included)
    outside_requests: list[str] = field(default_factory=list)  # not file:/data:/blob:, in order, once each
    aborted: list[str] = field(default_factory=list)  # those the route aborted (must be all of them)
    failed_requests: dict[str, str] = field(default_factory=dict)  # url: failure text
    exceptions: list[str] = field(default_factory=list)  # uncaught JS exceptions
    console_errors: list[str] = field(default_factory=list)
    tooltip: str | None = None  # vega-tooltip's text with the mouse on a data mark (None: not shown or not probed)
    tooltip_probed: bool = False
    selections: dict[str, bool] = field(default_factory=dict)  # "chart <i>: <legend>": marks changed on click
    timed_out: list[str] = field(default_factory=list)  # the waits that ran out
    screenshot: Path | None = None
    seconds: float = 0.0
    text: str = ""  # the article's text as a reader sees it
    wide_tables: list[str] = field(default_factory=list)  # output tables wider than the room they are given
    wide_charts: list[str] = field(default_factory=list)  # charts that reach past the viewport's right edge
    viewport: int = 0
    blank_legend: list[str] = field(default_factory=list)  # legend entries whose swatch draws nothing

    def faults(self) -> list[str]:
        """Everything wrong with the page, one line each (empty: the page is fine)."""
        out = [f"JS exception: {e}" for e in self.exceptions]
        out += [f"console error: {e}" for e in self.console_errors]
        out += [f"outside request: {u}" for u in self.outside_requests]
        out += [f"outside request NOT aborted: {u}" for u in self.outside_requests if u not in self.aborted]
        out += [f"local file did not load: {u} ({why})" for u, why in self.failed_requests.items() if _is_local(u)]
        if self.rendered < self.charts:
            out.append(f"only {self.rendered} of {self.charts} charts drawn")
        out += [f"chart error: {e}" for e in self.chart_errors]
        if self.tooltip_probed and self.rendered and not self.tooltip:
            out.append("no tooltip with the mouse on a data mark of the first drawn chart")
        out += [f"legend selection did not change the marks ({k})" for k, ok in self.selections.items() if not ok]
        out += [f"timed out waiting for {w}" for w in self.timed_out]
        for pattern, what in ((NAN_TEXT, "a missing value written out"), (MACHINE_PATH, "a folder of the build machine")):
            for match in pattern.finditer(self.text):
                out.append(f"{what}: ...{self.text[max(0, match.start() - 40):match.end() + 20]!r}")
        out += [f"table wider than its column: {t}" for t in self.wide_tables]
        out += [f"chart wider than the {self.viewport} px viewport: {c}" for c in self.wide_charts]
        out += [f"legend entry without a swatch: {t!r}" for t in self.blank_legend]
        return out

    def summary(self) -> str:
        faults = self.faults()
        return (f"{self.file}: {self.charts} charts, {self.rendered} drawn, tooltip {self.tooltip!r}, selections "
                f"{self.selections}, {len(self.requests)} requests, {self.seconds:.1f} s"
                + "".join(f"\n  - {f}" for f in faults))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; ValueError if it is no PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def _is_local(url: str) -> bool:
    return urlsplit(url).scheme.lower() in LOCAL_SCHEMES


class Browser:
    """One headless Chromium for many pages: ``with Browser() as b: b.render_check(page)`` (or the
    :func:`chromium` fixture).

    The browser starts at the first :meth:`render_check` (after :func:`require_chromium`, so a test
    using it skips without Chromium, or fails on CI), not on entering.
    """

    def __init__(self, executable: str = CHROMIUM):
        self.executable = executable
        self._playwright = None
        self._browser = None

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None

    def _launch(self):
        if self._browser is None:
            require_chromium()
            self._playwright = sync_playwright().start()
            try:
                self._browser = self._playwright.chromium.launch(executable_path=self.executable,
                                                                 args=["--disable-gpu"])
            except PlaywrightError:
                self.close()
                raise
        return self._browser

    def render_check(self, html_file: Path, screenshot: Path | None = None, timeout_s: float = 60,
                     tooltip: bool = True, selections: bool = True, width: int = WIDTH) -> PageReport:
        """Open ``html_file`` and report what a reader would see (see the module's docstring).

        ``screenshot``: where to save a full-page PNG, 1280 px wide (taken once the charts are drawn,
        before the mouse moves). ``tooltip`` / ``selections``: probe the first drawn chart's tooltip /
        every legend selection. ``timeout_s`` bounds the waits together (loading, drawing, network idle);
        a wait that runs out is reported in ``timed_out`` rather than raised.
        """
        html_file = Path(html_file).resolve()
        if not html_file.is_file():
            raise FileNotFoundError(html_file)
        t0 = time.monotonic()
        report = PageReport(file=html_file)

        def left_ms() -> float:
            return max(1.0, (t0 + timeout_s - time.monotonic()) * 1000)

        def on_route(route):
            url = route.request.url
            if _is_local(url):
                route.continue_()
            else:
                report.aborted.append(url)
                route.abort("blockedbyclient")

        def on_console(message):
            if message.type == "error":
                where = message.location
                report.console_errors.append(f"{message.text} ({where.get('url', '')}:{where.get('lineNumber', '')})")

        def on_websocket(ws):
            report.requests.append(ws.url)
            report.aborted.append(ws.url)
            ws.close(code=1008, reason="outside the book")

        context = self._launch().new_context(viewport={"width": width, "height": HEIGHT}, service_workers="block")
        try:
            context.route("**/*", on_route)
            context.route_web_socket(lambda url: True, on_websocket)
            context.on("request", lambda r: report.requests.append(r.url))  # the page's, its frames' and workers'
            context.on("requestfailed", lambda r: report.failed_requests.__setitem__(r.url, r.failure or "?"))
            page = context.new_page()
            page.on("pageerror", lambda e: report.exceptions.append((e.stack or str(e))[:1000]))
            page.on("console", on_console)
            try:
                page.goto(html_file.as_uri(), wait_until="load", timeout=left_ms())
            except PlaywrightTimeout:
                report.timed_out.append("the load event")
            else:
                for what, wait in [("every chart drawn", lambda: page.wait_for_function(_CHARTS_SETTLED_JS,
                                                                                        timeout=left_ms())),
                                   ("network idle", lambda: page.wait_for_load_state("networkidle",
                                                                                     timeout=left_ms()))]:
                    try:
                        wait()
                    except PlaywrightTimeout:
                        report.timed_out.append(what)
            reader = page.evaluate(_READER_JS)
            report.text = reader["text"]
            report.viewport = reader["viewport"]
            report.blank_legend = reader["blank"]
            report.wide_tables = [f"{t['head']} ({t['scroll']} px in {t['client']} px)" for t in reader["tables"]
                                  if t["scroll"] > t["client"] + 1 and width >= WIDTH]  # a phone scrolls a table
            report.wide_charts = [f"chart {i}: {c['width']} px, right edge at {c['right']} px"
                                  for i, c in enumerate(reader["charts"]) if c["left"] < 0 or c["right"] > reader["viewport"] + 1]
            state = page.evaluate(_CHART_STATE_JS)
            report.charts, report.rendered = state["charts"], state["rendered"]
            report.chart_errors, report.marks = state["errors"], state["marks"]
            report.versions, report.vega_debug = state["versions"], state["vega_debug"]
            if screenshot is not None:
                screenshot = Path(screenshot)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=screenshot, full_page=True, animations="disabled", caret="hide")
                report.screenshot = screenshot
            if tooltip and report.rendered:
                report.tooltip_probed = True
                report.tooltip = self._probe_tooltip(page)
            if selections:
                for i, has_legend in enumerate(state["legends"]):
                    if has_legend:
                        name, changed = self._probe_selection(page, i)
                        report.selections[f"chart {i}: {name}"] = changed
        finally:
            context.close()
        report.outside_requests = list(dict.fromkeys(u for u in report.requests if not _is_local(u)))
        report.seconds = round(time.monotonic() - t0, 2)
        return report

    @staticmethod
    def _probe_tooltip(page) -> str | None:
        point = page.evaluate(_MARK_POINT_JS)
        if not point:
            return None
        for dx in (0, 1):  # a second move makes sure vega sees a pointer *move* onto the mark
            page.mouse.move(point["x"] + dx, point["y"])
        try:
            return page.wait_for_function(_TOOLTIP_SHOWN_JS, timeout=5000).json_value()
        except PlaywrightTimeout:
            return None

    @staticmethod
    def _probe_selection(page, i: int) -> tuple[str, bool]:
        before = page.evaluate(_MARK_OPACITIES_JS, i)
        entry = page.evaluate(_FIRST_LEGEND_ENTRY_JS, i)
        if not entry:
            return "no legend entry", False
        page.mouse.click(entry["x"], entry["y"])
        try:
            page.wait_for_function(_SELECTION_CHANGED_JS, arg=[i, before], timeout=5000)
            return entry["legend"], True
        except PlaywrightTimeout:
            return entry["legend"], False


@pytest.fixture
def chromium():
    """A :class:`Browser` for one test, which may open many pages with it (started on first use).

    Not longer-lived on purpose: while Playwright's sync API is started, the thread has an asyncio loop
    marked running, so a later test's ``asyncio.run`` (nbclient, papermill) would fail; a launch costs
    about half a second.
    """
    with Browser() as b:
        yield b
