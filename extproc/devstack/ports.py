"""Ports for the local stack's children (Envoy, Redis, the sidecar, the simulator), chosen
where no outgoing connection can take them before the child binds them."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_ports = random.Random(os.urandom(16))  # its own: tests may seed the module's generator
_given: set[int] = set()


def _listening_ports() -> range:
    """Where to look for a free port: below (or above) the kernel's ephemeral range.

    Why: a port found with bind(0) comes from the range the kernel also hands to outgoing
    connections, so between choosing it and a child binding it, any connection made
    meanwhile (to Redis, from a load generator) may take it, and Envoy stops with "Address
    already in use" (seen once in CI). A port outside that range is handed to no one who does
    not ask for it by number.
    """
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low > 12_000:
        return range(10_000, low)
    return range(high + 1, 65_536)


def free_port() -> int:
    """A port free right now, outside the ephemeral range, not handed out before by this
    process (random, so processes choosing at once rarely meet; the bind probe settles it)."""
    candidates = _listening_ports()
    for _ in range(500):
        port = _ports.choice(candidates)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:  # a crowded machine: any port the kernel has
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` consecutive ports free right now (a worker's own port is the first's + i)."""
    for _ in range(100):
        first = free_port()
        if first + count - 1 > 65535 or _given.intersection(range(first + 1, first + count)):
            continue
        probes: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        _given.update(range(first, first + count))
        return list(range(first, first + count))
    raise RuntimeError(f"no {count} consecutive free ports found")
