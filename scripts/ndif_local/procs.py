"""A stack's processes, through psutil: start each in its own session, find every process of a stack
(its sessions, or the tag in its environment), stop them all; and waiting until a service answers."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from .common import HarnessError, tail_file

GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def spawn(command: list[str], env: dict, cwd: Path, logfile: Path) -> subprocess.Popen:
    """Start ``command`` in a new session, its output appended to ``logfile``.

    The session id (the new process's pid) names it and everything it starts: Ray's daemons and workers
    stay in the session of ``ray start``.
    """
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} $ {shlex.join(command)}\n".encode())
        out.flush()
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def find(sessions: set[int], tag: tuple[str, str] | None, since: float) -> list[psutil.Process]:
    """Live processes in one of ``sessions`` (as session or process group), or whose environment has
    ``tag`` (name, value); only those created since ``since`` (a session id recorded long ago may name
    someone else's session by now). Never this process nor its ancestors: a shell that ran ``env``'s
    exports carries the tag."""
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter(["create_time", "status"]):
        if proc.pid in mine or proc.info["status"] in GONE or (proc.info["create_time"] or 0) < since:
            continue
        try:
            if os.getsid(proc.pid) in sessions or os.getpgid(proc.pid) in sessions:
                found.append(proc)
            elif tag and proc.environ().get(tag[0]) == tag[1]:
                found.append(proc)
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to read
            continue
    return found


def describe(proc: psutil.Process) -> dict:
    """pid, pgid, sid, name of a live process (for stack.json)."""
    return {"pid": proc.pid, "pgid": os.getpgid(proc.pid), "sid": os.getsid(proc.pid), "name": proc.name()}


def stop(find_them, grace: float = 5.0) -> tuple[int, list[str]]:
    """SIGTERM every process ``find_them()`` returns, SIGKILL what is left after ``grace`` seconds (Ray's
    GCS server and its monitor ignore SIGTERM for a long while; the stack keeps no state worth a wait),
    and whatever appeared meanwhile (a raylet replaces the workers it loses).

    The number of processes, and "pid name" of those that needed SIGKILL.
    """
    victims = find_them()
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=grace)
    killed = []
    for _ in range(5):
        left = find_them()
        if not left:
            break
        for proc in left:
            try:
                killed.append(f"{proc.pid} {proc.name()}")
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=2)
    return len(victims), killed


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants."""
    try:
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=5)


def memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) in bytes; zeros when unreadable."""
    try:
        info = proc.memory_full_info()
        return info.rss, getattr(info, "pss", 0)
    except psutil.Error:
        return 0, 0


def wait_gone(pid: int, interval: float) -> None:
    """Return once process ``pid`` has ended: exited, a zombie, or its pid now another process's."""
    try:
        proc = psutil.Process(pid)
        while proc.is_running() and proc.status() not in GONE:  # is_running: the same process, not a reuse
            time.sleep(interval)
    except psutil.Error:
        pass


# ---------------------------------------------------------------------------------------------------- waiting


def wait_until(check, timeout: float, what: str, logs: list[Path], proc: subprocess.Popen | None = None,
               interval: float = 0.5):
    """Poll ``check()`` until it returns a true value; a clear error with the logs' tails otherwise (also
    as soon as ``proc``, the process that should answer, has exited)."""
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


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)
