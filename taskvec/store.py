"""A results cache keyed on everything that determines a result.

A key is the sha256 of: the model's identity (name, weights hash, device type and dtype),
the task's data, the protocol (sizes, seed, format), explicit prompts if any, the source
of the method's code and the versions of torch, transformers and nnsight. Same settings
-> same key -> reuse; any change -> new key -> recompute.
Entries are written to a temporary folder and renamed into place, so an interrupted
run leaves either a whole entry or none, and a rerun resumes with what was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from .models import cache_dir

# The modules whose code decides every result (paths in the package); editing any of them invalidates
# every entry. A study adds its own module(s) (taskvec.study.Study.modules).
METHOD_MODULES = ("mechanism.py", "experiment.py", "prompts.py", "tasks.py", "models.py", "arch.py", "scoring.py",
                  "settings.py", "study.py", "compat.py")


@lru_cache(maxsize=None)
def code_version(modules: tuple[str, ...] = METHOD_MODULES) -> str:
    """Hash of the source of ``modules`` (paths of files in the taskvec package); a path that names no
    file is an error, so a moved module cannot silently drop out of every key."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in modules:
        path = here / name
        if not path.is_file():
            raise FileNotFoundError(f"code_version: no module {name} in {here}")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


#: Libraries whose version can change a result (kernels, defaults, tracing).
LIBRARIES = ("torch", "transformers", "nnsight")
@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES`."""
    return {name: version(name) for name in LIBRARIES}


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json"))
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value


def make_key(modules: tuple[str, ...] = METHOD_MODULES, **parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts``, the code version of ``modules`` and the library versions."""
    blob = json.dumps({"code": code_version(modules), "libraries": library_versions(), **_plain(parts)},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class DamagedEntryWarning(UserWarning):
    """A cache entry failed its check (a file missing, truncated or edited): it is discarded and recomputed."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by its relative path (the DONE marker aside)."""
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "DONE"}


class Store:
    """Folder-per-entry cache: ``<root>/<kind>/<name>/<key[:20]>/``.

    An entry is published whole (written in a temporary folder, then renamed into place) with a ``DONE``
    marker that records its key and the sha256 of each of its files. :meth:`has` checks them: a damaged
    entry (a file missing, truncated or edited) is reported with its path (:class:`DamagedEntryWarning`),
    discarded, and so computed again; it is never read as a result. Two processes that compute the same
    entry at once both succeed: the first whole entry stays, the second discards its copy.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else cache_dir() / "results"

    def path(self, kind: str, name: str, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.root / kind / safe / key[:20]

    def problem(self, folder: Path, key: str) -> str | None:
        """What is wrong with the entry in ``folder`` for ``key``, or None when it is whole. (An entry written
        before checksums were recorded holds only its key in DONE: it is taken as it is.)"""
        try:
            text = (folder / "DONE").read_text(encoding="utf-8")
        except OSError:
            return "no DONE marker"
        try:
            done = json.loads(text)
        except ValueError:
            done = None
        if not isinstance(done, dict):
            return None if text.strip() == key else "its DONE marker names another key"
        if done.get("key") != key:
            return "its DONE marker names another key"
        for rel, digest in (done.get("files") or {}).items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if _sha256(path) != digest:
                return f"{rel} is not the file that was written (truncated or edited)"
        return None

    def has(self, kind: str, name: str, key: str) -> bool:
        """Whether a whole entry is there. A damaged one is reported, discarded, and counts as absent."""
        folder = self.path(kind, name, key)
        if not (folder / "DONE").exists():
            return False
        problem = self.problem(folder, key)
        if problem is None:
            return True
        import warnings

        warnings.warn(f"cache entry {folder} is damaged ({problem}): discarded, it is computed again",
                      DamagedEntryWarning, stacklevel=2)
        self._discard(folder)
        return False

    def _discard(self, folder: Path) -> None:
        """Remove an entry without ever leaving half of it under its name: rename it away, then delete."""
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=folder.parent))
        try:
            os.replace(folder, trash / "entry")
        except OSError:
            pass  # already gone (another process discarded or replaced it)
        shutil.rmtree(trash, ignore_errors=True)

    def save(self, kind: str, name: str, key: str, writer) -> Path:
        """Call ``writer(tmp_folder)`` and atomically publish the folder under the key, with its checksums."""
        final = self.path(kind, name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            writer(tmp)
            (tmp / "DONE").write_text(json.dumps({"key": key, "files": _manifest(tmp)}, indent=1))
            for _ in range(2):
                try:
                    os.replace(tmp, final)  # fails if another process published this entry first
                    break
                except OSError:
                    if final.exists() and self.problem(final, key) is None:
                        break  # a whole entry is there: keep it, ours is the same computation
                    self._discard(final)  # stale or damaged: move it away, then publish ours
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def write_records(path: Path, frame: pd.DataFrame) -> None:
    """One JSON object per row: round-trips any string (``\\r``, ``,``, quotes) and keeps types."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in frame.to_dict(orient="records"):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_records(path: Path) -> pd.DataFrame:
    """The table :func:`write_records` wrote."""
    with open(path, encoding="utf-8") as handle:
        return pd.DataFrame([json.loads(line) for line in handle.read().split("\n") if line])


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
