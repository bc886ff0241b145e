"""The experiment file (``experiments.yaml``) as typed models: what :func:`taskvec.publishing.runner.load_experiments`
validates against, and what ``scripts/experiments_doc.py`` documents (``book/experiments.md``).

Every problem is reported at its key path (``profiles.p.protocol.n_dev``); the runner adds the file's
name. Messages of this module's own checks are pydantic custom errors of type ``taskvec_*``, written to
read after the key path: "must ..." ones as a sentence (``profiles.p.models must be ...``), the others
after a colon (``profiles.p.tasks: unknown task(s) antonym``).

Task names are read when a file is validated, not when this module is imported
(:func:`taskvec.tasks.all_tasks`, which follows ``TASKVEC_TASKS``). The sections and their parameters are
the settings models of :data:`taskvec.publishing.sections.SECTIONS`: a profile's sections are checked by
them, with the profile's common values, before anything runs.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr,
                      StringConstraints, ValidationError, WrapValidator, create_model, model_validator)
from pydantic_core import PydanticCustomError

from ..errors import SettingError, TaskvecError
from ..settings import Protocol
from .sections import SECTIONS

#: The parameters every profile sets for the sections that declare them (not a section's to set).
COMMON = ("models", "tasks", "protocol", "cache_dir", "remote", "beside")

#: Prefix of the error types raised here (the others are pydantic's own, about types and shapes).
ERROR_TYPE = "taskvec_"


def _error(kind: str, message: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(ERROR_TYPE + kind, message, context)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _must(message: str) -> WrapValidator:
    """Report any type or shape error below this key as one sentence, ``<key> must ..., got <value>``
    (``message`` is the "must ..." part);
    errors of this module's own checks below it (a key deeper down) are passed on as they are."""

    def validate(value: Any, handler):
        try:
            return handler(value)
        except ValidationError as error:
            if all(e["type"].startswith(ERROR_TYPE) for e in error.errors()):
                raise
            raise _error("shape", "{expected}, got {got}", expected=message, got=_shown(value)) from None

    return WrapValidator(validate)


def _none_is(empty: Any) -> BeforeValidator:
    """A key written without a value (``tasks:``) means its empty default."""
    return BeforeValidator(lambda value: empty() if value is None else value)


class _Mapping(BaseModel):
    """A mapping with a fixed set of keys: unknown keys are reported together, with the allowed ones."""

    model_config = ConfigDict(extra="forbid", strict=True)
    #: What the keys are called in messages ("key", "setting", ...).
    noun: ClassVar[str] = "key"
    #: The message when the value is not a mapping at all.
    not_a_mapping: ClassVar[str] = "must be a mapping, got {got}"

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise _error("mapping", cls.not_a_mapping, got=_shown(data))
        allowed = list(cls.model_fields)
        unknown = [str(k) for k in data if k not in allowed]
        if unknown:
            hints = sorted({m for k in unknown for m in difflib.get_close_matches(k, allowed, n=1)})
            raise _error("unknown_keys", "unknown {noun}(s) {unknown} (allowed: {allowed}{hint})", noun=cls.noun,
                         unknown=", ".join(sorted(unknown)), allowed=", ".join(sorted(allowed)),
                         hint=f"; did you mean {' or '.join(hints)}?" if hints else "")
        return data


# --- protocol: the fields of taskvec.Protocol, with their types, constraints and descriptions ----------------

def _check_protocol(spec: BaseModel) -> BaseModel:
    """What the field types cannot say (a template without ``{x}``): :class:`Protocol` itself decides."""
    try:
        Protocol(**spec.model_dump(exclude_unset=True))
    except SettingError as error:
        raise _error("protocol", "{problem}", problem=str(error)) from None
    return spec


class _Settings(_Mapping):
    noun: ClassVar[str] = "setting"


#: The protocol as the file writes it: Protocol's own fields (one definition), as a mapping that reports
#: unknown keys together and keeps only what the file sets.
ProtocolSpec = create_model("ProtocolSpec", __base__=_Settings, __doc__=Protocol.__doc__,
                            **{name: (f.annotation, f) for name, f in Protocol.model_fields.items()})


# --- a profile --------------------------------------------------------------------------------------------

def _known_tasks(tasks: list[str]) -> list[str]:
    from ..tasks import all_tasks

    known = set(all_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise _error("unknown_tasks", "unknown task(s) {unknown}", unknown=", ".join(unknown))
    return tasks


#: Where a model runs: False (here), True (NDIF, nnsight's configured host) or an NDIF host URL.
Remote = Annotated[Union[StrictBool, Annotated[str, StringConstraints(pattern=r"^https?://")]],
                   _must("must be true, false or an http(s) URL of an NDIF host")]
CheckedProtocol = Annotated[ProtocolSpec, AfterValidator(_check_protocol), _none_is(dict)]
SectionParameters = dict[StrictStr, Any]


class ProfileSpec(_Mapping):
    """One named profile: what one ``python -m taskvec book --profile NAME`` runs."""

    description: StrictStr = Field("", description="One line on what the profile is for; shown when it runs "
                                   "and kept in the run log.")
    models: Annotated[list[StrictStr], Field(min_length=1),
                      _must("must be a non-empty list of model names")] = Field(
        description="The models to run, in order: an embedded model (gemma-3-270m, smollm2-135m), a local "
                    "model folder or a hub id (owner/name).")
    tasks: Annotated[list[StrictStr], _must("must be a list of task names (empty = all)"),
                     AfterValidator(_known_tasks), _none_is(list)] = Field(
        [], description="Task names (the task files' names under tasks/); empty or left out: every task.")
    protocol: CheckedProtocol = Field(
        {}, validate_default=True, description="Settings of the main experiment, the fields of taskvec.Protocol "
                                               "(see below); a setting left out takes the paper's value.")
    sections: Annotated[dict[StrictStr, SectionParameters],
                        _must("must map section names to parameter mappings"), _none_is(dict)] = Field(
        {}, description="Parameters of single sections: section name -> {parameter: value}. Names are checked "
                        "against each notebook's parameters cell before anything runs.")
    remote: Remote = Field(False, description="Where the models run: false (here), true (NDIF, nnsight's "
                           "configured host) or the http(s) URL of an NDIF host.")
    beside: Annotated[dict[StrictStr, Remote],
                      _must("must map model names to a remote setting (true, false or an NDIF host URL)"),
                      _none_is(dict)] = Field(
        {}, description="Runs shown beside this profile's once all their results are in the cache (never "
                        "computed here): model name -> its remote setting, as for remote.")

    def protocol_settings(self) -> dict[str, Any]:
        """The protocol settings the file sets (the others are Protocol's defaults)."""
        return self.protocol.model_dump(exclude_unset=True)

    def parameters(self, notebook: str, cache_dir: str = "") -> dict[str, Any]:
        """What ``notebook`` is run with: the profile's values of the parameters its section declares
        (:data:`taskvec.publishing.sections.SECTIONS`), then the section's own."""
        fields = SECTIONS[notebook].model_fields
        common = {"models": self.models, "tasks": self.tasks, "protocol": self.protocol_settings(),
                  "cache_dir": cache_dir, "remote": self.remote, "beside": self.beside}
        return {**{k: v for k, v in common.items() if k in fields}, **self.sections.get(notebook, {})}

    @model_validator(mode="after")
    def _sections_are_valid(self) -> "ProfileSpec":
        """Every section's parameters as its settings model checks them, with the profile's common values."""
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise _error("unknown_sections", "sections: unknown section(s) {unknown} (sections: {known})",
                         unknown=", ".join(unknown), known=", ".join(SECTIONS))
        for notebook, model in SECTIONS.items():
            own = self.sections.get(notebook, {})
            clash = sorted(set(own) & set(COMMON))
            if clash:
                raise _error("common_parameter", "sections.{nb}: {keys} belong(s) to the profile, not a section",
                             nb=notebook, keys=", ".join(clash))
            extra = sorted(set(own) - set(model.model_fields))
            if extra:
                raise _error("section", "section {nb} has no parameter(s) {extra} (it declares {declared})",
                             nb=notebook, extra=", ".join(extra), declared=", ".join(model.model_fields))
            try:
                model(**self.parameters(notebook))
            except TaskvecError as error:
                raise _error("section", "section {nb}: {problem}", nb=notebook, problem=str(error)) from None
        return self


class ExperimentFile(_Mapping):
    """The whole file: named profiles and the one run by default."""

    noun: ClassVar[str] = "top-level key"
    not_a_mapping: ClassVar[str] = "needs a 'profiles' mapping with at least one profile"

    default: Optional[StrictStr] = Field(None, description="The profile `python -m taskvec book` runs without "
                                         "`--profile`; left out: the first profile.")
    profiles: dict[StrictStr, ProfileSpec] = Field(description="The profiles by name, at least one.")

    @model_validator(mode="before")
    @classmethod
    def _has_profiles(cls, data: Any) -> Any:
        if not (isinstance(data, dict) and isinstance(data.get("profiles"), dict) and data["profiles"]):
            raise _error("no_profiles", cls.not_a_mapping)
        return data

    @model_validator(mode="after")
    def _default_is_defined(self) -> ExperimentFile:
        if self.default is not None and self.default not in self.profiles:
            raise _error("unknown_default", "default profile {name} is not defined (profiles: {known})",
                         name=repr(self.default), known=", ".join(self.profiles))
        return self

    def default_profile(self) -> str:
        return self.default if self.default is not None else next(iter(self.profiles))


def problems(error: ValidationError) -> list[str]:
    """One line per problem, each starting with its key path: ``profiles.p.tasks: unknown task(s) antonym``."""
    lines = []
    for e in error.errors(include_url=False):
        loc = list(e["loc"])
        message = e["msg"]
        if e["type"] == "missing":  # said of the mapping that lacks the key
            message, loc = f"missing required key {loc[-1]}", loc[:-1]
        elif not e["type"].startswith(ERROR_TYPE):  # pydantic's own words: say what was found
            message = f"{message}, got {_shown(e.get('input'))}"
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        if not where:
            lines.append(message)
        else:
            lines.append(f"{where} {message}" if message.startswith("must ") else f"{where}: {message}")
    return lines
