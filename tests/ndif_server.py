"""A real NDIF server for tests: the session fixture ``ndif_server``.

The stack (moto, redis, a Ray head, the NDIF API; see scripts/ndif_local/) runs CPU-only on this machine
and serves two models by their local folders:

    "tiny"   conftest.py's tiny_model("llama"): a random 4-layer Llama (d_model 32), character tokenizer
    "olmo3", "qwen3_moe"   families.py's tiny_family_model of those types (2 layers), character tokenizer
    "gemma"  the embedded Gemma 3 270M (taskvec.models.embedded_path("gemma-3-270m"))

Enable it with ``pytest_plugins = ["ndif_server"]`` in tests/conftest.py, then::

    def test_something(ndif_server):
        model = ndif_server.client("tiny")            # nnsight TransformersModel of the served folder
        with model.trace("hello", remote=ndif_server.host):
            out = model.model.layers[0].output.save()

One stack per test session, started on first use (about 45 s once installed) and stopped at the session's
end, whatever happened. Installing it (``scripts/ndif_local.py install``: cached, about 2-4 min the first
time) is a test failure on CI (CI=true) and a skip with the reason elsewhere. A test that needs the server
down mid-run calls ``ndif_server.stop()`` and then ``ndif_server.start()`` (same host, models redeployed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ndif_local.py"  # the command line of the package scripts/ndif_local/
MAX_RUNDIR = 45  # Ray keeps unix sockets under RUNDIR/ray/session_*/sockets (at most 107 bytes a path)


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class NDIFServer:
    """A running local NDIF stack: ``host``, ``models`` (name -> folder), ``dir``; ``stop``/``start``."""

    def __init__(self, rundir: Path, models: dict[str, str]):
        self.dir = Path(rundir)
        self.models = dict(models)  # name -> folder, exactly the string the server knows the model by
        self._watchdog: subprocess.Popen | None = None

    # --------------------------------------------------------------------------- the script

    def _run(self, *args: str, timeout: float = 900) -> None:
        command = [sys.executable, str(SCRIPT), *args]
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        sys.stdout.write(out.stdout)
        if out.returncode != 0:
            raise RuntimeError(f"`{' '.join(args[:3])} ...` failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    @property
    def state(self) -> dict:
        return json.loads((self.dir / "stack.json").read_text())

    @property
    def host(self) -> str:
        """The API's URL, e.g. http://127.0.0.1:24711: the ``remote=`` argument of a trace."""
        return self.state["host"]

    @property
    def running(self) -> bool:
        code = subprocess.run([sys.executable, str(SCRIPT), "status", "--dir", str(self.dir)],
                              capture_output=True).returncode
        return code == 0

    def start(self, deploy: bool = True) -> None:
        """Start the stack (again: on the same ports when they are free) and deploy ``models``."""
        self._run("start", "--dir", str(self.dir))
        self._watch()
        if deploy and self.models:
            self.deploy(*self.models.values())

    def deploy(self, *folders: str) -> None:
        self._run("deploy", "--dir", str(self.dir), *folders)

    def stop(self) -> None:
        """Stop every process of the stack (idempotent)."""
        self._run("stop", "--dir", str(self.dir), timeout=120)

    def _watch(self) -> None:
        """A detached guard that stops the stack if this test process dies before its teardown."""
        if self._watchdog is None or self._watchdog.poll() is not None:
            self._watchdog = subprocess.Popen(
                [sys.executable, str(SCRIPT), "watch", "--dir", str(self.dir), "--pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._watchdog is not None and self._watchdog.poll() is None:
                self._watchdog.kill()
                self._watchdog.wait()

    # --------------------------------------------------------------------------- clients

    def client(self, name: str, **kwargs):
        """An nnsight ``TransformersModel`` of the served model ``name``, ready for ``remote=self.host``.

        What a client needs for a local folder (nnsight 0.8.1): the key's repo id must not be looked up
        on the Hub (``_ID_CACHE``), and the tokenizer is passed explicitly. The model key it computes is
        the one the server deployed (``to_model_key()``).
        """
        from nnsight.modeling.huggingface import _ID_CACHE
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoTokenizer

        folder = self.models[name]
        _ID_CACHE[folder] = folder
        kwargs.setdefault("tokenizer", AutoTokenizer.from_pretrained(folder))
        return TransformersModel(folder, task="text-generation", **kwargs)


def build_tiny_llama(folder: Path) -> str:
    """conftest's ``tiny_model("llama")`` (random 4-layer Llama, seed 0, weights x3), saved with its
    character tokenizer: the served "tiny" computes what that local fixture model computes."""
    from conftest import tiny_model

    model = tiny_model("llama")
    model.nn._module.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return str(folder)


#: Families beyond the paper's, served as tiny random models (families.tiny_family_model).
SERVED_FAMILIES = ("olmo3", "qwen3_moe")


def build_tiny_family(folder: Path, model_type: str) -> str:
    """families.py's tiny random ``model_type`` saved with the character tokenizer: what the local
    ``families.tiny_family_model(model_type)`` computes."""
    from conftest import char_tokenizer
    from families import tiny_family_model

    tiny_family_model(model_type).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def _rundir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ndif")
    if len(str(path)) <= MAX_RUNDIR:
        return path
    return Path(tempfile.mkdtemp(prefix="tvndif-", dir="/tmp"))


@pytest.fixture(scope="session")
def ndif_server(tmp_path_factory):
    """A real NDIF server (ndif 0.1.2, CPU-only) serving "tiny" and "gemma"; see the module docstring."""
    install = subprocess.run([sys.executable, str(SCRIPT), "install"], capture_output=True, text=True,
                             timeout=3600)
    sys.stdout.write(install.stdout)
    if install.returncode != 0:
        reason = f"the local NDIF server cannot be installed: {(install.stderr or install.stdout).strip()}"
        if on_ci():
            pytest.fail(reason + " (CI: must run, not skip)", pytrace=False)
        pytest.skip(reason)

    from taskvec import remote
    from taskvec.models import embedded_path

    # ndif 0.1.2 can leave a finished job's status at PROVISIONING (three writers, no ordering): a request
    # whose status stops changing for a minute is submitted again once, so no test waits out the timeout.
    remote.STALE_S = min(remote.STALE_S, 60.0)
    models = {"tiny": build_tiny_llama(tmp_path_factory.mktemp("ndif-tiny")),
              "gemma": str(embedded_path("gemma-3-270m")[0]),
              **{name: build_tiny_family(tmp_path_factory.mktemp(f"ndif-{name}"), name) for name in SERVED_FAMILIES}}
    server = NDIFServer(_rundir(tmp_path_factory), models)
    # A SIGTERM to pytest (a CI timeout) becomes a KeyboardInterrupt, so the teardown below runs.
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    else:
        previous = None
    try:
        server.start()
        yield server
    finally:
        try:
            server.close()
        finally:
            if previous is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, previous)
