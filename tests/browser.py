"""The one rule for the browser checks: without Chromium they skip on a workstation and FAIL on CI.

CI is any environment where ``CI`` is set to something other than empty, ``false`` or ``0`` (GitHub
Actions, GitLab and ``.ci/run`` set ``CI=true``); there, scripts/ensure_chromium.sh must have
installed it, so a missing browser is a broken setup, not a reason to check less.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taskvec.book import CHROMIUM


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0", "no")


def require_chromium() -> None:
    """Call at the top of a browser test: returns when Chromium is there, else skips (or fails on CI)."""
    if Path(CHROMIUM).exists():
        return
    if on_ci():
        pytest.fail(f"{CHROMIUM} missing on CI (CI={os.environ['CI']!r}): scripts/ensure_chromium.sh should have "
                    "installed it; the browser checks cannot be skipped there", pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed (run scripts/ensure_chromium.sh as root): browser checks skipped")

