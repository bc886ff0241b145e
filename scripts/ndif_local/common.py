"""What every module of the harness shares: its error, its log line, the cache folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class HarnessError(RuntimeError):
    """A step of the harness failed; the message says what to do."""


def log(message: str) -> None:
    print(f"ndif_local: {message}", flush=True)


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cache_root() -> Path:
    root = os.environ.get("TASKVEC_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "taskvec") / "ndif"


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"({path} unreadable)"
