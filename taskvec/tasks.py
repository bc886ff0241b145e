"""The paper's tasks as data: one JSON file per task under ``tasks/<category>/``.

A word task lists its examples; an algorithmic task declares a rule that generates
them (letters, letter lists). Every file is validated on load and a bad file is
reported with its path and the problem. How a prediction is scored is part of the
task: ``exact`` (first predicted token equals an accepted answer) or ``prefix`` (an
accepted answer starts with it; knowledge tasks, whose answers span several tokens).
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import TaskvecError

#: The paper's four categories, then ``sequence``: tasks whose answers are several tokens by nature (not
#: in the paper; the "Beyond one token" section uses them). ``list_tasks``/``load_tasks()`` default to
#: the paper's categories, so "all tasks" keeps meaning the paper's 18.
PAPER_CATEGORIES = ("algorithmic", "translation", "linguistic", "knowledge")
CATEGORIES = PAPER_CATEGORIES + ("sequence",)
COMPARE_RULES = ("exact", "prefix")
REQUIRED_KEYS = ("name", "category", "description", "compare")
#: Fewest examples a task needs: 5 demonstrations + query + 2 dummy queries, with room to vary.
MIN_EXAMPLES = 10


class TaskFileError(TaskvecError, ValueError):
    """A task file that cannot be used; the message names the file and the problem."""


class UnknownTaskError(TaskvecError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Example:
    """One input/output pair; ``outputs[0]`` is the canonical answer used in demonstrations."""

    input: str
    outputs: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    description: str
    compare: str
    examples: tuple[Example, ...]
    source: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        if self.compare not in COMPARE_RULES:
            raise ValueError(f"compare must be one of {COMPARE_RULES}, got {self.compare!r}")

    def __len__(self) -> int:
        return len(self.examples)

    def is_correct(self, predicted: str, example: Example) -> bool:
        """Score decoded predicted text against the example's accepted answers, both stripped: ``exact`` tasks
        need equality; ``prefix`` tasks (the original code's rule) accept either one starting with the other,
        so ``Par`` and ``Paris,`` both count for ``Paris``."""
        pred = predicted.strip()
        if not pred:
            return False
        answers = [out.strip() for out in example.outputs]
        if self.compare == "exact":
            return pred in answers
        return any(answer and (answer.startswith(pred) or pred.startswith(answer)) for answer in answers)

    def identity(self) -> dict:
        """Everything about the task that decides a result (for cache keys): name, scoring, examples."""
        return {"name": self.name, "compare": self.compare,
                "examples": [[e.input, list(e.outputs)] for e in self.examples]}

    def restrict(self, examples: Iterable[Example]) -> "Task":
        """The same task over a subset of its examples (e.g. the single-token ones)."""
        return Task(self.name, self.category, self.description, self.compare, tuple(examples), self.source, self.path)


# --- generated (algorithmic) tasks -------------------------------------------------

def _letters(params: dict) -> str:
    return params.get("alphabet", string.ascii_lowercase)


def _gen_next_letter(params: dict) -> list[Example]:
    a = _letters(params)
    return [Example(a[i], (a[i + 1],)) for i in range(len(a) - 1)]


def _gen_prev_letter(params: dict) -> list[Example]:
    a = _letters(params)
    return [Example(a[i], (a[i - 1],)) for i in range(1, len(a))]


def _gen_to_upper(params: dict) -> list[Example]:
    return [Example(c, (c.upper(),)) for c in _letters(params)]


def _gen_to_lower(params: dict) -> list[Example]:
    return [Example(c.upper(), (c,)) for c in _letters(params)]


def _gen_list(answer):
    """Lists of distinct letters; ``answer(items, separator)`` is the output."""

    def generate(params: dict) -> list[Example]:
        alphabet = _letters(params)
        lo, hi = int(params["min_len"]), int(params["max_len"])
        size, sep = int(params["pool_size"]), params.get("separator", ",")
        if not 2 <= lo <= hi <= len(alphabet):
            raise ValueError(f"need 2 <= min_len <= max_len <= {len(alphabet)}, got {lo}, {hi}")
        rng = random.Random(params["seed"])
        seen: dict[str, Example] = {}
        while len(seen) < size:
            # Distinct letters, so first and last always differ (the conflicting-task pair needs that).
            items = rng.sample(alphabet, rng.randint(lo, hi))
            text = sep.join(items)
            seen.setdefault(text, Example(text, (answer(items, sep),)))
        return list(seen.values())

    return generate


GENERATORS = {
    "next_letter": _gen_next_letter,
    "prev_letter": _gen_prev_letter,
    "to_upper": _gen_to_upper,
    "to_lower": _gen_to_lower,
    "list_first": _gen_list(lambda items, sep: items[0]),
    "list_last": _gen_list(lambda items, sep: items[-1]),
    "list_reverse": _gen_list(lambda items, sep: sep.join(reversed(items))),
}


# --- loading and validation --------------------------------------------------------

def tasks_dir() -> Path:
    """The task folder: ``$TASKVEC_TASKS`` or the repository's ``tasks/``."""
    root = os.environ.get("TASKVEC_TASKS")
    return Path(root) if root else Path(__file__).resolve().parent.parent / "tasks"


def _parse_example(raw: Any, index: int, fail) -> Example:
    if not (isinstance(raw, list) and len(raw) == 2):
        fail(f"examples[{index}] must be a [input, output] pair, got {raw!r}")
    x, y = raw
    outputs = [y] if isinstance(y, str) else y
    if not isinstance(x, str) or not x.strip() or x != x.strip():
        fail(f"examples[{index}]: input must be a non-empty string without surrounding spaces, got {x!r}")
    if not (isinstance(outputs, list) and outputs and all(isinstance(o, str) and o.strip() for o in outputs)):
        fail(f"examples[{index}] ({x!r}): output must be a non-empty string or a list of them, got {y!r}")
    if len(set(outputs)) != len(outputs):
        fail(f"examples[{index}] ({x!r}): repeated accepted output in {outputs!r}")
    return Example(x, tuple(outputs))


def parse_task(data: Any, path: Path | str = "<memory>") -> Task:
    """Validate a task file's parsed JSON and build the :class:`Task`; errors name ``path``."""
    path = Path(path)

    def fail(problem: str):
        raise TaskFileError(f"{path}: {problem}")

    if not isinstance(data, dict):
        fail("top level must be a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], str) or not data[key]:
            fail(f"{key!r} must be a non-empty string")
    if path.suffix == ".json" and data["name"] != path.stem:
        fail(f"name {data['name']!r} does not match the file name {path.stem!r}")
    if data["category"] not in CATEGORIES:
        fail(f"unknown category {data['category']!r} (expected one of {', '.join(CATEGORIES)})")
    if path.suffix == ".json" and path.parent.name in CATEGORIES and path.parent.name != data["category"]:
        fail(f"category {data['category']!r} but the file is in folder {path.parent.name!r}")
    if data["compare"] not in COMPARE_RULES:
        fail(f"unknown compare rule {data['compare']!r} (expected one of {', '.join(COMPARE_RULES)})")
    has_examples, has_generator = "examples" in data, "generator" in data
    if has_examples == has_generator:
        fail("needs exactly one of 'examples' (a list of pairs) or 'generator' (a rule)")
    if has_generator:
        gen = data["generator"]
        if not isinstance(gen, dict) or gen.get("rule") not in GENERATORS:
            fail(f"generator.rule must be one of {', '.join(GENERATORS)}, got {gen!r}")
        try:
            examples = GENERATORS[gen["rule"]](gen)
        except (KeyError, ValueError, TypeError) as error:
            fail(f"generator {gen['rule']!r}: bad or missing parameter ({error})")
    else:
        if not isinstance(data["examples"], list):
            fail("'examples' must be a list")
        examples = [_parse_example(raw, i, fail) for i, raw in enumerate(data["examples"])]
    seen: dict[str, int] = {}
    for i, example in enumerate(examples):
        if example.input in seen:
            fail(f"examples[{i}]: input {example.input!r} repeats examples[{seen[example.input]}]")
        seen[example.input] = i
        if example.input in example.outputs:
            fail(f"examples[{i}]: input {example.input!r} is also its own answer")
    if len(examples) < MIN_EXAMPLES:
        fail(f"only {len(examples)} examples; a task needs at least {MIN_EXAMPLES}")
    return Task(
        name=data["name"], category=data["category"], description=data["description"],
        compare=data["compare"], examples=tuple(examples), source=str(data.get("source", "")), path=str(path),
    )


def load_task_file(path: Path | str) -> Task:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except OSError as error:
        raise TaskFileError(f"{path}: cannot read ({error.strerror})") from None
    return parse_task(data, path)


def task_files(root: Path | None = None) -> dict[str, Path]:
    """Task name -> file, for every ``<category>/<name>.json`` under ``root``."""
    root = Path(root) if root else tasks_dir()
    found: dict[str, Path] = {}
    for category in CATEGORIES:
        for path in sorted((root / category).glob("*.json")):
            if path.stem in found:
                raise TaskFileError(f"{path}: task name {path.stem!r} also used by {found[path.stem]}")
            found[path.stem] = path
    return found


def list_tasks(root: Path | None = None, categories: Sequence[str] = PAPER_CATEGORIES) -> list[str]:
    """Task names of ``categories`` (default: the paper's 18), ordered by category then name."""
    return [name for name, path in task_files(root).items() if path.parent.name in categories]


def all_tasks(root: Path | None = None) -> list[str]:
    """Every task name, the sequence tasks included."""
    return list(task_files(root))


@lru_cache(maxsize=None)
def _load_cached(path: str, mtime: float) -> Task:
    return load_task_file(path)


def load_task(name: str, root: Path | None = None) -> Task:
    files = task_files(root)
    if name not in files:
        raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(files)}")
    path = files[name]
    return _load_cached(str(path), path.stat().st_mtime)


def load_tasks(names: Sequence[str] | None = None, root: Path | None = None) -> list[Task]:
    """Load ``names`` (the paper's tasks when ``None``); every name is checked before any file is read."""
    files = task_files(root)
    names = list_tasks(root) if names is None else list(names)
    unknown = [n for n in names if n not in files]
    if unknown:
        raise UnknownTaskError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(files)}")
    return [load_task(n, root) for n in names]
