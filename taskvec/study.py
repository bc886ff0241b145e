"""The contract of a cached study: a study is a function, the scaffolding around it is written once here.

A study computes one result per *unit* (a task, a pair of tasks, a model's set of task vectors) from a
loaded model and typed settings: ``compute(model) -> Result``, where the result type has ``save(folder)``
and ``load(folder)``. :func:`cached` owns everything else: the cache key (the model's identity, the unit's
key parts, the study's code and the libraries' versions), loading a model given by name only when some unit
is missing (:class:`ModelRef`), skip records (a unit the model cannot run, found before any forward pass,
cached like a result so a rerun loads nothing), resume after an interruption, the request labels on NDIF,
and one layout for every cache entry: ``meta.json`` (study, unit, model, seconds, skip reason) beside the
result's own files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Protocol as TypingProtocol, TypeVar

from .errors import TaskvecError
from .models import TaskModel, load_model, model_identity
from .remote import where as remote_where
from .store import METHOD_MODULES, Store, make_key, read_json, write_json

R = TypeVar("R")


class Codec(TypingProtocol):
    """What a study's result type provides: its files in a cache entry."""

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path) -> Any: ...


class Skip(TaskvecError):
    """Raised by a study's compute, before any forward pass, for a unit this model cannot run (a task its
    tokenizer leaves too few usable examples); ``info`` is kept with the skip record."""

    def __init__(self, reason: str, **info: Any) -> None:
        super().__init__(reason)
        self.reason, self.info = reason, info


@dataclass(frozen=True)
class Skipped:
    """A unit that was skipped, and why (read back from the cache like a result)."""

    reason: str
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """A study's identity in the cache: its folder name, the modules whose code decides its results
    (besides :data:`taskvec.store.METHOD_MODULES`) and its result type (the codec)."""

    kind: str
    result: type
    modules: tuple[str, ...] = ()

    @property
    def code(self) -> tuple[str, ...]:
        return METHOD_MODULES + tuple(m for m in self.modules if m not in METHOD_MODULES)


class ModelRef:
    """A model given loaded or by name; a name is loaded (with ``loader``) on first use only, so a run whose
    every unit is cached loads no weights. ``dtype`` and ``remote`` say where a name would be loaded, which
    is part of a result's identity."""

    def __init__(self, model: TaskModel | str, loader: Callable[[str], TaskModel] = load_model, *,
                 dtype: str | None = None, remote: bool | str = False) -> None:
        self._given, self._loader, self.dtype, self.remote = model, loader, dtype, remote
        self._loaded: TaskModel | None = None if isinstance(model, str) else model

    @property
    def name(self) -> str:
        return self._given if isinstance(self._given, str) else self._given.name

    @property
    def loaded(self) -> TaskModel | None:
        """The model if it was given loaded or has been loaded since, else None."""
        return self._loaded

    def get(self) -> TaskModel:
        if self._loaded is None:
            self._loaded = self._loader(self._given)
        return self._loaded

    def identity(self) -> dict[str, str]:
        """Name, weights hash, device type and dtype (see :func:`taskvec.models.model_identity`), never loading."""
        return model_identity(self._loaded or self._given, self.dtype, self.remote)


@dataclass
class Outcome(Generic[R]):
    """What :func:`cached` returns: the result (or :class:`Skipped`), the seconds it took to compute, and
    whether it was read from the cache."""

    result: Any
    seconds: float
    from_cache: bool
    key: str = ""

    @property
    def skipped(self) -> bool:
        return isinstance(self.result, Skipped)


def key_of(study: Study, model: ModelRef, **parts: Any) -> str:
    """The cache key of one unit: the model's identity, ``parts`` (task data, settings, prompts...), the
    study's code and the libraries' versions."""
    return make_key(study.code, kind=study.kind, **model.identity(), **parts)


def cached(study: Study, model: ModelRef, unit: str, compute: Callable[[TaskModel], R], store: Store | None,
           **parts: Any) -> Outcome:
    """The result of ``compute(model)`` for ``unit``, read from ``store`` when its key is there, else computed
    (the model loaded if it was given by name) and written as one whole entry. ``compute`` may raise
    :class:`Skip`: the skip is cached and returned as :class:`Skipped`. Without a store, always computed."""
    key = key_of(study, model, **parts) if store else ""
    if store and store.has(study.kind, model.name, key):
        folder = store.path(study.kind, model.name, key)
        meta = read_json(folder / "meta.json")
        if meta.get("skipped") is not None:
            return Outcome(Skipped(meta["skipped"], meta.get("info", {})), meta.get("seconds", 0.0), True, key)
        return Outcome(study.result.load(folder), meta.get("seconds", 0.0), True, key)
    loaded = model.get()  # loading is not part of a unit's seconds
    start = time.perf_counter()
    try:
        with remote_where(task=unit):
            result: Any = compute(loaded)
    except Skip as skip:
        result = Skipped(skip.reason, skip.info)
    seconds = round(time.perf_counter() - start, 2)
    if store:
        def write(folder: Path) -> None:
            skipped = isinstance(result, Skipped)
            write_json(folder / "meta.json", {"study": study.kind, "unit": unit, "model": model.name,
                                              "seconds": seconds, "skipped": result.reason if skipped else None,
                                              "info": result.info if skipped else {}})
            if not skipped:
                result.save(folder)
        store.save(study.kind, model.name, key, write)
    return Outcome(result, seconds, False, key)
