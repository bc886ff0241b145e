"""Every version the local NDIF server is built from, each written once.

nnsight, torch and transformers are not repeated here: they are read from the project's own
requirements.txt, because client and server (de)serialize the same objects and must run the same
versions. The rest belong to the server alone. The requirements' text is part of the venv cache's key
(install.Venv): changing a pin, here or in requirements.txt, builds a fresh venv.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import HarnessError

CLIENT_REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
SHARED_WITH_CLIENT = ("nnsight", "torch", "transformers")

# ndif needs Python >= 3.12, < 3.14. The machine image has pyenv's 3.12.1.
PYENV_VERSION = "3.12.1"
SUPPORTED_PYTHON = ((3, 12), (3, 13))

NDIF = "0.1.2"
RAY = "2.60.0"  # ndif 0.1.2 allows a range; the version it was proved with
MOTO = "5.2.5"  # the object store, in its own venv (moto pins its own versions of boto and friends)


def client_pins(path: Path = CLIENT_REQUIREMENTS) -> dict[str, str]:
    """``name==version`` lines of a requirements file (comments and other lines skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def server_pins() -> dict[str, str]:
    """The server venv's requirements, ``requirement -> version``, in the order they are written.

    PyPI's torch wheel for cp312 is the CUDA build (about 1.5 GB download); it runs on the CPU.
    """
    client = client_pins()
    missing = [name for name in SHARED_WITH_CLIENT if name not in client]
    if missing:
        raise HarnessError(f"{CLIENT_REQUIREMENTS} pins no {', '.join(missing)} (name==version): "
                           "the server must run the client's versions")
    return {"ndif[api,ray]": NDIF, "nnsight": client["nnsight"], "ray[default]": RAY,
            "torch": client["torch"], "transformers": client["transformers"]}


def s3_pins() -> dict[str, str]:
    return {"moto[server]": MOTO}


def requirements(pins: dict[str, str]) -> str:
    """The requirements file's text (also the cache key's: keep its format)."""
    return "".join(f"{name}=={version}\n" for name, version in pins.items())


def distributions(pins: dict[str, str]) -> dict[str, str]:
    """Installed-distribution name -> version: the extras dropped (``ndif[api,ray]`` -> ``ndif``)."""
    return {name.split("[")[0]: version for name, version in pins.items()}
