"""The package's layers: the method at the top of taskvec/, the studies in taskvec/studies/, the publishing
machinery in taskvec/publishing/, and imports running one way (publishing -> studies -> method)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taskvec"
ENTRY_POINTS = {"cli", "__main__"}  # the command line reaches every layer
LAYER = {"method": 0, "studies": 1, "publishing": 2}


def layer_of(module: str) -> str:
    """``taskvec.studies.x`` -> studies; ``taskvec.x`` -> method."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("studies", "publishing") else "method"


def imported(path: Path) -> set[str]:
    """The taskvec modules ``path`` imports (relative imports resolved)."""
    here = ["taskvec", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            if stem.startswith("taskvec"):
                found.add(stem)
                found.update(f"{stem}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("taskvec"))
    return found


def violations(name: str, imports: set[str]) -> list[str]:
    """The imports of module ``name`` that point to a higher layer."""
    mine = layer_of(name)
    return [f"{name} ({mine}) imports {other} ({layer_of(other)})" for other in sorted(imports)
            if LAYER[layer_of(other)] > LAYER[mine]]


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem not in ENTRY_POINTS:
            wrong += violations(".".join(["taskvec", *path.relative_to(PACKAGE).with_suffix("").parts]), imported(path))
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_wrong_way_import():
    assert violations("taskvec.mechanism", {"taskvec.publishing.sections"})
    assert violations("taskvec.studies.analysis", {"taskvec.publishing.charts"})
    assert not violations("taskvec.publishing.runner", {"taskvec.publishing.sections", "taskvec.experiment"})
    # Relative imports resolve: sections imports the studies one level up and the method above them.
    found = imported(PACKAGE / "publishing" / "sections.py")
    assert {"taskvec.studies.analysis", "taskvec.experiment"} <= found, found


def test_every_module_lives_in_its_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} - ENTRY_POINTS
    assert top == {"arch", "compat", "errors", "experiment", "mechanism", "models", "prompts", "remote", "scoring",
                   "settings", "store", "study", "tasks"}
    assert {p.stem for p in (PACKAGE / "studies").glob("*.py")} - {"__init__"} == {
        "analysis", "context", "heads", "long_answers", "stats", "verdicts"}
    assert {p.stem for p in (PACKAGE / "publishing").glob("*.py")} - {"__init__"} == {
        "book", "charts", "findings", "numbering", "paper", "runner", "schema", "sections"}


NOTEBOOKS = {p.stem for p in (PACKAGE.parent / "nb").glob("*.ipynb")}


def notebook_coupling(source: str) -> list[str]:
    """What in ``source`` knows the book's notebooks: a path to one, or a mapping keyed by two or more of their
    names (checks or settings per notebook). Only taskvec/publishing may know them."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value.endswith(".ipynb") or "nb/" in node.value):
            found.append(f"line {node.lineno}: {node.value!r}")
        if isinstance(node, ast.Dict):
            names = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(names & NOTEBOOKS) >= 2:
                found.append(f"line {node.lineno}: a mapping keyed by notebooks {sorted(names & NOTEBOOKS)}")
    return found


def test_only_publishing_knows_the_notebooks():
    wrong = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if layer_of(".".join(["taskvec", *path.relative_to(PACKAGE).with_suffix("").parts])) != "publishing" \
                and path.stem not in ENTRY_POINTS:
            found = notebook_coupling(path.read_text(encoding="utf-8"))
            if found:
                wrong[str(path.relative_to(PACKAGE))] = found
    assert not wrong, wrong


def test_the_coupling_rule_catches_checks_keyed_by_notebook():
    assert notebook_coupling('CHECKS = {"beyond": f, "needs": g}')
    assert notebook_coupling('path = "nb/accuracy.ipynb"')
    assert not notebook_coupling('columns = {"accuracy": 1, "n": 2}')


def test_the_readme_fault_table_names_tests_that_exist():
    """README's "When something goes wrong" table is written from the tests: each test it names exists."""
    import re

    root = PACKAGE.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## When something goes wrong"):text.index("## Glossary")]
    names, current = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", section), None
    assert len(names) >= 15
    for file, test in names:
        current = file or current
        assert f"def {test}(" in (root / "tests" / current).read_text(encoding="utf-8"), f"{current}::{test}"
