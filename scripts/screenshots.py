"""Screenshots of every page of a built book, as a reader sees it, at desktop and phone width.

    .venv/bin/python scripts/screenshots.py book/_build/html OUT_DIR [--widths 1280,390]

Each page is opened in Debian's Chromium (Playwright, nothing fetched from outside), given time to draw its
charts, and saved full-page as OUT_DIR/<page>@<width>.png. Prints one line per page: size, charts drawn,
console errors and requests that tried to leave the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def pages(html: Path) -> list[Path]:
    """The book's content pages (the built Jupyter Book's html files, without search and index pages)."""
    skip = {"search.html", "genindex.html", "index.html"}
    return sorted(p for p in html.rglob("*.html") if p.name not in skip and "_static" not in p.parts
                  and "_sources" not in p.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--widths", default="1280,390")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    widths = [int(w) for w in ns.widths.split(",")]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu"])
        for width in widths:
            context = browser.new_context(viewport={"width": width, "height": 900})
            page = context.new_page()
            outside: list[str] = []
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else (outside.append(route.request.url), route.abort())[1])
            for path in pages(ns.html):
                outside.clear()
                errors.clear()
                page.goto(path.resolve().as_uri(), wait_until="load")
                page.wait_for_timeout(800)
                charts = page.locator(".vega-embed svg, .vega-embed canvas").count()
                name = str(path.relative_to(ns.html).with_suffix("")).replace("/", "__")
                shot = ns.out / f"{name}@{width}.png"
                page.screenshot(path=str(shot), full_page=True)
                scroll = page.evaluate("document.documentElement.scrollWidth")
                print(f"{name}@{width}: charts {charts}, page width {scroll}px, console errors {len(errors)}, "
                      f"outside requests {len(outside)}")
            context.close()
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
