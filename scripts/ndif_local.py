#!/usr/bin/env python3
"""A local, CPU-only NDIF server: the real ``ndif`` server software, for tests and offline runs.

NDIF is the service behind nnsight's ``remote=True``. Its server is on PyPI (``ndif``), and runs on this
kind of machine without a GPU, given a few settings that this script applies. The stack:

    moto_server   S3-compatible object store (results larger than the websocket's limit)
    redis-server  request queue and response pub/sub
    ray head      Ray node (GCS, raylet, dashboard: ndif's controller reads Ray's state API)
                  + the NDIF controller (a detached Ray actor) + one model actor per deployed model
    ndif API      gunicorn serving the FastAPI app; the client talks to it over HTTP and websockets

Subcommands (``python3 scripts/ndif_local.py --help``):

    install                   redis-server (apt-get, as root), a server venv (Python 3.12, pinned ndif,
                              nnsight, ray, torch, transformers) and an object-store venv (pinned moto),
                              cached under ${TASKVEC_CACHE:-~/.cache/taskvec}/ndif/ and reused.
    start  --dir RUNDIR       start the stack; every file it writes stays under RUNDIR.
    deploy --dir RUNDIR F...  serve local model folders (config.json + safetensors + tokenizer).
    status --dir RUNDIR       what runs, and the deployed models.
    stop   --dir RUNDIR       stop this stack's processes (only them: never ``ray stop``).
    env    --dir RUNDIR       the stack's environment as shell exports (to run ``ndif`` commands by hand).
    watch  --dir RUNDIR --pid P   stop the stack once process P has gone (the test fixture's guard).

The services are launched by this script, as ndif's own ``ndif start`` and ``start.sh`` scripts would
(same commands and settings), but each with explicit ports and in its own session, so that ``stop`` finds
every process of this stack, and only those, by session id (Ray's daemons and workers stay in the session
of ``ray start``). RUNDIR/stack.json records the ports, sessions and models; RUNDIR/logs has the logs.

The workarounds the server needs here are settings only; no file of ndif, nnsight or ray is changed:

* the stock model actor requires CUDA: a small subclass that loads and runs on the CPU is written to
  RUNDIR/shim and selected with NDIF_MODEL_IMPORT_PATH (and ``actor_class`` when deploying);
* the controller places models only on nodes with a Ray ``GPU`` resource sized by ``cuda_memory_bytes``:
  the Ray node advertises a fake one (RAY_OVERRIDE_RESOURCES and ``--resources``);
* deploying with a model key computed by the controller fails for ndif 0.1.2 with nnsight 0.8.1, and
  would go to the Hub: ``deploy`` gives the key, size, dtype and actor class explicitly;
* gunicorn writes a control socket into the home folder, Ray into /tmp/ray, the ndif CLI into ~/.ndif:
  HOME, TMPDIR, NDIF_HOME and Ray's temp dir all point into RUNDIR, and gunicorn runs without the socket;
* every port is chosen free at start (or given; a restart in the same RUNDIR keeps its ports), so the
  stack does not clash with another one; the API, redis and moto listen on 127.0.0.1 only (Ray binds
  some of its ports on every interface);
* redis runs without persistence (``--save ""``), so it writes no dump file.

Only the standard library is used, so any python3 >= 3.9 runs this file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# What gets installed. Changing any of this text changes the cache key, hence a fresh venv.
# ----------------------------------------------------------------------------------------------------------

# The server. ndif needs Python >= 3.12. nnsight, torch and transformers are pinned to the client's
# versions (the project's .venv), so both sides (de)serialize the same objects. PyPI's torch wheel for
# cp312 is the CUDA build (about 1.5 GB download); it runs on the CPU.
SERVER_REQUIREMENTS = """\
ndif[api,ray]==0.1.2
nnsight==0.8.1
ray[default]==2.60.0
torch==2.13.0
transformers==5.23.0
"""

# The object store, in its own venv (moto pins its own versions of boto and friends).
S3_REQUIREMENTS = """\
moto[server]==5.2.5
"""

PYENV_VERSION = "3.12.1"
SUPPORTED_PYTHON = ((3, 12), (3, 13))  # ndif: >=3.12,<3.14
CPU_ACTOR_MODULE = "taskvec_ndif_cpu_actor"
CPU_ACTOR_CLASS = f"{CPU_ACTOR_MODULE}.CPUModelActor"
FAKE_GPU_BYTES = 16_000_000_000  # what the fake GPU advertises; the models served here are far smaller
S3_KEY = "testing"
STACK_TAG = "TASKVEC_NDIF_STACK"  # environment variable carried by every process of a stack

# The CPU model actor, written into RUNDIR/shim at start. The stock ndif 0.1.2 actor loads onto
# device=<gpu index>, calls torch.cuda (set_device, synchronize, memory fractions) and checks that every
# tensor is on CUDA. Only loading, the GPU<->CPU cache moves and cleanup change; requests run stock.
CPU_ACTOR_SOURCE = '''\
"""NDIF model actor that loads and runs on the CPU (written by taskvec's scripts/ndif_local.py)."""
import gc
import logging
import time

import ray
from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED, BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


class CPUModelDeployment(BaseModelDeployment):
    def __init__(self, model_key, execution_timeout=None, gpu_mem_bytes_by_id=None, dtype="float32", **kwargs):
        # The controller hands over the fake GPU's memory map; a CPU actor owns no GPU.
        super().__init__(model_key, execution_timeout, {}, dtype, **kwargs)

    def load_from_disk(self):
        start = time.time()
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu", **self.kwargs
        )
        model._module.requires_grad_(False)
        logger.info("Loaded %s on the CPU in %.2fs", self.model_key, time.time() - start)
        return model

    async def to_cache(self):
        # Nothing to move off a GPU: stop what runs and mark the replica cached.
        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id):
        self.cached = False

    def cleanup(self):
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=0, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    pass
'''


class HarnessError(RuntimeError):
    """A step of the harness failed; the message says what to do."""


def log(message: str) -> None:
    print(f"ndif_local: {message}", flush=True)


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------------------------------------
# install
# ----------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("TASKVEC_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "taskvec") / "ndif"


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
    """A Python that ndif supports: $TASKVEC_NDIF_PYTHON, pyenv's 3.12.1, python3.12, python3.13, or
    any 3.12/3.13 under pyenv's root."""
    candidates: list[str] = []
    if os.environ.get("TASKVEC_NDIF_PYTHON"):
        candidates.append(os.environ["TASKVEC_NDIF_PYTHON"])
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "which", "python"], capture_output=True, text=True,
                             env={**os.environ, "PYENV_VERSION": PYENV_VERSION})
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    for name in ("python3.12", "python3.13"):
        if shutil.which(name):
            candidates.append(shutil.which(name))
    # pyenv's versions, also when pyenv is not on PATH (make run with a bare environment).
    for root in {os.environ.get("PYENV_ROOT") or "", str(Path.home() / ".pyenv")} - {""}:
        for minor in ("3.12", "3.13"):
            candidates += sorted(str(p) for p in Path(root).glob(f"versions/{minor}*/bin/python{minor}"))
    tried = []
    for candidate in candidates:
        version = python_version(candidate)
        tried.append(f"{candidate} ({'.'.join(map(str, version)) if version else 'does not run'})")
        if version in SUPPORTED_PYTHON:
            # The real interpreter, not a pyenv shim whose answer depends on the environment.
            real = subprocess.run([candidate, "-c", "import sys; print(sys.executable)"],
                                  capture_output=True, text=True).stdout.strip()
            return real or candidate, version
    raise HarnessError(
        "the NDIF server needs Python 3.12 or 3.13 (ndif requires >=3.12,<3.14); found none. Tried: "
        + (", ".join(tried) or "nothing")
        + f". Install one (e.g. `pyenv install {PYENV_VERSION}`) or set TASKVEC_NDIF_PYTHON to its path."
    )


def ensure_redis() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                             else None)
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
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(found):
        raise HarnessError("apt-get installed redis-server, but no redis-server binary is there")
    return found


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes (two test sessions installing at once wait for each other)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"({path} unreadable)"


class Venv:
    """A cached venv: <cache>/ndif/<name>-<sha16 of python + requirements>/{venv,requirements.txt,DONE}.

    A venv hard-codes its own path, so it is built in place; the DONE marker is written last, and a
    folder without it (an interrupted install) is removed and built again.
    """

    def __init__(self, name: str, requirements: str, python: str, version: tuple[int, int], check: str):
        self.name, self.requirements, self.python, self.check = name, requirements, python, check
        key_text = f"python {version[0]}.{version[1]}\n{requirements}"
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
                                [str(self.bin / "python"), "-c", self.check]):
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


SERVER_CHECK = (
    "import importlib.metadata as m\n"
    "pins = {'ndif': '0.1.2', 'nnsight': '0.8.1', 'torch': '2.13.0', 'transformers': '5.23.0'}\n"
    "got = {name: m.version(name) for name in pins}\n"
    "bad = {n: v for n, v in got.items() if not v.split('+')[0] == pins[n]}\n"
    "assert not bad, f'unexpected versions: {bad}'\n"
    "import ndif.services.ray.deployments.modeling.base, ndif.services.api.app, nnsight, ray\n"
    "print('server venv ok:', got, 'ray', ray.__version__)\n"
)
S3_CHECK = ("import moto, shutil, sys\n"
            "assert shutil.which('moto_server', path=sys.prefix + '/bin')\n"
            "print('moto', moto.__version__)\n")


def venvs() -> tuple[Venv, Venv]:
    python, version = find_server_python()
    return (Venv("server", SERVER_REQUIREMENTS, python, version, SERVER_CHECK),
            Venv("s3", S3_REQUIREMENTS, python, version, S3_CHECK))


def installed_venvs() -> tuple[Venv, Venv]:
    server, s3 = venvs()
    missing = [v.name for v in (server, s3) if not v.ready()]
    if missing:
        raise HarnessError(f"the NDIF server is not installed ({', '.join(missing)} venv missing under "
                           f"{cache_root()}): run `python3 scripts/ndif_local.py install` first")
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


# ----------------------------------------------------------------------------------------------------------
# The stack: ports, environment, processes
# ----------------------------------------------------------------------------------------------------------

# Every port a stack listens on. Ray's worker processes take ports from Ray's own range (10002-19999);
# the Ray client server its per-client servers from 23000-23999. The ports chosen here come from
# 24100-31999, below the kernel's ephemeral range (32768+), so an
# outgoing connection never takes one between the choice and the bind.
PORT_NAMES = ("api", "redis", "s3", "ray", "ray_client", "node_manager", "object_manager", "dashboard",
              "dashboard_agent_grpc", "dashboard_agent_listen", "metrics", "runtime_env_agent")
PORT_RANGE = (24100, 32000)


def port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def choose_ports(given: dict[str, int | None], base: int | None) -> dict[str, int]:
    """Given ports as they are; the rest free ones from ``base`` upwards (random when not given)."""
    ports: dict[str, int] = {}
    taken = {p for p in given.values() if p}
    candidate = base if base else random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 500)
    for name in PORT_NAMES:
        if given.get(name):
            ports[name] = given[name]
            continue
        while candidate in taken or not port_free(candidate):
            candidate += 1
            if candidate >= 65535:
                raise HarnessError("no free port found")
        ports[name] = candidate
        taken.add(candidate)
        candidate += 1
    for name, port in given.items():
        if port and not port_free(port):
            raise HarnessError(f"--{name.replace('_', '-')}-port {port} is in use")
    return ports


class Stack:
    """One stack's folder. RUNDIR/stack.json records its ports, processes and models."""

    def __init__(self, rundir: str | Path):
        self.dir = Path(rundir).expanduser().absolute()
        self.file = self.dir / "stack.json"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"

    def read(self) -> dict:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, state: dict) -> None:
        tmp = self.file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.file)

    def host(self, state: dict | None = None) -> str:
        return f"http://127.0.0.1:{(state or self.read())['ports']['api']}"

    def env(self, state: dict, server: Venv, s3: Venv) -> dict:
        """The environment of every process of the stack."""
        ports, d = state["ports"], self.dir
        resources = {"GPU": 1, "CPU": 4, "cuda_memory_bytes": FAKE_GPU_BYTES}
        keep = {k: v for k, v in os.environ.items()
                if k in ("LANG", "LC_ALL", "TERM", "USER", "LOGNAME", "SHELL", "TZ")}
        return {
            **keep,
            STACK_TAG: state["tag"],
            "PATH": os.pathsep.join([str(server.bin), str(s3.bin), "/usr/local/sbin", "/usr/local/bin",
                                     "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
            "VIRTUAL_ENV": str(server.venv),
            # Nothing of the stack goes to the real home folder or /tmp.
            "HOME": str(d / "home"),
            "XDG_CACHE_HOME": str(d / "home" / ".cache"),
            "XDG_CONFIG_HOME": str(d / "home" / ".config"),
            "TMPDIR": str(d / "tmp"),
            "HF_HOME": str(d / "hf"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(d / "shim"),  # the CPU model actor
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
            "NDIF_HOME": str(d / "ndif"),
            "NDIF_LOGO": "0",
            "NDIF_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}",
            "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{ports['ray_client']}",
            "NDIF_RAY_HEAD_PORT": str(ports["ray"]),
            "NDIF_RAY_DASHBOARD_PORT": str(ports["dashboard"]),
            "NDIF_RAY_TEMP_DIR": str(d / "ray"),
            "NDIF_API_PORT": str(ports["api"]),
            "NDIF_API_URL": f"http://127.0.0.1:{ports['api']}",
            "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{ports['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": S3_KEY,
            "NDIF_OBJECT_STORE_SECRET_KEY": S3_KEY,
            "NDIF_MODEL_IMPORT_PATH": CPU_ACTOR_CLASS,
            "NDIF_DEFAULT_DTYPE": "float32",
            "NDIF_DEFAULT_PADDING_BIAS": "0",
            "NDIF_STATUS_TTL_S": "1",  # /status is a cache; fresh within a second (default 60)
            # The controller places models only on nodes with a GPU, sized by cuda_memory_bytes.
            "RAY_OVERRIDE_RESOURCES": json.dumps(resources),
            "RAY_USAGE_STATS_ENABLED": "0",
            # As ndif's ray/start.sh: a forked Ray client server dies at random with gRPC's fork support on.
            "GRPC_ENABLE_FORK_SUPPORT": "0",
            # gunicorn >= 27 opens a control socket under ~/.gunicorn; bind to loopback only.
            "GUNICORN_CMD_ARGS": f"--no-control-socket --bind 127.0.0.1:{ports['api']}",
        }

    # ---------------------------------------------------------------- processes

    def spawn(self, state: dict, name: str, command: list[str], env: dict) -> subprocess.Popen:
        """Start ``command`` in its own session, output to RUNDIR/logs/NAME.log, and record it.

        Its session id names the process and everything it starts (Ray's daemons and workers stay in
        the session of ``ray start``), which is how ``stop`` finds them all.
        """
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} $ {shlex.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(command, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        info = read_proc(proc.pid)
        state.setdefault("processes", {})[name] = {"pid": proc.pid, "pgid": proc.pid, "sid": proc.pid,
                                                    "starttime": info["starttime"] if info else None}
        if proc.pid not in state.setdefault("sessions", []):
            state["sessions"].append(proc.pid)
        self.write(state)
        return proc

    def processes(self, state: dict | None = None) -> list[dict]:
        """Every live process of this stack: in one of its sessions, or carrying its tag.

        Only processes started since the stack's start, in this boot: a session id recorded by a stack
        that died long ago (or before a reboot) may by now name someone else's session.
        """
        state = state if state is not None else self.read()
        sessions = set(state.get("sessions", []))
        tag = state.get("tag")
        if (not sessions and not tag) or state.get("boot_id") != boot_id():
            return []
        since = state.get("since", 0)
        mine = set(ancestors(os.getpid()))
        found = []
        for pid in all_pids():
            if pid in mine:
                continue
            info = read_proc(pid)
            if info is None or info["state"] in ("Z", "X") or info["starttime"] < since:
                continue
            in_session = info["sid"] in sessions or info["pgid"] in sessions
            if in_session or (tag and environ_has(pid, f"{STACK_TAG}={tag}")):
                found.append(info)
        return found

    def kill_all(self, state: dict, grace: float = 5.0) -> tuple[int, list[str]]:
        """SIGTERM every process of the stack, SIGKILL what is left after ``grace`` seconds (Ray's GCS
        server and its monitor ignore SIGTERM for a long while; the stack keeps no state worth a wait).

        The number of processes, and the names of those that needed SIGKILL.
        """
        victims = self.processes(state)
        for info in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info["pid"], signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and self.processes(state):
            time.sleep(0.2)
        killed = []
        for _ in range(5):
            left = self.processes(state)
            if not left:
                break
            for info in left:
                killed.append(f"{info['pid']} {info['name']}")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(info["pid"], signal.SIGKILL)
            time.sleep(0.5)
        return len(victims), killed


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def read_proc(pid: int) -> dict | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return {"pid": pid, "name": name, "state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]),
            "sid": int(fields[3]), "starttime": int(fields[19])}


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 0 and pid not in chain:
        chain.append(pid)
        info = read_proc(pid)
        pid = info["ppid"] if info else 0
    return chain


def environ_has(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup; zeros when unreadable."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def wait_until(check, timeout: float, what: str, logs: list[Path], proc: subprocess.Popen | None = None,
               interval: float = 0.5):
    """Poll ``check()`` until it returns a true value; a clear error with the logs' tails otherwise."""
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            problem = f"{what}: the process exited with code {proc.returncode}"
            break
        if time.time() > deadline:
            problem = f"{what}: not ready after {timeout:.0f}s"
            break
        time.sleep(interval)
    tails = "\n".join(f"--- end of {path}:\n{tail_file(path, 30)}" for path in logs)
    raise HarnessError(f"{problem}\n{tails}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)


# ----------------------------------------------------------------------------------------------------------
# start / stop / status / env
# ----------------------------------------------------------------------------------------------------------


def cmd_start(args) -> None:
    start = time.time()
    server, s3 = installed_venvs()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(redis):
        raise HarnessError("redis-server is missing: run `python3 scripts/ndif_local.py install` first")
    stack = Stack(args.dir)
    old = stack.read()
    if old and stack.processes(old):
        raise HarnessError(f"a stack already runs in {stack.dir} ({stack.host(old)}): stop it first")
    if len(str(stack.dir / "ray")) > 60:
        # Ray's session folder holds unix sockets, whose paths may not exceed 107 bytes.
        raise HarnessError(f"{stack.dir} is too long a path for Ray's sockets: use a shorter folder "
                           "(at most about 55 characters)")
    for sub in ("tmp", "home", "hf", "ray", "ndif", "shim", "redis", "logs", "pids"):
        (stack.dir / sub).mkdir(parents=True, exist_ok=True)
    for stale in stack.pids.glob("*.pid"):
        stale.unlink()
    (stack.dir / "shim" / f"{CPU_ACTOR_MODULE}.py").write_text(CPU_ACTOR_SOURCE)

    # Ports: those given; else those of the previous run in this folder (a restart keeps its address)
    # when still free; else free ones.
    given = {name: getattr(args, f"{name}_port", None) for name in PORT_NAMES}
    previous = old.get("ports", {})
    if previous and all(given[n] or port_free(previous[n]) for n in PORT_NAMES if n in previous):
        given = {n: given[n] or previous.get(n) for n in PORT_NAMES}
    state = {"dir": str(stack.dir), "tag": f"{stack.dir}#{os.getpid()}-{time.time():.0f}",
             "ports": choose_ports(given, args.port_base), "status": "starting", "started": time.time(),
             "server_venv": str(server.venv), "s3_venv": str(s3.venv), "sessions": [], "processes": {},
             "models": {}, "boot_id": boot_id(), "since": read_proc(os.getpid())["starttime"]}
    state["host"] = stack.host(state)
    stack.write(state)
    ports = state["ports"]
    env = stack.env(state, server, s3)
    timings = {}
    try:
        t = time.time()
        moto = stack.spawn(state, "s3", [str(s3.bin / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                           env)
        redis_proc = stack.spawn(state, "redis", [
            redis, "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--dir", str(stack.dir / "redis"),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""], env)
        wait_until(lambda: port_open(ports["redis"]), 30, "redis-server", [stack.logs / "redis.log"], redis_proc)
        wait_until(lambda: port_open(ports["s3"]), 60, "moto_server", [stack.logs / "s3.log"], moto)
        timings["redis+s3"] = time.time() - t

        t = time.time()
        mem_total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
        resources = {"head": 10, "cuda_memory_bytes": FAKE_GPU_BYTES, "cpu_memory_bytes": mem_total}
        ray_cmd = [str(server.bin / "ray"), "start", "--head", "--disable-usage-stats",
                   "--node-ip-address=127.0.0.1", f"--port={ports['ray']}",
                   f"--ray-client-server-port={ports['ray_client']}",
                   f"--node-manager-port={ports['node_manager']}",
                   f"--object-manager-port={ports['object_manager']}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={ports['dashboard']}",
                   f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
                   f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
                   f"--metrics-export-port={ports['metrics']}",
                   f"--runtime-env-agent-port={ports['runtime_env_agent']}",
                   f"--resources={json.dumps(resources)}", f"--temp-dir={stack.dir / 'ray'}"]
        ray_proc = stack.spawn(state, "ray", ray_cmd, env)
        wait_until(lambda: ray_proc.poll() is not None, 180, "ray start", [stack.logs / "ray.log"])
        if ray_proc.returncode != 0:
            raise HarnessError(f"ray start failed ({ray_proc.returncode}):\n{tail_file(stack.logs / 'ray.log')}")
        timings["ray"] = time.time() - t

        # The controller: a driver that launches the detached Controller actor, then exits.
        t = time.time()
        controller = stack.spawn(
            state, "controller",
            [str(server.bin / "python"), "-m", "ndif.services.ray.deployments.controller.controller"],
            {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['ray']}", "NDIF_SERVICE": "ray"})
        wait_until(lambda: controller.poll() is not None, 180, "ndif controller", [stack.logs / "controller.log"])
        if controller.returncode != 0:
            raise HarnessError(f"the ndif controller failed ({controller.returncode}):\n"
                               f"{tail_file(stack.logs / 'controller.log')}")
        timings["controller"] = time.time() - t

        t = time.time()
        api = stack.spawn(state, "api", [str(server.bin / "gunicorn"), "--config",
                                         "python:ndif.services.api.gunicorn_conf", "ndif.services.api.app:app"],
                          {**env, "NDIF_SERVICE": "api"})
        wait_until(lambda: http_get(f"{state['host']}/connected", 2)[0] == 200, args.timeout,
                   f"the NDIF API ({state['host']}/connected)", [stack.logs / "api.log"], api, interval=1)
        timings["api"] = time.time() - t
    except BaseException:
        state["status"] = "failed"
        stack.write(state)
        stack.kill_all(state, grace=5)
        raise
    state["status"] = "running"
    state["start_seconds"] = round(time.time() - start, 1)
    state["started_processes"] = [{k: p[k] for k in ("pid", "pgid", "sid", "name")}
                                  for p in stack.processes(state)]
    stack.write(state)
    log(f"started in {time.time() - start:.1f}s ("
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) + f"): {state['host']}  [{stack.dir}]")


def cmd_stop(args) -> None:
    stack = Stack(args.dir)
    state = stack.read()
    if not state:
        log(f"no stack in {stack.dir}: nothing to stop")
        return
    start = time.time()
    count, killed = stack.kill_all(state)
    left = stack.processes(state)
    state["status"] = "stopped" if not left else "stop-failed"
    state["models"] = {}
    if not left:  # nothing of it is left to find: forget its sessions, which the system may reuse
        state["sessions"], state["tag"] = [], None
    stack.write(state)
    for pidfile in stack.pids.glob("*.pid"):
        pidfile.unlink()
    if left:
        raise HarnessError("processes survived SIGKILL: " + ", ".join(str(p["pid"]) for p in left))
    log(f"stopped {count} process(es) in {time.time() - start:.1f}s"
        + (f" ({len(killed)} with SIGKILL: {', '.join(sorted({k.split(' ', 1)[1] for k in killed}))})"
           if killed else "") + f"  [{stack.dir}]")


def cmd_watch(args) -> None:
    """Stop the stack once process PID has gone (a test session killed before its teardown ran)."""
    stack = Stack(args.dir)
    while Path(f"/proc/{args.pid}").exists() and read_proc(args.pid) and read_proc(args.pid)["state"] != "Z":
        time.sleep(args.interval)
    state = stack.read()
    if state and stack.processes(state):
        log(f"process {args.pid} is gone: stopping the stack in {stack.dir}")
        cmd_stop(args)


def cmd_status(args) -> None:
    stack = Stack(args.dir)
    state = stack.read()
    if not state:
        print(f"no stack in {stack.dir}")
        raise SystemExit(3)
    procs = stack.processes(state)
    code, body = http_get(f"{stack.host(state)}/connected", 3) if procs else (0, "")
    print(f"stack {stack.dir}: {state.get('status')}, {len(procs)} process(es), API {stack.host(state)} "
          f"{'connected' if code == 200 else 'not answering'}")
    print("ports: " + ", ".join(f"{k} {v}" for k, v in state.get("ports", {}).items()))
    for folder, key in state.get("models", {}).items():
        print(f"model {folder}\n  key {key}")
    total_rss = total_pss = 0
    for info in sorted(procs, key=lambda p: p["pid"]):
        rss, pss = memory_kib(info["pid"])
        total_rss += rss
        total_pss += pss
        if args.verbose:
            print(f"  {info['pid']:>7} sid {info['sid']:>7} rss {rss / 1024:7.0f} MiB pss {pss / 1024:7.0f} MiB  "
                  f"{cmdline(info['pid'])[:110]}")
    if procs:
        print(f"memory: RSS {total_rss / 1024:.0f} MiB, PSS {total_pss / 1024:.0f} MiB")
    if args.json:
        print(json.dumps({"state": state, "pids": [p["pid"] for p in procs], "rss_kib": total_rss,
                          "pss_kib": total_pss, "connected": code == 200}))
    if not procs or code != 200:
        raise SystemExit(3)


def cmd_env(args) -> None:
    """Shell exports of the stack's environment, e.g. `eval "$(ndif_local.py env --dir D)"; ndif status`."""
    stack = Stack(args.dir)
    state = stack.read()
    if not state:
        raise HarnessError(f"no stack in {stack.dir}")
    server, s3 = installed_venvs()
    for key, value in stack.env(state, server, s3).items():
        if key not in ("HOME", "LANG", "LC_ALL", "TERM", "USER", "LOGNAME", "SHELL", "TZ", "PATH"):
            print(f"export {key}={shlex.quote(value)}")
    print(f"export PATH={shlex.quote(str(server.bin))}:\"$PATH\"")


# ----------------------------------------------------------------------------------------------------------
# deploy
# ----------------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_key(folder: str) -> str:
    """The key nnsight 0.8.1's client sends for ``TransformersModel(folder)`` / ``LanguageModel(folder)``.

    ``Remotable.to_model_key``: "<import path of TransformersModel>:<json>", where the JSON is
    ``HuggingFaceModel._remoteable_model_key`` ({"repo_id", "revision"}) plus the pipeline task that
    ``TransformersModel._remoteable_model_key`` adds, dumped with json.dumps' default separators. The
    client puts the Hub's canonical id in "repo_id" (HfApi().model_info); for a local folder that look-up
    fails, so clients pre-fill ``nnsight.modeling.huggingface._ID_CACHE[folder] = folder``.
    """
    suffix = json.dumps({"repo_id": folder, "revision": None, "task": "text-generation"})
    return f"nnsight.modeling.transformers.TransformersModel:{suffix}"


def weights_bytes(folder: Path) -> int:
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not size:
        raise HarnessError(f"{folder}: no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return size


def yaml_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def served_keys(host: str) -> set[str]:
    """Model keys with a replica in the RUNNING state, from the API's /status."""
    code, body = http_get(f"{host}/status", 10)
    if code != 200:
        return set()
    try:
        deployments = json.loads(body).get("deployments", {})
    except ValueError:
        return set()
    # Entries are "<replica>:<actor class>:<model key>"; the model key itself contains colons.
    return {name.split(":", 2)[2] for name, info in deployments.items()
            if name.count(":") >= 2 and info.get("application_state") == "RUNNING"}


def cmd_deploy(args) -> None:
    stack = Stack(args.dir)
    state = stack.read()
    if not state or not stack.processes(state) or http_get(f"{stack.host(state)}/connected", 3)[0] != 200:
        raise HarnessError(f"no running stack in {stack.dir}: start it first")
    server, s3 = installed_venvs()
    specs, keys, sizes = [], {}, {}
    for raw in args.folders:
        folder = os.path.abspath(raw)  # the client must use this exact string as the model's path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise HarnessError(f"{folder}: not a model folder (no config.json)")
        keys[folder] = model_key(folder)
        sizes[folder] = weights_bytes(Path(folder))
        # model_key, size_bytes, dtype and actor_class given, so the controller neither asks the Hub
        # nor describes the checkpoint (which fails with ndif 0.1.2 + nnsight 0.8.1).
        specs.append(f"  - checkpoint: {yaml_str(folder)}\n"
                     f"    model_key: {yaml_str(keys[folder])}\n"
                     "    task: text-generation\n"
                     f"    size_bytes: {sizes[folder]}\n"
                     "    dtype: float32\n"
                     f"    actor_class: {CPU_ACTOR_CLASS}\n"
                     "    pinned: true\n")
    spec = stack.dir / f"deploy-{sha16(' '.join(keys))}.yaml"
    spec.write_text("models:\n" + "".join(specs))
    # One `ndif deploy` for all: one Ray client connection (each holds a ~0.5 GB server process a while),
    # and the models load in parallel.
    start = time.time()
    timeout = args.timeout * len(keys)
    logfile = stack.logs / "deploy.log"
    with open(logfile, "ab") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} deploy {' '.join(keys)}\n".encode())
        out.flush()
        proc = subprocess.Popen([str(server.bin / "ndif"), "deploy", "-f", str(spec)], cwd=stack.dir,
                                env=stack.env(state, server, s3), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    actor_logs = f"(the model actors' logs: {stack.dir / 'ray'}/session_latest/logs/worker-*.err)"
    if code != 0:
        what = f"took over {timeout:.0f}s" if code is None else f"failed ({code})"
        raise HarnessError(f"`ndif deploy` {what}; end of {logfile}:\n{tail_file(logfile)}\n{actor_logs}")
    # `ndif deploy` returns once every replica is ready; the API's view must agree.
    host = stack.host(state)
    wait_until(lambda: set(keys.values()) <= served_keys(host), 60, f"the deployed models in {host}/status",
               [logfile])
    seconds = time.time() - start
    state = stack.read()
    state.setdefault("models", {}).update(keys)
    for folder in keys:
        state.setdefault("deploy_seconds", {})[folder] = round(seconds, 1)
    stack.write(state)
    log(f"deployed in {seconds:.1f}s: " + ", ".join(f"{f} ({sizes[f] / 1e6:.1f} MB)" for f in keys))


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ndif_local.py", description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for the details.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install redis-server and the cached server venvs (idempotent)")
    p.add_argument("--or-skip", action="store_true",
                   help="when it cannot install, say why and exit 0, unless on CI (CI=true): for `make test`, "
                        "whose NDIF server tests then skip (and fail on CI)")

    def with_dir(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dir", required=True, help="the stack's folder (RUNDIR); every file stays in it")
        return p

    p = with_dir("start", "start the stack in RUNDIR and wait until its API answers")
    for name in PORT_NAMES:
        p.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=None, dest=f"{name}_port",
                       help=argparse.SUPPRESS if name not in ("api", "redis", "s3", "ray", "ray_client") else
                       f"the {name.replace('_', ' ')} port (default: a free one)")
    p.add_argument("--port-base", type=int, default=None,
                   help="take the ports not given from PORT_BASE upwards (default: a random free range)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the API (default 180)")
    p = with_dir("deploy", "serve local model folders and wait until they are ready")
    p.add_argument("folders", nargs="+", metavar="MODEL_FOLDER")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait per model (default 300)")
    with_dir("stop", "stop every process of the stack (idempotent)")
    p = with_dir("status", "what runs (exit 0 when the API answers, 3 otherwise)")
    p.add_argument("-v", "--verbose", action="store_true", help="list the processes")
    p.add_argument("--json", action="store_true", help="also print a JSON summary")
    with_dir("env", "print the stack's environment as shell exports")
    p = with_dir("watch", "wait until process PID ends, then stop the stack (a guard for test sessions)")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    commands = {"install": cmd_install, "start": cmd_start, "deploy": cmd_deploy, "stop": cmd_stop,
                "status": cmd_status, "env": cmd_env, "watch": cmd_watch}
    try:
        commands[args.command](args)
    except HarnessError as error:
        if args.command == "install" and args.or_skip and not on_ci():
            print(f"ndif_local: cannot install the NDIF server ({error}): its tests will be skipped")
            return 0
        print(f"ndif_local: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
