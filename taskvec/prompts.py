"""Few-shot prompts: the format, seeded sampling, and JSONL export/import.

A :class:`FewShotPrompt` holds the demonstrations ``S``, the query ``x`` and the dummy
queries ``x'`` used to extract the task vector; all are distinct examples of one task.
Sampling is seeded per (seed, task, split), so adding a task or changing one split's
size never changes another's prompts. Prompt sets can be written to JSONL and read
back, so another implementation can be run on exactly the same prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import SettingError
from .tasks import Example, Task


class TooFewExamples(SettingError):
    """A task (after filtering and exclusions) has fewer distinct examples than one prompt needs."""


@dataclass(frozen=True)
class PromptFormat:
    """How one demonstration is written; the paper's default is ``example:{x}->{y}``, one per line.

    ``space``: the original implementation's spelling of word tasks, a space before the input and
    before the answer (``example: cat-> gato``), so the answer is the token a tokenizer of this kind
    uses for a word after a space (`` gato``). The query line still ends right after ``->``.
    """

    template: str = "example:{x}->{y}"
    separator: str = "\n"
    space: bool = False

    def __post_init__(self) -> None:
        if not self.template.endswith("{y}") or self.template.count("{x}") != 1 or self.template.count("{y}") != 1:
            raise SettingError(f"prompt template must contain {{x}} once and end with {{y}}, got {self.template!r}")

    @property
    def name(self) -> str:
        """``spaced`` or ``bare``, as tables record it."""
        return "spaced" if self.space else "bare"

    def _x(self, x: str) -> str:
        return " " + x if self.space else x

    def answer(self, y: str) -> str:
        """The answer as written after the query line (with its leading space when spaced)."""
        return " " + y if self.space else y

    def line(self, x: str, y: str) -> str:
        return self.template.replace("{x}", self._x(x)).replace("{y}", self.answer(y))

    def query(self, x: str) -> str:
        """The query line, ending right where the answer would start."""
        return self.template[: -len("{y}")].replace("{x}", self._x(x))

    def few_shot(self, demonstrations: Sequence[Example], x: str) -> str:
        lines = [self.line(d.input, d.output) for d in demonstrations]
        return self.separator.join(lines + [self.query(x)])


@dataclass(frozen=True)
class FewShotPrompt:
    task: str
    demonstrations: tuple[Example, ...]
    query: Example
    dummy_queries: tuple[Example, ...] = ()

    def regular_text(self, fmt: PromptFormat) -> str:
        """Demonstrations + the real query: ordinary in-context learning."""
        return fmt.few_shot(self.demonstrations, self.query.input)

    def dummy_texts(self, fmt: PromptFormat) -> list[str]:
        """Demonstrations + each dummy query: the prompts the task vector is read from."""
        return [fmt.few_shot(self.demonstrations, d.input) for d in self.dummy_queries]

    def query_text(self, fmt: PromptFormat) -> str:
        """The query alone (no demonstrations): Baseline input, and where θ is patched in."""
        return fmt.query(self.query.input)

    def to_json(self, split: str | None = None) -> dict:
        row = {
            "task": self.task,
            "demonstrations": [[d.input, list(d.outputs)] for d in self.demonstrations],
            "query": [self.query.input, list(self.query.outputs)],
            "dummy_queries": [[d.input, list(d.outputs)] for d in self.dummy_queries],
        }
        if split is not None:
            row = {"split": split, **row}
        return row

    @classmethod
    def from_json(cls, row: dict) -> "FewShotPrompt":
        def example(pair) -> Example:
            x, y = pair
            return Example(x, (y,) if isinstance(y, str) else tuple(y))

        return cls(
            task=row["task"],
            demonstrations=tuple(example(p) for p in row["demonstrations"]),
            query=example(row["query"]),
            dummy_queries=tuple(example(p) for p in row.get("dummy_queries", [])),
        )


def _rng(seed: int, task: str, split: str) -> random.Random:
    # A string seed is hashed (sha512) by random.Random: stable across runs and platforms.
    return random.Random(f"{seed}:{task}:{split}")


def sample_prompts(task: Task, n: int, n_shots: int = 5, seed: int = 41, split: str = "test",
                   n_dummies: int = 2, exclude: Sequence[Iterable[str]] | None = None) -> list[FewShotPrompt]:
    """``n`` prompts, each with ``n_shots`` demonstrations, a query and ``n_dummies`` dummy queries.

    Within a prompt all examples are distinct. Different prompts may share a query
    (the letter tasks have only 25 inputs). ``exclude[i]``: inputs that prompt ``i`` must not
    contain anywhere (e.g. another prompt's query, so nothing of it leaks into this one).
    """
    need = n_shots + 1 + n_dummies
    if len(task.examples) < need:
        raise TooFewExamples(f"task {task.name!r} has {len(task.examples)} examples; a prompt needs {need}")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude needs one set of inputs per prompt ({n}), got {len(exclude)}")
    rng = _rng(seed, task.name, split)
    prompts = []
    for i in range(n):
        pool = task.examples
        if exclude is not None:
            banned = set(exclude[i])
            pool = [e for e in task.examples if e.input not in banned]
            if len(pool) < need:
                raise TooFewExamples(f"task {task.name!r}: prompt {i} needs {need} examples, "
                                   f"{len(pool)} are left after excluding {sorted(banned)}")
        picked = rng.sample(pool, need)
        prompts.append(FewShotPrompt(task.name, tuple(picked[:n_shots]), picked[n_shots], tuple(picked[n_shots + 1:])))
    return prompts


def sample_queries(task: Task, n: int, seed: int = 41, split: str = "baseline") -> list[FewShotPrompt]:
    """``n`` query-only prompts: every example once per pass over a shuffled pool."""
    rng = _rng(seed, task.name, split)
    queries: list[Example] = []
    while len(queries) < n:
        pool = list(task.examples)
        rng.shuffle(pool)
        queries.extend(pool[: n - len(queries)])
    return [FewShotPrompt(task.name, (), q) for q in queries]


def write_jsonl(path: Path | str, prompt_sets: dict[str, Iterable[FewShotPrompt]]) -> Path:
    """Write prompts, one JSON object per line, tagged with their split (e.g. dev/test/baseline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for split, prompts in prompt_sets.items():
            for prompt in prompts:
                handle.write(json.dumps(prompt.to_json(split), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path | str) -> dict[str, dict[str, list[FewShotPrompt]]]:
    """Read a prompt file back as ``{task: {split: [prompts]}}``; bad lines name the line."""
    out: dict[str, dict[str, list[FewShotPrompt]]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = FewShotPrompt.from_json(row)
                split = row["split"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise SettingError(f"{path}:{number}: not a prompt record ({error!r})") from None
            out.setdefault(prompt.task, {}).setdefault(split, []).append(prompt)
    return out
