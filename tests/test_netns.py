"""The local NDIF stack's loopback check (scripts/ndif_local/netns.py) on planted sockets: it can fail."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from ndif_local import netns  # noqa: E402


def test_a_socket_on_every_interface_is_exposure_and_loopback_is_not():
    me = psutil.Process()
    with socket.socket() as wide, socket.socket() as local:
        wide.bind(("0.0.0.0", 0))
        wide.listen(1)
        local.bind(("127.0.0.1", 0))
        local.listen(1)
        found, wide_port, local_port = netns.exposure([me]), wide.getsockname()[1], local.getsockname()[1]
    assert any(f"listens on 0.0.0.0:{wide_port}" in line for line in found), found
    assert not any(f":{local_port}" in line for line in found), found


def test_loopback_addresses():
    assert netns.loopback("127.0.0.1") and netns.loopback("127.5.0.1") and netns.loopback("::1")
    assert netns.loopback("::ffff:127.0.0.1") and not netns.loopback("::ffff:192.0.2.2")
    assert not netns.loopback("0.0.0.0") and not netns.loopback("192.0.2.2") and not netns.loopback("::")
