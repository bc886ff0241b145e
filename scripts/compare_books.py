"""Compare the results two built books publish: every glued value and every table or text output of every
section notebook, run times excepted. For a refactor that must not change a published number.

    .venv/bin/python scripts/compare_books.py BEFORE/book/sections AFTER/book/sections

Prints one line per difference and a count per notebook; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from glue_check import glue_values  # noqa: E402

#: Glued names and output text that are run times or machine facts, not results.
VOLATILE = re.compile(r"seconds|_s$|minutes|wall|time", re.I)
#: Inside tables and text: durations, temporary paths and hashes of code that change with any edit.
SCRUB = [(re.compile(r"/tmp/[^\s\"'<]*"), "<tmp>"), (re.compile(r"\b\d+(\.\d+)? ?s\b"), "<seconds>"),
         (re.compile(r"[0-9a-f]{16,64}"), "<hash>"), (re.compile(r"altair-viz-[0-9a-f]+"), "altair-viz"),
         (re.compile(r"\bT_[0-9a-f]{5}"), "T_<styler-id>")]  # pandas Styler ids are random


def outputs(nb: nbformat.NotebookNode) -> list[str]:
    """The text/plain and text/html of every display output that is not a glue record, in order."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook"):
                continue
            data = output.get("data", {})
            text = data.get("text/html") or data.get("text/plain") or output.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            if "application/vnd.vegalite" in str(list(data)) or "vega" in text[:200]:
                spec = data.get("application/vnd.vegalite.v6+json") or data.get("application/vnd.vegalite.v5+json")
                text = str(spec) if spec else text
            for pattern, repl in SCRUB:
                text = pattern.sub(repl, text)
            found.append(text)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--skip", default="provenance", help="comma-separated notebooks not compared")
    ns = parser.parse_args()
    skip = set(ns.skip.split(",")) if ns.skip else set()
    differ = 0
    for path in sorted(ns.before.glob("*.ipynb")):
        if path.stem in skip:
            continue
        other = ns.after / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {ns.after}")
            differ += 1
            continue
        a, b = nbformat.read(path, as_version=4), nbformat.read(other, as_version=4)
        ga, gb = glue_values(a), glue_values(b)
        names = sorted(set(ga) | set(gb))
        bad = [n for n in names if not VOLATILE.search(n) and ga.get(n) != gb.get(n)]
        for n in bad:
            print(f"{path.stem}: glue {n}: {ga.get(n)!r} -> {gb.get(n)!r}")
        oa, ob = outputs(a), outputs(b)
        bad_out = [i for i in range(max(len(oa), len(ob))) if (oa[i] if i < len(oa) else None) != (ob[i] if i < len(ob) else None)]
        for i in bad_out:
            print(f"{path.stem}: output {i} differs ({len(oa[i]) if i < len(oa) else 0} -> {len(ob[i]) if i < len(ob) else 0} chars)")
        print(f"{path.stem}: {len(names)} glued values, {len(oa)} outputs; {len(bad)} + {len(bad_out)} differ")
        differ += len(bad) + len(bad_out)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
