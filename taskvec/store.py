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

from .models import EMBEDDED, cache_dir, resolve_source, sha256_file

# The modules whose code decides a main-experiment result (paths in the package); editing any of them
# invalidates it.
METHOD_MODULES = ("mechanism.py", "experiment.py", "prompts.py", "tasks.py", "models.py", "arch.py")
# Analyses built on the main experiment (dominance, interpretation) also depend on this one.
ANALYSIS_MODULES = METHOD_MODULES + ("studies/analysis.py",)
# The studies beyond the paper: answers of several tokens, and what θ needs.
LONG_ANSWER_MODULES = METHOD_MODULES + ("studies/long_answers.py",)
CONTEXT_MODULES = METHOD_MODULES + ("studies/context.py",)


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
#: Files in a model folder identified by name, size and modification time (hashing gigabytes is slow).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES`."""
    return {name: version(name) for name in LIBRARIES}


@lru_cache(maxsize=None)
def _embedded_fingerprint(name: str) -> str:
    return sha256_file(EMBEDDED[name].locate_gguf())  # the package checks its file: slow, once per process


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """Identity of a model's weights without loading them.

    Embedded: the GGUF file's sha256. Local folder: sha256 over the content of every
    file but the weights (config, tokenizer, generation config) and the weight files'
    names, sizes and modification times. Hub id: ``hub:<id>@<revision>`` (default
    ``main``, a branch that can move: pin a commit sha for reproducible caching).
    """
    source = resolve_source(name)
    if source == "embedded":
        return _embedded_fingerprint(name)
    if source == "local":
        digest = hashlib.sha256()
        for path in sorted(Path(name).expanduser().iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix in WEIGHT_SUFFIXES:
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
            else:
                digest.update(f"{path.name}:{sha256_file(path)}\0".encode())
        return digest.hexdigest()
    return f"hub:{name}@{revision or 'main'}"


def _plain(value: Any) -> Any:
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
