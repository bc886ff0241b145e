"""Check that every number glued into a section's prose sits at its place on the built page.

A section notebook computes values and stores them with ``myst_nb.glue(name, value)``; its markdown
cells place them with ``{glue:text}`name:fmt``` roles, which myst-nb renders as
``<span class="pasted-text">…</span>``. :func:`check_glue` pairs, in document order, the i-th
``{glue:text}`` role of the executed notebook with the i-th such span in the page's article, formats
the value glued under the role's name with the role's format spec, and reports every span whose text
differs (a swapped, stale or misplaced value) and any difference in their numbers.

Generic: nothing here knows a notebook's names. Markdown is tokenized by MyST's own parser, so a role
quoted in inline code or inside a code block is not a role; roles inside directives (``:::{note}``)
and in directive titles are found as MyST finds them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import nbformat

GLUE_ROLE = "glue:text"
#: Directives whose body is not MyST markdown, so a role written in it is not a role.
LITERAL_DIRECTIVES = {"code", "code-block", "sourcecode", "code-cell", "literalinclude", "math", "raw", "eval-rst",
                      "csv-table", "glue", "glue:any", "glue:figure", "glue:math", "glue:md", "mermaid"}
REMOVED_TAGS = {"remove-cell", "remove_cell"}


@dataclass(frozen=True)
class Role:
    """One ``{glue:text}`` role: the cell it sits in, the glued name, the format spec and the expected text."""

    cell: int
    name: str
    fmt: str
    expected: str | None  # None when the name was never glued (reported as a problem)


def glue_values(nb: nbformat.NotebookNode) -> dict[str, str]:
    """Name -> the ``text/plain`` of every glued output (display=False outputs carry a mime prefix)."""
    values: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            meta = output.get("metadata", {}).get("scrapbook")
            if not meta:
                continue
            prefix = meta.get("mime_prefix", "")
            data = {key[len(prefix):]: value for key, value in output.get("data", {}).items() if key.startswith(prefix)}
            if "text/plain" in data:
                text = data["text/plain"]
                values[meta["name"]] = "".join(text) if isinstance(text, list) else text
    return values


def format_plain(text: str, spec: str) -> str:
    """What ``{glue:text}`name:spec``` shows for a glued ``text/plain``.

    The same rule myst-nb documents: the repr is literal-evaluated (so a string loses its quotes), the
    last character of the spec picks the type (``s`` str, ``d`` and friends int, ``f``/``%``/... float),
    then Python's ``format`` applies; no spec means ``s``.
    """
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    spec = spec or "s"
    kind = spec[-1]
    if kind == "s":
        value = str(value)
    elif kind in "bcdoxX":
        value = int(value)
    elif kind in "eEfFgGn%":
        value = float(value)
    return format(value, spec)


def _parser():
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    # The book's markdown extensions (_config.yml: colon_fence); roles are parsed either way.
    return create_md_parser(MdParserConfig(enable_extensions={"colon_fence"}), RendererHTML)


_DIRECTIVE = re.compile(r"^\{([^}\s]+)\}\s*(.*)$")


def _directive_body(content: str) -> str:
    """A directive's body without its options (``:key: value`` lines or a ``---`` YAML block)."""
    lines = content.splitlines()
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), len(lines) - 1)
        lines = lines[end + 1:]
    else:
        while lines and re.match(r"^:[\w-]+:", lines[0]):
            lines = lines[1:]
    return "\n".join(lines)


def _roles_in(md, text: str, inline: bool = False) -> list[str]:
    """Contents of the ``{glue:text}`` roles in a markdown text, in the order MyST renders them."""
    found: list[str] = []
    tokens = md.parseInline(text) if inline else md.parse(text)
    for token in tokens:
        if token.type == "inline":
            found += [c.content for c in token.children or [] if c.type == "myst_role" and c.meta.get("name") == GLUE_ROLE]
        elif token.type in ("fence", "colon_fence"):
            match = _DIRECTIVE.match(token.info.strip())
            if match and match.group(1) not in LITERAL_DIRECTIVES:
                if match.group(2):
                    found += _roles_in(md, match.group(2), inline=True)
                found += _roles_in(md, _directive_body(token.content))
    return found


def _split(content: str) -> tuple[str, str, str]:
    """``[doc::]name[:fmt]`` -> (doc, name, fmt), split exactly as myst-nb's role splits it."""
    key, fmt = content.rsplit(":", 1) if ":" in content else (content, "")
    doc, _, name = key.partition("::") if "::" in key else ("", "", key)
    return doc, name, fmt


def glue_roles(notebook: Path | str | nbformat.NotebookNode) -> list[Role]:
    """Every ``{glue:text}`` role of a notebook's rendered markdown cells, in order, with its expected text."""
    path = None if isinstance(notebook, nbformat.NotebookNode) else Path(notebook)
    nb = notebook if path is None else nbformat.read(path, as_version=4)
    values = glue_values(nb)
    others: dict[str, dict[str, str]] = {}
    md = _parser()
    roles = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown" or REMOVED_TAGS & set(cell.metadata.get("tags", [])):
            continue
        for content in _roles_in(md, cell.source):
            doc, name, fmt = _split(content)
            source = values
            if doc:  # a value glued in another notebook: "path::name", relative to this one
                if doc not in others:
                    candidates = [] if path is None else [path.parent / doc, path.parent / f"{doc}.ipynb"]
                    found = next((c for c in candidates if c.is_file()), None)
                    others[doc] = glue_values(nbformat.read(found, as_version=4)) if found else {}
                source = others[doc]
            text = source.get(name)
            roles.append(Role(index, f"{doc}::{name}" if doc else name, fmt,
                              None if text is None else format_plain(text, fmt)))
    return roles


class _PastedText(HTMLParser):
    """Texts of ``<span class="pasted-text">`` inside the page's ``<article>`` (the sidebars' table of
    contents repeats headings, glued values included)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.article = 0
        self.depth = 0  # open spans inside the current pasted-text span (0: not in one)
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self.article += 1
        elif tag == "span":
            if self.depth:
                self.depth += 1
            elif self.article and "pasted-text" in (dict(attrs).get("class") or "").split():
                self.depth = 1
                self.texts.append("")

    def handle_endtag(self, tag):
        if tag == "article":
            self.article = max(self.article - 1, 0)
        elif tag == "span" and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def pasted_texts(page: Path | str) -> list[str]:
    """The glued texts on a built page (a path, or the HTML itself), in document order."""
    html = page.read_text(encoding="utf-8") if isinstance(page, Path) else page
    parser = _PastedText()
    parser.feed(html)
    parser.close()
    return parser.texts


def check_glue(notebook: Path | str | nbformat.NotebookNode, page: Path | str) -> list[str]:
    """Problems (empty: all good) in how the page shows the notebook's ``{glue:text}`` values.

    ``page`` is the built HTML file, or its text (to test a doctored page).
    """
    roles = glue_roles(notebook)
    texts = pasted_texts(Path(page) if isinstance(page, Path) else page)
    problems = [f"{{glue:text}}`{r.name}` (markdown cell {r.cell}): nothing glued under {r.name!r}"
                for r in roles if r.expected is None]
    for i, (role, text) in enumerate(zip(roles, texts)):
        if role.expected is not None and text != role.expected:
            spec = f":{role.fmt}" if role.fmt else ""
            problems.append(f"glued value {i + 1} ({{glue:text}}`{role.name}{spec}`, markdown cell {role.cell}): "
                            f"page shows {text!r}, the notebook glued {role.expected!r}")
    if len(roles) != len(texts):
        problems.append(f"{len(roles)} {{glue:text}} roles in the notebook but {len(texts)} glued values on the page")
    return problems
