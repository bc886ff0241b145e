"""The stack's own network: a namespace whose only interface is loopback, and a bridge for the ports a client needs.

Ray binds several of its services on every interface whatever its flags say; inside a namespace that has only
``lo``, "every interface" is loopback, so nothing of the stack can be reached from another machine. The
clients (tests, the book, ``deploy``'s checks) stay in the machine's own namespace: a bridge process listens
there on 127.0.0.1 at the API, object-store and redis ports, and relays each connection to the same port
inside the stack's namespace. Its listening sockets are made before it joins that namespace (a socket keeps
the namespace it was made in), so one process serves both sides.

Creating a network namespace needs root (CAP_SYS_ADMIN); :func:`available` says whether this process can.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time

import psutil

CLONE_NEWNET = 0x40000000


def available() -> bool:
    """Whether this process can make and enter network namespaces (root with unshare, nsenter and ip)."""
    if os.geteuid() != 0:
        return False
    return all(subprocess.run(["which", tool], capture_output=True).returncode == 0
               for tool in ("unshare", "nsenter", "ip"))


def namespace_of(pid: int | str = "self") -> str:
    """The network namespace of ``pid`` ("net:[4026531833]"); "" when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def holder_command() -> list[str]:
    """A process that only holds a new network namespace open (with ``lo`` down: :func:`bring_up` it)."""
    return ["unshare", "--net", "sleep", "infinity"]


def wait_for_namespace(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` (started with :func:`holder_command`) is in a namespace other than ours."""
    deadline = time.time() + timeout
    ours = namespace_of()
    while time.time() < deadline:
        theirs = namespace_of(pid)
        if theirs and theirs != ours and psutil.Process(pid).name() == "sleep":
            return
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} did not enter a network namespace of its own within {timeout:g} s")


def enter(pid: int) -> list[str]:
    """The prefix that runs a command inside ``pid``'s network namespace."""
    return ["nsenter", "--target", str(pid), "--net", "--"]


def bring_up(pid: int) -> None:
    subprocess.run(enter(pid) + ["ip", "link", "set", "lo", "up"], check=True, capture_output=True)


def interfaces(pid: int) -> list[str]:
    """The network interfaces in ``pid``'s namespace."""
    out = subprocess.run(enter(pid) + ["ip", "-o", "link", "show"], check=True, capture_output=True, text=True)
    return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines() if ":" in line]


def loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4's loopback seen through IPv6
    return (mapped or ip).is_loopback


def exposure(processes: list[psutil.Process]) -> list[str]:
    """Every way ``processes`` could be reached from outside the machine, one line each (empty: none).

    A process in this machine's namespace may listen on loopback addresses only. A process in another
    namespace may listen anywhere as long as that namespace has no interface but ``lo``.
    """
    ours, problems, checked = namespace_of(), [], {}
    for proc in processes:
        try:
            space, name = namespace_of(proc.pid), proc.name()
            # psutil matches the process's sockets against this process's /proc/net: it finds the ones that
            # live in our namespace, whatever namespace the process itself is in now (the bridge made its
            # listeners here, then joined the stack's).
            listening = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        for conn in listening:
            if not loopback(conn.laddr.ip):
                problems.append(f"{name} (pid {proc.pid}) listens on {conn.laddr.ip}:{conn.laddr.port}")
        if space == ours or not space:
            continue
        if space not in checked:  # another namespace: whatever it listens on, it must have no way out
            try:
                checked[space] = [i for i in interfaces(proc.pid) if i != "lo"]
            except (subprocess.CalledProcessError, OSError) as error:
                checked[space] = [f"unreadable ({error})"]
            if checked[space]:
                problems.append(f"{name} (pid {proc.pid}) runs in a network namespace with interfaces "
                                f"{', '.join(checked[space])}")
    return problems


# --- the bridge -----------------------------------------------------------------------------------------

def _setns(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/proc/{pid}/ns/net") as handle:
        if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid} failed")


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((target, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, port), daemon=True).start()


def bridge(pid: int, ports: list[int]) -> None:
    """Listen on 127.0.0.1 at ``ports`` here, then join ``pid``'s namespace and relay each connection to the
    same port there; runs until killed."""
    listeners = []
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listeners.append(listener)
    _setns(pid)  # from here on, new sockets are made inside the stack's namespace
    for listener, port in zip(listeners[1:], ports[1:]):
        threading.Thread(target=_serve, args=(listener, port), daemon=True).start()
    print(f"bridging 127.0.0.1:{','.join(map(str, ports))} into the namespace of {pid}", flush=True)
    _serve(listeners[0], ports[0])


if __name__ == "__main__":  # python netns.py PID PORT [PORT...]
    bridge(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
