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


class Store:
    """Folder-per-entry cache: ``<root>/<kind>/<name>/<key[:20]>/``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else cache_dir() / "results"

    def path(self, kind: str, name: str, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.root / kind / safe / key[:20]

    def has(self, kind: str, name: str, key: str) -> bool:
        return (self.path(kind, name, key) / "DONE").exists()

    def save(self, kind: str, name: str, key: str, writer) -> Path:
        """Call ``writer(tmp_folder)`` and atomically publish the folder under the key."""
        final = self.path(kind, name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            writer(tmp)
            (tmp / "DONE").write_text(key)
            if final.exists():  # a stale or concurrent entry: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
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
