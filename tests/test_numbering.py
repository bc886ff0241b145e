"""Book-wide figure and table numbers from named captions (taskvec/publishing/numbering.py), and the book's own
pages: every caption named, every reference to a caption that exists, no number typed by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from taskvec.publishing import numbering as N

ROOT = Path(__file__).resolve().parents[1]


def planted_book(root: Path) -> Path:
    (root / "book" / "sections").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/sections/intro\nparts:\n  - chapters:\n"
                                   "      - file: book/method\n      - file: book/sections/a\n")
    notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [
        "**Figure [a-curve].** A curve.\n", "\n", "As [[tab:intro-list]] says, and [[fig:a-curve]].\n"]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (root / "book" / "sections" / "a.ipynb").write_text(json.dumps(notebook))
    (root / "book" / "sections" / "intro.md").write_text("# Intro\n\n**Table [intro-list].** A list.\n\n"
                                                         "**Figure [intro-picture].** A picture.\n")
    (root / "book" / "method.md").write_text("# Method\n\nNo captions; see [[fig:a-curve]].\n")
    return root


def test_captions_are_numbered_in_reading_order_one_sequence_per_kind(tmp_path):
    root = planted_book(tmp_path)
    assert N.toc_order(root) == ["book/sections/intro", "book/method", "book/sections/a"]
    captions = N.number(root)
    assert {name: (c.kind, c.number) for name, c in captions.items()} == {
        "intro-list": ("Table", 1), "intro-picture": ("Figure", 1), "a-curve": ("Figure", 2)}


def test_rewrite_numbers_captions_behind_a_target_and_links_references(tmp_path):
    root = planted_book(tmp_path)
    captions = N.number(root)
    text = (root / "book" / "sections" / "a.ipynb").read_text()
    out = json.loads(N.rewrite(text, captions, notebook=True))  # still valid JSON
    source = "".join(out["cells"][0]["source"])
    assert source.startswith("(a-curve)=\n\n**Figure 2.** A curve.")
    assert "As {ref}`Table 1 <intro-list>` says, and {ref}`Figure 2 <a-curve>`." in source
    md = N.rewrite((root / "book" / "method.md").read_text(), captions, notebook=False)
    assert "see {ref}`Figure 2 <a-curve>`" in md


@pytest.mark.parametrize("text, message", [
    # method comes before a in reading order: the second use, on a, is the one named
    ("**Figure [a-curve].** Again.\n", "book/sections/a: the caption name 'a-curve' is already used on book/method"),
    ("See [[fig:nowhere]].\n", "book/method: [[fig:nowhere]] refers to no caption"),
    ("See [[fig:intro-list]].\n", "book/method: [[fig:intro-list]] refers to a table"),
])
def test_a_name_used_twice_or_a_dangling_reference_names_the_page(tmp_path, text, message):
    root = planted_book(tmp_path)
    (root / "book" / "method.md").write_text("# Method\n\n" + text)
    with pytest.raises(N.NumberingError, match=re.escape(message)):
        N.number(root)


def test_the_books_notebooks_name_every_caption_and_number_none_by_hand():
    """The section notebooks (as the book will see them) number cleanly, and no caption or reference in them
    carries a number typed by hand: a number in the text is the paper's, and says so."""
    sources = {p.stem: p.read_text(encoding="utf-8") for p in (ROOT / "nb").glob("*.ipynb")}
    for name, text in sources.items():
        assert not re.search(r"\*\*(Figure|Table) \d+\.\*\*", text), f"{name}: a caption numbered by hand"
        for match in re.finditer(r"(?<![A-Za-z])(Fig\.|Figure|Table)s? \d+", text):
            before = text[max(0, match.start() - 100):match.start()]  # about one sentence back
            assert re.search(r"paper|authors", before), f"{name}: {before + match.group(0)!r} is not the paper's"
    toc = N.toc_order(ROOT)
    docs = [d for d in toc if d.startswith("book/sections/")]
    assert {d.split("/")[-1] for d in docs} == set(sources)
    captions = {}
    for doc in docs:  # number the notebooks' sources in reading order, as the build does
        for kind, name in N.CAPTION.findall(sources[doc.split("/")[-1]]):
            assert name not in captions, name
            captions[name] = kind
    for name, text in sources.items():
        for short, ref in N.REFERENCE.findall(text):
            assert captions.get(ref) == N.KINDS[short], f"{name}: [[{short}:{ref}]]"
