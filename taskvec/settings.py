"""Typed settings: one pydantic model per set of settings, read by the library, the command line, the
experiment file's schema, the notebooks' parameter checks and the generated documentation.

A settings model is strict (``2.5``, ``True`` or ``"5"`` is not an integer), frozen, rejects unknown
names, and turns every problem into one :class:`~taskvec.errors.SettingError` whose lines name the model,
the setting and the value: ``Protocol.n_dev must be >= 1, got 0``.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Literal, Optional

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SettingError
from .prompts import PromptFormat
from .scoring import PREFIX_RULES, single_token_examples

#: A count of things: an integer >= 1.
Count = Annotated[int, Field(ge=1)]

#: How pydantic's error types read after "<Model>.<setting> must be".
_MUST = {"int_type": "an integer", "int_parsing": "an integer", "bool_type": "true or false",
         "string_type": "a string", "float_type": "a number", "list_type": "a list", "dict_type": "a mapping",
         "none_required": "null"}


def _choices(annotation: Any) -> list[str] | None:
    """The allowed values of a ``Literal`` (or ``Optional[Literal]``) annotation, as text."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in args]
    for arg in args:  # Optional[Literal[...]]
        found = _choices(arg)
        if found is not None:
            return found + (["None"] if type(None) in args else [])
    return None


def describe(model: type[BaseModel], error: ValidationError) -> list[str]:
    """One line per problem of ``error`` (raised validating ``model``): ``Model.key must be ..., got ...``."""
    lines = []
    for e in error.errors(include_url=False):
        where = ".".join([model.__name__, *map(str, e["loc"])])
        kind, ctx, got = e["type"], e.get("ctx") or {}, e.get("input")
        field = model.model_fields.get(str(e["loc"][0])) if e["loc"] else None
        if kind == "extra_forbidden":
            lines.append(f"{model.__name__}: unknown setting {e['loc'][0]!r} "
                         f"(known: {', '.join(model.model_fields)})")
        elif kind == "missing":
            lines.append(f"{where} is required")
        elif kind == "literal_error" and field is not None and _choices(field.annotation):
            lines.append(f"{where} must be one of {', '.join(_choices(field.annotation))}, got {got!r}")
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()))
            lines.append(f"{where} must be {sign} {bound}, got {got!r}")
        elif kind in _MUST:
            lines.append(f"{where} must be {_MUST[kind]}, got {got!r}")
        elif kind == "value_error":
            lines.append(f"{where}: {str(ctx.get('error', e['msg']))}")
        else:
            lines.append(f"{where}: {e['msg']}, got {got!r}")
    return lines


class Settings(BaseModel):
    """Base of every settings model: strict, frozen, no unknown names, errors as SettingError."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)
    #: Names that are settings of this model but not part of a result's identity (sizes of batches).
    not_in_key: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingError("\n".join(describe(type(self), error))) from None

    def replace(self, **changes: Any):
        """A copy with ``changes``, validated like a new one."""
        return type(self)(**{**self.model_dump(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Every setting, as plain JSON-able values (what a cache key holds)."""
        return self.model_dump(mode="json")


#: How word tasks are spelled: ``rule`` (the original implementation's, :meth:`Protocol.format_for`)
#: or ``bare`` (every task as ``example:cat->gato``).
WORD_FORMATS = ("rule", "bare")
#: Weight dtypes a protocol may ask for (None: the model's default, see taskvec.models.placement).
DTYPES = (None, "float32", "bfloat16")
#: The categories the spacing rule applies to (word lists scored by exact match).
WORD_CATEGORIES = ("translation", "linguistic")
#: Spaced when it keeps at least this share of the single-token answers the bare form has.
SPACE_RATIO = 0.7


class Protocol(Settings):
    """Sizes and settings of the main experiment; defaults are the paper's."""

    n_shots: Count = Field(5, description="demonstrations per prompt")
    n_dev: Count = Field(50, description="prompts used to choose L")
    n_test: Count = Field(50, description="prompts scored for Regular and Hypothesis")
    n_baseline: Count = Field(100, description="query-only prompts scored for Baseline")
    n_dummies: Count = Field(2, description="dummy queries averaged into each task vector")
    seed: int = Field(41, description="prompt sampling seed (the original code used 41)")
    template: str = Field("example:{x}->{y}", description="one demonstration; the query line ends before {y}")
    separator: str = Field("\n", description="between demonstrations")
    single_token: bool = Field(True, description='keep only examples whose answer is one token ("exact" tasks)')
    word_format: Literal["rule", "bare"] = Field(
        "rule", description="word tasks' spelling: \"rule\" (the original code's, see format_for) or \"bare\"")
    dtype: Optional[Literal["float32", "bfloat16"]] = Field(
        None, description="weights' dtype, \"float32\" or \"bfloat16\"; None: the model's default (float32 on a CPU)")
    prefix_rule: Literal["first_token", "lenient"] = Field(
        "first_token", description="how \"prefix\" (knowledge) tasks are scored: see Scorer")
    batch_size: Count = Field(64, description="rows per forward pass for full prompts")
    patch_batch_size: Count = Field(
        256, description="rows per forward pass in the layer sweep (short query-only prompts)")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        PromptFormat(value, "\n")  # raises SettingError on a template without {x} / {y}
        return value

    @property
    def format(self) -> PromptFormat:
        """The bare format: every task's with ``word_format="bare"``, and algorithmic and knowledge tasks'."""
        return PromptFormat(self.template, self.separator)

    def format_for(self, task, tokenizer) -> PromptFormat:
        """The format ``task`` is written in for this tokenizer (demonstrations, dummies, query, scoring).

        The original implementation's rule, per word task (translation and linguistic, exact match):
        with a space before input and answer (``example: cat-> gato``) when, so written, at least
        :data:`SPACE_RATIO` as many canonical answers are single tokens as written bare; otherwise
        bare. Algorithmic tasks (letters, letter lists) and knowledge tasks (prefix-matched) are
        always bare, as there. ``word_format="bare"`` writes every task bare (taskvec's first form).
        """
        from dataclasses import replace

        bare = self.format
        if self.word_format == "bare" or task.category not in WORD_CATEGORIES or task.compare != "exact":
            return bare
        spaced = replace(bare, space=True)
        n_spaced = len(single_token_examples(task, tokenizer, spaced))
        return spaced if n_spaced >= SPACE_RATIO * len(single_token_examples(task, tokenizer, bare)) else bare

    def usable(self, task, tokenizer):
        """``(format, task)``: how ``task`` is written for this tokenizer, and its examples usable so written
        (single-token answers for exact-match tasks when :attr:`single_token`)."""
        fmt = self.format_for(task, tokenizer)
        return fmt, (single_token_examples(task, tokenizer, fmt) if self.single_token else task)


assert set(PREFIX_RULES) == set(_choices(Protocol.model_fields["prefix_rule"].annotation))
