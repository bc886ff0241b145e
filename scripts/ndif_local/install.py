"""``install``: redis-server, a Python that ndif supports, and the two cached venvs (server, object store)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import pins
from .common import HarnessError, cache_root, log, sha16, tail, tail_file

VENV_CHECK = Path(__file__).with_name("venv_check.py")


def python_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        major, minor = out.stdout.split()
        return (int(major), int(minor)) if out.returncode == 0 else None
    except ValueError:
        return None


def find_server_python() -> tuple[str, tuple[int, int]]:
    """A Python that ndif supports: $TASKVEC_NDIF_PYTHON, pyenv's PYENV_VERSION, python3.12, python3.13,
    or any 3.12/3.13 under pyenv's root."""
    supported = [f"{major}.{minor}" for major, minor in pins.SUPPORTED_PYTHON]
    candidates: list[str] = []
    if os.environ.get("TASKVEC_NDIF_PYTHON"):
        candidates.append(os.environ["TASKVEC_NDIF_PYTHON"])
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "which", "python"], capture_output=True, text=True,
                             env={**os.environ, "PYENV_VERSION": pins.PYENV_VERSION})
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    candidates += [shutil.which(f"python{minor}") for minor in supported if shutil.which(f"python{minor}")]
    # pyenv's versions, also when pyenv is not on PATH (make run with a bare environment).
    for root in {os.environ.get("PYENV_ROOT") or "", str(Path.home() / ".pyenv")} - {""}:
        for minor in supported:
            candidates += sorted(str(p) for p in Path(root).glob(f"versions/{minor}*/bin/python{minor}"))
    tried = []
    for candidate in candidates:
        version = python_version(candidate)
        tried.append(f"{candidate} ({'.'.join(map(str, version)) if version else 'does not run'})")
        if version in pins.SUPPORTED_PYTHON:
            # The real interpreter, not a pyenv shim whose answer depends on the environment.
            real = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"],
                                  capture_output=True, text=True).stdout.strip()
            return real or candidate, version
    raise HarnessError(
        f"the NDIF server needs Python {' or '.join(supported)} (ndif's requirement); found none. Tried: "
        + (", ".join(tried) or "nothing")
        + f". Install one (e.g. `pyenv install {pins.PYENV_VERSION}`) or set TASKVEC_NDIF_PYTHON to its path."
    )


def find_redis() -> str | None:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    return found if os.path.exists(found) else None


def ensure_redis() -> str:
    found = find_redis()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise HarnessError("redis-server is missing and cannot be installed here (needs root and apt-get): "
                           "install Debian's redis-server package (apt-get install redis-server)")
    log("installing Debian's redis-server (apt-get)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get (e.g. chromium's install) may hold it
    for command in (["apt-get", *wait_lock, "update", "-qq"],
                    ["apt-get", *wait_lock, "install", "-y", "-qq", "redis-server"]):
        for attempt in range(3):
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode == 0:
                break
            time.sleep(10)
        else:
            raise HarnessError(f"{' '.join(command)} failed ({out.returncode}):\n{tail(out.stdout + out.stderr)}")
    found = find_redis()
    if not found:
        raise HarnessError("apt-get installed redis-server, but no redis-server binary is there")
    return found


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes (two test sessions installing at once wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Venv:
    """A cached venv: <cache>/ndif/<name>-<sha16 of python + requirements>/{venv,requirements.txt,DONE}.

    A venv hard-codes its own path, so it is built in place; the DONE marker is written last, and a
    folder without it (an interrupted install) is removed and built again. After pip, venv_check.py runs
    on the venv's own Python: the pins hold and ``imports`` import.
    """

    def __init__(self, name: str, requirements: dict[str, str], python: str, version: tuple[int, int],
                 imports: tuple[str, ...] = (), executables: tuple[str, ...] = ()):
        self.name, self.python = name, python
        self.requirements = pins.requirements(requirements)
        self.check = [json.dumps(pins.distributions(requirements)), "--import", *imports,
                      "--executable", *executables]
        key_text = f"python {version[0]}.{version[1]}\n{self.requirements}"
        self.dir = cache_root() / f"{name}-{sha16(key_text)}"
        self.venv = self.dir / "venv"
        self.bin = self.venv / "bin"

    @property
    def done(self) -> Path:
        return self.dir / "DONE"

    def ready(self) -> bool:
        return self.done.is_file() and (self.bin / "python").exists()

    def ensure(self) -> float:
        """Build unless cached; the seconds spent (0 when cached)."""
        if self.ready():
            return 0.0
        with file_lock(cache_root() / f".{self.name}.lock"):
            if self.ready():  # another process built it while this one waited
                return 0.0
            start = time.time()
            if self.dir.exists():
                log(f"{self.dir} is incomplete (no DONE marker): removing it")
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            (self.dir / "requirements.txt").write_text(self.requirements)
            logfile = self.dir / "install.log"
            log(f"building the {self.name} venv in {self.venv} (log: {logfile})...")
            with open(logfile, "w") as out:
                for command in ([self.python, "-m", "venv", str(self.venv)],
                                [str(self.bin / "python"), "-m", "pip", "install", "--no-cache-dir",
                                 "--progress-bar", "off", "-r", str(self.dir / "requirements.txt")],
                                [str(self.bin / "python"), str(VENV_CHECK), *self.check]):
                    out.write(f"$ {shlex.join(command)}\n")
                    out.flush()
                    code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL).returncode
                    if code != 0:
                        raise HarnessError(f"{self.name} venv: `{shlex.join(command)}` failed ({code}); "
                                           f"end of {logfile}:\n{tail_file(logfile)}")
            freeze = subprocess.run([str(self.bin / "python"), "-m", "pip", "freeze"], capture_output=True,
                                    text=True).stdout
            (self.dir / "freeze.txt").write_text(freeze)
            seconds = time.time() - start
            self.done.write_text(json.dumps({"seconds": round(seconds, 1), "python": self.python,
                                             "built": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            return seconds


def venvs() -> tuple[Venv, Venv]:
    python, version = find_server_python()
    server = Venv("server", pins.server_pins(), python, version,
                  imports=("ndif.services.ray.deployments.modeling.base", "ndif.services.api.app", "nnsight",
                           "ray"))
    s3 = Venv("s3", pins.s3_pins(), python, version, imports=("moto",), executables=("moto_server",))
    return server, s3


def installed_venvs() -> tuple[Venv, Venv]:
    server, s3 = venvs()
    missing = [v.name for v in (server, s3) if not v.ready()]
    if missing:
        raise HarnessError(f"the NDIF server is not installed ({', '.join(missing)} venv missing under "
                           f"{cache_root()}): run `{sys.executable} scripts/ndif_local.py install` first")
    return server, s3


def cmd_install(args) -> None:
    start = time.time()
    redis = ensure_redis()
    server, s3 = venvs()
    cached = server.ready() and s3.ready()
    t_server = server.ensure()
    t_s3 = s3.ensure()
    total = time.time() - start
    if cached:
        log(f"installed (cached): {server.venv}, {s3.venv}, {redis} [{total:.1f}s]")
    else:
        log(f"installed: server venv {t_server:.0f}s, s3 venv {t_s3:.0f}s, total {total:.0f}s "
            f"({server.dir}, {s3.dir})")
