"""Write the tasks table of tasks/README.md (shown on the book's Method page) from the task files and
the embedded models' tokenizers: size, and per model the format each task is written in and the examples
usable so written.

    .venv/bin/python scripts/tasks_table.py          # rewrite the table in place
    .venv/bin/python scripts/tasks_table.py --check  # exit 1 if the table is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "tasks" / "README.md"
MODELS = ("gemma-3-270m", "smollm2-135m")
START, END = "<!-- tasks table: scripts/tasks_table.py -->", "<!-- end of tasks table -->"


def table(models=MODELS) -> str:
    from transformers import AutoTokenizer

    from taskvec.experiment import usable_counts
    from taskvec.models import embedded_path
    from taskvec.tasks import all_tasks, load_tasks

    tasks = load_tasks(all_tasks())  # the paper's 18, then the sequence tasks
    counts = {m: usable_counts(tasks, AutoTokenizer.from_pretrained(str(embedded_path(m)[0]))).set_index("task")
              for m in models}
    head = ["category", "task", "description", "compare", "examples"] + [f"{m}: format, usable" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        cells = [task.category, f"`{task.name}`", task.description, task.compare, str(len(task))]
        for m in models:
            row = counts[m].loc[task.name]
            cells.append(f"{row['format']}, {row['n_usable']}"
                         + (f" (bare {row['n_usable_bare']})" if row["format"] != "bare" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    ns = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    before, rest = text.split(START)
    _, after = rest.split(END)
    new = f"{before}{START}\n{table()}\n{END}{after}"
    if ns.check:
        if new != text:
            print("tasks/README.md: the tasks table is stale; run scripts/tasks_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
