"""One stack in RUNDIR: its ports, the environment every process of it gets (the settings the real server
needs on a CPU-only machine), and ``start`` / ``stop`` / ``status`` / ``env`` / ``watch``."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from . import procs
from .common import HarnessError, log, tail_file
from . import netns
from .install import Venv, find_redis, installed_venvs

CPU_ACTOR_MODULE = "taskvec_ndif_cpu_actor"  # cpu_actor.py, under this name in RUNDIR/shim
CPU_ACTOR_CLASS = f"{CPU_ACTOR_MODULE}.CPUModelActor"
FAKE_GPU_BYTES = 16_000_000_000  # what the fake GPU advertises; the models served here are far smaller
S3_KEY = "testing"
STACK_TAG = "TASKVEC_NDIF_STACK"  # environment variable carried by every process of a stack

# Every port a stack listens on. Ray's worker processes take ports from Ray's own range (10002-19999);
# the Ray client server its per-client servers from 23000-23999. The ports chosen here come from
# 24100-31999, below the kernel's ephemeral range (32768+), so an
# outgoing connection never takes one between the choice and the bind.
PORT_NAMES = ("api", "redis", "s3", "ray", "ray_client", "node_manager", "object_manager", "dashboard",
              "dashboard_agent_grpc", "dashboard_agent_listen", "metrics", "runtime_env_agent")
PORT_RANGE = (24100, 32000)


def choose_ports(given: dict[str, int | None], base: int | None) -> dict[str, int]:
    """Given ports as they are; the rest free ones from ``base`` upwards (random when not given)."""
    ports: dict[str, int] = {}
    taken = {p for p in given.values() if p}
    candidate = base if base else random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 500)
    for name in PORT_NAMES:
        if given.get(name):
            ports[name] = given[name]
            continue
        while candidate in taken or not procs.port_free(candidate):
            candidate += 1
            if candidate >= 65535:
                raise HarnessError("no free port found")
        ports[name] = candidate
        taken.add(candidate)
        candidate += 1
    for name, port in given.items():
        if port and not procs.port_free(port):
            raise HarnessError(f"--{name.replace('_', '-')}-port {port} is in use")
    return ports


def boot_id() -> str:
    """This boot's id: sessions recorded before a reboot name nothing of the stack."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


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
        # NDIF_MIN_*: the API's client-version gate (ndif's versioning), set by whoever starts the stack.
        keep = {k: v for k, v in os.environ.items()
                if k in ("LANG", "LC_ALL", "TERM", "USER", "LOGNAME", "SHELL", "TZ") or k.startswith("NDIF_MIN_")}
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

    def spawn(self, state: dict, name: str, command: list[str], env: dict, inside: bool = True):
        """Start ``command`` in its own session (procs.spawn), output to RUNDIR/logs/NAME.log; record its
        session, which is how ``stop`` finds it and everything it starts. ``inside``: in the stack's network
        namespace when it has one (netns.py); the holder of that namespace and the bridge are not."""
        if inside and state.get("netns"):
            command = netns.enter(state["netns"]) + list(command)
        proc = procs.spawn(command, env, self.dir, self.logs / f"{name}.log")
        self.pids.mkdir(parents=True, exist_ok=True)
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        state.setdefault("processes", {})[name] = {"pid": proc.pid, "sid": proc.pid, "created": procs.created(proc.pid)}
        if proc.pid not in state.setdefault("sessions", []):
            state["sessions"].append(proc.pid)
        self.write(state)
        return proc

    def processes(self, state: dict | None = None) -> list[psutil.Process]:
        """Every live process of this stack: in one of its sessions, or carrying its tag; only those
        started since the stack's start, in this boot."""
        state = state if state is not None else self.read()
        sessions, tag = set(state.get("sessions", [])), state.get("tag")
        if (not sessions and not tag) or state.get("boot_id") != boot_id():
            return []
        # A second of slack: create times are derived from the boot time, which the clock may nudge.
        since = state.get("created_after", 0) - 1
        return procs.find(sessions, (STACK_TAG, tag) if tag else None, since)

    def kill_all(self, state: dict, grace: float = 5.0) -> tuple[int, list[str]]:
        return procs.stop(lambda: self.processes(state), grace)

    def port_open(self, state: dict, port: int) -> bool:
        """Whether a service of the stack answers at ``port`` (inside its namespace when it has one: the
        bridge would answer on its behalf before it is up)."""
        if not state.get("netns"):
            return procs.port_open(port)
        probe = ("import socket, sys; s = socket.socket(); s.settimeout(1); "
                 f"sys.exit(s.connect_ex(('127.0.0.1', {int(port)})))")
        return subprocess.run(netns.enter(state["netns"]) + [sys.executable, "-c", probe],
                              capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------------------------------
# start / stop / status / env / watch
# ----------------------------------------------------------------------------------------------------------


def cmd_start(args) -> None:
    start = time.time()
    server, s3 = installed_venvs()
    redis = find_redis()
    if not redis:
        raise HarnessError("redis-server is missing: run `python scripts/ndif_local.py install` first")
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
    shutil.copyfile(Path(__file__).with_name("cpu_actor.py"), stack.dir / "shim" / f"{CPU_ACTOR_MODULE}.py")

    # Ports: those given; else those of the previous run in this folder (a restart keeps its address)
    # when still free; else free ones.
    given = {name: getattr(args, f"{name}_port", None) for name in PORT_NAMES}
    previous = old.get("ports", {})
    if previous and all(given[n] or procs.port_free(previous[n]) for n in PORT_NAMES if n in previous):
        given = {n: given[n] or previous.get(n) for n in PORT_NAMES}
    state = {"dir": str(stack.dir), "tag": f"{stack.dir}#{os.getpid()}-{time.time():.0f}",
             "ports": choose_ports(given, args.port_base), "status": "starting", "started": time.time(),
             "server_venv": str(server.venv), "s3_venv": str(s3.venv), "sessions": [], "processes": {},
             "models": {}, "boot_id": boot_id(), "created_after": procs.created(os.getpid())}
    state["host"] = stack.host(state)
    stack.write(state)
    ports = state["ports"]
    env = stack.env(state, server, s3)
    timings = {}
    try:
        if os.environ.get("TASKVEC_NDIF_NETNS", "1") != "0" and netns.available():
            # Its own network, loopback only (netns.py); clients reach the API, the object store and redis
            # through a bridge on this machine's 127.0.0.1.
            holder = stack.spawn(state, "netns", netns.holder_command(), env, inside=False)
            netns.wait_for_namespace(holder.pid)
            netns.bring_up(holder.pid)
            state["netns"] = holder.pid
            stack.write(state)
            stack.spawn(state, "bridge", [sys.executable, str(Path(__file__).with_name("netns.py")), str(holder.pid),
                                          str(ports["api"]), str(ports["s3"]), str(ports["redis"])], env, inside=False)
        t = time.time()
        moto = stack.spawn(state, "s3", [str(s3.bin / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                           env)
        redis_proc = stack.spawn(state, "redis", [
            redis, "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--dir", str(stack.dir / "redis"),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""], env)
        procs.wait_until(lambda: stack.port_open(state, ports["redis"]), 30, "redis-server", [stack.logs / "redis.log"],
                         redis_proc)
        procs.wait_until(lambda: stack.port_open(state, ports["s3"]), 60, "moto_server", [stack.logs / "s3.log"], moto)
        timings["redis+s3"] = time.time() - t

        t = time.time()
        resources = {"head": 10, "cuda_memory_bytes": FAKE_GPU_BYTES,
                     "cpu_memory_bytes": psutil.virtual_memory().total}
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
        procs.wait_until(lambda: ray_proc.poll() is not None, 180, "ray start", [stack.logs / "ray.log"])
        if ray_proc.returncode != 0:
            raise HarnessError(f"ray start failed ({ray_proc.returncode}):\n{tail_file(stack.logs / 'ray.log')}")
        timings["ray"] = time.time() - t

        # The controller: a driver that launches the detached Controller actor, then exits.
        t = time.time()
        controller = stack.spawn(
            state, "controller",
            [str(server.bin / "python"), "-m", "ndif.services.ray.deployments.controller.controller"],
            {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['ray']}", "NDIF_SERVICE": "ray"})
        procs.wait_until(lambda: controller.poll() is not None, 180, "ndif controller",
                         [stack.logs / "controller.log"])
        if controller.returncode != 0:
            raise HarnessError(f"the ndif controller failed ({controller.returncode}):\n"
                               f"{tail_file(stack.logs / 'controller.log')}")
        timings["controller"] = time.time() - t

        t = time.time()
        api = stack.spawn(state, "api", [str(server.bin / "gunicorn"), "--config",
                                         "python:ndif.services.api.gunicorn_conf", "ndif.services.api.app:app"],
                          {**env, "NDIF_SERVICE": "api"})
        procs.wait_until(lambda: procs.http_get(f"{state['host']}/connected", 2)[0] == 200, args.timeout,
                         f"the NDIF API ({state['host']}/connected)", [stack.logs / "api.log"], api, interval=1)
        timings["api"] = time.time() - t
        # Not "started" while anything of it can be reached from outside this machine.
        exposed = netns.exposure(stack.processes(state))
        if exposed:
            hint = ("" if state.get("netns") else " (without root this stack gets no network namespace of its own, "
                    "and Ray binds some services on every interface: run it as root)")
            raise HarnessError("the stack listens beyond loopback" + hint + ":\n  " + "\n  ".join(exposed))
    except BaseException:
        state["status"] = "failed"
        stack.write(state)
        stack.kill_all(state, grace=5)
        raise
    state["status"] = "running"
    state["start_seconds"] = round(time.time() - start, 1)
    state["started_processes"] = []
    for proc in stack.processes(state):
        try:
            state["started_processes"].append(procs.describe(proc))
        except (OSError, psutil.Error):  # a short-lived worker, gone meanwhile
            pass
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
        raise HarnessError("processes survived SIGKILL: " + ", ".join(str(p.pid) for p in left))
    log(f"stopped {count} process(es) in {time.time() - start:.1f}s"
        + (f" ({len(killed)} with SIGKILL: {', '.join(sorted({k.split(' ', 1)[1] for k in killed}))})"
           if killed else "") + f"  [{stack.dir}]")


def cmd_watch(args) -> None:
    """Stop the stack once process PID has gone (a test session killed before its teardown ran)."""
    stack = Stack(args.dir)
    procs.wait_gone(args.pid, args.interval)
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
    running = stack.processes(state)
    code, body = procs.http_get(f"{stack.host(state)}/connected", 3) if running else (0, "")
    print(f"stack {stack.dir}: {state.get('status')}, {len(running)} process(es), API {stack.host(state)} "
          f"{'connected' if code == 200 else 'not answering'}")
    print("ports: " + ", ".join(f"{k} {v}" for k, v in state.get("ports", {}).items()))
    for folder, key in state.get("models", {}).items():
        print(f"model {folder}\n  key {key}")
    total_rss = total_pss = 0
    for proc in sorted(running, key=lambda p: p.pid):
        rss, pss = procs.memory(proc)
        total_rss += rss
        total_pss += pss
        if args.verbose:
            try:
                sid, command = os.getsid(proc.pid), " ".join(arg for arg in proc.cmdline() if arg)
            except (OSError, psutil.Error):
                continue
            print(f"  {proc.pid:>7} sid {sid:>7} rss {rss / 2**20:7.0f} MiB pss {pss / 2**20:7.0f} MiB  "
                  f"{command[:110]}")
    if running:
        print(f"memory: RSS {total_rss / 2**20:.0f} MiB, PSS {total_pss / 2**20:.0f} MiB")
    if args.json:
        print(json.dumps({"state": state, "pids": [p.pid for p in running], "rss_kib": total_rss // 1024,
                          "pss_kib": total_pss // 1024, "connected": code == 200}))
    if not running or code != 200:
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
