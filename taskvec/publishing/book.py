"""Build the book so that it reads fully offline, and prove it does.

The book is a Jupyter Book 1 (Sphinx) site of pre-executed notebooks whose charts are Altair.
Three things would otherwise reach the network when a reader opens a page:

* **Altair charts.** Altair's default HTML output (``altair/utils/html.py``, the "universal"
  template) calls ``maybeLoadScript("vega", "6")`` and friends, which inject
  ``<script src="https://cdn.jsdelivr.net/npm/...">`` unless ``VEGA_DEBUG[<lib>_version]`` already
  equals the version Altair pins (``alt.VEGA_VERSION``, ``alt.VEGALITE_VERSION``,
  ``alt.VEGAEMBED_VERSION``); it then calls the global ``vegaEmbed``. (It would use requirejs if
  an AMD ``define`` were on the page; none is in these pages.) So :func:`write_static_assets`
  writes one ``vega-offline.js`` holding ``vl_convert.javascript_bundle()`` (vega + vega-lite +
  vega-embed + vega-tooltip, no external dependency), wrapped in ``(function(){ ... })();`` so
  its top-level ``const`` names cannot clash with Sphinx's ``doctools.js``. The bundle assigns
  ``window.vegaEmbed`` (the only global Altair's chart code calls); it also assigns
  ``window.vega``/``window.vegaLite``, but to ``null`` (vl-convert 1.9 takes the packages'
  missing default exports), so the wrapper sets those two to the bundle's module namespaces
  (:func:`_expose_namespaces`). After the wrapper, ``var VEGA_DEBUG`` is set to Altair's pinned
  versions, only when ``vegaEmbed`` really is defined (otherwise the charts fail visibly). The notebooks
  keep Altair's default renderer: the charts stay interactive (tooltips work offline). The
  file is listed in ``html_js_files`` (in ``_config.yml``) so that every page loads it in
  ``<head>``, before the inline chart scripts run. :func:`write_static_assets` refuses a
  vl-convert whose vega / vega-lite / vega-embed versions do not match what Altair pins.

* **MathJax.** Decision: the book loads no MathJax at all. θ and the like are written as
  unicode, never as LaTeX math, and ``_config.yml`` enables only the ``colon_fence`` MyST
  extension (no ``dollarmath``/``amsmath``), so a ``$`` in prose stays a dollar sign. Sphinx's
  ``sphinx.ext.mathjax`` (always on for HTML) adds its CDN ``<script>`` only to pages that
  contain a math node (Jupyter Book forces it on every page only for the ``singlehtml``
  builder, which we do not use), so pages without math carry no MathJax reference. If math
  ever slips in, the CDN script appears on that page and :func:`check_offline` reports it:
  the failure is loud rather than a silently unrendered formula.

* **The theme.** sphinx-book-theme / pydata-sphinx-theme ship their fonts, icons and scripts in
  ``_static``; launch buttons, Thebe, comments, analytics and repository buttons are off in
  ``_config.yml``. :func:`check_offline` verifies the result statically.

The browser checks are not part of this module: they check the product, they are not the
product. ``tests/browser.py`` opens every built page in Debian's headless Chromium driven by
Playwright (a route aborts and records every request that is not ``file:``/``data:``/``blob:``,
``pageerror`` catches exceptions), counts chart containers and drawn charts, hovers a data mark for
its tooltip, clicks every legend bound to a selection, and saves a full-page screenshot of each page
under the build folder (``tests/test_book.py``, ``tests/test_book_offline.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

VEGA_JS = "vega-offline.js"


class BookBuildError(RuntimeError):
    """`jupyter-book build` failed; the message ends with the tail of its log."""


# --------------------------------------------------------------------------------------------
# Static assets


def _altair_pins() -> dict[str, str]:
    import altair as alt

    return {"vega_version": alt.VEGA_VERSION, "vegalite_version": alt.VEGALITE_VERSION,
            "vegaembed_version": alt.VEGAEMBED_VERSION}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.lstrip("v").replace("_", ".").split(".")[:2])


def vega_offline_js() -> str:
    """The text of ``vega-offline.js`` (about 0.9 MB): the wrapped bundle plus ``VEGA_DEBUG``."""
    import vl_convert as vlc
    from altair.utils._importers import vl_version_for_vl_convert

    pins = _altair_pins()
    vl = vl_version_for_vl_convert()  # e.g. "v6_4", the vega-lite line Altair pins
    have = {
        "vega": vlc.get_vega_version(),
        "vega-lite": [v for v in vlc.get_vegalite_versions() if _major_minor(v) == _major_minor(vl)],
        "vega-embed": vlc.get_vega_embed_version(),
    }
    if (have["vega"].split(".")[0] != pins["vega_version"].split(".")[0] or not have["vega-lite"]
            or have["vega-embed"].split(".")[0] != pins["vegaembed_version"].split(".")[0]):
        raise RuntimeError(f"vl-convert-python {vlc.__version__} bundles {have}, which does not match the "
                           f"versions Altair pins {pins}: upgrade them together")
    bundle = vlc.javascript_bundle(vl_version=vl)
    return (
        f"/* Offline vega stack for Altair charts in Sphinx pages. Generated by taskvec.publishing.book from\n"
        f"   vl-convert-python {vlc.__version__}: vega {have['vega']}, vega-lite {vl}, vega-embed {have['vega-embed']}.\n"
        f"   Wrapped in a function so that the bundle's top-level names stay private. It sets window.vegaEmbed\n"
        f"   (all that Altair's chart code calls), window.vega and window.vegaLite. VEGA_DEBUG holds the versions\n"
        f"   Altair pins, so that Altair's chart code uses these instead of loading them from a CDN. */\n"
        f"(function(){{\n{bundle}\n{_expose_namespaces(bundle)}}})();\n"
        f"var VEGA_DEBUG = (typeof VEGA_DEBUG == \"undefined\") ? {{}} : VEGA_DEBUG;\n"
        f"if (typeof window.vegaEmbed == \"function\") {{\n"
        f"  Object.assign(VEGA_DEBUG, {json.dumps(pins)});\n"
        f"}}\n"
    )


def _expose_namespaces(bundle: str) -> str:
    """JavaScript that sets ``window.vega`` / ``window.vegaLite`` to the bundle's module namespaces.

    vl-convert's bundle assigns ``window.vega = <default export of vega>``, which is ``null``
    (vega has no default export), and likewise for vega-lite; vega-embed works regardless, as it
    holds its own references. The namespaces are the bundler's ``const modN=function(){return{...}}``
    objects: recognised here by their keys (vega: View, parse, loader, version; vega-lite: compile,
    normalize, version). Best effort: if the bundle's shape changes, nothing is added.
    """
    wanted = {"vega": {"View", "parse", "loader", "version"}, "vegaLite": {"compile", "normalize", "version"}}
    lines = []
    for m in re.finditer(r"const ([\w$]+)=function\(\)\{return\{([^{}]*)\}", bundle):
        keys = {kv.split(":")[0].strip() for kv in m.group(2).split(",")}
        for glob, need in list(wanted.items()):
            if need <= keys:
                lines.append(f"if (!window.{glob} && typeof {m.group(1)} == \"object\") window.{glob} = {m.group(1)};\n")
                del wanted[glob]
    return "".join(lines)


def write_static_assets(static_dir: Path) -> list[Path]:
    """Write the book's static files into ``static_dir``; return their paths.

    Rewrites a file only when its content changed, so repeated builds do not touch mtimes.
    """
    static_dir = Path(static_dir)
    static_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in {VEGA_JS: vega_offline_js()}.items():
        path = static_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Build


def _jupyter_book_cmd() -> list[str]:
    script = Path(sys.executable).parent / "jupyter-book"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "jupyter_book.cli.main"]


def build_book(root: Path, builddir: Path | None = None, warnings_as_errors: bool = True,
               fresh: bool = True, static_dir: Path | None = None) -> Path:
    """Build the Jupyter Book whose ``_config.yml``/``_toc.yml`` are in ``root``; return the html folder.

    Writes the static assets into ``static_dir`` (default ``root/book/_static``, the folder
    ``_config.yml`` names in ``html_static_path``) first. Output goes to
    ``builddir/_build/html``; ``builddir`` defaults to ``root/book`` (so ``book/_build/``,
    which git ignores). ``warnings_as_errors`` adds ``-W -n --keep-going``; ``fresh`` adds
    ``--all`` so that every page is re-read and its warnings are seen again (an incremental
    build would skip unchanged pages and their warnings), and first deletes the old html folder
    (Sphinx leaves stale files there). The full log is written to
    ``builddir/_build/build.log``; on failure :class:`BookBuildError` carries its tail.
    """
    root = Path(root).resolve()
    builddir = Path(builddir).resolve() if builddir is not None else root / "book"
    write_static_assets(static_dir if static_dir is not None else root / "book" / "_static")
    cmd = _jupyter_book_cmd() + ["build", str(root), "--builder", "html", "--path-output", str(builddir)]
    if warnings_as_errors:
        cmd += ["-W", "-n", "--keep-going"]
    if fresh:
        cmd += ["--all"]
    html = builddir / "_build" / "html"
    if fresh and html.is_dir():
        shutil.rmtree(html)  # Sphinx never deletes output it no longer writes: start clean
    log_path = builddir / "_build" / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    log_path.write_text(proc.stdout, encoding="utf-8")
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    if not (html / "index.html").is_file():
        problems.append(f"no {html / 'index.html'}")
    if problems:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in proc.stdout.splitlines()]
        flagged = [line for line in lines if re.search(r"\b(WARNING|ERROR|CRITICAL|SEVERE)\b", line)]
        raise BookBuildError(f"jupyter-book build of {root} failed ({'; '.join(problems)}) after "
                             f"{time.monotonic() - t0:.0f} s. Full log: {log_path}\n"
                             f"command: {' '.join(cmd)}\n"
                             f"--- warnings and errors ({len(flagged)}) ---\n" + "\n".join(flagged[:40]) +
                             "\n--- last lines ---\n" + "\n".join(lines[-40:]))
    return html


# --------------------------------------------------------------------------------------------
# Static offline check

# An address that leaves the machine: http(s), ws(s), ftp, or protocol-relative //host.
_EXT = r"(?:(?:https?|wss?|ftp):)?//[^\s'\"`<>)\\]+"
_EXT_RE = re.compile(rf"^\s*{_EXT}", re.I)
# JavaScript (in .js files and inline <script>s) that loads or sends to a literal address.
_JS_LOADS = [
    ("fetch", rf"\bfetch\(\s*['\"`]({_EXT})"),
    ("dynamic import", rf"\bimport\(\s*['\"`]({_EXT})"),
    ("import", rf"\bimport\s[^;'\"`]*?\bfrom\s*['\"]({_EXT})"),
    ("import", rf"(?:^|;)\s*import\s*['\"]({_EXT})"),
    ("importScripts", rf"\bimportScripts\(\s*['\"`]({_EXT})"),
    (".src =", rf"\.src\s*=\s*['\"`]({_EXT})"),
    ("setAttribute src", rf"setAttribute\(\s*['\"](?:src|href)['\"]\s*,\s*['\"`]({_EXT})"),
    ("XMLHttpRequest", rf"\.open\(\s*['\"][A-Z]+['\"]\s*,\s*['\"`]({_EXT})"),
    ("WebSocket/EventSource/Worker", rf"\bnew\s+(?:WebSocket|EventSource|Worker|SharedWorker)\(\s*['\"`]({_EXT})"),
    ("sendBeacon", rf"\bsendBeacon\(\s*['\"`]({_EXT})"),
    ("script tag in string", rf"<script[^>]*?\ssrc=\\?['\"]?({_EXT})"),
    ("stylesheet in string", rf"<link[^>]*?\shref=\\?['\"]?({_EXT})"),
    ("css url()", rf"\burl\(\s*\\?['\"]?({_EXT})"),
]
_JS_LOADS = [(what, re.compile(rx, re.I | re.M)) for what, rx in _JS_LOADS]
_CSS_LOADS = [(what, re.compile(rx, re.I)) for what, rx in [
    ("css url()", rf"\burl\(\s*['\"]?({_EXT})"),
    ("css @import", rf"@import\s+['\"]({_EXT})"),
]]
# <link rel=...> values that do not make the browser fetch anything by themselves.
_LINK_REL_NO_LOAD = {"canonical", "alternate", "author", "license", "help", "next", "prev", "previous",
                     "index", "bookmark", "me", "search", "edit", "external", "nofollow", "noopener",
                     "noreferrer", "tag", "top", "up", "first", "last", "contents", "glossary"}
# Attributes whose value the browser loads, per tag ("*" = any tag).
_LOAD_ATTRS = {
    "script": ["src"], "img": ["src", "srcset"], "iframe": ["src"], "frame": ["src"],
    "source": ["src", "srcset"], "video": ["src", "poster"], "audio": ["src"], "track": ["src"],
    "embed": ["src"], "object": ["data"], "input": ["src"], "image": ["href", "xlink:href"],
    "use": ["href", "xlink:href"], "feimage": ["href", "xlink:href"], "body": ["background"],
}
_ALTAIR_LOAD = re.compile(r"maybeLoadScript\(\s*\"([\w-]+)\"\s*,\s*\"([^\"]+)\"\s*\)")
_VEGA_DEBUG_DECL = re.compile(r"\{\s*\"vega_version\"[^{}]*\}")


class _PageScan(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (what, url)
        self.script_srcs: list[str] = []
        self.inline_js: list[str] = []
        self.inline_css: list[str] = []
        self._in: str | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k.lower(): (v or "") for k, v in attrs}
        for name in _LOAD_ATTRS.get(tag, []):
            for url in _urls_in_attr(a.get(name, ""), srcset=name == "srcset"):
                self.loads.append((f"<{tag} {name}>", url))
        if tag == "link":
            rels = set(a.get("rel", "").lower().split())
            if not rels or not rels <= _LINK_REL_NO_LOAD:
                self.loads += [(f"<link rel={a.get('rel', '')!r} href>", u) for u in _urls_in_attr(a.get("href", ""))]
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            m = re.search(r"url\s*=\s*['\"]?([^'\";]+)", a.get("content", ""), re.I)
            if m and _EXT_RE.match(m.group(1)):
                self.loads.append(("<meta refresh>", m.group(1)))
        if "style" in a:
            self.inline_css.append(a["style"])
        if tag == "script":
            self.script_srcs.append(a.get("src", ""))
            if not a.get("src"):
                self._in, self._buf = "script", []
        elif tag == "style":
            self._in, self._buf = "style", []

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in ("script", "style"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if self._in and tag == self._in:
            (self.inline_js if tag == "script" else self.inline_css).append("".join(self._buf))
            self._in = None


def _urls_in_attr(value: str, srcset: bool = False) -> list[str]:
    cands = [part.strip().split()[0] for part in value.split(",") if part.strip()] if srcset else [value]
    return [c.strip() for c in cands if _EXT_RE.match(c)]


def _scan_text(text: str, patterns) -> list[tuple[str, str]]:
    return [(what, m.group(1)) for what, rx in patterns for m in rx.finditer(text)]


def check_offline(html_dir: Path) -> list[str]:
    """Statically scan a built site for anything a reader's browser would fetch from outside.

    Looks at every ``.html``, ``.js`` and ``.css`` under ``html_dir``: tags that load a resource
    (``script src``, ``link href`` other than plain relations such as canonical, ``img``/``iframe``/
    ``source``/``video``/``embed``/``object``..., ``meta refresh``), CSS ``url()``/``@import`` (style
    sheets, ``<style>``, ``style=``), and JavaScript that loads a literal address (``fetch``,
    ``import``, ``.src =``, XHR, WebSocket, ``<script src>`` in strings ...), for ``http(s)://``,
    ``ws(s)://``, ``ftp://`` and protocol-relative ``//`` addresses. Plain ``<a href>`` links are
    fine. It also checks each Altair chart: its ``maybeLoadScript("vega-lite", "6.4.1")`` calls
    must be answered by a ``VEGA_DEBUG`` declaration (matching versions) in a local script the
    page loads, else the chart would fetch vega from a CDN.

    Returns one line per problem, ``"<file>: <what> <url>"``; an empty list means offline.
    """
    html_dir = Path(html_dir)
    problems: list[str] = []
    declared: dict[Path, dict] = {}  # local .js file -> the VEGA_DEBUG versions it declares
    files = sorted(p for p in html_dir.rglob("*") if p.suffix.lower() in (".html", ".htm", ".js", ".css")
                   and p.is_file())
    for path in files:
        if path.suffix.lower() != ".js":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        m = _VEGA_DEBUG_DECL.search(text) if "VEGA_DEBUG" in text else None
        if m:
            try:
                declared[path.resolve()] = json.loads(m.group(0))
            except json.JSONDecodeError:
                pass
    for path in files:
        rel = path.relative_to(html_dir).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        suffix = path.suffix.lower()
        if suffix == ".js":
            found = _scan_text(text, _JS_LOADS)
        elif suffix == ".css":
            found = _scan_text(text, _CSS_LOADS)
        else:
            scan = _PageScan()
            scan.feed(text)
            scan.close()
            found = list(scan.loads)
            for js in scan.inline_js:
                found += _scan_text(js, _JS_LOADS)
            for css in scan.inline_css:
                found += _scan_text(css, _CSS_LOADS)
            needed = {(lib.replace("-", "") + "_version", ver)
                      for js in scan.inline_js for lib, ver in _ALTAIR_LOAD.findall(js)}
            if needed:
                have: dict = {}
                for src in scan.script_srcs:
                    if src and not _EXT_RE.match(src) and ":" not in src.split("/")[0]:
                        local = (path.parent / src.split("?")[0].split("#")[0]).resolve()
                        have.update(declared.get(local, {}))
                for key, ver in sorted(needed):
                    if have.get(key) != ver:
                        lib = {"vega_version": "vega", "vegalite_version": "vega-lite",
                               "vegaembed_version": "vega-embed"}.get(key, key)
                        problems.append(f"{rel}: Altair chart would load {lib}@{ver} from a CDN "
                                        f"(no local script declares VEGA_DEBUG.{key} = {ver!r}; "
                                        f"found {have.get(key)!r})")
        for what, url in dict.fromkeys(found):
            problems.append(f"{rel}: {what} {url}")
    return problems
