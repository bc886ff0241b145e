"""The book's findings table: one row per experiment, read from what each executed section recorded.

Each section notebook ends by gluing one *finding* (:func:`record`): the paper's claim, and per model the number
the page reports and a grade from :mod:`taskvec.studies.verdicts` (the same numbers, the same tested rules).
The intro, executed after every other section, reads them back (:func:`collect`), so the table up front can
never say something a page does not.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import TaskvecError
from ..studies.verdicts import GRADES

#: The glue key under which a section records its finding.
KEY = "finding"


@dataclass(frozen=True)
class Row:
    model: str
    value: str  #: the number the page reports, with its interval where it has one
    grade: str  #: one of :data:`taskvec.studies.verdicts.GRADES`, or "new" for a question the paper does not ask

    def __post_init__(self) -> None:
        if self.grade not in GRADES + ("new",):
            raise ValueError(f"grade must be one of {', '.join(GRADES + ('new',))}, got {self.grade!r}")


@dataclass(frozen=True)
class Finding:
    page: str  #: the section notebook's name (its page is <page>.html beside the intro)
    experiment: str  #: how the book names the experiment
    claim: str  #: the paper's claim, or the question for a study the paper does not have
    rows: tuple[Row, ...] = field(default_factory=tuple)


def record(finding: Finding) -> str:
    """The finding as the JSON text a section glues under :data:`KEY`."""
    return json.dumps(asdict(finding), ensure_ascii=False)


class FindingsError(TaskvecError, ValueError):
    pass


def _glued(path: Path) -> str | None:
    """The text a notebook glued under :data:`KEY`, or None."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook", {}).get("name") == KEY:
                return output["data"]["application/papermill.record/text/plain"]
    return None


def collect(sections_dir: Path | str, pages: Sequence[str]) -> list[Finding]:
    """The findings of ``pages`` (in that order) from the executed notebooks in ``sections_dir``. A page that was
    not executed, or records no finding, is left out; a record that cannot be read is an error naming it."""
    found = []
    for page in pages:
        path = Path(sections_dir) / f"{page}.ipynb"
        if not path.is_file():
            continue
        text = _glued(path)
        if text is None:
            continue
        try:
            data = json.loads(ast.literal_eval(text))
            found.append(Finding(page=data["page"], experiment=data["experiment"], claim=data["claim"],
                                 rows=tuple(Row(**row) for row in data["rows"])))
        except (ValueError, SyntaxError, KeyError, TypeError) as error:
            raise FindingsError(f"{path}: its recorded finding cannot be read ({error})") from None
    return found


def table(findings: Sequence[Finding]) -> pd.DataFrame:
    """One row per experiment: experiment (a link to its page), claim, and per model "grade: value"."""
    models = list(dict.fromkeys(row.model for f in findings for row in f.rows))
    rows = []
    for f in findings:
        by_model = {row.model: row for row in f.rows}
        line = {"experiment": f'<a href="{f.page}.html">{f.experiment}</a>', "the paper's claim": f.claim}
        for model in models:
            row = by_model.get(model)
            line[model] = "–" if row is None else f"<b>{row.grade}</b>: {row.value}"
        rows.append(line)
    return pd.DataFrame(rows, columns=["experiment", "the paper's claim", *models])


def parameter_count(name: str) -> int | None:
    """Parameters of model ``name`` counted from its config on the meta device (no weights read); None when its
    config cannot be had here (a hub id without hub access)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import embedded_path, resolve_source

    source = resolve_source(name)
    path = embedded_path(name)[0] if source == "embedded" else name
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in model.parameters()))


#: The paper's models' sizes in parameters, from their names (Table 6).
def paper_parameters(model: str) -> float:
    """``"LLaMA 13B"`` -> 13e9, ``"Pythia 2.8B"`` -> 2.8e9."""
    size = model.rsplit(" ", 1)[-1]
    if not size.endswith("B"):
        raise ValueError(f"no size in the model name {model!r}")
    return float(size[:-1]) * 1e9
