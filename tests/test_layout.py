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
    assert violations("taskvec.mechanism", {"taskvec.studies.sections"})
    assert violations("taskvec.studies.analysis", {"taskvec.publishing.charts"})
    assert not violations("taskvec.publishing.runner", {"taskvec.studies.sections", "taskvec.experiment"})
    # Relative imports resolve: sections imports its sibling studies and the method one level up.
    found = imported(PACKAGE / "studies" / "sections.py")
    assert {"taskvec.studies.analysis", "taskvec.experiment"} <= found, found


def test_every_module_lives_in_its_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} - ENTRY_POINTS
    assert top == {"arch", "compat", "errors", "experiment", "mechanism", "models", "prompts", "remote", "store",
                   "tasks"}
    assert {p.stem for p in (PACKAGE / "studies").glob("*.py")} - {"__init__"} == {
        "analysis", "context", "long_answers", "sections", "stats"}
    assert {p.stem for p in (PACKAGE / "publishing").glob("*.py")} - {"__init__"} == {
        "book", "charts", "paper", "runner", "schema"}
