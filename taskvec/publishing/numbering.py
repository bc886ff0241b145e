"""Figure and table numbers made by the book, one sequence each for the whole book (a Sphinx extension).

A caption names its figure or table instead of numbering it: ``**Figure [finding-l-dev-accuracy].**`` at the
start of the caption's paragraph. Text refers to it by name: ``[[fig:finding-l-dev-accuracy]]`` (or ``tab:``).
When the build starts, every page of the table of contents is read in reading order and each named caption gets
the next number of its kind; then each page, as Sphinx reads it, has its captions written as ``**Figure 3.**``
behind a target of the same name (so a link can land on it), and its references as links reading "Figure 3".
A name used twice, a reference to no caption, or a caption of the wrong kind stops the build with the page and
the name. Numbers typed by hand cannot collide, and the paper's own tables are always "the paper's Table 6".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

#: A named caption at the start of a paragraph, and a reference to one.
CAPTION = re.compile(r"\*\*(Figure|Table) \[([a-z0-9][a-z0-9-]*)\]\.\*\*")
REFERENCE = re.compile(r"\[\[(fig|tab):([a-z0-9][a-z0-9-]*)\]\]")
KINDS = {"fig": "Figure", "tab": "Table"}
SUFFIXES = (".ipynb", ".md")


class NumberingError(ValueError):
    pass


@dataclass(frozen=True)
class Caption:
    kind: str  #: "Figure" or "Table"
    number: int
    docname: str


def toc_order(root: Path) -> list[str]:
    """The docnames of ``_toc.yml`` (jb-book format) in reading order: the root, then every part's chapters and
    their sections."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    order = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                order.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [name.rsplit(".", 1)[0] if name.endswith(SUFFIXES) else name for name in order]


def _source(root: Path, docname: str) -> str:
    for suffix in SUFFIXES:
        path = root / f"{docname}{suffix}"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return ""


def number(root: Path, docnames: list[str] | None = None) -> dict[str, Caption]:
    """Every named caption of the book with its number, in reading order; checks names and references."""
    docnames = docnames if docnames is not None else toc_order(root)
    captions: dict[str, Caption] = {}
    counters = {"Figure": 0, "Table": 0}
    sources = {doc: _source(root, doc) for doc in docnames}
    for doc, text in sources.items():
        for kind, name in CAPTION.findall(text):
            if name in captions:
                raise NumberingError(f"{doc}: the caption name {name!r} is already used on {captions[name].docname}")
            counters[kind] += 1
            captions[name] = Caption(kind, counters[kind], doc)
    for doc, text in sources.items():
        for short, name in REFERENCE.findall(text):
            if name not in captions:
                raise NumberingError(f"{doc}: [[{short}:{name}]] refers to no caption of the book")
            if captions[name].kind != KINDS[short]:
                raise NumberingError(f"{doc}: [[{short}:{name}]] refers to a {captions[name].kind.lower()}")
    return captions


def rewrite(text: str, captions: dict[str, Caption], notebook: bool) -> str:
    """One page's source with its captions numbered (each behind a target of its name) and its references
    made links. ``notebook``: the text is an .ipynb file's JSON, where a newline is written ``\\n``."""
    newline = "\\n" if notebook else "\n"

    def caption(match: re.Match) -> str:
        kind, name = match.groups()
        return f"({name})={newline}{newline}**{kind} {captions[name].number}.**"

    def reference(match: re.Match) -> str:
        entry = captions[match.group(2)]
        return f"{{ref}}`{entry.kind} {entry.number} <{match.group(2)}>`"

    return REFERENCE.sub(reference, CAPTION.sub(caption, text))


def _builder_inited(app) -> None:
    root = Path(app.srcdir)
    app.env.taskvec_captions = number(root, [d for d in toc_order(root) if _source(root, d)])


def _source_read(app, docname: str, source: list[str]) -> None:
    captions = getattr(app.env, "taskvec_captions", None)
    if captions is None or not (CAPTION.search(source[0]) or REFERENCE.search(source[0])):
        return
    notebook = (Path(app.srcdir) / f"{docname}.ipynb").is_file()
    source[0] = rewrite(source[0], captions, notebook)


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("source-read", _source_read)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["Caption", "NumberingError", "number", "rewrite", "toc_order", "setup"]
